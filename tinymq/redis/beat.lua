--[[ beat: renew proc's lease and reap up to two dead processes.
KEYS[1] prefix. ARGV: proc, lease ms, max crash recoveries, registered ('1' if it
registered before).
Returns {status, server now ms, crashed {{id, body, retries, error}...}};
status 0: proc was reaped (not renewed): it must abandon its buffer and register again. ]]
local proc, lease, max_crash = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
mind_the_gap(now, lease)
if ARGV[4] == '1' and not redis.call('ZSCORE', K_PROCS, proc) then return {0, now, {}} end
redis.call('ZADD', K_PROCS, now + lease, proc)
local crashed = {}
reap(now, max_crash, crashed)
flush_head()
flush_counts()
return {1, now, crashed}
