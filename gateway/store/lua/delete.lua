-- delete.lua: remove a device: record, history, bucket, override and its index entries.
-- KEYS[1] record, KEYS[2] history, KEYS[3] bucket, KEYS[4] override,
-- KEYS[5] active zset, KEYS[6] blocked zset, KEYS[7] names hash
-- ARGV[1] device id
-- Reply: 1 when a record was removed, 0 when there was none.

local device_id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], device_id)
redis.call('ZREM', KEYS[6], device_id)
redis.call('HDEL', KEYS[7], device_id)
return 1
