-- Store a new policy version and make it active, atomically, and tell every replica.
--
-- KEYS[1]  gw:{policy}:seq       version counter (the four keys share the {policy} hash tag: one Cluster slot)
-- KEYS[2]  gw:{policy}:versions  hash: version number -> JSON record (yaml, sha256, author, time, message, ...)
-- KEYS[3]  gw:{policy}:active    the active version number
-- KEYS[4]  gw:{policy}:audit     stream of changes
-- ARGV[1]  the JSON record, without its version (added here as "version")
-- ARGV[2]  the audit entry's diff text
-- ARGV[3]  author, ARGV[4] message, ARGV[5] time (unix seconds, from the caller's record)
-- ARGV[6]  pub/sub channel to announce the new version on
-- Returns {new version, previous version or 0}
local previous = tonumber(redis.call('GET', KEYS[3]) or '0')
local version = redis.call('INCR', KEYS[1])
local record = cjson.decode(ARGV[1])
record['version'] = version
record['previous'] = previous
redis.call('HSET', KEYS[2], tostring(version), cjson.encode(record))
redis.call('SET', KEYS[3], tostring(version))
redis.call('XADD', KEYS[4], '*', 'version', tostring(version), 'previous', tostring(previous),
  'author', ARGV[3], 'message', ARGV[4], 'time', ARGV[5], 'diff', ARGV[2])
redis.call('PUBLISH', ARGV[6], tostring(version))
return {version, previous}
