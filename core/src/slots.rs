//! Entries kept in the order they were added, each under a number that
//! grows with every addition, taken out mostly from the front.
//!
//! Both outboxes are this shape: the origin's 905s waiting for reports, and
//! an exchange's relays waiting for a peer's answers. Answers mostly come in
//! the order things were sent, so the entry taken out is usually the first.
//! A ring in key order does that in constant time, where an ordered map
//! walks and rebalances a tree for every entry (docs/benchmarks.md). An
//! entry taken out of the middle leaves a hole; holes at the front are
//! dropped at once, and when holes outnumber the live entries they are
//! compacted away, so memory stays within twice the live entries (plus a
//! few). A key is found at the front, else by binary search.

use std::collections::VecDeque;

#[derive(Debug)]
pub(crate) struct Slots<T> {
    slots: VecDeque<(u64, Option<T>)>,
    /// The `Some` slots.
    live: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            slots: VecDeque::new(),
            live: 0,
        }
    }
}

/// Holes tolerated beyond the live entries before compacting.
const SLACK: usize = 64;

impl<T> Slots<T> {
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Slots held, holes included (at most `2 * len() + 64`).
    #[cfg(test)]
    pub fn capacity_used(&self) -> usize {
        self.slots.len()
    }

    /// Add `value` under `key`, which must be above every key added before.
    pub fn push(&mut self, key: u64, value: T) {
        debug_assert!(self.slots.back().is_none_or(|(k, _)| *k < key));
        self.slots.push_back((key, Some(value)));
        self.live += 1;
    }

    fn find(&self, key: u64) -> Option<usize> {
        match self.slots.front() {
            Some((k, _)) if *k == key => Some(0),
            _ => self.slots.binary_search_by_key(&key, |(k, _)| *k).ok(),
        }
    }

    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let i = self.find(key)?;
        self.slots[i].1.as_mut()
    }

    /// The entry added last, if it is still here.
    pub fn back_mut(&mut self) -> Option<&mut T> {
        self.slots.back_mut().and_then(|(_, v)| v.as_mut())
    }

    /// The first live entry.
    pub fn front(&self) -> Option<(u64, &T)> {
        // Holes never stay in front.
        self.slots
            .front()
            .and_then(|(k, v)| v.as_ref().map(|v| (*k, v)))
    }

    /// Take out the entry under `key`.
    pub fn remove(&mut self, key: u64) -> Option<T> {
        let i = self.find(key)?;
        let v = self.slots[i].1.take()?;
        self.live -= 1;
        self.tidy();
        Some(v)
    }

    /// Take out, in order, every entry `take` says yes to.
    pub fn remove_where(&mut self, mut take: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for (_, slot) in self.slots.iter_mut() {
            if slot.as_ref().is_some_and(&mut take) {
                out.extend(slot.take());
            }
        }
        self.live -= out.len();
        self.tidy();
        out
    }

    /// Take out everything, in order.
    pub fn take_all(&mut self) -> Vec<T> {
        self.live = 0;
        std::mem::take(&mut self.slots)
            .into_iter()
            .filter_map(|(_, v)| v)
            .collect()
    }

    /// Live entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.slots
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
    }

    /// Live entries in order, to change in place.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut T)> {
        self.range_mut(0)
    }

    /// Live entries under `from` and above, in order.
    pub fn range_mut(&mut self, from: u64) -> impl Iterator<Item = (u64, &mut T)> {
        let start = self.slots.partition_point(|(k, _)| *k < from);
        self.slots
            .range_mut(start..)
            .filter_map(|(k, v)| v.as_mut().map(|v| (*k, v)))
    }

    fn tidy(&mut self) {
        while matches!(self.slots.front(), Some((_, None))) {
            self.slots.pop_front();
        }
        if self.slots.len() > 2 * self.live + SLACK {
            self.slots.retain(|(_, v)| v.is_some());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Op {
        Push,
        /// Remove the n-th live entry (mod len).
        Remove(usize),
        RemoveFront,
        /// Remove every entry whose value is divisible by n + 2.
        RemoveWhere(u64),
        /// Add one to every value from the n-th live key on.
        BumpFrom(usize),
        TakeAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => Just(Op::Push),
            3 => any::<usize>().prop_map(Op::Remove),
            3 => Just(Op::RemoveFront),
            1 => (0..5u64).prop_map(Op::RemoveWhere),
            1 => any::<usize>().prop_map(Op::BumpFrom),
            1 => Just(Op::TakeAll),
        ]
    }

    proptest! {
        /// The same answers as an ordered map, and memory within the bound.
        #[test]
        fn behaves_like_an_ordered_map(ops in proptest::collection::vec(op(), 0..400)) {
            let mut slots = Slots::default();
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            let mut next = 1u64;
            for op in ops {
                match op {
                    Op::Push => {
                        slots.push(next, next * 7);
                        model.insert(next, next * 7);
                        next += 1 + next % 3;
                    }
                    Op::Remove(n) if !model.is_empty() => {
                        let key = *model.keys().nth(n % model.len()).unwrap();
                        prop_assert_eq!(slots.remove(key), model.remove(&key));
                        prop_assert_eq!(slots.remove(key), None);
                    }
                    Op::Remove(_) => prop_assert_eq!(slots.remove(next), None),
                    Op::RemoveFront => {
                        let want = model.pop_first();
                        prop_assert_eq!(slots.front().map(|(k, v)| (k, *v)), want);
                        if let Some((k, v)) = want {
                            prop_assert_eq!(slots.remove(k), Some(v));
                        }
                    }
                    Op::RemoveWhere(n) => {
                        let want: Vec<u64> =
                            model.values().copied().filter(|v| v % (n + 2) == 0).collect();
                        model.retain(|_, v| *v % (n + 2) != 0);
                        prop_assert_eq!(slots.remove_where(|v| v % (n + 2) == 0), want);
                    }
                    Op::BumpFrom(n) => {
                        let from = model.keys().nth(n % model.len().max(1)).copied().unwrap_or(0);
                        for (_, v) in slots.range_mut(from) {
                            *v += 1;
                        }
                        for (_, v) in model.range_mut(from..) {
                            *v += 1;
                        }
                    }
                    Op::TakeAll => {
                        let want: Vec<u64> = std::mem::take(&mut model).into_values().collect();
                        prop_assert_eq!(slots.take_all(), want);
                    }
                }
                prop_assert_eq!(slots.len(), model.len());
                let got: Vec<(u64, u64)> = slots.iter().map(|(k, v)| (k, *v)).collect();
                let want: Vec<(u64, u64)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                prop_assert_eq!(got, want);
                for (&k, &v) in &model {
                    prop_assert_eq!(slots.get_mut(k).copied(), Some(v));
                }
                prop_assert!(slots.capacity_used() <= 2 * slots.len() + SLACK);
            }
        }
    }

    /// Taking out of the middle while the front stays: holes are compacted,
    /// so a long-lived first entry does not make the table grow.
    #[test]
    fn a_stuck_front_entry_keeps_memory_bounded() {
        let mut slots = Slots::default();
        slots.push(0, ());
        for key in 1..10_000u64 {
            slots.push(key, ());
            assert_eq!(slots.remove(key), Some(()));
        }
        assert_eq!(slots.len(), 1);
        assert!(slots.capacity_used() <= 2 + SLACK);
    }
}
