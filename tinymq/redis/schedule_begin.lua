--[[ schedule_begin: the shared grid of an `every` schedule (q.every over a broker).
KEYS[1] prefix. ARGV: name, interval us, first delay us.
Key schedule:<name> HASH: anchor (server us of tick 0), interval (us), last (the last
claimed tick), job (its job id), by/outcome (who claimed it, and what it decided).
The first process to begin the schedule sets its grid (tick k is due at anchor + k * interval);
the others join it. A different interval starts a new grid (the previous job still counts
for the no-pile-up rule).
A cron schedule begins with interval 0: it has no grid, and drops any grid of an every
schedule that had the name. Its claims are tick times in ms, far beyond any index of such a
grid: an every schedule under the name again (a rollback) starts a new grid instead of
finding each of its ticks claimed already. The claims stay: the cron ticks are claimed once.
Returns {anchor us, interval us, server now us}. ]]
local key = P .. 'schedule:' .. ARGV[1]
now_ms()
if ARGV[2] == '0' then
  redis.call('HDEL', key, 'anchor', 'interval')
  return {'0', '0', string.format('%.0f', now_us)}
end
local s = redis.call('HMGET', key, 'anchor', 'interval')
if not s[1] or s[2] ~= ARGV[2] then
  local anchor = now_us + tonumber(ARGV[3])
  redis.call('HDEL', key, 'last', 'by', 'outcome')
  redis.call('HSET', key, 'anchor', string.format('%.0f', anchor), 'interval', ARGV[2])
  s = {string.format('%.0f', anchor), ARGV[2]}
end
return {s[1], s[2], string.format('%.0f', now_us)}
