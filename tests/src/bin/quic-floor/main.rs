//! `quic-floor`: the physical floor of iim's transport in `iim-bench`'s
//! k = 1 topology, with no iim logic at all.
//!
//! - A RELAY process (this binary re-executed as `quic-floor relay`) on a
//!   current-thread tokio runtime, like the exchange's default
//!   `worker_threads = 1`. It accepts two mutual-TLS QUIC connections (a
//!   sender, `server-1.iim`, and a receiver, `server-2.iim`), each opening
//!   ONE bidirectional stream as our app servers do, and copies bytes
//!   sender → receiver (and receiver → sender, for `--ack`) with
//!   `read_chunk` → `write_chunk`: no framing, no decoding.
//! - THIS process (multi-thread runtime, 2 workers, mimalloc, like
//!   `iim-bench`) is both ends: the sender writes length-prefixed frames of
//!   `--size` bytes, many frames per `write_chunk` (as our writer task
//!   coalesces), with at most `--window` frames in flight; the receiver
//!   counts frames and reports them back, in process (default) or through
//!   the relay (`--ack`: 8-byte cumulative counts every `--ack-every`
//!   frames, a stand-in for iim's ack/report return trip).
//!
//! Transport settings and TLS are iim's own: `QuicTuning::default()`
//! (transport config, socket buffers, endpoint), `iim::tls` server and
//! client configs, certificates from a `DevCa` made at run time;
//! `--max-udp-payload` overrides `QuicTuning::max_udp_payload` everywhere.
//!
//! Measured per run (a warm-up of a tenth of the frames first): frames per
//! second at the receiver, the relay process's CPU (utime + stime from
//! /proc) per frame, this process's CPU per frame, and the cores every other
//! process used meanwhile (machine-wide busy time from /proc/stat minus ours:
//! this box is shared, and a busy neighbour halves the figures).
//!
//! `--nats` runs NATS-with-TLS in the same topology after each run (one
//! publisher, one subscriber, the same frames and window; `iim_tests::nats`,
//! as `iim-bench` runs it), so the floor and NATS are compared within one
//! run. `--latency-loads 25,50` adds open-loop runs at those percentages of
//! the floor's saturation rate (`iim_tests::load`: frame i is due at
//! start + i / rate and carries i), latency from the intended send time to
//! the receiver, NATS at the same offered rates with `--nats`.
//!
//! Modules: `relay` (the child), `ends` (starting the relay, the two ends,
//! writing and counting frames), `run` (one measured run, latency runs and
//! NATS beside them); this file parses flags and drives the runs.

mod ends;
mod relay;
mod run;

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use iim::quic::QuicTuning;
use iim::tls::{self, dev::DevCa};
use iim::types::ServerId;
use iim_tests::nats;
use iim_tests::procfs::clk_tck;
use run::{Latency, Row, Setup, floor_latency, nats_run, one_run, pct};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The allocator of the `iim-exchange` and `iim-appserver` binaries (and of
/// the relay child, which is this binary).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RELAY_ID: u32 = 100;
const SENDER_ID: u32 = 1;
const RECEIVER_ID: u32 = 2;
/// First byte each end writes on its stream (a client-opened stream is
/// seen by the relay only once data flows on it).
const HELLO_SENDER: u8 = 1;
const HELLO_RECEIVER: u8 = 2;
/// Length prefix of a frame (u32, big-endian).
const HEADER: usize = 4;
/// A phase (warm-up or measured run) taking longer than this is a failure.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(
    about = "Floor of iim's QUIC transport at k = 1: sender → relay process → receiver, raw byte copy, iim's QUIC and TLS settings.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The relay child (started by the benchmark itself).
    #[command(hide = true)]
    Relay(RelayArgs),
}

#[derive(clap::Args, Debug)]
struct RelayArgs {
    /// Loopback address to listen on; the bound port is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory holding ca.pem and exchange-100.pem/.key.
    #[arg(long)]
    certs: PathBuf,
    /// How the relay copies sender → receiver.
    #[arg(long, value_enum, default_value_t = Mode::Chunk)]
    mode: Mode,
    /// `QuicTuning::max_udp_payload` (default: iim's default).
    #[arg(long)]
    max_udp_payload: Option<u16>,
}

/// How the relay copies bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// `read_chunk` → `write_chunk`, one chunk at a time.
    Chunk,
    /// `read_chunks` (up to 64 at once) → `write_all_chunks`.
    Chunks,
    /// `read_chunks` → one contiguous buffer → `write_chunk` (our writer
    /// task's single-buffer write).
    Coalesce,
}

impl Mode {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

#[derive(clap::Args, Debug, Clone)]
struct BenchArgs {
    /// Frame payload sizes in bytes (each frame has a 4-byte length prefix).
    #[arg(long, value_delimiter = ',', default_value = "1024,100")]
    sizes: Vec<usize>,
    /// Frames per measured run.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// Warm-up frames before each measured run (default: frames / 10).
    #[arg(long)]
    warmup: Option<u64>,
    /// Runs per size and relay mode (a fresh relay process each).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Most frames sent and not yet counted by the receiver.
    #[arg(long, default_value_t = 4_096)]
    window: u64,
    /// Most bytes per sender `write_chunk` (frames are never split).
    #[arg(long, default_value_t = 64 * 1024)]
    batch_bytes: usize,
    /// Relay copy modes to run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "chunk")]
    relay_modes: Vec<Mode>,
    /// The receiver reports its count through the relay (8-byte cumulative
    /// counts on its stream, copied to the sender's) instead of in process.
    #[arg(long)]
    ack: bool,
    /// With `--ack`: one count per this many frames (at most window / 2).
    #[arg(long, default_value_t = 256)]
    ack_every: u64,
    /// Print each end's QUIC connection statistics after every run.
    #[arg(long)]
    stats: bool,
    /// `QuicTuning::max_udp_payload` of all three endpoints (default: iim's
    /// default, 1452; loopback carries up to 65527).
    #[arg(long)]
    max_udp_payload: Option<u16>,
    /// Also run NATS-with-TLS in the same topology (one publisher, one
    /// subscriber, the same frames and window) after each floor run, and
    /// at the same offered loads: the floor and NATS measured side by side.
    #[arg(long)]
    nats: bool,
    /// The nats-server binary (with `--nats`).
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    nats_server: PathBuf,
    /// Open-loop latency runs at these percentages of the floor's measured
    /// saturation rate (mean of the runs of the first relay mode), e.g.
    /// `25,50`: frame i is due at start + i / rate and carries i; latency
    /// from its intended send time to its arrival at the receiver.
    #[arg(long, value_delimiter = ',')]
    latency_loads: Vec<u32>,
    /// Open-loop latency runs at these offered rates (frames/s), e.g. the
    /// rates `iim-bench` offered iim, to compare at the same load.
    #[arg(long, value_delimiter = ',')]
    latency_rates: Vec<f64>,
    /// Seconds per latency run.
    #[arg(long, default_value_t = 4.0)]
    latency_secs: f64,
    /// Also print one line per run on stdout, `floor size=… frames_per_sec=…
    /// relay_us=… bench_us=…`, for `iim-bench --floor` to read.
    #[arg(long)]
    result_lines: bool,
}

/// iim's QUIC settings, with the largest UDP payload overridden if asked.
fn tuning(max_udp_payload: Option<u16>) -> Result<QuicTuning> {
    let mut t = QuicTuning::default();
    if let Some(p) = max_udp_payload {
        t.max_udp_payload = p;
    }
    t.validate().map_err(anyhow::Error::msg)?;
    Ok(t)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Relay(a)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(relay::relay(a)),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(bench(cli.bench)),
    }
}

async fn bench(a: BenchArgs) -> Result<()> {
    ensure!(!a.sizes.is_empty(), "--sizes: at least one size");
    ensure!(
        a.sizes.iter().all(|&s| s > 0 && u32::try_from(s).is_ok()),
        "--sizes: each between 1 and 2^32 - 1"
    );
    ensure!(a.frames > 0, "--frames must be positive");
    ensure!(a.runs > 0, "--runs must be positive");
    ensure!(a.window >= 2, "--window must be at least 2");
    ensure!(a.batch_bytes > 0, "--batch-bytes must be positive");
    ensure!(!a.relay_modes.is_empty(), "--relay-modes: at least one");
    ensure!(
        a.latency_rates.iter().all(|&r| r.is_finite() && r >= 1.0),
        "--latency-rates: frames per second, at least 1"
    );
    ensure!(
        (a.latency_loads.is_empty() && a.latency_rates.is_empty())
            || a.sizes.iter().all(|&s| s >= 8),
        "--latency-loads: frames carry their number, so every size must be at least 8"
    );
    ensure!(
        a.latency_loads.iter().all(|&l| (1..=100).contains(&l)),
        "--latency-loads: percentages between 1 and 100"
    );
    ensure!(
        a.latency_secs > 0.0 && a.latency_secs <= 600.0,
        "--latency-secs: between 0 and 600"
    );
    // A blocked sender has more than window / 2 frames unacknowledged, so
    // the receiver always has an ack due.
    ensure!(
        !a.ack || (1..=a.window / 2).contains(&a.ack_every),
        "--ack-every must be between 1 and window / 2"
    );

    let tmp = tempfile::tempdir()?;
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    let ca = DevCa::new("quic-floor CA")?;
    let relay_tls = ca.issue(&tls::exchange_name(ServerId(RELAY_ID)))?;
    let files = tls::dev::exchange_files(&certs, ServerId(RELAY_ID));
    std::fs::write(&files.ca, &relay_tls.ca_pem)?;
    std::fs::write(&files.cert, &relay_tls.cert_pem)?;
    std::fs::write(&files.key, &relay_tls.key_pem)?;
    let tuning = tuning(a.max_udp_payload)?;
    let sender_tls = ca.issue(&tls::server_name(ServerId(SENDER_ID)))?;
    let receiver_tls = ca.issue(&tls::server_name(ServerId(RECEIVER_ID)))?;
    let setup = Setup {
        certs,
        sender: tls::quic_client_config(&sender_tls, tuning.transport())?,
        receiver: tls::quic_client_config(&receiver_tls, tuning.transport())?,
        tuning,
        tck: clk_tck(),
    };

    let nats = if a.nats {
        let n = nats::start(
            &a.nats_server,
            &ca,
            tmp.path(),
            &tmp.path().join("nats.log"),
        )
        .await?;
        Some(n)
    } else {
        None
    };
    let first_mode = a.relay_modes[0];

    let mut rows = Vec::new();
    for &mode in &a.relay_modes {
        for &size in &a.sizes {
            for run in 1..=a.runs {
                let mut r = one_run(&setup, &a, mode, size, run)
                    .await
                    .with_context(|| format!("relay {} size {size} run {run}", mode.name()))?;
                eprintln!(
                    "quic-floor relay={} size={size} run={run}: {} frames in {:.2}s = {:.0}/s, relay {:.2} µs/frame ({:.2} cores), bench {:.2} µs/frame ({:.2} cores), other processes {:.2} cores",
                    mode.name(),
                    r.frames,
                    r.secs,
                    r.fps(),
                    r.relay_us,
                    r.relay_us * r.fps() / 1e6,
                    r.bench_us,
                    r.bench_us * r.fps() / 1e6,
                    r.others_cores
                );
                if a.result_lines {
                    println!(
                        "floor size={size} frames_per_sec={:.0} relay_us={:.3} bench_us={:.3}",
                        r.fps(),
                        r.relay_us,
                        r.bench_us
                    );
                }
                if let Some(n) = nats.as_ref().filter(|_| mode == first_mode) {
                    let x = nats_run(n, &a, size, setup.tck)
                        .await
                        .with_context(|| format!("NATS size {size} run {run}"))?;
                    eprintln!(
                        "nats size={size} run={run}: {:.0}/s, nats-server {:.2} µs/message, bench {:.2} µs/message",
                        x.fps, x.server_us, x.bench_us
                    );
                    r.nats = Some(x);
                }
                rows.push(r);
            }
        }
    }

    let mut lats = Vec::new();
    for &size in &a.sizes {
        let sat: Vec<f64> = rows
            .iter()
            .filter(|r| r.mode == first_mode && r.size == size)
            .map(Row::fps)
            .collect();
        let sat = sat.iter().sum::<f64>() / sat.len().max(1) as f64;
        let runs = a
            .latency_loads
            .iter()
            .map(|&l| (format!("{l} %"), sat * f64::from(l) / 100.0))
            .chain(a.latency_rates.iter().map(|&r| ("fixed".to_owned(), r)));
        for (load, rate) in runs {
            let floor = floor_latency(&setup, first_mode, size, rate, a.latency_secs)
                .await
                .with_context(|| format!("floor latency size {size} load {load}"))?;
            lats.push(Latency::logged("floor", size, &load, rate, floor));
            if let Some(n) = &nats {
                let x = nats::latency(n, 1, rate, a.latency_secs, size)
                    .await
                    .with_context(|| format!("NATS latency size {size} load {load}"))?;
                lats.push(Latency::logged("NATS-TLS", size, &load, rate, x));
            }
        }
    }
    if let Some(n) = nats {
        n.stop().await;
    }

    println!();
    println!(
        "## quic-floor: sender → relay process → receiver, one stream each way, {} frames per run, window {}, ≤ {} B per write, max UDP payload {}, return path: {}",
        a.frames,
        a.window,
        a.batch_bytes,
        setup.tuning.max_udp_payload,
        if a.ack {
            format!("acks through the relay every {} frames", a.ack_every)
        } else {
            "in process".to_owned()
        }
    );
    println!();
    println!(
        "| relay copy | size | run | frames/s | MB/s (payload) | relay CPU µs/frame | relay cores | bench-process CPU µs/frame | bench cores | other processes, cores | NATS-TLS msgs/s | floor / NATS | nats-server CPU µs/msg | NATS bench-process CPU µs/msg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let (nfps, ratio, nserver, nbench) = match &r.nats {
            Some(x) => (
                format!("{:.0}", x.fps),
                format!("{:.2}", r.fps() / x.fps),
                format!("{:.2}", x.server_us),
                format!("{:.2}", x.bench_us),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} B | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {nfps} | {ratio} | {nserver} | {nbench} |",
            r.mode.name(),
            r.size,
            r.run,
            r.fps(),
            r.fps() * r.size as f64 / 1e6,
            r.relay_us,
            r.relay_us * r.fps() / 1e6,
            r.bench_us,
            r.bench_us * r.fps() / 1e6,
            r.others_cores
        );
    }
    if !lats.is_empty() {
        println!();
        println!(
            "### Latency, µs from the intended send time to arrival at the receiver ({} s per run; relay copy {})",
            a.latency_secs,
            first_mode.name()
        );
        println!();
        println!(
            "| system | size | load | offered msgs/s | p50 | p99 | p999 | max | sender late p99 | missing |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for l in &lats {
            println!(
                "| {} | {} B | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
                l.system,
                l.size,
                l.load,
                l.rate,
                pct(&l.hist, 0.5),
                pct(&l.hist, 0.99),
                pct(&l.hist, 0.999),
                l.hist.max(),
                pct(&l.late, 0.99),
                l.missing
            );
        }
    }
    Ok(())
}
