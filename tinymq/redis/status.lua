--[[ status: every figure `python -m tinymq status --redis` prints, read at one instant, so
that they agree (a job is counted in exactly one place: ready, waiting for room, delayed, taken
or dead).
KEYS[1] prefix. ARGV: shown, the dead jobs to read, the newest (the others are only counted);
unknown_room, the due jobs to place at most while no fetch has kept a buffer_size (see cap).
Reads only.
Returns {high, medium, low, delayed, counters, limits, running, processes, rates, dead count, dead,
         waiting, buffer_size}:
  high .. counters  as lib.lua's queue_sizes, with the buffer_size the worker processes' fetches
                    keep (cap): a due job counts in its level's size while the buffer has room for
                    it, and in waiting beyond that room. While no fetch has kept one, the room is
                    unknown, and the first unknown_room due jobs are placed, the rest counted in
                    waiting (a read of every due job's priority cost Redis one read per job
                    waiting for room: 60 ms for 20,000, with nobody else served meanwhile);
  limits, running   HGETALL of limits (type -> max concurrent attempts) and running
                    (type -> attempts holding a slot);
  processes         worker processes whose lease has not run out (reporters, "~", left out);
  rates             {type, "max_starts:per ms", starts in the window now, ...};
  dead count        every dead job;
  dead              {{id, body, retries, error, reason}, ...}: the newest `shown`, oldest death first;
  waiting           the due jobs not placed (their priorities not read);
  buffer_size       the one the fetches keep, 0 if none has.
Work: one read per dead job shown, whatever the number of dead jobs, and one per due job placed
(at most the buffer's room, or unknown_room), whatever the number of due jobs. ]]
local room = cap()
local high, medium, low, delayed, counters, waiting = queue_sizes(room, room == math.huge and tonumber(ARGV[2]) or nil)
local processes = 0
for _, proc in ipairs(redis.call('ZRANGEBYSCORE', K_PROCS, now_ms(), '+inf')) do
  if not string.find(proc, '~', 1, true) then processes = processes + 1 end
end
local rates = redis.call('HGETALL', K_RATE_LIMITS)
local rate_rows = {}
for i = 1, #rates, 2 do -- starts still in the window: entries ending after now (+inf: handed out)
  local k = rate_key(rates[i])
  local ended = redis.call('ZCOUNT', k, '-inf', exact_ms())
  table.insert(rate_rows, rates[i])
  table.insert(rate_rows, rates[i + 1])
  table.insert(rate_rows, redis.call('ZCARD', k) - ended)
end
local shown = tonumber(ARGV[1])
local dead = {}
if shown > 0 then
  for _, id in ipairs(redis.call('ZRANGE', K_DEAD, -shown, -1)) do
    local row = job_fields(job_key(id), 'b', 'r', 'e', 'x') -- (none: another program's value, see lib.lua)
    if row[1] then table.insert(dead, {id, row[1], row[2] or '0', row[3] or '', row[4] or ''}) end
  end
end
return {high, medium, low, delayed, counters, redis.call('HGETALL', K_LIMITS),
        redis.call('HGETALL', K_RUNNING), processes, rate_rows, redis.call('ZCARD', K_DEAD), dead,
        waiting, room == math.huge and 0 or room}
