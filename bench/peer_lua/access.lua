-- access.lua: the openresty peer's nginx side, a module run by access_by_lua_block (the
-- config bench/servers.py writes: init_by_lua_block calls configure() in the master, each
-- request calls access()). Per request: read the device id and the six identification
-- headers, make ONE Redis call (EVALSHA of enforce_peer.lua on a pooled keep-alive
-- connection), then answer 403 (blocked), 429 + Retry-After (limited), 503 (Redis failed)
-- or let the request through to proxy_pass with devicegate's rate-limit headers.
--
-- The client is lua-resty-redis 0.27 (Debian's lua-nginx-redis installs it as nginx.redis):
-- red:set_timeout(ms), not the later set_timeouts.

local ok, redis = pcall(require, 'resty.redis')
if not ok then
  redis = require('nginx.redis')
end

local ngx = ngx
local var = ngx.var
local concat = table.concat
local ceil = math.ceil

local M = {}

local cfg      -- set by configure() in the master; the workers inherit it
local script   -- enforce_peer.lua's text
local sha      -- its SHA-1 once this worker loaded it (a per-worker upvalue: nil after fork)

local DECLARED = {
  'http_x_app_name', 'http_x_app_version', 'http_x_os_name', 'http_x_os_version',
  'http_x_device_manufacturer', 'http_x_device_model',
}
local BLOCKED = '{"status":false,"result":"Access denied: device is blocked"}'
local LIMITED = '{"status":false,"result":"Too many requests"}'
local UNAVAILABLE = '{"status":false,"result":"Service temporarily unavailable"}'

-- c: {script = path, host, port, timeout_ms, prefix, rate (milli-tokens/s), burst,
--     anonymous_rate, anonymous_burst, upload_methods = {POST = true}}
function M.configure(c)
  local f = assert(io.open(c.script, 'rb'))
  script = f:read('*a')
  f:close()
  cfg = c
end

local function answer(status, body, retry_after)
  ngx.status = status
  ngx.header['Content-Type'] = 'application/json'
  ngx.header['Content-Length'] = #body
  if retry_after then
    ngx.header['Retry-After'] = retry_after
  end
  ngx.print(body)
  return ngx.exit(status)
end

local function seconds_up(us)
  return ceil(us / 1000000)
end

-- EVALSHA; the script is loaded once per worker, and again after a NOSCRIPT (a Redis restart
-- or SCRIPT FLUSH).
local function enforce(red, nkeys, ...)
  if not sha then
    local loaded, err = red:script('load', script)
    if not loaded then
      return nil, err
    end
    sha = loaded
  end
  local reply, err = red:evalsha(sha, nkeys, ...)
  if not reply and err and err:find('NOSCRIPT', 1, true) then
    local loaded, lerr = red:script('load', script)
    if not loaded then
      return nil, lerr
    end
    sha = loaded
    reply, err = red:evalsha(sha, nkeys, ...)
  end
  return reply, err
end

function M.access()
  local red = redis:new()
  red:set_timeout(cfg.timeout_ms)
  local connected, err = red:connect(cfg.host, cfg.port)
  if not connected then
    ngx.log(ngx.ERR, 'redis connect: ', err)
    return answer(503, UNAVAILABLE)
  end

  local id = var.http_x_device_id
  local reply, policy
  if id and id ~= '' then
    local declared = {}
    for i = 1, #DECLARED do
      declared[i] = var[DECLARED[i]] or ''
    end
    policy = 'device'
    reply, err = enforce(red, 2, cfg.prefix .. 'd:' .. id, cfg.prefix .. 'active',
      cfg.rate, cfg.burst, id, concat(declared, '\31'),
      cfg.upload_methods[ngx.req.get_method()] and '1' or '0')
  else
    policy = 'anonymous'
    reply, err = enforce(red, 1, cfg.prefix .. 'a:' .. var.remote_addr,
      cfg.anonymous_rate, cfg.anonymous_burst)
  end
  if not reply then
    ngx.log(ngx.ERR, 'redis evalsha: ', err)
    red:close()
    return answer(503, UNAVAILABLE)
  end
  red:set_keepalive(10000, 64)

  local outcome = reply[1]
  if outcome == 1 then
    return answer(403, BLOCKED)
  end
  -- reply: outcome, remaining, retry_after_us, full_after_us, rate, burst
  local h = ngx.header
  h['RateLimit-Policy'] = '"' .. policy .. '";q=' .. reply[6]
    .. ';w=' .. ceil(reply[6] * 1000 / reply[5])
  h['RateLimit'] = '"' .. policy .. '";r=' .. reply[2] .. ';t=' .. seconds_up(reply[3])
  h['X-RateLimit-Limit'] = reply[6]
  h['X-RateLimit-Remaining'] = reply[2]
  h['X-RateLimit-Reset'] = seconds_up(reply[4])
  if outcome == 2 then
    local wait = seconds_up(reply[3])
    return answer(429, LIMITED, wait < 1 and 1 or wait)
  end
  -- allowed: access_by_lua returns, proxy_pass forwards the request
end

return M
