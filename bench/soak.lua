-- wrk script for bench/soak.py: bench/post.lua's request, and stop after BENCH_REQUESTS
-- responses (wrk itself only knows durations). The response() callback costs wrk a Lua
-- call per response: fine for a soak, which measures memory, not throughput.
--
-- wrk's main thread sleeps for -d whatever its threads do, so at the limit this thread
-- stops and creates BENCH_DONE_FILE, and soak.py sends wrk SIGINT (wrk then prints its
-- summary and exits).
--
-- Environment: BENCH_BODY, BENCH_AUTH (as post.lua), BENCH_REQUESTS (responses, one
-- thread: -t1), BENCH_DONE_FILE.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
  or '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"

local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

local limit = tonumber(os.getenv("BENCH_REQUESTS") or "0")
local done_file = os.getenv("BENCH_DONE_FILE")
local seen = 0

function response(status, headers, body)
  seen = seen + 1
  if limit > 0 and seen >= limit then
    wrk.thread:stop()
    if done_file ~= nil and done_file ~= "" then
      io.open(done_file, "w"):close()
    end
  end
end
