//! The Redis backbone's Lua scripts: each of its atomic steps, run inside Redis. The key
//! and field names they use are those of `tether_proto::backbone` (`RedisKeys`,
//! `conn_field`, `instance_member`), passed in as KEYS and ARGV wherever the caller knows
//! them; only the reaper builds names itself (a dead instance's keys are known only there).

/// The atomic publish step, for one or more consecutive messages of one client to one room.
///
/// KEYS: meta hash, log stream, channel, then — for messages with dedup keys — one dedup key
/// per message (a batch is all keyed or all not). ARGV: a fresh epoch to use if the room has
/// none, history length, log TTL in ms, dedup TTL in ms, then one frame prefix (ending in
/// `"seq":`) per message. Each message gets the next seq, in order, and is logged, then
/// published, before the next; a keyed one whose key is set already (published within its
/// TTL) is skipped, and its first position answered instead.
///
/// Returns one {seq, epoch, duplicate (0|1)} per message.
///
/// A counter that starts again at 1 means Redis lost the room's state (restart without
/// persistence, eviction): the room gets a new epoch and its stale log, if any survived, is
/// dropped, so `(epoch, seq)` never repeats.
pub(super) const PUBLISH_LUA: &str = r#"
local n = #ARGV - 4
local keyed = #KEYS > 3
local meta = redis.call('HMGET', KEYS[1], 'seq', 'epoch')
local last = tonumber(meta[1] or '0')
local epoch = meta[2]
local out = {}
local published = false
for i = 1, n do
  local seen = false
  if keyed then seen = redis.call('GET', KEYS[3 + i]) end
  if seen then
    local bar = string.find(seen, '|', 1, true)
    out[i] = {tonumber(string.sub(seen, 1, bar - 1)), string.sub(seen, bar + 1), 1}
  else
    last = last + 1
    if last == 1 then
      epoch = ARGV[1]
      redis.call('HSET', KEYS[1], 'epoch', epoch)
      redis.call('DEL', KEYS[2])
    elseif not epoch then
      epoch = ARGV[1]
      redis.call('HSET', KEYS[1], 'epoch', epoch)
    end
    local frame = ARGV[4 + i] .. last .. ',"epoch":"' .. epoch .. '"}'
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], last .. '-0', 'f', frame)
    redis.call('PUBLISH', KEYS[3], frame)
    if keyed then redis.call('SET', KEYS[3 + i], last .. '|' .. epoch, 'PX', ARGV[4]) end
    out[i] = {last, epoch, 0}
    published = true
  end
end
if published then
  redis.call('HSET', KEYS[1], 'seq', last)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return out
"#;

/// What the presence scripts share for webhooks (`docs/WEBHOOKS.md`), defined at the top of
/// each: the pending events are a sorted set (member: the event's key — `o|ID` for an
/// offline, `l|ROOM|ID` for a member's left, `v|ROOM` for a vacated room — score: due time in
/// ms on Redis' clock) and a hash from the same key to `TYPE AT_MS DATA_JSON`. An event
/// decided at once is returned to the caller as `TYPE - DATA_JSON` (the node stamps it).
macro_rules! hooks_lua {
    () => {
        r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function hook_emit(out, kind, data)
  out[#out + 1] = kind .. ' - ' .. cjson.encode(data)
end
local function hook_unless_pending(out, pz, pd, key, kind, data)
  if redis.call('ZREM', pz, key) == 1 then
    redis.call('HDEL', pd, key)
  else
    hook_emit(out, kind, data)
  end
end
local function hook_pend(pz, pd, key, at, grace, kind, data)
  redis.call('ZADD', pz, at + grace, key)
  redis.call('HSET', pd, key, kind .. ' ' .. string.format('%d', at) .. ' ' .. cjson.encode(data))
end
local function graced(reason)
  return reason == 'disconnected' or reason == 'node_down'
end
"#
    };
}

/// Registers one presence entry. KEYS: entries hash, ids hash, instance set, channel, room
/// meta hash; with webhooks on, the pending set and hash. ARGV: field, entry JSON, client id,
/// instance-set member, event ('' = none); with webhooks on, the room ('' for `online`).
///
/// The event (a `user_joined`) gets the room's position appended — `"head_seq"`, the last seq
/// assigned, and `"epoch"` — read in the same atomic step that publishes it, so the joiner
/// (already subscribed) receives every message after `head_seq` and can resume from there.
/// Webhooks: an id's first seat emits `client.online` / `member.joined` (and a room's first
/// id `room.occupied`) unless it cancels the pending `client.offline` / `member.left` /
/// `room.vacated` of a return within the grace.
/// Returns {the id's connection count or -1 if the entry already existed, the event, the
/// webhook events decided}.
pub(super) const PRESENCE_ADD_LUA: &str = concat!(
    hooks_lua!(),
    r#"
local frame = ARGV[5]
if frame ~= '' then
  local m = redis.call('HMGET', KEYS[5], 'seq', 'epoch')
  frame = string.sub(frame, 1, -2) .. ',"head_seq":' .. (m[1] or '0')
  if m[2] then frame = frame .. ',"epoch":"' .. m[2] .. '"' end
  frame = frame .. '}'
end
local hooks = {}
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 0 then return {-1, frame, hooks} end
redis.call('SADD', KEYS[3], ARGV[4])
local n = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
if n == 1 and frame ~= '' then redis.call('PUBLISH', KEYS[4], frame) end
if n == 1 and KEYS[6] then
  local e = cjson.decode(ARGV[2])
  local room = ARGV[6]
  if room == '' then
    hook_unless_pending(hooks, KEYS[6], KEYS[7], 'o|' .. e.id, 'client.online',
      {client = e.id, name = e.user, server = e.server})
  else
    if redis.call('HLEN', KEYS[2]) == 1 then
      hook_unless_pending(hooks, KEYS[6], KEYS[7], 'v|' .. room, 'room.occupied', {room = room})
    end
    hook_unless_pending(hooks, KEYS[6], KEYS[7], 'l|' .. room .. '|' .. e.id, 'member.joined',
      {room = room, client = e.id})
  end
end
return {n, frame, hooks}
"#
);

/// Removes one presence entry. KEYS as for add, without the meta hash (webhooks: the pending
/// set and hash after the channel). ARGV: field, client id, instance-set member, event to
/// publish when the id's last connection leaves ('' = none); with webhooks on, the room (''
/// for `online`) and the grace in ms.
///
/// Webhooks: an id's last seat going records a pending `client.offline` / `member.left`
/// (reason from the event: `disconnected` for `online`), except an explicit leave, whose
/// `member.left` is emitted at once; a room's last id going records a pending `room.vacated`.
/// Returns {the id's remaining count, or -1 if the entry was already gone (say, reaped), the
/// webhook events decided}.
pub(super) const PRESENCE_REMOVE_LUA: &str = concat!(
    hooks_lua!(),
    r#"
local hooks = {}
local v = KEYS[5] and redis.call('HGET', KEYS[1], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return {-1, hooks} end
redis.call('SREM', KEYS[3], ARGV[3])
local n = redis.call('HINCRBY', KEYS[2], ARGV[2], -1)
if n > 0 then return {n, hooks} end
redis.call('HDEL', KEYS[2], ARGV[2])
if ARGV[4] ~= '' then redis.call('PUBLISH', KEYS[4], ARGV[4]) end
if KEYS[5] and v then
  local e = cjson.decode(v)
  local reason = string.match(ARGV[4], '"reason":"([%w_]+)"') or 'disconnected'
  local room = ARGV[5]
  local grace = tonumber(ARGV[6])
  local at = now_ms()
  if room == '' then
    hook_pend(KEYS[5], KEYS[6], 'o|' .. e.id, at, grace, 'client.offline',
      {client = e.id, name = e.user, reason = reason})
  else
    local left = {room = room, client = e.id, reason = reason}
    if graced(reason) then
      hook_pend(KEYS[5], KEYS[6], 'l|' .. room .. '|' .. e.id, at, grace, 'member.left', left)
    else
      hook_emit(hooks, 'member.left', left)
    end
    if redis.call('EXISTS', KEYS[2]) == 0 then
      hook_pend(KEYS[5], KEYS[6], 'v|' .. room, at, grace, 'room.vacated', {room = room})
    end
  end
end
return {0, hooks}
"#
);

/// Claims pending webhook events due by now (Redis' clock), at most ARGV[1]: whoever removes
/// one holds it, so each goes to exactly one node. KEYS: pending set, pending hash.
/// Returns their stored forms (`TYPE AT_MS DATA_JSON`), in due order.
pub(super) const CLAIM_LUA: &str = concat!(
    hooks_lua!(),
    r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, key in ipairs(due) do
  redis.call('ZREM', KEYS[1], key)
  local v = redis.call('HGET', KEYS[2], key)
  if v then
    redis.call('HDEL', KEYS[2], key)
    out[#out + 1] = v
  end
end
return out
"#
);

/// Heartbeat on Redis' clock. KEYS: instances zset. ARGV: instance. Returns 1 if the instance
/// was not registered (first beat, reaped as dead, or Redis lost its data).
pub(super) const HEARTBEAT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], now, ARGV[1])
"#;

/// Reaps instances silent for longer than ARGV[2] ms (at most ARGV[3] per call).
/// KEYS: instances zset; with webhooks on, the pending set and hash. ARGV: key prefix, ttl
/// ms, limit; with webhooks on, the grace in ms. Returns {instances, announced}.
/// Builds the names of `RedisKeys` (`instance_set`, `presence`, `channel`) and splits the
/// members of `instance_member` itself: a dead instance's keys are known only here.
/// Webhooks: each id left with no seat records a pending `member.left` / `client.offline`
/// with reason `node_down`, each room left empty a pending `room.vacated` — here, on a
/// survivor, so a node's death loses none of its clients' events.
pub(super) const REAP_LUA: &str = concat!(
    hooks_lua!(),
    r#"
local now = now_ms()
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, tonumber(ARGV[3]))
local grace = KEYS[2] and tonumber(ARGV[4])
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
          if grace then
            if channel then
              hook_pend(KEYS[2], KEYS[3], 'l|' .. room .. '|' .. e.id, now, grace, 'member.left',
                {room = room, client = e.id, reason = 'node_down'})
              if redis.call('EXISTS', entries .. ':ids') == 0 then
                hook_pend(KEYS[2], KEYS[3], 'v|' .. room, now, grace, 'room.vacated', {room = room})
              end
            else
              hook_pend(KEYS[2], KEYS[3], 'o|' .. e.id, now, grace, 'client.offline',
                {client = e.id, name = e.user, reason = 'node_down'})
            end
          end
        end
      end
    end
  end
  redis.call('DEL', set)
end
return {#dead, announced}
"#
);

/// Announces a node in the registry (`tether_proto::backbone::RedisKeys::nodes`) and prunes
/// entries not renewed for ARGV[3] ms — all on Redis' clock. KEYS: the registry hash. ARGV:
/// node name, its record's value up to `"at":` (`NodeRecord::redis_value`), prune age in ms.
/// Returns Redis' time of the announcement (ms).
pub(super) const ANNOUNCE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. now .. '}')
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local at = tonumber(string.match(all[i + 1], '"at":(%d+)}$') or '0')
  if now - at > tonumber(ARGV[3]) then redis.call('HDEL', KEYS[1], all[i]) end
end
return now
"#;

/// Withdraws a node from the registry, only while the entry is still the given instance's (a
/// successor under the same name may have announced already). KEYS: the registry hash. ARGV:
/// node name, the record's `"instance":…` member as JSON. Returns 1 if removed.
pub(super) const WITHDRAW_LUA: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.find(v, ARGV[2], 1, true) then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"#;
