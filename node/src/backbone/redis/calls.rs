//! What the single-Redis and the Redis Cluster backbones send and read alike: the commands,
//! pipelines and script calls of their steps, built from `RedisKeys` and the config, and the
//! parsing of their answers. Each backbone runs them on its own connection (a
//! `ConnectionManager`, a cluster connection) through its own deadline and health
//! bookkeeping; everything here is connection-free.

use super::readiness::Readiness;
use crate::backbone::{BackboneError, PresenceChange, Published, Replay, SessionRecord, Unpublished};
use crate::config::Config;
use crate::metrics::Metrics;
use redis::streams::StreamRangeReply;
use tether_proto::backbone::{PresenceEntry, RedisKeys};
use tracing::warn;

/// One publish-script answer per message: `(seq, epoch, duplicate 0|1)`.
pub(crate) type PublishAnswers = Vec<(u64, String, u8)>;

/// The publish script's call for `prefixes` in `room`: KEYS meta, log, channel and the dedup
/// keys; ARGV a fresh epoch, the log and dedup bounds, `extra` (what a variant of the script
/// takes before the prefixes), the prefixes.
pub(crate) fn publish_call<'s>(
    script: &'s redis::Script,
    keys: &RedisKeys,
    cfg: &Config,
    room: &str,
    dedup: Vec<String>,
    extra: &[String],
    prefixes: Vec<String>,
) -> redis::ScriptInvocation<'s> {
    let mut invocation = script.prepare_invoke();
    let room_keys = keys.room(room);
    invocation.key(room_keys.meta).key(room_keys.log).key(room_keys.channel);
    for key in dedup {
        invocation.key(keys.dedup(room, &key));
    }
    invocation
        .arg(tether_proto::id::mint_client_id())
        .arg(cfg.history_len)
        .arg(cfg.log_ttl.as_millis() as u64)
        .arg(cfg.idempotency_ttl.as_millis() as u64);
    for arg in extra {
        invocation.arg(arg);
    }
    for prefix in prefixes {
        invocation.arg(prefix);
    }
    invocation
}

/// Runs a [`publish_call`] on `con` through `readiness`, counts what it published (not
/// duplicates) and answers one position per message.
pub(crate) async fn run_publish(
    call: redis::ScriptInvocation<'_>,
    con: &mut impl redis::aio::ConnectionLike,
    readiness: &Readiness,
    metrics: &Metrics,
) -> Result<Vec<Published>, BackboneError> {
    let answers: PublishAnswers = readiness.command(call.invoke_async(con)).await?;
    let fresh = answers.iter().filter(|(_, _, dup)| *dup == 0).count() as u64;
    metrics.messages_published.inc_by(fresh);
    Ok(answers.into_iter().map(|(seq, epoch, dup)| Published { seq, epoch, duplicate: dup != 0 }).collect())
}

/// The one position a one-message publish step answered.
pub(crate) fn only(answers: Vec<Published>) -> Result<Published, BackboneError> {
    answers.into_iter().next().ok_or_else(|| {
        let nothing = (redis::ErrorKind::Parse, "publish script answered nothing");
        BackboneError::Redis(redis::RedisError::from(nothing))
    })
}

/// A publish step failed as a whole (one script call): nothing of the batch was published.
pub(crate) fn unpublished(error: BackboneError) -> Unpublished {
    Unpublished { published: 0, error }
}

/// The one read of a room's replay: its meta (`seq`, `epoch`) and its log after `after`, in one
/// `MULTI` (both keys are in the room's slot).
pub(crate) fn replay_pipe(keys: &RedisKeys, room: &str, after: u64) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("HMGET").arg(keys.meta(room)).arg("seq").arg("epoch").xrange(
        keys.log(room),
        format!("{}-0", after.saturating_add(1)),
        "+",
    );
    pipe
}

/// [`replay_pipe`] as one script, for a Redis Cluster: redis-rs' cluster connection does not
/// follow a `MOVED` answered to a `MULTI` (the transaction is aborted and its slot map is not
/// refreshed), but it does for a script. KEYS: meta hash, log stream. ARGV: the first
/// stream id to read. Answers as [`replay_pipe`] does.
pub(crate) const REPLAY_LUA: &str = r#"
return {redis.call('HMGET', KEYS[1], 'seq', 'epoch'), redis.call('XRANGE', KEYS[2], ARGV[1], '+')}
"#;

/// The call of [`REPLAY_LUA`] for `room` after `after`.
pub(crate) fn replay_call<'s>(
    script: &'s redis::Script,
    keys: &RedisKeys,
    room: &str,
    after: u64,
) -> redis::ScriptInvocation<'s> {
    let mut call = script.prepare_invoke();
    call.key(keys.meta(room)).key(keys.log(room)).arg(format!("{}-0", after.saturating_add(1)));
    call
}

/// What [`replay_pipe`] answers.
pub(crate) type ReplayAnswer = ((Option<u64>, Option<String>), StreamRangeReply);

/// [`replay_pipe`]'s answer as a [`Replay`]; malformed log entries are logged and skipped.
pub(crate) fn replay_of(room: &str, ((seq, epoch), range): ReplayAnswer) -> Replay {
    let mut frames = Vec::with_capacity(range.ids.len());
    for entry in range.ids {
        let seq = entry.id.split('-').next().and_then(|s| s.parse::<u64>().ok());
        match (seq, entry.get::<String>("f")) {
            (Some(seq), Some(frame)) => frames.push((seq, frame)),
            _ => warn!(room, id = %entry.id, "malformed log entry skipped"),
        }
    }
    Replay { epoch, head_seq: seq.unwrap_or(0), frames }
}

/// The read of a session hash: fields `name` and `rooms`.
pub(crate) fn session_read(keys: &RedisKeys, id: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(keys.session(id)).arg("name").arg("rooms");
    cmd
}

/// [`session_read`]'s answer as a record. A record we cannot read is treated as no record (and
/// logged): the client then starts a new session instead of failing to connect.
pub(crate) fn session_of(id: &str, (name, rooms): (Option<String>, Option<String>)) -> Option<SessionRecord> {
    let rooms: Vec<String> = match serde_json::from_str(&rooms?) {
        Ok(r) => r,
        Err(e) => {
            warn!(id, error = %e, "unreadable session record; starting a new session");
            return None;
        }
    };
    Some(SessionRecord { name, rooms })
}

/// The write of a session: the hash replaced, its expiry restarted, in one `MULTI` (one key).
pub(crate) fn session_write(keys: &RedisKeys, id: &str, session: &SessionRecord, cfg: &Config) -> redis::Pipeline {
    let key = keys.session(id);
    // Vec<String> always serialises.
    let rooms = serde_json::to_string(&session.rooms).expect("room names serialise");
    let mut pipe = redis::pipe();
    pipe.atomic().del(&key).ignore().hset(&key, "rooms", rooms).ignore();
    if let Some(name) = &session.name {
        pipe.hset(&key, "name", name).ignore();
    }
    pipe.pexpire(&key, cfg.session_ttl.as_millis() as i64).ignore();
    pipe
}

/// [`session_write`] as one script, for a Redis Cluster (see [`REPLAY_LUA`] for why).
/// KEYS: the session hash. ARGV: rooms JSON, TTL in ms, the name (absent: none).
pub(crate) const SESSION_WRITE_LUA: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rooms', ARGV[1])
if ARGV[3] then redis.call('HSET', KEYS[1], 'name', ARGV[3]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
"#;

/// The call of [`SESSION_WRITE_LUA`] for `id`'s `session`.
pub(crate) fn session_write_call<'s>(
    script: &'s redis::Script,
    keys: &RedisKeys,
    id: &str,
    session: &SessionRecord,
    cfg: &Config,
) -> redis::ScriptInvocation<'s> {
    let mut call = script.prepare_invoke();
    // Vec<String> always serialises.
    let rooms = serde_json::to_string(&session.rooms).expect("room names serialise");
    call.key(keys.session(id)).arg(rooms).arg(cfg.session_ttl.as_millis() as u64);
    if let Some(name) = &session.name {
        call.arg(name);
    }
    call
}

/// A presence entry as stored.
pub(crate) fn entry_json(entry: &PresenceEntry) -> String {
    // A struct of three strings always serialises.
    serde_json::to_string(entry).expect("presence entries serialise")
}

/// What the add script's count means.
pub(crate) fn added(n: i64) -> PresenceChange {
    match n {
        -1 => PresenceChange::Unchanged,
        1 => PresenceChange::FirstOrLast,
        _ => PresenceChange::Shared,
    }
}

/// What the remove script's count means.
pub(crate) fn removed(n: i64) -> PresenceChange {
    match n {
        -1 => PresenceChange::Unchanged,
        0 => PresenceChange::FirstOrLast,
        _ => PresenceChange::Shared,
    }
}

/// Renames an existing entry only (HSET XX semantics: never resurrects one). KEYS: entries
/// hash. ARGV: field, entry JSON.
pub(crate) const RENAME_LUA: &str =
    "if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 0";

/// The stored presence entries' values, parsed; unreadable ones skipped.
pub(crate) fn entries_of(values: Vec<String>) -> Vec<PresenceEntry> {
    values.iter().filter_map(|v| serde_json::from_str(v).ok()).collect()
}
