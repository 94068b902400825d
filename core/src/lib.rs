//! iim's protocol cores: the exchange ([`exchange::Exchange`]) and an app
//! server's link to it ([`link::Link`]) as deterministic state machines.
//!
//! Nothing here touches a socket, a task, a channel, a database or a
//! clock; this crate depends on none of them (only on `iim-proto`), so the
//! compiler keeps it that way. Each core is driven the way quinn-proto
//! drives a QUIC connection: inputs are method calls that take the time
//! `now`; outputs are drained with `poll_*` calls; `poll_timeout` says when
//! the core next needs to be woken. Questions for the registry are outputs
//! too, and their answers inputs, so whoever drives a core decides how
//! slowly, wrongly or whether they are answered.
//!
//! Two drivers exist: the daemons' IO shells (`iim-exchange`,
//! `iim-appserver`), which move frames between QUIC streams and the cores,
//! and the simulator (`iim-sim`), which runs one exchange and several app
//! servers on virtual time through seeded faults and checks the relay's
//! guarantees after every step.

pub mod exchange;
pub mod link;
pub mod origin;
mod slots;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

/// The cores' hash maps: a fixed hasher, so that iterating one (at
/// shutdown, say) visits entries in an order that depends only on what
/// happened — a run replays exactly. Keys are ids: connections and asks
/// the core numbers, servers the certificates name, and message ids whose
/// numbers an authenticated app server picks for its own messages (at
/// worst it slows the maps holding its own, which are bounded).
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// A hasher for small integer keys: each word folded in with one multiply,
/// the high half folded into the low at the end (hashbrown picks buckets
/// from the low bits and tags from the high ones). A few nanoseconds where
/// SipHash, std's default, took tens per lookup on the exchange's hot path
/// (docs/benchmarks.md).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IdHasher(u64);

impl IdHasher {
    /// An odd constant with well-mixed bits (the 64-bit golden ratio).
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(23) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

/// A connection, named by whoever drives the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A registry question in flight, so its answer finds its way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AskId(pub u64);

/// A registry call failed (the text is for logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryFailure(pub String);

/// A core's timers: a min-heap of deadlines. Entries are not removed when
/// they become moot; the core checks, when one is due, whether it still
/// means anything (a lease carries the generation it was started with).
#[derive(Debug)]
pub(crate) struct Timers<T: Ord> {
    heap: BinaryHeap<Reverse<(Instant, u64, T)>>,
    seq: u64,
}

impl<T: Ord> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T: Ord + Copy> Timers<T> {
    pub(crate) fn add(&mut self, at: Instant, t: T) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, t)));
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The earliest timer due at `now`, removed.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<T> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => self.heap.pop().map(|Reverse((_, _, t))| t),
            _ => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod hasher_tests {
    use super::*;
    use iim_proto::types::{MessageId, ServerId};
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(v: &T) -> u64 {
        BuildHasherDefault::<IdHasher>::default().hash_one(v)
    }

    /// Message ids of one origin differ only in their low sequence bits;
    /// their hashes must still spread over the buckets a map picks from
    /// the low bits, and over the tags it takes from the high ones.
    #[test]
    fn sequential_ids_spread_over_low_and_high_bits() {
        let n = 4096u64;
        let ids = (0..n).map(|seq| {
            let id = MessageId {
                origin: ServerId(7),
                epoch: 1_764_000_000_000,
                seq,
            };
            (id, ServerId(3))
        });
        let hashes: Vec<u64> = ids.map(|k| hash(&k)).collect();
        let buckets: HashSet<u64> = hashes.iter().map(|h| h & (n - 1)).collect();
        let tags: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        // A uniform hash fills about 63 % of n buckets with n keys.
        assert!(buckets.len() as u64 > n / 2, "{} buckets", buckets.len());
        assert_eq!(tags.len(), 128, "every 7-bit tag used");
        // Fixed: the same key hashes alike in every process.
        assert_eq!(hash(&(ServerId(1), 2u64)), hash(&(ServerId(1), 2u64)));
        assert_ne!(hash(&(ServerId(1), 2u64)), hash(&(ServerId(2), 1u64)));
    }
}
