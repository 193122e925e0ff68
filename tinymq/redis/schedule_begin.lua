--[[ schedule_begin: the shared grid of an `every` schedule (q.every over a broker).
KEYS[1] prefix. ARGV: name, interval us, first delay us, definition (its first_at as given, or
''), rejoin ('1': the caller was told 'regrid' by schedule_tick; else '0'), then its first_at in
us (epoch), or '' or nothing without one: a new grid's tick 0 is then first_at on the server's
clock (the server's clock arbitrates the hosts': a host's wrong clock does not move the grid
every process keeps), or the server's now once it has passed; else first delay from now.
Key schedule:<name> HASH: anchor (server us of tick 0), interval (us), definition (what the
grid was set for besides its interval), last (the last claimed tick, as its time in us: see
schedule_tick.lua), job (its job id), by/outcome (who claimed it, and what it decided), grid
(anchor:interval of the `every` grid it was claimed on; '' for `cron`).
The first process to begin the schedule sets its grid (tick k is due at anchor + k * interval);
the others join it. A different interval, or a different definition (a first_at changed, or
a typo in it corrected, or a grid of an older version, which kept none), starts a new grid:
the schedule's definition is the one last begun, and a grid set far ahead by a wrong first_at
is not kept; nor is a grid without first_at more than CLOCK_SET_BACK (and an interval) ahead of
the server's clock, set before that clock was set back. A rejoining process (told 'regrid': another process began a new grid while it
ticked) joins the grid of its interval whatever it was set for, so that two definitions never
take the grid from each other at every tick. The claims stay (they are times: the new grid's
ticks come after them), and the previous job still counts for the no-pile-up rule.
Returns {anchor us, interval us, server now us}. ]]
even_if_full()
local CLOCK_SET_BACK = 3 * 3600 * 1000000 -- us: tinymq/_periodic.py's _CLOCK_SET_BACK
local key = P .. 'schedule:' .. ARGV[1]
now_ms()
local s = redis.call('HMGET', key, 'anchor', 'interval', 'definition')
-- A grid without first_at is set one interval from the server's now: one far further ahead was set
-- before the server's clock was set back, and would hold every process that begins it back as far.
local stale = s[1] and s[3] == '' and tonumber(s[1]) > now_us + tonumber(s[2]) + CLOCK_SET_BACK
if not s[1] or s[2] ~= ARGV[2] or (ARGV[5] ~= '1' and s[3] ~= ARGV[4]) or stale then
  local anchor = now_us + tonumber(ARGV[3])
  if ARGV[6] and ARGV[6] ~= '' then anchor = math.max(now_us, tonumber(ARGV[6])) end
  redis.call('HSET', key, 'anchor', string.format('%.0f', anchor), 'interval', ARGV[2], 'definition', ARGV[4])
  s = {string.format('%.0f', anchor), ARGV[2]}
end
return {s[1], s[2], string.format('%.0f', now_us)}
