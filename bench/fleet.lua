-- fleet.lua: a wrk script that speaks as a fleet of devices, each with stable, realistic
-- identification headers (an application and version, an OS and version, a manufacturer
-- and model, a User-Agent that agrees with them, an API bearer token).
--
--   FLEET_MODE=rotate FLEET_COUNT=1000 FLEET_PREFIX=dev- \
--     wrk -t1 -c64 -d10s --latency -s bench/fleet.lua URL
--       requests cycle over ids dev-0000000 .. dev-0000999; the requests are built once
--       per thread, so wrk spends no time formatting them during the run
--   FLEET_MODE=register FLEET_COUNT=100000 FLEET_PREFIX=fleet- \
--     wrk -t1 -c64 -d600s -s bench/fleet.lua URL
--       ids fleet-0000000 .. fleet-0099999, each sent once, then the thread stops sending
--       (wrk itself runs until -d or SIGINT: the caller stops it when the devices are in);
--       FLEET_FIRST=100000 starts at fleet-0100000 instead
--
-- Settings come from the environment, not script args: wrk decides whether to hand
-- responses to Lua from the top-level chunk, before any init(args) runs, and rotate mode
-- must not pay for that. Same headers for an id in both modes; nothing here depends on
-- the target, so every target gets the same bytes.

local APPS = {
  {"FieldApp", "2.4.1"}, {"Courier", "5.0.3"}, {"Scanner Pro", "1.9.0"}, {"MeterRead", "3.2.7"},
  {"FieldApp", "2.5.0"},
}
local HARDWARE = {
  {"Android", "15", "Samsung", "Galaxy S24"}, {"iOS", "18.1", "Apple", "iPhone 15"},
  {"Android", "13", "Zebra", "TC52"}, {"Android", "14", "Google", "Pixel 8"},
  {"Android", "11", "Honeywell", "CT45"}, {"iOS", "17.6", "Apple", "iPad (10th generation)"},
}
local PATH = "/api/v1/orders?status=open&page=1"

local mode = os.getenv("FLEET_MODE") or "rotate"
local count = tonumber(os.getenv("FLEET_COUNT") or "1000")
local prefix = os.getenv("FLEET_PREFIX") or "dev-"
local first = tonumber(os.getenv("FLEET_FIRST") or "0")
local built = {}      -- rotate: prebuilt requests
local next_id = 0     -- register: ids sent so far
local answered = 0    -- register: responses seen

local function build(i)
  local app = APPS[i % #APPS + 1]
  local hw = HARDWARE[i % #HARDWARE + 1]
  local headers = {
    ["X-Device-Id"] = string.format("%s%07d", prefix, i),
    ["X-App-Name"] = app[1],
    ["X-App-Version"] = app[2],
    ["X-OS-Name"] = hw[1],
    ["X-OS-Version"] = hw[2],
    ["X-Device-Manufacturer"] = hw[3],
    ["X-Device-Model"] = hw[4],
    ["User-Agent"] = string.format("%s/%s (%s %s; %s %s)", app[1], app[2], hw[1], hw[2], hw[3], hw[4]),
    ["Accept"] = "application/json",
    ["Authorization"] = string.format("Bearer tok_%016x", (i * 2654435761) % 4294967296),
  }
  return wrk.format("GET", PATH, headers)
end

function init(args)
  if mode == "rotate" then
    for i = 0, count - 1 do
      built[i + 1] = build(i)
    end
  elseif mode ~= "register" then
    error("fleet.lua: mode must be rotate or register, not " .. mode)
  end
end

local turn = 0

function request()
  if mode == "rotate" then
    turn = turn % count + 1
    return built[turn]
  end
  -- register: each id once; connections still open after the last one repeat the first
  local i = first
  if next_id < count then
    i = first + next_id
    next_id = next_id + 1
  end
  return build(i)
end

if mode == "register" then
  function response(status, headers, body)
    answered = answered + 1
    if answered >= count then
      wrk.thread:stop()
    end
  end
end
