--[[ enqueue: accept 1..N jobs, all or none.
KEYS[1] prefix. ARGV: token, buffer_size, max_delayed_jobs (0: unlimited), n, caller
(a process id, '' for none), lease ms (0: none), then 7 per job (lib.lua's ROW): id, type,
priority (0..2), delay ms (fractional; > 0: delayed), body, retries (the failed attempts the
job brings, which count against its max_retries), last error ('' for none: the job's
last_error, kept as in-process until an attempt of it fails).
Returns one of
  {'ok', {row, ...}}          accepted; the jobs evicted from the delayed set (now dead,
                              reason "evicted") for on_failure, as rows {id, body,
                              retries, error, 'evicted'[, key]}: with a key when they also
                              wait in reporting:<caller> until it acknowledges them (op A),
                              which they do when the caller holds a lease, or registers
                              one with `lease` (a reporter: see cancel.lua)
  {'again', {row...}}         this token's batch was accepted already (a resend), with
                              what that call evicted: its reply was lost, so nobody
                              reported them yet
  {'dup', id}                 id is an unfinished job's: nothing enqueued
  {'full', ready}             the ready jobs would not fit: nothing enqueued
Before ready jobs go to the tail of their level, the delayed jobs due by now go there
(promote_due: at most PROMOTE_PER_CALL, the earliest first), so a due job keeps its FIFO
place ahead of jobs enqueued after it came due; the buffer check counts the due jobs beyond
that bound or the buffer's room, still in `delayed`, as ready (stats.lua counts those beyond
the room as waiting for room): no job goes in while one owed a place waits for room. An enqueue of only delayed
jobs moves none: it puts nothing at a tail. A job whose id is dead is replaced.
The evicted job is the earliest-due one among those
already in `capped` and not yet due (a due one, even one no call has promoted yet, has left
`capped`), never one being added; the new job is always added.
Each accepted token is kept in token:<token> for TOKEN_KEPT, far longer than a client
resends (its socket timeouts, twice): a resend is then recognised even when its jobs have
finished since (their hashes, with the token, are gone). ]]
refuse_if_full()
return enqueue_jobs(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), 7, ARGV[5], tonumber(ARGV[6]))
