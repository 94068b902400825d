//! What the exchange does with a connection attempt before it costs a TLS
//! handshake, and how loudly it says so.
//!
//! Anyone can send a QUIC Initial to the exchange's port; only certified
//! app servers get further. So the handshakes in progress are bounded
//! ([`Admission`]): beyond `max_handshakes` an attempt is refused at once,
//! and beyond `validate_addresses_above` a client whose address is not
//! validated yet first gets a QUIC Retry — it must echo a token to prove it
//! receives at the address it claims, which spoofed floods cannot. quinn's
//! own buffers for attempts not yet handled are bounded to match. Failed
//! handshakes are counted every time but logged at most [`LOGS_PER_SEC`]
//! times a second ([`LogBudget`]), with how many were left out.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Warnings about failed handshakes logged per second, at most.
pub const LOGS_PER_SEC: u32 = 10;

/// What to do with one connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start its handshake.
    Accept,
    /// Send a Retry first: its address must be validated.
    Retry,
    /// Too many handshakes in progress.
    Refuse,
}

/// The bound on handshakes in progress.
#[derive(Debug)]
pub struct Admission {
    pending: Arc<AtomicUsize>,
    max: usize,
    validate_above: usize,
}

impl Admission {
    pub fn new(max: usize, validate_above: usize) -> Admission {
        Admission {
            pending: Arc::new(AtomicUsize::new(0)),
            max,
            validate_above,
        }
    }

    /// The decision for an attempt whose address is `validated` (or which
    /// cannot be sent a Retry: it echoed one already).
    pub fn decide(&self, validated: bool, may_retry: bool) -> Decision {
        decide(
            self.pending.load(Ordering::Relaxed),
            self.max,
            self.validate_above,
            validated || !may_retry,
        )
    }

    /// Count a handshake in progress until the slot is dropped.
    pub fn slot(&self) -> Slot {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Slot(self.pending.clone())
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

fn decide(pending: usize, max: usize, validate_above: usize, validated: bool) -> Decision {
    if pending >= max {
        Decision::Refuse
    } else if !validated && pending >= validate_above {
        Decision::Retry
    } else {
        Decision::Accept
    }
}

/// One handshake in progress.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A budget of log lines per second.
#[derive(Debug)]
pub struct LogBudget {
    per_sec: u32,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    used: u32,
    skipped: u64,
}

impl LogBudget {
    pub fn new(per_sec: u32, now: Instant) -> LogBudget {
        LogBudget {
            per_sec,
            state: Mutex::new(Window {
                start: now,
                used: 0,
                skipped: 0,
            }),
        }
    }

    /// `Some(n)`: log this one, and say that `n` were left out since the
    /// last line. `None`: over budget, leave it out.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(w.start) >= Duration::from_secs(1) {
            w.start = now;
            w.used = 0;
        }
        if w.used < self.per_sec {
            w.used += 1;
            Some(std::mem::take(&mut w.skipped))
        } else {
            w.skipped += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_under_load_refuse_beyond_the_bound() {
        assert_eq!(decide(0, 10, 4, false), Decision::Accept);
        assert_eq!(decide(3, 10, 4, false), Decision::Accept);
        assert_eq!(decide(4, 10, 4, false), Decision::Retry);
        assert_eq!(decide(4, 10, 4, true), Decision::Accept);
        assert_eq!(decide(10, 10, 4, true), Decision::Refuse);
        assert_eq!(decide(0, 10, 0, false), Decision::Retry);
        let a = Admission::new(2, 1);
        let s1 = a.slot();
        // A Retry already echoed cannot be retried again: accepted.
        assert_eq!(a.decide(false, false), Decision::Accept);
        assert_eq!(a.decide(false, true), Decision::Retry);
        let s2 = a.slot();
        assert_eq!(a.decide(true, true), Decision::Refuse);
        drop((s1, s2));
        assert_eq!(a.pending(), 0);
        assert_eq!(a.decide(false, true), Decision::Accept);
    }

    #[test]
    fn a_log_budget_per_second_counts_what_it_leaves_out() {
        let t0 = Instant::now();
        let b = LogBudget::new(2, t0);
        assert_eq!(b.allow(t0), Some(0));
        assert_eq!(b.allow(t0), Some(0));
        assert_eq!(b.allow(t0), None);
        assert_eq!(b.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(b.allow(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(b.allow(t0 + Duration::from_secs(1)), Some(0));
    }
}
