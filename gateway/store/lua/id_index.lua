-- id_index.lua: included by the scripts that create or remove a device (`--#include`).
-- The shard's index of device ids in case-insensitive order, for the search by the start
-- of an id. It is kept in chunks of at most IX_CHUNK entries, so that each chunk stays in
-- Redis's compact encoding (a listpack sorted set holds up to 128): about 20 bytes a
-- device where one sorted set of every id would cost about 100.
--   <tag>ix          sorted set, every score 0: the chunks' heads ("" below the others)
--   <tag>ix:<head>   sorted set, every score 0: the entries >= head and < the next head
-- An entry is the lower-cased id, followed by "\0" and the id itself when they differ
-- (ids are printable ASCII: "\0" sorts before every character of an id). The keys derive
-- from the shard's activity index `<tag>active`, so every key stays under the shard's tag.

local IX_CHUNK = 120

local function ix_dir(active)
  return string.sub(active, 1, -7) .. 'ix'
end

local function ix_entry(id)
  local low = string.lower(id)
  if low == id then
    return id
  end
  return low .. '\0' .. id
end

-- The head of the chunk an entry belongs in (the greatest head <= entry).
local function ix_head(dir, entry)
  return redis.call('ZREVRANGEBYLEX', dir, '[' .. entry, '-', 'LIMIT', 0, 1)[1]
end

local function ix_add(active, id)
  local dir, entry = ix_dir(active), ix_entry(id)
  local head = ix_head(dir, entry)
  if not head then
    head = ''
    redis.call('ZADD', dir, 0, head)
  end
  local chunk = dir .. ':' .. head
  if redis.call('ZADD', chunk, 0, entry) == 1 and redis.call('ZCARD', chunk) > IX_CHUNK then
    -- Split: the upper half moves to a new chunk headed by its first entry.
    local half = IX_CHUNK / 2
    local upper = redis.call('ZRANGE', chunk, half, -1)
    local args = {}
    for i, e in ipairs(upper) do
      args[2 * i - 1] = 0
      args[2 * i] = e
    end
    redis.call('ZADD', dir .. ':' .. upper[1], unpack(args))
    redis.call('ZREMRANGEBYRANK', chunk, half, -1)
    redis.call('ZADD', dir, 0, upper[1])
  end
end

local function ix_remove(active, id)
  local dir, entry = ix_dir(active), ix_entry(id)
  local head = ix_head(dir, entry)
  if not head then
    return
  end
  local chunk = dir .. ':' .. head
  -- An emptied chunk goes with its head (an entry below every head lands in "" again).
  if redis.call('ZREM', chunk, entry) == 1 and redis.call('EXISTS', chunk) == 0 then
    redis.call('ZREM', dir, head)
  end
end
