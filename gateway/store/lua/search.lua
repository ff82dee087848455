-- search.lua: devices whose id, or a word of whose custom name, starts with a prefix, from
-- the shards' indexes (lua/id_index.lua, lua/name_words.lua); most recent activity first,
-- after an optional cursor, with their records. Read-only; one call per node, like list.lua.
-- KEYS     per shard, in threes: `<tag>active`, `<tag>blocked`, `<tag>names` (the id index
--          `<tag>ix` and the words `<tag>nw` derive from them)
-- ARGV[1]  "all", "hide" (not blocked) or "only" (blocked)
-- ARGV[2]  the prefix, lower-cased (ASCII letters only, as the indexes are)
-- ARGV[3]  at most this many ids a shard are looked at (the search is bounded)
-- ARGV[4]  limit: how many entries to answer
-- ARGV[5]  the cursor's last activity (ms), or "" for the first page
-- ARGV[6]  the cursor's id (entries strictly after it, as in list.lua)
-- ARGV[7]  "1": each entry with its record; "0": ids and scores only
-- Reply: {matches, truncated (1 when a shard had more ids than ARGV[3] under the prefix),
--         id, score, record, ...}

--#include list_order.lua

local n = #KEYS / 3
local mode, prefix, cap, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local has_after = ARGV[5] ~= ''
local after_score, after_id = tonumber(ARGV[5]), ARGV[6]
local with_records = ARGV[7] == '1'
local low, high = '[' .. prefix, '(' .. prefix .. '\255'

local function id_of(entry)
  local cut = string.find(entry, '\0', 1, true)
  return cut and string.sub(entry, cut + 1) or entry
end

local matches, truncated = {}, 0
for i = 1, n do
  local active, blocked, names = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local found, count = {}, 0
  local function take(id)
    if found[id] then
      return true
    end
    if count >= cap then
      truncated = 1
      return false
    end
    found[id] = true
    count = count + 1
    local score = redis.call('ZSCORE', active, id)
    if not score then
      return true
    end
    local is_blocked = mode ~= 'all' and redis.call('ZSCORE', blocked, id)
    if mode == 'all' or (mode == 'only') == (is_blocked ~= false) then
      matches[#matches + 1] = {tonumber(score), id, i}
    end
    return true
  end
  -- Ids: from the chunk the prefix falls in, on through the chunks that can hold it.
  local dir = string.sub(active, 1, -7) .. 'ix'
  local head = redis.call('ZREVRANGEBYLEX', dir, low, '-', 'LIMIT', 0, 1)[1]
      or redis.call('ZRANGEBYLEX', dir, '-', '+', 'LIMIT', 0, 1)[1]
  local going = true
  while head and going do
    for _, entry in ipairs(redis.call('ZRANGEBYLEX', dir .. ':' .. head, low, high)) do
      going = take(id_of(entry))
      if not going then
        break
      end
    end
    head = redis.call('ZRANGEBYLEX', dir, '(' .. head, high, 'LIMIT', 0, 1)[1]
  end
  -- Words of custom names.
  if going then
    local words = string.sub(names, 1, -6) .. 'nw'
    for _, entry in ipairs(redis.call('ZRANGEBYLEX', words, low, high)) do
      if not take(id_of(entry)) then
        break
      end
    end
  end
end

local count = #matches
if has_after then  -- the matches after the cursor
  local kept = {}
  for _, m in ipairs(matches) do
    if m[1] < after_score or (m[1] == after_score and m[2] < after_id) then
      kept[#kept + 1] = m
    end
  end
  matches = kept
end
matches = first_k(matches, limit)

local reply = {count, truncated}
for _, m in ipairs(matches) do
  reply[#reply + 1] = m[2]
  reply[#reply + 1] = string.format('%d', m[1])
  if with_records then
    local active = KEYS[3 * m[3] - 2]
    reply[#reply + 1] = redis.call('HGETALL', string.sub(active, 1, -7) .. 'dev:' .. m[2])
  else
    reply[#reply + 1] = false
  end
end
return reply
