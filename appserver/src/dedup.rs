//! Sans-IO duplicate filter for incoming 906s.
//!
//! Every origin numbers what it sends to this server (per origin
//! incarnation) in send order, and the relay preserves that order, so one
//! watermark per origin is enough: a 906 at or below the watermark was
//! delivered already. Gaps are allowed: a message the exchange could not
//! queue was reported to its sender and will not come.

use iim::types::ServerId;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it.
    New,
    /// Already delivered (a retransmission after a reconnect).
    Duplicate,
    /// From an origin incarnation older than one already seen.
    Stale,
}

#[derive(Debug, Default)]
pub struct Dedup {
    /// origin -> (epoch, highest delivered sequence)
    marks: HashMap<ServerId, (u64, u64)>,
}

impl Dedup {
    pub fn check(&mut self, origin: ServerId, epoch: u64, seq: u64) -> Verdict {
        let mark = self.marks.entry(origin).or_insert((epoch, 0));
        if epoch < mark.0 {
            return Verdict::Stale;
        }
        if epoch > mark.0 {
            *mark = (epoch, 0);
        }
        if seq <= mark.1 {
            return Verdict::Duplicate;
        }
        mark.1 = seq;
        Verdict::New
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
}
