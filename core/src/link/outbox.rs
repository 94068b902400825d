//! Sans-IO table of this server's 905s that still lack an outcome for some
//! target server. Entries stay until every target has reported or the
//! deadline passes; on every (re)connect to an exchange all of them are
//! transmitted again in their original order, and the targets drop what
//! they already delivered. Time is passed in; no clocks, no IO.

use crate::slots::Slots;
use bytes::Bytes;
use iim_proto::coalesce::frame_bytes;
use iim_proto::types::{MessageId, ServerId};
use iim_proto::wire::{self, DeliveryStatus, Frame, ReportEntry};
use std::time::Instant;

struct Pending<R> {
    id: MessageId,
    frame: Bytes,
    waiting: Vec<ServerId>,
    results: Vec<ReportEntry>,
    deadline: Instant,
    reply: R,
    /// Written on a connection at least once.
    transmitted: bool,
    /// Written on a later connection too: a copy sent before may have been
    /// handed over although its report never came, so a refusal by the
    /// exchange of a later copy proves nothing.
    resent: bool,
}

/// A finished entry.
#[derive(Debug)]
pub struct Done<R> {
    pub reply: R,
    /// One outcome per target server.
    pub results: Vec<ReportEntry>,
    /// The 905 went out on more than one connection: a copy sent before,
    /// on a connection lost before its report came, may have been handed
    /// over, so `overloaded` from the exchange (no room for a later copy)
    /// does not say it was not delivered. Every other status means the
    /// same for any copy.
    pub resent: bool,
}

impl<R> Done<R> {
    /// The outcomes as the sender is told them: for a resent 905,
    /// `overloaded` becomes `timed_out` (not known; see [`Done::resent`]).
    /// Returns how many were changed.
    pub fn for_sender(results: &mut [ReportEntry], resent: bool) -> usize {
        if !resent {
            return 0;
        }
        let mut changed = 0;
        for r in results {
            if r.status == DeliveryStatus::Overloaded {
                r.status = DeliveryStatus::TimedOut;
                changed += 1;
            }
        }
        changed
    }
}

impl<R> Pending<R> {
    fn done(self) -> Done<R> {
        Done {
            reply: self.reply,
            results: self.results,
            resent: self.resent,
        }
    }
}

pub struct Outbox<R> {
    /// By message sequence, in send order. Reports mostly arrive in send
    /// order, so the entry they name is usually the first.
    slots: Slots<Pending<R>>,
    epoch: u64,
}

impl<R> Outbox<R> {
    pub fn new(epoch: u64) -> Self {
        Outbox {
            slots: Slots::default(),
            epoch,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
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
        self.slots.push(
            id.seq,
            Pending {
                id,
                frame,
                results: Vec::with_capacity(targets.len()),
                waiting: targets,
                deadline,
                reply,
                transmitted: false,
                resent: false,
            },
        );
    }

    /// The entry pushed last was written on the current connection.
    pub fn transmitted_last(&mut self) {
        if let Some(p) = self.slots.back_mut() {
            p.transmitted = true;
        }
    }

    /// Apply one report entry. Returns the finished entry when this was its
    /// last missing outcome. Entries for unknown messages (already finished,
    /// or from an earlier incarnation) and repeated outcomes are ignored.
    pub fn handle_report(&mut self, e: ReportEntry) -> Option<Done<R>> {
        if e.id.epoch != self.epoch {
            return None;
        }
        let seq = e.id.seq;
        let p = self.slots.get_mut(seq)?;
        if p.id != e.id {
            return None;
        }
        let w = p.waiting.iter().position(|s| *s == e.server)?;
        p.waiting.swap_remove(w);
        p.results.push(e);
        if p.waiting.is_empty() {
            return self.slots.remove(seq).map(Pending::done);
        }
        None
    }

    /// Entries whose deadline has passed, with `timed_out` for every target
    /// still missing.
    pub fn poll_expired(&mut self, now: Instant) -> Vec<Done<R>> {
        let mut out = Vec::new();
        // Deadlines do not decrease in send order.
        while let Some((seq, p)) = self.slots.front() {
            if p.deadline > now {
                break;
            }
            let Some(mut p) = self.slots.remove(seq) else {
                break;
            };
            let id = p.id;
            p.results
                .extend(p.waiting.drain(..).map(|server| ReportEntry {
                    id,
                    server,
                    status: DeliveryStatus::TimedOut,
                }));
            out.push(p.done());
        }
        out
    }

    /// The earliest deadline, to sleep until.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots.front().map(|(_, p)| p.deadline)
    }

    /// Every unfinished 905, in send order, for a new connection. An entry
    /// that went out before is marked resent. One that already has outcomes
    /// for some targets goes out without their rows (re-encoded once, kept
    /// for later resends): a target must never be handed a message after it
    /// was reported anything but `delivered`.
    pub fn resend(&mut self, max_frame: usize) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (_, p) in self.slots.iter_mut() {
            if p.transmitted {
                p.resent = true;
            }
            p.transmitted = true;
            if !p.results.is_empty()
                && let Some(b) = without_rows_of(&p.frame, &p.waiting, max_frame)
            {
                p.frame = b;
            }
            out.push(p.frame.clone());
        }
        out
    }

    /// Remove entries whose frame is longer than `len` (the exchange will not
    /// take them), completing them with `status` for every missing target.
    pub fn remove_larger_than(&mut self, len: usize, status: DeliveryStatus) -> Vec<Done<R>> {
        let taken = self.slots.remove_where(|p| p.frame.len() > len);
        taken
            .into_iter()
            .map(|mut p| {
                let id = p.id;
                p.results
                    .extend(
                        p.waiting
                            .drain(..)
                            .map(|server| ReportEntry { id, server, status }),
                    );
                p.done()
            })
            .collect()
    }

    /// Give up on everything (shutdown): `timed_out` for what is missing.
    pub fn abandon(&mut self) -> Vec<Done<R>> {
        self.poll_expired(Instant::now() + std::time::Duration::from_secs(86_400 * 365))
    }
}

/// `frame` (a 905) with only the rows of `keep`; `None` if it cannot be
/// decoded or encoded again (then it goes out as it is).
fn without_rows_of(frame: &Bytes, keep: &[ServerId], max_frame: usize) -> Option<Bytes> {
    let mut buf = bytes::BytesMut::from(&frame[..]);
    let Ok(Some(Frame::Forward(mut f))) = wire::decode(&mut buf, max_frame) else {
        return None;
    };
    f.rows.retain(|r| keep.contains(&r.server));
    frame_bytes(&Frame::Forward(f), max_frame)
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
    fn a_sender_hears_overloaded_for_a_resent_905_as_timed_out() {
        let mut results = vec![
            entry(1, 2, DeliveryStatus::Overloaded),
            entry(1, 3, DeliveryStatus::Delivered),
            entry(1, 4, DeliveryStatus::ServerDown),
        ];
        assert_eq!(Done::<()>::for_sender(&mut results, false), 0);
        assert_eq!(results[0].status, DeliveryStatus::Overloaded);
        assert_eq!(Done::<()>::for_sender(&mut results, true), 1);
        let statuses: Vec<_> = results.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            vec![
                DeliveryStatus::TimedOut,
                DeliveryStatus::Delivered,
                DeliveryStatus::ServerDown
            ]
        );
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
        let done = ob
            .handle_report(entry(1, 3, DeliveryStatus::ServerDown))
            .unwrap();
        assert_eq!(done.reply, "r1");
        assert_eq!(done.results.len(), 2);
        assert!(!done.resent);
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
        let order: Vec<u8> = ob.resend(1 << 20).iter().map(|b| b[0]).collect();
        assert_eq!(order, vec![1, 2, 3]);
        assert_eq!(ob.next_deadline(), Some(t0 + Duration::from_secs(1)));
        let done = ob.poll_expired(t0 + Duration::from_secs(2));
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].results[0].status, DeliveryStatus::TimedOut);
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.abandon().len(), 1);
    }

    #[test]
    fn a_stuck_entry_does_not_let_holes_grow_without_bound() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(3);
        // Sequences with gaps, as local-only sends take numbers too.
        for s in (2..=20_000u64).step_by(2) {
            ob.push(id(s), Bytes::new(), vec![ServerId(2)], t0, s);
        }
        // Everything but the first (2) finishes, newest first.
        for s in (2..=10_000u64).rev().map(|i| 2 * i) {
            let done = ob
                .handle_report(entry(s, 2, DeliveryStatus::Delivered))
                .unwrap();
            assert_eq!(done.reply, s);
            assert!(ob.slots.capacity_used() <= 2 * ob.len() + 64);
        }
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.resend(1 << 20).len(), 1);
        assert!(
            ob.handle_report(entry(2, 2, DeliveryStatus::Delivered))
                .is_some()
        );
        assert!(ob.is_empty() && ob.slots.capacity_used() == 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push {
            gap: u64,
            targets: u8,
            big: bool,
        },
        Report {
            pick: usize,
            server: u32,
            status: u8,
        },
        Expire {
            upto: u64,
        },
        RemoveBig,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (1..3u64, 1..4u8, any::<bool>()).prop_map(|(gap, targets, big)| Op::Push { gap, targets, big }),
            5 => (any::<usize>(), 1..5u32, 0..3u8).prop_map(|(pick, server, status)| Op::Report { pick, server, status }),
            1 => (0..400u64).prop_map(|upto| Op::Expire { upto }),
            1 => Just(Op::RemoveBig),
        ]
    }

    /// The reference the outbox must behave like: a map in send order.
    #[derive(Default)]
    struct Model {
        entries: std::collections::BTreeMap<u64, (Vec<ServerId>, usize, u64, bool)>,
    }

    proptest::proptest! {
        #[test]
        fn behaves_like_an_ordered_map(ops in proptest::collection::vec(op(), 0..300)) {
            let t0 = Instant::now();
            let mut ob = Outbox::new(3);
            let mut model = Model::default();
            let (mut seq, mut clock) = (0u64, 0u64);
            let statuses = [DeliveryStatus::Delivered, DeliveryStatus::ServerDown, DeliveryStatus::Overloaded];
            for op in ops {
                match op {
                    Op::Push { gap, targets, big } => {
                        seq += gap;
                        clock += 1;
                        let ts: Vec<ServerId> = (1..=u32::from(targets)).map(ServerId).collect();
                        let frame = Bytes::from(vec![0u8; if big { 100 } else { 10 }]);
                        ob.push(id(seq), frame, ts.clone(), t0 + Duration::from_millis(clock), seq);
                        model.entries.insert(seq, (ts, 0, clock, big));
                    }
                    Op::Report { pick, server, status } => {
                        // Mostly a tracked sequence, sometimes an unknown one.
                        let seqs: Vec<u64> = model.entries.keys().copied().collect();
                        let s = if seqs.is_empty() || pick % 7 == 0 { seq + 1 } else { seqs[pick % seqs.len()] };
                        let got = ob.handle_report(entry(s, server, statuses[usize::from(status)]));
                        let want = match model.entries.get_mut(&s) {
                            Some((waiting, n, _, _)) => match waiting.iter().position(|w| *w == ServerId(server)) {
                                Some(i) => {
                                    waiting.swap_remove(i);
                                    *n += 1;
                                    waiting.is_empty()
                                }
                                None => false,
                            },
                            None => false,
                        };
                        if want {
                            let (_, n, _, _) = model.entries.remove(&s).unwrap();
                            let done = got.unwrap();
                            proptest::prop_assert_eq!(done.reply, s);
                            proptest::prop_assert_eq!(done.results.len(), n);
                        } else {
                            proptest::prop_assert!(got.is_none());
                        }
                    }
                    Op::Expire { upto } => {
                        let now = t0 + Duration::from_millis(upto);
                        let got: Vec<u64> = ob.poll_expired(now).into_iter().map(|d| d.reply).collect();
                        let mut want = Vec::new();
                        while let Some((&s, &(_, _, at, _))) = model.entries.iter().next() {
                            if at > upto {
                                break;
                            }
                            model.entries.remove(&s);
                            want.push(s);
                        }
                        proptest::prop_assert_eq!(got, want);
                    }
                    Op::RemoveBig => {
                        let got: Vec<u64> = ob
                            .remove_larger_than(50, DeliveryStatus::Overloaded)
                            .into_iter()
                            .map(|d| d.reply)
                            .collect();
                        let want: Vec<u64> = model.entries.iter().filter(|(_, e)| e.3).map(|(s, _)| *s).collect();
                        model.entries.retain(|_, e| !e.3);
                        proptest::prop_assert_eq!(got, want);
                    }
                }
                proptest::prop_assert_eq!(ob.len(), model.entries.len());
                proptest::prop_assert!(ob.slots.capacity_used() <= 2 * ob.len() + 64);
                proptest::prop_assert_eq!(
                    ob.next_deadline(),
                    model.entries.values().next().map(|e| t0 + Duration::from_millis(e.2))
                );
                proptest::prop_assert_eq!(ob.resend(1 << 20).len(), model.entries.len());
            }
        }
    }
}
