--[[ stats: the shared queue's sizes and counters, read at one instant (get_stats).
KEYS[1] prefix. No ARGV. Reads only.
Returns {high, medium, low, delayed, counters {name, value, ...}}, as lib.lua's queue_sizes. ]]
return {queue_sizes()}
