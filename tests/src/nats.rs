//! NATS, the broker an operator would otherwise put between app servers,
//! run beside iim in the benchmarks (`iim-bench`, `quic-floor`):
//! `nats-server` with TLS (client certificates verified, as iim's links
//! are mutual TLS) on a free loopback port, async-nats clients. NATS has no
//! 905: the origin publishes each message once per target subject.

use crate::load::{self, Arrivals};
use crate::procfs::CpuMeter;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use iim::tls::dev::DevCa;
use iim_kit::proc::{Proc, free_port, wait_listening};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::process::Command;

/// A running `nats-server`, killed when dropped.
pub struct Nats {
    proc: Proc,
    /// Its process id, for CPU readings.
    pub pid: u32,
    url: String,
    dir: PathBuf,
}

/// Start `bin` with TLS (`verify: true`), certificates issued by `ca`, in
/// `dir/nats`, its output in `log`.
pub async fn start(bin: &Path, ca: &DevCa, dir: &Path, log: &Path) -> Result<Nats> {
    let dir = dir.join("nats");
    std::fs::create_dir_all(&dir)?;
    let srv = ca.issue("127.0.0.1")?;
    let cli = ca.issue("nats-client.iim")?;
    std::fs::write(dir.join("ca.pem"), &srv.ca_pem)?;
    std::fs::write(dir.join("server.pem"), &srv.cert_pem)?;
    std::fs::write(dir.join("server.key"), &srv.key_pem)?;
    std::fs::write(dir.join("client.pem"), &cli.cert_pem)?;
    std::fs::write(dir.join("client.key"), &cli.key_pem)?;
    let port = free_port(false);
    let d = dir.display();
    std::fs::write(
        dir.join("nats.conf"),
        format!(
            "listen: 127.0.0.1:{port}\n\
             tls {{\n  cert_file: \"{d}/server.pem\"\n  key_file: \"{d}/server.key\"\n  ca_file: \"{d}/ca.pem\"\n  verify: true\n  timeout: 5\n}}\n"
        ),
    )?;
    if !bin.exists() {
        bail!("{} not found (apt-get install nats-server)", bin.display());
    }
    let mut cmd = Command::new(bin);
    cmd.args(["-c", &dir.join("nats.conf").display().to_string()]);
    let mut proc = Proc::start("nats-server", cmd, log, true)?;
    wait_listening(
        format!("127.0.0.1:{port}").parse()?,
        "nats-server",
        Duration::from_secs(20),
        || proc.check(),
    )
    .await?;
    Ok(Nats {
        pid: proc.pid,
        proc,
        url: format!("tls://127.0.0.1:{port}"),
        dir,
    })
}

impl Nats {
    /// Kill the server and reap it.
    pub async fn stop(mut self) {
        self.proc.kill9().await;
    }
}

async fn client(n: &Nats) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(n.dir.join("ca.pem"))
        .add_client_certificate(n.dir.join("client.pem"), n.dir.join("client.key"))
        .subscription_capacity(1 << 16)
        .client_capacity(1 << 16)
        .connect(&n.url)
        .await
        .context("connect to nats-server over TLS")
}

/// k subscriber connections (one subject each), one publisher publishing
/// each message once per subject, at most `window` deliveries in flight.
/// Returns (deliveries received, seconds, nats-server CPU µs).
pub async fn saturate(
    n: &Nats,
    k: usize,
    messages: usize,
    size: usize,
    window: usize,
    tck: f64,
) -> Result<(u64, f64, f64)> {
    let received = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for i in 0..k {
        let c = client(n).await?;
        let mut s = c.subscribe(format!("bench.s{i}")).await?;
        c.flush().await?;
        let r = received.clone();
        subs.push(tokio::spawn(async move {
            while s.next().await.is_some() {
                r.fetch_add(1, Ordering::Relaxed);
            }
        }));
        clients.push(c);
    }
    let publisher = client(n).await?;
    let subjects: Vec<async_nats::Subject> = (0..k)
        .map(|i| async_nats::Subject::from(format!("bench.s{i}")))
        .collect();
    let body = Bytes::from(vec![b'x'; size]);
    let total = (messages * k) as u64;
    let cpu = CpuMeter::start(n.pid, tck);
    let start = Instant::now();
    let mut published = 0u64;
    for _ in 0..messages {
        while published - received.load(Ordering::Relaxed) > window as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for s in &subjects {
            publisher.publish(s.clone(), body.clone()).await?;
            published += 1;
        }
    }
    publisher.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_us = cpu.micros();
    let got = received.load(Ordering::Relaxed);
    for s in subs {
        s.abort();
    }
    drop(clients);
    Ok((got, secs, cpu_us))
}

/// The fixed-rate run (see [`load::pace`]) on NATS: message i is published
/// once per subject at its intended time; latency from then to its arrival
/// at each subscriber, per delivery. Returns (latency, sender lateness,
/// deliveries missing after 10 s).
pub async fn latency(
    n: &Nats,
    k: usize,
    rate: f64,
    secs: f64,
    size: usize,
) -> Result<(Histogram<u64>, Histogram<u64>, u64)> {
    let count = (rate * secs).max(1.0) as u64;
    let arrivals = Arc::new(Arrivals::default());
    let received = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for i in 0..k {
        let c = client(n).await?;
        let mut s = c.subscribe(format!("bench.l{i}")).await?;
        c.flush().await?;
        let (arrivals, received) = (arrivals.clone(), received.clone());
        subs.push(tokio::spawn(async move {
            while let Some(m) = s.next().await {
                if let Some(i) = load::body_number(&m.payload) {
                    arrivals.record(i);
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        clients.push(c);
    }
    let publisher = client(n).await?;
    let subjects: Vec<async_nats::Subject> = (0..k)
        .map(|i| async_nats::Subject::from(format!("bench.l{i}")))
        .collect();
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now();
    arrivals.begin(start, rate)?;
    let sender = {
        let publisher = publisher.clone();
        std::thread::spawn(move || -> Result<Histogram<u64>> {
            load::pace(start, rate, count, |range| {
                handle.block_on(async {
                    for j in range {
                        let body = load::numbered_body(j, size);
                        for s in &subjects {
                            publisher.publish(s.clone(), body.clone()).await?;
                        }
                    }
                    anyhow::Ok(())
                })
            })
        })
    };
    let late = tokio::task::spawn_blocking(move || sender.join())
        .await?
        .map_err(|_| anyhow::anyhow!("NATS sender panicked"))??;
    publisher.flush().await?;
    let total = count * k as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let missing = total.saturating_sub(received.load(Ordering::Relaxed));
    for s in subs {
        s.abort();
    }
    drop(clients);
    let hist = arrivals.end().context("arrival histogram")?;
    Ok((hist, late, missing))
}
