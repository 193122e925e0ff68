--[[ requeue_dead: dead jobs back to the tail of their level, retries and crashes reset.
KEYS[1] prefix. ARGV: ids (at most a few hundred per call; the client pages).
Ids that are not dead are skipped. Each one requeued counts as enqueued (accepted again, as
a store's requeued job is when a queue recovers it), so enqueued less the jobs that ended
stays the unfinished jobs. Due delayed jobs are promoted first (promote_due: at most
PROMOTE_PER_CALL), so requeued jobs go behind them. A requeued job that finds the buffer full
(buffer_size, see cap in lib.lua) waits for room as a due job does (to_tail): never past it.
Returns how many were requeued. ]]
even_if_full()
now_ms()
promote_due() -- (jobs due by now go ahead of the requeued ones)
local n, went_in = 0, false
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', K_DEAD, id) == 1 then
    local jk = job_key(id)
    local p = job_fields(jk, 'p')[1] -- (none: no hash there, or another program's value of another kind)
    if p then
      redis.call('HDEL', jk, 'x', 'e')
      redis.call('HSET', jk, 'r', 0, 'c', 0)
      redis.call('HSETNX', jk, 'k', '') -- (counted here: a fetch must not count it again, see fetch.lua)
      if to_tail(id, level_of(p)) then went_in = true end
      n = n + 1
    end
  end
end
count('enqueued', n)
count('outstanding', n)
flush_counts()
if went_in then signal() end
return n
