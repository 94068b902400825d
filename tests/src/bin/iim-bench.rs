//! `iim-bench`: the relay side by side with NATS, in one run.
//!
//! Topology (all on loopback, TLS everywhere):
//! - iim: a real `iim-exchange` PROCESS (the release binary next to this
//!   one) on a SQLite registry in a temp dir, with dev certificates generated
//!   at run time; the origin app server (1) and the k target app servers
//!   (2..=17) run IN THIS PROCESS (one tokio runtime), each target with one
//!   attached user whose queue is drained. The origin drives `Iim::submit`
//!   to one user on each of k target servers.
//! - NATS: `nats-server` (TLS, client certificates verified) on a free
//!   loopback port; one publisher connection publishes each message once
//!   per target subject to k subscriber connections (async-nats, ring only).
//!
//! With `--exchanges 2` a second exchange process joins, with k targets of
//! its own: each k is measured through one exchange (to the k targets on
//! the origin's exchange) and through two (to those on the second: every
//! message crosses the peer link), in the same deployment and run, and a
//! table gives what the hop adds. `--cpu-at-rates` also compares the paths'
//! CPU per delivery at the same offered rates.
//!
//! Measured: deliveries/s at saturation (a fixed number of messages, at
//! most `--window` messages outstanding, counting `delivered` report
//! entries / received NATS messages); server CPU µs per delivery
//! (utime+stime of the exchange / nats-server process from /proc, before and
//! after); iim latency p50/p99/p999 at 25/50/80 % of the measured saturation
//! rate (sends scheduled at fixed intervals, latency from the INTENDED send
//! time to the delivered report: corrected for coordinated omission); the
//! exchange's RSS with 100 registered idle app servers (a second, fresh
//! exchange process; the app servers in this process).

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use iim::tls::dev::DevCa;
use iim::types::{ServerId, Session, UserId};
use iim::{DeliveryStatus, Iim, Outgoing};
use iim_appserver::{AppServerHandle, ExchangeTarget};
use iim_kit::proc::{Binaries, EXCHANGE_BIN, Proc, free_port};
use iim_tests::load::{Arrivals, body_number, due_at, numbered_body, pace};
use iim_tests::nats;
use iim_tests::procfs::{CpuMeter, clk_tck, vm_kib};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The same allocator as the `iim-appserver` binary, for the app servers
/// this process hosts.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Above every app server id the bench uses (targets are 2..=k + 1, idle
/// servers 201 and up), so k may go to 256 and beyond.
const EXCHANGE_ID: u32 = 100_000;
const ORIGIN: u32 = 1;
/// With two exchanges, the first id of the targets on the origin's own
/// exchange (those on the second are 2..=k + 1).
const LOCAL_TARGETS: u32 = 50_000;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "iim relay benchmark side by side with NATS (TLS). Needs `cargo build --release --bins` first."
)]
struct Args {
    /// Small subset: k = 1 and 16, 1 KiB only, fewer messages, 1 s latency runs.
    #[arg(long)]
    quick: bool,
    /// Fan-outs (target servers per message).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    k: Vec<usize>,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    sizes: Vec<usize>,
    /// Deliveries per saturation run (messages = this / k).
    #[arg(long, default_value_t = 300_000)]
    deliveries: usize,
    /// Most messages outstanding (unreported) at once in saturation runs;
    /// NATS gets `window * k` deliveries in flight.
    #[arg(long, default_value_t = 4_096)]
    window: usize,
    /// Seconds per latency run (one per offered load).
    #[arg(long, default_value_t = 4.0)]
    latency_secs: f64,
    /// Skip NATS.
    #[arg(long)]
    no_nats: bool,
    /// Skip the latency runs.
    #[arg(long)]
    no_latency: bool,
    /// Skip the RSS measurement with idle app servers.
    #[arg(long)]
    no_rss: bool,
    /// Idle app servers for the RSS measurement.
    #[arg(long, default_value_t = 100)]
    idle_servers: u32,
    /// The exchange's `worker_threads` (default: its config default).
    #[arg(long)]
    exchange_threads: Option<usize>,
    /// `quic.max_udp_payload` of the exchange and the app servers
    /// (default: the config default).
    #[arg(long)]
    max_udp_payload: Option<u16>,
    /// The nats-server binary.
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    nats_server: PathBuf,
    /// At k = 1, also run the transport floor with iim's return path
    /// (`quic-floor --ack --ack-every 1`, next to this binary) right after
    /// each iim run, with the same frames and window, and print iim beside
    /// it.
    #[arg(long)]
    floor: bool,
    /// Exchanges: 1, or 2 with the origin on the first and every target on
    /// the second (each message crosses the peer link between them; the
    /// exchange CPU is both processes').
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    exchanges: u32,
    /// Also offer these fixed rates (deliveries/s, each for
    /// `--latency-secs`) after each saturation run and print the exchange
    /// CPU per delivery at each: costs compared at the same load rather
    /// than each at its own saturation (where more processes than cores
    /// inflate every figure).
    #[arg(long, value_delimiter = ',')]
    cpu_at_rates: Vec<f64>,
    /// With two exchanges: after both saturation runs of a (k, size),
    /// offer both paths each of these fractions of the lower of their
    /// saturation rates (the two-exchange path's, in practice; each for
    /// `--latency-secs`) and compare their CPU there: the hop's cost at
    /// equal loads up to about the highest both carry, rather than each
    /// path at its own saturation. Each in (0, 1]; empty (`--equal-load
    /// ''`) skips it.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.75,0.9")]
    equal_load: Vec<f64>,
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

struct ExchangeProc {
    proc: Proc,
    pid: u32,
    addr: SocketAddr,
}

/// Start the exchange binary on a fresh registry (`db_url`) with the
/// certificates in `certs`.
async fn start_exchange(
    bins: &Binaries,
    certs: &Path,
    db_url: &str,
    log: &Path,
    tuning: &Tuning,
    id: u32,
) -> Result<ExchangeProc> {
    // Settings without a flag go in through a config file.
    let defaults = iim_exchange::Config::default();
    let config = iim_exchange::Config {
        quic: tuning.quic(),
        worker_threads: tuning.exchange_threads.unwrap_or(defaults.worker_threads),
        ..defaults
    };
    let config_path = log.with_extension("toml");
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    let port = free_port(true);
    let http = free_port(false);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let args = [
        "--config".into(),
        config_path.display().to_string(),
        "--id".into(),
        id.to_string(),
        "--listen".into(),
        addr.to_string(),
        "--http-listen".into(),
        format!("127.0.0.1:{http}"),
        "--database".into(),
        db_url.to_owned(),
        "--certs".into(),
        certs.display().to_string(),
    ];
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let cmd = bins.daemon(EXCHANGE_BIN, &args, Some(&filter));
    let mut proc = Proc::start("iim-exchange", cmd, log, true)?;
    // The HTTP listener binds after the QUIC endpoint.
    let listening = format!("127.0.0.1:{http}").parse()?;
    iim_kit::proc::wait_listening(listening, "iim-exchange", Duration::from_secs(20), || {
        proc.check()
    })
    .await?;
    Ok(ExchangeProc {
        pid: proc.pid,
        proc,
        addr,
    })
}

// ---------------------------------------------------------------------------
// iim side
// ---------------------------------------------------------------------------

/// Transport and runtime settings that differ from the daemons' defaults
/// (none unless asked for on the command line).
#[derive(Clone, Debug, Default)]
struct Tuning {
    exchange_threads: Option<usize>,
    max_udp_payload: Option<u16>,
}

impl Tuning {
    fn quic(&self) -> iim::quic::QuicTuning {
        let mut q = iim::quic::QuicTuning::default();
        if let Some(p) = self.max_udp_payload {
            q.max_udp_payload = p;
        }
        q
    }
}

fn server_config(
    db: &str,
    id: u32,
    exchange: (u32, SocketAddr),
    tuning: &Tuning,
) -> iim_appserver::Config {
    let mut cfg = iim_kit::appserver_config(db, id, exchange.1);
    cfg.exchange = Some(ExchangeTarget {
        id: exchange.0,
        address: exchange.1,
    });
    // Production timers: a loaded 2-core box must not trip a 1 s idle timeout.
    cfg.quic = tuning.quic();
    cfg.heartbeat_ms = 1_000;
    cfg.client_listen = None;
    cfg
}

async fn start_server(
    ca: &DevCa,
    cfg: iim_appserver::Config,
    stop: &CancellationToken,
) -> Result<AppServerHandle> {
    let tls = ca.issue(&iim::tls::server_name(ServerId(cfg.id)))?;
    iim_appserver::start(cfg, tls, vec![], stop.child_token()).await
}

async fn wait_linked(s: &AppServerHandle) -> Result<()> {
    let mut w = s.link_watch();
    tokio::time::timeout(
        Duration::from_secs(30),
        w.wait_for(|l| l.exchange.is_some()),
    )
    .await
    .with_context(|| format!("server {} never linked", s.id))??;
    Ok(())
}

/// A plugin's message: the bench measures the relay, so it sends what a
/// plugin sends (kind 1 is iim's operator notice, which every receiving
/// host decodes and renders for its clients).
const BENCH_KIND: u16 = 100;

fn outgoing(body: &Bytes) -> Outgoing {
    Outgoing {
        kind: BENCH_KIND,
        from: UserId(1),
        body: body.clone(),
        ..Default::default()
    }
}

/// Saturation: `messages` submits, at most `window` unreported; returns
/// (delivered report entries, seconds).
async fn iim_saturate(
    iim: &Iim,
    users: &[Session],
    messages: usize,
    size: usize,
    window: usize,
) -> Result<(u64, f64)> {
    let body = Bytes::from(vec![b'x'; size]);
    let (tx, mut rx) = tokio::sync::mpsc::channel(window.max(1));
    let start = Instant::now();
    let producer = {
        let iim = iim.clone();
        let users = users.to_vec();
        tokio::spawn(async move {
            for _ in 0..messages {
                let p = iim.submit(outgoing(&body), &users).await?;
                if tx.send(p).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    let mut delivered = 0u64;
    while let Some(p) = rx.recv().await {
        let r = p.await;
        delivered += r
            .servers
            .iter()
            .filter(|(_, s)| *s == DeliveryStatus::Delivered)
            .count() as u64;
    }
    producer.await??;
    Ok((delivered, start.elapsed().as_secs_f64()))
}

struct Latency {
    offered_msgs: f64,
    sent: u64,
    not_delivered: u64,
    achieved_msgs: f64,
    /// Intended send time → the delivered report at the origin (every
    /// target acknowledged), per message.
    hist: Histogram<u64>,
    /// Intended send time → the message taken off a target connection's
    /// queue, per delivery (what a recipient sees).
    recv: Histogram<u64>,
    /// How late the sending thread itself was, per message: the part of
    /// the figures above that is the box's scheduling, not the relay.
    late: Histogram<u64>,
}

/// Fixed-rate run (see [`pace`]): latency from each message's intended
/// send time to its arrival at each target connection and to its report
/// (all k targets delivered).
async fn iim_latency(
    iim: &Iim,
    users: &[Session],
    rate: f64,
    secs: f64,
    size: usize,
    arrivals: &Arrivals,
) -> Result<Latency> {
    let n = (rate * secs).max(1.0) as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now();
    arrivals.begin(start, rate)?;
    let sender = {
        let iim = iim.clone();
        let users = users.to_vec();
        std::thread::spawn(move || -> Result<Histogram<u64>> {
            pace(start, rate, n, |range| {
                handle.block_on(async {
                    for j in range {
                        let p = iim
                            .submit(outgoing(&numbered_body(j, size)), &users)
                            .await?;
                        if tx.send((due_at(start, rate, j), p)).is_err() {
                            break;
                        }
                    }
                    anyhow::Ok(())
                })
            })
        })
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut waiting = FuturesUnordered::new();
    let mut not_delivered = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut sent = 0u64;
    let mut record = |due: Instant, r: iim::SendReport, hist: &mut Histogram<u64>| {
        let now = Instant::now();
        last = now;
        if r.all_delivered() {
            hist.saturating_record((now - due).as_micros() as u64);
        } else {
            not_delivered += 1;
        }
    };
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some((due, p)) => {
                    first.get_or_insert(due);
                    sent += 1;
                    waiting.push(async move { (due, p.await) });
                }
                None => break,
            },
            Some((due, r)) = waiting.next(), if !waiting.is_empty() => record(due, r, &mut hist),
        }
    }
    while let Some((due, r)) = waiting.next().await {
        record(due, r, &mut hist);
    }
    let late = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let span = first.map(|f| (last - f).as_secs_f64()).unwrap_or(1.0);
    // Every target acknowledged before its report: the messages are in the
    // connection queues; give the drain tasks a moment to take them.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let recv = arrivals.end().context("arrival histogram")?;
    Ok(Latency {
        offered_msgs: rate,
        sent,
        not_delivered,
        achieved_msgs: sent as f64 / span,
        hist,
        recv,
        late,
    })
}

// ---------------------------------------------------------------------------
// NATS side
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

struct Row {
    k: usize,
    size: usize,
    /// Exchanges on the path: 1 (targets on the origin's exchange) or 2.
    hops: u32,
    iim_dps: f64,
    iim_cpu_us: f64,
    bench_cpu_us: f64,
    nats_dps: Option<f64>,
    nats_cpu_us: Option<f64>,
    nats_bench_cpu_us: Option<f64>,
    /// The floor right after (`--floor`, k = 1).
    floor: Option<Floor>,
    /// CPU at the fixed rates of `--cpu-at-rates`.
    at_rates: Vec<AtRate>,
    /// CPU at `--equal-load` of the two-exchange path's saturation.
    at_equal: Vec<AtRate>,
    lat: Vec<(u32, Latency)>,
    /// NATS at the same offered loads: (latency, sender lateness, missing).
    nats_lat: Vec<(Histogram<u64>, Histogram<u64>, u64)>,
}

/// CPU per delivery at one fixed offered rate.
struct AtRate {
    /// Deliveries/s offered and achieved.
    offered: f64,
    achieved: f64,
    /// Both exchanges' CPU (with two), per delivery.
    exchange_us: f64,
    bench_us: f64,
}

/// Measures the CPU per delivery at one fixed offered rate.
struct RateMeter<'a> {
    iim: &'a Iim,
    /// The exchanges (the second with `--exchanges 2`).
    pids: [Option<u32>; 2],
    me: u32,
    tck: f64,
    secs: f64,
    arrivals: &'a Arrivals,
}

impl RateMeter<'_> {
    /// `offered` deliveries/s to `users` (one message to all of them
    /// each time) for `secs`.
    async fn measure(
        &self,
        users: &[Session],
        hops: u32,
        offered: f64,
        size: usize,
    ) -> Result<AtRate> {
        let k = users.len();
        let exchanges: Vec<CpuMeter> = self
            .pids
            .iter()
            .flatten()
            .map(|&pid| CpuMeter::start(pid, self.tck))
            .collect();
        let own = CpuMeter::start(self.me, self.tck);
        let l = iim_latency(
            self.iim,
            users,
            offered / k as f64,
            self.secs,
            size,
            self.arrivals,
        )
        .await?;
        let delivered = ((l.sent - l.not_delivered) * k as u64).max(1) as f64;
        let exchange_cpu: f64 = exchanges.into_iter().map(|c| c.micros()).sum();
        let a = AtRate {
            offered,
            achieved: l.achieved_msgs * k as f64,
            exchange_us: exchange_cpu / delivered,
            bench_us: own.micros() / delivered,
        };
        eprintln!(
            "iim  k={k:<2} size={size:<5} via {hops} exchange(s) at {offered:.0} deliveries/s offered ({:.0} achieved): exchange CPU {:.2} µs/delivery, bench process {:.2} µs",
            a.achieved, a.exchange_us, a.bench_us,
        );
        Ok(a)
    }
}

/// One run of the transport floor (`quic-floor`).
struct Floor {
    fps: f64,
    relay_us: f64,
    bench_us: f64,
}

/// `quic-floor` with iim's return path for `frames` frames of `size`
/// bytes and `window` in flight; its result line.
async fn floor_run(dir: &Path, size: usize, frames: usize, window: usize) -> Result<Floor> {
    let out = tokio::process::Command::new(dir.join("quic-floor"))
        .args([
            "--sizes",
            &size.to_string(),
            "--runs",
            "1",
            "--frames",
            &frames.to_string(),
            "--window",
            &window.to_string(),
            "--ack",
            "--ack-every",
            "1",
            "--result-lines",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("run quic-floor (build it with the other release binaries)")?;
    if !out.status.success() {
        bail!("quic-floor failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("floor "))
        .context("quic-floor printed no result line")?;
    let field = |name: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .context(format!("quic-floor result line without {name}: {line}"))?
            .parse()
            .context(format!("quic-floor {name}"))
    };
    Ok(Floor {
        fps: field("frames_per_sec")?,
        relay_us: field("relay_us")?,
        bench_us: field("bench_us")?,
    })
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn ratio(a: f64, b: Option<f64>) -> String {
    b.filter(|b| *b > 0.0)
        .map(|b| format!("{:.2}", a / b))
        .unwrap_or_else(|| "-".into())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // Everything runs on the two workers, as an app server's plugins do:
    // a waiter on the main thread would be a third thread to wake for each
    // report (iim) or received batch (NATS).
    tokio::spawn(run(Args::parse())).await?
}

async fn run(mut args: Args) -> Result<()> {
    if args.equal_load.iter().any(|f| !(*f > 0.0 && *f <= 1.0)) {
        bail!("--equal-load: each fraction must be above 0 and at most 1");
    }
    if args.quick {
        args.k = vec![1, 16];
        args.sizes = vec![1024];
        args.deliveries = args.deliveries.min(100_000);
        args.latency_secs = args.latency_secs.min(1.5);
    }
    let bins = Binaries::next_to_me("cargo build --release --bins")?;
    let tck = clk_tck();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    eprintln!(
        "iim-bench: exchange {} ; work dir {}",
        bins.path(EXCHANGE_BIN).display(),
        dir.display()
    );

    // Certificates for everything, from one CA made now.
    let ca = DevCa::new("iim bench CA")?;
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    for id in [EXCHANGE_ID, EXCHANGE_ID + 1] {
        let ex_tls = ca.issue(&iim::tls::exchange_name(ServerId(id)))?;
        std::fs::write(certs.join("ca.pem"), &ex_tls.ca_pem)?;
        std::fs::write(certs.join(format!("exchange-{id}.pem")), &ex_tls.cert_pem)?;
        std::fs::write(certs.join(format!("exchange-{id}.key")), &ex_tls.key_pem)?;
    }

    let tuning = Tuning {
        exchange_threads: args.exchange_threads,
        max_udp_payload: args.max_udp_payload,
    };
    // Registry + exchange process.
    let db_url = format!("sqlite://{}", dir.join("registry.db").display());
    iim::registry::Registry::connect(&db_url).await?;
    let mut ex = start_exchange(
        &bins,
        &certs,
        &db_url,
        &dir.join("exchange.log"),
        &tuning,
        EXCHANGE_ID,
    )
    .await?;
    // With two exchanges the targets attach to the second one.
    let ex2 = if args.exchanges == 2 {
        let log = dir.join("exchange-2.log");
        Some(start_exchange(&bins, &certs, &db_url, &log, &tuning, EXCHANGE_ID + 1).await?)
    } else {
        None
    };
    let target_exchange = match &ex2 {
        Some(x) => (EXCHANGE_ID + 1, x.addr),
        None => (EXCHANGE_ID, ex.addr),
    };
    let stop = CancellationToken::new();

    let kmax = *args.k.iter().max().unwrap_or(&1);
    let mut cfg = server_config(&db_url, ORIGIN, (EXCHANGE_ID, ex.addr), &tuning);
    cfg.max_outstanding = args.window.max(1) * 2;
    let origin = start_server(&ca, cfg, &stop).await?;
    wait_linked(&origin).await?;
    let mut keep = Vec::new();
    let arrivals = Arc::new(Arrivals::default());
    // The paths measured: targets on the origin's exchange, and with two
    // exchanges also targets on the second one, in the same deployment.
    let mut paths = vec![(1u32, Vec::new())];
    if ex2.is_some() {
        paths.push((2, Vec::new()));
    }
    for (hops, targets) in paths.iter_mut() {
        let (exchange, first_id) = match hops {
            1 => (
                (EXCHANGE_ID, ex.addr),
                if ex2.is_some() { LOCAL_TARGETS } else { 2 },
            ),
            _ => (target_exchange, 2),
        };
        for i in 0..kmax {
            let id = first_id + i as u32;
            let mut cfg = server_config(&db_url, id, exchange, &tuning);
            cfg.connection_queue = 1 << 20;
            let s = start_server(&ca, cfg, &stop).await?;
            wait_linked(&s).await?;
            let user = UserId(1000 + u64::from(id));
            let mut conn = s.connections.attach(user, "bench").await?;
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                while let Some(m) = conn.rx.recv().await {
                    if let Some(i) = m.message().and_then(|m| body_number(&m.body)) {
                        arrivals.record(i);
                    }
                }
            });
            targets.push(user);
            keep.push(s);
        }
    }
    let mut nats = if args.no_nats {
        None
    } else {
        Some(nats::start(&args.nats_server, &ca, &dir, &dir.join("nats.log")).await?)
    };

    let me = std::process::id();
    let at = RateMeter {
        iim: &origin.iim,
        pids: [Some(ex.pid), ex2.as_ref().map(|x| x.pid)],
        me,
        tck,
        secs: args.latency_secs,
        arrivals: &arrivals,
    };
    let mut rows: Vec<Row> = Vec::new();
    for &size in &args.sizes {
        for &k in &args.k {
            let messages = (args.deliveries / k).max(1);
            let first_row = rows.len();
            let mut path_users = Vec::new();
            for (hops, targets) in &paths {
                let hops = *hops;
                let users = origin.iim.user_list(&targets[..k]).await?;
                if users.len() != k {
                    bail!("expected {k} sessions, registry has {}", users.len());
                }
                path_users.push(users.clone());
                // Warm-up, then the measured run.
                iim_saturate(
                    &origin.iim,
                    &users,
                    (messages / 10).max(100),
                    size,
                    args.window,
                )
                .await?;
                let cpu = CpuMeter::start(ex.pid, tck);
                let cpu2 = ex2.as_ref().map(|x| CpuMeter::start(x.pid, tck));
                let own = CpuMeter::start(me, tck);
                let (delivered, secs) =
                    iim_saturate(&origin.iim, &users, messages, size, args.window).await?;
                let iim_cpu = cpu.micros() + cpu2.map_or(0.0, |c| c.micros());
                let bench_cpu = own.micros();
                if delivered != (messages * k) as u64 {
                    eprintln!(
                        "  warning: iim k={k} size={size}: {delivered} of {} delivered",
                        messages * k
                    );
                }
                let dps = delivered as f64 / secs;
                eprintln!(
                    "iim  k={k:<2} size={size:<5} via {hops} exchange(s): {delivered} deliveries in {secs:.2}s = {dps:.0}/s, exchange {:.2} µs/delivery",
                    iim_cpu / delivered.max(1) as f64
                );
                let mut row = Row {
                    k,
                    size,
                    hops,
                    iim_dps: dps,
                    iim_cpu_us: iim_cpu / delivered.max(1) as f64,
                    bench_cpu_us: bench_cpu / delivered.max(1) as f64,
                    nats_dps: None,
                    nats_cpu_us: None,
                    nats_bench_cpu_us: None,
                    floor: None,
                    at_rates: Vec::new(),
                    at_equal: Vec::new(),
                    lat: Vec::new(),
                    nats_lat: Vec::new(),
                };
                for &offered in &args.cpu_at_rates {
                    let a = at.measure(&users, hops, offered, size).await?;
                    row.at_rates.push(a);
                }
                let first = rows.len() == first_row;
                if let (Some(n), true) = (&nats, first) {
                    nats::saturate(n, k, (messages / 10).max(100), size, args.window * k, tck)
                        .await?;
                    let own = CpuMeter::start(me, tck);
                    let (got, secs, cpu_us) =
                        nats::saturate(n, k, messages, size, args.window * k, tck).await?;
                    let bench_cpu = own.micros();
                    if got != (messages * k) as u64 {
                        eprintln!(
                            "  warning: nats k={k} size={size}: {got} of {} received",
                            messages * k
                        );
                    }
                    let dps = got as f64 / secs;
                    eprintln!(
                        "nats k={k:<2} size={size:<5} {got} deliveries in {secs:.2}s = {dps:.0}/s, server {:.2} µs/message",
                        cpu_us / got.max(1) as f64
                    );
                    row.nats_dps = Some(dps);
                    row.nats_cpu_us = Some(cpu_us / got.max(1) as f64);
                    row.nats_bench_cpu_us = Some(bench_cpu / got.max(1) as f64);
                }
                if !first {
                    // NATS was measured once per (k, size), beside the first path.
                    let f = &rows[first_row];
                    row.nats_dps = f.nats_dps;
                    row.nats_cpu_us = f.nats_cpu_us;
                    row.nats_bench_cpu_us = f.nats_bench_cpu_us;
                }
                if args.floor && k == 1 && first {
                    let f = floor_run(bins.dir(), size, messages, args.window).await?;
                    eprintln!(
                        "floor k=1  size={size:<5} {:.0} frames/s, relay {:.2} µs/frame, bench {:.2} µs/frame",
                        f.fps, f.relay_us, f.bench_us
                    );
                    row.floor = Some(f);
                }
                if !args.no_latency {
                    for pct in [25u32, 50, 80] {
                        let rate = row.iim_dps / k as f64 * f64::from(pct) / 100.0;
                        let l = iim_latency(
                            &origin.iim,
                            &users,
                            rate,
                            args.latency_secs,
                            size,
                            &arrivals,
                        )
                        .await?;
                        eprintln!(
                            "iim  k={k:<2} size={size:<5} via {hops} exchange(s) {pct}% = {:.0} msg/s offered, {:.0} achieved: received p50 {} µs p99 {} µs p999 {} µs; report p50 {} µs p99 {} µs p999 {} µs max {} µs ({} samples, {} not delivered)",
                            l.offered_msgs,
                            l.achieved_msgs,
                            l.recv.value_at_quantile(0.5),
                            l.recv.value_at_quantile(0.99),
                            l.recv.value_at_quantile(0.999),
                            l.hist.value_at_quantile(0.5),
                            l.hist.value_at_quantile(0.99),
                            l.hist.value_at_quantile(0.999),
                            l.hist.max(),
                            l.hist.len(),
                            l.not_delivered
                        );
                        row.lat.push((pct, l));
                        if let (Some(n), true) = (&nats, first) {
                            let (h, late, missing) =
                                nats::latency(n, k, rate, args.latency_secs, size).await?;
                            eprintln!(
                                "nats k={k:<2} size={size:<5} {pct}% = {rate:.0} msg/s offered: received p50 {} µs p99 {} µs p999 {} µs ({missing} missing; sender late p99 {} µs)",
                                h.value_at_quantile(0.5),
                                h.value_at_quantile(0.99),
                                h.value_at_quantile(0.999),
                                late.value_at_quantile(0.99),
                            );
                            row.nats_lat.push((h, late, missing));
                        }
                    }
                }
                rows.push(row);
            }
            // Both paths at one load: the two-exchange path's saturation
            // rate, scaled down so that it is carried without a backlog.
            let slower = rows[first_row..]
                .iter()
                .map(|r| r.iim_dps)
                .fold(f64::MAX, f64::min);
            for &fraction in args.equal_load.iter().filter(|_| path_users.len() == 2) {
                let offered = slower * fraction;
                for (i, users) in path_users.iter().enumerate() {
                    let hops = paths[i].0;
                    let a = at.measure(users, hops, offered, size).await?;
                    if a.achieved < 0.97 * offered {
                        eprintln!(
                            "  warning: via {hops} exchange(s) only {:.0} of {offered:.0} deliveries/s offered were carried: that path is past its limit at this load",
                            a.achieved
                        );
                    }
                    rows[first_row + i].at_equal.push(a);
                }
            }
        }
    }
    let ex_rss_after = vm_kib(ex.pid, "VmRSS");
    let ex_hwm_after = vm_kib(ex.pid, "VmHWM");

    // Tear down the throughput deployment before the RSS one.
    stop.cancel();
    drop(keep);
    drop(origin);
    ex.proc.kill9().await;
    if let Some(mut x) = ex2 {
        x.proc.kill9().await;
    }
    if let Some(n) = nats.take() {
        n.stop().await;
    }

    let mut rss = None;
    if !args.no_rss {
        rss = Some(idle_rss(&bins, &ca, &certs, &dir, args.idle_servers, &tuning).await?);
    }

    // The table.
    println!();
    println!(
        "## iim-bench results ({} target servers max, window {} messages, {} deliveries per saturation run)",
        kmax, args.window, args.deliveries
    );
    println!();
    println!(
        "| k | payload | exchanges | iim deliveries/s | NATS deliveries/s | iim/NATS | exchange CPU µs/delivery | nats-server CPU µs/msg | NATS/iim CPU | bench-process CPU µs/delivery iim / NATS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} B | {} | {:.0} | {} | {} | {:.2} | {} | {} | {:.2} / {} |",
            r.k,
            r.size,
            r.hops,
            r.iim_dps,
            fmt_opt(r.nats_dps, 0),
            ratio(r.iim_dps, r.nats_dps),
            r.iim_cpu_us,
            fmt_opt(r.nats_cpu_us, 2),
            r.nats_cpu_us
                .filter(|_| r.iim_cpu_us > 0.0)
                .map(|n| format!("{:.2}", n / r.iim_cpu_us))
                .unwrap_or_else(|| "-".into()),
            r.bench_cpu_us,
            fmt_opt(r.nats_bench_cpu_us, 2),
        );
    }
    if rows.iter().any(|r| !r.at_rates.is_empty()) {
        println!();
        println!(
            "CPU per delivery at fixed offered rates (`--cpu-at-rates`, each for {} s): exchange CPU (both exchanges' with two) and the bench process's",
            args.latency_secs
        );
        println!();
        println!(
            "| k | payload | exchanges | offered deliveries/s | achieved | exchange CPU µs/delivery | bench-process CPU µs/delivery |"
        );
        println!("|---|---|---|---|---|---|---|");
        for r in &rows {
            for a in &r.at_rates {
                println!(
                    "| {} | {} B | {} | {:.0} | {:.0} | {:.2} | {:.2} |",
                    r.k, r.size, r.hops, a.offered, a.achieved, a.exchange_us, a.bench_us
                );
            }
        }
    }
    // The relay hop: what the second exchange on the path adds, beside
    // what one exchange costs, at saturation and at each fixed rate.
    let pairs: Vec<(&Row, &Row)> = rows
        .iter()
        .filter(|r| r.hops == 1)
        .filter_map(|one| {
            let two = rows
                .iter()
                .find(|r| r.hops == 2 && r.k == one.k && r.size == one.size)?;
            Some((one, two))
        })
        .collect();
    if !pairs.is_empty() {
        println!();
        println!(
            "The relay hop: exchange CPU µs per delivery through one exchange and through two, the difference (the hop) and the hop / one exchange"
        );
        println!();
        println!(
            "| k | payload | load | one exchange | two exchanges | hop | hop / one exchange |"
        );
        println!("|---|---|---|---|---|---|---|");
        let line = |one: &Row, load: String, a: f64, b: f64| {
            println!(
                "| {} | {} B | {load} | {a:.2} | {b:.2} | {:.2} | {:.2} |",
                one.k,
                one.size,
                b - a,
                (b - a) / a.max(f64::MIN_POSITIVE)
            );
        };
        for (one, two) in pairs {
            let sat = format!(
                "saturation ({:.0} / {:.0} deliveries/s)",
                one.iim_dps, two.iim_dps
            );
            line(one, sat, one.iim_cpu_us, two.iim_cpu_us);
            for ((a, b), fraction) in one.at_equal.iter().zip(&two.at_equal).zip(&args.equal_load) {
                let load = format!(
                    "{:.0} deliveries/s offered to both ({:.0} % of the slower path's saturation; {:.0} / {:.0} achieved)",
                    a.offered,
                    100.0 * fraction,
                    a.achieved,
                    b.achieved
                );
                line(one, load, a.exchange_us, b.exchange_us);
            }
            for (a, b) in one.at_rates.iter().zip(&two.at_rates) {
                let load = format!("{:.0} deliveries/s offered", a.offered);
                line(one, load, a.exchange_us, b.exchange_us);
            }
        }
    }
    if rows.iter().any(|r| r.floor.is_some()) {
        println!();
        println!(
            "k = 1 beside the transport floor with the return path (`quic-floor --ack --ack-every 1`, run right after each iim run, same frames and window)"
        );
        println!();
        println!(
            "| payload | iim deliveries/s | floor frames/s | iim/floor | exchange / floor relay CPU µs | bench process iim / floor ends CPU µs |"
        );
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            if let Some(f) = &r.floor {
                println!(
                    "| {} B | {:.0} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
                    r.size,
                    r.iim_dps,
                    f.fps,
                    r.iim_dps / f.fps,
                    r.iim_cpu_us,
                    f.relay_us,
                    r.bench_cpu_us,
                    f.bench_us
                );
            }
        }
    }
    if rows.iter().any(|r| !r.lat.is_empty()) {
        println!();
        println!(
            "iim latency in µs from the intended send time (corrected for coordinated omission): to the message leaving a target connection's queue (received, per delivery), and to the delivered report at the origin (report, per message)"
        );
        println!();
        println!(
            "| k | payload | exchanges | load | offered msg/s | achieved msg/s | received p50 | received p99 | received p999 | report p50 | report p99 | report p999 | report max | sender late p99 | samples / sent | not delivered |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            for (pct, l) in &r.lat {
                println!(
                    "| {} | {} B | {} | {pct} % | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
                    r.k,
                    r.size,
                    r.hops,
                    l.offered_msgs,
                    l.achieved_msgs,
                    l.recv.value_at_quantile(0.5),
                    l.recv.value_at_quantile(0.99),
                    l.recv.value_at_quantile(0.999),
                    l.hist.value_at_quantile(0.5),
                    l.hist.value_at_quantile(0.99),
                    l.hist.value_at_quantile(0.999),
                    l.hist.max(),
                    l.late.value_at_quantile(0.99),
                    l.hist.len(),
                    l.sent,
                    l.not_delivered
                );
            }
        }
        if rows.iter().any(|r| !r.nats_lat.is_empty()) {
            println!();
            println!(
                "NATS-TLS at the same offered loads, µs from the intended publish time to the subscriber (per delivery; no report exists)"
            );
            println!();
            println!(
                "| k | payload | load | offered msg/s | received p50 | received p99 | received p999 | sender late p99 | missing | iim/NATS received p99 |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|");
            for r in &rows {
                for ((pct, l), (h, late, missing)) in r.lat.iter().zip(&r.nats_lat) {
                    let p99 = h.value_at_quantile(0.99);
                    println!(
                        "| {} | {} B | {pct} % | {:.0} | {} | {} | {} | {} | {} | {:.2} |",
                        r.k,
                        r.size,
                        l.offered_msgs,
                        h.value_at_quantile(0.5),
                        p99,
                        h.value_at_quantile(0.999),
                        late.value_at_quantile(0.99),
                        missing,
                        l.recv.value_at_quantile(0.99) as f64 / p99.max(1) as f64,
                    );
                }
            }
        }
    }
    println!();
    println!(
        "exchange after the throughput runs: VmRSS {} KiB, VmHWM {} KiB",
        ex_rss_after, ex_hwm_after
    );
    if let Some((base, rss, hwm, n)) = rss {
        println!(
            "exchange with {n} registered idle app servers (fresh process): VmRSS {rss} KiB ({:.1} MiB), VmHWM {hwm} KiB; before any app server connected: {base} KiB",
            rss as f64 / 1024.0
        );
    }
    // Leave without waiting for the in-process servers' drains.
    std::process::exit(0);
}

/// A fresh exchange process and `n` app servers that register and stay
/// idle; returns (RSS before any server, RSS with them, HWM, n) in KiB.
async fn idle_rss(
    bins: &Binaries,
    ca: &DevCa,
    certs: &Path,
    dir: &Path,
    n: u32,
    tuning: &Tuning,
) -> Result<(u64, u64, u64, u32)> {
    let db_url = format!("sqlite://{}", dir.join("registry-idle.db").display());
    iim::registry::Registry::connect(&db_url).await?;
    let mut ex = start_exchange(
        bins,
        certs,
        &db_url,
        &dir.join("exchange-idle.log"),
        tuning,
        EXCHANGE_ID,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = vm_kib(ex.pid, "VmRSS");
    let stop = CancellationToken::new();
    let mut servers = Vec::new();
    for i in 0..n {
        let cfg = server_config(&db_url, 201 + i, (EXCHANGE_ID, ex.addr), tuning);
        servers.push(start_server(ca, cfg, &stop).await?);
    }
    for s in &servers {
        wait_linked(s).await?;
    }
    // Idle for a few heartbeats.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = vm_kib(ex.pid, "VmRSS");
    let hwm = vm_kib(ex.pid, "VmHWM");
    eprintln!("exchange with {n} idle app servers: VmRSS {rss} KiB (before: {base} KiB)");
    stop.cancel();
    ex.proc.kill9().await;
    std::mem::forget(servers);
    Ok((base, rss, hwm, n))
}
