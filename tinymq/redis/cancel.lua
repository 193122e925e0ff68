--[[ cancel: end the unfinished job id as cancelled (q.cancel over a broker).
KEYS[1] prefix. ARGV: token (a resend of this call is recognised by it), id, the caller's
process id ('' for none), and a lease in ms (optional, 0: none) with which a caller that
holds no lease registers for the report alone (a producer-only or stopping process, under
an id of this call's own: it releases that id once its callbacks ran), and take_back
(optional, '': a plain cancel): the token of the enqueue whose job this takes back (an
aenqueue cancelled just as its job got in). Then only that enqueue's job is cancelled (an
id whose job has another token is {0}: it ended, and a newer job has the id), and the dead
job that its enqueue replaced, if any, comes back (see bring_back_replaced in lib.lua): at
once when it was waiting, when its attempt ends when it was leased.
Returns one of
  {0}                                     no unfinished job has that id (unknown, finished,
                                          dead, or cancelled already)
  {1, {id, body, retries, error, 'cancelled'[, key]}, kept}
                                          it was waiting (ready, delayed, parked): removed,
                                          its hash deleted, counted; the caller reports it.
                                          kept = 1: the caller is registered (or just
                                          registered for this report), and the row
                                          waits in reporting:<proc> too, by
                                          "<id>|cancelled|<token>", until it acknowledges
                                          it (op A), as the rows a fetch hands it: if it dies
                                          first, its reaper reports the job; until then the
                                          job counts as unfinished (see held_row in lib.lua).
                                          0: not kept, the job counts as finished at once
  {2, proc, attempt}                      it is leased to proc (buffered or running there):
                                          the attempt is marked (cancels:<proc>) and its job
                                          hash moved to cancelled:<proc>|<attempt>, so the id
                                          is free for a new job at once, as in-process; proc
                                          hears of it in its next fetch or beat reply and
                                          cancels it, and its settle ends the job as cancelled,
                                          whatever its outcome (a failure for good included:
                                          see settle in lib.lua)
A ready or parked job removed makes room in the buffer: a due job that waited for room
goes in (promote_due), and an idle process is woken for it.
A ready job removed while jobs of its type are parked and the type has a free slot lets the
first of them out (it may have been the job let out for that slot), so none waits for a slot
that is free. Removing a waiting job looks through its ready or parked list (O(length)); finding a leased
one looks through the inflight hashes of the live processes. Cancelling is rare: the hot
paths (fetch, settle) pay one EXISTS per call for it.
The reply is kept under the token (see keep_reply in lib.lua), as enqueue's. ]]
even_if_full()
local token, id, caller, lease = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]) or 0
local take_back = ARGV[5] or ''
local now = now_ms()
local seen = kept_reply(token)
if seen then return cjson.decode(seen) end

-- A waiting job removed from the buffer: its room goes to a due job that waited for it, if any
-- (see promote_due), and an idle process hears of it.
local function room_made()
  promote_due()
  if promoted > 0 then signal() end
end

local function cancel()
  local jk = job_key(id)
  local f = job_fields(jk, 't', 'p', 'x', 'b', 'r', 'e', 'k', 'u') -- (none: a lost job, see lib.lua)
  local t, p = f[1], f[2] and level_of(f[2])
  if not t or not p or f[3] then return {0} end -- (a marked job's hash is no longer here)
  if take_back ~= '' and f[7] ~= take_back then return {0} end
  local function removed()
    redis.call('DEL', jk)
    count('cancelled', 1)
    if not f[7] then count('outstanding', 1) end -- (another program's job: never counted, see fetch.lua)
    if take_back ~= '' and f[8] then bring_back_replaced(f[8], id) end
    local row = held_row(id, f[4], f[5], f[6], 'cancelled')
    if keeps_rows(caller, now, lease) then
      -- (by its token: an A of an earlier cancel of this id leaves this row)
      handed(caller, {row}, token, {id .. '|cancelled|' .. token})
      return {1, row, 1} -- (the row with its key, which the caller acknowledges)
    end
    reported_by_reply({row})
    return {1, row, 0}
  end
  if redis.call('LREM', READY[p], 1, id) == 1 then
    -- It may have been the ready job that a free slot of its type waited for while older jobs
    -- of the type stay parked (a raised limit let it out for that slot): let one of them out
    -- instead, else they wait for an attempt of the type to end.
    if unpark_into_free_slots(t, tonumber(redis.call('HGET', K_LIMITS, t)), 1) > 0 then flush_head() end
    local reply = removed()
    room_made()
    return reply
  end
  if redis.call('ZREM', K_DELAYED, id) == 1 then
    redis.call('ZREM', K_CAPPED, id)
    return removed()
  end
  if redis.call('LREM', parked_key(p, t), 1, id) == 1 then
    if redis.call('HINCRBY', K_PARKEDN, t, -1) <= 0 then redis.call('HDEL', K_PARKEDN, t) end
    count('parked:' .. p, -1)
    local reply = removed()
    room_made()
    return reply
  end
  for _, proc in ipairs(redis.call('ZRANGE', K_PROCS, 0, -1)) do
    local entries = redis.call('HGETALL', inflight_key(proc))
    for i = 1, #entries, 2 do
      local attempt, state = entries[i], string.sub(entries[i + 1], 1, 1)
      -- (an X attempt's job is decided; a marked one's is an older job of this id: not here)
      if state ~= 'X' and id_of(attempt) == id and redis.call('SISMEMBER', cancels_key(proc), attempt) == 0 then
        if take_back ~= '' and f[8] then -- its end brings the dead job back: kept until then
          redis.call('HSET', jk, 'w', f[8])
          redis.call('PERSIST', f[8])
        end
        redis.call('RENAME', jk, marked_key(proc, attempt))
        redis.call('SADD', cancels_key(proc), attempt)
        local wake = wake_key(proc) -- an idle owner hears of it at once
        if redis.call('LLEN', wake) == 0 then redis.call('RPUSH', wake, '1') end
        return {2, proc, attempt}
      end
    end
  end
  return {0} -- (an unfinished job in no place breaks an invariant; nothing to cancel)
end

local reply = cancel()
keep_reply(token, reply)
flush_counts()
return reply
