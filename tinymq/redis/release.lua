--[[ release: a process leaves (stop): settle its last ops, then unregister.
KEYS[1] prefix. ARGV: proc, settle count, then the ops (B ops for unstarted jobs).
Whatever it still holds afterwards is handed back without counting a crash: L attempts
go back to the head of their level, X attempts free their slot.
Returns the number of stale ops. ]]
local proc = ARGV[1]
local stale = settle(proc, ARGV, 3, tonumber(ARGV[2]), now_ms())
local ik = inflight_key(proc)
local entries = redis.call('HGETALL', ik)
for i = 1, #entries, 2 do
  local state, t = string.sub(entries[i + 1], 1, 1), string.sub(entries[i + 1], 2)
  if state ~= 'R' then release_slot(t) end
  if state ~= 'X' then give_back(id_of(entries[i])) end
end
flush_released()
redis.call('DEL', ik)
redis.call('ZREM', K_PROCS, proc)
redis.call('HDEL', K_FETCHED, proc)
redis.call('HDEL', K_BEATEN, proc)
flush_head() -- everything given back, and what it unparked, in FIFO order
flush_counts()
return stale
