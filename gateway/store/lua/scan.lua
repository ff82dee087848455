-- scan.lua: one bounded step of a substring search through consecutive shards: in each,
-- the ids (from the id index, in its order) whose lower-cased form contains the needle,
-- then the devices whose custom name contains it. Read-only. The caller
-- (gateway.store.listing) hands the state back as the answer's continuation cursor. One
-- server takes every shard in one call; a cluster one shard a call (its keys, one slot).
-- KEYS    per shard, in threes: `<tag>active`, `<tag>blocked`, `<tag>names` (the id index
--         `<tag>ix` derives from the first)
-- ARGV[1] "all", "hide" (not blocked) or "only" (blocked)
-- ARGV[2] the needle, lower-cased (ASCII letters only)
-- ARGV[3] where to start in the first shard: "" its start, "i<entry>" after that entry of
--         its id index
-- ARGV[4] at most this many ids are looked at in this step (a shard's names are taken in
--         one go)
-- Reply: {shards done, state in the next shard, then per match: id, score, its shard (0
--         for the first), the state just after it ("i<entry>" for an id; "" for a name:
--         only the shard's end follows it)}

local mode, needle = ARGV[1], ARGV[2]
local budget = tonumber(ARGV[4])
local reply = {0, ''}
local looked = 0

local function keep(active, blocked, id, shard, after)
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
  reply[#reply + 1] = shard
  reply[#reply + 1] = after
end

local function split(entry)
  local cut = string.find(entry, '\0', 1, true)
  if cut then
    return string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
  end
  return entry, entry
end

for k = 1, #KEYS / 3 do
  local active, blocked, names = KEYS[3 * k - 2], KEYS[3 * k - 1], KEYS[3 * k]
  local state = k == 1 and ARGV[3] or ''
  local dir = string.sub(active, 1, -7) .. 'ix'
  local after = state ~= '' and string.sub(state, 2) or nil
  local head
  if after then
    head = redis.call('ZREVRANGEBYLEX', dir, '[' .. after, '-', 'LIMIT', 0, 1)[1]
  end
  head = head or redis.call('ZRANGEBYLEX', dir, '-', '+', 'LIMIT', 0, 1)[1]
  while head do
    local from = after and ('(' .. after) or '-'
    for _, entry in ipairs(redis.call('ZRANGEBYLEX', dir .. ':' .. head, from, '+')) do
      local low, id = split(entry)
      if string.find(low, needle, 1, true) then
        keep(active, blocked, id, k - 1, 'i' .. entry)
      end
      looked = looked + 1
      if looked >= budget then
        reply[1] = k - 1
        reply[2] = 'i' .. entry
        return reply
      end
    end
    after = nil
    head = redis.call('ZRANGEBYLEX', dir, '(' .. head, '+', 'LIMIT', 0, 1)[1]
  end
  -- Custom names: few (renamed devices only), taken in one go; an id that matched
  -- already is not repeated.
  local cursor = '0'
  repeat
    local got = redis.call('HSCAN', names, cursor, 'COUNT', 1000)
    cursor = got[1]
    local fields = got[2]
    for j = 1, #fields, 2 do
      local id, name = fields[j], fields[j + 1]
      if string.find(string.lower(name), needle, 1, true)
          and not string.find(string.lower(id), needle, 1, true) then
        keep(active, blocked, id, k - 1, '')
      end
    end
  until cursor == '0'
  reply[1] = k
end
return reply
