//! Open-loop load for the latency benchmarks (`iim-bench`, `quic-floor`):
//! message i of a fixed-rate run is due at `start + i / rate` and carries i
//! in its first 8 body bytes, so its latency is taken from the INTENDED
//! send time (corrected for coordinated omission), whoever carries it.

use anyhow::Result;
use bytes::Bytes;
use hdrhistogram::Histogram;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A histogram of microseconds, 1 µs to 120 s, 3 significant digits.
pub fn micros_histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?)
}

/// When message `i` of a fixed-rate run is due.
pub fn due_at(start: Instant, rate: f64, i: u64) -> Instant {
    start + Duration::from_secs_f64(i as f64 / rate)
}

/// A body of `size` bytes (at least 8) carrying `i` in its first 8 bytes.
pub fn numbered_body(i: u64, size: usize) -> Bytes {
    let mut body = vec![b'x'; size.max(8)];
    body[..8].copy_from_slice(&i.to_le_bytes());
    Bytes::from(body)
}

/// The message number a body made by [`numbered_body`] carries.
pub fn body_number(body: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(body.get(..8)?.try_into().ok()?))
}

/// Drive a fixed-rate run on the calling (plain) thread: message i is due
/// at `start + i / rate`; `send` gets every message already due in one
/// call, so a late sender catches up at once instead of shifting the
/// schedule. `std::thread::sleep` is finer than tokio's 1 ms timer. Returns
/// how late each message was handed to `send`, in µs.
pub fn pace(
    start: Instant,
    rate: f64,
    n: u64,
    mut send: impl FnMut(std::ops::Range<u64>) -> Result<()>,
) -> Result<Histogram<u64>> {
    let mut late = micros_histogram()?;
    let mut i = 0u64;
    while i < n {
        let now = Instant::now();
        if due_at(start, rate, i) > now {
            std::thread::sleep(due_at(start, rate, i) - now);
        }
        let now = Instant::now();
        let upto = (((now - start).as_secs_f64() * rate) as u64 + 1).clamp(i + 1, n);
        for j in i..upto {
            let by = now.saturating_duration_since(due_at(start, rate, j));
            late.saturating_record(by.as_micros() as u64);
        }
        send(i..upto)?;
        i = upto;
    }
    Ok(late)
}

/// Arrival times at the receivers during a fixed-rate run, from each
/// message's intended send time.
#[derive(Default)]
pub struct Arrivals {
    run: Mutex<Option<ArrivalRun>>,
}

struct ArrivalRun {
    start: Instant,
    rate: f64,
    hist: Histogram<u64>,
}

impl Arrivals {
    /// Start recording a run that began at `start` with `rate` messages/s.
    pub fn begin(&self, start: Instant, rate: f64) -> Result<()> {
        let hist = micros_histogram()?;
        *self.run.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(ArrivalRun { start, rate, hist });
        Ok(())
    }

    /// Stop recording; the run's histogram, if one was begun.
    pub fn end(&self) -> Option<Histogram<u64>> {
        self.run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|r| r.hist)
    }

    /// Message `i` arrived now (ignored outside a run).
    pub fn record(&self, i: u64) {
        let now = Instant::now();
        let mut run = self.run.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = run.as_mut() {
            let due = due_at(r.start, r.rate, i);
            r.hist
                .saturating_record(now.saturating_duration_since(due).as_micros() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_bodies_round_trip() {
        for (i, size) in [(0u64, 8usize), (7, 1024), (u64::MAX, 3)] {
            let b = numbered_body(i, size);
            assert_eq!(b.len(), size.max(8));
            assert_eq!(body_number(&b), Some(i));
        }
        assert_eq!(body_number(b"short"), None);
    }

    #[test]
    fn pace_hands_over_every_message_once_in_order() {
        let mut seen = Vec::new();
        let late = pace(Instant::now(), 50_000.0, 1_000, |r| {
            seen.extend(r);
            Ok(())
        })
        .expect("pace");
        assert_eq!(seen, (0..1_000).collect::<Vec<_>>());
        assert_eq!(late.len(), 1_000);
    }

    #[test]
    fn arrivals_record_only_inside_a_run() {
        let a = Arrivals::default();
        a.record(1);
        assert!(a.end().is_none());
        let start = Instant::now() - Duration::from_millis(5);
        a.begin(start, 1_000.0).expect("histogram");
        a.record(0);
        let h = a.end().expect("a run was begun");
        assert_eq!(h.len(), 1);
        assert!(h.max() >= 5_000, "due 5 ms ago, recorded {} µs", h.max());
        assert!(a.end().is_none());
    }
}
