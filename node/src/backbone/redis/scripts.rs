//! The Redis backbone's Lua scripts: each of its atomic steps, run inside Redis. The key
//! and field names they use are those of `tether_proto::backbone` (`RedisKeys`,
//! `conn_field`, `instance_member`), passed in as KEYS and ARGV wherever the caller knows
//! them; only the reaper builds names itself (a dead instance's keys are known only there).

/// The atomic publish step, for one or more consecutive messages of one client to one room.
///
/// KEYS: meta hash, log stream, channel, and for an idempotent publish of one message its
/// dedup key. ARGV: a fresh epoch to use if the room has none, history length, log TTL in
/// ms, dedup TTL in ms, then one frame prefix (ending in `"seq":`) per message. Each message
/// gets the next seq, in order, and is logged, then published, before the next.
///
/// Returns {last seq, epoch, 0}; with a dedup key already set (the same message published
/// within its TTL), nothing is done and {its seq, its epoch, 1} comes back.
///
/// A counter that starts again at 1 means Redis lost the room's state (restart without
/// persistence, eviction): the room gets a new epoch and its stale log, if any survived, is
/// dropped, so `(epoch, seq)` never repeats.
pub(super) const PUBLISH_LUA: &str = r#"
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local bar = string.find(seen, '|', 1, true)
    return {tonumber(string.sub(seen, 1, bar - 1)), string.sub(seen, bar + 1), 1}
  end
end
local n = #ARGV - 4
local last = redis.call('HINCRBY', KEYS[1], 'seq', n)
local first = last - n + 1
local epoch
if first == 1 then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])
else
  epoch = redis.call('HGET', KEYS[1], 'epoch')
  if not epoch then
    epoch = ARGV[1]
    redis.call('HSET', KEYS[1], 'epoch', epoch)
  end
end
local tail = ',"epoch":"' .. epoch .. '"}'
for i = 1, n do
  local seq = first + i - 1
  local frame = ARGV[4 + i] .. seq .. tail
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-0', 'f', frame)
  redis.call('PUBLISH', KEYS[3], frame)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if KEYS[4] then
  redis.call('SET', KEYS[4], last .. '|' .. epoch, 'PX', ARGV[4])
end
return {last, epoch, 0}
"#;

/// Registers one presence entry. KEYS: entries hash, ids hash, instance set, channel, room
/// meta hash. ARGV: field, entry JSON, client id, instance-set member, event ('' = none).
///
/// The event (a `user_joined`) gets the room's position appended — `"head_seq"`, the last seq
/// assigned, and `"epoch"` — read in the same atomic step that publishes it, so the joiner
/// (already subscribed) receives every message after `head_seq` and can resume from there.
/// Returns {the id's connection count or -1 if the entry already existed, the event}.
pub(super) const PRESENCE_ADD_LUA: &str = r#"
local frame = ARGV[5]
if frame ~= '' then
  local m = redis.call('HMGET', KEYS[5], 'seq', 'epoch')
  frame = string.sub(frame, 1, -2) .. ',"head_seq":' .. (m[1] or '0')
  if m[2] then frame = frame .. ',"epoch":"' .. m[2] .. '"' end
  frame = frame .. '}'
end
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 0 then return {-1, frame} end
redis.call('SADD', KEYS[3], ARGV[4])
local n = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
if n == 1 and frame ~= '' then redis.call('PUBLISH', KEYS[4], frame) end
return {n, frame}
"#;

/// Removes one presence entry. KEYS as for add. ARGV: field, client id, instance-set member,
/// event to publish when the id's last connection leaves ('' = none).
/// Returns the id's remaining count, or -1 if the entry was already gone (say, reaped).
pub(super) const PRESENCE_REMOVE_LUA: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return -1 end
redis.call('SREM', KEYS[3], ARGV[3])
local n = redis.call('HINCRBY', KEYS[2], ARGV[2], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  if ARGV[4] ~= '' then redis.call('PUBLISH', KEYS[4], ARGV[4]) end
  return 0
end
return n
"#;

/// Heartbeat on Redis' clock. KEYS: instances zset. ARGV: instance. Returns 1 if the instance
/// was not registered (first beat, reaped as dead, or Redis lost its data).
pub(super) const HEARTBEAT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], now, ARGV[1])
"#;

/// Reaps instances silent for longer than ARGV[2] ms (at most ARGV[3] per call).
/// KEYS: instances zset. ARGV: key prefix, ttl ms, limit. Returns {instances, announced}.
/// Builds the names of `RedisKeys` (`instance_set`, `presence`, `channel`) and splits the
/// members of `instance_member` itself: a dead instance's keys are known only here.
pub(super) const REAP_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, tonumber(ARGV[3]))
local announced = 0
for _, inst in ipairs(dead) do
  redis.call('ZREM', KEYS[1], inst)
  local set = ARGV[1] .. 'instance:{' .. inst .. '}'
  for _, m in ipairs(redis.call('SMEMBERS', set)) do
    local bar = string.find(m, '|', 1, true)
    if bar then
      local conn = string.sub(m, 1, bar - 1)
      local room = string.sub(m, bar + 1)
      local field = inst .. '/' .. conn
      local entries, channel
      if room == '' then
        entries = ARGV[1] .. 'online'
      else
        entries = ARGV[1] .. 'presence:{' .. room .. '}'
        channel = ARGV[1] .. 'room:{' .. room .. '}'
      end
      local v = redis.call('HGET', entries, field)
      if v then
        redis.call('HDEL', entries, field)
        local e = cjson.decode(v)
        local n = redis.call('HINCRBY', entries .. ':ids', e.id, -1)
        if n <= 0 then
          redis.call('HDEL', entries .. ':ids', e.id)
          if channel then
            redis.call('PUBLISH', channel, cjson.encode({type = 'user_left', room = room, user = e.user,
              id = e.id, server = e.server, reason = 'node_down'}))
            announced = announced + 1
          end
        end
      end
    end
  end
  redis.call('DEL', set)
end
return {#dead, announced}
"#;
