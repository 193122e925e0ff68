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
already in `capped` and not yet due (a due one, even one no fetch has promoted yet, has left
`capped`), never one being added; the new job is always added.
Each accepted token is kept in tokens:<span> for 2 to 3 TOKEN_SPANs, far longer than a
client resends (its socket timeouts, twice): a resend is then recognised even when its
jobs have finished since (their hashes, with the token, are gone). ]]
return enqueue_jobs(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), 5)
