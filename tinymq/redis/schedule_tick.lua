--[[ schedule_tick: claim one tick of a schedule and enqueue its job, in one call: once across
all processes, and no moment at which the tick is claimed but its job not enqueued.
KEYS[1] prefix. ARGV: name, tick (its time in us, which grows with every tick: `every`
anchor + k * interval on the shared grid, `cron` its wall-clock instant; one number space
for both, so a schedule that changes kind under its name keeps firing: a grid index would
compare with a cron tick's time as long claimed), claim token (unique per call, the same when resent; also the
enqueue token of the tick's job), buffer_size, max_delayed_jobs (0: unlimited), caller and
lease (as enqueue.lua's), then the tick's job as one row of enqueue.lua: id, type, priority
(0..2), delay ms, body, retries, last error; then, for an `every` tick, the grid the caller
ticks on: anchor us, interval us, definition (as schedule_begin.lua's; none for `cron`).
Returns
  {'fire', {row, ...}}  this call claimed the tick and enqueued its job, by enqueue.lua's
                        rules; the jobs that enqueue evicted from the delayed set (now
                        dead, reason "evicted") for on_failure, as enqueue.lua returns them
  {'busy'}   this call claimed the tick, and the previous tick's job (or a job with this
             tick's id) is still unfinished: the tick is skipped
  {'full'}   this call claimed the tick, and the ready buffer has no room for its job: the
             tick is skipped
  {'taken'}  the tick (or a later one) was claimed already, by another call
  {'regrid'} not claimed: Redis holds another grid of the same interval (it lost its data,
             and a process that began since set a new one; or a process began the
             schedule with another first_at); the caller joins it (schedule_begin,
             rejoining). A grid Redis lost is kept again from the caller's.
  {'ahead'}  not claimed: a `cron` tick more than CLOCK_SET_BACK ahead of the server's clock
             (the caller's wall clock is wrong: its claim would hold every later tick back,
             in every process, once that clock is corrected)
The server's clock arbitrates, as cron's rule does for one clock: a claim lying more than
CLOCK_SET_BACK ahead of it (left by a wrong clock before this rule, or written by hand) is
no claim; unless it is an `every` tick's claimed on the grid (`grid`: anchor:interval) the
caller ticks on: those are the server's own times, ahead only once its clock was set back,
and a tick claimed there stays claimed (otherwise each process would fire it).
A skipped tick is counted in `skipped`, a fired one in `fired`; either way the claim is
the tick's, so the next tick is claimed as usual. A resent call (same token) gets its
first answer again, 'fire' with what its enqueue evicted (kept with its token). ]]
refuse_if_full()
local CLOCK_SET_BACK = 3 * 3600 * 1000000 -- us: tinymq/_periodic.py's _CLOCK_SET_BACK
local key = P .. 'schedule:' .. ARGV[1]
local tick, token = tonumber(ARGV[2]), ARGV[3]
now_ms()
local s = redis.call('HMGET', key, 'last', 'job', 'by', 'outcome', 'grid')
local last = tonumber(s[1])
local grid = ARGV[16] and (ARGV[15] .. ':' .. ARGV[16]) or '' -- (an `every` tick's grid; '' for `cron`)
-- A claim far ahead made on the caller's own grid is still a claim: `every` ticks are the server's
-- times, so they lie ahead only once the server's clock was set back, and each fires once still.
if last and last > now_us + CLOCK_SET_BACK and (grid == '' or s[5] ~= grid) then last = nil end
if last and last >= tick then
  if s[3] ~= token then return {'taken'} end
  if s[4] ~= 'fire' then return {s[4]} end
  local seen = kept_reply(token)
  if seen then return {'fire', cjson.decode(seen)} end
  return {'fire', {}}
end
if not ARGV[16] and tick > now_us + CLOCK_SET_BACK then return {'ahead'} end -- (`every` ticks: the server's)
if ARGV[16] then -- an `every` tick: one grid for every process (see the header)
  local g = redis.call('HMGET', key, 'anchor', 'interval')
  if not g[1] then
    redis.call('HSET', key, 'anchor', ARGV[15], 'interval', ARGV[16], 'definition', ARGV[17])
  elseif g[2] == ARGV[16] and g[1] ~= ARGV[15] then
    return {'regrid'}
  end
end
local outcome, evicted = 'fire', {}
if s[2] then
  local f = job_fields(job_key(s[2]), 'k', 'x') -- (another program's value of another kind: no job)
  if f[1] and not f[2] then outcome = 'busy' end
end
if outcome == 'fire' then
  local reply = enqueue_jobs(token, tonumber(ARGV[4]), tonumber(ARGV[5]), 1, 8, ARGV[6], tonumber(ARGV[7]))
  if reply[1] == 'dup' then -- this tick's job, unfinished: it is the previous job from now on
    outcome = 'busy'
    redis.call('HSET', key, 'job', ARGV[8])
  elseif reply[1] == 'full' then
    outcome = 'full'
  else
    evicted = reply[2]
  end
end
redis.call('HSET', key, 'last', ARGV[2], 'by', token, 'outcome', outcome, 'grid', grid)
if outcome == 'fire' then
  redis.call('HSET', key, 'job', ARGV[8])
  redis.call('HINCRBY', key, 'fired', 1)
  return {'fire', evicted}
end
redis.call('HINCRBY', key, 'skipped', 1)
return {outcome}
