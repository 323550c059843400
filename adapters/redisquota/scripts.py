"""The Lua scripts: each allocation is one script run inside Redis, so it is atomic across hubs.

As in Mixer's redisquota, the caller passes the time (microseconds since the epoch here), every
hub sharing a Redis must keep its clock in sync, and a request's answer is remembered under a
deduplication key until its grant expires, so a retried request is charged once.

Every key a script touches is in KEYS (Redis Cluster routes and checks a script by them) and
shares the quota key's hash tag, so one allocation is one slot: KEYS = the quota key, its
deduplication key (``<key>;dedup=<id>``, untouched when the id is empty), and for the rolling
window the buckets' key. ARGV (both scripts) = maxAmount, window (us), bucket (us), best effort
(0|1), amount, now (us), deduplication id. Result: {granted amount, microseconds the grant holds}.
"""

from __future__ import annotations

_COMMON_HEAD = """
local key = KEYS[1]
local max_amount = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local bucket = tonumber(ARGV[3])
local best_effort = ARGV[4] == '1'
local amount = tonumber(ARGV[5])
local now = tonumber(ARGV[6])
local dedup = ARGV[7]
-- keys outlive their window a little, so a hub whose clock lags still finds them
local ttl_ms = math.ceil(window / 1000) + 1000

local dedup_key = KEYS[2]
if dedup ~= '' then
  local seen = redis.call('HMGET', dedup_key, 'granted', 'expires')
  local granted, expires = tonumber(seen[1]), tonumber(seen[2])
  if granted and expires and now < expires then
    return {granted, expires - now}
  end
end

local function grant(used)
  local available = max_amount - used
  if available >= amount then
    return amount
  end
  if best_effort and available > 0 then
    return available
  end
  return 0
end

local function remember(granted, expires)
  if dedup ~= '' and granted > 0 then
    redis.call('HSET', dedup_key, 'granted', granted, 'expires', expires)
    redis.call('PEXPIRE', dedup_key, math.ceil((expires - now) / 1000) + 1)
  end
end
"""

FIXED_WINDOW = (
    _COMMON_HEAD
    + """
-- one hash per key: what the current window has used, and when it ends
local state = redis.call('HMGET', key, 'used', 'expires')
local used, expires = tonumber(state[1]), tonumber(state[2])
if not used or not expires or now >= expires then
  used = 0
  expires = now + window
  redis.call('HSET', key, 'used', 0, 'expires', expires)
  redis.call('PEXPIRE', key, ttl_ms)
end

local granted = grant(used)
if granted == 0 then
  return {0, 0}
end
redis.call('HSET', key, 'used', used + granted)
remember(granted, expires)
return {granted, expires - now}
"""
)

ROLLING_WINDOW = (
    _COMMON_HEAD
    + """
-- a hash per key (used in the window, the open bucket's amount and start, a sequence) and a
-- sorted set of closed buckets ('<seq>.<amount>' scored by the bucket's start)
local data = KEYS[3]
local state = redis.call('HMGET', key, 'used', 'bucket_used', 'bucket_start')
local used, bucket_used, bucket_start = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
if not used or not bucket_used or not bucket_start then
  used, bucket_used, bucket_start = 0, 0, now
end

-- close the open bucket once it is a bucket old
if now - bucket_start >= bucket then
  if bucket_used > 0 then
    local seq = redis.call('HINCRBY', key, 'seq', 1)
    redis.call('ZADD', data, bucket_start, tostring(seq) .. '.' .. tostring(bucket_used))
  end
  bucket_used, bucket_start = 0, now
end

-- give back what the buckets that left the window held
local cutoff = now - window
local gone = redis.call('ZRANGEBYSCORE', data, '-inf', cutoff)
for _, member in ipairs(gone) do
  used = used - tonumber(string.match(member, '%.(%d+)$'))
end
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', data, '-inf', cutoff)
end
if used < 0 then
  used = 0
end

local granted = grant(used)
redis.call('HSET', key, 'used', used + granted, 'bucket_used', bucket_used + granted,
  'bucket_start', bucket_start)
redis.call('PEXPIRE', key, ttl_ms)
redis.call('PEXPIRE', data, ttl_ms)
if granted == 0 then
  return {0, 0}
end
remember(granted, now + window)
return {granted, window}
"""
)
