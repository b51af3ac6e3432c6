-- Settlement: after requests end, give back what they reserved but did not use. One call may
-- settle many reservations (the gateway batches them per hash tag, so a call's keys share a slot).
--
-- KEYS[i]       an item key admit.lua reserved
-- ARGV[...]     per item, 4 values: reservation id, kind, emission_us (period/limit; unused for 'c'),
--               refund units ('t': tokens reserved minus tokens used — negative when the request
--               used more; 'b': nano-dollars reserved minus the actual cost; 'c': ignored, the slot
--               is always released)
--
-- A refund moves the GCRA arrival time back, never before now (a bucket cannot be fuller than full).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local b = (i - 1) * 4
  local rid, kind, emission, refund = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  if kind == 'c' then
    redis.call('ZREM', KEYS[i], rid)
  elseif kind == 'b' then
    -- a budget: give back the estimate's excess (or add what the estimate missed)
    if refund ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCRBY', KEYS[i], -refund)
    end
  elseif refund ~= 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end  -- a refilled bucket: a request that used more is charged from now
    local new_tat = tat - math.floor(refund * emission)
    if new_tat <= now then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
    end
  end
end
return now
