//! The measured windows: CPU, MariaDB and app server counters read around
//! a saturation window, then a latency run at a fixed offered load.

use crate::conn::{Phase, Scenario};
use crate::db::{DbStatus, db_status, server_counters};
use crate::flow::{Counters, Hists, Shared, lock};
use crate::now_us;
use anyhow::Result;
use iim_kit::deploy::Deployment;
use iim_tests::procfs::cpu_ticks;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub struct Meters {
    pub tck: f64,
    /// (label, pid)
    pub pids: Vec<(&'static str, u32)>,
    pub http: Vec<SocketAddr>,
    pub db: sqlx::MySqlConnection,
}

pub struct Snapshot {
    pub at: Instant,
    pub ticks: Vec<u64>,
    pub db: DbStatus,
    pub servers: Vec<[u64; 4]>,
    pub counters: Counters,
}

impl Meters {
    pub async fn snapshot(&mut self, shared: &Shared) -> Snapshot {
        // The cheap, time-critical readings first.
        let at = Instant::now();
        let counters = shared.counters();
        let ticks = self
            .pids
            .iter()
            .map(|(_, p)| cpu_ticks(*p).unwrap_or(0))
            .collect();
        let db = db_status(&mut self.db).await;
        let mut servers = Vec::new();
        for h in &self.http {
            servers.push(server_counters(*h).await);
        }
        Snapshot {
            at,
            ticks,
            db,
            servers,
            counters,
        }
    }
}

/// A measured saturation window.
pub struct Window {
    pub secs: f64,
    pub c: Counters,
    /// % of one core per process, in `Meters::pids` order.
    pub cpu: Vec<f64>,
    pub commits: f64,
    pub fsyncs: f64,
    pub lock_waits: u64,
    pub lock_time_ms: u64,
    /// Per app server: deltas of `COUNTERS`.
    pub servers: Vec<[u64; 4]>,
}

pub fn window(m: &Meters, a: &Snapshot, b: &Snapshot) -> Window {
    let secs = (b.at - a.at).as_secs_f64().max(1e-9);
    let cpu = a
        .ticks
        .iter()
        .zip(&b.ticks)
        .map(|(x, y)| y.saturating_sub(*x) as f64 / m.tck / secs * 100.0)
        .collect();
    let servers = a
        .servers
        .iter()
        .zip(&b.servers)
        .map(|(x, y)| std::array::from_fn(|i| y[i].saturating_sub(x[i])))
        .collect();
    Window {
        secs,
        c: b.counters - a.counters,
        cpu,
        commits: b.db.commits.saturating_sub(a.db.commits) as f64 / secs,
        fsyncs: b.db.fsyncs.saturating_sub(a.db.fsyncs) as f64 / secs,
        lock_waits: b.db.lock_waits.saturating_sub(a.db.lock_waits),
        lock_time_ms: b.db.lock_time_ms.saturating_sub(a.db.lock_time_ms),
        servers,
    }
}

pub struct Latency {
    pub offered: f64,
    pub achieved: f64,
    pub sent: u64,
    pub lost: u64,
    pub h: Hists,
}

pub struct Outcome {
    pub name: String,
    pub sat: Window,
    /// Closed loop, at saturation.
    pub sat_h: Hists,
    pub lat: Option<Latency>,
    pub stray: u64,
    pub refused: u64,
    pub errors: BTreeMap<String, u64>,
}

pub struct Timing {
    pub warmup: Duration,
    pub secs: Duration,
    pub latency: Duration,
    pub load: f64,
    pub drain: Duration,
}

pub async fn sleep_checked(d: Duration, sc: &Scenario, dep: &mut Deployment) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(Duration::from_millis(500))).await;
        dep.check()?;
        sc.check()?;
    }
}

/// Saturation, then the latency run at `load` % of it.
pub async fn measure(
    name: &str,
    sc: &Scenario,
    window_per_flow: usize,
    t: &Timing,
    meters: &mut Meters,
    dep: &mut Deployment,
) -> Result<Outcome> {
    let shared = &sc.shared;
    // Saturation: warm up, then one measured window.
    let start = now_us();
    let from = start + t.warmup.as_micros() as u64;
    let until = from + t.secs.as_micros() as u64;
    lock(&shared.hists).reset();
    sc.set(Phase::Saturate {
        window: window_per_flow,
        record_from: from,
        record_until: until,
    });
    sleep_checked(t.warmup, sc, dep).await?;
    let a = meters.snapshot(shared).await;
    sleep_checked(t.secs, sc, dep).await?;
    let b = meters.snapshot(shared).await;
    sc.set(Phase::Idle);
    sc.drain(t.drain).await;
    let sat = window(meters, &a, &b);
    let sat_h = lock(&shared.hists).snapshot();
    let rate = sat.c.completed as f64 / sat.secs;
    eprintln!(
        "chat-bench: {name}: saturation {rate:.0} msg/s, {:.0} pushes/s ({} completed in {:.1} s)",
        sat.c.pushes as f64 / sat.secs,
        sat.c.completed,
        sat.secs
    );

    // Latency at a fixed offered load.
    let mut lat = None;
    let offered = rate * t.load / 100.0;
    if t.latency > Duration::ZERO && offered > 0.0 {
        lock(&shared.hists).reset();
        let before = shared.counters();
        let t0 = now_us() + 50_000;
        let end = t0 + t.latency.as_micros() as u64;
        let record_from = t0 + t.latency.as_micros() as u64 / 10;
        sc.set(Phase::Paced {
            generation: start,
            rate: offered,
            t0,
            end,
            record_from,
        });
        sleep_checked(t.latency + Duration::from_millis(50), sc, dep).await?;
        sc.drain(t.drain).await;
        sc.set(Phase::Idle);
        let c = shared.counters() - before;
        let achieved = c.sent as f64 / t.latency.as_secs_f64();
        let l = Latency {
            offered,
            achieved,
            sent: c.sent,
            lost: c.lost,
            h: lock(&shared.hists).snapshot(),
        };
        eprintln!(
            "chat-bench: {name}: {:.0} % load = {offered:.0} msg/s offered, {achieved:.0} sent: p50 {} µs p99 {} µs p999 {} µs to the last push ({} samples, {} lost)",
            t.load,
            l.h.last.value_at_quantile(0.5),
            l.h.last.value_at_quantile(0.99),
            l.h.last.value_at_quantile(0.999),
            l.h.last.len(),
            l.lost
        );
        lat = Some(l);
    }
    Ok(Outcome {
        name: name.to_string(),
        sat,
        sat_h,
        lat,
        stray: shared.stray.load(Ordering::Relaxed),
        refused: shared.refused.load(Ordering::Relaxed),
        errors: lock(&shared.errors).clone(),
    })
}
