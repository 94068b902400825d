//! Sans-IO duplicate filter for incoming 906s.
//!
//! Every origin numbers what it sends to this server (per origin
//! incarnation) in send order, and the relay preserves that order, so a
//! watermark per origin — the highest sequence delivered — recognises
//! retransmissions. Gaps below it are allowed (a message the exchange could
//! not queue was reported to its sender) and remembered as ranges: should
//! one of them come after all — its origin never heard the refusal and sent
//! it again through an exchange that had not refused it — it is delivered,
//! late, rather than mistaken for a copy and acknowledged unseen (which
//! would report `delivered` for a message nobody received). The exchange
//! answers such a resend with its first outcome while it remembers it, so
//! this happens only across an exchange restart — as does the other late
//! arrival: a 905 meant for an earlier incarnation of this server, sent
//! again by its origin to an exchange that does not know this server
//! restarted. A new incarnation's filter starts empty (sequences from 1
//! are gaps), so it takes such a message rather than acknowledging it
//! unseen.

use crate::Map;
use iim_proto::types::ServerId;
use std::collections::VecDeque;

/// Gaps remembered per origin, at most (the oldest is forgotten first).
pub const MAX_GAPS: usize = 1_024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it.
    New,
    /// Deliver it: it fills a gap below the watermark (a message whose
    /// first attempt was refused, sent again).
    Late,
    /// Already delivered (a retransmission after a reconnect).
    Duplicate,
    /// From an origin incarnation older than one already seen.
    Stale,
}

#[derive(Debug)]
struct Mark {
    epoch: u64,
    /// Highest sequence delivered.
    high: u64,
    /// Sequences below `high` never delivered, as inclusive ranges in
    /// ascending order.
    gaps: VecDeque<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct Dedup {
    marks: Map<ServerId, Mark>,
}

impl Dedup {
    pub fn check(&mut self, origin: ServerId, epoch: u64, seq: u64) -> Verdict {
        let fresh = || Mark {
            epoch,
            high: 0,
            gaps: VecDeque::new(),
        };
        let mark = self.marks.entry(origin).or_insert_with(fresh);
        if epoch < mark.epoch {
            return Verdict::Stale;
        }
        if epoch > mark.epoch {
            *mark = fresh();
        }
        if seq > mark.high {
            if seq > mark.high + 1 {
                mark.gaps.push_back((mark.high + 1, seq - 1));
                if mark.gaps.len() > MAX_GAPS {
                    mark.gaps.pop_front();
                }
            }
            mark.high = seq;
            return Verdict::New;
        }
        // At or below the watermark: a copy, unless it fills a gap.
        let i = mark.gaps.partition_point(|(_, end)| *end < seq);
        match mark.gaps.get(i).copied() {
            Some((start, end)) if start <= seq => {
                match (start == seq, end == seq) {
                    (true, true) => {
                        mark.gaps.remove(i);
                    }
                    (true, false) => mark.gaps[i].0 = seq + 1,
                    (false, true) => mark.gaps[i].1 = seq - 1,
                    (false, false) => {
                        mark.gaps[i].1 = seq - 1;
                        mark.gaps.insert(i + 1, (seq + 1, end));
                        if mark.gaps.len() > MAX_GAPS {
                            mark.gaps.pop_front();
                        }
                    }
                }
                Verdict::Late
            }
            _ => Verdict::Duplicate,
        }
    }

    pub fn origins(&self) -> usize {
        self.marks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_per_origin_and_epoch() {
        let mut d = Dedup::default();
        let a = ServerId(1);
        let b = ServerId(2);
        assert_eq!(d.check(a, 1, 1), Verdict::New);
        assert_eq!(d.check(a, 1, 2), Verdict::New);
        assert_eq!(d.check(a, 1, 2), Verdict::Duplicate);
        assert_eq!(d.check(a, 1, 1), Verdict::Duplicate);
        assert_eq!(d.check(b, 5, 1), Verdict::New);
        // A gap (a refused message) is fine.
        assert_eq!(d.check(a, 1, 5), Verdict::New);
        // Origin restarted: its numbering starts over.
        assert_eq!(d.check(a, 2, 1), Verdict::New);
        assert_eq!(d.check(a, 1, 9), Verdict::Stale);
        assert_eq!(d.origins(), 2);
    }

    #[test]
    fn replay_after_reconnect_delivers_each_exactly_once_in_order() {
        // The exchange sent 1..=6, the target delivered 1..=4, the link was
        // cut, and everything unacknowledged (3..=6) comes again, then 7.
        let mut d = Dedup::default();
        let o = ServerId(1);
        let mut delivered = vec![];
        for s in [1, 2, 3, 4, 3, 4, 5, 6, 7] {
            if d.check(o, 1, s) == Verdict::New {
                delivered.push(s);
            }
        }
        assert_eq!(delivered, vec![1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_gap_filled_later_is_delivered_once_and_copies_are_not() {
        let mut d = Dedup::default();
        let o = ServerId(1);
        // 2..=5 and 7 were refused; 1, 6 and 8 delivered.
        for s in [1, 6, 8] {
            assert_eq!(d.check(o, 1, s), Verdict::New);
        }
        assert_eq!(d.check(o, 1, 4), Verdict::Late);
        assert_eq!(d.check(o, 1, 4), Verdict::Duplicate);
        assert_eq!(d.check(o, 1, 2), Verdict::Late);
        assert_eq!(d.check(o, 1, 5), Verdict::Late);
        assert_eq!(d.check(o, 1, 3), Verdict::Late);
        assert_eq!(d.check(o, 1, 7), Verdict::Late);
        for s in 1..=8 {
            assert_eq!(d.check(o, 1, s), Verdict::Duplicate, "seq {s}");
        }
        assert!(d.marks[&o].gaps.is_empty());
    }

    proptest::proptest! {
        /// The filter delivers each sequence exactly once.
        #[test]
        fn delivers_each_sequence_exactly_once(seqs in proptest::collection::vec(1..200u64, 0..400)) {
            let mut d = Dedup::default();
            let mut seen = std::collections::HashSet::new();
            for s in seqs {
                let v = d.check(ServerId(1), 1, s);
                let new = seen.insert(s);
                proptest::prop_assert_eq!(matches!(v, Verdict::New | Verdict::Late), new, "seq {}", s);
            }
        }
    }
}
