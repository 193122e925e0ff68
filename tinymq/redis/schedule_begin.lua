--[[ schedule_begin: the shared grid of an `every` schedule (q.every over a broker).
KEYS[1] prefix. ARGV: name, interval us, first delay us.
Key schedule:<name> HASH: anchor (server us of tick 0), interval (us), last (the last
claimed tick, as its time in us: see schedule_tick.lua), job (its job id), by/outcome (who
claimed it, and what it decided).
The first process to begin the schedule sets its grid (tick k is due at anchor + k * interval);
the others join it. A different interval starts a new grid; the claims stay (they are times:
the new grid's ticks come after them), and the previous job still counts for the no-pile-up
rule.
Returns {anchor us, interval us, server now us}. ]]
even_if_full()
local key = P .. 'schedule:' .. ARGV[1]
now_ms()
local s = redis.call('HMGET', key, 'anchor', 'interval')
if not s[1] or s[2] ~= ARGV[2] then
  local anchor = now_us + tonumber(ARGV[3])
  redis.call('HSET', key, 'anchor', string.format('%.0f', anchor), 'interval', ARGV[2])
  s = {string.format('%.0f', anchor), ARGV[2]}
end
return {s[1], s[2], string.format('%.0f', now_us)}
