-- Trim records that Postgres has acknowledged from the ledger stream, and take their tokens out of
-- the per-day aggregates, in one atomic step that runs at most once per range of stream ids.
--
-- KEYS[1]  gw:{ledger}:records    the stream
-- KEYS[2]  gw:{ledger}:archived   the last stream id trimmed ("0-0" when absent)
-- KEYS[3]  gw:{ledger}:days       set of days that have aggregates
-- KEYS[4..] gw:{ledger}:agg:<day> the aggregates of the days the trimmed records belong to
-- ARGV[1]  the last trimmed id the caller read; anything else means this range was trimmed already
-- ARGV[2]  the new last trimmed id (the last record of the range)
-- ARGV[3]  the id just after it (XTRIM MINID removes every entry below)
-- ARGV[4..] per aggregate group, 7 values: KEYS index of its day's hash, day, group, requests,
--          input tokens, output tokens, cached tokens to subtract
-- Returns 1 if trimmed, 0 if the range had been trimmed before (a retry after a lost reply).
local done = redis.call('GET', KEYS[2]) or '0-0'
if done ~= ARGV[1] then
  return 0
end
-- "0 - x", never "-x": Lua's -0 reaches Redis as "-0", which HINCRBY refuses (a group whose output
-- tokens sum to 0 — embeddings, say — made the whole trim fail).
for i = 4, #ARGV, 7 do
  local key, day, group = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
  local left = math.abs(redis.call('HINCRBY', key, group .. '|requests', 0 - tonumber(ARGV[i + 3])))
  left = left + math.abs(redis.call('HINCRBY', key, group .. '|input', 0 - tonumber(ARGV[i + 4])))
  left = left + math.abs(redis.call('HINCRBY', key, group .. '|output', 0 - tonumber(ARGV[i + 5])))
  if tonumber(ARGV[i + 6]) > 0 or redis.call('HEXISTS', key, group .. '|cached') == 1 then
    left = left + math.abs(redis.call('HINCRBY', key, group .. '|cached', 0 - tonumber(ARGV[i + 6])))
  end
  if left == 0 then  -- every counter of the group is 0: nothing of it is left in Redis
    redis.call('HDEL', key, group .. '|requests', group .. '|input', group .. '|output', group .. '|cached')
    if redis.call('EXISTS', key) == 0 then
      redis.call('SREM', KEYS[3], day)
    end
  end
end
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2])
return 1
