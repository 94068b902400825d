//! What the relay promises, written down once and checked against what the
//! simulated app servers saw: every send the simulator made, every message a
//! target was handed, every send that finished.
//!
//! - Every accepted send gets exactly one outcome per target server, once.
//! - A target incarnation receives a message at most once, only if it was
//!   one of the message's targets, with the users and bytes the origin
//!   listed for it, and in the origin's send order.
//! - What was reported `delivered` was received by that target.
//! - What was reported `unknown_server`, `refused`, or `overloaded` for a
//!   905 sent on one connection only, is never received by that target,
//!   before or after the report: those say it was not and will not be
//!   handed over. (`overloaded` for a 905 sent again after a link loss,
//!   `server_down` and `timed_out` promise nothing either way: a copy may
//!   have been in flight.)

use bytes::Bytes;
use iim_proto::types::{MessageId, ServerId};
use iim_proto::wire::{DeliveryStatus, Message, ReportEntry, UserRow};
use std::collections::{BTreeMap, HashMap, HashSet};

/// One send the simulator made.
#[derive(Debug)]
pub struct SendRec {
    pub origin: ServerId,
    /// The origin incarnation (world-unique number).
    pub incarnation: u64,
    pub id: MessageId,
    /// Users listed per target server.
    pub targets: BTreeMap<ServerId, Vec<UserRow>>,
    /// Each target's incarnation when the message was sent (0: none ran).
    pub target_lives: BTreeMap<ServerId, u64>,
    pub body: Bytes,
    /// When the origin gives up on it (`timed_out`).
    pub deadline: std::time::Instant,
    pub outcome: Option<Vec<(ServerId, DeliveryStatus)>>,
    /// When the outcome came: before the deadline, a `timed_out` in it was
    /// reported by the relay (a copy may or may not have arrived), not
    /// given by the origin's clock.
    pub completed_at: Option<std::time::Instant>,
    /// The origin sent it on more than one connection.
    pub resent: bool,
    /// Targets registered long enough, with the registry healthy, that
    /// every exchange knew where they were attached when this was sent.
    pub known_up: Vec<ServerId>,
}

#[derive(Default)]
pub struct Oracle {
    pub sends: Vec<SendRec>,
    by_id: HashMap<MessageId, usize>,
    /// Every message each server (any incarnation) was handed.
    received: HashMap<ServerId, HashSet<MessageId>>,
    /// Highest message sequence handed to (target incarnation) from
    /// (origin, origin epoch).
    order: HashMap<(u64, ServerId, u64), u64>,
    /// (target incarnation, message) pairs handed over.
    handed: HashSet<(u64, MessageId)>,
    /// (message, target) pairs an exchange that has since stopped or
    /// crashed refused: the only messages that may arrive after later ones
    /// of the same origin (the origin sent them again to the next
    /// exchange, not having heard the refusal).
    refused_earlier: HashSet<(MessageId, ServerId)>,
    pub late: u64,
    pub deliveries: u64,
    pub outcomes: BTreeMap<&'static str, u64>,
}

impl Oracle {
    /// Record a send; returns its number (the reply handle given to the
    /// link).
    pub fn sent(&mut self, rec: SendRec) -> u64 {
        let n = self.sends.len();
        self.by_id.insert(rec.id, n);
        self.sends.push(rec);
        n as u64
    }

    /// Target `server` (incarnation `incarnation`) was handed `msg` for
    /// `users`.
    pub fn received(
        &mut self,
        server: ServerId,
        incarnation: u64,
        msg: &Message,
        users: &[UserRow],
    ) -> Result<(), String> {
        self.deliveries += 1;
        let Some(&n) = self.by_id.get(&msg.id) else {
            return Err(format!("{server} was handed {}, which nobody sent", msg.id));
        };
        let rec = &self.sends[n];
        let Some(listed) = rec.targets.get(&server) else {
            return Err(format!(
                "{server} was handed {}, not addressed to it",
                msg.id
            ));
        };
        if listed.as_slice() != users {
            return Err(format!(
                "{server} was handed {} for users {users:?}, the origin listed {listed:?}",
                msg.id
            ));
        }
        if msg.body != rec.body {
            return Err(format!("{server} was handed {} with other bytes", msg.id));
        }
        if let Some((_, status)) = rec
            .outcome
            .iter()
            .flatten()
            .find(|(s, st)| *s == server && never_handed_over(*st, rec.resent))
        {
            return Err(format!(
                "{server} was handed {} after it was reported {} to its origin",
                msg.id,
                status.as_str()
            ));
        }
        if !self.handed.insert((incarnation, msg.id)) {
            return Err(format!(
                "{server} (incarnation {incarnation}) was handed {} twice",
                msg.id
            ));
        }
        let key = (incarnation, msg.id.origin, msg.id.epoch);
        let last = self.order.entry(key).or_insert(0);
        if msg.id.seq < *last {
            // Late is allowed only for a message sent again across an
            // exchange restart: refused by the exchange before, or meant for
            // an earlier incarnation of this server.
            let meant_for_earlier = rec.target_lives.get(&server) != Some(&incarnation);
            if !meant_for_earlier && !self.refused_earlier.contains(&(msg.id, server)) {
                return Err(format!(
                    "{server} (incarnation {incarnation}) was handed {} after seq {} of the same origin: out of order",
                    msg.id, *last
                ));
            }
            self.late += 1;
        } else {
            *last = msg.id.seq;
        }
        self.received.entry(server).or_default().insert(msg.id);
        Ok(())
    }

    /// Send `n` finished with `results`, reported to incarnation
    /// `incarnation` of its origin.
    pub fn completed(
        &mut self,
        n: u64,
        incarnation: u64,
        results: &[ReportEntry],
        resent: bool,
        now: std::time::Instant,
    ) -> Result<(), String> {
        let rec = self
            .sends
            .get_mut(n as usize)
            .ok_or_else(|| format!("completion of unknown send {n}"))?;
        if rec.incarnation != incarnation {
            return Err(format!(
                "send {} of incarnation {} completed by incarnation {incarnation}",
                rec.id, rec.incarnation
            ));
        }
        if let Some(first) = &rec.outcome {
            return Err(format!(
                "send {} completed twice: {first:?}, then {results:?}",
                rec.id
            ));
        }
        let mut servers: Vec<ServerId> = results.iter().map(|r| r.server).collect();
        servers.sort();
        let want: Vec<ServerId> = rec.targets.keys().copied().collect();
        if servers != want {
            return Err(format!(
                "send {} has outcomes for {servers:?}, its targets are {want:?}",
                rec.id
            ));
        }
        for r in results {
            if r.id != rec.id {
                return Err(format!(
                    "send {} completed with an entry for {}",
                    rec.id, r.id
                ));
            }
            if r.status == DeliveryStatus::Delivered
                && !self
                    .received
                    .get(&r.server)
                    .is_some_and(|s| s.contains(&rec.id))
            {
                return Err(format!(
                    "send {} reported delivered to {} which never received it",
                    rec.id, r.server
                ));
            }
            if never_handed_over(r.status, resent)
                && self
                    .received
                    .get(&r.server)
                    .is_some_and(|s| s.contains(&rec.id))
            {
                return Err(format!(
                    "send {} reported {} for {}, which received it",
                    rec.id,
                    r.status.as_str(),
                    r.server
                ));
            }
            *self.outcomes.entry(r.status.as_str()).or_insert(0) += 1;
        }
        rec.outcome = Some(results.iter().map(|r| (r.server, r.status)).collect());
        rec.completed_at = Some(now);
        rec.resent = resent;
        Ok(())
    }

    /// An exchange incarnation ends: what it refused may come again (to
    /// a target whose refusal the origin had not heard).
    pub fn exchange_refused(&mut self, refused: impl IntoIterator<Item = (MessageId, ServerId)>) {
        self.refused_earlier.extend(refused);
    }

    /// Sends of `incarnation` still without an outcome.
    pub fn open_sends_of(&self, incarnation: u64) -> impl Iterator<Item = &SendRec> + '_ {
        self.sends
            .iter()
            .filter(move |s| s.incarnation == incarnation && s.outcome.is_none())
    }
}

/// Outcomes that say the target was not, and will not be, handed the
/// message (`resent`: the origin sent it on more than one connection).
fn never_handed_over(status: DeliveryStatus, resent: bool) -> bool {
    match status {
        DeliveryStatus::UnknownServer | DeliveryStatus::Refused => true,
        DeliveryStatus::Overloaded => !resent,
        _ => false,
    }
}
