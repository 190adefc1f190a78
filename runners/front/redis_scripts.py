"""The Redis queue's state changes (runners/front/redis_queue.py), one Lua script each, so that each
is atomic on the Redis server. Times are Redis's own clock (``TIME``), so the replicas' clocks need
not agree.

Every script declares the keys it touches, as Redis's documentation asks of scripts: ``KEYS`` is
the fixed keys of the fleet (``FIXED_KEYS``, in that order) followed by the hash of every request
the script reads or writes, in the order of the ``ids`` argument; no script builds a key name. The
ids whose hashes a script may need but only Redis knows (the head of the line, the claims that may
have run out) are read by the caller first and passed in; the script checks them again.

Arguments are named: ``ARGV[1]`` is one JSON object (``cjson``), read as ``a.<name>``; no script
counts its way through positional arguments.

Every script but ``SUBMIT`` carries ``allow-oom``: a Redis at its ``maxmemory`` (noeviction)
refuses new requests, while the work already accepted goes on (claims, lease renewals, progress,
finishing, which frees the inputs) and then frees the memory (docs/fleet.md). ``SUBMIT`` has flags
and none of them, so a full Redis refuses it before it writes anything (an OOM error, answered 503
``queue_unavailable``). Flags need Redis 7.0 or later.
"""

# Their order is the order of KEYS[1..8] in every script.
FIXED_KEYS = ("waiting", "running", "unreported", "finished", "bytes", "seq", "replicas", "wake")

_PRELUDE = """
local a = cjson.decode(ARGV[1])
local K = {waiting = KEYS[1], running = KEYS[2], unreported = KEYS[3], finished = KEYS[4], bytes = KEYS[5],
  seq = KEYS[6], replicas = KEYS[7], wake = KEYS[8]}
local R = {}  -- request id -> its hash's key, as declared
for i, id in ipairs(a.ids or {}) do R[id] = KEYS[8 + i] end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function append_log(key, line)
  local logs = redis.call('HGET', key, 'front_logs')
  if not logs or logs == '[]' then logs = '[' .. line .. ']' else logs = string.sub(logs, 1, -2) .. ',' .. line .. ']' end
  redis.call('HSET', key, 'front_logs', logs)
end
-- Back to its own place in the line (its arrival order), unless it has finished meanwhile.
local function requeue(id, line)
  local key = R[id]
  redis.call('ZREM', K.running, id)
  local seq = redis.call('HGET', key, 'seq')
  if not seq or redis.call('HGET', key, 'status') == 'COMPLETED' then return false end
  redis.call('ZADD', K.waiting, seq, id)
  redis.call('HSET', key, 'status', 'IN_QUEUE', 'owner', '', 'worker_logs', '[]')
  append_log(key, line)
  redis.call('LPUSH', K.wake, '1')
  return true
end
"""


def _script(body: str, flags: str = "allow-oom") -> str:
    shebang = f"#!lua flags={flags}" if flags else "#!lua"
    return shebang + "\n" + _PRELUDE + body


# a: id, max_length, max_bytes, size, line (the "queued" log line, JSON), fields (name -> value).
# The new request's place in the line; -1 past max_length waiting, -2 past max_bytes held.
SUBMIT = _script(
    """
if redis.call('ZCARD', K.waiting) >= a.max_length then return -1 end
if tonumber(redis.call('GET', K.bytes) or '0') + a.size > a.max_bytes then return -2 end
local key = R[a.id]
local seq = redis.call('INCR', K.seq)
redis.call('HSET', key, 'seq', seq, 'submitted_ms', now_ms(), 'status', 'IN_QUEUE', 'attempts', 0, 'owner', '',
  'size', a.size, 'front_logs', '[' .. a.line .. ']', 'worker_logs', '[]')
for name, value in pairs(a.fields) do redis.call('HSET', key, name, value) end
redis.call('INCRBY', K.bytes, a.size)
redis.call('ZADD', K.waiting, seq, a.id)
redis.call('LPUSH', K.wake, '1')
redis.call('LTRIM', K.wake, 0, 1023)
return redis.call('ZRANK', K.waiting, a.id)
""",
    flags="",
)

# a: id (the head of the line as the caller read it), owner, lease_ms. Its whole hash, now IN_PROGRESS
# under a lease (as fal's is once a runner takes it, even before its first step); false when another
# feeder took it first (the caller reads the head again).
CLAIM = _script(
    """
if not redis.call('ZSCORE', K.waiting, a.id) then return false end
redis.call('ZREM', K.waiting, a.id)
local key = R[a.id]
if redis.call('HGET', key, 'status') ~= 'IN_QUEUE' then return false end
redis.call('ZADD', K.running, now_ms() + a.lease_ms, a.id)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'owner', a.owner, 'status', 'IN_PROGRESS')
return redis.call('HGETALL', key)
"""
)

# One call per poll does all of a replica's upkeep. a: owner, lease_ms, taken_back_line, requeued_line,
# now_s (unix), wanted (reports it may take over), max_attempts, held (ids it runs), reporting (ids
# whose report it delivers), head (the first ids of the line), running (the claims that expire
# first), unreported (the report claims that expire first); ids: every id above.
# - renews its leases, and takes back a request re-queued while this replica was silent (Redis away
#   past the lease) that nobody has claimed since;
# - puts every claim in ``running`` whose lease ran out back at its place in the line;
# - renews the claims of the reports (webhooks) it is delivering, and claims up to ``wanted`` whose
#   replica stopped renewing theirs (past ``max_attempts`` claims, one is dropped instead);
# - finds the requests at the head of the line past their deadline: deadlines follow arrival (one
#   FLUX_REQUEST_TIMEOUT_S for the fleet), so the head is where they are.
# Answers the line's depth, the head's wait (ms), the live replicas, the held ids whose claim is gone
# (ended elsewhere, or claimed by another replica), the ids past their deadline, the reports this
# replica now delivers, the reports dropped, and how many requests it re-queued.
HEARTBEAT = _script(
    """
local owner, lease = a.owner, a.lease_ms
local now = now_ms()
redis.call('ZADD', K.replicas, now, owner)
redis.call('ZREMRANGEBYSCORE', K.replicas, '-inf', now - lease)
local lost = {}
for _, id in ipairs(a.held) do
  local key = R[id]
  if redis.call('ZSCORE', K.running, id) and redis.call('HGET', key, 'owner') == owner then
    redis.call('ZADD', K.running, 'XX', now + lease, id)
  elseif redis.call('ZSCORE', K.waiting, id) then
    redis.call('ZREM', K.waiting, id)
    redis.call('ZADD', K.running, now + lease, id)
    redis.call('HSET', key, 'owner', owner, 'status', 'IN_PROGRESS')
    append_log(key, a.taken_back_line)
  else
    table.insert(lost, id)
  end
end
local requeued = 0
for _, id in ipairs(a.running) do
  local expiry = redis.call('ZSCORE', K.running, id)
  if expiry and tonumber(expiry) <= now and requeue(id, a.requeued_line) then requeued = requeued + 1 end
end
for _, id in ipairs(a.reporting) do
  if redis.call('HGET', R[id], 'reporter') == owner then
    redis.call('ZADD', K.unreported, 'XX', now + lease, id)
  end
end
local taken, dropped = {}, {}
for _, id in ipairs(a.unreported) do
  local expiry = redis.call('ZSCORE', K.unreported, id)
  if #taken < a.wanted and expiry and tonumber(expiry) <= now then
    local key = R[id]
    if redis.call('EXISTS', key) == 0 then
      redis.call('ZREM', K.unreported, id)  -- past its retention: nothing left to report
    elseif redis.call('HINCRBY', key, 'report_claims', 1) > a.max_attempts then
      redis.call('ZREM', K.unreported, id)
      table.insert(dropped, id)
    else
      redis.call('ZADD', K.unreported, now + lease, id)
      redis.call('HSET', key, 'reporter', owner)
      table.insert(taken, id)
    end
  end
end
local late = {}
for _, id in ipairs(a.head) do
  if redis.call('ZSCORE', K.waiting, id) then
    local deadline = redis.call('HGET', R[id], 'deadline')
    if deadline and deadline ~= '' and tonumber(deadline) < a.now_s then table.insert(late, id) end
  end
end
local oldest = 0
local first = redis.call('ZRANGE', K.waiting, 0, 0)[1]
if first and R[first] then oldest = now - tonumber(redis.call('HGET', R[first], 'submitted_ms') or now) end
return {redis.call('ZCARD', K.waiting), oldest, redis.call('ZCARD', K.replicas), lost, late, taken, dropped, requeued}
"""
)

# a: owner, line, ids. A replica hands back what it cannot run (draining, or its model tier is not
# ready): back to its place in the line, the attempt it had not counted.
HAND_BACK = _script(
    """
for _, id in ipairs(a.ids) do
  if redis.call('HGET', R[id], 'owner') == a.owner and requeue(id, a.line) then
    redis.call('HINCRBY', R[id], 'attempts', -1)
  end
end
return 0
"""
)

# a: owner, logs (id -> the worker's log lines, JSON), ids: a started request's status and worker lines.
PROGRESS = _script(
    """
for _, id in ipairs(a.ids) do
  local key = R[id]
  if redis.call('HGET', key, 'owner') == a.owner and redis.call('HGET', key, 'status') ~= 'COMPLETED' then
    redis.call('HSET', key, 'status', 'IN_PROGRESS', 'worker_logs', a.logs[id])
  end
end
return 0
"""
)

# a: id, token, owner ('' for anyone: a cancel), reporter ('' for none), lease_ms, retention_s,
# max_retained, line (the last log line), fields (outcome or error, worker logs), channel. Answers
# {1 when this call (its token) finished it, the ids past max_retained}: the first finish wins, and a
# retry of the same call after a lost answer still sees its win. The winner (the reporter) holds the
# claim to report it (metrics, webhook) in ``unreported``, scored by when that claim runs out; it
# renews it with its heartbeat and removes it once reported, and any replica's heartbeat takes over
# a claim that ran out. The caller forgets the ids past max_retained with FORGET (their keys declared).
FINISH = _script(
    """
local key = R[a.id]
local status = redis.call('HGET', key, 'status')
if not status then return {0, {}} end
if status == 'COMPLETED' then
  if redis.call('HGET', key, 'finished_by') == a.token then return {1, {}} end
  return {0, {}}
end
if a.owner ~= '' and redis.call('HGET', key, 'owner') ~= a.owner then return {0, {}} end
redis.call('ZREM', K.running, a.id)
redis.call('ZREM', K.waiting, a.id)
redis.call('DECRBY', K.bytes, redis.call('HGET', key, 'size') or 0)
local now = now_ms()
redis.call('HDEL', key, 'request')
redis.call('HSET', key, 'status', 'COMPLETED', 'finished_by', a.token, 'finished_ms', now, 'end_log', a.line)
for name, value in pairs(a.fields) do redis.call('HSET', key, name, value) end
if a.reporter ~= '' then
  redis.call('HSET', key, 'reporter', a.reporter, 'report_claims', 1)
  redis.call('ZADD', K.unreported, now + a.lease_ms, a.id)
end
redis.call('EXPIRE', key, a.retention_s)
redis.call('ZADD', K.finished, now, a.id)
redis.call('ZREMRANGEBYSCORE', K.finished, '-inf', now - a.retention_s * 1000)
local excess = redis.call('ZCARD', K.finished) - a.max_retained
local over = {}
if excess > 0 then over = redis.call('ZRANGE', K.finished, 0, excess - 1) end
redis.call('PUBLISH', a.channel, a.id)
return {1, over}
"""
)

# a: ids. Finished requests past FLUX_QUEUE_MAX_RETAINED, oldest first: their records go.
FORGET = _script(
    """
for _, id in ipairs(a.ids) do
  if redis.call('ZSCORE', K.finished, id) then
    redis.call('DEL', R[id])
    redis.call('ZREM', K.finished, id)
    redis.call('ZREM', K.unreported, id)
  end
end
return 0
"""
)

SCRIPTS = {
    "submit": SUBMIT,
    "claim": CLAIM,
    "heartbeat": HEARTBEAT,
    "hand_back": HAND_BACK,
    "progress": PROGRESS,
    "finish": FINISH,
    "forget": FORGET,
}
