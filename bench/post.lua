-- wrk script for bench/run.py and bench/memory.py: POST one ASAP JSON-RPC request to /asap.
-- The envelope has no id and no timestamp, so the server generates both.
--
-- Set by the harness for some targets (read when the script loads):
--   BENCH_TOKEN               sent as "Authorization: Bearer <token>"
--   BENCH_IDEMPOTENCY_PREFIX  every request gets its own "X-Idempotency-Key:
--                             <prefix>-<thread>-<counter>" (the prefix is random per wrk run)
-- Without them the request is built once and resent as is (wrk's static mode).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"jsonrpc":"2.0","method":"asap.send","params":{"envelope":{"asap_version":"0.1",'
  .. '"sender":"urn:asap:agent:bench","recipient":"urn:asap:agent:echo-agent",'
  .. '"payload_type":"task.request","payload":{"conversation_id":"bench","skill_id":"echo",'
  .. '"input":{"message":"hello"}}}},"id":"b-1"}'

local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

local prefix = os.getenv("BENCH_IDEMPOTENCY_PREFIX")
if prefix and prefix ~= "" then
  local counter = 0
  -- Defining request() makes wrk call it for every request (dynamic mode).
  function request()
    counter = counter + 1
    wrk.headers["X-Idempotency-Key"] = prefix .. "-" .. (thread_id or 0) .. "-" .. counter
    return wrk.format()
  end
end

-- Count failures exactly: wrk's own "Non-2xx or 3xx" counter only sees HTTP >= 400,
-- and ASAP sends JSON-RPC errors with HTTP 200, so also count 2xx replies without a result.
non2xx = 0
rpc_errors = 0

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  elseif not string.find(body, '"result"', 1, true) then
    rpc_errors = rpc_errors + 1
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

function done(summary, latency, requests)
  local n, e = 0, 0
  for _, t in ipairs(threads) do
    n = n + t:get("non2xx")
    e = e + t:get("rpc_errors")
  end
  io.write(string.format("ASAP-COUNTS non2xx=%d rpc_errors=%d\n", n, e))
end
