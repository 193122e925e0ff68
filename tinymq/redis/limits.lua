--[[ limits: set the global per-type limits (max concurrent attempts, and the rate limit).
KEYS[1] prefix. ARGV: only missing ('1': set only the types that have no limits here, the
limits a process sends again when it registers again, after Redis may have lost them), then
type, limit, max starts, per ms, type, ... (max starts 0: no rate
limit). Whoever sets a type's limits last wins, as for the concurrency limit; a changed
rate limit applies to hand-outs from now on (starts already counted keep their window
end). Jobs parked for a type that now has free slots and room in its rate window go back
to the head of their level (at most one per free slot), in order.
Returns the number of jobs unparked. ]]
even_if_full()
now_ms()
local unparked = 0
for i = 2, #ARGV, 4 do
  local t, limit = ARGV[i], tonumber(ARGV[i + 1])
  local max_starts = tonumber(ARGV[i + 2])
  if ARGV[1] ~= '1' or redis.call('HEXISTS', K_LIMITS, t) == 0 then
    redis.call('HSET', K_LIMITS, t, limit)
    if max_starts > 0 then
      -- (as sent, not as Lua prints a number: 10^14 would read '1e+14', per ms '1e+15')
      redis.call('HSET', K_RATE_LIMITS, t, ARGV[i + 2] .. ':' .. ARGV[i + 3])
    elseif redis.call('HDEL', K_RATE_LIMITS, t) == 1 then
      redis.call('DEL', rate_key(t))
      redis.call('ZREM', K_RATE_OPEN, t)
    end
    rate_limits[t] = nil -- (read again)
    unparked = unparked + unpark_into_free_slots(t, limit, PARK_PER_CALL - unparked)
    if max_starts > 0 and redis.call('HEXISTS', K_PARKEDN, t) == 1 then rate_wait(t) end
  end
end
flush_head()
flush_counts()
return unparked
