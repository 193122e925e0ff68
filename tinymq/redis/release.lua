--[[ release: a process leaves (stop): settle its last ops, then unregister.
KEYS[1] prefix. ARGV: proc, settle count, then the ops (B ops for unstarted jobs).
Whatever it still holds afterwards is handed back without counting a crash: L attempts
go back to the head of their level, X attempts free their slot.
Returns {stale ops, overruled {{attempt, type}...}} (the ops a mark made cancels: see settle
in lib.lua, and fetch.lua's reply). ]]
even_if_full()
local proc = ARGV[1]
local now = now_ms()
local stale, overruled = settle(proc, ARGV, 3, tonumber(ARGV[2]), now)
drop_proc(proc, now, nil, nil)
keep_ended() -- proc leaves: another process's next beat reports them (unfinished until then: held_row)
flush_head() -- everything given back, and what it unparked, in FIFO order
flush_counts()
return {stale, overruled}
