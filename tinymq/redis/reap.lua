--[[ reap: give back the attempts of up to two processes whose lease expired.
KEYS[1] prefix. ARGV: max crash recoveries.
Returns {reaped process count, crashed {{id, body, retries, error, reason}...}}
(a marked job of a reaped process ends as cancelled: reason 'cancelled'). Nothing keeps
the rows: their jobs count as finished as the reply hands them out (reported_by_reply). ]]
even_if_full()
local crashed = {}
local now = now_ms()
mind_the_gap(now, nil)
local n = reap(now, tonumber(ARGV[1]), crashed)
hand_out_ended(crashed)
reported_by_reply(crashed)
flush_head()
flush_counts()
return {n, crashed}
