-- reindex.lua: add some devices of one shard to its search indexes (the id index and the
-- words of custom names), as the scripts that write records keep them. Idempotent: for
-- records written before the indexes existed (`gateway reindex`).
-- KEYS[1] `<tag>active`, KEYS[2] `<tag>names`
-- ARGV    device ids of the shard
-- Reply: how many of them have a record's index entry (every one in `active`).

--#include id_index.lua
--#include name_words.lua

local active, names = KEYS[1], KEYS[2]
local done = 0
for _, id in ipairs(ARGV) do
  if redis.call('ZSCORE', active, id) then
    ix_add(active, id)
    nw_apply(names, id, redis.call('HGET', names, id), 'ZADD')
    done = done + 1
  end
end
return done
