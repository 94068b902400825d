//! What the exchange answered instead of delivering, remembered per origin
//! incarnation, so that a 905 sent again gets the same answer for each of
//! its targets.
//!
//! An origin sends a 905 again when it reconnects without having heard
//! every outcome — the report was on a link that died. A target the first
//! attempt could not reach (`overloaded`, `server_down`, `unknown_server`)
//! may have received the origin's *later* messages meanwhile; queueing the
//! old one now would hand it to the target out of order, and the target's
//! duplicate filter (a watermark per origin) would even take it for a
//! copy of something delivered and acknowledge it — a `delivered` report
//! for a message nobody received. Answering with the first outcome keeps
//! both promises: per (origin, target) order, and reports that tell the
//! truth. The memory is bounded by count and age; what it has forgotten
//! the target's filter still catches (a late delivery, counted there).

use crate::Map;
use iim_proto::types::{MessageId, ServerId};
use iim_proto::wire::DeliveryStatus;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Refusals remembered per origin, at most.
pub const MAX_PER_ORIGIN: usize = 16_384;
/// How long a refusal is remembered: beyond any sensible send timeout (an
/// origin stops sending a 905 again once its deadline passed).
pub const MEMORY: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
pub struct Refusals {
    /// The origin incarnation the entries belong to.
    epoch: u64,
    /// (target, pair sequence) -> what the first attempt was told.
    map: Map<(ServerId, u64), (MessageId, DeliveryStatus)>,
    /// Keys in the order they were remembered, with when.
    order: VecDeque<(Instant, ServerId, u64)>,
}

impl Refusals {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remember that `id`'s 906 for `target` (pair sequence `seq`) got
    /// `status`. Returns the change in the number held.
    pub fn remember(
        &mut self,
        id: MessageId,
        target: ServerId,
        seq: u64,
        status: DeliveryStatus,
        now: Instant,
    ) -> isize {
        let before = self.map.len() as isize;
        if id.epoch < self.epoch {
            return 0;
        }
        if id.epoch > self.epoch {
            // A new incarnation of the origin: the old one's 905s are gone.
            self.map.clear();
            self.order.clear();
            self.epoch = id.epoch;
        }
        self.expire(now);
        if self.map.insert((target, seq), (id, status)).is_none() {
            self.order.push_back((now, target, seq));
            if self.order.len() > MAX_PER_ORIGIN
                && let Some((_, t, s)) = self.order.pop_front()
            {
                self.map.remove(&(t, s));
            }
        }
        self.map.len() as isize - before
    }

    /// What the first attempt of `id`'s 906 for `target` was told, if it
    /// was refused.
    pub fn get(&self, id: MessageId, target: ServerId, seq: u64) -> Option<DeliveryStatus> {
        match self.map.get(&(target, seq)) {
            Some((first, status)) if *first == id => Some(*status),
            _ => None,
        }
    }

    /// Forget refusals older than [`MEMORY`]. Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some((at, t, s)) = self.order.front().copied() {
            if now.saturating_duration_since(at) < MEMORY {
                break;
            }
            self.order.pop_front();
            self.map.remove(&(t, s));
            n += 1;
        }
        n
    }

    /// Every refusal held: (message, target, status).
    pub fn iter(&self) -> impl Iterator<Item = (MessageId, ServerId, DeliveryStatus)> + '_ {
        self.map.iter().map(|((t, _), (id, st))| (*id, *t, *st))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, seq: u64) -> MessageId {
        MessageId {
            origin: ServerId(1),
            epoch,
            seq,
        }
    }

    #[test]
    fn same_answer_for_the_same_message_only() {
        let t0 = Instant::now();
        let mut r = Refusals::default();
        assert_eq!(
            r.remember(id(2, 10), ServerId(5), 3, DeliveryStatus::Overloaded, t0),
            1
        );
        assert_eq!(
            r.get(id(2, 10), ServerId(5), 3),
            Some(DeliveryStatus::Overloaded)
        );
        // Another message, target or sequence: nothing remembered.
        assert_eq!(r.get(id(2, 11), ServerId(5), 3), None);
        assert_eq!(r.get(id(2, 10), ServerId(6), 3), None);
        // An older incarnation is ignored; a newer one starts afresh.
        assert_eq!(
            r.remember(id(1, 1), ServerId(5), 1, DeliveryStatus::ServerDown, t0),
            0
        );
        assert_eq!(
            r.remember(id(3, 1), ServerId(5), 1, DeliveryStatus::ServerDown, t0),
            0
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r.get(id(2, 10), ServerId(5), 3), None);
    }

    #[test]
    fn bounded_by_count_and_age() {
        let t0 = Instant::now();
        let mut r = Refusals::default();
        for s in 0..(MAX_PER_ORIGIN as u64 + 10) {
            r.remember(id(1, s), ServerId(2), s, DeliveryStatus::Overloaded, t0);
        }
        assert_eq!(r.len(), MAX_PER_ORIGIN);
        assert_eq!(
            r.get(id(1, 0), ServerId(2), 0),
            None,
            "the oldest went first"
        );
        assert_eq!(r.expire(t0 + MEMORY - Duration::from_secs(1)), 0);
        assert_eq!(r.expire(t0 + MEMORY), MAX_PER_ORIGIN);
        assert!(r.is_empty());
    }
}
