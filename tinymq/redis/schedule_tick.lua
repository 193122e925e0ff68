--[[ schedule_tick: claim one tick of a schedule for this process, once across all processes.
KEYS[1] prefix. ARGV: name, tick (a number that grows with every tick: `every` its grid
index, `cron` its time in ms), the tick's job id, claim token (unique per call, the same
when resent).
Returns
  'fire'   this call claimed the tick: enqueue its job (id ARGV[3]);
  'busy'   this call claimed the tick, and the previous tick's job is still unfinished:
           the tick is skipped (counted in `skipped`);
  'taken'  the tick (or a later one) was claimed already, by another call.
A resent call (same token) gets its first answer again. ]]
local key = P .. 'schedule:' .. ARGV[1]
local tick = tonumber(ARGV[2])
local s = redis.call('HMGET', key, 'last', 'job', 'by', 'outcome')
if s[1] and tonumber(s[1]) >= tick then
  if s[3] == ARGV[4] then return s[4] end
  return 'taken'
end
local outcome = 'fire'
if s[2] then
  local f = redis.call('HMGET', job_key(s[2]), 'k', 'x')
  if f[1] and not f[2] then outcome = 'busy' end
end
redis.call('HSET', key, 'last', ARGV[2], 'by', ARGV[4], 'outcome', outcome)
if outcome == 'fire' then
  redis.call('HSET', key, 'job', ARGV[3])
  redis.call('HINCRBY', key, 'fired', 1)
else
  redis.call('HINCRBY', key, 'skipped', 1)
end
return outcome
