--[[ stats: the shared queue's sizes and counters, read at one instant (get_stats).
KEYS[1] prefix. ARGV: buffer_size (optional; absent or 0: the one fetch keeps, see cap in lib.lua).
Reads only.
Returns {high, medium, low, delayed, counters {name, value, ...}, waiting}, as lib.lua's
queue_sizes: due jobs beyond the buffer's room count in waiting (waiting_for_room). ]]
buffer_cap = tonumber(ARGV[1] or '0') or 0
if buffer_cap <= 0 then buffer_cap = nil end
return {queue_sizes(cap())}
