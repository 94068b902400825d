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

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::collections::hash_map::DefaultHasher;
use std::hash::BuildHasherDefault;
use std::time::Instant;

/// The cores' hash maps: a fixed hasher, so that iterating one (at
/// shutdown, say) visits entries in an order that depends only on what
/// happened — a run replays exactly. Keys are ids the system assigns or
/// certifies, never chosen freely by a peer.
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

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
