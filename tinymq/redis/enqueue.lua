--[[ enqueue: accept 1..N jobs, all or none.
KEYS[1] prefix. ARGV: token, buffer_size, max_delayed_jobs (0: unlimited), n,
then 5 per job: id, type, priority (0..2), delay ms (fractional; > 0: delayed), body.
Returns one of
  {'ok', {{id, body}, ...}}   accepted; the jobs evicted from the delayed set
                              (now dead, reason "evicted") for on_failure
  {'again', {{id, body}...}}  this token's batch was accepted already (a resend), with
                              what that call evicted: its reply was lost, so nobody
                              reported them yet
  {'dup', id}                 id is an unfinished job's: nothing enqueued
  {'full', ready}             the ready jobs would not fit: nothing enqueued
A job whose id is dead is replaced. The evicted job is the earliest-due one among those
already in `capped`, never one being added; the new job is always added.
Each accepted token is kept in tokens:<span> for 2 to 3 TOKEN_SPANs, far longer than a
client resends (its socket timeouts, twice): a resend is then recognised even when its
jobs have finished since (their hashes, with the token, are gone). ]]
local TOKEN_SPAN = 30000 -- ms
local token, buffer_size, max_delayed, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local span = math.floor(now / TOKEN_SPAN)
for s = span, span - 2, -1 do
  local seen = redis.call('HGET', P .. 'tokens:' .. s, token)
  if seen then return {'again', cjson.decode(seen)} end
end
local CHUNK = 1000 -- keys or ids per EXISTS or RPUSH: well under Lua's unpack limit
local ready_added = 0
local keys = {} -- the jobs' hash keys, in ARGV order
for i = 5, 4 + n * 5, 5 do
  table.insert(keys, job_key(ARGV[i]))
  if tonumber(ARGV[i + 3]) <= 0 then ready_added = ready_added + 1 end
end
local known = 0 -- ids that have a hash already: a batch of new ids needs no look at each one
for first = 1, n, CHUNK do
  known = known + redis.call('EXISTS', unpack(keys, first, math.min(first + CHUNK - 1, n)))
end
local dead = {} -- ids of dead jobs this batch replaces
if known > 0 then
  for i = 5, 4 + n * 5, 5 do
    local f = redis.call('HMGET', keys[(i - 5) / 5 + 1], 'k', 'x')
    if f[1] and not f[2] then
      if f[1] == token then return {'again', {}} end -- (accepted before tokens were kept)
      return {'dup', ARGV[i]}
    end
    if f[2] then dead[ARGV[i]] = true end
  end
end
if ready_added > 0 then
  local s = redis.call('HMGET', K_STATS, 'parked:0', 'parked:1', 'parked:2')
  local ready = ready_left() + (tonumber(s[1]) or 0) + (tonumber(s[2]) or 0) + (tonumber(s[3]) or 0)
  if ready + ready_added > buffer_size then return {'full', ready} end
end
local evicted = {}
local by_level = {[0] = {}, [1] = {}, [2] = {}}
local order = new_orders(n) -- (delayed jobs get theirs when they come due)
for i = 5, 4 + n * 5, 5 do
  local id, delay = ARGV[i], tonumber(ARGV[i + 3])
  local jk = keys[(i - 5) / 5 + 1]
  if dead[id] then
    redis.call('ZREM', K_DEAD, id)
    redis.call('DEL', jk)
  end
  if delay > 0 then
    redis.call('HSET', jk, 't', ARGV[i + 1], 'p', ARGV[i + 2], 'b', ARGV[i + 4], 'r', 0, 'k', token)
    if max_delayed > 0 and redis.call('ZCARD', K_CAPPED) >= max_delayed then
      local out = redis.call('ZPOPMIN', K_CAPPED)
      redis.call('ZREM', K_DELAYED, out[1])
      table.insert(evicted, {out[1], redis.call('HGET', job_key(out[1]), 'b')})
      job_dead(out[1], 'evicted', '', redis.call('HGET', job_key(out[1]), 'r') or '0', now)
      count('failed', -1) -- evictions have their own counter
      count('evicted', 1)
    end
    redis.call('ZADD', K_CAPPED, add_delayed(id, exact_ms() + delay), id)
  else
    redis.call('HSET', jk, 't', ARGV[i + 1], 'p', ARGV[i + 2], 'b', ARGV[i + 4], 'r', 0, 'k', token,
               'o', order + (i - 5) / 5)
    table.insert(by_level[tonumber(ARGV[i + 2])], id)
  end
end
for p = 2, 0, -1 do -- one RPUSH per level and chunk, not one per job
  local ids = by_level[p]
  for first = 1, #ids, CHUNK do
    redis.call('RPUSH', READY[p], unpack(ids, first, math.min(first + CHUNK - 1, #ids)))
  end
end
local tokens = P .. 'tokens:' .. span
redis.call('HSET', tokens, token, cjson.encode(evicted))
if redis.call('TTL', tokens) < 0 then redis.call('PEXPIRE', tokens, 3 * TOKEN_SPAN) end
count('enqueued', n)
count('outstanding', n)
flush_counts()
if ready_added > 0 then signal() end
return {'ok', evicted}
