-- enforce_peer.lua: the openresty peer's one Redis call per request (bench/peer_lua/access.lua
-- runs it with EVALSHA). It does for a known device what devicegate's enforce.lua
-- (gateway/store/lua/enforce.lua) does: the block check, the token bucket and the activity
-- upsert, with the same commands: TIME, HMGET of the record, HSET of the updated fields, and
-- ZADD to the activity index when last_active moved a second. The bucket arithmetic is
-- enforce.lua's `take`, line for line; the record's field names are devicegate's.
--
-- Left out (none of it happens for a known device that declares what it declared before,
-- the benchmark's steady state): the per-address registration budget, the change history
-- and the id index of a new device, the blocked index, rate overrides written by an admin
-- API (read and honoured if present, never written). A changed declaration replaces `df`
-- whole instead of being merged field by field.
--
-- device (2 KEYS): KEYS[1] record hash (its field `tb` holds the bucket), KEYS[2] active zset
--   ARGV[1] rate, milli-tokens per second; ARGV[2] burst, whole tokens; ARGV[3] device id;
--   ARGV[4] the six declared values joined by "\31"; ARGV[5] "1" for a data upload
-- anonymous (1 KEY): KEYS[1] the client address's bucket string; ARGV[1], ARGV[2] as above
-- Reply: {outcome, remaining, retry_after_us, full_after_us, rate, burst}
--   outcome 0 allowed, 1 blocked, 2 rate-limited

local COST = 1000
local MICROS = 1000000
local INDEX_STEP_MS = 1000

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * MICROS + tonumber(t[2])
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])

local function int(x)
  return string.format('%d', x)
end

local function take(state)
  local cap = burst * COST
  local tokens, ts = cap, now_us
  if state then
    local tk, s = string.match(state, '^(%d+):(%d+)$')
    tokens = math.min(tonumber(tk), cap)
    ts = tonumber(s)
    local elapsed = now_us - ts
    if elapsed > 0 then
      if elapsed * rate >= (cap - tokens) * MICROS then
        tokens, ts = cap, now_us
      else
        local gained = math.floor(elapsed * rate / MICROS)
        tokens = tokens + gained
        ts = ts + math.floor(gained * MICROS / rate)
      end
    end
  end
  local carried = math.max(now_us - ts, 0)
  local allowed = tokens >= COST
  if allowed then
    tokens = tokens - COST
  end
  local full_after = math.max(math.ceil((cap - tokens) * MICROS / rate) - carried, 0)
  local retry_after = 0
  if tokens < cap then
    local need = COST - tokens % COST
    retry_after = math.max(math.ceil(need * MICROS / rate) - carried, 1)
  end
  local outcome, new_state = 2, nil
  if allowed then
    outcome, new_state = 0, int(tokens) .. ':' .. int(ts)
  end
  return {outcome, math.floor(tokens / COST), retry_after, full_after, rate, burst}, new_state
end

if #KEYS == 1 then
  local reply, new_state = take(redis.call('GET', KEYS[1]))
  if new_state then
    redis.call('SET', KEYS[1], new_state, 'PX', int(math.floor(reply[4] / 1000) + 1))
  end
  return reply
end

local record, active = KEYS[1], KEYS[2]
local now_ms = math.floor(now_us / 1000)
-- devicegate's record fields: rc requests, dc denied, b blocked_at, la last_active,
-- rr/rb rate override, tb bucket, df the declared fields; fs first_seen, lu last_upload.
local current = redis.call('HMGET', record, 'rc', 'dc', 'b', 'la', 'rr', 'rb', 'tb', 'df')
local is_new = not current[1]
local last = tonumber(current[4] or '0')
local denied = tonumber(current[2] or '0')

local reply, new_state
if current[3] then
  reply = {1, 0, 0, 0, rate, burst}
else
  if current[5] then
    rate, burst = tonumber(current[5]), tonumber(current[6])
  end
  reply, new_state = take(current[7])
end
if reply[1] ~= 0 then
  denied = denied + 1
end

local stamp = math.max(now_ms, last)
local updates = {'rc', int(tonumber(current[1] or '0') + 1), 'dc', int(denied), 'la', int(stamp)}
if ARGV[5] == '1' then
  updates[#updates + 1] = 'lu'
  updates[#updates + 1] = int(stamp)
end
if is_new then
  updates[#updates + 1] = 'fs'
  updates[#updates + 1] = int(stamp)
end
if new_state then
  updates[#updates + 1] = 'tb'
  updates[#updates + 1] = new_state
end
if ARGV[4] ~= current[8] then
  updates[#updates + 1] = 'df'
  updates[#updates + 1] = ARGV[4]
end
redis.call('HSET', record, unpack(updates))
if is_new or math.floor(stamp / INDEX_STEP_MS) ~= math.floor(last / INDEX_STEP_MS) then
  redis.call('ZADD', active, stamp, ARGV[3])
end
return reply
