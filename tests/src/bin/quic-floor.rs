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

use anyhow::{Context, Result, bail, ensure};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand, ValueEnum};
use iim::quic::QuicTuning;
use iim::tls::{self, TlsMaterial, dev::DevCa};
use iim::types::ServerId;
use iim_tests::load::{self, Arrivals};
use iim_tests::nats::{self, Nats};
use iim_tests::procfs::{CpuMeter, clk_tck};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

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
            .block_on(relay(a)),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(bench(cli.bench)),
    }
}

// ---------------------------------------------------------------------------
// Relay (child process)
// ---------------------------------------------------------------------------

struct Side {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn relay(a: RelayArgs) -> Result<()> {
    ensure!(
        a.listen.ip().is_loopback(),
        "relay: loopback only, not {}",
        a.listen
    );
    // Leave when the benchmark goes away (it holds our stdin open).
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let m = TlsMaterial::load(&tls::dev::exchange_files(&a.certs, ServerId(RELAY_ID)))?;
    let tuning = tuning(a.max_udp_payload)?;
    let server = tls::quic_server_config(&m, tuning.transport())?;
    let ep = tuning.endpoint(a.listen, Some(server))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", ep.local_addr()?.port())?;
        out.flush()?;
    }
    loop {
        let (role_a, side_a) = accept_side(&ep).await?;
        let (role_b, side_b) = accept_side(&ep).await?;
        let (sender, receiver) = match (role_a, role_b) {
            (HELLO_SENDER, HELLO_RECEIVER) => (side_a, side_b),
            (HELLO_RECEIVER, HELLO_SENDER) => (side_b, side_a),
            _ => bail!("relay: need one sender and one receiver"),
        };
        let mode = a.mode;
        tokio::spawn(async move {
            if let Err(e) = relay_pair(sender, receiver, mode).await {
                eprintln!("quic-floor relay: {e:#}");
            }
        });
    }
}

/// Accept one connection and its stream; the hello byte says which end it
/// is, and the certificate must match (`server-1.iim` / `server-2.iim`).
async fn accept_side(ep: &quinn::Endpoint) -> Result<(u8, Side)> {
    let incoming = ep.accept().await.context("relay endpoint closed")?;
    let conn = incoming.await.context("relay handshake")?;
    let (send, mut recv) = conn.accept_bi().await.context("relay accept_bi")?;
    let mut hello = [0u8; 1];
    recv.read_exact(&mut hello).await.context("relay hello")?;
    let id = match hello[0] {
        HELLO_SENDER => SENDER_ID,
        HELLO_RECEIVER => RECEIVER_ID,
        b => bail!("relay: unknown hello {b}"),
    };
    tls::verify_peer_name(&conn, &tls::server_name(ServerId(id)))?;
    Ok((hello[0], Side { conn, send, recv }))
}

async fn relay_pair(sender: Side, receiver: Side, mode: Mode) -> Result<()> {
    let Side {
        conn: s_conn,
        send: s_send,
        recv: s_recv,
    } = sender;
    let Side {
        conn: r_conn,
        send: r_send,
        recv: r_recv,
    } = receiver;
    let forward = tokio::spawn(pipe(s_recv, r_send, mode));
    let back = tokio::spawn(pipe(r_recv, s_send, Mode::Chunk));
    let forward = forward.await.context("forward pipe")?;
    let back = back.await.context("back pipe")?;
    forward.context("sender → receiver")?;
    back.context("receiver → sender")?;
    // The benchmark closes both connections once everything arrived.
    s_conn.closed().await;
    r_conn.closed().await;
    Ok(())
}

/// Copy `from` to `to` until `from` finishes, then finish `to`.
async fn pipe(mut from: quinn::RecvStream, mut to: quinn::SendStream, mode: Mode) -> Result<()> {
    let mut bufs = vec![Bytes::new(); 64];
    loop {
        match mode {
            Mode::Chunk => match from.read_chunk(usize::MAX, true).await? {
                Some(c) => to.write_chunk(c.bytes).await?,
                None => break,
            },
            Mode::Chunks => match from.read_chunks(&mut bufs).await? {
                Some(n) => to.write_all_chunks(&mut bufs[..n]).await?,
                None => break,
            },
            Mode::Coalesce => match from.read_chunks(&mut bufs).await? {
                Some(1) => to.write_chunk(std::mem::take(&mut bufs[0])).await?,
                Some(n) => {
                    let len = bufs[..n].iter().map(Bytes::len).sum();
                    let mut buf = BytesMut::with_capacity(len);
                    for c in &mut bufs[..n] {
                        buf.extend_from_slice(c);
                        *c = Bytes::new();
                    }
                    to.write_chunk(buf.freeze()).await?;
                }
                None => break,
            },
        }
    }
    to.finish()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

/// Busy clock ticks of the whole machine (all CPUs: everything but idle
/// and iowait), from /proc/stat.
fn machine_busy_ticks() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
    let line = s.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().context("malformed /proc/stat"))
        .collect::<Result<_>>()?;
    ensure!(f.len() >= 5, "malformed /proc/stat");
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user.
    let total: u64 = f.iter().take(8).sum();
    Ok(total - f[3] - f[4])
}

// ---------------------------------------------------------------------------
// Benchmark (parent process)
// ---------------------------------------------------------------------------

struct Relay {
    child: Child,
    pid: u32,
    addr: SocketAddr,
}

async fn start_relay(certs: &Path, mode: Mode, tuning: &QuicTuning) -> Result<Relay> {
    let exe = std::env::current_exe().context("current exe")?;
    let mut child = Command::new(&exe)
        .args(["relay", "--listen", "127.0.0.1:0", "--mode", &mode.name()])
        .arg(format!("--max-udp-payload={}", tuning.max_udp_payload))
        .arg("--certs")
        .arg(certs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} relay", exe.display()))?;
    let pid = child.id().context("relay pid")?;
    let out = child.stdout.take().context("relay stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(out).lines().next_line(),
    )
    .await
    .context("relay did not print its port")??
    .context("relay exited before printing its port")?;
    let port: u16 = line
        .trim()
        .parse()
        .with_context(|| format!("relay printed {line:?}, not a port"))?;
    Ok(Relay {
        child,
        pid,
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    })
}

/// One end: its own endpoint (as each app server has), a connection to the
/// relay and one bidirectional stream, announced with `hello`.
struct End {
    ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn connect(
    tuning: &QuicTuning,
    cfg: &quinn::ClientConfig,
    relay: SocketAddr,
    hello: u8,
) -> Result<End> {
    let ep = tuning.endpoint(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), None)?;
    let conn = ep
        .connect_with(cfg.clone(), relay, &tls::exchange_name(ServerId(RELAY_ID)))?
        .await
        .context("connect to relay")?;
    let (mut send, recv) = conn.open_bi().await.context("open_bi")?;
    send.write_all(&[hello]).await.context("hello")?;
    Ok(End {
        ep,
        conn,
        send,
        recv,
    })
}

/// Progress shared by the sender, the receiver and the driver.
#[derive(Default)]
struct Counters {
    /// Frames counted by the receiver (cumulative).
    received: AtomicU64,
    /// Frames the sender knows were received (cumulative).
    acked: AtomicU64,
    /// The sender waits here for room in its window.
    room: Notify,
    /// The driver waits here for `received` to reach `target`.
    target: AtomicU64,
    done: Notify,
}

/// Frame counter over a byte stream of `[u32 len][len bytes]` frames;
/// for latency runs it also reads the number each frame carries in its
/// first 8 body bytes.
struct FrameCounter {
    size: usize,
    hdr: [u8; HEADER],
    hdr_len: usize,
    body_left: usize,
    /// The first bytes of the current frame's body (its number).
    num: [u8; 8],
    num_len: usize,
}

impl FrameCounter {
    fn new(size: usize) -> FrameCounter {
        FrameCounter {
            size,
            hdr: [0; HEADER],
            hdr_len: 0,
            body_left: 0,
            num: [0; 8],
            num_len: 0,
        }
    }

    /// Frames completed by `b`; each completed frame's number goes to
    /// `arrivals`, when given (frames of at least 8 bytes).
    fn feed(&mut self, mut b: &[u8], arrivals: Option<&Arrivals>) -> Result<u64> {
        let mut frames = 0;
        while !b.is_empty() {
            if self.body_left > 0 {
                let t = self.body_left.min(b.len());
                if arrivals.is_some() && self.num_len < 8 {
                    let n = (8 - self.num_len).min(t);
                    self.num[self.num_len..self.num_len + n].copy_from_slice(&b[..n]);
                    self.num_len += n;
                }
                self.body_left -= t;
                b = &b[t..];
                if self.body_left == 0 {
                    frames += 1;
                    if let Some(a) = arrivals
                        && self.num_len == 8
                    {
                        a.record(u64::from_le_bytes(self.num));
                    }
                    self.num_len = 0;
                }
            } else {
                let t = (HEADER - self.hdr_len).min(b.len());
                self.hdr[self.hdr_len..self.hdr_len + t].copy_from_slice(&b[..t]);
                self.hdr_len += t;
                b = &b[t..];
                if self.hdr_len == HEADER {
                    self.hdr_len = 0;
                    let len = u32::from_be_bytes(self.hdr) as usize;
                    ensure!(
                        len == self.size,
                        "receiver: frame of {len} bytes, expected {}",
                        self.size
                    );
                    self.body_left = len;
                }
            }
        }
        Ok(frames)
    }
}

/// The sender: for each command (a number of frames), write them in
/// batches of up to `per_batch` frames per `write_chunk`, never more than
/// `window` unacknowledged. Finishes the stream when the commands end.
async fn send_frames(
    mut send: quinn::SendStream,
    mut cmds: mpsc::Receiver<u64>,
    size: usize,
    window: u64,
    per_batch: u64,
    c: Arc<Counters>,
) -> Result<()> {
    let mut frame = BytesMut::with_capacity(HEADER + size);
    frame.put_u32(u32::try_from(size).context("frame size")?);
    frame.put_bytes(b'x', size);
    let mut sent = 0u64;
    while let Some(n) = cmds.recv().await {
        let end = sent + n;
        while sent < end {
            let need = per_batch.min(end - sent);
            let room = loop {
                let room = window.saturating_sub(sent - c.acked.load(Ordering::Acquire));
                if room >= need {
                    break room;
                }
                c.room.notified().await;
            };
            let k = room.min(per_batch).min(end - sent);
            let mut buf = BytesMut::with_capacity(k as usize * frame.len());
            for _ in 0..k {
                buf.extend_from_slice(&frame);
            }
            send.write_chunk(buf.freeze()).await?;
            sent += k;
        }
    }
    send.finish()?;
    Ok(())
}

/// The receiver: count frames; report the count in process (`ack_every`
/// None) or as 8-byte cumulative counts on its own stream. Returns the
/// frames counted when the relay finishes the stream.
async fn receive_frames(
    mut recv: quinn::RecvStream,
    mut send: quinn::SendStream,
    size: usize,
    ack_every: Option<u64>,
    c: Arc<Counters>,
    arrivals: Option<Arc<Arrivals>>,
) -> Result<u64> {
    let mut bufs = vec![Bytes::new(); 32];
    let mut counter = FrameCounter::new(size);
    let mut frames = 0u64;
    let mut reported = 0u64;
    while let Some(n) = recv.read_chunks(&mut bufs).await? {
        for b in &mut bufs[..n] {
            frames += counter.feed(b, arrivals.as_deref())?;
            *b = Bytes::new();
        }
        c.received.store(frames, Ordering::Release);
        match ack_every {
            None => {
                c.acked.store(frames, Ordering::Release);
                c.room.notify_one();
            }
            Some(every) => {
                if frames - reported >= every {
                    send.write_all(&frames.to_be_bytes()).await?;
                    reported = frames;
                }
            }
        }
        if frames >= c.target.load(Ordering::Acquire) {
            c.done.notify_one();
        }
    }
    send.finish()?;
    Ok(frames)
}

/// The sender's side of the return path: 8-byte cumulative counts (with
/// `--ack`; without, nothing arrives until the stream finishes).
async fn read_acks(mut recv: quinn::RecvStream, ack: bool, c: Arc<Counters>) -> Result<()> {
    let mut pending = BytesMut::new();
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        ensure!(ack, "sender: unexpected bytes on the return path");
        pending.extend_from_slice(&chunk.bytes);
        let whole = pending.len() / 8 * 8;
        if whole > 0 {
            let last = pending.split_to(whole);
            let count = u64::from_be_bytes(last[whole - 8..].try_into()?);
            c.acked.fetch_max(count, Ordering::AcqRel);
            c.room.notify_one();
        }
    }
    Ok(())
}

/// Wait until the receiver has counted `target` frames. The sender and
/// receiver tasks end only after the last phase, so either ending earlier
/// is a failure, reported with its error.
async fn wait_received(
    c: &Counters,
    target: u64,
    send_task: &mut JoinHandle<Result<()>>,
    recv_task: &mut JoinHandle<Result<u64>>,
) -> Result<()> {
    c.target.store(target, Ordering::Release);
    let deadline = tokio::time::sleep(PHASE_TIMEOUT);
    tokio::pin!(deadline);
    while c.received.load(Ordering::Acquire) < target {
        tokio::select! {
            _ = c.done.notified() => {}
            r = &mut *send_task => {
                r.context("sender task")??;
                bail!("sender stopped early");
            }
            r = &mut *recv_task => {
                let got = r.context("receiver task")??;
                bail!("receiver stopped early, after {got} of {target} frames");
            }
            _ = &mut deadline => bail!(
                "timed out: {} of {target} frames received",
                c.received.load(Ordering::Acquire)
            ),
        }
    }
    Ok(())
}

struct Setup {
    certs: PathBuf,
    sender: quinn::ClientConfig,
    receiver: quinn::ClientConfig,
    tuning: QuicTuning,
    tck: f64,
}

struct Row {
    mode: Mode,
    size: usize,
    run: usize,
    frames: u64,
    secs: f64,
    relay_us: f64,
    bench_us: f64,
    /// Cores busy with anything else on the machine during the run.
    others_cores: f64,
    /// NATS in the same topology right after this run (`--nats`).
    nats: Option<NatsRow>,
}

impl Row {
    fn fps(&self) -> f64 {
        self.frames as f64 / self.secs
    }
}

async fn one_run(s: &Setup, a: &BenchArgs, mode: Mode, size: usize, run: usize) -> Result<Row> {
    let mut relay = start_relay(&s.certs, mode, &s.tuning).await?;
    let sender = connect(&s.tuning, &s.sender, relay.addr, HELLO_SENDER).await?;
    let receiver = connect(&s.tuning, &s.receiver, relay.addr, HELLO_RECEIVER).await?;
    let c = Arc::new(Counters::default());
    let per_batch = ((a.batch_bytes / (HEADER + size)).max(1) as u64).min(a.window / 2);
    let (cmd_tx, cmd_rx) = mpsc::channel(1);
    let mut send_task = tokio::spawn(send_frames(
        sender.send,
        cmd_rx,
        size,
        a.window,
        per_batch,
        c.clone(),
    ));
    let ack_task = tokio::spawn(read_acks(sender.recv, a.ack, c.clone()));
    let mut recv_task = tokio::spawn(receive_frames(
        receiver.recv,
        receiver.send,
        size,
        a.ack.then_some(a.ack_every),
        c.clone(),
        None,
    ));

    let warmup = a.warmup.unwrap_or(a.frames / 10);
    if warmup > 0 {
        cmd_tx.send(warmup).await.context("sender gone")?;
        wait_received(&c, warmup, &mut send_task, &mut recv_task)
            .await
            .context("warm-up")?;
    }
    let relay_cpu = CpuMeter::start(relay.pid, s.tck);
    let own_cpu = CpuMeter::start(std::process::id(), s.tck);
    let machine = machine_busy_ticks()?;
    let start = Instant::now();
    cmd_tx.send(a.frames).await.context("sender gone")?;
    wait_received(&c, warmup + a.frames, &mut send_task, &mut recv_task).await?;
    let secs = start.elapsed().as_secs_f64();
    let relay_us = relay_cpu.micros();
    let bench_us = own_cpu.micros();
    let machine_us = machine_busy_ticks()?.saturating_sub(machine) as f64 * 1e6 / s.tck;
    let others_cores = (machine_us - relay_us - bench_us).max(0.0) / secs / 1e6;

    // Tear down in order: finish the sender's stream, let the relay pass
    // the end on, then close.
    drop(cmd_tx);
    send_task.await.context("sender task")??;
    let got = recv_task.await.context("receiver task")??;
    ack_task.await.context("ack task")??;
    if a.stats {
        for (name, end) in [("sender", &sender.conn), ("receiver", &receiver.conn)] {
            let st = end.stats();
            eprintln!(
                "  {name}: rtt {:?}, cwnd {} B, mtu {} B, sent {} / received {} UDP datagrams ({} / {} B), lost {} packets, congestion events {}",
                st.path.rtt,
                st.path.cwnd,
                st.path.current_mtu,
                st.udp_tx.datagrams,
                st.udp_rx.datagrams,
                st.udp_tx.bytes,
                st.udp_rx.bytes,
                st.path.lost_packets,
                st.path.congestion_events
            );
        }
    }
    ensure!(
        got == warmup + a.frames,
        "receiver counted {got} frames, expected {}",
        warmup + a.frames
    );
    for end in [&sender.conn, &receiver.conn] {
        end.close(0u32.into(), b"done");
    }
    for ep in [&sender.ep, &receiver.ep] {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    let _ = relay.child.start_kill();
    let _ = relay.child.wait().await;
    Ok(Row {
        mode,
        size,
        run,
        frames: a.frames,
        secs,
        relay_us: relay_us / a.frames as f64,
        bench_us: bench_us / a.frames as f64,
        others_cores,
        nats: None,
    })
}

/// A fixed-rate (open-loop) run: latency from each frame's intended send
/// time to its arrival at the receiver.
struct Latency {
    system: &'static str,
    size: usize,
    /// "25 %" of the floor's saturation, or "fixed" (`--latency-rates`).
    load: String,
    rate: f64,
    hist: hdrhistogram::Histogram<u64>,
    /// How late the sending thread itself was, per frame.
    late: hdrhistogram::Histogram<u64>,
    missing: u64,
}

/// (latency, sender lateness, frames or deliveries missing) of one run.
type LatencyRun = (
    hdrhistogram::Histogram<u64>,
    hdrhistogram::Histogram<u64>,
    u64,
);

impl Latency {
    /// The run's row, its headline figures printed as it finishes.
    fn logged(
        system: &'static str,
        size: usize,
        load: &str,
        rate: f64,
        run: LatencyRun,
    ) -> Latency {
        let (hist, late, missing) = run;
        eprintln!(
            "{system} latency size={size} load={load} ({rate:.0}/s): p50 {} p99 {} µs, sender late p99 {} µs, missing {missing}",
            pct(&hist, 0.5),
            pct(&hist, 0.99),
            pct(&late, 0.99)
        );
        Latency {
            system,
            size,
            load: load.to_owned(),
            rate,
            hist,
            late,
            missing,
        }
    }
}

/// The floor at `rate` frames/s for `secs`: a plain thread paces the
/// frames (`load::pace`) and writes every frame already due in one
/// `write_chunk`, as iim's writer writes what is queued; frame i carries i.
async fn floor_latency(
    s: &Setup,
    mode: Mode,
    size: usize,
    rate: f64,
    secs: f64,
) -> Result<(
    hdrhistogram::Histogram<u64>,
    hdrhistogram::Histogram<u64>,
    u64,
)> {
    ensure!(size >= 8, "latency runs need frames of at least 8 bytes");
    let count = (rate * secs).max(1.0) as u64;
    let mut relay = start_relay(&s.certs, mode, &s.tuning).await?;
    let sender = connect(&s.tuning, &s.sender, relay.addr, HELLO_SENDER).await?;
    let receiver = connect(&s.tuning, &s.receiver, relay.addr, HELLO_RECEIVER).await?;
    let c = Arc::new(Counters::default());
    let arrivals = Arc::new(Arrivals::default());
    let recv_task = tokio::spawn(receive_frames(
        receiver.recv,
        receiver.send,
        size,
        None,
        c.clone(),
        Some(arrivals.clone()),
    ));
    let ack_task = tokio::spawn(read_acks(sender.recv, false, c.clone()));
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now();
    arrivals.begin(start, rate)?;
    let mut send = sender.send;
    let pacer = std::thread::spawn(move || -> Result<hdrhistogram::Histogram<u64>> {
        let late = load::pace(start, rate, count, |range| {
            let mut buf = BytesMut::with_capacity(range.clone().count() * (HEADER + size));
            for j in range {
                buf.put_u32(size as u32);
                buf.put_u64_le(j);
                buf.put_bytes(b'x', size - 8);
            }
            handle.block_on(send.write_chunk(buf.freeze()))?;
            Ok(())
        })?;
        send.finish()?;
        Ok(late)
    });
    let late = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("floor sender panicked"))??;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.received.load(Ordering::Acquire) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let missing = count.saturating_sub(c.received.load(Ordering::Acquire));
    let hist = arrivals.end().context("arrival histogram")?;
    // The sender finished its stream: the relay passes the end on.
    let got = tokio::time::timeout(Duration::from_secs(10), recv_task)
        .await
        .context("receiver did not finish")???;
    ensure!(
        got == count,
        "receiver counted {got} frames, expected {count}"
    );
    ack_task.await.context("ack task")??;
    for end in [&sender.conn, &receiver.conn] {
        end.close(0u32.into(), b"done");
    }
    for ep in [&sender.ep, &receiver.ep] {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    let _ = relay.child.start_kill();
    let _ = relay.child.wait().await;
    Ok((hist, late, missing))
}

/// NATS-with-TLS, k = 1, the same frames and window: (frames/s,
/// nats-server CPU µs per message, this process's CPU µs per message).
async fn nats_run(n: &Nats, a: &BenchArgs, size: usize, tck: f64) -> Result<NatsRow> {
    let warmup = a.warmup.unwrap_or(a.frames / 10);
    let window = usize::try_from(a.window)?;
    if warmup > 0 {
        nats::saturate(n, 1, usize::try_from(warmup)?, size, window, tck).await?;
    }
    let own = CpuMeter::start(std::process::id(), tck);
    let (got, secs, server_us) =
        nats::saturate(n, 1, usize::try_from(a.frames)?, size, window, tck).await?;
    let bench_us = own.micros();
    ensure!(
        got == a.frames,
        "NATS: {got} of {} messages received",
        a.frames
    );
    Ok(NatsRow {
        fps: got as f64 / secs,
        server_us: server_us / got as f64,
        bench_us: bench_us / got as f64,
    })
}

struct NatsRow {
    fps: f64,
    server_us: f64,
    bench_us: f64,
}

fn pct(h: &hdrhistogram::Histogram<u64>, q: f64) -> u64 {
    h.value_at_quantile(q)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u64, size: usize) -> Vec<u8> {
        let mut f = (size as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&i.to_le_bytes());
        f.resize(HEADER + size, b'x');
        f
    }

    /// Frames split at every possible point still count once each, and
    /// each one's number reaches the arrivals (a latency run's histogram).
    #[test]
    fn counter_reads_numbers_across_chunk_boundaries() {
        let size = 20;
        let stream: Vec<u8> = (0..5).flat_map(|i| frame(i, size)).collect();
        for cut in 1..stream.len() {
            let arrivals = Arrivals::default();
            // One frame a second from 10 s ago: frame i is 10 - i s late.
            arrivals
                .begin(Instant::now() - Duration::from_secs(10), 1.0)
                .expect("histogram");
            let mut c = FrameCounter::new(size);
            let mut frames = 0;
            for part in stream.chunks(cut) {
                frames += c.feed(part, Some(&arrivals)).expect("valid frames");
            }
            assert_eq!(frames, 5, "cut every {cut} bytes");
            let h = arrivals.end().expect("run begun");
            assert_eq!(h.len(), 5, "cut every {cut} bytes");
            let secs = |v: u64| (v as f64 / 1e6).round() as u64;
            assert_eq!((secs(h.min()), secs(h.max())), (6, 10), "cut every {cut}");
        }
    }

    #[test]
    fn counter_refuses_a_frame_of_the_wrong_size() {
        let mut c = FrameCounter::new(20);
        assert!(c.feed(&frame(0, 21), None).is_err());
    }
}
