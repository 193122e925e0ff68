--[[ hold: renew the leases of reporters while their process's failure callbacks run (see
cancel.lua): a callback may take longer than the lease, and a reporter reaped meanwhile
would have its rows reported again by a worker though nothing died. One call for every
reporter a process holds: a round trip each, one after the other, could outlast the lease.
KEYS[1] prefix. ARGV: lease ms, then the reporters' ids.
Returns how many were renewed; one no longer registered (released, or reaped: its reaper
reports its rows) is left as it is. ]]
even_if_full()
local lease = tonumber(ARGV[1])
local now = now_ms()
local renewed = 0
for i = 2, #ARGV do
  local proc = ARGV[i]
  if redis.call('ZSCORE', K_PROCS, proc) then
    register_reporter(proc, now, lease)
    renewed = renewed + 1
  end
end
return renewed
