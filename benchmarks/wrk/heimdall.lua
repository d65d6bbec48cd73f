-- wrk script of the Heimdall benchmark (benchmarks/bench.py writes its inputs and reads its output).
--
--   wrk -c C -d D -t T --timeout 60s -s heimdall.lua URL -- KEY=VALUE ...
--
-- Arguments (all KEY=VALUE):
--   mode      miss | hit | mixed | batch | async | pairs | plain
--   manifest  a file listing request bodies, one path a line (read once per thread)
--   hot       how many of the listed bodies form the repeated set (hit, mixed)
--   share     mixed: fraction of requests drawn from the repeated set (0..1)
--   items     batch: items per request
--   salt      0..63, different for every wrk invocation of one run, so a measured
--             pass never repeats what its warm-up (or an earlier scenario) sent
--   path      request path (POST); async: the submit path
--   jobs      async: the job path prefix (GET <jobs><id>)
--   poll_ms   async: delay between two polls of one job
--   marker    text right before a base64 recording (default "iq": "; escaped when the
--             request travels as a JSON string inside another document)
--
-- "Distinct" bodies: the first two base64 characters of the first two stations'
-- recordings are replaced by a counter (salt, thread, sequence). Those characters
-- carry the low mantissa bits of the first sample's I value, so every request
-- decodes to different samples (a different cache key) with the same scene.
-- Pairs bodies get their first I value replaced by a small number made of the counter.
--
-- done() prints one line "WRK_JSON {...}" with the counts and latency percentiles.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } hb_timespec;
  int clock_gettime(int clk_id, hb_timespec *tp);
]]
local ts = ffi.new("hb_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000.0 + tonumber(ts.tv_nsec) / 1e6
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64char(n)
  local k = (n % 64) + 1
  return B64:sub(k, k)
end

-- main state: give every thread its index --------------------------------------------
local threads = {}
local next_id = 0
function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

-- thread state -------------------------------------------------------------------------
local cfg = {}
local bodies = {}
local seq = 0
counts = { requests = 0, ok = 0, hits = 0, computed = 0, accepted = 0, errors = 0 }
statuses = {}
local pending = {}      -- async: job ids waiting for a poll, FIFO
local submitted = {}    -- async: job id -> submit time (ms)
local outstanding = 0   -- async: jobs submitted and not yet done by this thread
job_lat = {}      -- async: end-to-end latency of finished jobs (ms)
polls = 0
local last_kind = nil   -- async: kind of the last request built ("submit" | "poll")
local per_thread_conns = 1

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  for _, a in ipairs(args) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k then cfg[k] = v end
  end
  cfg.mode = cfg.mode or "plain"
  cfg.hot = tonumber(cfg.hot or "10")
  cfg.share = tonumber(cfg.share or "0.5")
  cfg.items = tonumber(cfg.items or "64")
  cfg.salt = tonumber(cfg.salt or "0")
  cfg.poll_ms = tonumber(cfg.poll_ms or "50")
  cfg.path = cfg.path or "/api/v1/predict"
  cfg.jobs = cfg.jobs or "/api/v1/jobs/"
  per_thread_conns = tonumber(cfg.conns_per_thread or "1")
  if cfg.manifest then
    for line in io.lines(cfg.manifest) do
      if #line > 0 then table.insert(bodies, read_file(line)) end
    end
  end
  math.randomseed(1000 + (thread_id or 0) * 7919 + cfg.salt)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

-- A body whose samples no earlier request of this run carried.
local function distinct(body)
  seq = seq + 1
  local tag = { b64char(cfg.salt), b64char(thread_id or 0), b64char(seq), b64char(math.floor(seq / 64)) }
  local s = 1
  local out = body
  if cfg.mode == "pairs" then
    local at = out:find('"iq": [[', 1, true)
    if at then
      local first = at + 8
      local stop = out:find(",", first, true)
      -- n < 2^24 times a power of two: exact in float32, so no two requests round alike
      local n = (seq % 4096) * 4096 + cfg.salt * 64 + (thread_id or 0) + 1
      local value = string.format("%.17g", n / 2 ^ 30)
      out = out:sub(1, first - 1) .. value .. out:sub(stop)
    end
    return out
  end
  local marker = cfg.marker or '"iq": "'
  for station = 1, 2 do
    local at = out:find(marker, s, true)
    if not at then break end
    local first = at + #marker
    out = out:sub(1, first - 1) .. tag[station * 2 - 1] .. tag[station * 2] .. out:sub(first + 2)
    s = first + 2
  end
  return out
end

local function pick_distinct()
  return distinct(bodies[(seq % #bodies) + 1])
end

local function pick_hot()
  return bodies[math.random(1, math.min(cfg.hot, #bodies))]
end

function request()
  local mode = cfg.mode
  if mode == "hit" then
    return wrk.format("POST", cfg.path, nil, pick_hot())
  elseif mode == "mixed" then
    if math.random() < cfg.share then
      return wrk.format("POST", cfg.path, nil, pick_hot())
    end
    return wrk.format("POST", cfg.path, nil, pick_distinct())
  elseif mode == "miss" or mode == "pairs" then
    return wrk.format("POST", cfg.path, nil, pick_distinct())
  elseif mode == "batch" then
    local parts = {}
    for i = 1, cfg.items do parts[i] = pick_distinct() end
    return wrk.format("POST", cfg.path, nil, '{"items": [' .. table.concat(parts, ", ") .. "]}")
  elseif mode == "async" then
    local head = pending[1]
    if head and (outstanding >= per_thread_conns or head.due <= now_ms()) then
      table.remove(pending, 1)
      last_kind = "poll"
      polls = polls + 1
      return wrk.format("GET", cfg.jobs .. head.id, nil, nil)
    end
    last_kind = "submit"
    outstanding = outstanding + 1
    return wrk.format("POST", cfg.path, nil, pick_distinct())
  end
  -- plain: the listed bodies in turn
  seq = seq + 1
  return wrk.format("POST", cfg.path, nil, bodies[(seq % #bodies) + 1])
end

function delay()
  -- async: a client that has nothing new to submit waits before its next poll.
  if cfg.mode == "async" and outstanding >= per_thread_conns then
    return cfg.poll_ms
  end
  return 0
end

function response(status, headers, body)
  counts.requests = counts.requests + 1
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if cfg.mode == "async" then
    local id = body and body:match('"job_id":%s*"([^"]+)"')
    if status == 202 and id and not submitted[id] then
      submitted[id] = now_ms()
      table.insert(pending, { id = id, due = now_ms() + cfg.poll_ms })
      counts.accepted = counts.accepted + 1
      return
    end
    if status == 200 and id and submitted[id] then
      local state = body:match('"status":%s*"([^"]+)"')
      if state == "succeeded" or state == "failed" then
        table.insert(job_lat, now_ms() - submitted[id])
        submitted[id] = nil
        outstanding = outstanding - 1
        if state == "succeeded" then counts.ok = counts.ok + 1 else counts.errors = counts.errors + 1 end
        if body:find('"cached":%s*true') then counts.hits = counts.hits + 1 end
      else
        table.insert(pending, { id = id, due = now_ms() + cfg.poll_ms })
      end
      return
    end
    -- anything else ends the job for this client (counted as an error)
    counts.errors = counts.errors + 1
    if last_kind == "submit" and status ~= 202 then outstanding = outstanding - 1 end
    return
  end
  if status == 200 then
    counts.ok = counts.ok + 1
    if cfg.mode == "batch" then
      local _, n_hit = body:gsub('"cached":%s*true', "")
      local _, n_ok = body:gsub('"status":%s*"ok"', "")
      counts.hits = counts.hits + n_hit
      counts.computed = counts.computed + (n_ok - n_hit)
    elseif body:find('"cached":%s*true') then
      counts.hits = counts.hits + 1
    elseif body:find('"cached":%s*false') then
      counts.computed = counts.computed + 1
    end
  elseif status == 202 then
    counts.accepted = counts.accepted + 1
  else
    counts.errors = counts.errors + 1
  end
end

-- main state: gather the threads' counts and print one JSON line ----------------------
local function json_number(x)
  if x ~= x or x == math.huge or x == -math.huge then return "null" end
  return string.format("%.3f", x)
end

function done(summary, latency, requests)
  local total = { requests = 0, ok = 0, hits = 0, computed = 0, accepted = 0, errors = 0, polls = 0 }
  local status_total = {}
  local lat = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    for k, v in pairs(c) do total[k] = (total[k] or 0) + v end
    total.polls = total.polls + (t:get("polls") or 0)
    for k, v in pairs(t:get("statuses")) do status_total[k] = (status_total[k] or 0) + v end
    for _, v in ipairs(t:get("job_lat")) do table.insert(lat, v) end
  end
  local parts = {}
  for k, v in pairs(total) do table.insert(parts, string.format('"%s": %d', k, v)) end
  local st = {}
  for k, v in pairs(status_total) do table.insert(st, string.format('"%s": %d', k, v)) end
  local pct = {}
  for _, p in ipairs({ 50, 90, 95, 99 }) do
    table.insert(pct, string.format('"p%d": %s', p, json_number(latency:percentile(p) / 1000.0)))
  end
  table.insert(pct, '"mean": ' .. json_number(latency.mean / 1000.0))
  table.insert(pct, '"max": ' .. json_number(latency.max / 1000.0))
  table.insert(pct, '"min": ' .. json_number(latency.min / 1000.0))
  local e = summary.errors
  local jl = {}
  for _, v in ipairs(lat) do table.insert(jl, json_number(v)) end
  io.write(string.format(
    'WRK_JSON {"duration_s": %s, "wrk_requests": %d, "bytes": %d, ' ..
    '"socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, "non_2xx_3xx": %d, ' ..
    '"counts": {%s}, "statuses": {%s}, "latency_ms": {%s}, "job_latency_ms": [%s]}\n',
    json_number(summary.duration / 1e6), summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    table.concat(parts, ", "), table.concat(st, ", "), table.concat(pct, ", "), table.concat(jl, ",")))
end
