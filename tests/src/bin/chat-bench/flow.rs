//! One sending connection's messages in flight ([`Flow`]), what every
//! connection of a scenario shares ([`Shared`]: counters, flows, latency
//! histograms), and how pushes and acks complete a message.

use crate::{KEY_LEN, KEY_PREFIX, now_us};
use anyhow::Result;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub struct Entry {
    pub intended_us: u64,
    pub sent: Instant,
    /// Pushes received, by the receiving connection's server (A, B).
    pub got: [u32; 2],
    pub acked: bool,
    pub record: bool,
}

#[derive(Default)]
pub struct FlowState {
    pub next_i: u64,
    pub inflight: BTreeMap<u64, Entry>,
}

/// One sending connection and its messages in flight.
pub struct Flow {
    pub id: usize,
    pub ope: u8,
    pub to: u64,
    /// The sender's server: 0 = A, 1 = B.
    pub server: usize,
    /// Pushes expected per message on A and on B.
    pub expect: [u32; 2],
    pub st: Mutex<FlowState>,
    pub progress: Notify,
}

impl Flow {
    pub fn new(id: usize, ope: u8, to: u64, server: usize, expect: [u32; 2]) -> Arc<Flow> {
        Arc::new(Flow {
            id,
            ope,
            to,
            server,
            expect,
            st: Mutex::new(FlowState::default()),
            progress: Notify::new(),
        })
    }

    pub fn recipients(&self) -> u32 {
        self.expect[0] + self.expect[1]
    }
}

/// Latencies (µs) from the intended send time.
pub struct Hists {
    /// To the sender's ack (stored).
    pub ack: Histogram<u64>,
    /// To the last recipient's push.
    pub last: Histogram<u64>,
    /// To the push of the median recipient.
    pub median: Histogram<u64>,
    /// To the last push on the sender's own server / on the other one.
    pub last_same: Histogram<u64>,
    pub last_other: Histogram<u64>,
}

impl Hists {
    pub fn new() -> Result<Hists> {
        let h = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
        Ok(Hists {
            ack: h()?,
            last: h()?,
            median: h()?,
            last_same: h()?,
            last_other: h()?,
        })
    }

    pub fn reset(&mut self) {
        for h in [
            &mut self.ack,
            &mut self.last,
            &mut self.median,
            &mut self.last_same,
            &mut self.last_other,
        ] {
            h.reset();
        }
    }

    pub fn snapshot(&self) -> Hists {
        Hists {
            ack: self.ack.clone(),
            last: self.last.clone(),
            median: self.median.clone(),
            last_same: self.last_same.clone(),
            last_other: self.last_other.clone(),
        }
    }
}

/// What every connection of a scenario shares.
pub struct Shared {
    pub flows: Vec<Arc<Flow>>,
    pub pad: String,
    pub sent: AtomicU64,
    pub acks: AtomicU64,
    pub pushes: AtomicU64,
    pub completed: AtomicU64,
    pub lost: AtomicU64,
    pub stray: AtomicU64,
    pub refused: AtomicU64,
    pub closed: AtomicU64,
    pub closing: AtomicBool,
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub hists: Mutex<Hists>,
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(flows: Vec<Arc<Flow>>, size: usize) -> Result<Shared> {
        let fixed = KEY_PREFIX.len() + KEY_LEN + "\",\"p\":\"\"}".len();
        Ok(Shared {
            flows,
            pad: "x".repeat(size.saturating_sub(fixed)),
            sent: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            stray: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            errors: Mutex::new(BTreeMap::new()),
            hists: Mutex::new(Hists::new()?),
        })
    }

    pub fn inflight(&self) -> usize {
        self.flows.iter().map(|f| lock(&f.st).inflight.len()).sum()
    }

    pub fn counters(&self) -> Counters {
        Counters {
            sent: self.sent.load(Ordering::Relaxed),
            acks: self.acks.load(Ordering::Relaxed),
            pushes: self.pushes.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }

    /// A push of message `i` of flow `f`, intended at `t` µs, arrived on a
    /// connection of server `side` (0 = A, 1 = B).
    pub fn on_push(&self, f: usize, i: u64, t: u64, side: usize) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        let Some(flow) = self.flows.get(f) else {
            self.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut st = lock(&flow.st);
        let Some(e) = st.inflight.get_mut(&i) else {
            // Counted lost already, or a second copy.
            self.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        e.got[side] += 1;
        let total = e.got[0] + e.got[1];
        let all = flow.recipients();
        if e.record {
            let lat = now_us().saturating_sub(t).max(1);
            let mut h = lock(&self.hists);
            if total == all.div_ceil(2) {
                h.median.saturating_record(lat);
            }
            if e.got[side] == flow.expect[side] {
                if side == flow.server {
                    h.last_same.saturating_record(lat);
                } else {
                    h.last_other.saturating_record(lat);
                }
            }
            if total == all {
                h.last.saturating_record(lat);
            }
        }
        if total >= all && e.acked {
            st.inflight.remove(&i);
            drop(st);
            self.completed.fetch_add(1, Ordering::Relaxed);
            flow.progress.notify_one();
        }
    }

    /// The ack of message `i` of flow `f` arrived.
    pub fn on_ack(&self, f: usize, i: u64) {
        self.acks.fetch_add(1, Ordering::Relaxed);
        let Some(flow) = self.flows.get(f) else {
            return;
        };
        let mut st = lock(&flow.st);
        let Some(e) = st.inflight.get_mut(&i) else {
            return;
        };
        e.acked = true;
        if e.record {
            let lat = now_us().saturating_sub(e.intended_us).max(1);
            lock(&self.hists).ack.saturating_record(lat);
        }
        // Rarely, every push arrives before the ack.
        if e.got[0] + e.got[1] >= flow.recipients() {
            st.inflight.remove(&i);
            drop(st);
            self.completed.fetch_add(1, Ordering::Relaxed);
            flow.progress.notify_one();
        }
    }

    /// A send of flow `f` was refused (error frame): it was not stored.
    pub fn on_refused(&self, f: usize, i: u64) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(flow) = self.flows.get(f) {
            lock(&flow.st).inflight.remove(&i);
            flow.progress.notify_one();
        }
    }

    /// Give up on messages of `flow` in flight for longer than `after`.
    pub fn expire(&self, flow: &Flow, after: Duration) {
        let mut st = lock(&flow.st);
        let before = st.inflight.len();
        st.inflight.retain(|_, e| e.sent.elapsed() < after);
        let gone = before - st.inflight.len();
        if gone > 0 {
            self.lost.fetch_add(gone as u64, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Copy, Default, Debug)]
pub struct Counters {
    pub sent: u64,
    pub acks: u64,
    pub pushes: u64,
    pub completed: u64,
    pub lost: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            sent: self.sent.saturating_sub(o.sent),
            acks: self.acks.saturating_sub(o.acks),
            pushes: self.pushes.saturating_sub(o.pushes),
            completed: self.completed.saturating_sub(o.completed),
            lost: self.lost.saturating_sub(o.lost),
        }
    }
}
