-- enforce_core.lua: the one decision per request, as a function `enforce(KEYS, ARGV, now_us)`
-- that enforce.lua (one request a call) and enforce_batch.lua (every request of one event-loop
-- tick in one call) run. Block check, token bucket, device upsert,
-- change history and index updates, atomically, in as few Redis commands as possible
-- (a known device that declares what it declared before costs TIME, HMGET and HSET; the
-- index only moves once a second).
--
-- Three modes, told apart by the number of KEYS:
--   device (4 KEYS): KEYS[1] record hash (its field `tb` holds the device's bucket),
--                    KEYS[2] history list, KEYS[3] active zset, KEYS[4] blocked zset
--   device with a registration budget (5 KEYS): the same, and KEYS[5] the budget (a
--                    bucket string) of the client address: a new device is charged to it
--                    in this same call. Its key is under the address's hash tag, so this
--                    mode runs where every key lives on one node (one server, Sentinel);
--                    a cluster uses ARGV[8] = "1" instead (gateway.store.enforce_script)
--   anonymous (1 KEY): KEYS[1] bucket string of the client address
-- ARGV[1]  now in microseconds since the epoch, or "" to read Redis TIME (production)
-- ARGV[2]  default rate, milli-tokens per second (integer >= 1)
-- ARGV[3]  default burst, whole tokens (integer >= 1)
-- ARGV[4]  "1" when the method counts as a data upload, else "0"   (device mode)
-- ARGV[5]  history cap, entries (integer >= 0)                       (device mode)
-- ARGV[6]  device id                                                 (device mode)
-- ARGV[7]  the declared application, application_version, os, os_version, manufacturer
--          and model, joined by "\31" (a control character, never in a valid value); an
--          empty one was not declared (the stored value is kept). The record keeps the six
--          stored values, joined the same way, in `df` only (their one copy: no field of
--          their own): while a device declares what is stored, one string compare.
-- ARGV[8]  "1": a new device must first be approved by its address's registration budget
--          (answer 3 and write nothing); "0": register it (approved, or no budget)
--          (4 KEYS); with 5 KEYS, the budget's rate (milli-tokens per second)
-- ARGV[9]  with 5 KEYS: the budget's burst (whole tokens)
--
-- Reply: {outcome, remaining, retry_after_us, full_after_us, rate, burst, new_device}
--   outcome 0 allowed, 1 blocked (no token taken), 2 rate-limited,
--   3 new device awaiting the registration budget (nothing written)
--   remaining whole tokens left; retry_after_us until the next whole token (0 when full);
--   full_after_us until the bucket is full; rate/burst of the bucket that applied (the
--   record's override `rr`/`rb` when set); new_device 1 when this call created the record,
--   2 when the registration budget refused a new device (outcome 2, the budget's numbers,
--   nothing written for the device).
--
-- A bucket is "<milli-tokens>:<timestamp us>": a device's in its record (field `tb`, read
-- and written by the HMGET and HSET the upsert makes anyway: no command of its own), an
-- address's in a string key written with an expiry at the moment it would be full again.
-- A missing bucket is a full one. Tokens are integer milli-tokens (Redis truncates Lua
-- floats in replies); a request costs 1000. The bucket's timestamp never moves backwards.
-- Record field names are placeholders in double braces, rendered in from gateway.schema
-- when the script is loaded (gateway.store.scripts).

--#include id_index.lua

local COST = 1000
local MICROS = 1000000
local INDEX_STEP_MS = 1000  -- the activity index moves when last_active enters another one

-- The clock of a call: ARGV[1] in microseconds, or "" for Redis TIME (read once by the caller
-- and passed as `time_us`: a batch reads it once for all its requests).
local function clock(arg, time_us)
  if arg ~= '' then
    return tonumber(arg)
  end
  if time_us then
    return time_us
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * MICROS + tonumber(t[2])
end

local function int(x)
  return string.format('%d', x)
end

-- The parts of a "\31"-joined string, an empty one as false.
local function split(joined)
  local parts, i = {}, 0
  for part in string.gmatch(joined .. '\31', '([^\31]*)\31') do
    i = i + 1
    parts[i] = part ~= '' and part
  end
  return parts
end

-- Refill `state` (a bucket string, or false for a full bucket), then try to take one
-- token. Returns the reply's bucket part and the new state (nil when no token was taken).
local function take(state, rate, burst, now_us)
  local cap = burst * COST
  local tokens, ts = cap, now_us
  if state then
    local t, s = string.match(state, '^(%d+):(%d+)$')
    tokens = math.min(tonumber(t), cap)
    ts = tonumber(s)
    local elapsed = now_us - ts
    if elapsed > 0 then
      if elapsed * rate >= (cap - tokens) * MICROS then
        tokens, ts = cap, now_us
      else
        local gained = math.floor(elapsed * rate / MICROS)
        tokens = tokens + gained
        -- Advance only by the time that produced whole milli-tokens: keeps the fraction.
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

-- The declared fields' keys: history entries name a field by them (and a record of an
-- older devicegate has them as fields of their own).
local FIELDS = { {{DEVICE_FIELD_KEYS}} }

-- Numbers the calls of a batch repeat (the default rate and burst, an override's, the history
-- cap), each converted once: tonumber costs as much as a hash read.
local numbers = {}
local function num(text)
  local n = numbers[text]
  if not n then
    n = tonumber(text)
    numbers[text] = n
  end
  return n
end

-- One request's decision and upsert (the modes, KEYS, ARGV and reply above); `now_us` is
-- its clock (`clock`).
local function enforce(KEYS, ARGV, now_us)
  local rate = num(ARGV[2])
  local burst = num(ARGV[3])
  if #KEYS == 1 then
    local reply, new_state = take(redis.call('GET', KEYS[1]), rate, burst, now_us)
    if new_state then
      redis.call('SET', KEYS[1], new_state, 'PX', int(math.floor(reply[4] / 1000) + 1))
    end
    reply[7] = 0
    return reply
  end

  local record, history, active, blocked_idx = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local upload = ARGV[4] == '1'
  local device_id = ARGV[6]
  local now_ms = math.floor(now_us / 1000)

  -- The denied count is not read: a denial adds to it (HINCRBY), an allowed request leaves it.
  local current = redis.call('HMGET', record, {{FIELD_REQUESTS}}, {{FIELD_BLOCKED_AT}},
    {{FIELD_LAST_ACTIVE}}, {{FIELD_OVERRIDE_RATE}}, {{FIELD_OVERRIDE_BURST}}, {{FIELD_BUCKET}},
    {{FIELD_DECLARED}})
  local requests = tonumber(current[1] or '0')
  local is_new = not current[1]
  local is_blocked = current[2] ~= false
  local last = tonumber(current[3] or '0')
  if is_new and #KEYS == 5 then
    -- Charge the address's budget first: a refused device leaves no trace but the budget.
    local device_rate, device_burst = rate, burst
    rate, burst = num(ARGV[8]), num(ARGV[9])
    local budget, budget_state = take(redis.call('GET', KEYS[5]), rate, burst, now_us)
    if not budget_state then
      budget[7] = 2
      return budget
    end
    redis.call('SET', KEYS[5], budget_state, 'PX', int(math.floor(budget[4] / 1000) + 1))
    rate, burst = device_rate, device_burst
  elseif is_new and ARGV[8] == '1' then
    return {3, 0, 0, 0, rate, burst, 1}
  end

  local reply, new_state
  if is_blocked then
    reply = {1, 0, 0, 0, rate, burst}
  else
    if current[4] then
      rate = num(current[4])
      burst = num(current[5])
    end
    reply, new_state = take(current[6], rate, burst, now_us)
  end
  reply[7] = is_new and 1 or 0

  -- Upsert: timestamps come from this one clock; last_active never moves backwards.
  local stamp = math.max(now_ms, last)
  local at = int(stamp)
  local updates = {
    {{FIELD_REQUESTS}}, int(requests + 1),
    {{FIELD_LAST_ACTIVE}}, at,
  }
  if upload then
    updates[#updates + 1] = {{FIELD_LAST_UPLOAD}}
    updates[#updates + 1] = at
  end
  if is_new then
    updates[#updates + 1] = {{FIELD_FIRST_SEEN}}
    updates[#updates + 1] = at
  end
  if new_state then
    updates[#updates + 1] = {{FIELD_BUCKET}}
    updates[#updates + 1] = new_state
  end
  -- The declared fields differ from `df` (or this is the first call): merge them into it.
  -- `df` is the one copy of the six values: a device that keeps declaring the same (all six)
  -- costs this one string compare; one that leaves some out, a split and no write.
  local declared_all = ARGV[7]
  if declared_all ~= current[7] then
    local declared = split(declared_all)
    local stored = current[7] and split(current[7]) or {}
    -- A record of an older devicegate kept each value in its own field too, and `df` then held
    -- the declaration as sent (an empty part there may hide a stored value), or no `df` at all:
    -- read those fields once where `df` has no value to compare with (a newer record: never).
    if not is_new then
      local gap = not current[7]
      for i = 1, #FIELDS do
        gap = gap or (declared[i] and not stored[i])
      end
      if gap then
        local legacy = redis.call('HMGET', record, {{DEVICE_FIELD_KEYS}})
        for i = 1, #FIELDS do
          stored[i] = stored[i] or legacy[i]
        end
      end
    end
    local history_cap = num(ARGV[5])
    local merged = {}
    for i = 1, #FIELDS do
      local new, old = declared[i], stored[i]
      if new and new ~= old then
        merged[i] = new
        -- A first value is information, not a change: only a differing stored one is history.
        if old and history_cap > 0 then
          redis.call('LPUSH', history, table.concat({at, FIELDS[i], old, new}, '\31'))
          redis.call('LTRIM', history, 0, history_cap - 1)
        end
      else
        merged[i] = old or ''  -- not declared: the stored value stays
      end
    end
    local merged_all = table.concat(merged, '\31')
    if merged_all ~= current[7] then
      updates[#updates + 1] = {{FIELD_DECLARED}}
      updates[#updates + 1] = merged_all
    end
  end
  redis.call('HSET', record, unpack(updates))
  if reply[1] ~= 0 then
    redis.call('HINCRBY', record, {{FIELD_DENIED}}, 1)
  end
  -- The list is ordered by last activity to the second: the index moves when last_active
  -- enters another second (so at most once a second however often the device calls), not
  -- in between.
  if is_new or math.floor(stamp / INDEX_STEP_MS) ~= math.floor(last / INDEX_STEP_MS) then
    redis.call('ZADD', active, stamp, device_id)
    if is_new then
      ix_add(active, device_id)
    end
    if is_blocked then
      redis.call('ZADD', blocked_idx, stamp, device_id)
    end
  end
  return reply
end
