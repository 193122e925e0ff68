--[[ unfinished: whether join() waits on (reads only).
KEYS[1] prefix; no ARGV.
Returns 1 while stats.outstanding is above 0, or while a job waits in a ready list or in
`delayed`: one that another program wrote there is counted in outstanding only once a
fetch (or a cancel) sees it (see fetch.lua), and join() must not return before it ran.
Else 0. Work: constant. ]]
if (tonumber(redis.call('HGET', K_STATS, 'outstanding')) or 0) > 0 then return 1 end
if ready_left() > 0 or redis.call('ZCARD', K_DELAYED) > 0 then return 1 end
return 0
