"""The Redis queue's state changes (runners/front/redis_queue.py), one Lua script each, so that each
is atomic on the Redis server. Every script takes the key prefix as ``ARGV[1]`` and builds its keys
from it (hence no Redis Cluster: docs/fleet.md). Times are Redis's own clock (``TIME``), so the
replicas' clocks need not agree."""

LUA_HELPERS = """
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
local function requeue(p, id, line)
  local key = p .. 'req:' .. id
  redis.call('ZREM', p .. 'running', id)
  local seq = redis.call('HGET', key, 'seq')
  if not seq or redis.call('HGET', key, 'status') == 'COMPLETED' then return false end
  redis.call('ZADD', p .. 'waiting', seq, id)
  redis.call('HSET', key, 'status', 'IN_QUEUE', 'owner', '', 'worker_logs', '[]')
  append_log(key, line)
  redis.call('LPUSH', p .. 'wake', '1')
  return true
end
"""

# ARGV: prefix, id, max_length, max_bytes, size, log line, then field, value, ...
SUBMIT = """
local p, id = ARGV[1], ARGV[2]
if redis.call('ZCARD', p .. 'waiting') >= tonumber(ARGV[3]) then return -1 end
if tonumber(redis.call('GET', p .. 'bytes') or '0') + tonumber(ARGV[5]) > tonumber(ARGV[4]) then return -2 end
local key = p .. 'req:' .. id
local seq = redis.call('INCR', p .. 'seq')
redis.call('HSET', key, 'seq', seq, 'submitted_ms', now_ms(), 'status', 'IN_QUEUE', 'attempts', 0, 'owner', '',
  'size', ARGV[5], 'front_logs', '[' .. ARGV[6] .. ']', 'worker_logs', '[]', unpack(ARGV, 7))
redis.call('INCRBY', p .. 'bytes', ARGV[5])
redis.call('ZADD', p .. 'waiting', seq, id)
redis.call('LPUSH', p .. 'wake', '1')
redis.call('LTRIM', p .. 'wake', 0, 1023)
return redis.call('ZRANK', p .. 'waiting', id)
"""

# ARGV: prefix, owner, lease ms. The head of the line, now IN_PROGRESS under a lease (as fal's is once a
# runner takes it, even before its first step); its whole hash.
CLAIM = """
local p = ARGV[1]
while true do
  local head = redis.call('ZPOPMIN', p .. 'waiting')
  if #head == 0 then return false end
  local id = head[1]
  local key = p .. 'req:' .. id
  if redis.call('HGET', key, 'status') == 'IN_QUEUE' then
    redis.call('ZADD', p .. 'running', now_ms() + tonumber(ARGV[3]), id)
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HSET', key, 'owner', ARGV[2], 'status', 'IN_PROGRESS')
    return {id, redis.call('HGETALL', key)}
  end
end
"""

# ARGV: prefix, owner, lease ms, log line, now (unix s), reports wanted, report attempts, how many held,
# the ids held, then the ids this replica is reporting. One call per poll does all of a replica's
# upkeep:
# - renews its leases, and takes back a request re-queued while this replica was silent (Redis away
#   past the lease) that nobody has claimed since;
# - renews the claims of the reports (webhooks) it is delivering, and claims up to "reports wanted"
#   whose replica stopped renewing theirs (past "report attempts" claims, one is dropped instead);
# - finds the requests at the head of the line past their deadline: deadlines follow arrival (one
#   FLUX_REQUEST_TIMEOUT_S for the fleet), so the head is where they are.
# Answers the line's depth, the head's wait (ms), the live replicas, the held ids whose claim is gone
# (ended elsewhere, or claimed by another replica), the ids past their deadline, the reports this
# replica now delivers, and the reports dropped.
HEARTBEAT = """
local p, owner, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
redis.call('ZADD', p .. 'replicas', now, owner)
redis.call('ZREMRANGEBYSCORE', p .. 'replicas', '-inf', now - lease)
local held_end = 8 + tonumber(ARGV[8])
local lost = {}
for i = 9, held_end do
  local id = ARGV[i]
  local key = p .. 'req:' .. id
  if redis.call('ZSCORE', p .. 'running', id) and redis.call('HGET', key, 'owner') == owner then
    redis.call('ZADD', p .. 'running', 'XX', now + lease, id)
  elseif redis.call('ZSCORE', p .. 'waiting', id) then
    redis.call('ZREM', p .. 'waiting', id)
    redis.call('ZADD', p .. 'running', now + lease, id)
    redis.call('HSET', key, 'owner', owner, 'status', 'IN_PROGRESS')
    append_log(key, ARGV[4])
  else
    table.insert(lost, id)
  end
end
for i = held_end + 1, #ARGV do
  if redis.call('HGET', p .. 'req:' .. ARGV[i], 'reporter') == owner then
    redis.call('ZADD', p .. 'unreported', 'XX', now + lease, ARGV[i])
  end
end
local taken, dropped = {}, {}
if tonumber(ARGV[6]) > 0 then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'unreported', '-inf', now, 'LIMIT', 0, tonumber(ARGV[6]))) do
    local key = p .. 'req:' .. id
    if redis.call('EXISTS', key) == 0 then
      redis.call('ZREM', p .. 'unreported', id)  -- past its retention: nothing left to report
    elseif redis.call('HINCRBY', key, 'report_claims', 1) > tonumber(ARGV[7]) then
      redis.call('ZREM', p .. 'unreported', id)
      table.insert(dropped, id)
    else
      redis.call('ZADD', p .. 'unreported', now + lease, id)
      redis.call('HSET', key, 'reporter', owner)
      table.insert(taken, id)
    end
  end
end
local now_s = tonumber(ARGV[5])
local head = redis.call('ZRANGE', p .. 'waiting', 0, 15)
local late = {}
for _, id in ipairs(head) do
  local deadline = redis.call('HGET', p .. 'req:' .. id, 'deadline')
  if deadline and deadline ~= '' and tonumber(deadline) < now_s then table.insert(late, id) end
end
local oldest = 0
if #head > 0 then oldest = now - tonumber(redis.call('HGET', p .. 'req:' .. head[1], 'submitted_ms') or now) end
return {redis.call('ZCARD', p .. 'waiting'), oldest, redis.call('ZCARD', p .. 'replicas'), lost, late, taken, dropped}
"""

# ARGV: prefix, log line. Every request whose lease ran out goes back to its place in the line.
REQUEUE_EXPIRED = """
local p = ARGV[1]
local requeued = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'running', '-inf', now_ms(), 'LIMIT', 0, 100)) do
  if requeue(p, id, ARGV[2]) then requeued = requeued + 1 end
end
return requeued
"""

# ARGV: prefix, owner, log line, ids. A draining replica hands back what it cannot finish (the
# attempt it had does not count).
HAND_BACK = """
local p, owner = ARGV[1], ARGV[2]
for i = 4, #ARGV do
  local key = p .. 'req:' .. ARGV[i]
  if redis.call('HGET', key, 'owner') == owner and requeue(p, ARGV[i], ARGV[3]) then
    redis.call('HINCRBY', key, 'attempts', -1)
  end
end
return 0
"""

# ARGV: prefix, owner, then id, worker logs, ...: a started request's status and worker log lines.
PROGRESS = """
local p, owner = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  local key = p .. 'req:' .. ARGV[i]
  if redis.call('HGET', key, 'owner') == owner and redis.call('HGET', key, 'status') ~= 'COMPLETED' then
    redis.call('HSET', key, 'status', 'IN_PROGRESS', 'worker_logs', ARGV[i + 1])
  end
end
return 0
"""

# ARGV: prefix, id, token, owner ('' for anyone: a cancel), reporter, lease ms, retention s, max
# retained, log line, then field, value, ... (outcome or error, worker logs). 1 when this call (its
# token) finished it: the first finish wins, and a retry of the same call after a lost answer still
# sees its win. The winner (the reporter, unless '') holds the claim to report it (metrics, webhook)
# in ``unreported``, scored by when that claim runs out; it renews it with its heartbeat and removes
# it once reported, and any replica's heartbeat takes over a claim that ran out.
FINISH = """
local p, id, token = ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'req:' .. id
local status = redis.call('HGET', key, 'status')
if not status then return 0 end
if status == 'COMPLETED' then
  if redis.call('HGET', key, 'finished_by') == token then return 1 end
  return 0
end
if ARGV[4] ~= '' and redis.call('HGET', key, 'owner') ~= ARGV[4] then return 0 end
redis.call('ZREM', p .. 'running', id)
redis.call('ZREM', p .. 'waiting', id)
redis.call('DECRBY', p .. 'bytes', redis.call('HGET', key, 'size') or 0)
local now = now_ms()
redis.call('HDEL', key, 'request')
redis.call('HSET', key, 'status', 'COMPLETED', 'finished_by', token, 'finished_ms', now, unpack(ARGV, 10))
append_log(key, ARGV[9])
if ARGV[5] ~= '' then
  redis.call('HSET', key, 'reporter', ARGV[5], 'report_claims', 1)
  redis.call('ZADD', p .. 'unreported', now + tonumber(ARGV[6]), id)
end
local retention = tonumber(ARGV[7])
redis.call('EXPIRE', key, retention)
local finished = p .. 'finished'
redis.call('ZADD', finished, now, id)
redis.call('ZREMRANGEBYSCORE', finished, '-inf', now - retention * 1000)
local excess = redis.call('ZCARD', finished) - tonumber(ARGV[8])
if excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', finished, 0, excess - 1)) do
    redis.call('DEL', p .. 'req:' .. old)
    redis.call('ZREM', p .. 'unreported', old)
  end
  redis.call('ZREMRANGEBYRANK', finished, 0, excess - 1)
end
redis.call('PUBLISH', p .. 'done', id)
return 1
"""
