-- rename.lua: set or clear a device's custom name. No record -> nil.
-- KEYS[1] record hash, KEYS[2] names hash (the shard's name-search index)
-- ARGV[1] device id
-- ARGV[2] the new name, or "" to clear it
-- Reply: the record as a flat HGETALL list, or nil when there is no record.
-- Record field names are placeholders in double braces, rendered in from gateway.schema
-- when the script is loaded (gateway.store.scripts).

--#include name_words.lua

local record, names, device_id, name = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
-- A record exists once a request or a block made it (an override alone is no record).
local current = redis.call('HMGET', record, {{FIELD_REQUESTS}}, {{FIELD_NAME}})
if not current[1] then
  return nil
end
nw_apply(names, device_id, current[2], 'ZREM')
nw_apply(names, device_id, name, 'ZADD')
if name == '' then
  redis.call('HDEL', record, {{FIELD_NAME}})
  redis.call('HDEL', names, device_id)
else
  redis.call('HSET', record, {{FIELD_NAME}}, name)
  redis.call('HSET', names, device_id, name)
end
return redis.call('HGETALL', record)
