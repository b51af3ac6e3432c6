-- Admission: check every applicable limit of one request and, only if all pass, reserve them.
-- Atomic, one round trip, on Redis's own clock (TIME), so replicas never race and their clocks
-- do not matter. Every key is passed in KEYS; no key name is built here.
--
-- KEYS[i]       state of item i: a GCRA "theoretical arrival time" (string, microseconds) for kinds
--               'r' (requests) and 't' (tokens); a sorted set of reservation ids scored by expiry
--               (microseconds) for kind 'c' (concurrency).
-- ARGV[1]       reservation id
-- ARGV[2]       concurrency slot time-to-live, microseconds (a gateway that dies mid-request
--               cannot hold a slot longer than this)
-- ARGV[3..]     per item, 4 values: kind, limit, period_us, cost
--               kind 'b' (a budget): KEYS[i] is the spend so far (integer nano-dollars), limit the
--               budget, cost the request's estimated cost, period_us the time until the budget's
--               day or month ends (when its counter may expire)
-- ARGV[3 + 4n]  optional: a deadline on Redis's clock (microseconds) after which the caller has
--               stopped waiting; a call run later (Redis stalled, the reply unread) reserves nothing
--               and answers "expired" — so a backlog of abandoned calls cannot hold capacity
--
-- GCRA with burst = limit: an empty bucket admits `limit` units at once, then one unit every
-- period/limit. A window boundary cannot let 2x through, because there are no windows.
--
-- Returns {allowed (1/0), failing item (0 if none; -1: expired), retry_after_us, now_us,
--          then per item: remaining units after this request, microseconds until fully replenished}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rid = ARGV[1]
local ttl = tonumber(ARGV[2])
local n = #KEYS
local deadline = tonumber(ARGV[3 + 4 * n] or '0')
if deadline > 0 and now > deadline then
  return {0, -1, 0, now}
end
local allowed, failing, retry_after = 1, 0, 0
local state = {}
local out = {}
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local kind, limit, period, cost = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local remaining, reset
  if kind == 'b' then
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    remaining = limit - used - cost
    reset = period
    if remaining < 0 and allowed == 1 then
      allowed, failing, retry_after = 0, i, period
    end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local used = redis.call('ZCARD', KEYS[i])
    remaining = limit - used - cost
    reset = 0
    if remaining < 0 and allowed == 1 then
      allowed, failing, retry_after = 0, i, 1000000
    end
  else
    local emission = period / limit
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end
    local new_tat = tat + math.ceil(cost * emission)
    state[i] = new_tat
    remaining = math.floor((period - (new_tat - now)) / emission)
    reset = new_tat - now
    if new_tat - now > period then
      if allowed == 1 then
        allowed, failing, retry_after = 0, i, new_tat - now - period
      end
      remaining = math.floor((period - (tat - now)) / emission)
      reset = tat - now
    end
  end
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = reset
end
if allowed == 1 then
  for i = 1, n do
    local b = 2 + (i - 1) * 4
    if ARGV[b + 1] == 'b' then
      redis.call('INCRBY', KEYS[i], ARGV[b + 4])
      redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[b + 3]) / 1000) + 86400000)
    elseif ARGV[b + 1] == 'c' then
      redis.call('ZADD', KEYS[i], now + ttl, rid)
      redis.call('PEXPIRE', KEYS[i], math.ceil(ttl / 1000) + 1000)
    else
      redis.call('SET', KEYS[i], string.format('%d', state[i]), 'PX', math.ceil((state[i] - now) / 1000) + 1000)
    end
  end
end
local head = {allowed, failing, retry_after, now}
for _, v in ipairs(out) do head[#head + 1] = v end
return head
