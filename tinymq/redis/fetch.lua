--[[ fetch: settle a batch, renew the lease, reap, promote due jobs (promote_due: at most
PROMOTE_PER_CALL, and as many as the buffer has room for), take up to n jobs for proc's worker
threads and up to m for its event loop, then let in the due jobs that waited for the room the
take made.
KEYS[1] prefix. ARGV: proc, fetch id, n, lease ms, max crash recoveries,
registered (the server time, ms, at which proc registered: its first fetch or beat; '0'
before it), buffer_size (0: none given, the one kept is used; see cap in lib.lua, which keeps
this one for the scripts called without it), m, the count of proc's loop types, those types
(their executors are async: their jobs run on proc's event loop, bounded by their types'
limits only), settle count, then settle ops (2 or 6 entries each, see settle in lib.lua).
Returns {status, server now ms, next due ms (the earliest delayed job or rate window
         opening, leaving out due jobs that wait for room; fractional, as text; -1: none), stale settles,
         crashed {{id, body, retries, error, reason, key}...}, jobs {{attempt, body, retries, error}...},
         server now us (to time the next due job), cancels {attempt...},
         overruled {{attempt, type}...}, gone {id...}, stopped (1: it stopped at a job proc
         could not take, see below; else 0)}
crashed also holds jobs that ended as cancelled (reason 'cancelled', see settle) for
this process to report, and the jobs this call failed for good because another program
wrote their hash without a type or with a p that is no level (see foreign); cancels are
its attempts that q.cancel() marked: it cancels them locally (the settle already looked
them up: no extra read when there are none); overruled, its attempts whose op of this call a
mark turned into a cancel (see settle in lib.lua), for it to count as cancelled; gone, the
jobs this call found without their hash (see job_gone in lib.lua), for it to log.
status 1 = ok; 0 = this process was reaped (nothing else done: it must abandon its
buffer and register again under a new id); -1 = the same, because Redis lost the queue's
state since it registered (see renew in lib.lua).
Jobs come strictly by level (HIGH first), FIFO within one. The first job proc could run
but has no place for now (a thread job beyond n, a loop job beyond m) stops the call: it
stays at the head, and every job behind it stays too (at every level), so no job proc
buffers starts ahead of it. A job whose type has no free slot, or whose rate window is
full, is parked (so a saturated type never blocks others)
and comes back when a slot of its type frees or its rate window opens (the next due time
in the reply includes that opening); parked jobs keep their FIFO order (a job given back
ahead of the ones already parked goes in front of them). Taking a job takes its type's
slot (and a place in its rate window) and writes the attempt to inflight:<proc> in the
same step. A resent call (same proc and fetch id) takes nothing new and returns the
attempts the first call took, the jobs it found crashed (each reported once, by
whoever gets the reply), the ops it found overruled and the jobs it found gone. ]]
even_if_full()
local proc, fid, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lease, max_crash, registered = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local given_cap, m, nloop = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local on_loop = {} -- type -> true: its jobs run on proc's event loop and count against m
for i = 10, 9 + nloop do on_loop[ARGV[i]] = true end
local nsettle = tonumber(ARGV[10 + nloop])
local now = now_ms()
if given_cap > 0 then buffer_cap = given_cap end
local renewed, lost = renew(proc, now, lease, registered, given_cap)
if not renewed then return {lost and -1 or 0, now, -1, 0, {}, {}, now_us, {}, {}, {}, 0} end
local ik = inflight_key(proc)
local jobs = {}
local last = redis.call('HGET', K_FETCHED, proc)
-- {fetch id, {attempt...}, {crashed...}, {overruled...}, {gone...}}: ids may hold any character
last = last and cjson.decode(last)
if last and last[1] == fid then -- a resend of the last fetch
  local cancels = redis.call('SMEMBERS', cancels_key(proc))
  local marked = {}
  for _, attempt in ipairs(cancels) do marked[attempt] = true end
  for _, attempt in ipairs(last[2]) do
    local v = redis.call('HGET', ik, attempt)
    if v and string.sub(v, 1, 1) == 'L' then -- (a marked one's hash was moved: its id may be a newer job's)
      local jk = marked[attempt] and marked_key(proc, attempt) or job_key(id_of(attempt))
      local f = job_fields(jk, 'b', 'r', 'e')
      -- (a job gone since, or overwritten with a value of another kind, has no body: left out; its
      -- give-back or reap finds it gone, see job_gone)
      if f[1] then table.insert(jobs, {attempt, f[1], f[2] or '0', f[3] or ''}) end
    end
  end
  return {1, now, next_due(), nsettle, last[3], jobs, now_us, cancels, last[4] or {}, last[5] or {}, 0}
end
-- Why the job hash of an id in a ready list cannot be fetched (t: its type, p: its level),
-- or nil: a hash that enqueue never writes (another program's).
local function foreign(t, p)
  if not t then return 'its hash in Redis has no type (t)' end
  p = tonumber(p)
  if p ~= 0 and p ~= 1 and p ~= 2 then return 'its priority in Redis (p) is not 0, 1 or 2' end
  return nil
end
-- A job hash without an enqueue token (k) was written by another program (or restored apart
-- from the stats hash): no script counted it unfinished (stats.outstanding) as enqueue does.
-- Counted now, once (its k marks it), so that its end, which counts it finished, never takes
-- the count below the jobs still unfinished.
local function count_foreign(jk)
  count('outstanding', 1)
  redis.call('HSET', jk, 'k', '')
end
local stale, overruled = settle(proc, ARGV, 11 + nloop, nsettle, now)
local crashed = {}
reap(now, max_crash, crashed)
hand_out_ended(crashed)
flush_head(true) -- (the take below goes first; the wake-up at the end chains what it leaves)
promote_due()
-- Rate windows that opened: let out as many of their parked jobs as now fit (the take
-- below parks again whatever does not).
local opened = redis.call('ZRANGEBYSCORE', K_RATE_OPEN, '-inf', exact_ms(), 'LIMIT', 0, PROMOTE_PER_CALL)
for _, t in ipairs(opened) do
  redis.call('ZREM', K_RATE_OPEN, t)
  for _ = 1, math.min(rate_room(t), PARK_PER_CALL) do
    if not unpark_one(t) then break end
  end
  if redis.call('HEXISTS', K_PARKEDN, t) == 1 then rate_wait(t) end
end
if #opened > 0 then flush_head(true) end
local taken, parked_budget = {}, PARK_PER_CALL
local limits, running, took, fields = {}, {}, {}, {}
local room, rate_taken, rate_closed = {}, {}, {} -- per rate-limited type: starts left, taken, parked
local parking, parked_keys = {}, {} -- parked list -> ids this call parks there, in order
local met_gone = false -- a ready id without its hash was dropped (see below)
-- Ids this call met: one met again is a lost job's, whose hash Redis lost before a new job took
-- the id (both ids stand for the new job's hash): dropped as lost (job_gone), so that the new
-- job runs once and its one end leaves nothing unfinished. (Met by another call, while the new
-- job's attempt runs, it is taken for it again: docs/redis.md, Dead jobs.)
local met = {}
local threads, loops = 0, 0 -- jobs taken for proc's worker threads (at most n), for its loop (at most m)
local stopped = false -- met a job proc cannot take now: it and the jobs behind it stay
for p = 2, 0, -1 do
  while not stopped and (threads < n or loops < m) and parked_budget > 0 do
    -- LPOP with a count: Redis >= 6.2. (Loop jobs are looked for a batch at a time: m may be large.)
    local ids = redis.call('LPOP', READY[p], n - threads + math.min(m - loops, PARK_PER_CALL))
    if not ids then break end
    for k, id in ipairs(ids) do
      if parked_budget == 0 or stopped then -- looked at enough for one call: the rest go back, in order
        for j = #ids, k, -1 do redis.call('LPUSH', READY[p], ids[j]) end
        break
      end
      local jk = job_key(id)
      local again = met[id]
      met[id] = true
      local f, other = {}, false
      if not again then f, other = job_fields(jk, 't', 'b', 'r', 'e', 'p', 'k') end
      local t = f[1]
      local fault = not again and foreign(t, f[5])
      if again then -- (see met)
        job_gone(id)
        met_gone = true
        parked_budget = parked_budget - 1
      elseif fault and not other and redis.call('EXISTS', jk) == 1 then
        if not f[6] then count_foreign(jk) end
        -- Another program wrote it: never run, dead here and reported by proc, as a job it
        -- cannot decode is (docs/redis.md, Dead jobs).
        local err = 'cannot decode: ' .. fault
        job_dead(id, 'permanent_failure', err, f[3] or '0', now)
        table.insert(crashed, held_row(id, f[2], f[3], err, 'permanent_failure'))
      elseif not t then -- no hash at all (or a value of another kind: job_fields): its data is gone
        job_gone(id)
        met_gone = true
        parked_budget = parked_budget - 1 -- (looked at, as a parked one: a call's work stays bounded)
      else
        if limits[t] == nil then
          limits[t] = tonumber(redis.call('HGET', K_LIMITS, t)) or false
          running[t] = tonumber(redis.call('HGET', K_RUNNING, t)) or 0
          room[t] = rate_room(t)
        end
        local closed = room[t] <= 0
        local parks = closed or (limits[t] and running[t] >= limits[t]) -- (no slot of its type, or no rate room)
        local loop = on_loop[t]
        if not parks and ((loop and loops >= m) or (not loop and threads >= n)) then
          -- proc could run it but has no place for it now: it stays at the head, and the rest with it
          stopped = true
          for j = #ids, k, -1 do redis.call('LPUSH', READY[p], ids[j]) end
          break
        end
        if not f[6] then count_foreign(jk) end
        if parks then
          if closed then rate_closed[t] = true end
          local pk = parked_key(p, t)
          if not parking[pk] then
            parking[pk] = {}
            table.insert(parked_keys, pk)
          end
          table.insert(parking[pk], id)
          redis.call('HINCRBY', K_PARKEDN, t, 1)
          count('parked:' .. p, 1)
          parked_budget = parked_budget - 1
        else
          running[t] = running[t] + 1
          took[t] = (took[t] or 0) + 1
          if loop then loops = loops + 1 else threads = threads + 1 end
          local attempt = fid .. ':' .. id -- unique in this process: fetch ids never repeat
          if room[t] ~= math.huge then
            room[t] = room[t] - 1
            rate_taken[t] = rate_taken[t] or {}
            table.insert(rate_taken[t], 'inf')
            table.insert(rate_taken[t], rate_member(proc, attempt))
          end
          table.insert(fields, attempt)
          table.insert(fields, 'L' .. t)
          table.insert(taken, attempt)
          table.insert(jobs, {attempt, f[2], f[3] or '0', f[4] or ''})
        end
      end
    end
  end
end
-- Parked jobs go behind the ones parked before, except those older (in FIFO order) than
-- the first of them, which were given back from ahead of it: those go in front.
for _, pk in ipairs(parked_keys) do
  local ids = parking[pk]
  local first = redis.call('LINDEX', pk, 0)
  local first_order = first and order_of(first)
  local front = 0
  while first and front < #ids and order_of(ids[front + 1]) < first_order do front = front + 1 end
  for k = front, 1, -1 do redis.call('LPUSH', pk, ids[k]) end
  for k = front + 1, #ids do redis.call('RPUSH', pk, ids[k]) end
end
if #fields > 0 then redis.call('HSET', ik, unpack(fields)) end
-- The jobs taken made room: due jobs that waited for it come in now (see promote_due).
local before = promoted
if due_waiting then promote_due() end
for t, k in pairs(took) do redis.call('HINCRBY', K_RUNNING, t, k) end
for t, entries in pairs(rate_taken) do redis.call('ZADD', rate_key(t), unpack(entries)) end
for t in pairs(rate_closed) do rate_wait(t) end
-- A ready id without its hash may be a parked job let out for a free slot of its type (its type
-- unknown now): jobs of every type still parked beside free slots are let out, else they would
-- wait for an attempt of their type to end, maybe for ever. Rare: only when such an id was met.
if met_gone then
  for _, t in ipairs(redis.call('HKEYS', K_PARKEDN)) do
    unpark_into_free_slots(t, tonumber(redis.call('HGET', K_LIMITS, t)), PARK_PER_CALL)
  end
  flush_head()
end
handed(proc, crashed, 'f' .. fid) -- (first: it gives each row its key, which a resent reply repeats)
local lost = gone_ids(false)
redis.call('HSET', K_FETCHED, proc, cjson.encode({fid, taken, crashed, overruled, lost}))
-- Chain the wake-up: another process may take what this one could not.
if (stopped or #taken >= n + m or parked_budget == 0 or promoted > before) and ready_left() > 0 then signal() end
flush_counts()
return {1, now, next_due(), stale, crashed, jobs, now_us, marks_left(proc), overruled, lost, stopped and 1 or 0}
