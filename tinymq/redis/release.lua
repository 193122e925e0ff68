--[[ release: a process leaves (stop): settle its last ops, then unregister.
KEYS[1] prefix. ARGV: proc, settle count, then the ops (B ops for unstarted jobs).
Whatever it still holds afterwards is handed back without counting a crash: L attempts
go back to the head of their level, X attempts free their slot.
Returns {stale ops, overruled {{attempt, type}...}} (the ops a mark made cancels: see settle
in lib.lua, and fetch.lua's reply). The reply is kept (token:release|<proc>, TOKEN_KEPT): a
resent call (its reply was lost) gets it again, so that proc counts the same cancels, where
running again it would find every op stale and proc gone. ]]
even_if_full()
local proc = ARGV[1]
local token = 'release|' .. proc -- (a process releases once: its id is never registered again)
local kept = kept_reply(token)
if kept then return cjson.decode(kept) end
local now = now_ms()
local stale, overruled = settle(proc, ARGV, 3, tonumber(ARGV[2]), now)
drop_proc(proc, now, nil, nil)
keep_ended() -- proc leaves: another process's next beat reports them (unfinished until then: held_row)
flush_head() -- everything given back, and what it unparked, in FIFO order
flush_counts()
local reply = {stale, overruled}
keep_reply(token, reply)
return reply
