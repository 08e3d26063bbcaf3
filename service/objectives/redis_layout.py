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
local ttl, window, prefix, deadline = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now = redis.call('TIME')
if now[1] + now[2] / 1000000 > deadline then
  return redis.error_reply('LATE the labels arrived after the call had given up: none was counted')
end
local out, pushed, heads = {}, {}, {}
local function argmax(blob, at, classes)
  local best, index = nil, 0
  for k = 0, classes - 1 do
    local p = struct.unpack('<f', blob, at + 4 * k)
    if p ~= p then return k end
    if best == nil or p > best then best, index = p, k end
  end
  return index
end
local function label(row, blob, body, h, truth)
  local n, classes, members, model = h.n, #h.l, h.s, h.m
  local correct = struct.unpack('<i8', blob, body + 8 * row) == truth and 1 or 0
  local separate = (#members > 1 or members[1][1] ~= model) and 1 or 0
  local counts, probs = prefix .. 'c:' .. model, {}
  redis.call('HINCRBY', counts, 'labelled||' .. h.v, 1)
  if correct == 1 then redis.call('HINCRBY', counts, 'correct||' .. h.v, 1) end
  for m, member in ipairs(members) do
    local at = body + 8 * n + 4 * classes * (n * (m - 1) + row)
    probs[m] = string.sub(blob, at, at + 4 * classes - 1)
    if separate == 1 then
      local field = '|' .. member[1] .. '|' .. member[2]
      redis.call('HINCRBY', counts, 'labelled' .. field, 1)
      if argmax(blob, at, classes) == truth then redis.call('HINCRBY', counts, 'correct' .. field, 1) end
    end
  end
  local head = {truth, correct, separate, classes, members}
  if h.u then
    local coverage, risk, at = h.u[1], h.u[2], body + 8 * n + 4 * classes * n * #members
    local covered, answered = 0, 0
    if coverage ~= cjson.null then
      covered = string.byte(blob, at + classes * row + truth) ~= 0 and 1 or 0
      at = at + classes * n
    end
    if risk ~= cjson.null then answered = string.byte(blob, at + row) == 0 and 1 or 0 end
    head[6] = {coverage, covered, risk, answered, (answered == 1 and correct == 0) and 1 or 0}
  end
  local row_blob = cjson.encode(head) .. '\\n' .. table.concat(probs)
  redis.call('RPUSH', prefix .. 'r:' .. model, row_blob)
  pushed[model] = (pushed[model] or 0) + 1
  return {model, h.v, row_blob}
end
for i = 5, #ARGV, 3 do
  local id, row, result = ARGV[i], tonumber(ARGV[i + 1]), 0
  local blob = redis.call('GET', prefix .. 'p:' .. id)
  if blob then
    result = 1
    local cut = string.find(blob, '\\n', 1, true)
    local text = string.sub(blob, 1, cut - 1)
    local h = heads[text]
    if h == nil then
      h = cjson.decode(text)
      h.index = {}
      for k = #h.l, 1, -1 do h.index[h.l[k]] = k - 1 end
      heads[text] = h
    end
    local truth = h.index[ARGV[i + 2]]
    if truth ~= nil and row ~= nil and row >= 0 and row < h.n and row % 1 == 0 then
      local labelled = prefix .. 'l:' .. id
      local new = redis.call('SADD', labelled, ARGV[i + 1])
      redis.call('EXPIRE', labelled, ttl)
      if new == 1 then result = label(row, blob, cut + 1, h, truth) end
    end
  end
  out[#out + 1] = result
end
for model, count in pairs(pushed) do
  redis.call('LTRIM', prefix .. 'r:' .. model, -window, -1)
  redis.call('INCRBY', prefix .. 's:' .. model, count)
  redis.call('SADD', prefix .. 'models', model)
end
return out
"""
"""Labels rows in one round trip, atomically: ARGV is (ttl, window, prefix, deadline) then
(request id, row, label) per label. A script that runs after its deadline (Redis's clock: the
moment the caller gives up, Redis frozen meanwhile) labels nothing: a call answered
UNAVAILABLE has counted nothing, and its labels are accepted when sent again. Each answers 0 (no such prediction: unknown or expired), 1 (rejected:
no such row or label, or the row is already labelled, by this call or another on any replica)
or (model, version, the row as the window keeps it) for a row it labelled: SADD answers 1 only
to the first call to label a row, which is then scored (the answer's and, in an ensemble, each
member's argmax against the truth, as service/objectives/store.py's `score`), pushed to its
model's window and counted in the same step. The prediction's layout: state_codec.py. (Keys
are built inside the script: a single Redis, not Redis Cluster.)"""

WRITE_SCRIPT = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1]) end
return #KEYS
"""
"""Stores a batch of predictions with their TTL in one command: a pipeline of one SET per
prediction cost the server's event loop about 14 us a prediction in redis-py, this about 5."""
