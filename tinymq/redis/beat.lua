--[[ beat: renew proc's lease and reap up to two dead processes.
KEYS[1] prefix. ARGV: proc, lease ms, max crash recoveries, registered (the server time, ms, at
which it registered: its first fetch or beat; '0' before it), beat id (optional: '' or absent for none).
Returns {status, server now ms, crashed {{id, body, retries, error, reason, key}...},
         cancels {attempt...}, gone {id...}} (crashed also holds jobs ended as cancelled, cancels
         the attempts of proc that q.cancel() marked: see fetch; gone, the jobs this call found
         without their hash and those other calls did, for proc to log: see job_gone in lib.lua);
status 0: proc was reaped (not renewed): it must abandon its buffer and register again;
-1: the same, because Redis lost the queue's state since it registered (see renew in lib.lua).
With a beat id, a resent call (the same proc and id) only renews, and returns the jobs
the first call found crashed and gone: each is reported once, by whoever gets the reply. ]]
even_if_full()
local proc, lease, max_crash, bid = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5] or ''
local now = now_ms()
local renewed, lost = renew(proc, now, lease, ARGV[4])
if not renewed then return {lost and -1 or 0, now, {}, {}, {}} end
local cancels = redis.call('SMEMBERS', cancels_key(proc))
if bid ~= '' then
  local last = redis.call('HGET', K_BEATEN, proc)
  last = last and cjson.decode(last) -- {beat id, crashed, gone}
  if last and last[1] == bid then return {1, now, last[2], cancels, last[3] or {}} end
end
local crashed = {}
reap(now, max_crash, crashed)
if bid ~= '' then hand_out_reports(crashed) else -- (a resend must see the same rows)
  reported_by_reply(crashed)
  keep_ended()
end
flush_head()
local lost = gone_ids(true)
flush_counts()
if bid ~= '' then
  handed(proc, crashed, 'b' .. bid) -- (first: it gives each row its key, which a resent reply repeats)
  redis.call('HSET', K_BEATEN, proc, cjson.encode({bid, crashed, lost}))
end
return {1, now, crashed, cancels, lost}
