-- Renewal: extend the concurrency slots of requests still in flight by one TTL, so that a slot's
-- lifetime is tied to its request: renewed while the request runs, gone within one TTL of the
-- gateway that held it dying. A slot that expired while its request still runs (Redis stalled or
-- restarted for longer than the TTL) is added back: the request still counts against the limit.
-- The gateway never renews a released slot: a request leaves the renewal set when it ends, and its
-- release is sent after any renewal that named it, on the same connection.
--
-- KEYS[i]       a concurrency key ('c' item) admit.lua reserved
-- ARGV[1]       slot time-to-live, microseconds
-- ARGV[i + 1]   the reservation id holding a slot in KEYS[i]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
local renewed = 0
for i = 1, #KEYS do
  renewed = renewed + redis.call('ZADD', KEYS[i], 'CH', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(ttl / 1000) + 1000)
end
return renewed
