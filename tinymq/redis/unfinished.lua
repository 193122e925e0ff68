--[[ unfinished: whether join() waits on (reads only).
KEYS[1] prefix; no ARGV.
Returns {waits, began}: waits 1 while stats.outstanding is above 0, or while a job waits in a
ready list or in `delayed`: one that another program wrote there is counted in outstanding
only once a fetch (or a cancel) sees it (see fetch.lua), and join() must not return before
it ran; else 0. began: when the queue's state began (the clock hash's e, see renew in
lib.lua; '' before a worker process registered): '', or a later value, after a look that
got a value means that Redis lost the jobs join() waited for (an earlier one: a process
registered after the server's clock was stepped back). Work: constant. ]]
local began = redis.call('HGET', K_CLOCK, 'e') or ''
if (tonumber(redis.call('HGET', K_STATS, 'outstanding')) or 0) > 0 then return {1, began} end
if ready_left() > 0 or redis.call('ZCARD', K_DELAYED) > 0 then return {1, began} end
return {0, began}
