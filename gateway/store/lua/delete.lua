-- delete.lua: remove a device: record (with its override and bucket), history, index entries.
-- KEYS[1] record, KEYS[2] history, KEYS[3] active zset, KEYS[4] blocked zset,
-- KEYS[5] names hash, KEYS[6] the shard's blocked-index version
-- ARGV[1] device id
-- ARGV[2] pub/sub channel of block events
-- ARGV[3] PUBLISH, or SPUBLISH on a cluster (ARGV[2] is then the shard's own channel)
-- Reply: 1 when a record was removed, 0 when there was none.
-- Record field names are placeholders in double braces, rendered in from gateway.schema
-- when the script is loaded (gateway.store.scripts).

--#include id_index.lua
--#include name_words.lua

local device_id, channel, publish = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('HMGET', KEYS[1], {{FIELD_REQUESTS}}, {{FIELD_NAME}})
if not current[1] then
  return 0
end
nw_apply(KEYS[5], device_id, current[2], 'ZREM')
ix_remove(KEYS[3], device_id)
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], device_id)
if redis.call('ZREM', KEYS[4], device_id) == 1 then
  redis.call('INCR', KEYS[6])
  redis.call(publish, channel, 'u ' .. device_id)
end
redis.call('HDEL', KEYS[5], device_id)
return 1
