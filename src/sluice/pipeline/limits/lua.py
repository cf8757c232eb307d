"""Lua scripts of the Redis limiter; they mirror ``window.py`` and run on Redis's clock.

Keys per scope: ``<scope>:r`` (hash second -> requests), ``<scope>:t`` (hash second ->
tokens), ``<scope>:p`` (sorted set request id -> lease expiry in ms). Only the keys of
limits a scope actually has are read or written. Each window hash also keeps ``s`` (the
sum of its live buckets) and ``o`` (its oldest bucket), so a busy key costs a handful of
field reads per call, not a read of all 61 buckets.
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

# The limiter's one script: one call per event-loop turn carries that turn's settles and
# acquires. It first settles several tickets (their token deltas into their reservation's
# bucket, their leases released), then admits several requests, each all-or-nothing over
# its own scopes, in order, on one reading of Redis's clock.
# KEYS: per ticket, the token hashes of its reserving scopes (none when its delta is 0),
#       then its lease sets to release; then per request, per scope i: (requests hash,
#       tokens hash, leases zset)
# ARGV: number of tickets, then per ticket: number of token hashes, number of lease sets,
#       token delta, reservation second, request id; then number of requests, then per
#       request: number of scopes, tokens, request id, lease ms, then per scope: rpm, tpm,
#       max_parallel (-1 = none)
# Returns, per request, 10 numbers: allowed (0/1), reason code (0 = none), retry ms, now ms,
#          then for the x-ratelimit headers the requests limit, remaining and reset ms, and
#          the tokens limit, remaining and reset ms, each of the scope with the least
#          remaining (then the smallest limit, then the first) among those with that limit
#          (limit -1 when none has it): window.build_admission's rule, in Lua.
_SCRIPT = """
local WINDOW = __WINDOW__
local TTL = __TTL__
local NEVER_MS = __NEVER_MS__
local PARALLEL_MS = __PARALLEL_MS__

local clock = redis.call('TIME')
local now_s = tonumber(clock[1])
local now_ms = now_s * 1000 + math.floor(tonumber(clock[2]) / 1000)
local first_live = now_s - WINDOW + 1

-- A window hash holds per-second buckets plus 's' (their sum) and 'o' (the oldest bucket),
-- so a call reads two fields and touches only the buckets that have just left the window.
local function rebuild(key)
  local flat = redis.call('HGETALL', key)
  local total, oldest, stale = 0, nil, {}
  for i = 1, #flat, 2 do
    local s = tonumber(flat[i])
    if s then
      if s < first_live then
        stale[#stale + 1] = flat[i]
      else
        total = total + tonumber(flat[i + 1])
        if not oldest or s < oldest then oldest = s end
      end
    end
  end
  for i = 1, #stale, 1000 do
    redis.call('HDEL', key, unpack(stale, i, math.min(i + 999, #stale)))
  end
  return total, oldest
end

local function load(key, limited)
  local w = {key = key, total = 0, oldest = -1}
  if not limited then return w end
  local head = redis.call('HMGET', key, 's', 'o')
  local total, oldest = tonumber(head[1]) or 0, tonumber(head[2])
  if oldest and oldest < first_live then
    if first_live - oldest > 4 * WINDOW then
      total, oldest = rebuild(key)  -- a clock jump: not worth walking second by second
    else
      local stale = {}
      for s = oldest, first_live - 1 do
        local v = redis.call('HGET', key, s)
        if v then
          total = total - tonumber(v)
          stale[#stale + 1] = s
        end
      end
      if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
      oldest = nil
      for s = first_live, now_s do
        if redis.call('HEXISTS', key, s) == 1 then
          oldest = s
          break
        end
      end
    end
    if oldest then
      redis.call('HSET', key, 's', total, 'o', oldest)
    else
      total = 0
      redis.call('DEL', key)
    end
  end
  w.total, w.oldest = total, oldest or -1
  return w
end

-- ms until the oldest buckets holding `need` units have left the window
local function wait_ms(w, need)
  local freed = 0
  if w.oldest >= 0 then
    for s = w.oldest, now_s do
      local v = redis.call('HGET', w.key, s)
      if v then
        freed = freed + tonumber(v)
        if freed >= need then return math.max((s + WINDOW) * 1000 - now_ms, 1) end
      end
    end
  end
  return WINDOW * 1000
end

local function add(w, amount)
  local bucket = redis.call('HINCRBY', w.key, now_s, amount)
  redis.call('HINCRBY', w.key, 's', amount)
  if w.oldest < 0 then
    redis.call('HSET', w.key, 'o', now_s)
    w.oldest = now_s
  end
  -- A new bucket (at most once a second per key) pushes the TTL out; TTL > WINDOW.
  if bucket == amount then redis.call('EXPIRE', w.key, TTL) end
  w.total = w.total + amount
end

-- The headers' numbers of one kind (which = 1: requests, 2: tokens): limit, remaining and
-- ms until the oldest counted bucket leaves, of the scope with the least remaining, then
-- the smallest limit, then the first; -1, 0, 0 when no scope has that limit.
local function tightest(windows, lims, which, out)
  local limit, left, reset = -1, 0, 0
  for i = 1, #windows do
    local l = lims[i][which]
    if l >= 0 then
      local w = windows[i]
      local l_left = l - w.total
      if limit < 0 or l_left < left or (l_left == left and l < limit) then
        limit, left = l, l_left
        if w.oldest < 0 then reset = 0 else reset = (w.oldest + WINDOW) * 1000 - now_ms end
      end
    end
  end
  out[#out + 1] = limit
  out[#out + 1] = math.max(left, 0)
  out[#out + 1] = math.max(reset, 0)
end

-- One request: its keys start after KEYS[k0], its arguments after ARGV[a0]; appends its
-- answer to out.
local function acquire(k0, a0, n, out)
  local tokens, rid, lease_ms = tonumber(ARGV[a0 + 1]), ARGV[a0 + 2], tonumber(ARGV[a0 + 3])
  local reqs, toks, lims = {}, {}, {}
  local reason, retry = 0, 0
  for i = 1, n do
    local base = a0 + 3 + (i - 1) * 3
    local rpm = tonumber(ARGV[base + 1])
    local tpm, par = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
    local kb = k0 + (i - 1) * 3
    local kr, kp = KEYS[kb + 1], KEYS[kb + 3]
    local r, t = load(kr, rpm >= 0), load(KEYS[kb + 2], tpm >= 0)
    reqs[i], toks[i], lims[i] = r, t, {rpm, tpm, par, kp}
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
      local rpm, tpm, par, kp = lims[i][1], lims[i][2], lims[i][3], lims[i][4]
      if rpm >= 0 then add(reqs[i], 1) end
      if tpm >= 0 then add(toks[i], tokens) end
      if par >= 0 then
        redis.call('ZADD', kp, now_ms + lease_ms, rid)
        local keep = lease_ms + TTL * 1000
        if redis.call('PTTL', kp) < keep then redis.call('PEXPIRE', kp, keep) end
      end
    end
  end

  out[#out + 1] = reason == 0 and 1 or 0
  out[#out + 1] = reason
  out[#out + 1] = retry
  out[#out + 1] = now_ms
  tightest(reqs, lims, 1, out)
  tightest(toks, lims, 2, out)
end

-- The tickets: returns the index of the last key and the last argument they used.
local function settle_all()
  local k, a = 1, 2
  for _ = 1, tonumber(ARGV[1]) do
    local ntok, nlease = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local delta, second, rid = tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4]
    a = a + 5
    if delta ~= 0 and tonumber(second) >= first_live then
      for i = k, k + ntok - 1 do
        if redis.call('HEXISTS', KEYS[i], second) == 1 then
          redis.call('HINCRBY', KEYS[i], second, delta)
          redis.call('HINCRBY', KEYS[i], 's', delta)
        end
      end
    end
    k = k + ntok
    for i = k, k + nlease - 1 do
      redis.call('ZREM', KEYS[i], rid)
    end
    k = k + nlease
  end
  return k - 1, a - 1
end

local out = {}
local k0, a0 = settle_all()
for _ = 1, tonumber(ARGV[a0 + 1]) do
  local n = tonumber(ARGV[a0 + 2])
  acquire(k0, a0 + 2, n, out)
  k0 = k0 + 3 * n
  a0 = a0 + 4 + 3 * n
end
return out
"""


# The lease renewal (leases.py): every live ticket's leases pushed out to now + lease, on
# Redis's clock. ZADD XX: a lease already released (its request settled) is not created
# again. Each lease set's TTL is kept beyond the lease, as the acquire does.
# KEYS: per group, its lease sets (those of one plan: one key and model)
# ARGV: lease ms, then per group: number of lease sets, number of members, the members
#       (request ids)
# Returns Redis's clock (ms).
_RENEW_SCRIPT = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
local expiry = now_ms + lease_ms
local keep = lease_ms + __TTL__ * 1000
local k, a = 1, 2
while a <= #ARGV do
  local n, m = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local first, last = a + 2, a + 1 + m
  for i = k, k + n - 1 do
    local key = KEYS[i]
    for j = first, last, 500 do
      local args = {}
      for x = j, math.min(j + 499, last) do
        args[#args + 1] = expiry
        args[#args + 1] = ARGV[x]
      end
      redis.call('ZADD', key, 'XX', unpack(args))
    end
    if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
  end
  k = k + n
  a = last + 1
end
return now_ms
"""


def _fill(script: str) -> str:
    return (
        script.replace("__WINDOW__", str(WINDOW_BUCKETS))
        .replace("__TTL__", str(KEY_TTL_SECONDS))
        .replace("__NEVER_MS__", str(round(NEVER_RETRY_AFTER * 1000)))
        .replace("__PARALLEL_MS__", str(round(PARALLEL_RETRY_AFTER * 1000)))
    )


SCRIPT = _fill(_SCRIPT)
RENEW_SCRIPT = _fill(_RENEW_SCRIPT)
