--[[ limits: set the global per-type limits (max concurrent attempts).
KEYS[1] prefix. ARGV: type, limit, type, limit, ... Jobs parked for a type that now has
free slots go back to the head of their level (at most one per free slot), in order.
Returns the number of jobs unparked. ]]
local unparked = 0
for i = 1, #ARGV, 2 do
  local t, limit = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('HSET', K_LIMITS, t, limit)
  local free = limit - (tonumber(redis.call('HGET', K_RUNNING, t)) or 0)
  while free > 0 and redis.call('HEXISTS', K_PARKEDN, t) == 1 and unparked < PARK_PER_CALL do
    if not unpark_one(t) then break end
    free = free - 1
    unparked = unparked + 1
  end
end
flush_head()
flush_counts()
return unparked
