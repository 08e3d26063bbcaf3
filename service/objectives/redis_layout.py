"""The shared feedback store's layout in Redis: its keys, and the script that labels rows.

Keys (prefix quorum:): p:<id> a prediction (TTL), l:<id> its labelled rows (a set: a row is
scored once across the fleet; TTL), r:<model> the last `window` labelled rows (a list),
s:<model> rows ever pushed (read to skip unchanged windows), c:<model> labelled/correct
counters per member and version (a hash: "labelled|<member>|<version>"), models (a set).
Only p: and l: keys expire: with maxmemory-policy volatile-ttl, they are what Redis evicts.
"""

from __future__ import annotations

KEY = "quorum:"

LABEL_SCRIPT = """
local ttl, window, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local added, pushed, i = {}, {}, 4
while i <= #ARGV do
  local labelled, row, model, blob, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  local new = redis.call('SADD', labelled, row)
  redis.call('EXPIRE', labelled, ttl)
  if new == 1 then
    redis.call('RPUSH', prefix .. 'r:' .. model, blob)
    for f = 1, n do redis.call('HINCRBY', prefix .. 'c:' .. model, ARGV[i + 4 + f], 1) end
    pushed[model] = (pushed[model] or 0) + 1
  end
  added[#added + 1] = new
  i = i + 5 + n
end
for model, count in pairs(pushed) do
  redis.call('LTRIM', prefix .. 'r:' .. model, -window, -1)
  redis.call('INCRBY', prefix .. 's:' .. model, count)
  redis.call('SADD', prefix .. 'models', model)
end
return added
"""
"""Labels rows atomically: SADD answers 1 only to the first call, on any replica, to label a
row; that row is then pushed to its model's window and counted, in the same step. (Keys are
built inside the script: a single Redis, not Redis Cluster.)"""

WRITE_SCRIPT = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1]) end
return #KEYS
"""
"""Stores a batch of predictions with their TTL in one command: a pipeline of one SET per
prediction cost the server's event loop about 14 us a prediction in redis-py, this about 5."""
