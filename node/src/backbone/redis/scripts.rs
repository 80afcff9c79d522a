//! The Redis backbone's Lua scripts: each of its atomic steps, run inside Redis. The key
//! and field names they use are those of `tether_proto::backbone` (`RedisKeys`,
//! `conn_field`, `instance_member`), passed in as KEYS and ARGV wherever the caller knows
//! them; only the reaper builds names itself (a dead instance's keys are known only there).

/// The publish step's text, shared by [`PUBLISH_LUA`] and [`SPUBLISH_LUA`]: the publish
/// command, code run after the room's meta is read (it may clear `epoch` to start a new one,
/// and shift where the prefixes start, `first`), and code run once something was published.
macro_rules! publish_lua {
    ($publish:literal, $check:literal, $stamp:literal) => {
        concat!(
            r#"
local n = #ARGV - 4
local first = 4
local keyed = #KEYS > 3
local meta = redis.call('HMGET', KEYS[1], 'seq', 'epoch')
local last = tonumber(meta[1] or '0')
local epoch = meta[2]
"#,
            $check,
            r#"local out = {}
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
    local frame = ARGV[first + i] .. last .. ',"epoch":"' .. epoch .. '"}'
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], last .. '-0', 'f', frame)
    redis.call('"#,
            $publish,
            r#"', KEYS[3], frame)
    if keyed then redis.call('SET', KEYS[3 + i], last .. '|' .. epoch, 'PX', ARGV[4]) end
    out[i] = {last, epoch, 0}
    published = true
  end
end
if published then
  redis.call('HSET', KEYS[1], 'seq', last)
"#,
            $stamp,
            r#"  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return out
"#
        )
    };
}

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
pub(crate) const PUBLISH_LUA: &str = publish_lua!("PUBLISH", "", "");

/// The publish step on a Redis Cluster: [`PUBLISH_LUA`] with `SPUBLISH` (the channel is a
/// KEY of the room's slot, so the shard's subscribers get it) and failover detection. The
/// room's meta hash also remembers `owner`, the id of the master (`CLUSTER MYID`) that
/// assigned its last seq. A different master now means the slot moved — a migration, or a
/// failover that may have lost acknowledged writes (asynchronous replication): the counter
/// may have gone back, so the room starts a new epoch. Its seq continues after the stored
/// one and its log is kept, so stream ids keep increasing and `(epoch, seq)` never names two
/// messages. So does a stored seq lower than the highest one the publishing node has seen
/// in the stored epoch (ARGV[5] that epoch, ARGV[6] that seq; '' when none): the master lost
/// writes some node saw. The frame prefixes then start at ARGV[7].
pub(crate) const SPUBLISH_LUA: &str = publish_lua!(
    "SPUBLISH",
    r#"
local me = redis.call('CLUSTER', 'MYID')
local seen = ARGV[5] == epoch and tonumber(ARGV[6]) or nil
if epoch and (redis.call('HGET', KEYS[1], 'owner') ~= me or (seen and seen > last)) then
  epoch = nil
end
n = n - 2
first = 6
"#,
    r#"
  redis.call('HSET', KEYS[1], 'owner', me)
"#
);

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

/// [`PRESENCE_ADD_LUA`]'s text: the publish command, and how the entry is recorded in the
/// instance set (KEYS[3]; on a Redis Cluster that key is in another slot: the caller adds it
/// with a command of its own, and the script is given the entries hash in its place).
macro_rules! presence_add_lua {
    ($publish:literal, $track:literal) => {
        concat!(
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
"#,
            $track,
            r#"local n = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
if n == 1 and frame ~= '' then redis.call('"#,
            $publish,
            r#"', KEYS[4], frame) end
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
"#,
        )
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
pub(crate) const PRESENCE_ADD_LUA: &str = presence_add_lua!("PUBLISH", "redis.call('SADD', KEYS[3], ARGV[4])\n");

/// [`PRESENCE_ADD_LUA`] for a Redis Cluster: `SPUBLISH`, and no instance-set write (the
/// node `SADD`s it first: a member without an entry is harmless to the reaper).
pub(crate) const SHARDED_PRESENCE_ADD_LUA: &str = presence_add_lua!("SPUBLISH", "");

/// [`PRESENCE_REMOVE_LUA`]'s text: as for [`presence_add_lua`].
macro_rules! presence_remove_lua {
    ($publish:literal, $track:literal) => {
        concat!(
            hooks_lua!(),
            r#"
local hooks = {}
local v = KEYS[5] and redis.call('HGET', KEYS[1], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return {-1, hooks} end
"#,
            $track,
            r#"local n = redis.call('HINCRBY', KEYS[2], ARGV[2], -1)
if n > 0 then return {n, hooks} end
redis.call('HDEL', KEYS[2], ARGV[2])
if ARGV[4] ~= '' then redis.call('"#,
            $publish,
            r#"', KEYS[4], ARGV[4]) end
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
"#,
        )
    };
}

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
pub(crate) const PRESENCE_REMOVE_LUA: &str = presence_remove_lua!("PUBLISH", "redis.call('SREM', KEYS[3], ARGV[3])\n");

/// [`PRESENCE_REMOVE_LUA`] for a Redis Cluster: `SPUBLISH`, and the instance-set member is
/// left to the node (it `SREM`s it after).
pub(crate) const SHARDED_PRESENCE_REMOVE_LUA: &str = presence_remove_lua!("SPUBLISH", "");

/// Claims pending webhook events due by now (Redis' clock), at most ARGV[1]: whoever removes
/// one holds it, so each goes to exactly one node. KEYS: pending set, pending hash.
/// Returns their stored forms (`TYPE AT_MS DATA_JSON`), in due order.
pub(crate) const CLAIM_LUA: &str = concat!(
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
pub(crate) const HEARTBEAT_LUA: &str = r#"
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
pub(crate) const REAP_LUA: &str = concat!(
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

/// A Redis Cluster reaper's claim, on the `instances` zset alone (KEYS[1]): the instances
/// silent for longer than ARGV[1] ms, at most ARGV[2], each leased to this caller for ARGV[3]
/// ms (its score moved so that it looks dead again only once the lease has run out, should
/// the caller die mid-way). The caller reaps each one's entries room by room
/// ([`REAP_ENTRY_LUA`]) and then removes it from the zset.
pub(crate) const REAP_CLAIM_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl, 'LIMIT', 0, tonumber(ARGV[2]))
for _, inst in ipairs(dead) do
  redis.call('ZADD', KEYS[1], now - ttl + tonumber(ARGV[3]), inst)
end
return dead
"#;

/// A Redis Cluster reaper's step for one entry of a dead instance, in its room's slot.
/// KEYS: entries hash, ids hash, channel (for `online`: the entries hash again). ARGV: the
/// entry's field, the room ('' for `online`). The `HDEL` decides: only the caller that
/// removed the entry counts it down, so an id left with no connection is announced
/// (`user_left`, `node_down`) exactly once however many nodes reap. Returns 1 if announced.
pub(crate) const REAP_ENTRY_LUA: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local e = cjson.decode(v)
local n = redis.call('HINCRBY', KEYS[2], e.id, -1)
if n > 0 then return 0 end
redis.call('HDEL', KEYS[2], e.id)
if ARGV[2] == '' then return 0 end
redis.call('SPUBLISH', KEYS[3], cjson.encode({type = 'user_left', room = ARGV[2], user = e.user,
  id = e.id, server = e.server, reason = 'node_down'}))
return 1
"#;
