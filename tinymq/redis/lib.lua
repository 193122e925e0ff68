--[[ lib.lua: definitions shared by every tinymq script; the loader puts this text in
front of each script, so each one stays a single atomic EVALSHA.

KEYS[1] is the queue's prefix "tmq:{<name>}:". Every key a script touches starts with
it, so all of a queue's keys share one hash slot (Redis Cluster-safe).

Keys (after the prefix):
  ready:2 ready:1 ready:0  LIST  job ids, HIGH / MEDIUM / LOW; RPUSH new, LPOP to take,
                                 LPUSH to give back at the head
  delayed                  ZSET  id -> due time in ms, fractional (server clock): new delayed
                                 jobs and retries
  capped                   ZSET  the subset of `delayed` that max_delayed_jobs counts
                                 and may evict (new delayed jobs; never retries)
  job:<id>                 HASH  t type, p priority, b body (client JSON), r retries,
                                 e last error, c crash count,
                                 k enqueue token, x dead reason (only while dead)
  procs                    ZSET  process id -> lease expiry ms (the heartbeat table)
  inflight:<proc>          HASH  attempt "<fetch id>:<id>" -> state..type, state one of
                                 L live (buffered or running), X timed out and decided
                                 but still running (holds only its type slot),
                                 R returned after its deadline, decision not yet seen
  fetched                  HASH  proc -> JSON [fetch id, attempt, ...] (its last fetch,
                                 so a resent fetch returns the same attempts)
  limits                   HASH  type -> max concurrent attempts (absent: unlimited)
  running                  HASH  type -> attempts holding a slot (states L and X)
  parked:<p>:<type>        LIST  ids taken while their type was saturated, in order
  parkedn                  HASH  type -> parked jobs of that type (all levels)
  signal                   LIST  at most one "1": wakes one idle fetcher (BLPOP)
  dead                     ZSET  id -> time it died (ms); its hash stays, with x
  stats                    HASH  enqueued succeeded failed retried timed_out evicted
                                 outstanding (unfinished jobs, for join) parked:<p>

Invariants (after every script):
  * an unfinished job id is in exactly one of ready:*, parked:*, delayed, or as an L/R
    attempt in one inflight hash; a dead job is in `dead`; a finished one is nowhere
    (an X attempt beside it holds only its type slot);
  * running[t] = number of L and X attempts of type t over all inflight hashes;
  * stats.outstanding = number of unfinished jobs.
]]
local P = KEYS[1]
local READY = {[0] = P .. 'ready:0', [1] = P .. 'ready:1', [2] = P .. 'ready:2'}
local K_DELAYED = P .. 'delayed'
local K_CAPPED = P .. 'capped'
local K_PROCS = P .. 'procs'
local K_FETCHED = P .. 'fetched'
local K_LIMITS = P .. 'limits'
local K_RUNNING = P .. 'running'
local K_PARKEDN = P .. 'parkedn'
local K_SIGNAL = P .. 'signal'
local K_DEAD = P .. 'dead'
local K_STATS = P .. 'stats'
local REAP_PER_CALL = 2      -- dead processes reaped per call: bounded work
local PROMOTE_PER_CALL = 100 -- due delayed jobs promoted per call
local PARK_PER_CALL = 100    -- jobs parked per fetch before it stops looking

local now_us = 0 -- the server clock in microseconds, as of the last now_ms() call
local function now_ms()
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return math.floor(now_us / 1000)
end
local function exact_ms() return now_us / 1000 end -- after now_ms(): the same instant, in fractional ms

local function job_key(id) return P .. 'job:' .. id end
local function inflight_key(proc) return P .. 'inflight:' .. proc end
local function parked_key(p, t) return P .. 'parked:' .. p .. ':' .. t end

local function id_of(attempt)
  return string.sub(attempt, string.find(attempt, ':', 1, true) + 1)
end

-- counters are summed per call and written once at the end (flush_counts)
local counts = {}
local function count(name, n) counts[name] = (counts[name] or 0) + n end
local function flush_counts()
  for name, n in pairs(counts) do
    if n ~= 0 then redis.call('HINCRBY', K_STATS, name, n) end
  end
  counts = {}
end

local function signal()
  if redis.call('LLEN', K_SIGNAL) == 0 then redis.call('RPUSH', K_SIGNAL, '1') end
end

local function add_delayed(id, due)
  redis.call('ZADD', K_DELAYED, due, id)
  local first = redis.call('ZRANGE', K_DELAYED, 0, 0)
  if first[1] == id then signal() end -- a new earliest due time: an idle process re-arms its timer
end

local function unpark_one(t)
  for p = 2, 0, -1 do
    local id = redis.call('LPOP', parked_key(p, t))
    if id then
      redis.call('LPUSH', READY[p], id)
      if redis.call('HINCRBY', K_PARKEDN, t, -1) <= 0 then redis.call('HDEL', K_PARKEDN, t) end
      count('parked:' .. p, -1)
      signal()
      return true
    end
  end
  redis.call('HDEL', K_PARKEDN, t) -- a count without jobs: repair it
  return false
end

-- Slots freed are summed per type and written once (flush_released), before anything
-- in the same script admits jobs again.
local released = {}
local function release_slot(t) released[t] = (released[t] or 0) + 1 end
local function flush_released()
  for t, k in pairs(released) do
    if redis.call('HINCRBY', K_RUNNING, t, -k) <= 0 then redis.call('HDEL', K_RUNNING, t) end
    if redis.call('HEXISTS', K_PARKEDN, t) == 1 then
      for _ = 1, k do
        if not unpark_one(t) then break end
      end
    end
  end
  released = {}
end

local function job_dead(id, reason, err, retries, now)
  local jk = job_key(id)
  if err and err ~= '' then
    redis.call('HSET', jk, 'x', reason, 'r', retries, 'e', err)
  else
    redis.call('HSET', jk, 'x', reason, 'r', retries)
  end
  redis.call('ZADD', K_DEAD, now, id)
  count('failed', 1)
  count('outstanding', -1)
end

local function job_retry(id, retries, err, delay, now)
  local jk = job_key(id)
  redis.call('HSET', jk, 'r', retries, 'e', err)
  if delay <= 0 then
    redis.call('RPUSH', READY[tonumber(redis.call('HGET', jk, 'p'))], id)
    signal()
  else
    add_delayed(id, exact_ms() + delay)
  end
  count('retried', 1)
end

local function give_back(id)
  local p = redis.call('HGET', job_key(id), 'p')
  if p then
    redis.call('LPUSH', READY[tonumber(p)], id)
    signal()
  end
end

--[[ Settle ops. S, E and B take 2 ARGV entries (op, attempt); Y, Z, y and z take 6
(op, attempt, retries, delay ms, reason, error).
  S  success                          (L)    -> job deleted, slot freed
  Y  failed, retry after delay ms (fractional) (L) -> slot freed, job delayed (or ready)
  Z  failed for good, reason, error   (L)    -> slot freed, job dead
  y/z  the same, decided at the attempt's deadline while it may still run:
       (L) -> attempt becomes X and keeps its slot; (R) -> attempt removed
  E  a timed-out attempt returned     (X) -> removed, slot freed; (L) -> R, slot freed
  B  give back unstarted / cancelled  (L)    -> slot freed, job at the head of its level
An attempt not in the process's inflight hash (reaped, or settled already: a resend)
is stale and changes nothing. Returns the number of stale ops. ]]
local SHORT_OPS = {S = true, E = true, B = true}
local function settle(proc, argv, first, n, now)
  local ik = inflight_key(proc)
  local stale = 0
  local finished = {} -- keys of succeeded jobs: one DEL at the end
  local i = first
  for _ = 1, n do
    local op, attempt = argv[i], argv[i + 1]
    local v = redis.call('HGET', ik, attempt)
    local state = v and string.sub(v, 1, 1)
    local t = v and string.sub(v, 2)
    local id = id_of(attempt)
    if not v then
      stale = stale + 1
    elseif op == 'S' and state == 'L' then
      redis.call('HDEL', ik, attempt)
      release_slot(t)
      table.insert(finished, job_key(id))
      count('succeeded', 1)
      count('outstanding', -1)
    elseif (op == 'Y' or op == 'Z') and state == 'L' then
      redis.call('HDEL', ik, attempt)
      release_slot(t)
      if op == 'Y' then job_retry(id, argv[i + 2], argv[i + 5], tonumber(argv[i + 3]), now)
      else job_dead(id, argv[i + 4], argv[i + 5], argv[i + 2], now) end
    elseif (op == 'y' or op == 'z') and (state == 'L' or state == 'R') then
      if state == 'L' then redis.call('HSET', ik, attempt, 'X' .. t)
      else redis.call('HDEL', ik, attempt) end
      count('timed_out', 1)
      if op == 'y' then job_retry(id, argv[i + 2], argv[i + 5], tonumber(argv[i + 3]), now)
      else job_dead(id, argv[i + 4], argv[i + 5], argv[i + 2], now) end
    elseif op == 'E' and (state == 'X' or state == 'L') then
      if state == 'X' then redis.call('HDEL', ik, attempt)
      else redis.call('HSET', ik, attempt, 'R' .. t) end
      release_slot(t)
    elseif op == 'B' and state == 'L' then
      redis.call('HDEL', ik, attempt)
      release_slot(t)
      give_back(id)
    else
      stale = stale + 1 -- an op that does not fit the attempt's state: a resend
    end
    if SHORT_OPS[op] then i = i + 2 else i = i + 6 end
  end
  if #finished > 0 then redis.call('DEL', unpack(finished)) end
  flush_released()
  return stale
end

--[[ Reap one process whose lease expired: every attempt without a decision (L, R)
counts a crash and goes back to the head of its level, or dead ("crashed") past
max_crash; an X attempt only frees its slot. Appends {id, body, retries, error} of
each job that died to `crashed`. ]]
local function reap_proc(proc, now, max_crash, crashed)
  local ik = inflight_key(proc)
  local entries = redis.call('HGETALL', ik)
  for i = 1, #entries, 2 do
    local attempt, v = entries[i], entries[i + 1]
    local state, t = string.sub(v, 1, 1), string.sub(v, 2)
    if state ~= 'R' then release_slot(t) end
    if state ~= 'X' then
      local id = id_of(attempt)
      local jk = job_key(id)
      if redis.call('EXISTS', jk) == 1 then
        if redis.call('HINCRBY', jk, 'c', 1) > max_crash then
          local f = redis.call('HMGET', jk, 'b', 'r', 'e')
          job_dead(id, 'crashed', '', f[2] or '0', now)
          table.insert(crashed, {id, f[1], f[2] or '0', f[3] or ''})
        else
          give_back(id)
        end
      end
    end
  end
  redis.call('DEL', ik)
  redis.call('ZREM', K_PROCS, proc)
  redis.call('HDEL', K_FETCHED, proc)
  flush_released()
end

local function reap(now, max_crash, crashed)
  local expired = redis.call('ZRANGEBYSCORE', K_PROCS, '-inf', '(' .. now, 'LIMIT', 0, REAP_PER_CALL)
  for _, proc in ipairs(expired) do reap_proc(proc, now, max_crash, crashed) end
  return #expired
end

local function next_due() -- the earliest due time as text (a Lua number would be truncated), or -1
  local first = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  if first[2] then return first[2] end
  return -1
end

local function ready_left()
  return redis.call('LLEN', READY[2]) + redis.call('LLEN', READY[1]) + redis.call('LLEN', READY[0])
end
