-- enforce_batch.lua: every request of one event-loop tick in one call (the data plane's
-- pipeline sends it when a tick has several). Each request gets the verdict and the upsert
-- enforce.lua would give it alone, in order, with one Redis TIME for all of them.
--
-- KEYS    every request's keys, one request after the other
-- ARGV[1] the number of requests, n
-- ARGV[2 .. 2n+1]  per request, its number of keys and its number of arguments
-- then    every request's arguments (enforce.lua's ARGV), one request after the other
--
-- Reply: one entry per request, in order: enforce.lua's reply, or an error (a request whose
-- call failed, e.g. a key of another node's slot in a cluster or a write refused for lack of
-- memory: it fails alone, and what the requests before it wrote stays written).

--#include enforce_core.lua

local n = tonumber(ARGV[1])
local time_us
local replies = {}
local k, a = 0, 2 * n + 1
for c = 1, n do
  local nk, na = num(ARGV[2 * c]), num(ARGV[2 * c + 1])
  local keys, args = {}, {}
  for i = 1, nk do
    keys[i] = KEYS[k + i]
  end
  for i = 1, na do
    args[i] = ARGV[a + i]
  end
  k, a = k + nk, a + na
  if not time_us and args[1] == '' then
    time_us = clock('')
  end
  local ok, reply = pcall(enforce, keys, args, clock(args[1], time_us))
  if ok then
    replies[c] = reply
  elseif type(reply) == 'table' and reply.err then
    replies[c] = reply  -- a Redis error reply ({err = ...}): passed on as it is
  else
    replies[c] = redis.error_reply(tostring(reply))
  end
end
return replies
