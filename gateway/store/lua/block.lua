-- block.lua: block a device; creates the record for an id never seen (a pre-block).
-- Idempotent: blocking a blocked device keeps its first blocked_at.
-- KEYS[1] record hash, KEYS[2] active zset, KEYS[3] blocked zset,
-- KEYS[4] the shard's blocked-index version (string counter)
-- ARGV[1] now in microseconds since the epoch, or "" to read Redis TIME
-- ARGV[2] device id
-- ARGV[3] pub/sub channel of block events
-- ARGV[4] PUBLISH, or SPUBLISH on a cluster (ARGV[3] is then the shard's own channel)
-- Reply: the record as a flat HGETALL list.
-- Every process keeps a copy of the blocked ids for when Redis cannot answer: a change
-- bumps the shard's version (their poll) and is published (their immediate update).
-- Record field names are placeholders in double braces, rendered in from gateway.schema
-- when the script is loaded (gateway.store.scripts).

--#include id_index.lua

local now_us
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now_us = tonumber(ARGV[1])
end
local now_ms = string.format('%d', math.floor(now_us / 1000))
local record, active, blocked, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local device_id, channel, publish = ARGV[2], ARGV[3], ARGV[4]

local current = redis.call('HMGET', record,
  {{FIELD_REQUESTS}}, {{FIELD_BLOCKED_AT}}, {{FIELD_LAST_ACTIVE}})
if not current[1] then
  redis.call('HSET', record, {{FIELD_REQUESTS}}, 0, {{FIELD_DENIED}}, 0)
  ix_add(active, device_id)
end
if not current[2] then
  redis.call('HSET', record, {{FIELD_BLOCKED_AT}}, now_ms)
  -- Last activity is the last request, or the time it was blocked for a device never seen.
  local score = current[3] or now_ms
  redis.call('ZADD', active, score, device_id)
  redis.call('ZADD', blocked, score, device_id)
  redis.call('INCR', version)
  redis.call(publish, channel, 'b ' .. device_id)
end
return redis.call('HGETALL', record)
