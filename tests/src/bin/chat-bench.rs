//! `chat-bench`: the chat path end to end, with MariaDB, for sizing a
//! deployment.
//!
//! Topology (all on loopback): a real `iim-exchange` process and two real
//! `iim-appserver` processes, A (id 1) and B (id 2) — the release binaries
//! next to this one — on a fresh MariaDB database (`IIM_TEST_MYSQL_URL`,
//! default `mysql://iim:iim@127.0.0.1:3306`), created for the run and dropped
//! at its end. Certificates come from a CA generated at run time. This
//! process hosts every WebSocket client (docs/client-protocol.md: `auth`,
//! `send` → `ack`, `msg` pushes).
//!
//! Scenarios:
//! - **1:1.** `--pairs` sender/receiver pairs; senders on A, receivers on B,
//!   so every message is stored (one transaction, two inbox rows), then
//!   pushed by A's push task through the exchange to B.
//! - **Group.** One group of `--group-size` members (write fan-out: below
//!   the large-group threshold), half on A and half on B;
//!   `--group-senders` of them (alternately on A and on B) send to it. Each
//!   message is pushed to every member but the sending connection.
//!
//! Each scenario runs twice:
//! - **Saturation** (closed loop): every sender keeps at most `--window`
//!   (`--group-window`) messages in flight, where a message stays in flight
//!   until its ack AND its LAST expected push arrived, so nothing queues
//!   without bound anywhere (the server's push queue and connection queues
//!   never fill). After `--warmup-secs`, messages completed and pushes
//!   received are counted for `--secs`.
//! - **Latency** (open loop): `--load` % of the saturation rate just
//!   measured, message k of the run due at `t0 + k / rate` (round robin over
//!   the senders; at most 512 in flight per sender); latency from that
//!   INTENDED send time (carried in the message body) to the sender's ack
//!   and to the pushes — the last recipient's, the median member's, and the
//!   last on each server for a group — in HDR histograms. A sender that
//!   falls behind sends what is due at once: its lateness is charged to the
//!   system (corrected for coordinated omission).
//!
//! A message whose pushes have not all arrived 10 s after it was sent is
//! counted lost (pushes are best effort: a real client would sync).
//!
//! Server-side CPU (utime + stime from /proc of the exchange, A, B,
//! mariadbd if local, and this process), MariaDB's global status (commits,
//! fsyncs, row lock waits) and the app servers' chat counters are read
//! around each measured window.

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use iim::store::{Store, User};
use iim::types::{ServerId, UserId};
use iim_tests::proc::{free_port, spawn_logged};
use iim_tests::procfs::{clk_tck, cpu_ticks};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const EXCHANGE_ID: u32 = 100;
const SERVER_A: u32 = 1;
const SERVER_B: u32 = 2;
const BUILD: &str = "cargo build --release -p iim-exchange -p iim-appserver -p iim-tests --bins";
/// A message in flight this long without all its pushes is counted lost.
const LOST_AFTER: Duration = Duration::from_secs(10);
/// Idle connections send an application ping this often (the server cuts
/// connections silent for 60 s).
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Most messages in flight per sender during a latency run.
const PACED_CAP: usize = 512;
/// Connections opened at once during setup.
const CONNECT_PARALLEL: usize = 16;
/// Fixed-width key in every body: flow.index.intended-µs.
const KEY_PREFIX: &str = "{\"k\":\"";
const KEY_LEN: usize = 4 + 1 + 10 + 1 + 13;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "The chat path end to end (WebSocket clients → app server → MariaDB → push → exchange → app server → clients) on real processes.",
    after_help = "Needs the release binaries first: cargo build --release -p iim-exchange -p iim-appserver -p iim-tests --bins\n\
                  and a MariaDB server (IIM_TEST_MYSQL_URL, default mysql://iim:iim@127.0.0.1:3306; scripts/mariadb-test-setup makes one)."
)]
struct Args {
    /// Short run (~20 s): 1 s warm-up, 3 s per measured window.
    #[arg(long)]
    quick: bool,
    /// 1:1 sender/receiver pairs (senders on A, receivers on B).
    #[arg(long, default_value_t = 64)]
    pairs: usize,
    /// Messages in flight (sent, last push not yet received) per 1:1 sender
    /// at saturation.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Members of the group (half on A, half on B).
    #[arg(long, default_value_t = 100)]
    group_size: usize,
    /// Members that send to the group (alternately on A and B).
    #[arg(long, default_value_t = 4)]
    group_senders: usize,
    /// Messages in flight per group sender at saturation.
    #[arg(long, default_value_t = 4)]
    group_window: usize,
    /// Message body size in bytes (the JSON `body` value, stored verbatim).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Offered load of the latency runs, in % of the measured saturation rate.
    #[arg(long, default_value_t = 50.0)]
    load: f64,
    /// Warm-up before each saturation window, seconds.
    #[arg(long, default_value_t = 3.0)]
    warmup_secs: f64,
    /// Length of each saturation window, seconds.
    #[arg(long, default_value_t = 15.0)]
    secs: f64,
    /// Length of each latency run, seconds (its first 10 % is not recorded).
    #[arg(long, default_value_t = 15.0)]
    latency_secs: f64,
    /// Skip the 1:1 scenario.
    #[arg(long)]
    no_one_to_one: bool,
    /// Skip the group scenario.
    #[arg(long)]
    no_group: bool,
    /// MariaDB server URL, without a database.
    #[arg(
        long,
        env = "IIM_TEST_MYSQL_URL",
        default_value = "mysql://iim:iim@127.0.0.1:3306"
    )]
    mysql_url: String,
    /// Directory holding iim-exchange and iim-appserver (default: next to
    /// this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// Time, /proc
// ---------------------------------------------------------------------------

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the bench's epoch: the clock of intended send times.
fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn at_us(us: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(*EPOCH.get_or_init(Instant::now) + Duration::from_micros(us))
}

/// The local MariaDB server process, if there is one.
fn mariadbd_pid() -> Option<u32> {
    let dir = std::fs::read_dir("/proc").ok()?;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "mariadbd" | "mysqld") {
            return Some(pid);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

fn find_bins(args: &Args) -> Result<PathBuf> {
    let dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("directory of this executable")?
            .to_path_buf(),
    };
    for b in ["iim-exchange", "iim-appserver"] {
        if !dir.join(b).is_file() {
            bail!(
                "{} is missing: build the release binaries first with `{BUILD}`",
                dir.join(b).display()
            );
        }
    }
    if dir.file_name().and_then(|n| n.to_str()) != Some("release") {
        eprintln!(
            "chat-bench: warning: using binaries in {} (not a release directory): figures of debug builds are meaningless",
            dir.display()
        );
    }
    Ok(dir)
}

struct Daemon {
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Daemon {
    fn spawn(bin: &Path, args: &[String], log: PathBuf, name: &str) -> Result<Daemon> {
        let (child, pid) = spawn_logged(
            Command::new(bin).args(args).env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
            &log,
        )?;
        Ok(Daemon {
            name: name.to_string(),
            child,
            pid,
            log,
        })
    }

    /// An error (with the end of its log) if the process has exited.
    fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} exited unexpectedly ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }
}

#[derive(Default)]
struct Daemons(Vec<Daemon>);

impl Daemons {
    fn check(&mut self) -> Result<()> {
        self.0.iter_mut().try_for_each(Daemon::check)
    }

    /// SIGKILL every child and reap it.
    async fn kill_all(&mut self) {
        for d in &mut self.0 {
            let _ = d.child.start_kill();
        }
        for d in &mut self.0 {
            let _ = tokio::time::timeout(Duration::from_secs(10), d.child.wait()).await;
        }
        self.0.clear();
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn wait_port(addr: SocketAddr, what: &str, daemons: &mut Daemons) -> Result<()> {
    iim_tests::proc::wait_listening(addr, what, Duration::from_secs(30), || daemons.check()).await
}

// ---------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------

/// A database created for this run, dropped by [`BenchDb::drop_db`].
struct BenchDb {
    server: String,
    name: String,
}

impl BenchDb {
    async fn create(server: &str) -> Result<BenchDb> {
        use sqlx::Connection;
        let server = server.trim_end_matches('/').to_string();
        if !server.starts_with("mysql://") {
            bail!("--mysql-url / IIM_TEST_MYSQL_URL must be a mysql:// URL, got {server:?}");
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!("chat_bench_{}_{stamp}", std::process::id());
        let mut c = sqlx::MySqlConnection::connect(&server)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to MariaDB at {} (start it / create the account with `scripts/mariadb-test-setup`)",
                    redact(&server)
                )
            })?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        let _ = c.close().await;
        Ok(BenchDb { server, name })
    }

    fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    async fn drop_db(&self) -> Result<()> {
        use sqlx::Connection;
        let mut c = sqlx::MySqlConnection::connect(&self.server).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {}",
            self.name
        )))
        .execute(&mut c)
        .await?;
        let _ = c.close().await;
        Ok(())
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Global status counters of the MariaDB server.
#[derive(Clone, Copy, Default)]
struct DbStatus {
    commits: u64,
    fsyncs: u64,
    lock_waits: u64,
    lock_time_ms: u64,
}

async fn db_status(c: &mut sqlx::MySqlConnection) -> DbStatus {
    use sqlx::Row;
    let rows = sqlx::query(
        "SHOW GLOBAL STATUS WHERE Variable_name IN \
         ('Com_commit', 'Innodb_data_fsyncs', 'Innodb_row_lock_waits', 'Innodb_row_lock_time')",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap_or_default();
    let mut s = DbStatus::default();
    for r in rows {
        let name: String = r.try_get(0).unwrap_or_default();
        let value: u64 = r
            .try_get::<String, _>(1)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match name.as_str() {
            "Com_commit" => s.commits = value,
            "Innodb_data_fsyncs" => s.fsyncs = value,
            "Innodb_row_lock_waits" => s.lock_waits = value,
            "Innodb_row_lock_time" => s.lock_time_ms = value,
            _ => {}
        }
    }
    s
}

async fn db_version(c: &mut sqlx::MySqlConnection) -> String {
    use sqlx::Row;
    sqlx::query("SELECT VERSION()")
        .fetch_one(&mut *c)
        .await
        .ok()
        .and_then(|r| r.try_get::<String, _>(0).ok())
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------
// App server counters (/metrics)
// ---------------------------------------------------------------------------

const COUNTERS: [&str; 4] = [
    "iim_chat_messages_stored_total",
    "iim_chat_pushes_total",
    "iim_chat_pushes_dropped_total",
    "iim_appserver_connection_overflow_total",
];

/// The chat counters of one app server (zeros if unreachable).
async fn server_counters(http: SocketAddr) -> [u64; 4] {
    let mut out = [0u64; 4];
    let Ok(Ok((200, body))) = tokio::time::timeout(
        Duration::from_secs(5),
        iim_tests::proc::http(http, "GET", "/metrics", None),
    )
    .await
    else {
        return out;
    };
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let mut it = line.split_whitespace();
        let (Some(name), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        if let Some(i) = COUNTERS.iter().position(|c| *c == name) {
            out[i] = v.parse::<f64>().map(|v| v as u64).unwrap_or(0);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Flows: one sending connection's messages in flight
// ---------------------------------------------------------------------------

struct Entry {
    intended_us: u64,
    sent: Instant,
    /// Pushes received, by the receiving connection's server (A, B).
    got: [u32; 2],
    acked: bool,
    record: bool,
}

#[derive(Default)]
struct FlowState {
    next_i: u64,
    inflight: BTreeMap<u64, Entry>,
}

/// One sending connection and its messages in flight.
struct Flow {
    id: usize,
    ope: u8,
    to: u64,
    /// The sender's server: 0 = A, 1 = B.
    server: usize,
    /// Pushes expected per message on A and on B.
    expect: [u32; 2],
    st: Mutex<FlowState>,
    progress: Notify,
}

impl Flow {
    fn new(id: usize, ope: u8, to: u64, server: usize, expect: [u32; 2]) -> Arc<Flow> {
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

    fn recipients(&self) -> u32 {
        self.expect[0] + self.expect[1]
    }
}

/// Latencies (µs) from the intended send time.
struct Hists {
    /// To the sender's ack (stored).
    ack: Histogram<u64>,
    /// To the last recipient's push.
    last: Histogram<u64>,
    /// To the push of the median recipient.
    median: Histogram<u64>,
    /// To the last push on the sender's own server / on the other one.
    last_same: Histogram<u64>,
    last_other: Histogram<u64>,
}

impl Hists {
    fn new() -> Result<Hists> {
        let h = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
        Ok(Hists {
            ack: h()?,
            last: h()?,
            median: h()?,
            last_same: h()?,
            last_other: h()?,
        })
    }

    fn reset(&mut self) {
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

    fn snapshot(&self) -> Hists {
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
struct Shared {
    flows: Vec<Arc<Flow>>,
    pad: String,
    sent: AtomicU64,
    acks: AtomicU64,
    pushes: AtomicU64,
    completed: AtomicU64,
    lost: AtomicU64,
    stray: AtomicU64,
    refused: AtomicU64,
    closed: AtomicU64,
    closing: AtomicBool,
    errors: Mutex<BTreeMap<String, u64>>,
    hists: Mutex<Hists>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn new(flows: Vec<Arc<Flow>>, size: usize) -> Result<Shared> {
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

    fn inflight(&self) -> usize {
        self.flows.iter().map(|f| lock(&f.st).inflight.len()).sum()
    }

    fn counters(&self) -> Counters {
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
    fn on_push(&self, f: usize, i: u64, t: u64, side: usize) {
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
    fn on_ack(&self, f: usize, i: u64) {
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
    fn on_refused(&self, f: usize, i: u64) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(flow) = self.flows.get(f) {
            lock(&flow.st).inflight.remove(&i);
            flow.progress.notify_one();
        }
    }

    /// Give up on messages of `flow` in flight for longer than `after`.
    fn expire(&self, flow: &Flow, after: Duration) {
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
struct Counters {
    sent: u64,
    acks: u64,
    pushes: u64,
    completed: u64,
    lost: u64,
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

// ---------------------------------------------------------------------------
// WebSocket clients
// ---------------------------------------------------------------------------

type Wss = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connect, authenticate, wait for the welcome.
async fn connect(addr: SocketAddr, user: u64) -> Result<Wss> {
    let url = format!("ws://{addr}/ws");
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("WebSocket connect to {addr}"))?;
    let auth =
        serde_json::json!({"op": "auth", "token": iim_tests::token(user), "device": "bench"});
    ws.send(Ws::Text(auth.to_string().into())).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let f = tokio::time::timeout_at(deadline, ws.next())
            .await
            .with_context(|| format!("user {user}: no welcome within 20 s"))?;
        match f {
            Some(Ok(Ws::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                match v["op"].as_str() {
                    Some("welcome") => return Ok(ws),
                    Some("error") => bail!("user {user}: refused at auth: {v}"),
                    _ => {}
                }
            }
            Some(Ok(Ws::Close(c))) => bail!("user {user}: closed at auth: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context(format!("user {user}: auth")),
            None => bail!("user {user}: connection ended at auth"),
        }
    }
}

/// Open connections for (server address, user) pairs, a few at a time.
async fn connect_all(list: &[(SocketAddr, u64)]) -> Result<Vec<Wss>> {
    let mut out: Vec<Option<Wss>> = (0..list.len()).map(|_| None).collect();
    let mut results = futures_util::stream::iter(list.iter().copied().enumerate())
        .map(|(i, (a, u))| async move { (i, connect(a, u).await) })
        .buffer_unordered(CONNECT_PARALLEL);
    while let Some((i, r)) = results.next().await {
        out[i] = Some(r?);
    }
    drop(results);
    out.into_iter()
        .map(|w| w.context("connection missing"))
        .collect()
}

/// The key `flow.i.t` of one of our bodies in a frame, if it carries one.
fn parse_key(text: &str) -> Option<(usize, u64, u64)> {
    let at = text.find(KEY_PREFIX)? + KEY_PREFIX.len();
    let key = text.get(at..at + KEY_LEN)?;
    let mut it = key.split('.');
    let f = it.next()?.parse().ok()?;
    let i = it.next()?.parse().ok()?;
    let t = it.next()?.parse().ok()?;
    Some((f, i, t))
}

/// The message index in the `req` of one of our acks.
fn ack_index(text: &str) -> Option<u64> {
    const REQ: &str = "\"req\":\"b";
    let at = text.find(REQ)? + REQ.len();
    let rest = text.get(at..)?;
    rest[..rest.find('"')?].parse().ok()
}

/// Everything a connection on server `side` (0 = A, 1 = B) receives:
/// pushes (ours carry a key), acks and errors for its own sends (flow
/// `own`), and whatever else the server says.
async fn read_loop(mut rx: SplitStream<Wss>, side: usize, own: Option<usize>, shared: Arc<Shared>) {
    while let Some(m) = rx.next().await {
        let text = match m {
            Ok(Ws::Text(t)) => t,
            Ok(Ws::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let text = text.as_str();
        if let Some((f, i, t)) = parse_key(text) {
            shared.on_push(f, i, t, side);
            continue;
        }
        if text.starts_with("{\"op\":\"ack\"") {
            match (own, ack_index(text)) {
                (Some(f), Some(i)) => shared.on_ack(f, i),
                _ => {
                    shared.acks.fetch_add(1, Ordering::Relaxed);
                }
            }
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        if v["op"] == "error" {
            let code = v["code"].as_str().unwrap_or("?").to_string();
            *lock(&shared.errors).entry(code).or_default() += 1;
            let i = v["req"]
                .as_str()
                .and_then(|r| r.strip_prefix('b'))
                .and_then(|r| r.parse().ok());
            if let (Some(f), Some(i)) = (own, i) {
                shared.on_refused(f, i);
            }
        }
    }
    if !shared.closing.load(Ordering::Relaxed) {
        shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// What senders do now.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Idle,
    /// Keep `window` messages in flight; messages sent within
    /// `[record_from, record_until)` µs are recorded in the histograms.
    Saturate {
        window: usize,
        record_from: u64,
        record_until: u64,
    },
    /// Open loop: `rate` messages/s over all flows, message k due at
    /// `t0 + k / rate`, until `end`; recorded from `record_from`.
    Paced {
        generation: u64,
        rate: f64,
        t0: u64,
        end: u64,
        record_from: u64,
    },
    Done,
}

type Sink = SplitSink<Wss, Ws>;

fn frame(shared: &Shared, flow: &Flow, i: u64, t: u64) -> Ws {
    Ws::Text(
        format!(
            "{{\"op\":\"send\",\"req\":\"b{i}\",\"ope\":{},\"to\":{},\"type\":\"text\",\"body\":{KEY_PREFIX}{:04}.{i:010}.{t:013}\",\"p\":\"{}\"}}}}",
            flow.ope, flow.to, flow.id, shared.pad
        )
        .into(),
    )
}

/// Register message `i` of `flow` as in flight and queue its frame.
async fn send_one(
    tx: &mut Sink,
    shared: &Shared,
    flow: &Flow,
    intended: u64,
    record: bool,
) -> Result<()> {
    let i = {
        let mut st = lock(&flow.st);
        let i = st.next_i;
        st.next_i += 1;
        st.inflight.insert(
            i,
            Entry {
                intended_us: intended,
                sent: Instant::now(),
                got: [0, 0],
                acked: false,
                record,
            },
        );
        i
    };
    shared.sent.fetch_add(1, Ordering::Relaxed);
    tx.feed(frame(shared, flow, i, intended)).await?;
    Ok(())
}

/// The writing side of one connection: sends for its flow as the phase
/// says, or only keeps the connection alive.
async fn drive(
    mut tx: Sink,
    flow: Option<Arc<Flow>>,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) -> Result<()> {
    let nflows = shared.flows.len().max(1) as u64;
    let mut last_write = tokio::time::Instant::now();
    // (generation, messages of this flow scheduled so far) of a paced run.
    let mut paced: (u64, u64) = (u64::MAX, 0);
    loop {
        let now_phase = *phase.borrow_and_update();
        let keepalive = last_write + KEEPALIVE;
        let flow = match (&flow, now_phase) {
            (_, Phase::Done) => {
                let _ = tx.close().await;
                return Ok(());
            }
            (Some(f), Phase::Saturate { .. } | Phase::Paced { .. }) => f,
            _ => {
                tokio::select! {
                    r = phase.changed() => if r.is_err() { return Ok(()) },
                    _ = tokio::time::sleep_until(keepalive) => {
                        tx.send(Ws::Text("{\"op\":\"ping\"}".into())).await?;
                        last_write = tokio::time::Instant::now();
                    }
                }
                continue;
            }
        };
        match now_phase {
            Phase::Saturate {
                window,
                record_from,
                record_until,
            } => {
                let room = window.saturating_sub(lock(&flow.st).inflight.len());
                if room == 0 {
                    tokio::select! {
                        r = phase.changed() => if r.is_err() { return Ok(()) },
                        _ = flow.progress.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {
                            shared.expire(flow, LOST_AFTER);
                        }
                    }
                    continue;
                }
                for _ in 0..room {
                    let t = now_us();
                    let record = (record_from..record_until).contains(&t);
                    send_one(&mut tx, &shared, flow, t, record).await?;
                }
                tx.flush().await?;
                last_write = tokio::time::Instant::now();
            }
            Phase::Paced {
                generation,
                rate,
                t0,
                end,
                record_from,
            } => {
                if paced.0 != generation {
                    paced = (generation, 0);
                }
                let due = |j: u64| t0 + ((j * nflows + flow.id as u64) as f64 * 1e6 / rate) as u64;
                let next = due(paced.1);
                if next >= end {
                    // This flow's part of the run is over.
                    tokio::select! {
                        r = phase.changed() => if r.is_err() { return Ok(()) },
                        _ = flow.progress.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {
                            shared.expire(flow, LOST_AFTER);
                        }
                    }
                    continue;
                }
                if next > now_us() {
                    tokio::select! {
                        r = phase.changed() => if r.is_err() { return Ok(()) },
                        _ = tokio::time::sleep_until(at_us(next)) => {}
                    }
                    continue;
                }
                if lock(&flow.st).inflight.len() >= PACED_CAP {
                    tokio::select! {
                        r = phase.changed() => if r.is_err() { return Ok(()) },
                        _ = flow.progress.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {
                            shared.expire(flow, LOST_AFTER);
                        }
                    }
                    continue;
                }
                // Everything due by now, within the cap, in one write.
                let mut j = paced.1;
                let now = now_us();
                while due(j) <= now && due(j) < end && lock(&flow.st).inflight.len() < PACED_CAP {
                    let t = due(j);
                    send_one(&mut tx, &shared, flow, t, t >= record_from).await?;
                    j += 1;
                }
                paced.1 = j;
                tx.flush().await?;
                last_write = tokio::time::Instant::now();
            }
            Phase::Idle | Phase::Done => {}
        }
    }
}

/// The connections of one scenario and their tasks.
struct Scenario {
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    readers: Vec<JoinHandle<()>>,
    drivers: Vec<JoinHandle<Result<()>>>,
}

impl Scenario {
    /// `conns`: each connection with its server (0 = A, 1 = B) and the flow
    /// it sends for, if any.
    fn start(conns: Vec<(Wss, usize, Option<usize>)>, shared: Arc<Shared>) -> Scenario {
        let (phase, rx) = watch::channel(Phase::Idle);
        let mut readers = Vec::new();
        let mut drivers = Vec::new();
        for (ws, side, own) in conns {
            let (tx, stream) = ws.split();
            readers.push(tokio::spawn(read_loop(stream, side, own, shared.clone())));
            let flow = own.and_then(|f| shared.flows.get(f).cloned());
            drivers.push(tokio::spawn(drive(tx, flow, shared.clone(), rx.clone())));
        }
        Scenario {
            shared,
            phase,
            readers,
            drivers,
        }
    }

    fn set(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    /// Fail early if a writer died or connections were closed by a server.
    fn check(&self) -> Result<()> {
        for d in &self.drivers {
            if d.is_finished() {
                bail!("a sending connection failed (write error)");
            }
        }
        let closed = self.shared.closed.load(Ordering::Relaxed);
        if closed > 0 {
            bail!("{closed} client connection(s) were closed by the server");
        }
        Ok(())
    }

    /// Wait until nothing is in flight (or `max` passes; what is left is
    /// then counted lost).
    async fn drain(&self, max: Duration) {
        let deadline = Instant::now() + max;
        while self.shared.inflight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for f in &self.shared.flows {
            self.shared.expire(f, Duration::ZERO);
        }
    }

    async fn stop(self) -> Result<()> {
        self.shared.closing.store(true, Ordering::Relaxed);
        self.set(Phase::Done);
        let mut first_err = None;
        for d in self.drivers {
            match tokio::time::timeout(Duration::from_secs(5), d).await {
                Ok(Ok(Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(anyhow::anyhow!("driver task: {e}"));
                }
                _ => {}
            }
        }
        for r in self.readers {
            // A server that does not answer the close is left behind.
            let abort = r.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), r)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

struct Meters {
    tck: f64,
    /// (label, pid)
    pids: Vec<(&'static str, u32)>,
    http: Vec<SocketAddr>,
    db: sqlx::MySqlConnection,
}

struct Snapshot {
    at: Instant,
    ticks: Vec<u64>,
    db: DbStatus,
    servers: Vec<[u64; 4]>,
    counters: Counters,
}

impl Meters {
    async fn snapshot(&mut self, shared: &Shared) -> Snapshot {
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
struct Window {
    secs: f64,
    c: Counters,
    /// % of one core per process, in `Meters::pids` order.
    cpu: Vec<f64>,
    commits: f64,
    fsyncs: f64,
    lock_waits: u64,
    lock_time_ms: u64,
    /// Per app server: deltas of `COUNTERS`.
    servers: Vec<[u64; 4]>,
}

fn window(m: &Meters, a: &Snapshot, b: &Snapshot) -> Window {
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

struct Latency {
    offered: f64,
    achieved: f64,
    sent: u64,
    lost: u64,
    h: Hists,
}

struct Outcome {
    name: String,
    sat: Window,
    /// Closed loop, at saturation.
    sat_h: Hists,
    lat: Option<Latency>,
    stray: u64,
    refused: u64,
    errors: BTreeMap<String, u64>,
}

struct Timing {
    warmup: Duration,
    secs: Duration,
    latency: Duration,
    load: f64,
    drain: Duration,
}

async fn sleep_checked(d: Duration, sc: &Scenario, daemons: &mut Daemons) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(Duration::from_millis(500))).await;
        daemons.check()?;
        sc.check()?;
    }
}

/// Saturation, then the latency run at `load` % of it.
async fn measure(
    name: &str,
    sc: &Scenario,
    window_per_flow: usize,
    t: &Timing,
    meters: &mut Meters,
    daemons: &mut Daemons,
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
    sleep_checked(t.warmup, sc, daemons).await?;
    let a = meters.snapshot(shared).await;
    sleep_checked(t.secs, sc, daemons).await?;
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
        sleep_checked(t.latency + Duration::from_millis(50), sc, daemons).await?;
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

// ---------------------------------------------------------------------------
// Deployment and scenarios
// ---------------------------------------------------------------------------

struct Deployment {
    ws: [SocketAddr; 2],
    http: [SocketAddr; 2],
    pids: Vec<(&'static str, u32)>,
}

fn one_to_one_users(pairs: usize) -> (Vec<u64>, Vec<u64>) {
    let senders = (0..pairs as u64).map(|p| 100_000 + p).collect();
    let receivers = (0..pairs as u64).map(|p| 200_000 + p).collect();
    (senders, receivers)
}

fn group_users(size: usize) -> Vec<u64> {
    (0..size as u64).map(|m| 300_000 + m).collect()
}

/// Exchange + app servers A and B on the database `db_url`, users and the
/// group in its directory. Returns the deployment and the group id.
async fn deploy(
    args: &Args,
    bins: &Path,
    dir: &Path,
    db_url: &str,
    daemons: &mut Daemons,
) -> Result<(Deployment, u64)> {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    iim::tls::dev::write_dev_certs(
        &certs,
        &[ServerId(EXCHANGE_ID)],
        &[ServerId(SERVER_A), ServerId(SERVER_B)],
    )?;

    // Schema, directory and group, before any daemon starts.
    let reg = iim::registry::Registry::connect(db_url)
        .await
        .context("registry on the bench database")?;
    let store = Store::new(&reg);
    let (senders, receivers) = one_to_one_users(args.pairs);
    let members = group_users(args.group_size);
    // One organisation per user: no presence broadcasts between them.
    let users: Vec<User> = senders
        .iter()
        .chain(&receivers)
        .chain(&members)
        .map(|&u| User {
            id: UserId(u),
            name: format!("bench{u}"),
            org: format!("bench-{u}"),
        })
        .collect();
    store.add_users(&users).await?;
    let ids: Vec<UserId> = members.iter().map(|&u| UserId(u)).collect();
    let group = store.create_group("bench-group", &ids).await?;

    // Exchange.
    let quic = loopback(free_port(true));
    let ex_http = loopback(free_port(false));
    let ex = Daemon::spawn(
        &bins.join("iim-exchange"),
        &[
            "--id".into(),
            EXCHANGE_ID.to_string(),
            "--listen".into(),
            quic.to_string(),
            "--http-listen".into(),
            ex_http.to_string(),
            "--database".into(),
            db_url.to_string(),
            "--certs".into(),
            certs.display().to_string(),
        ],
        dir.join("exchange.log"),
        "iim-exchange",
    )?;
    let ex_pid = ex.pid;
    daemons.0.push(ex);
    wait_port(ex_http, "iim-exchange", daemons).await?;

    // App servers: production timers; client rate limits lifted (one
    // bench connection stands for many human users).
    let mut ws = Vec::new();
    let mut http = Vec::new();
    let mut pids = vec![("exchange", ex_pid)];
    for (id, label) in [(SERVER_A, "A"), (SERVER_B, "B")] {
        let w = loopback(free_port(false));
        let h = loopback(free_port(false));
        let cfg = dir.join(format!("appserver-{id}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "id = {id}\ndatabase = \"{db_url}\"\nclient_listen = \"{w}\"\nhttp_listen = \"{h}\"\n\
                 exchange = {{ id = {EXCHANGE_ID}, address = \"{quic}\" }}\n\
                 [auth]\njwt_secret = \"{}\"\n\
                 [limits]\nrate_per_sec = 1000000\nrate_burst = 1000000\n",
                iim_tests::JWT_SECRET
            ),
        )?;
        let d = Daemon::spawn(
            &bins.join("iim-appserver"),
            &[
                "--config".into(),
                cfg.display().to_string(),
                "--certs".into(),
                certs.display().to_string(),
            ],
            dir.join(format!("appserver-{id}.log")),
            &format!("iim-appserver {id} ({label})"),
        )?;
        pids.push((if id == SERVER_A { "A" } else { "B" }, d.pid));
        daemons.0.push(d);
        ws.push(w);
        http.push(h);
    }
    for (w, what) in ws.iter().zip(["app server A", "app server B"]) {
        wait_port(*w, what, daemons).await?;
    }
    // Linked to the exchange (registry state up), so pushes flow at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        daemons.check()?;
        let servers = reg.servers().await?;
        let up = servers
            .iter()
            .filter(|s| {
                s.role == iim::registry::Role::App && s.state == iim::registry::ServerState::Up
            })
            .count();
        if up == 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the app servers did not link to the exchange within 30 s: {servers:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(reg);
    Ok((
        Deployment {
            ws: [ws[0], ws[1]],
            http: [http[0], http[1]],
            pids,
        },
        group,
    ))
}

async fn one_to_one(
    args: &Args,
    dep: &Deployment,
    t: &Timing,
    meters: &mut Meters,
    daemons: &mut Daemons,
) -> Result<Outcome> {
    let (senders, receivers) = one_to_one_users(args.pairs);
    let mut list: Vec<(SocketAddr, u64)> = senders.iter().map(|&u| (dep.ws[0], u)).collect();
    list.extend(receivers.iter().map(|&u| (dep.ws[1], u)));
    let started = Instant::now();
    let mut conns = connect_all(&list).await?;
    eprintln!(
        "chat-bench: 1:1: {} connections in {:.1} s",
        list.len(),
        started.elapsed().as_secs_f64()
    );
    let recv_conns = conns.split_off(args.pairs);
    // Sender p on A writes to receiver p on B: one push, on B.
    let flows = receivers
        .iter()
        .enumerate()
        .map(|(p, &to)| Flow::new(p, 0, to, 0, [0, 1]))
        .collect();
    let shared = Arc::new(Shared::new(flows, args.size)?);
    let mut all: Vec<(Wss, usize, Option<usize>)> = conns
        .into_iter()
        .enumerate()
        .map(|(p, w)| (w, 0, Some(p)))
        .collect();
    all.extend(recv_conns.into_iter().map(|w| (w, 1, None)));
    let sc = Scenario::start(all, shared);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = measure("1:1", &sc, args.window, t, meters, daemons).await;
    let s = sc.stop().await;
    let out = r?;
    s?;
    Ok(out)
}

async fn group(
    args: &Args,
    dep: &Deployment,
    group: u64,
    t: &Timing,
    meters: &mut Meters,
    daemons: &mut Daemons,
) -> Result<Outcome> {
    let members = group_users(args.group_size);
    let half = members.len().div_ceil(2);
    // Member m is on A for m < half, on B otherwise.
    let list: Vec<(SocketAddr, u64)> = members
        .iter()
        .enumerate()
        .map(|(m, &u)| (dep.ws[usize::from(m >= half)], u))
        .collect();
    // Senders alternate: member 0 (A), member `half` (B), member 1 (A), …
    let mut sender_members = Vec::new();
    for k in 0..args.group_senders {
        let m = if k % 2 == 0 { k / 2 } else { half + k / 2 };
        if m < members.len() && !sender_members.contains(&m) {
            sender_members.push(m);
        }
    }
    let started = Instant::now();
    let conns = connect_all(&list).await?;
    eprintln!(
        "chat-bench: group: {} connections in {:.1} s",
        list.len(),
        started.elapsed().as_secs_f64()
    );
    // Every member but the sending connection gets a push.
    let on = [u32::try_from(half)?, u32::try_from(members.len() - half)?];
    let flows = sender_members
        .iter()
        .enumerate()
        .map(|(f, &m)| {
            let side = usize::from(m >= half);
            let mut expect = on;
            expect[side] -= 1;
            Flow::new(f, 1, group, side, expect)
        })
        .collect();
    let shared = Arc::new(Shared::new(flows, args.size)?);
    let by_member: HashMap<usize, usize> = sender_members
        .iter()
        .enumerate()
        .map(|(f, &m)| (m, f))
        .collect();
    let all = conns
        .into_iter()
        .enumerate()
        .map(|(m, w)| (w, usize::from(m >= half), by_member.get(&m).copied()))
        .collect();
    let sc = Scenario::start(all, shared);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = measure("group", &sc, args.group_window, t, meters, daemons).await;
    let s = sc.stop().await;
    let out = r?;
    s?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn q(h: &Histogram<u64>, quantile: f64) -> String {
    if h.is_empty() {
        "-".into()
    } else {
        group_digits(h.value_at_quantile(quantile))
    }
}

fn group_digits(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn report(
    args: &Args,
    t: &Timing,
    db_version: &str,
    pids: &[(&'static str, u32)],
    outcomes: &[Outcome],
) {
    let cmd: Vec<String> = std::env::args().collect();
    println!();
    println!("## chat-bench results");
    println!();
    println!("command: `{}`", cmd.join(" "));
    println!();
    println!(
        "deployment: iim-exchange + app servers A (id {SERVER_A}) and B (id {SERVER_B}), real processes on loopback; MariaDB {db_version} at {} (fresh database, dropped at the end); {} cores",
        redact(&args.mysql_url),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "1:1: {} pairs (senders on A, receivers on B), {} in flight per sender at saturation ({} connections)",
        args.pairs,
        args.window,
        2 * args.pairs
    );
    println!(
        "group: {} members ({} on A, {} on B; write fan-out), {} senders, {} in flight per sender at saturation ({} pushes per message)",
        args.group_size,
        args.group_size.div_ceil(2),
        args.group_size / 2,
        args.group_senders.min(args.group_size),
        args.group_window,
        args.group_size.saturating_sub(1)
    );
    println!(
        "message body {} B; warm-up {:.0} s, saturation window {:.0} s, latency run {:.0} s at {:.0} % of saturation (first 10 % not recorded)",
        args.size,
        t.warmup.as_secs_f64(),
        t.secs.as_secs_f64(),
        t.latency.as_secs_f64(),
        t.load
    );
    println!();
    println!("### Saturation (closed loop: a message is in flight until its last push)");
    println!();
    let cpu_head: Vec<&str> = pids.iter().map(|(l, _)| *l).collect();
    println!(
        "| scenario | messages/s stored+pushed | pushes/s received | acks/s | send → ack p50 / p99 µs | send → last push p50 / p99 µs | CPU % of a core ({}) | MariaDB commits/s | fsyncs/s | row lock waits (time) | lost |",
        cpu_head.join(" / ")
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        let w = &o.sat;
        let cpu: Vec<String> = w.cpu.iter().map(|c| format!("{c:.0}")).collect();
        println!(
            "| {} | {} | {} | {} | {} / {} | {} / {} | {} | {:.0} | {:.0} | {} ({} ms) | {} |",
            o.name,
            group_digits((w.c.completed as f64 / w.secs) as u64),
            group_digits((w.c.pushes as f64 / w.secs) as u64),
            group_digits((w.c.acks as f64 / w.secs) as u64),
            q(&o.sat_h.ack, 0.5),
            q(&o.sat_h.ack, 0.99),
            q(&o.sat_h.last, 0.5),
            q(&o.sat_h.last, 0.99),
            cpu.join(" / "),
            w.commits,
            w.fsyncs,
            w.lock_waits,
            w.lock_time_ms,
            w.c.lost
        );
    }
    println!();
    println!(
        "### Latency at a fixed offered load (µs from the intended send time; corrected for coordinated omission)"
    );
    println!();
    println!(
        "| scenario | load | offered msg/s | sent msg/s | to ack p50 / p99 | to last push p50 | p99 | p999 | max | samples / sent | lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        let Some(l) = &o.lat else { continue };
        println!(
            "| {} | {:.0} % | {:.0} | {:.0} | {} / {} | {} | {} | {} | {} | {} / {} | {} |",
            o.name,
            t.load,
            l.offered,
            l.achieved,
            q(&l.h.ack, 0.5),
            q(&l.h.ack, 0.99),
            q(&l.h.last, 0.5),
            q(&l.h.last, 0.99),
            q(&l.h.last, 0.999),
            q(&l.h.last, 1.0),
            l.h.last.len(),
            l.sent,
            l.lost
        );
    }
    if let Some(o) = outcomes.iter().find(|o| o.name == "group") {
        println!();
        println!(
            "### Group: which member gets it when (µs from the intended send time, p50 / p99)"
        );
        println!();
        println!(
            "| run | to ack | to the median member | to the last member on the sender's server | to the last member on the other server | to the last member |"
        );
        println!("|---|---|---|---|---|---|");
        let row = |run: String, h: &Hists| {
            let pair = |x: &Histogram<u64>| format!("{} / {}", q(x, 0.5), q(x, 0.99));
            println!(
                "| {run} | {} | {} | {} | {} | {} |",
                pair(&h.ack),
                pair(&h.median),
                pair(&h.last_same),
                pair(&h.last_other),
                pair(&h.last)
            );
        };
        row("saturation (closed loop)".into(), &o.sat_h);
        if let Some(l) = &o.lat {
            row(
                format!("{:.0} % load, {:.0} msg/s", t.load, l.offered),
                &l.h,
            );
        }
    }
    println!();
    println!("### App server counters during the saturation window (A / B)");
    println!();
    println!(
        "| scenario | chat messages stored | chat pushes handed to the relay | pushes dropped | connections cut (overflow) |"
    );
    println!("|---|---|---|---|---|");
    for o in outcomes {
        let s = &o.sat.servers;
        let pick = |i: usize| {
            s.iter()
                .map(|c| c[i].to_string())
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            o.name,
            pick(0),
            pick(1),
            pick(2),
            pick(3)
        );
    }
    let mut notes = Vec::new();
    for o in outcomes {
        if o.stray > 0 {
            notes.push(format!(
                "{}: {} pushes arrived for messages already counted lost or twice",
                o.name, o.stray
            ));
        }
        if o.refused > 0 || !o.errors.is_empty() {
            notes.push(format!(
                "{}: {} sends refused; error frames {:?}",
                o.name, o.refused, o.errors
            ));
        }
    }
    if !notes.is_empty() {
        println!();
        for n in notes {
            println!("note: {n}");
        }
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match bench(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bench(mut args: Args) -> Result<()> {
    if args.quick {
        args.warmup_secs = args.warmup_secs.min(1.0);
        args.secs = args.secs.min(3.0);
        args.latency_secs = args.latency_secs.min(3.0);
    }
    if args.pairs == 0 && !args.no_one_to_one {
        bail!("--pairs must be at least 1");
    }
    if args.group_size < 2 && !args.no_group {
        bail!("--group-size must be at least 2");
    }
    if args.group_senders == 0 && !args.no_group {
        bail!("--group-senders must be at least 1");
    }
    if args.window == 0 || args.group_window == 0 {
        bail!("--window and --group-window must be at least 1");
    }
    if args.pairs > 9_999 || args.group_senders > 9_999 {
        bail!("at most 9 999 sending connections per scenario");
    }
    let min_size = KEY_PREFIX.len() + KEY_LEN + "\",\"p\":\"\"}".len();
    if args.size < min_size || args.size > 60_000 {
        bail!("--size must be within {min_size}..=60000 bytes");
    }
    if !(args.load > 0.0 && args.load <= 100.0) {
        bail!("--load must be within (0, 100]");
    }
    let t = Timing {
        warmup: Duration::from_secs_f64(args.warmup_secs.max(0.0)),
        secs: Duration::from_secs_f64(args.secs.max(0.5)),
        latency: Duration::from_secs_f64(args.latency_secs.max(0.0)),
        load: args.load,
        drain: if args.quick {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(15)
        },
    };
    let bins = find_bins(&args)?;
    let _ = now_us();

    let db = BenchDb::create(&args.mysql_url).await?;
    eprintln!(
        "chat-bench: binaries in {}; database {} on {}",
        bins.display(),
        db.name,
        redact(&db.server)
    );
    let mut daemons = Daemons::default();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Interrupted or not, the children are killed and the database dropped.
    let result = tokio::select! {
        r = run(&args, &t, &bins, &db, &mut daemons) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT)")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
    };
    daemons.kill_all().await;
    if let Err(e) = db.drop_db().await {
        eprintln!(
            "chat-bench: warning: could not drop database {}: {e:#}",
            db.name
        );
    }
    result
}

async fn run(
    args: &Args,
    t: &Timing,
    bins: &Path,
    db: &BenchDb,
    daemons: &mut Daemons,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("chat-bench").tempdir()?;
    let (dep, group_id) = deploy(args, bins, tmp.path(), &db.url(), daemons).await?;
    let mut pids = dep.pids.clone();
    if let Some(p) = mariadbd_pid() {
        pids.push(("mariadbd", p));
    }
    pids.push(("bench", std::process::id()));
    let mut conn = {
        use sqlx::Connection;
        sqlx::MySqlConnection::connect(&db.server).await?
    };
    let version = db_version(&mut conn).await;
    let mut meters = Meters {
        tck: clk_tck(),
        pids: pids.clone(),
        http: dep.http.to_vec(),
        db: conn,
    };
    let mut outcomes = Vec::new();
    if !args.no_one_to_one {
        outcomes.push(one_to_one(args, &dep, t, &mut meters, daemons).await?);
    }
    if !args.no_group {
        outcomes.push(group(args, &dep, group_id, t, &mut meters, daemons).await?);
    }
    daemons.check()?;
    report(args, t, &version, &pids, &outcomes);
    Ok(())
}
