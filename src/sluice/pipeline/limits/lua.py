"""Lua scripts of the Redis limiter; they mirror ``window.py`` and run on Redis's clock.

Keys per scope: ``<scope>:r`` (hash second -> requests), ``<scope>:t`` (hash second ->
tokens), ``<scope>:p`` (sorted set request id -> lease expiry in ms). Only the keys of
limits a scope actually has are read or written.
"""

from __future__ import annotations

from sluice.pipeline.limits.base import Reason
from sluice.pipeline.limits.window import (
    NEVER_RETRY_AFTER,
    PARALLEL_RETRY_AFTER,
    WINDOW_BUCKETS,
)

KEY_TTL_SECONDS = 120
"""Idle window hashes vanish after this; lease sets after their longest lease + this."""

REASON_CODES: dict[int, Reason] = {1: "rpm", 2: "tpm", 3: "parallel"}

# KEYS: per scope i, (requests hash, tokens hash, leases zset)
# ARGV: tokens, request id, lease ms, then per scope i: rpm, tpm, max_parallel (-1 = none)
# Returns: allowed (0/1), reason code (0 = none), retry ms, now ms,
#          then per scope: requests, oldest request second, tokens, oldest token second
#          (-1 when nothing is counted).
_ACQUIRE = """
local WINDOW = __WINDOW__
local TTL = __TTL__
local NEVER_MS = __NEVER_MS__
local PARALLEL_MS = __PARALLEL_MS__

local clock = redis.call('TIME')
local now_s = tonumber(clock[1])
local now_ms = now_s * 1000 + math.floor(tonumber(clock[2]) / 1000)
local first_live = now_s - WINDOW + 1
local tokens = tonumber(ARGV[1])
local rid = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local n = #KEYS / 3

local function load(key, limited)
  local w = {total = 0, oldest = -1, amount = {}}
  if not limited then return w end
  local flat = redis.call('HGETALL', key)
  local stale = {}
  for i = 1, #flat, 2 do
    local s = tonumber(flat[i])
    if s < first_live then
      stale[#stale + 1] = flat[i]
    else
      local v = tonumber(flat[i + 1])
      w.total = w.total + v
      w.amount[s] = v
      if w.oldest < 0 or s < w.oldest then w.oldest = s end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return w
end

local function wait_ms(w, need)
  local secs = {}
  for s in pairs(w.amount) do secs[#secs + 1] = s end
  table.sort(secs)
  local freed = 0
  for _, s in ipairs(secs) do
    freed = freed + w.amount[s]
    if freed >= need then return math.max((s + WINDOW) * 1000 - now_ms, 1) end
  end
  return WINDOW * 1000
end

local reqs, toks, lims = {}, {}, {}
local reason, retry = 0, 0
for i = 1, n do
  local base = 3 + (i - 1) * 3
  local rpm, tpm, par = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local kr, kt, kp = KEYS[(i - 1) * 3 + 1], KEYS[(i - 1) * 3 + 2], KEYS[(i - 1) * 3 + 3]
  local r, t = load(kr, rpm >= 0), load(kt, tpm >= 0)
  reqs[i], toks[i], lims[i] = r, t, {rpm, tpm, par}
  local fail, wait = 0, 0
  if rpm >= 0 and r.total + 1 > rpm then
    fail = 1
    if rpm < 1 then wait = NEVER_MS else wait = wait_ms(r, r.total + 1 - rpm) end
  end
  if tpm >= 0 and t.total + tokens > tpm then
    if fail == 0 then fail = 2 end
    if tokens > tpm then
      wait = math.max(wait, NEVER_MS)
    else
      wait = math.max(wait, wait_ms(t, t.total + tokens - tpm))
    end
  end
  if par >= 0 then
    redis.call('ZREMRANGEBYSCORE', kp, '-inf', now_ms)
    if redis.call('ZCARD', kp) >= par then
      if fail == 0 then fail = 3 end
      if par < 1 then wait = math.max(wait, NEVER_MS) else wait = math.max(wait, PARALLEL_MS) end
    end
  end
  if fail > 0 then
    if reason == 0 then reason = fail end
    retry = math.max(retry, wait)
  end
end

if reason == 0 then
  for i = 1, n do
    local rpm, tpm, par = lims[i][1], lims[i][2], lims[i][3]
    local kr, kt, kp = KEYS[(i - 1) * 3 + 1], KEYS[(i - 1) * 3 + 2], KEYS[(i - 1) * 3 + 3]
    if rpm >= 0 then
      redis.call('HINCRBY', kr, now_s, 1)
      redis.call('EXPIRE', kr, TTL)
      reqs[i].total = reqs[i].total + 1
      if reqs[i].oldest < 0 then reqs[i].oldest = now_s end
    end
    if tpm >= 0 then
      redis.call('HINCRBY', kt, now_s, tokens)
      redis.call('EXPIRE', kt, TTL)
      toks[i].total = toks[i].total + tokens
      if toks[i].oldest < 0 then toks[i].oldest = now_s end
    end
    if par >= 0 then
      redis.call('ZADD', kp, now_ms + lease_ms, rid)
      local keep = lease_ms + TTL * 1000
      if redis.call('PTTL', kp) < keep then redis.call('PEXPIRE', kp, keep) end
    end
  end
end

local out = {reason == 0 and 1 or 0, reason, retry, now_ms}
for i = 1, n do
  out[#out + 1] = reqs[i].total
  out[#out + 1] = reqs[i].oldest
  out[#out + 1] = toks[i].total
  out[#out + 1] = toks[i].oldest
end
return out
"""

# KEYS: the token hashes of the reserving scopes, then the lease sets to release
# ARGV: number of token hashes, reservation second, token delta, request id
_SETTLE = """
local first_live = tonumber(redis.call('TIME')[1]) - __WINDOW__ + 1
local ntok = tonumber(ARGV[1])
local second = ARGV[2]
local delta = tonumber(ARGV[3])
if delta ~= 0 and tonumber(second) >= first_live then
  for i = 1, ntok do
    if redis.call('HEXISTS', KEYS[i], second) == 1 then
      redis.call('HINCRBY', KEYS[i], second, delta)
    end
  end
end
for i = ntok + 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[4])
end
return 1
"""


def _fill(script: str) -> str:
    return (
        script.replace("__WINDOW__", str(WINDOW_BUCKETS))
        .replace("__TTL__", str(KEY_TTL_SECONDS))
        .replace("__NEVER_MS__", str(round(NEVER_RETRY_AFTER * 1000)))
        .replace("__PARALLEL_MS__", str(round(PARALLEL_RETRY_AFTER * 1000)))
    )


ACQUIRE = _fill(_ACQUIRE)
SETTLE = _fill(_SETTLE)
