--[[ settle: record a batch of attempt outcomes (ops of lib.lua's settle) for proc.
KEYS[1] prefix. ARGV: proc, settle count, then the ops (2 or 6 entries each).
Returns the number of stale ops (attempts no longer this process's, or resends). ]]
even_if_full()
local stale = settle(ARGV[1], ARGV, 3, tonumber(ARGV[2]), now_ms())
keep_ended() -- (the reply has no room for them: the next beat hands them out; unfinished until then)
flush_head()
flush_counts()
return stale
