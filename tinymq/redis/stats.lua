--[[ stats: the shared queue's sizes and counters, read at one instant (get_stats).
KEYS[1] prefix. No ARGV. Reads only.
Returns {high, medium, low, delayed, counters {name, value, ...}}: per level, the jobs
ready (in ready:<p>, or parked:<p>:<type>, counted by the stats field parked:<p>) and the
delayed jobs already due on the server's clock that no call has promoted yet (a due job
counts as ready from its due time on, as in-process: promote_due only moves it); delayed,
the jobs not due yet. Work: one read per due job not yet promoted (every fetch and every
enqueue of a ready job promotes PROMOTE_PER_CALL at a time, so they pile up only while no
process fetches or enqueues). ]]
now_ms()
local sizes = {[0] = redis.call('LLEN', READY[0]), [1] = redis.call('LLEN', READY[1]),
               [2] = redis.call('LLEN', READY[2])}
local counters = redis.call('HGETALL', K_STATS)
for i = 1, #counters, 2 do
  local p = string.match(counters[i], '^parked:(%d)$')
  if p then sizes[tonumber(p)] = sizes[tonumber(p)] + tonumber(counters[i + 1]) end
end
local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', exact_ms()) -- (as fetch promotes them)
for _, id in ipairs(due) do
  local p = tonumber(redis.call('HGET', job_key(id), 'p'))
  if p then sizes[p] = sizes[p] + 1 end -- (a job without its hash: fetch drops it)
end
return {sizes[2], sizes[1], sizes[0], redis.call('ZCARD', K_DELAYED) - #due, counters}
