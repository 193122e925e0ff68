--[[ purge_dead: delete dead jobs.
KEYS[1] prefix. ARGV: ids (the client pages). Ids that are not dead are skipped.
Returns how many were deleted. ]]
even_if_full()
local n = 0
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', K_DEAD, id) == 1 then
    redis.call('DEL', job_key(id))
    n = n + 1
  end
end
return n
