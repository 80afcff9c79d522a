//! The messages in flight at connection losses: what the clients had sent and not seen
//! confirmed when a connection dropped (the library lists them in `Disconnected`), tied to
//! the kill that caused the loss and followed — through the accounting's [`Tally`] — to
//! their fate: published once and delivered to every member owed it, duplicated, or lost.

use super::account::{ClientLog, SendLog, Tally};
use std::collections::HashSet;

/// What became of the messages in flight at connection losses.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct InFlightFate {
    /// Distinct messages sent and not yet confirmed when their sender's connection dropped.
    pub messages: u64,
    /// Published once and delivered to every member owed it.
    pub delivered_once: u64,
    /// Published under more than one seq.
    pub duplicated: u64,
    /// Never published, or published and missed by some member owed it.
    pub lost: u64,
}

impl InFlightFate {
    fn add(&mut self, fate: Fate) {
        self.messages += 1;
        match fate {
            Fate::Once => self.delivered_once += 1,
            Fate::Duplicated => self.duplicated += 1,
            Fate::Lost => self.lost += 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fate {
    Once,
    Duplicated,
    Lost,
}

/// In-flight messages per kill (in `kills` order) and in total.
#[derive(Debug, Default)]
pub(crate) struct InFlightTally {
    /// For each entry of the kill log, the messages in flight on the victim at the kill.
    pub(crate) per_kill: Vec<InFlightFate>,
    /// Distinct messages in flight at any kill.
    pub(crate) at_kills: InFlightFate,
    /// Distinct messages in flight at connection losses no kill explains.
    pub(crate) at_other_losses: InFlightFate,
}

/// A loss this long before a kill's record, or this long after it, is that kill's (the
/// record is stamped once the victim is reaped; clients notice within milliseconds).
const KILL_SLACK_BEFORE_MS: u64 = 1_000;
const KILL_SLACK_AFTER_MS: u64 = 5_000;

/// Follows every message the clients reported unconfirmed at a connection loss to its fate.
/// A loss is a kill's when it was of a connection to the victim, within
/// [`KILL_SLACK_BEFORE_MS`] before to [`KILL_SLACK_AFTER_MS`] after the kill.
pub(crate) fn follow(logs: &[ClientLog], kills: &[(u64, &str)], sends: &SendLog, t: &Tally) -> InFlightTally {
    let texts = sends.texts_by_msg_id();
    let fate = |msg_id: &str| -> Fate {
        let Some(text) = texts.get(msg_id) else {
            return Fate::Lost; // not a send this run wrote down: cannot prove it arrived
        };
        match t.seqs_of_text.get(*text).copied().unwrap_or(0) {
            0 => Fate::Lost,
            1 if t.lost_texts.contains(*text) => Fate::Lost,
            1 => Fate::Once,
            _ => Fate::Duplicated,
        }
    };
    let mut out = InFlightTally { per_kill: vec![InFlightFate::default(); kills.len()], ..Default::default() };
    let mut at_kill: HashSet<&str> = HashSet::new();
    let mut other: HashSet<&str> = HashSet::new();
    let mut per_kill_seen: Vec<HashSet<&str>> = vec![HashSet::new(); kills.len()];
    for log in logs {
        for loss in &log.in_flight {
            let kill = kills.iter().rposition(|(at, target)| {
                Some(*target) == loss.server.as_deref()
                    && loss.at_ms + KILL_SLACK_BEFORE_MS >= *at
                    && loss.at_ms <= at + KILL_SLACK_AFTER_MS
            });
            for id in &loss.msg_ids {
                match kill {
                    Some(k) => {
                        if per_kill_seen[k].insert(id) {
                            out.per_kill[k].add(fate(id));
                        }
                        at_kill.insert(id);
                    }
                    None => {
                        other.insert(id);
                    }
                }
            }
        }
    }
    for id in &at_kill {
        out.at_kills.add(fate(id));
    }
    for id in other.iter().filter(|id| !at_kill.contains(*id)) {
        out.at_other_losses.add(fate(id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::account::{account, test_support::*, LossInFlight, Sent};

    #[test]
    fn in_flight_messages_are_followed_to_their_fate_and_tied_to_the_kill_of_their_node() {
        // c:1 published once, c:2 twice, c:3 never, c:4 once but missed by a member.
        let l = sightings("r", &[("e", 1, "c:1"), ("e", 2, "c:2"), ("e", 3, "c:2"), ("e", 4, "c:4")]);
        let mut sends = SendLog::default();
        for (i, text) in ["c:1", "c:2", "c:3", "c:4"].iter().enumerate() {
            let sent = Sent { room: "r".into(), at_ms: 0, node: "n1".into(), msg_id: format!("m{}", i + 1) };
            sends.written.insert(text.to_string(), sent);
        }
        let mut sender = client("r", (None, 0), &[("e", 1), ("e", 2), ("e", 3), ("e", 4)]);
        sender.in_flight.push(LossInFlight {
            at_ms: 1_000,
            server: Some("n1".into()),
            msg_ids: ["m1", "m2", "m3"].map(String::from).to_vec(),
        });
        // A loss on another node at the same time is not that kill's.
        sender.in_flight.push(LossInFlight { at_ms: 1_000, server: Some("n2".into()), msg_ids: vec!["m4".into()] });
        let mut other = client("r", (None, 0), &[("e", 1), ("e", 2), ("e", 3)]);
        other.id = "o".into();
        let logs = [sender, other];
        let t = account(&logs, &l, None, &sends, 0);
        assert_eq!(t.lost, 1, "the other client missed seq 4");
        let f = follow(&logs, &[(990, "n1"), (1_500, "n3")], &sends, &t);
        let want = InFlightFate { messages: 3, delivered_once: 1, duplicated: 1, lost: 1 };
        assert_eq!(f.per_kill, [want.clone(), InFlightFate::default()]);
        assert_eq!(f.at_kills, want);
        assert_eq!(f.at_other_losses, InFlightFate { messages: 1, lost: 1, ..Default::default() });
    }
}
