-- name_words.lua: included by the scripts that set or remove a custom name (`--#include`).
-- The shard's index of the words of custom names, for the search by the start of a word:
--   <tag>nw   sorted set, every score 0: "<lower-cased word>\0<id>" per word of a name
-- A word is a run of characters other than ASCII spaces and punctuation (bytes of other
-- scripts stay inside words); only ASCII letters are lower-cased. The key derives from
-- the shard's names hash `<tag>names`.

local function nw_key(names)
  return string.sub(names, 1, -6) .. 'nw'
end

local function nw_apply(names, id, name, command)
  if not name or name == '' then
    return
  end
  local key, seen = nw_key(names), {}
  for word in string.gmatch(string.lower(name), '[^%s%p]+') do
    if not seen[word] then
      seen[word] = true
      if command == 'ZADD' then
        redis.call('ZADD', key, 0, word .. '\0' .. id)
      else
        redis.call('ZREM', key, word .. '\0' .. id)
      end
    end
  end
end
