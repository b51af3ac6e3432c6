-- Write one ledger record and its aggregates in one atomic, idempotent step.
--
-- KEYS[1]  gw:{ledger}:rid:<request id>   marker: the record was written (expires after ARGV[1] s)
-- KEYS[2]  gw:{ledger}:records            stream of every record
-- KEYS[3]  gw:{ledger}:agg:<day>          hash: "<group>|requests|input|output|cached" counters of the day
-- KEYS[4]  gw:{ledger}:days               set of days that have aggregates
-- KEYS[5]  gw:{ledger}:tasks:<day>        hash: the same counters by task (and role), with token histograms
-- ARGV[1]  marker time-to-live, seconds
-- ARGV[2]  the aggregate group (tenant|tier|route|model|price_in|price_out[|price_cached], escaped by the caller)
-- ARGV[3]  prompt tokens, ARGV[4] completion tokens, ARGV[5] cached prompt tokens (of ARGV[3]), ARGV[6] day
-- ARGV[7]  the task group (tenant|task|tier|route|model|prices|role), ARGV[8] input bin, ARGV[9] output bin
-- ARGV[10] 1 if a shadow call's answer was compared, ARGV[11] 1 if it agreed
-- ARGV[12..] the record as field, value pairs
-- Returns 1 if written, 0 if this request id was already recorded (a retried write, a replay).
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
local fields = {}
for i = 12, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|requests', 1)
redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|input', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|output', tonumber(ARGV[4]))
if tonumber(ARGV[5]) > 0 then
  redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|cached', tonumber(ARGV[5]))
end
redis.call('SADD', KEYS[4], ARGV[6])
local t = ARGV[7]
redis.call('HINCRBY', KEYS[5], t .. '|requests', 1)
redis.call('HINCRBY', KEYS[5], t .. '|input', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[5], t .. '|output', tonumber(ARGV[4]))
if tonumber(ARGV[5]) > 0 then
  redis.call('HINCRBY', KEYS[5], t .. '|cached', tonumber(ARGV[5]))
end
redis.call('HINCRBY', KEYS[5], t .. '|i' .. ARGV[8], 1)
redis.call('HINCRBY', KEYS[5], t .. '|o' .. ARGV[9], 1)
if ARGV[10] == '1' then
  redis.call('HINCRBY', KEYS[5], t .. '|compared', 1)
  redis.call('HINCRBY', KEYS[5], t .. '|agree', tonumber(ARGV[11]))
end
return 1
