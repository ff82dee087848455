-- unblock.lua: unblock a device. Idempotent; no record -> nil.
-- KEYS[1] record hash, KEYS[2] blocked zset
-- ARGV[1] device id
-- Reply: the record as a flat HGETALL list, or nil when there is no record.

local record, blocked, device_id = KEYS[1], KEYS[2], ARGV[1]
-- A record exists once a request or a block made it (an override alone is no record).
if redis.call('HEXISTS', record, 'rc') == 0 then
  return nil
end
redis.call('HDEL', record, 'b')
redis.call('ZREM', blocked, device_id)
return redis.call('HGETALL', record)
