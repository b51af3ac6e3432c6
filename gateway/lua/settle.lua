-- Settlement: after a request, give back what it reserved but did not use.
--
-- KEYS[i]       the same item keys admit.lua reserved
-- ARGV[1]       reservation id
-- ARGV[2..]     per item, 3 values: kind, emission_us (period/limit; unused for 'c'), refund units
--               ('t': tokens reserved minus tokens used — negative when the request used more;
--                'r': requests to give back, 0 or 1; 'c': ignored, the slot is always released)
--
-- A refund moves the GCRA arrival time back, never before now (a bucket cannot be fuller than full).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rid = ARGV[1]
for i = 1, #KEYS do
  local b = 1 + (i - 1) * 3
  local kind, emission, refund = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  if kind == 'c' then
    redis.call('ZREM', KEYS[i], rid)
  elseif refund ~= 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    local new_tat = tat - math.floor(refund * emission)
    if new_tat <= now then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
    end
  end
end
return now
