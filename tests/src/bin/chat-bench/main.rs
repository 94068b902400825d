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
//! - **Group.** One group of `--group-size` members (write fan-out up to
//!   the app servers' large-group threshold, 500; read fan-out above it),
//!   half on A and half on B (`--group-online` connects only some of
//!   them, the others staying offline); `--group-senders` of them (alternately on A and on B) send to it. Each
//!   message is pushed to every connected member but the sending connection.
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
//!
//! Modules: `db` (the bench database and MariaDB's counters), `flow` (a
//! sending connection's messages in flight and the latency histograms),
//! `conn` (the WebSocket connections' readers and writers), `measure` (the
//! windows and their readings), `scenario` (the deployment and the two
//! scenarios), `report` (the Markdown tables).

mod conn;
mod db;
mod flow;
mod measure;
mod report;
mod scenario;

use anyhow::{Result, bail};
use clap::Parser;
use db::{BenchDb, db_version, mariadbd_pid, redact};
use iim_kit::deploy::Deployment;
use iim_kit::proc::Binaries;
use iim_tests::procfs::clk_tck;
use measure::{Meters, Timing};
use report::report;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
pub struct Args {
    /// Short run (~20 s): 1 s warm-up, 3 s per measured window.
    #[arg(long)]
    pub quick: bool,
    /// 1:1 sender/receiver pairs (senders on A, receivers on B).
    #[arg(long, default_value_t = 64)]
    pub pairs: usize,
    /// Messages in flight (sent, last push not yet received) per 1:1 sender
    /// at saturation.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Members of the group (half on A, half on B).
    #[arg(long, default_value_t = 100)]
    pub group_size: usize,
    /// Members connected during the group scenario (default: all), half
    /// on A and half on B; the others stay offline. Large groups are read
    /// fan-out, and most members of one are offline at any moment.
    #[arg(long)]
    pub group_online: Option<usize>,
    /// Members that send to the group (alternately on A and B).
    #[arg(long, default_value_t = 4)]
    pub group_senders: usize,
    /// Messages in flight per group sender at saturation.
    #[arg(long, default_value_t = 4)]
    pub group_window: usize,
    /// Message body size in bytes (the JSON `body` value, stored verbatim).
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Offered load of the latency runs, in % of the measured saturation rate.
    #[arg(long, default_value_t = 50.0)]
    pub load: f64,
    /// Warm-up before each saturation window, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub warmup_secs: f64,
    /// Length of each saturation window, seconds.
    #[arg(long, default_value_t = 15.0)]
    pub secs: f64,
    /// Length of each latency run, seconds (its first 10 % is not recorded).
    #[arg(long, default_value_t = 15.0)]
    pub latency_secs: f64,
    /// Skip the 1:1 scenario.
    #[arg(long)]
    pub no_one_to_one: bool,
    /// Skip the group scenario.
    #[arg(long)]
    pub no_group: bool,
    /// MariaDB server URL, without a database.
    #[arg(
        long,
        env = "IIM_TEST_MYSQL_URL",
        default_value = "mysql://iim:iim@127.0.0.1:3306"
    )]
    pub mysql_url: String,
    /// Directory holding iim-exchange and iim-appserver (default: next to
    /// this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the bench's epoch: the clock of intended send times.
fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn at_us(us: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(*EPOCH.get_or_init(Instant::now) + Duration::from_micros(us))
}

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
    if args
        .group_online
        .is_some_and(|n| n < 2 || n > args.group_size)
        && !args.no_group
    {
        bail!("--group-online must be within 2..=--group-size");
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
    let bins = match &args.bin_dir {
        Some(dir) => Binaries::in_dir(dir.clone(), BUILD)?,
        None => Binaries::next_to_me(BUILD)?,
    };
    if !bins.is_release() {
        eprintln!(
            "chat-bench: warning: using binaries in {} (not a release directory): figures of debug builds are meaningless",
            bins.dir().display()
        );
    }
    let _ = now_us();

    let db = BenchDb::create(&args.mysql_url).await?;
    eprintln!(
        "chat-bench: binaries in {}; database {} on {}",
        bins.dir().display(),
        db.name,
        redact(&db.server)
    );
    let tmp = tempfile::Builder::new().prefix("chat-bench").tempdir()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Interrupted or not, the children are killed and the database dropped.
    let result = match Deployment::new(scenario::spec(tmp.path(), &db.url(), bins)) {
        Err(e) => Err(e),
        Ok(mut dep) => {
            let r = tokio::select! {
                r = run(&args, &t, &db, &mut dep) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT)")),
                _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
            };
            dep.kill_all().await;
            r
        }
    };
    if let Err(e) = db.drop_db().await {
        eprintln!(
            "chat-bench: warning: could not drop database {}: {e:#}",
            db.name
        );
    }
    result
}

async fn run(args: &Args, t: &Timing, db: &BenchDb, dep: &mut Deployment) -> Result<()> {
    let group_id = scenario::deploy(args, dep).await?;
    let mut pids = scenario::labelled_pids(dep);
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
        http: vec![dep.http(SERVER_A), dep.http(SERVER_B)],
        db: conn,
    };
    let mut outcomes = Vec::new();
    if !args.no_one_to_one {
        outcomes.push(scenario::one_to_one(args, dep, t, &mut meters).await?);
    }
    if !args.no_group {
        outcomes.push(scenario::group(args, dep, group_id, t, &mut meters).await?);
    }
    dep.check()?;
    report(args, t, &version, &pids, &outcomes);
    Ok(())
}
