-- unblock.lua: unblock a device. Idempotent; no record -> nil.
-- KEYS[1] record hash, KEYS[2] blocked zset, KEYS[3] the shard's blocked-index version
-- ARGV[1] device id
-- ARGV[2] pub/sub channel of block events
-- ARGV[3] PUBLISH, or SPUBLISH on a cluster (ARGV[2] is then the shard's own channel)
-- Reply: the record as a flat HGETALL list, or nil when there is no record.
-- Record field names are placeholders in double braces, rendered in from gateway.schema
-- when the script is loaded (gateway.store.scripts).

local record, blocked, version = KEYS[1], KEYS[2], KEYS[3]
local device_id, channel, publish = ARGV[1], ARGV[2], ARGV[3]
-- A record exists once a request or a block made it (an override alone is no record).
if redis.call('HEXISTS', record, {{FIELD_REQUESTS}}) == 0 then
  return nil
end
if redis.call('HDEL', record, {{FIELD_BLOCKED_AT}}) == 1 then
  redis.call('ZREM', blocked, device_id)
  redis.call('INCR', version)
  redis.call(publish, channel, 'u ' .. device_id)
end
return redis.call('HGETALL', record)
