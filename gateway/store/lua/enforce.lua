-- enforce.lua: one request's enforcement a call (enforce_core.lua says what it does and
-- answers). The data plane sends each event-loop tick's requests together as one call of
-- enforce_batch.lua instead when there are several; this one serves a lone request, a
-- cluster's redirected one, and the embedded store.

--#include enforce_core.lua

return enforce(KEYS, ARGV, clock(ARGV[1]))
