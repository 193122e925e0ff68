--[[ hold: renew a reporter's lease while its process's failure callbacks run (see
cancel.lua): a callback may take longer than the lease, and a reporter reaped meanwhile
would have its rows reported again by a worker though nothing died.
KEYS[1] prefix. ARGV: the reporter's id, lease ms.
Returns 1, or 0 when it is no longer registered (released, or reaped: its reaper
reports its rows) and nothing was done. ]]
even_if_full()
local proc, lease = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
if not redis.call('ZSCORE', K_PROCS, proc) then return 0 end
register_reporter(proc, now, lease)
return 1
