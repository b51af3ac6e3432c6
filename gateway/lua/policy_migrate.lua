-- Rename the policy store's keys from before its hash tag (gw:policy:* -> gw:{policy}:*), once,
-- atomically: replicas starting together cannot both move them. Only ever run on one Redis (the old
-- names could never have been written in a cluster: their script call spanned slots).
--
-- KEYS[1..4]  the old names: seq, versions, active, audit
-- KEYS[5..8]  the new names, in the same order
-- Returns 1 if the keys were moved, 0 if there was nothing to move.
if redis.call('EXISTS', KEYS[7]) == 1 or redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
for i = 1, 4 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 4])
  end
end
return 1
