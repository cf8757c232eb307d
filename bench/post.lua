-- wrk script used by bench/gateway_bench.py: POST an OpenAI chat completion.
--
-- Environment (set by gateway_bench.py):
--   BENCH_BODY  request body (JSON); default: a small non-streaming request
--   BENCH_AUTH  optional bearer token, sent as "Authorization: Bearer ..."
--
-- No response()/done() callbacks on purpose: they make wrk call into Lua for
-- every response and would slow the load generator down. Non-2xx responses
-- are counted by wrk itself ("Non-2xx or 3xx responses: N").

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
  or '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"

local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end
