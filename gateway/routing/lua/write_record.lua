-- write_record.lua: replace one sandbox record, bump its generation and publish the
-- invalidation, atomically. The only script a writer needs; the lifecycle rules are
-- applied by the writer before it calls this (docs/route-table.md, "Writing").
--
-- KEYS[1]  gw:{label}:sandbox   the record hash
-- KEYS[2]  gw:{label}:gen       the label's generation counter (never expires)
-- ARGV[1]  expected generation: the value of KEYS[2] the writer read ("0" if absent)
-- ARGV[2]  expire the record after this many seconds ("0": never; tombstones use it)
-- ARGV[3]  the invalidation channel (gw:invalidate)
-- ARGV[4]  the label
-- ARGV[5..] field, value, field, value, ... of the new record (none: delete the record)
--
-- Returns {1, new_gen} on success, or {0, current_gen} when the generation moved since
-- the writer read it (another write won the race: read again and retry).
-- Compatible with Redis 6.2 and later (and with Redis Cluster: both keys share a slot).
local current = redis.call('GET', KEYS[2]) or '0'
if current ~= ARGV[1] then
  return {0, tonumber(current)}
end
local gen = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
if #ARGV > 4 then
  local fields = {'gen', tostring(gen)}
  for i = 5, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  local ttl = tonumber(ARGV[2])
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
  end
end
-- The message carries Redis's clock in milliseconds, so subscribers can measure how long
-- the invalidation took to reach them (readers must also accept "label gen" alone).
local now = redis.call('TIME')
local millis = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. gen .. ' ' .. millis)
return {1, gen}
