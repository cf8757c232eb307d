-- The wrk script of bench/harness.py: POST $BENCH_BODY, with $BENCH_AUTH as a bearer key.
--
-- With BENCH_REQUESTS set, the thread stops after that many responses and creates
-- BENCH_DONE_FILE (wrk itself knows only durations: the caller then sends wrk SIGINT, and
-- wrk prints its summary). Only then is response() defined: it costs wrk a Lua call per
-- response. Non-2xx responses are counted by wrk itself.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"

local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

local limit = tonumber(os.getenv("BENCH_REQUESTS") or "0")
if limit > 0 then
  local seen, done_file = 0, os.getenv("BENCH_DONE_FILE")
  function response(status, headers, body)
    seen = seen + 1
    if seen >= limit then
      wrk.thread:stop()
      if done_file ~= nil and done_file ~= "" then
        io.open(done_file, "w"):close()
      end
    end
  end
end
