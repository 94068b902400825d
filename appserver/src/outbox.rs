//! Sans-IO table of this server's 905s that still lack an outcome for some
//! target server. Entries stay until every target has reported or the
//! deadline passes; on every (re)connect to an exchange all of them are
//! transmitted again in their original order, and the targets drop what
//! they already delivered. Time is passed in; no clocks, no IO.

use bytes::Bytes;
use iim::types::{MessageId, ServerId};
use iim::wire::{DeliveryStatus, ReportEntry};
use std::collections::BTreeMap;
use std::time::Instant;

struct Pending<R> {
    id: MessageId,
    frame: Bytes,
    waiting: Vec<ServerId>,
    results: Vec<ReportEntry>,
    deadline: Instant,
    reply: R,
}

/// A finished entry: the reply handle and one outcome per target server.
pub type Done<R> = (R, Vec<ReportEntry>);

pub struct Outbox<R> {
    /// Keyed by the message's per-origin sequence: iteration order is send
    /// order.
    entries: BTreeMap<u64, Pending<R>>,
    epoch: u64,
}

impl<R> Outbox<R> {
    pub fn new(epoch: u64) -> Self {
        Outbox {
            entries: BTreeMap::new(),
            epoch,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Track a 905 that was (or is about to be) written. Sequences must be
    /// pushed in increasing order, with non-decreasing deadlines.
    pub fn push(
        &mut self,
        id: MessageId,
        frame: Bytes,
        targets: Vec<ServerId>,
        deadline: Instant,
        reply: R,
    ) {
        self.entries.insert(
            id.seq,
            Pending {
                id,
                frame,
                results: Vec::with_capacity(targets.len()),
                waiting: targets,
                deadline,
                reply,
            },
        );
    }

    /// Apply one report entry. Returns the finished entry when this was its
    /// last missing outcome. Entries for unknown messages (already finished,
    /// or from an earlier incarnation) and repeated outcomes are ignored.
    pub fn handle_report(&mut self, e: ReportEntry) -> Option<Done<R>> {
        if e.id.epoch != self.epoch {
            return None;
        }
        let p = self.entries.get_mut(&e.id.seq)?;
        if p.id != e.id {
            return None;
        }
        let i = p.waiting.iter().position(|s| *s == e.server)?;
        p.waiting.swap_remove(i);
        p.results.push(e);
        if p.waiting.is_empty() {
            let p = self.entries.remove(&e.id.seq)?;
            return Some((p.reply, p.results));
        }
        None
    }

    /// Entries whose deadline has passed, with `timed_out` for every target
    /// still missing.
    pub fn poll_expired(&mut self, now: Instant) -> Vec<Done<R>> {
        let mut out = Vec::new();
        while let Some(entry) = self.entries.first_entry() {
            if entry.get().deadline > now {
                break;
            }
            let mut p = entry.remove();
            let id = p.id;
            p.results
                .extend(p.waiting.drain(..).map(|server| ReportEntry {
                    id,
                    server,
                    status: DeliveryStatus::TimedOut,
                }));
            out.push((p.reply, p.results));
        }
        out
    }

    /// The earliest deadline, to sleep until.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.values().next().map(|p| p.deadline)
    }

    /// Every unfinished 905, in send order, for a new connection.
    pub fn frames(&self) -> impl Iterator<Item = &Bytes> + '_ {
        self.entries.values().map(|p| &p.frame)
    }

    /// Remove entries whose frame is longer than `len` (the exchange will not
    /// take them), completing them with `status` for every missing target.
    pub fn remove_larger_than(&mut self, len: usize, status: DeliveryStatus) -> Vec<Done<R>> {
        let big: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, p)| p.frame.len() > len)
            .map(|(seq, _)| *seq)
            .collect();
        big.into_iter()
            .filter_map(|seq| self.entries.remove(&seq))
            .map(|mut p| {
                let id = p.id;
                p.results
                    .extend(
                        p.waiting
                            .drain(..)
                            .map(|server| ReportEntry { id, server, status }),
                    );
                (p.reply, p.results)
            })
            .collect()
    }

    /// Give up on everything (shutdown): `timed_out` for what is missing.
    pub fn abandon(&mut self) -> Vec<Done<R>> {
        self.poll_expired(Instant::now() + std::time::Duration::from_secs(86_400 * 365))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(seq: u64) -> MessageId {
        MessageId {
            origin: ServerId(1),
            epoch: 3,
            seq,
        }
    }

    fn entry(seq: u64, server: u32, status: DeliveryStatus) -> ReportEntry {
        ReportEntry {
            id: id(seq),
            server: ServerId(server),
            status,
        }
    }

    #[test]
    fn finishes_when_every_target_reported_once() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(3);
        ob.push(
            id(1),
            Bytes::from_static(b"a"),
            vec![ServerId(2), ServerId(3)],
            t0,
            "r1",
        );
        assert!(
            ob.handle_report(entry(1, 2, DeliveryStatus::Delivered))
                .is_none()
        );
        // Repeats and strangers are ignored.
        assert!(
            ob.handle_report(entry(1, 2, DeliveryStatus::Delivered))
                .is_none()
        );
        assert!(
            ob.handle_report(entry(1, 9, DeliveryStatus::Delivered))
                .is_none()
        );
        assert!(
            ob.handle_report(entry(7, 2, DeliveryStatus::Delivered))
                .is_none()
        );
        let mut stale = entry(1, 3, DeliveryStatus::Delivered);
        stale.id.epoch = 2;
        assert!(ob.handle_report(stale).is_none());
        let (r, results) = ob
            .handle_report(entry(1, 3, DeliveryStatus::ServerDown))
            .unwrap();
        assert_eq!(r, "r1");
        assert_eq!(results.len(), 2);
        assert!(ob.is_empty());
    }

    #[test]
    fn frames_replay_in_send_order_and_expiry_fills_timeouts() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(3);
        for s in 1..=3u64 {
            let f = Bytes::from(vec![s as u8]);
            ob.push(id(s), f, vec![ServerId(2)], t0 + Duration::from_secs(s), s);
        }
        let order: Vec<u8> = ob.frames().map(|b| b[0]).collect();
        assert_eq!(order, vec![1, 2, 3]);
        assert_eq!(ob.next_deadline(), Some(t0 + Duration::from_secs(1)));
        let done = ob.poll_expired(t0 + Duration::from_secs(2));
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].1[0].status, DeliveryStatus::TimedOut);
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.abandon().len(), 1);
    }
}
