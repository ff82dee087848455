-- list.lua: the first `limit` devices of some shards, most recent activity first, after an
-- optional cursor; with their records, so that one call per node makes a page. Read-only.
-- One server runs it once over all the shards; a cluster once per primary, over the shards
-- that node holds (loaded there with the allow-cross-slot-keys flag: gateway.store.listing).
-- KEYS     per shard, in pairs: its activity index `<tag>active`, its blocked index
--          `<tag>blocked` (records are `<tag>dev:<id>`, under the same tag)
-- ARGV[1]  "all", "hide" (not blocked) or "only" (blocked)
-- ARGV[2]  limit: how many entries (integer >= 1)
-- ARGV[3]  the cursor's last activity (ms), or "" for the start of the list
-- ARGV[4]  the cursor's id: the entries come strictly after (ARGV[3], ARGV[4]) in the
--          list's order (last activity descending, then id descending)
-- ARGV[5]  "1": each entry with its record (HGETALL); "0": ids and scores only
-- ARGV[6]  "1": count the devices that match the filter (ZCARD per shard); "0": skip
-- Reply: {total (or -1 when not counted), id, score, record, id, score, record, ...}
--
-- A lazy k-way merge: each shard is read in small steps from its top (or from the
-- cursor's score down), and a shard is read further only while its last entry read
-- comes before the limit-th candidate, so a page reads about `limit` entries plus a few a
-- shard, whatever its depth in the list.

local n = #KEYS / 2
local mode, limit = ARGV[1], tonumber(ARGV[2])
local has_after = ARGV[3] ~= ''
local after_score, after_id = tonumber(ARGV[3]), ARGV[4]
local with_records, counted = ARGV[5] == '1', ARGV[6] == '1'

local total = -1
if counted then
  total = 0
  for i = 1, n do
    if mode == 'only' then
      total = total + redis.call('ZCARD', KEYS[2 * i])
    else
      total = total + redis.call('ZCARD', KEYS[2 * i - 1])
      if mode == 'hide' then
        total = total - redis.call('ZCARD', KEYS[2 * i])
      end
    end
  end
end

--#include list_order.lua

local top = has_after and ARGV[3] or '+inf'
local step = math.floor(2 * limit / n) + 2
local source, offset, size, done, last = {}, {}, {}, {}, {}
local candidates = {}

local function read(i)
  local got = redis.call('ZREVRANGEBYSCORE', source[i], top, '-inf', 'WITHSCORES',
    'LIMIT', offset[i], size[i])
  local count = #got / 2
  offset[i] = offset[i] + count
  done[i] = count < size[i]
  size[i] = size[i] * 2
  for j = 1, count do
    local id, score = got[2 * j - 1], tonumber(got[2 * j])
    last[i] = {score, id}
    if not has_after or score < after_score or id < after_id then
      if mode ~= 'hide' or not redis.call('ZSCORE', KEYS[2 * i], id) then
        candidates[#candidates + 1] = {score, id, i}
      end
    end
  end
end

for i = 1, n do
  source[i] = mode == 'only' and KEYS[2 * i] or KEYS[2 * i - 1]
  offset[i], size[i], done[i] = 0, step, false
  read(i)
end
while true do
  -- Only the first `limit` can make the page: more reads only push the others further.
  candidates = first_k(candidates, limit)
  local kth = candidates[limit]
  local again = false
  for i = 1, n do
    -- Entries not yet read from shard i come after its last one read: read on while that
    -- one comes before the limit-th candidate.
    if not done[i] and (not kth or before(last[i], kth)) then
      read(i)
      again = true
    end
  end
  if not again then
    break
  end
end

local reply = {total}
for j = 1, math.min(limit, #candidates) do
  local c = candidates[j]
  reply[#reply + 1] = c[2]
  reply[#reply + 1] = string.format('%d', c[1])
  if with_records then
    local active = KEYS[2 * c[3] - 1]
    reply[#reply + 1] = redis.call('HGETALL', string.sub(active, 1, -7) .. 'dev:' .. c[2])
  else
    reply[#reply + 1] = false
  end
end
return reply
