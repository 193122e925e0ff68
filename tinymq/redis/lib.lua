--[[ lib.lua: definitions shared by every tinymq script; the loader puts this header and
the definitions a script uses in front of it (_scripts.py's _script_text), so each one stays
a single atomic EVALSHA. So every top-level statement here is a `local` definition, which
runs from its `local` line to the next one.

KEYS[1] is the queue's prefix "tmq:{<name>}:". Every key a script touches starts with
it, so all of a queue's keys share one hash slot (Redis Cluster-safe).

Keys (after the prefix):
  ready:2 ready:1 ready:0  LIST  job ids, HIGH / MEDIUM / LOW; RPUSH new, LPOP to take,
                                 LPUSH to give back at the head
  delayed                  ZSET  id -> due time in ms, fractional (server clock): new delayed
                                 jobs and retries; and the jobs owed a place that wait for room
                                 in the buffer (due: see promote_due, to_tail, make_room)
  capped                   ZSET  the subset of `delayed` that max_delayed_jobs counts
                                 and may evict (new delayed jobs not yet due; never retries;
                                 enqueue drops the due ones before it evicts)
  job:<id>                 HASH  t type, p priority, b body (client JSON), r retries,
                                 e last error, c crash count, o FIFO order (from `seq`,
                                 set when it goes to the tail of a ready list),
                                 k enqueue token ('' once counted in stats.outstanding
                                 by fetch, cancel or requeue_dead: a hash another
                                 program wrote has none), x dead reason (only while dead),
                                 u the replaced:<...> key of the dead job of its id that
                                 its enqueue replaced, w the same once a take-back marked
                                 its attempt (see bring_back_replaced)
  replaced:<token>|<id>    HASH  a dead job's hash that the enqueue <token> replaced (its id
                                 enqueued again), with d the time it died: kept
                                 REPLACED_KEPT, or until the end of a taken-back attempt
  cancelled:<proc>|<attempt> HASH the job hash of an attempt that q.cancel() marked (the
                                 attempt is in cancels:<proc>), moved there from job:<id> by
                                 cancel, so the id is free for a new job at once; whatever
                                 ends the attempt (settle, reap, release) reads and deletes it
                                 here, never job:<id>, which may be that new job's
  seq                      STRING the last FIFO order handed out
  clock                    HASH  t server time (ms) of the last lease-keeping call (fetch,
                                 beat, reap), b the buffer_size the last fetch sent (see cap),
                                 g the gap (ms) past which that is an outage
                                 (see mind_the_gap), e server time (ms) the queue's state
                                 began, or of an earlier registration in it (see renew)
  token:<token>            STRING the JSON reply that a resend of the call <token> (an
                                 enqueue, a cancel, a schedule tick; a release: its token is
                                 release|<proc>) gets, kept TOKEN_KEPT: a resend is
                                 recognised even after its jobs finished
  procs                    ZSET  process id -> lease expiry ms (the heartbeat table); an id
                                 with "~" is a reporter (see register_reporter): registered
                                 by a cancel, an evicting enqueue or a schedule tick of a
                                 process without a lease, it holds no attempts, only the
                                 rows in reporting:<id>
  inflight:<proc>          HASH  attempt "<fetch id>:<id>" -> state..type, state one of
                                 L live (buffered or running), X timed out and decided
                                 but still running (holds only its type slot),
                                 R returned after its deadline, decision not yet seen
  fetched                  HASH  proc -> JSON [fetch id, [attempt...], [crashed...], [overruled...] ]
                                 of its last fetch: a resent fetch returns the same
  beaten                   HASH  proc -> JSON [beat id, crashed rows] of its last beat (a
                                 resent beat returns the same)
  limits                   HASH  type -> max concurrent attempts (absent: unlimited)
  running                  HASH  type -> attempts holding a slot (states L and X)
  parked:<p>:<type>        LIST  ids taken while their type was saturated (slots or rate),
                                 in order
  parkedn                  HASH  type -> parked jobs of that type (all levels)
  ratelimits               HASH  type -> "max_starts:per ms" (absent: no rate limit)
  rate:<type>              ZSET  "<proc>|<attempt>" -> end of the window its start counts in
                                 (ms): +inf from hand-out until its start is reported (op T),
                                 then (server time of that report, or of its outcome, or of
                                 its reap) + per; removed by a give-back (B) before its
                                 start (it never started). Entries ending at or before now
                                 are dropped.
  rateopen                 ZSET  type -> when its rate window next opens (ms), for types with
                                 jobs parked for the rate and a known opening
  signal                   LIST  at most one "1": wakes one idle fetcher (BLPOP)
  wake:<proc>              LIST  at most one "1": wakes proc's idle fetcher (a cancel marked
                                 one of its attempts; its stop); deleted with proc's lease
  reporting:<proc>         HASH  row key -> JSON row: rows handed to proc to report (a
                                 reply's crashed; a waiting job its cancel removed; the
                                 delayed jobs its enqueue or schedule tick evicted; the
                                 jobs it ended for good itself) that it has not
                                 acknowledged yet (op A), each under a key of its own
                                 (see handed); a reap hands them, keys and all, to the
                                 reaper, a release to `reports`
  dead                     ZSET  id -> time it died (ms); its hash stays, with x
  cancels:<proc>           SET   attempts of proc that q.cancel() marked (their job hash is
                                 cancelled:<proc>|<attempt>): proc hears of them in every fetch
                                 and beat reply until the attempt ends, which ends its job as
                                 cancelled
  gone                     LIST  ids of jobs whose hash Redis lost while the id waited (see
                                 job_gone), met by a call whose reply has no room for them:
                                 the next beat hands them out, for its process to log
  reports                  LIST  JSON rows {id, body, retries, error, reason, key, 1} of
                                 jobs that ended while no caller could report them (a
                                 settle or release call): the next beat (with a beat id)
                                 hands them out
  stats                    HASH  enqueued succeeded failed retried timed_out evicted
                                 cancelled outstanding (unfinished jobs, for join) parked:<p>

Invariants (after every script):
  * the ready and parked jobs are at most buffer_size (cap), or no more than before a call
    when calls without a cap left more (before any fetch kept one);
  * an unfinished job is in exactly one of ready:*, parked:*, delayed, or as an L/R
    attempt in one inflight hash; a dead job is in `dead`; a finished one is nowhere
    (an X attempt beside it holds only its type slot);
  * a job's hash is job:<id>, except that of a marked attempt: cancelled:<proc>|<attempt>.
    So the ids of the jobs with a job:<id> hash (unfinished or dead) are unique, and a
    marked attempt's id may also be a newer job's. Marks are on L and R attempts only;
  * running[t] = number of L and X attempts of type t over all inflight hashes;
  * stats.outstanding = number of unfinished jobs (a job whose hash another program wrote,
    without enqueue's token k, from the first fetch or cancel that sees it: see fetch.lua)
    + number of rows waiting to be reported
    (in reporting:*, `reports`, or a call's `ended`) that end in 1: a job that ends for good
    (dead, cancelled, crashed, evicted) while its failure callbacks are still to run counts
    as unfinished, for join(), until its row is acknowledged (op A) or handed out by a
    reply that nothing keeps (reported_by_reply). See held_row.
  * a rate-limited type is handed out only while rate:<type> holds fewer than max_starts
    live entries; each attempt's entry ends no sooner than per after it started (its
    start is reported after it happened, its reap or outcome comes after it too).
]]
local P = KEYS[1]
local READY = {[0] = P .. 'ready:0', [1] = P .. 'ready:1', [2] = P .. 'ready:2'}
-- The level (0, 1 or 2: READY's key) of a job hash's p. Another program may write any p:
-- one that is no level reads as 1, so that no script fails on it (a script that fails
-- half-way keeps its writes up to there: a job taken out of a list would be lost, and a
-- reap failing on it would fail every call); fetch fails such a job for good (see foreign).
local function level_of(p)
  p = tonumber(p)
  if p == 0 or p == 1 or p == 2 then return p end
  return 1
end
local K_DELAYED = P .. 'delayed'
local K_CAPPED = P .. 'capped'
local K_PROCS = P .. 'procs'
local K_FETCHED = P .. 'fetched'
local K_BEATEN = P .. 'beaten'
local K_LIMITS = P .. 'limits'
local K_RUNNING = P .. 'running'
local K_PARKEDN = P .. 'parkedn'
local K_SIGNAL = P .. 'signal'
local K_DEAD = P .. 'dead'
local K_STATS = P .. 'stats'
local K_SEQ = P .. 'seq'
local K_CLOCK = P .. 'clock'
local K_RATE_LIMITS = P .. 'ratelimits'
local K_RATE_OPEN = P .. 'rateopen'
local K_REPORTS = P .. 'reports'
local K_GONE = P .. 'gone'
local REAP_PER_CALL = 2      -- dead processes reaped per call: bounded work
local PROMOTE_PER_CALL = 100 -- due delayed jobs promoted per call
local PARK_PER_CALL = 100    -- jobs parked per fetch before it stops looking
local TIE_SPAN = 0.0005      -- ms: due times closer than this are one instant (the clock has µs)
local CHUNK = 1000 -- arguments per command built with unpack: well under Lua's unpack limit

--[[ A full Redis (maxmemory reached, maxmemory-policy noeviction). Redis refuses a command
that may add memory (a "deny-oom" one: HSET, RPUSH, ZADD, INCRBY, ...) only while the script
that calls it has called no write command yet; after one, it lets every write through, so as
not to stop a script halfway (Redis 6.2 and 7 alike: script flags, which say it up front,
are Redis 7's only). So the first statement of every script that writes is one of these two,
and says what the script does when Redis is full:
  refuse_if_full()  a script that takes new jobs (enqueue, schedule_tick): it fails with
                    Redis's OOM error, having written nothing;
  even_if_full()    every other one (fetch, settle, beat, release, cancel, ...): it moves,
                    ends or deletes jobs, and a full Redis must still drain.
Scripts that only read (stats, status) call neither. K_FULL is never written. ]]
local K_FULL = P .. 'full'
local function refuse_if_full()
  redis.call('SETRANGE', K_FULL, 0, '') -- deny-oom, and writes nothing (an empty range)
end
local function even_if_full()
  redis.call('DEL', K_FULL) -- a write Redis never refuses for memory (with nothing to delete)
end

local now_us = 0 -- the server clock in microseconds, as of the last now_ms() call
local function now_ms()
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return math.floor(now_us / 1000)
end
local function exact_ms() return now_us / 1000 end -- after now_ms(): the same instant, in fractional ms

local function job_key(id) return P .. 'job:' .. id end
-- The fields of the job hash at `jk`, and whether `jk` holds a value of another kind: another
-- program wrote one there (a string, a list), which makes that job lost, as one whose hash is
-- gone is (job_gone), instead of failing the call (WRONGTYPE) that meets its id: every fetch or
-- enqueue after it would fail, holding up every job of the queue.
local function job_fields(jk, ...)
  local f = redis.pcall('HMGET', jk, ...)
  if f.err then return {}, true end
  return f, false
end
local function is_job(jk) return redis.call('TYPE', jk).ok == 'hash' end
local function inflight_key(proc) return P .. 'inflight:' .. proc end
local function parked_key(p, t) return P .. 'parked:' .. p .. ':' .. t end
local function rate_key(t) return P .. 'rate:' .. t end
local function rate_member(proc, attempt) return proc .. '|' .. attempt end

local function cancels_key(proc) return P .. 'cancels:' .. proc end
local function marked_key(proc, attempt) return P .. 'cancelled:' .. proc .. '|' .. attempt end
local function wake_key(proc) return P .. 'wake:' .. proc end -- the list an idle proc also blocks on
local function reporting_key(proc) return P .. 'reporting:' .. proc end

--[[ A call's token is kept, with what a resend of it gets back, for TOKEN_KEPT: far longer
than a client resends (its socket timeouts, twice), so that a resend is recognised even when
its jobs have finished since. One key per token, expiring by itself: one GET to look, one SET
to keep. ]]
local TOKEN_KEPT = 60000 -- ms
local function token_key(token) return P .. 'token:' .. token end
local function kept_reply(token) return redis.call('GET', token_key(token)) end -- its JSON, or false
local function keep_reply(token, reply)
  redis.call('SET', token_key(token), cjson.encode(reply), 'PX', TOKEN_KEPT)
end

local function id_of(attempt)
  return string.sub(attempt, string.find(attempt, ':', 1, true) + 1)
end

-- counters are summed per call and written once at the end (flush_counts)
local counts = {}
local function count(name, n) counts[name] = (counts[name] or 0) + n end

--[[ A job whose hash (job:<id>) Redis lost while its id waited in a ready list, the delayed
set, a parked list, or as an attempt in flight: evicted under a maxmemory-policy other than
noeviction, or deleted by another program. Its data is gone: it can neither run nor be
handed to a failure callback. The caller has taken the id out of where it was; job_gone counts
the job finished, so that join() does not wait for it for ever (it was counted unfinished when
enqueue, requeue_dead, or the first fetch or cancel that saw another program's hash counted
it; a stats hash lost with it restarts the count, whose floor is 0: flush_counts), and names
it for a process to log: fetch's and beat's replies carry this call's ids (gone_ids), every other
call leaves them in `gone` (flush_counts) for the next beat. ]]
local gone = {} -- ids of the jobs this call found gone, in order
local function job_gone(id)
  table.insert(gone, id)
  count('outstanding', -1)
end
local GONE_PER_CALL = 100 -- ids from `gone` handed out per beat
-- The ids this call found gone, with (`waited`: a beat) those that waited in `gone`.
local function gone_ids(waited)
  local ids = gone
  gone = {}
  if waited and redis.call('LLEN', K_GONE) > 0 then
    for _, id in ipairs(redis.call('LPOP', K_GONE, GONE_PER_CALL)) do table.insert(ids, id) end
  end
  return ids
end

-- outstanding never goes below 0: lower, jobs ended that no script counted (a stats hash
-- deleted, or restored apart from the jobs), and 0 is the truest figure left. The gone ids
-- that no reply of the call carries (gone_ids) wait in `gone` for the next beat.
local function flush_counts()
  for name, n in pairs(counts) do
    if n ~= 0 and redis.call('HINCRBY', K_STATS, name, n) < 0 and name == 'outstanding' then
      redis.call('HSET', K_STATS, name, 0)
    end
  end
  counts = {}
  for from = 1, #gone, CHUNK do
    redis.call('RPUSH', K_GONE, unpack(gone, from, math.min(from + CHUNK - 1, #gone)))
  end
  gone = {}
end

local function signal()
  if redis.call('LLEN', K_SIGNAL) == 0 then redis.call('RPUSH', K_SIGNAL, '1') end
end

--[[ Rate limits: a sliding window of starts per type, on the server clock. An attempt of a
rate-limited type enters rate:<type> when it is handed out (ending at +inf: it may start
any moment) and its end becomes known when it has started for sure (rate_started). ]]
local rate_limits = {} -- type -> {max_starts, per ms} or false, read once per call
local function rate_limit_of(t)
  local known = rate_limits[t]
  if known == nil then
    local v = redis.call('HGET', K_RATE_LIMITS, t)
    if v then
      local sep = string.find(v, ':', 1, true)
      known = {tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))}
    else
      known = false
    end
    rate_limits[t] = known
  end
  return known
end

-- Starts of t that may still be handed out now (math.huge without a rate limit).
local function rate_room(t)
  local limit = rate_limit_of(t)
  if not limit then return math.huge end
  local k = rate_key(t)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', exact_ms()) -- windows that ended
  return limit[1] - redis.call('ZCARD', k)
end

-- t has jobs parked for its rate: note when its window next opens, if an end is known
-- yet (else the first start reported calls this again).
local function rate_wait(t)
  local first = redis.call('ZRANGE', rate_key(t), 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) ~= math.huge then
    redis.call('ZADD', K_RATE_OPEN, 'LT', first[2], t)
    if redis.call('ZRANGE', K_RATE_OPEN, 0, 0)[1] == t then signal() end -- idle processes re-arm their timer
  end
end

-- An attempt of t handed out to proc has started by now (reported, settled or reaped):
-- its start counts until per after now. A later report never extends it (LT).
local function rate_started(t, proc, attempt)
  local limit = rate_limit_of(t)
  if not limit then return end
  local ends = exact_ms() + limit[2]
  if redis.call('ZADD', rate_key(t), 'XX', 'LT', 'CH', ends, rate_member(proc, attempt)) == 1
      and redis.call('HEXISTS', K_PARKEDN, t) == 1 then
    rate_wait(t)
  end
end

-- An L attempt of t that proc gives back (op B). One whose entry still ends at +inf never
-- started (a started attempt of a rate-limited type reports its start, T, before any other
-- op): its entry goes, it counts no start, and its job is handed out again at once, not a
-- window later. One that started (stop() cancelled it while it ran) ends as rate_started says.
local function rate_given_back(t, proc, attempt)
  if not rate_limit_of(t) then return end
  local k, member = rate_key(t), rate_member(proc, attempt)
  local score = redis.call('ZSCORE', k, member)
  if score == 'inf' or score == '+inf' then
    redis.call('ZREM', k, member)
  else
    rate_started(t, proc, attempt)
  end
end

--[[ FIFO among equal due times. A ZSET orders equal scores by member (the id), so a job
due at the same instant as others already there is placed just after the last of them:
one ulp of the double later (a quarter of a µs at today's times in ms). Ties come from
one call (enqueue_many, or retries settled together), so the ones this call placed are
remembered; ties with earlier calls are found in the ZSET. Returns the score to use. ]]
local placed = {} -- due time asked -> the score the last job due then got in this call
local function after_ties(due)
  local last = placed[due]
  if not last then
    local top = redis.call('ZREVRANGEBYSCORE', K_DELAYED, due + TIE_SPAN, due, 'LIMIT', 0, 1, 'WITHSCORES')
    last = top[2] and tonumber(top[2])
  end
  local score = due
  if last then
    local _, e = math.frexp(last)
    score = last + math.ldexp(1, e - 53) -- the next double after last
  end
  placed[due] = score
  return score
end

-- Returns the score it was given (after_ties); `capped` jobs use the same one. The id of a job
-- that waits nowhere yet (a new one, a retry) found waiting already is a lost job's (job_gone),
-- whose hash Redis lost before this one took the id: the two ids become one member, the lost
-- job's dropped (ZADD's reply says so: no look of its own at each id).
local function add_delayed(id, due)
  due = after_ties(due)
  if redis.call('ZADD', K_DELAYED, due, id) == 0 then job_gone(id) end
  local first = redis.call('ZRANGE', K_DELAYED, 0, 0)
  if first[1] == id then signal() end -- a new earliest due time: an idle process re-arms its timer
  return due
end

-- FIFO orders for n jobs going to the tail of a ready list: the first of n consecutive ones
local function new_orders(n) return redis.call('INCRBY', K_SEQ, n) - n + 1 end

--[[ buffer_size over a broker: the ready jobs (the ready lists, and the parked lines that
the stats fields parked:<p> count) never go past it in a script call that moves jobs in. A
job owed a place that finds no room waits for it in `delayed`, due (see promote_due), and
enqueue counts it as ready (QueueFull). Scripts called with the cap (enqueue, fetch, stats,
schedule_tick) use theirs, and fetch keeps it in the clock hash (b) for the others (settle,
beat, reap, release, cancel, requeue_dead); until a fetch kept one, they have none. ]]
local buffer_cap = nil
local function cap()
  if not buffer_cap then buffer_cap = tonumber(redis.call('HGET', K_CLOCK, 'b')) or math.huge end
  return buffer_cap
end
local function ready_left()
  return redis.call('LLEN', READY[2]) + redis.call('LLEN', READY[1]) + redis.call('LLEN', READY[0])
end
local to_head = {[0] = {}, [1] = {}, [2] = {}} -- (see flush_head)
-- What buffer_size caps: ready and parked jobs, with this call's parkings and the jobs it
-- gathered for a head (flush_head) counted already.
local function ready_count()
  local s = redis.call('HMGET', K_STATS, 'parked:0', 'parked:1', 'parked:2')
  local n = ready_left()
  for p = 0, 2 do n = n + (tonumber(s[p + 1]) or 0) + (counts['parked:' .. p] or 0) + #to_head[p] end
  return n
end

--[[ Due delayed jobs (and retries) take their FIFO place at the tail of their level when
they come due, ahead of any job put there later. Only a script call moves them, so every
call that appends to a ready tail (enqueue, a retry without delay, requeue_dead) and every
fetch first promotes the jobs due by now: a job put at a tail never goes ahead of one
that was due before it. Bounded: at most PROMOTE_PER_CALL per script call, the earliest
due first, and only as many as the buffer has room for (cap); the rest wait in `delayed`
(due_waiting) for the next call, and enqueue's buffer check counts them as ready all the
same. The calls that make room move them in themselves: a fetch promotes again after it
took jobs (and its next due time leaves out due jobs that have no room, so no timer polls
for them), a cancel after it removed a waiting job. Other calls (settle, beat, reap,
release) put jobs only at a head, where the jobs given back were queued before anything
still waiting (see make_room). ]]
local promoted = nil -- how many this call promoted (nil: none looked)
local due_waiting = false -- jobs due by now that promote_due left in `delayed` (room, or its bound)
local function promote_due()
  if promoted and not due_waiting then return end -- (a second look finds no more, unless room freed)
  promoted = promoted or 0
  local first = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES') -- (cheaper than the range below,
  if not first[2] or tonumber(first[2]) > exact_ms() then -- which formats now as an argument)
    due_waiting = false -- none due: the usual case, one cheap look
    return
  end
  local room = cap() - ready_count()
  while room > 0 and promoted < PROMOTE_PER_CALL do
    local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', exact_ms(), 'LIMIT', 0,
                           math.min(room, PROMOTE_PER_CALL - promoted))
    if #due == 0 then break end
    promoted = promoted + #due
    local order = new_orders(#due)
    for k, id in ipairs(due) do
      redis.call('ZREM', K_DELAYED, id)
      redis.call('ZREM', K_CAPPED, id)
      local jk = job_key(id)
      local p = job_fields(jk, 'p')[1]
      if p then
        redis.call('HSET', jk, 'o', order + k - 1)
        redis.call('RPUSH', READY[level_of(p)], id)
        room = room - 1
      else
        job_gone(id) -- (it took no room: the next due job takes its place)
      end
    end
  end
  first = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  due_waiting = first[2] ~= nil and tonumber(first[2]) <= exact_ms()
end

-- Due jobs not promoted yet (no room, or beyond this call's PROMOTE_PER_CALL): ready all the
-- same. After promote_due at the same instant (exact_ms), which says whether it left any.
local function due_left()
  if promoted and not due_waiting then return 0 end
  return redis.call('ZCOUNT', K_DELAYED, '-inf', exact_ms())
end

-- An accepted job going to the tail of its level (a retry without delay, a dead job
-- requeued): there while the buffer has room and no due job waits for it, else it waits for
-- room in `delayed`, due now, behind the due jobs waiting (promote_due moves it in its turn).
-- True when it went in.
local function to_tail(id, p)
  promote_due() -- (jobs due by now go ahead of it)
  if not due_waiting and ready_count() < cap() then
    redis.call('HSET', job_key(id), 'o', new_orders(1))
    redis.call('RPUSH', READY[p], id)
    return true
  end
  add_delayed(id, exact_ms())
  due_waiting = true -- (a later look in this call must see it)
  return false
end

--[[ Jobs given back to the head of their level (reaped, released, given back, unparked)
are gathered per level and pushed once, at flush_head, in their FIFO order (field o):
one call may give back many, in any order (a hash's order, ops' order), and they must
come out as they went in, ahead of what was behind them. Every script that gives back
calls flush_head before it takes jobs or returns. ]]
local given = {} -- the ids given back (id -> level) since make_room
local given_back = 0 -- how many
local function head_later(id, p) table.insert(to_head[p], id) end
local function order_of(id) return tonumber(job_fields(job_key(id), 'o')[1]) or math.huge end

--[[ Jobs given back (by a stopping process, a buffered job that waited too long, a reaped
process's attempts) keep their place at the head of their level, and the buffer its cap: when
they take it past buffer_size, as many of the jobs last in hand-out order (the tails of the
lowest levels) wait for room instead, at most as many as were given back. They wait in
`delayed` scored by their FIFO order (o), which is below any due time: first in the line for
room, in the order they were queued, and promote_due puts each back at the tail of its level,
where it was, before any job enqueued later (enqueue counts them as ready: QueueFull). A tail
job of a type with parked jobs stays (it may be the one a free slot of its type waits for:
see unpark_one), and the next level's tail is looked at instead; when those do not make room
enough, the jobs given back wait themselves, the last in hand-out order first (each left its
slot to the parked job let out for it, if any). Work: a few reads per job that waits. ]]
local function wait_for_room(id)
  local o = tonumber(job_fields(job_key(id), 'o')[1]) or 0 -- (another program's hash: first)
  redis.call('ZADD', K_DELAYED, o, id)
  due_waiting = true -- (a later look in this call must see it)
end
local function make_room()
  local over = math.min(ready_count() - cap(), given_back)
  local back = given
  given, given_back = {}, 0
  local p = 0
  while over > 0 and p <= 2 do
    local id = redis.call('LINDEX', READY[p], -1)
    local t = id and job_fields(job_key(id), 't')[1]
    if not id then
      p = p + 1
    elseif back[id] or not t or redis.call('HEXISTS', K_PARKEDN, t) == 0 then
      redis.call('RPOP', READY[p])
      if is_job(job_key(id)) then wait_for_room(id) else job_gone(id) end
      over = over - 1
    else
      p = p + 1
    end
  end
  for level = 0, 2 do
    if over <= 0 then break end
    local ids, order = {}, {}
    for id, q in pairs(back) do
      if q == level then
        table.insert(ids, id)
        order[id] = order_of(id)
      end
    end
    table.sort(ids, function(a, b) return order[a] > order[b] end)
    for _, id in ipairs(ids) do
      if over <= 0 then break end
      if redis.call('LREM', READY[level], 1, id) == 1 then -- (near the head: given back)
        wait_for_room(id)
        over = over - 1
      end
    end
  end
end

-- quiet: no signal (fetch takes first, and signals if it left ready jobs behind: an idle
-- process woken for the jobs the same call takes would find nothing, again and again while
-- a busy process holds every slot of their type).
local function flush_head(quiet)
  for p = 0, 2 do
    local ids = to_head[p]
    if #ids > 0 then
      local order = {}
      for _, id in ipairs(ids) do order[id] = order_of(id) end
      table.sort(ids, function(a, b) return order[a] < order[b] end)
      for k = #ids, 1, -1 do redis.call('LPUSH', READY[p], ids[k]) end
      to_head[p] = {}
      if not quiet then signal() end
    end
  end
  if given_back > 0 then make_room() end
end

-- Let out the first job parked for t (the highest level first): false when none is left. A
-- parked id whose hash is gone (job_gone) is dropped, and the next one let out in its place:
-- it must not take the slot that frees for it.
local function unpark_one(t)
  local p = 2
  while p >= 0 do
    local id = redis.call('LPOP', parked_key(p, t))
    if id then
      if redis.call('HINCRBY', K_PARKEDN, t, -1) <= 0 then redis.call('HDEL', K_PARKEDN, t) end
      count('parked:' .. p, -1)
      if is_job(job_key(id)) then
        head_later(id, p)
        return true
      end
      job_gone(id)
    else
      p = p - 1
    end
  end
  redis.call('HDEL', K_PARKEDN, t) -- a count without jobs: repair it
  return false
end

-- Let out jobs of t parked beside free slots: its limit (nil: none) less its running
-- attempts, within the room in its rate window, at most `most`. Returns how many.
local function unpark_into_free_slots(t, limit, most)
  if redis.call('HEXISTS', K_PARKEDN, t) == 0 then return 0 end
  local running = tonumber(redis.call('HGET', K_RUNNING, t)) or 0
  local free = math.min((limit or math.huge) - running, rate_room(t), most)
  local n = 0
  while n < free and redis.call('HEXISTS', K_PARKEDN, t) == 1 and unpark_one(t) do n = n + 1 end
  return n
end

-- Slots freed are summed per type and written once (flush_released), before anything
-- in the same script admits jobs again.
local released = {}
local function release_slot(t) released[t] = (released[t] or 0) + 1 end
local function flush_released()
  for t, k in pairs(released) do
    if redis.call('HINCRBY', K_RUNNING, t, -k) <= 0 then redis.call('HDEL', K_RUNNING, t) end
    if redis.call('HEXISTS', K_PARKEDN, t) == 1 then
      for _ = 1, math.min(k, rate_room(t)) do -- (jobs waiting for the rate would park again)
        if not unpark_one(t) then break end
      end
    end
  end
  released = {}
end

--[[ A row to report: {id, body, retries, error, reason, key, 1}. Every job ended for good
whose failure callbacks are still to run is reported by one, and counts as unfinished
(stats.outstanding, for join: docs/api.md, callbacks run before a job counts as finished) until
the row is acknowledged (op A, see handed) or handed out by a reply that nothing keeps
(reported_by_reply): the scripts that end it count it finished no sooner. The 1 says so
wherever the row goes (reporting:<proc>, `reports`, a reaper's reply). The key is false
until handed gives it one (a nil would cut the row short in a reply, a JSON null would
come back truthy). ]]
local function held_row(id, body, retries, err, reason)
  return {id, body or '', retries or '0', err or '', reason, false, 1}
end
local function reported_by_reply(rows) -- rows a reply hands out that nothing keeps
  for _, row in ipairs(rows) do
    if row[7] == 1 then count('outstanding', -1) end -- no A will come: finished as it is reported
  end
end

local function job_dead(id, reason, err, retries, now) -- (unfinished until its held_row is reported)
  local jk = job_key(id)
  if err and err ~= '' then
    redis.call('HSET', jk, 'x', reason, 'r', retries, 'e', err)
  else
    redis.call('HSET', jk, 'x', reason, 'r', retries)
  end
  redis.call('ZADD', K_DEAD, now, id)
  count('failed', 1)
end

local function job_retry(id, retries, err, delay, now)
  local jk = job_key(id)
  if not is_job(jk) then return job_gone(id) end -- (its hash would be written anew, half)
  count('retried', 1)
  redis.call('HSET', jk, 'r', retries, 'e', err)
  if delay <= 0 then
    if to_tail(id, level_of(redis.call('HGET', jk, 'p'))) then signal() end -- (else it waits for room)
  else
    add_delayed(id, exact_ms() + delay)
  end
end

--[[ Jobs this call ended as cancelled whose cancellation nobody reported yet (the attempt
ended on its own, or with its process): held rows (held_row) that the caller's reply
carries (hand_out_ended), or that wait in `reports` (keep_ended). Either way the job counts
as unfinished until its row is reported: end_cancelled never counts it finished. Without
`report` the caller made the row itself (keep_report). ]]
local ended = {}

--[[ A job enqueued with a dead job's id replaces it; the dead job's hash is kept aside
(replaced:<token>|<id>, named by the new job's u) for a while, in case the new job is taken
back: an aenqueue cancelled just as its job got in (cancel.lua with take_back). Then the dead
job comes back as it was, as a SQLite store's undo_save brings back its row: at once for a
waiting job, at the end of its attempt (w) for a leased one. Not when a newer job has the id. ]]
local function bring_back_replaced(kept, id)
  local jk = job_key(id)
  if redis.call('EXISTS', jk) == 1 then -- (a newer job has the id: it replaced the dead one for good)
    redis.call('DEL', kept)
    return
  end
  if redis.call('EXISTS', kept) == 0 then return end -- (kept no longer: see enqueue_jobs)
  local died = redis.call('HGET', kept, 'd')
  redis.call('HDEL', kept, 'd')
  redis.call('RENAME', kept, jk)
  redis.call('PERSIST', jk)
  redis.call('ZADD', K_DEAD, died, id)
end

local function end_cancelled(jk, id, report) -- jk: the job's hash (job:<id>, or a marked attempt's)
  local f = redis.call('HMGET', jk, 'b', 'r', 'e', 'w')
  if report then
    table.insert(ended, held_row(id, f[1], f[2], f[3], 'cancelled'))
  end
  redis.call('DEL', jk)
  count('cancelled', 1)
  if f[4] then bring_back_replaced(f[4], id) end -- (a taken-back job: the dead job it replaced)
end
local REPORTS_PER_CALL = 100 -- rows from `reports` handed out per beat
local function hand_out_ended(rows) -- appends this call's rows to report to `rows` (a reply's crashed)
  for _, row in ipairs(ended) do table.insert(rows, row) end
  ended = {}
end
local function hand_out_reports(rows) -- and those that waited (beat only: fetches stay lean)
  hand_out_ended(rows)
  if redis.call('LLEN', K_REPORTS) > 0 then
    for _, text in ipairs(redis.call('LPOP', K_REPORTS, REPORTS_PER_CALL)) do
      table.insert(rows, cjson.decode(text))
    end
  end
end
local function keep_ended() -- for callers whose reply carries no rows
  for _, row in ipairs(ended) do redis.call('RPUSH', K_REPORTS, cjson.encode(row)) end
  ended = {}
end

--[[ Rows a reply hands to proc to report (its crashed) also wait in reporting:<proc>, under
a field of their own (the row's key), until proc acknowledges them (op A) after its failure
callbacks ran. A proc that dies first leaves them to drop_proc, which hands them, keys
and all, to whoever reaps it: every row is reported at least once (twice when proc
reported it but died before the A reached Redis), never lost with the process that was to
report it. A row's key is made once, when it is first handed, and is unique: two rows of
one id (a job cancelled, enqueued again and cancelled again) never share a field.
A row: {id, body, retries, error, reason, key, 1} (see held_row); its 1 holds
stats.outstanding until the A, which counts the job finished. ]]
local function handed(proc, rows, call, keys) -- call: the handing call's id; keys: given ones
  if #rows == 0 then return end
  local fields = {}
  for i, row in ipairs(rows) do
    row[5] = row[5] or 'crashed' -- (a nil would cut the row short in the reply)
    row[6] = row[6] or (keys and keys[i]) or table.concat({row[1], row[5], proc, call, i}, '|')
    table.insert(fields, row[6])
    table.insert(fields, cjson.encode(row))
  end
  redis.call('HSET', reporting_key(proc), unpack(fields))
end

local function give_back(id)
  local p = job_fields(job_key(id), 'p')[1]
  if p then
    head_later(id, level_of(p))
    given[id] = level_of(p)
    given_back = given_back + 1
  else
    job_gone(id)
  end
end

--[[ Settle ops. S, E and B take 2 ARGV entries (op, attempt); Y, Z, y and z take 6
(op, attempt, retries, delay ms, reason, error).
  S  success                          (L)    -> job deleted, slot freed
  Y  failed, retry after delay ms (fractional) (L) -> slot freed, job delayed (or ready,
       behind the jobs due by then: promote_due)
  Z  failed for good, reason, error   (L)    -> slot freed, job dead, kept for proc to
       report (reporting:<proc>, see keep_report in settle); a job whose hash is gone is
       lost instead (job_gone), as with every op
  y/z  the same, decided at the attempt's deadline while it may still run:
       (L) -> attempt becomes X and keeps its slot; (R) -> attempt removed
  E  a timed-out attempt returned     (X) -> removed, slot freed; (L) -> R, slot freed
  B  give back unstarted / cancelled  (L)    -> slot freed, job at the head of its level
       (the last ready job waits for room if that fills the buffer past its cap: make_room)
  T  started (sent by a rate-limited type's worker once it started the attempt) (L, X, R)
       -> nothing but its rate window entry: it ends per from now
  A  (op, the row's key instead of an attempt) a row handed to proc to report was
       reported: it leaves reporting:<proc> (see handed), and its job is finished (the
       row's 1: see held_row)
Every op on an L attempt also ends its rate window entry per from now, at the latest
(an outcome comes after the start; B may be a cancelled running attempt), except a B of
an attempt whose start was never reported (T): it never started, and counts no start.
An attempt not in the process's inflight hash (reaped, or settled already: a resend)
is stale and changes nothing. Returns the number of stale ops, and the overruled ops (below).
An attempt that q.cancel() marked (in cancels:<proc>), or a Z/z op for reason
"cancelled" (its process cancelled it), ends its job as cancelled whatever the op says
(never a success, a retry or a death, nor a timeout); the slot is freed or kept as the op
says. A success, a retry or a give-back goes to `ended` for the caller to report; a
failure for good (Z/z: a failure its process decided, maybe before it heard of the mark,
or its own cancel) is kept for proc to report (keep_report), as cancelled, under the key
proc made for its op (whatever reason the op names): proc learns from the reply that its
failure was overruled, and reports the cancel instead (or acknowledges the row as it is).
settle's second result lists the attempts whose op a mark overruled (not proc's own
cancels), each with its type, for proc to count as cancelled (docs/redis.md, ExecutorStats).
A marked attempt's job hash is read from cancelled:<proc>|<attempt> only: an op of the old
attempt never reads, ends or counts the newer job of its id. ]]
local SHORT_OPS = {S = true, E = true, B = true, T = true, A = true}
local MARKABLE_OPS = {S = true, Y = true, y = true, B = true, Z = true, z = true} -- those a mark turns into a cancel
local marks_seen = false -- settle found marks of its proc: they may be left (marks_left)
local function settle(proc, argv, first, n, now)
  local ik = inflight_key(proc)
  local ck = cancels_key(proc)
  local marks = {} -- one look per call, not per op
  for _, attempt in ipairs(redis.call('SMEMBERS', ck)) do
    marks[attempt] = true
    marks_seen = true
  end
  -- A job that proc ended for good itself (Z, z, its own cancel) waits in reporting:<proc>
  -- until proc says its failure callbacks ran (op A), as a row handed to it does (see
  -- handed): proc sends the op before they run, so the counters have the job by then, and
  -- whoever reaps proc reports it should proc die first. Until that A the job still counts
  -- as unfinished (stats.outstanding, for join), as callbacks come before that: its row says
  -- so (held_row's 1), wherever it is handed on. Its key is one proc makes too:
  -- '<id>|<reason>|<proc>|<attempt>' (the attempt is proc's alone). From the job's hash jk,
  -- as it ends.
  -- The row says `reason`; its key, the reason of proc's op (`op_reason`, the same if nil).
  local function keep_report(jk, id, attempt, reason, op_reason)
    local f = redis.call('HMGET', jk, 'b', 'r', 'e')
    local key = table.concat({id, op_reason or reason, proc, attempt}, '|')
    handed(proc, {held_row(id, f[1], f[2], f[3], reason)}, nil, {key})
  end
  -- A failure for good (op Z or z at argv[at]) of an unmarked attempt. A job whose hash is gone
  -- is lost (job_gone): no dead hash is written anew, half, and no row is kept (nothing of the
  -- job is left to report; proc learns it from the reply's gone, or the next beat's).
  local function failed(attempt, id, at)
    local jk = job_key(id)
    if not is_job(jk) then return job_gone(id) end
    local reason = argv[at + 4]
    job_dead(id, reason, argv[at + 5], argv[at + 2], now)
    keep_report(jk, id, attempt, reason)
  end
  local overruled = {} -- {attempt, type} of each op a mark turned into a cancel
  -- The in-flight entries of the call's attempts, read with one HMGET (per CHUNK) and kept
  -- current here as its ops apply in order (false: none, or removed by an earlier op), so a
  -- later op of the same attempt sees what an earlier one left; removals are one HDEL at the end.
  local entries = {}
  local attempts = {} -- each once, in the order of their first op
  local at = first
  for _ = 1, n do
    local op, attempt = argv[at], argv[at + 1]
    if op ~= 'A' and entries[attempt] == nil then
      entries[attempt] = false
      table.insert(attempts, attempt)
    end
    if SHORT_OPS[op] then at = at + 2 else at = at + 6 end
  end
  for from = 1, #attempts, CHUNK do
    local values = redis.call('HMGET', ik, unpack(attempts, from, math.min(from + CHUNK - 1, #attempts)))
    for k, v in ipairs(values) do entries[attempts[from + k - 1]] = v end
  end
  local removed = {} -- attempts whose entry an op removed, in order: one HDEL at the end
  local function set_entry(attempt, v)
    redis.call('HSET', ik, attempt, v)
    entries[attempt] = v
  end
  local function remove_entry(attempt)
    entries[attempt] = false
    table.insert(removed, attempt)
  end
  local finished = {} -- keys of succeeded jobs: one DEL at the end
  local function settle_op(op, attempt, i) -- returns 1 for a stale op, else 0
    local v = entries[attempt]
    local state = v and string.sub(v, 1, 1)
    local t = v and string.sub(v, 2)
    local id = id_of(attempt)
    if v and op == 'B' and state == 'L' then rate_given_back(t, proc, attempt)
    elseif v and (state == 'L' or op == 'T') then rate_started(t, proc, attempt) end
    local own_cancel = (op == 'Z' or op == 'z') and argv[i + 4] == 'cancelled'
    local jk = marks[attempt] and marked_key(proc, attempt) or job_key(id)
    if not v then
      return 1
    elseif op == 'T' then -- (done above)
    elseif own_cancel or (MARKABLE_OPS[op] and marks[attempt]) then
      local deadline_op = op == 'y' or op == 'z'
      if state == 'L' or (state == 'R' and deadline_op) then -- (where the op would end the attempt)
        if deadline_op and state == 'L' then set_entry(attempt, 'X' .. t) -- still runs
        else
          remove_entry(attempt)
          if state == 'L' then release_slot(t) end
        end
        redis.call('SREM', ck, attempt)
        marks[attempt] = nil
        local decided = op == 'Z' or op == 'z' -- by proc, which reports it (as cancelled)
        if redis.call('EXISTS', jk) == 0 then -- lost: no row to report, counted in no counter
          job_gone(id)
        else
          if decided then keep_report(jk, id, attempt, 'cancelled', argv[i + 4]) end
          if not own_cancel then table.insert(overruled, {attempt, t}) end
          end_cancelled(jk, id, not decided)
        end
      else
        return 1 -- an op that does not fit the attempt's state: a resend
      end
    elseif op == 'S' and state == 'L' then
      remove_entry(attempt)
      release_slot(t)
      table.insert(finished, jk)
      count('succeeded', 1)
      count('outstanding', -1)
    elseif (op == 'Y' or op == 'Z') and state == 'L' then
      remove_entry(attempt)
      release_slot(t)
      if op == 'Y' then job_retry(id, argv[i + 2], argv[i + 5], tonumber(argv[i + 3]), now)
      else failed(attempt, id, i) end
    elseif (op == 'y' or op == 'z') and (state == 'L' or state == 'R') then
      if state == 'L' then set_entry(attempt, 'X' .. t)
      else remove_entry(attempt) end
      if is_job(job_key(id)) then count('timed_out', 1) end -- (a lost job counts in none)
      if op == 'y' then job_retry(id, argv[i + 2], argv[i + 5], tonumber(argv[i + 3]), now)
      else failed(attempt, id, i) end
    elseif op == 'E' and (state == 'X' or state == 'L') then
      if state == 'X' then remove_entry(attempt)
      else set_entry(attempt, 'R' .. t) end
      release_slot(t)
    elseif op == 'B' and state == 'L' then
      remove_entry(attempt)
      release_slot(t)
      give_back(id)
    else
      return 1 -- an op that does not fit the attempt's state: a resend
    end
    return 0
  end
  local stale = 0
  local i = first
  for _ = 1, n do
    local op, attempt = argv[i], argv[i + 1]
    if op == 'A' then -- its failure callbacks ran: the row is no longer re-reported if it dies
      local rk = reporting_key(proc)
      local row = redis.call('HGET', rk, attempt)
      if row then
        redis.call('HDEL', rk, attempt)
        if cjson.decode(row)[7] == 1 then count('outstanding', -1) end -- (see held_row)
      end
    else
      stale = stale + settle_op(op, attempt, i)
    end
    if SHORT_OPS[op] then i = i + 2 else i = i + 6 end
  end
  for from = 1, #removed, CHUNK do
    redis.call('HDEL', ik, unpack(removed, from, math.min(from + CHUNK - 1, #removed)))
  end
  for from = 1, #finished, CHUNK do
    redis.call('DEL', unpack(finished, from, math.min(from + CHUNK - 1, #finished)))
  end
  flush_released()
  return stale, overruled
end

-- After settle(proc, ...): proc's marked attempts still undecided (none when settle saw none).
local function marks_left(proc)
  if not marks_seen then return {} end
  return redis.call('SMEMBERS', cancels_key(proc))
end

--[[ Hand back everything proc holds and unregister it: every attempt without a decision
(L, R) goes back to the head of its level; an X attempt only frees its slot. With
max_crash (a reap: the process died), each of those counts a crash first, and a job past
max_crash is dead ("crashed") instead, its held row (held_row) appended to `crashed`;
without (release: the process left), none counts. The rows proc was handed and did not
acknowledge (see handed) go to `crashed` too, or to `reports` on a release. ]]
local function drop_proc(proc, now, max_crash, crashed)
  local ik = inflight_key(proc)
  local entries = redis.call('HGETALL', ik)
  for i = 1, #entries, 2 do
    local attempt, v = entries[i], entries[i + 1]
    local state, t = string.sub(v, 1, 1), string.sub(v, 2)
    if state == 'L' then rate_started(t, proc, attempt) end -- it may have started
    if state ~= 'R' then release_slot(t) end
    if state ~= 'X' then
      local id = id_of(attempt)
      local jk = job_key(id)
      if redis.call('SISMEMBER', cancels_key(proc), attempt) == 1 then
        local mk = marked_key(proc, attempt)
        if redis.call('EXISTS', mk) == 1 then
          end_cancelled(mk, id, true) -- marked: it ends here, never back to ready
        else
          job_gone(id) -- (its hash lost: nothing to report)
        end
      elseif max_crash and is_job(jk) and redis.call('HINCRBY', jk, 'c', 1) > max_crash then
        local f = redis.call('HMGET', jk, 'b', 'r', 'e')
        job_dead(id, 'crashed', '', f[2] or '0', now)
        table.insert(crashed, held_row(id, f[1], f[2], f[3], 'crashed'))
      else
        give_back(id)
      end
    end
  end
  local rk = reporting_key(proc)
  for _, text in ipairs(redis.call('HVALS', rk)) do
    if crashed then table.insert(crashed, cjson.decode(text)) else redis.call('RPUSH', K_REPORTS, text) end
  end
  redis.call('DEL', ik, cancels_key(proc), wake_key(proc), rk)
  redis.call('ZREM', K_PROCS, proc)
  redis.call('HDEL', K_FETCHED, proc)
  redis.call('HDEL', K_BEATEN, proc)
  flush_released()
end

--[[ Leases are measured on the server clock, but only while the server can be reached:
time in which no process could reach Redis (it was down, or cut off from everyone) is
nobody's silence. A live process calls at least every lease/4 (its heartbeat), so when
the last lease-keeping call (fetch, beat, reap) is further back than half a lease,
nobody reached Redis meanwhile; every lease expiry then moves forward by that gap before
anything is reaped. (A fleet that was all frozen at once looks the same, and is treated
the same.) `lease` is the caller's, in ms; the reap script, which has none, uses the last
one stored. Work: one write per process registered, and only after a gap. ]]
local function mind_the_gap(now, lease, kept_cap)
  local f = redis.call('HMGET', K_CLOCK, 't', 'g')
  local seen, gap = tonumber(f[1]), tonumber(f[2])
  if lease then gap = math.floor(lease / 2) end
  if kept_cap and kept_cap > 0 then -- (fetch's buffer_size, for the scripts called without one: see cap)
    redis.call('HSET', K_CLOCK, 't', now, 'g', gap, 'b', kept_cap)
  elseif gap then
    redis.call('HSET', K_CLOCK, 't', now, 'g', gap)
  end
  if seen and gap and now - seen > gap then
    local procs = redis.call('ZRANGE', K_PROCS, 0, -1, 'WITHSCORES')
    for i = 1, #procs, 2 do
      redis.call('ZADD', K_PROCS, tonumber(procs[i + 1]) + (now - seen), procs[i])
    end
  end
end

-- Renew proc's lease (registering it when `registered` is '0'; else it is the server time, ms,
-- of proc's registration); false, doing nothing, when proc registered before and is not
-- registered now: it must register again under a new id. Then a second value says why: false,
-- it was reaped; true, Redis lost the queue's state since (it restarted without its data, or
-- its keys were deleted): the clock hash's e, when the state began (set by the first renew
-- after that), is missing, or later than proc's registration. A registration earlier than e
-- (the server's clock was stepped back) moves e back to it: e is never later than the
-- registration of a process registered in this state, which is never told it was lost.
local function renew(proc, now, lease, registered, kept_cap)
  local since = tonumber(registered) or 0
  local began = tonumber(redis.call('HGET', K_CLOCK, 'e')) -- (before mind_the_gap writes the hash)
  mind_the_gap(now, lease, kept_cap)
  if since > 0 and not redis.call('ZSCORE', K_PROCS, proc) then return false, not began or began > since end
  if not began or (since == 0 and began > now) then redis.call('HSET', K_CLOCK, 'e', now) end
  redis.call('ZADD', K_PROCS, now + lease, proc)
  return true
end

-- Register a reporter (see keeps_rows): a process without a lease that holds one for the
-- rows a call hands it (a cancel's, an evicting enqueue's or a schedule tick's). Its lease is its own, not the fleet's: a producer-only process's
-- lease may be shorter than the workers', whose ordinary silence between two beats would
-- then look like an outage, so the gap stays the workers' (the last one stored).
local function register_reporter(proc, now, lease)
  mind_the_gap(now, nil)
  redis.call('ZADD', K_PROCS, now + lease, proc)
  return true
end

-- Whether rows a call ends for `caller` can wait in reporting:<caller> (see handed): it holds
-- a lease, or registers as a reporter with `lease` (> 0). '' is no caller.
local function keeps_rows(caller, now, lease)
  return caller ~= '' and (redis.call('ZSCORE', K_PROCS, caller) or (lease > 0 and register_reporter(caller, now, lease)))
end

local function reap(now, max_crash, crashed)
  local expired = redis.call('ZRANGEBYSCORE', K_PROCS, '-inf', '(' .. now, 'LIMIT', 0, REAP_PER_CALL)
  for _, proc in ipairs(expired) do drop_proc(proc, now, max_crash, crashed) end
  return #expired
end

-- The earliest due time (a delayed job, or a rate window opening for parked jobs) as
-- text (a Lua number would be truncated), or -1. Due jobs that wait for room are left out:
-- no timer polls for them (the call that makes room moves them in). (Looked at here, not
-- taken from promote_due: a resent fetch replies without promoting.)
local function next_due()
  local first = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) <= exact_ms() and ready_count() >= cap() then
    first = redis.call('ZRANGEBYSCORE', K_DELAYED, string.format('(%.17g', exact_ms()), '+inf', -- (not
                       'WITHSCORES', 'LIMIT', 0, 1) -- '(' .. exact_ms(): Lua's text keeps 14 digits, 0.1 ms)
  end
  local opens = redis.call('ZRANGE', K_RATE_OPEN, 0, 0, 'WITHSCORES')
  if opens[2] and not (first[2] and tonumber(first[2]) <= tonumber(opens[2])) then return opens[2] end
  if first[2] then return first[2] end
  return -1
end

local REPLACED_KEPT = 90000 -- ms: how long a replaced dead job is kept for a take-back
local ROW = 7 -- ARGV per job of enqueue.lua: id, type, priority, delay ms, body, retries, last error

-- The body of enqueue.lua (its header documents the rows and replies), shared with
-- schedule_tick.lua, whose call enqueues the job of the tick it claims. The rows are ROW ARGV per job
-- from ARGV[base] on. The jobs it evicts are handed to `caller` to report (see handed) when it
-- holds a lease, or registers one (`lease` > 0: a reporter, as cancel.lua's); each counts as
-- unfinished until then (held_row), or until this reply if nothing keeps them.
local function enqueue_jobs(token, buffer_size, max_delayed, n, base, caller, lease)
  local now = now_ms()
  local seen = kept_reply(token)
  if seen then return {'again', cjson.decode(seen)} end
  buffer_cap = buffer_size
  local ready_added = 0
  local keys = {} -- the jobs' hash keys, in ARGV order
  for i = base, base - 1 + n * ROW, ROW do
    table.insert(keys, job_key(ARGV[i]))
    if tonumber(ARGV[i + 3]) <= 0 then ready_added = ready_added + 1 end
  end
  local known = 0 -- ids that have a hash already: a batch of new ids needs no look at each one
  for first = 1, n, CHUNK do
    known = known + redis.call('EXISTS', unpack(keys, first, math.min(first + CHUNK - 1, n)))
  end
  local dead = {} -- ids of dead jobs this batch replaces
  if known > 0 then
    for i = base, base - 1 + n * ROW, ROW do
      local jk = keys[(i - base) / ROW + 1]
      local f, other = job_fields(jk, 'k', 'x')
      if other then -- (never overwritten: another program's data. Raised, so that schedule_tick fails too)
        error(redis.error_reply("Redis key '" .. jk .. "' holds a " .. redis.call('TYPE', jk).ok .. ', not a job: '
                                .. 'another program wrote it; delete it, or enqueue the job under another id'))
      end
      if f[1] and not f[2] then
        if f[1] == token then return {'again', {}} end -- (accepted before tokens were kept)
        return {'dup', ARGV[i]}
      end
      if f[2] then dead[ARGV[i]] = true end
    end
  end
  if ready_added > 0 then
    promote_due() -- (jobs due by now go ahead of these, and count as ready: see promote_due)
    local ready = ready_count() + due_left()
    if ready + ready_added > buffer_size then
      flush_counts() -- (promote_due may have found jobs gone)
      return {'full', ready}
    end
  end
  local evicted = {}
  -- A due job no longer counts as delayed, even before a call promotes it: it is never evicted.
  -- (Only a delayed job evicts: a batch of ready jobs leaves `capped` as it is.)
  if max_delayed > 0 and ready_added < n then
    redis.call('ZREMRANGEBYSCORE', K_CAPPED, '-inf', exact_ms())
  end
  local by_level = {[0] = {}, [1] = {}, [2] = {}}
  local order = new_orders(n) -- (delayed jobs get theirs when they come due)
  for i = base, base - 1 + n * ROW, ROW do
    local id, delay = ARGV[i], tonumber(ARGV[i + 3])
    local jk = keys[(i - base) / ROW + 1]
    local kept = false
    if dead[id] then -- kept aside for a take-back (see bring_back_replaced)
      kept = P .. 'replaced:' .. token .. '|' .. id
      local died = redis.call('ZSCORE', K_DEAD, id)
      redis.call('ZREM', K_DEAD, id)
      redis.call('HDEL', jk, 'u', 'w')
      redis.call('HSET', jk, 'd', died)
      redis.call('RENAME', jk, kept)
      redis.call('PEXPIRE', kept, REPLACED_KEPT)
    end
    if delay > 0 then
      redis.call('HSET', jk, 't', ARGV[i + 1], 'p', ARGV[i + 2], 'b', ARGV[i + 4], 'r', ARGV[i + 5], 'k', token)
      if ARGV[i + 6] ~= '' then redis.call('HSET', jk, 'e', ARGV[i + 6]) end
      if max_delayed > 0 and redis.call('ZCARD', K_CAPPED) >= max_delayed then
        local out = redis.call('ZPOPMIN', K_CAPPED)
        redis.call('ZREM', K_DELAYED, out[1])
        -- (this job's own id: a lost job's, waiting still; the hash is this job's, never evicted)
        if out[1] == id or not is_job(job_key(out[1])) then -- (or another program's value of another kind)
          job_gone(out[1]) -- (nothing to report, nor to keep dead; its place is the room needed)
        else
          local f = redis.call('HMGET', job_key(out[1]), 'b', 'r')
          table.insert(evicted, held_row(out[1], f[1], f[2], '', 'evicted'))
          job_dead(out[1], 'evicted', '', f[2] or '0', now)
          count('failed', -1) -- evictions have their own counter
          count('evicted', 1)
        end
      end
      redis.call('ZADD', K_CAPPED, add_delayed(id, exact_ms() + delay), id)
      if kept then redis.call('HSET', jk, 'u', kept) end
    else
      redis.call('HSET', jk, 't', ARGV[i + 1], 'p', ARGV[i + 2], 'b', ARGV[i + 4], 'r', ARGV[i + 5], 'k', token,
                 'o', order + (i - base) / ROW)
      if ARGV[i + 6] ~= '' then redis.call('HSET', jk, 'e', ARGV[i + 6]) end
      if kept then redis.call('HSET', jk, 'u', kept) end
      table.insert(by_level[level_of(ARGV[i + 2])], id)
    end
  end
  for p = 2, 0, -1 do -- one RPUSH per level and chunk, not one per job
    local ids = by_level[p]
    for first = 1, #ids, CHUNK do
      redis.call('RPUSH', READY[p], unpack(ids, first, math.min(first + CHUNK - 1, #ids)))
    end
  end
  if #evicted > 0 then
    if keeps_rows(caller, now, lease) then
      handed(caller, evicted, token) -- (first: a resend returns the rows with their keys)
    else
      reported_by_reply(evicted) -- (a resend returns them again, counted here once)
    end
  end
  keep_reply(token, evicted)
  count('enqueued', n)
  count('outstanding', n)
  flush_counts()
  if ready_added > 0 then signal() end
  return {'ok', evicted}
end

--[[ The queue's sizes and counters at this instant (stats and status): per level, the jobs
ready (in ready:<p>, or parked:<p>:<type>, counted by the stats field parked:<p>) and the
delayed jobs already due on the server's clock that no call has promoted yet, while the
buffer has room for them (a due job counts as ready from its due time on, as in-process:
promote_due only moves it, in the same order, as far as room goes); waiting, the due jobs
beyond that room (with `room` math.huge, none); delayed, the jobs not due yet. Returns high,
medium, low, delayed, counters (HGETALL of stats), waiting. Work: one read per due job not yet
promoted that the room takes (every fetch and every enqueue of a ready job promotes
PROMOTE_PER_CALL at a time, so they pile up only while no process fetches or enqueues, or
while the buffer is full); those beyond the room are counted, not read: a read of each made
every get_stats() of a full buffer cost Redis a read per job waiting for room, which a caller
in a loop kept Redis busy with, and the fetches that make room waited behind it. So a lost job
among those (its hash gone, or another program's value of another kind) counts as waiting, as
it counts as unfinished, until the call that moves it drops it; one the room takes is left out
(promote_due drops it, and it takes no room). `most` (optional): the most due jobs read, those
beyond it counted in waiting too (status, while the room is unknown). ]]
local function queue_sizes(room, most)
  now_ms()
  local sizes = {[0] = redis.call('LLEN', READY[0]), [1] = redis.call('LLEN', READY[1]),
                 [2] = redis.call('LLEN', READY[2])}
  local counters = redis.call('HGETALL', K_STATS)
  for i = 1, #counters, 2 do
    local p = string.match(counters[i], '^parked:(%d)$')
    if p then sizes[tonumber(p)] = sizes[tonumber(p)] + tonumber(counters[i + 1]) end
  end
  room = room - sizes[0] - sizes[1] - sizes[2]
  local due_by = exact_ms()
  local due = redis.call('ZCOUNT', K_DELAYED, '-inf', due_by)
  local read = 0 -- due jobs looked at, earliest first (as promote_due moves them)
  local readable = math.min(due, most or math.huge)
  while room > 0 and read < readable do
    local ids = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', due_by, 'LIMIT', read, math.min(room, readable - read))
    if #ids == 0 then break end -- (never: one script sees one set)
    for _, id in ipairs(ids) do
      local p = job_fields(job_key(id), 'p')[1]
      if p then -- (else a job without its hash, or another program's value of another kind: promote_due drops it)
        sizes[level_of(p)] = sizes[level_of(p)] + 1
        room = room - 1
      end
    end
    read = read + #ids
  end
  return sizes[2], sizes[1], sizes[0], redis.call('ZCARD', K_DELAYED) - due, counters, due - read
end
