-- scan.lua: one bounded step of a substring search through one shard: the ids (from the
-- id index, in its order) whose lower-cased form contains the needle, then the devices
-- whose custom name contains it. Read-only. The caller (gateway.store.listing) steps
-- through the shards and hands the state back as the answer's continuation cursor.
-- KEYS[1] `<tag>active`, KEYS[2] `<tag>blocked`, KEYS[3] `<tag>names` (the id index
--         `<tag>ix` derives from KEYS[1])
-- ARGV[1] "all", "hide" (not blocked) or "only" (blocked)
-- ARGV[2] the needle, lower-cased (ASCII letters only)
-- ARGV[3] where to start: "" the shard's start, "i<entry>" after that entry of the id
--         index
-- ARGV[4] at most this many ids are looked at in this step
-- ARGV[5] the step ends once it has this many matches (the names are taken in one go)
-- Reply: {state to go on from ("" when the shard is done), id, score, id, score, ...}

local active, blocked, names = KEYS[1], KEYS[2], KEYS[3]
local mode, needle, state = ARGV[1], ARGV[2], ARGV[3]
local budget, wanted = tonumber(ARGV[4]), tonumber(ARGV[5])
local reply = {''}

local function keep(id)
  local score = redis.call('ZSCORE', active, id)
  if not score then
    return
  end
  if mode ~= 'all' then
    local is_blocked = redis.call('ZSCORE', blocked, id) ~= false
    if (mode == 'only') ~= is_blocked then
      return
    end
  end
  reply[#reply + 1] = id
  reply[#reply + 1] = score
end

local function split(entry)
  local cut = string.find(entry, '\0', 1, true)
  if cut then
    return string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
  end
  return entry, entry
end

do
  local dir = string.sub(active, 1, -7) .. 'ix'
  local after = state ~= '' and string.sub(state, 2) or nil
  local head
  if after then
    head = redis.call('ZREVRANGEBYLEX', dir, '[' .. after, '-', 'LIMIT', 0, 1)[1]
  end
  head = head or redis.call('ZRANGEBYLEX', dir, '-', '+', 'LIMIT', 0, 1)[1]
  local looked = 0
  while head do
    local from = after and ('(' .. after) or '-'
    for _, entry in ipairs(redis.call('ZRANGEBYLEX', dir .. ':' .. head, from, '+')) do
      local low, id = split(entry)
      if string.find(low, needle, 1, true) then
        keep(id)
      end
      looked = looked + 1
      if looked >= budget or (#reply - 1) / 2 >= wanted then
        reply[1] = 'i' .. entry
        return reply
      end
    end
    after = nil
    head = redis.call('ZRANGEBYLEX', dir, '(' .. head, '+', 'LIMIT', 0, 1)[1]
  end
end

-- Custom names: few (renamed devices only), taken in one go; an id that matched already
-- is not repeated.
local cursor = '0'
repeat
  local got = redis.call('HSCAN', names, cursor, 'COUNT', 1000)
  cursor = got[1]
  local pairs_ = got[2]
  for j = 1, #pairs_, 2 do
    local id, name = pairs_[j], pairs_[j + 1]
    if string.find(string.lower(name), needle, 1, true)
        and not string.find(string.lower(id), needle, 1, true) then
      keep(id)
    end
  end
until cursor == '0'
return reply
