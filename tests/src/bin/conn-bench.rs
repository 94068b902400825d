//! `conn-bench`: what an idle client connection costs an app server.
//!
//! Starts a real exchange and ONE real app server (release binaries, a
//! SQLite registry in a temporary directory), puts the users in the
//! directory (each in an organisation of its own, so no presence is
//! broadcast between them), then opens authenticated WebSocket connections
//! in steps (`--steps`, default 1 000, 5 000, 10 000, 19 000) and after
//! each step reads the app server's memory (`VmRSS` from /proc). Every
//! connection has a task here that reads it (so the server's pings are
//! answered) and notes when a `notice` arrives. At the last step one notice
//! is sent to every connected user through the admin API (in requests of
//! at most 10 000 recipients, its limit) and timed until the last client
//! has it.
//!
//! The app server inherits this process's open-file limit, which the bench
//! raises to its hard limit (the daemon's defaults are not touched). On the
//! machines this was written on the hard limit is 20 000 files per process
//! and cannot be raised, so 19 000 connections is the most one app server
//! can hold here (`--steps` may go higher where the limit allows).
//!
//! ```text
//! cargo build --release -p iim-exchange -p iim-appserver -p iim-tests --bins
//! target/release/conn-bench            # 1 000 … 19 000 connections (~1 min)
//! target/release/conn-bench --quick    # 1 000 and 5 000
//! ```

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use iim::store::{Store, User};
use iim::types::UserId;
use iim_http::admin::SendRequest;
use iim_kit::client::{ChatClient, Socket};
use iim_kit::deploy::{Deployment, Spec};
use iim_kit::proc::Binaries;
use iim_tests::procfs::vm_kib;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

const BUILD: &str = "cargo build --release -p iim-exchange -p iim-appserver -p iim-tests --bins";
const SERVER: u32 = 1;
/// The first user id.
const FIRST_USER: u64 = 1_000_000;
/// Connections being opened at once.
const CONNECT_PARALLEL: usize = 64;
/// The admin API's most recipients per send.
const NOTICE_CHUNK: usize = iim_http::admin::MAX_RECIPIENTS;

#[derive(Parser, Debug)]
#[command(
    about = "Memory per idle authenticated WebSocket connection on one app server, connect + auth rate, and a notice to all of them.",
    after_help = "Needs the release binaries first: cargo build --release -p iim-exchange -p iim-appserver -p iim-tests --bins"
)]
struct Args {
    /// Connections after each step (ascending).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,19000")]
    steps: Vec<usize>,
    /// 1 000 and 5 000 connections only.
    #[arg(long)]
    quick: bool,
}

/// What the readers of every connection share.
#[derive(Default)]
struct Arrivals {
    notices: AtomicUsize,
    closed: AtomicUsize,
    changed: Notify,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let steps = if args.quick {
        vec![1_000, 5_000]
    } else {
        args.steps.clone()
    };
    ensure!(
        !steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]),
        "--steps must be ascending"
    );
    let most = *steps.last().unwrap_or(&0);
    let limit = raise_file_limit();
    // This process holds one socket per connection, the app server one
    // more, and both need a few hundred files besides.
    if most as u64 + 500 > limit {
        bail!("{most} connections need more than this machine's open-file limit ({limit})");
    }
    let bins = Binaries::next_to_me(BUILD)?;
    if !bins.is_release() {
        eprintln!("conn-bench: warning: not release binaries; the figures mean little");
    }
    let tmp = tempfile::Builder::new().prefix("conn-bench").tempdir()?;
    let db_url = format!("sqlite://{}", tmp.path().join("registry.db").display());
    let mut spec = Spec::new(tmp.path(), &db_url, bins);
    spec.servers = vec![SERVER];
    spec.server_toml = format!(
        "[limits]\nrate_per_sec = 1000000\nrate_burst = 1000000\nmax_connections_per_ip = {0}\nmax_connections = {0}\n",
        most + 16
    );
    spec.jwt_secret = Some(iim_kit::JWT_SECRET.into());
    spec.log_filter = Some("warn".into());
    let mut dep = Deployment::new(spec)?;
    let result = run(&mut dep, &steps, limit).await;
    dep.kill_all().await;
    result
}

/// The soft open-file limit raised to the hard one; the limit now.
fn raise_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1_024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

async fn run(dep: &mut Deployment, steps: &[usize], limit: u64) -> Result<()> {
    let most = *steps.last().unwrap_or(&0);
    let store = Store::new(&dep.registry().await?);
    let users: Vec<User> = (0..most as u64)
        .map(|i| User {
            id: UserId(FIRST_USER + i),
            name: format!("conn{i}"),
            org: format!("conn-{i}"),
        })
        .collect();
    store.add_users(&users).await?;
    dep.start_exchange()?;
    dep.wait_exchange().await?;
    let pid = dep.start_server(SERVER)?;
    dep.wait_servers(&[SERVER]).await?;
    let addr = dep.ws(SERVER);
    let base = vm_kib(pid, "VmRSS");
    eprintln!("conn-bench: app server {pid} up, VmRSS {base} KiB; open-file limit {limit}");

    let arrivals = Arc::new(Arrivals::default());
    let mut readers = tokio::task::JoinSet::new();
    let mut rows = Vec::new();
    let mut open = 0usize;
    for &step in steps {
        let started = Instant::now();
        let mut pending = futures_util::stream::iter(open..step)
            .map(|i| connect(addr, FIRST_USER + i as u64))
            .buffer_unordered(CONNECT_PARALLEL);
        while let Some(socket) = pending.next().await {
            readers.spawn(read(socket?, arrivals.clone()));
        }
        let took = started.elapsed();
        let rate = (step - open) as f64 / took.as_secs_f64();
        open = step;
        ensure!(
            arrivals.closed.load(Ordering::Relaxed) == 0,
            "the server closed connections"
        );
        let rss = vm_kib(pid, "VmRSS");
        let per = (rss.saturating_sub(base)) as f64 / step as f64;
        eprintln!(
            "conn-bench: {step} connections: VmRSS {rss} KiB, {per:.1} KiB each; {rate:.0} connections/s"
        );
        rows.push((step, rss, per, rate));
    }

    // One notice to every user, in requests of at most NOTICE_CHUNK.
    let admin = dep.admin(SERVER, Duration::from_secs(60))?;
    let everybody: Vec<u64> = (0..open as u64).map(|i| FIRST_USER + i).collect();
    let started = Instant::now();
    for chunk in everybody.chunks(NOTICE_CHUNK) {
        let r = admin
            .send(&SendRequest {
                from: 0,
                to: chunk.to_vec(),
                text: "maintenance at 22:00".into(),
            })
            .await
            .context("admin send")?;
        ensure!(
            r.local_delivered == chunk.len(),
            "notice handed to {} of {} connections",
            r.local_delivered,
            chunk.len()
        );
    }
    let handed = started.elapsed();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let changed = arrivals.changed.notified();
        if arrivals.notices.load(Ordering::Relaxed) >= open {
            break;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            bail!(
                "{} of {open} notices arrived within 120 s",
                arrivals.notices.load(Ordering::Relaxed)
            );
        }
    }
    let all = started.elapsed();
    let hwm = vm_kib(pid, "VmHWM");
    let rss = vm_kib(pid, "VmRSS");

    println!("## conn-bench results\n");
    println!(
        "one app server (real process, SQLite registry), idle authenticated WebSocket connections from one client process; empty server VmRSS {base} KiB\n"
    );
    println!(
        "| connections | app server VmRSS | KiB per connection beyond the empty server | connect + auth rate |"
    );
    println!("|---|---|---|---|");
    for (n, rss, per, rate) in &rows {
        println!("| {n} | {rss} KiB | {per:.1} | {rate:.0} /s |");
    }
    println!(
        "\nnotice to all {open}: handed to their connections in {:.0} ms (admin API, {} request(s)), last one received after {:.0} ms; VmRSS after {rss} KiB, VmHWM {hwm} KiB",
        handed.as_secs_f64() * 1e3,
        everybody.len().div_ceil(NOTICE_CHUNK),
        all.as_secs_f64() * 1e3
    );
    readers.abort_all();
    Ok(())
}

/// Connect, authenticate, wait for the welcome.
async fn connect(addr: std::net::SocketAddr, user: u64) -> Result<Socket> {
    let token = iim_kit::token(user);
    let c = tokio::time::timeout(
        Duration::from_secs(30),
        ChatClient::connect(addr, &token, "bench"),
    )
    .await
    .with_context(|| format!("user {user}: no welcome within 30 s"))?
    .with_context(|| format!("user {user}: auth"))?;
    Ok(c.into_socket())
}

/// Reads one connection until it ends: answers pings, counts a notice.
async fn read(mut socket: Socket, arrivals: Arc<Arrivals>) {
    while let Some(frame) = socket.next().await {
        match frame {
            Ok(Message::Text(t)) if t.as_str().contains(r#""op":"notice""#) => {
                arrivals.notices.fetch_add(1, Ordering::Relaxed);
                arrivals.changed.notify_waiters();
            }
            Ok(Message::Ping(p)) => {
                if socket.send(Message::Pong(p)).await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    arrivals.closed.fetch_add(1, Ordering::Relaxed);
    arrivals.changed.notify_waiters();
}
