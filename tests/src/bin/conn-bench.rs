//! `conn-bench`: what an idle client connection costs an app server.
//!
//! Starts a real exchange and ONE real app server (release binaries, a
//! SQLite registry in a temporary directory), puts the users in the
//! directory (each in an organisation of its own, so no presence is
//! broadcast between them), then opens WebSocket connections in steps
//! (`--steps`; by default 1 000, 5 000, 10 000 and the most the open-file
//! limit allows). Each step first opens the WebSockets (upgraded, not yet
//! authenticated), then authenticates all of them, and reads the app
//! server's memory (`VmRSS` from /proc) after each half; the table has the
//! authenticated figure and both halves' rates. (The VmRSS between the
//! halves is no clean split of a connection's cost: the allocator hands
//! the auth half memory the HTTP handshakes of the first half freed.) At
//! the last step one notice is sent to every
//! connected user through the admin API (in requests of at most 10 000
//! recipients, its limit) and timed until the last client has it.
//!
//! The clients are child processes of this binary (`--client`, at most
//! `--per-client` connections each), each with a source address of its own
//! (127.0.0.10, .11, …, bound before connecting) and a task per
//! authenticated connection that reads it (so the server's pings are
//! answered) and counts the notice. They and the app server inherit this
//! process's open-file limit, which the bench raises from the soft to the
//! hard limit (the daemon's defaults are not touched). Where the hard limit
//! is 20 000 files per process and cannot be raised (the machine this was
//! written on) one app server holds at most about 19 900 connections.
//!
//! ```text
//! cargo build --release -p iim-exchange -p iim-appserver -p iim-tests --bins
//! target/release/conn-bench            # 1 000 … the limit (~1 min)
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
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const BUILD: &str = "cargo build --release -p iim-exchange -p iim-appserver -p iim-tests --bins";
const SERVER: u32 = 1;
/// The first user id.
const FIRST_USER: u64 = 1_000_000;
/// Connections one client process opens (or authenticates) at once.
const CONNECT_PARALLEL: usize = 32;
/// The admin API's most recipients per send.
const NOTICE_CHUNK: usize = iim_http::admin::MAX_RECIPIENTS;
/// Files the app server may open besides its client connections (its
/// listeners, database, logs, runtime), kept free below the limit.
const SERVER_FILES: u64 = 150;
/// How long one client process may take for one command.
const COMMAND_WAIT: Duration = Duration::from_secs(300);
/// The clients' WebSocket read buffer (tungstenite's default is 128 KiB
/// per connection, allocated whole: 2.4 GiB for 19 000 clients).
const CLIENT_READ_BUFFER: usize = 4 * 1024;

#[derive(Parser, Debug)]
#[command(
    about = "Memory per idle authenticated WebSocket connection on one app server, connect + auth rate, and a notice to all of them.",
    after_help = "Needs the release binaries first: cargo build --release -p iim-exchange -p iim-appserver -p iim-tests --bins"
)]
struct Args {
    /// Connections after each step (ascending); default 1000,5000,10000
    /// and the most the open-file limit allows.
    #[arg(long, value_delimiter = ',')]
    steps: Option<Vec<usize>>,
    /// 1 000 and 5 000 connections only.
    #[arg(long)]
    quick: bool,
    /// Connections per client process (each one's own source address).
    #[arg(long, default_value_t = 5_000)]
    per_client: usize,
    /// Internal: run as a client process connecting to this address.
    #[arg(long, hide = true)]
    client: Option<SocketAddr>,
    /// Internal: a client process's first user.
    #[arg(long, hide = true, default_value_t = FIRST_USER)]
    first: u64,
    /// Internal: a client process's source address.
    #[arg(long, hide = true, default_value = "127.0.0.1")]
    source: IpAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(server) = args.client {
        raise_file_limit();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(client(server, args.first, args.source));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: Args) -> Result<()> {
    ensure!(args.per_client > 0, "--per-client must be positive");
    let limit = raise_file_limit();
    let most_allowed = (limit.saturating_sub(SERVER_FILES) / 100 * 100) as usize;
    let steps = match (&args.steps, args.quick) {
        (_, true) => vec![1_000, 5_000],
        (Some(s), false) => s.clone(),
        (None, false) => {
            let mut s = vec![1_000, 5_000, 10_000];
            s.retain(|&n| n < most_allowed);
            s.push(most_allowed);
            s
        }
    };
    ensure!(
        !steps.is_empty() && steps[0] > 0 && steps.windows(2).all(|w| w[0] < w[1]),
        "--steps must be ascending and positive"
    );
    let most = *steps.last().unwrap_or(&0);
    if most > most_allowed {
        bail!(
            "{most} connections need more than this machine's open-file limit ({limit}) allows one app server ({most_allowed})"
        );
    }
    let bins = Binaries::next_to_me(BUILD)?;
    if !bins.is_release() {
        eprintln!("conn-bench: warning: not release binaries; the figures mean little");
    }
    let tmp = tempfile::Builder::new().prefix("conn-bench").tempdir()?;
    let db_url = format!("sqlite://{}", tmp.path().join("registry.db").display());
    let mut spec = Spec::new(tmp.path(), &db_url, bins);
    spec.servers = vec![SERVER];
    // Opened WebSockets wait for their auth frame while the rest of the
    // step opens: the auth timeout is long enough for that.
    spec.server_toml = format!(
        "[limits]\nrate_per_sec = 1000000\nrate_burst = 1000000\nmax_connections_per_ip = {}\nmax_connections = {}\nauth_timeout_ms = 300000\n",
        args.per_client + 16,
        most + 16
    );
    spec.jwt_secret = Some(iim_kit::JWT_SECRET.into());
    spec.log_filter = Some("warn".into());
    let mut dep = Deployment::new(spec)?;
    let mut clients = Vec::new();
    let result = run(&mut dep, &mut clients, &steps, &args, limit).await;
    for c in &mut clients {
        c.quit().await;
    }
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

/// One reading after a step.
struct Row {
    n: usize,
    /// VmRSS with all `n` authenticated.
    authed: u64,
    open: Duration,
    auth: Duration,
}

async fn run(
    dep: &mut Deployment,
    clients: &mut Vec<ClientProc>,
    steps: &[usize],
    args: &Args,
    limit: u64,
) -> Result<()> {
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
    dep.start_exchange(dep.first_exchange())?;
    dep.wait_exchanges(&[dep.first_exchange()]).await?;
    let pid = dep.start_server(SERVER)?;
    dep.wait_servers(&[SERVER]).await?;
    let addr = dep.ws(SERVER);
    // Let the server settle (its first registry rounds) before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = vm_kib(pid, "VmRSS");
    let files = open_files(pid);
    eprintln!(
        "conn-bench: app server {pid} up, VmRSS {base} KiB, {files} files open, open-file limit {}; ours {limit}",
        file_limit(pid)
    );
    ensure!(
        most as u64 + files + 32 <= limit,
        "the app server has {files} files open: {most} connections would pass its limit of {limit}"
    );

    let mut rows: Vec<Row> = Vec::new();
    for &n in steps {
        // Each client process's share of n, the first ones filled first.
        let shares: Vec<usize> = (0..n.div_ceil(args.per_client))
            .map(|k| (n - k * args.per_client).min(args.per_client))
            .collect();
        while clients.len() < shares.len() {
            let k = clients.len();
            clients.push(ClientProc::spawn(addr, k, args.per_client)?);
        }
        let started = Instant::now();
        let replies = futures_util::future::try_join_all(
            clients
                .iter_mut()
                .zip(&shares)
                .map(|(c, &share)| c.command(format!("open {share}"))),
        )
        .await?;
        let open = started.elapsed();
        check_replies(&replies, "opened")?;
        let upgraded = vm_kib(pid, "VmRSS");
        let started = Instant::now();
        let replies = futures_util::future::try_join_all(
            clients
                .iter_mut()
                .take(shares.len())
                .map(|c| c.command("auth".into())),
        )
        .await?;
        let auth = started.elapsed();
        check_replies(&replies, "authed")?;
        let authed = vm_kib(pid, "VmRSS");
        let before = rows.last().map_or(0, |r| r.n);
        eprintln!(
            "conn-bench: {n} connections: VmRSS {upgraded} KiB upgraded, {authed} KiB authenticated ({:.1} KiB each beyond the empty server); {:.0} opened/s, {:.0} authenticated/s",
            authed.saturating_sub(base) as f64 / n as f64,
            (n - before) as f64 / open.as_secs_f64(),
            (n - before) as f64 / auth.as_secs_f64(),
        );
        rows.push(Row {
            n,
            authed,
            open,
            auth,
        });
    }
    let open_files_now = open_files(pid);

    // One notice to every user, in requests of at most NOTICE_CHUNK.
    let admin = dep.admin(SERVER, Duration::from_secs(60))?;
    let everybody: Vec<u64> = (0..most as u64).map(|i| FIRST_USER + i).collect();
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
    let replies = futures_util::future::try_join_all(clients.iter_mut().map(|c| c.reply())).await?;
    let all = started.elapsed();
    check_replies(&replies, "noticed")?;
    let hwm = vm_kib(pid, "VmHWM");
    let after = vm_kib(pid, "VmRSS");

    report(&rows, base, most, clients.len());
    println!(
        "\nnotice to all {most}: handed to their connections in {:.0} ms (admin API, {} request(s)), last one received after {:.0} ms; VmRSS after {after} KiB ({:.1} KiB per connection beyond the empty server), VmHWM {hwm} KiB; the app server had {open_files_now} files open, limit {}",
        handed.as_secs_f64() * 1e3,
        everybody.len().div_ceil(NOTICE_CHUNK),
        all.as_secs_f64() * 1e3,
        after.saturating_sub(base) as f64 / most as f64,
        file_limit(pid),
    );
    Ok(())
}

fn report(rows: &[Row], base: u64, most: usize, processes: usize) {
    println!("## conn-bench results\n");
    println!(
        "one app server (real process, SQLite registry), idle authenticated WebSocket connections from {processes} client process(es), each from its own 127.0.0.x; empty server VmRSS {base} KiB\n"
    );
    println!(
        "| connections | app server VmRSS | KiB per connection beyond the empty server | KiB per connection added in this step | connect + auth rate (upgrade alone, auth alone) |"
    );
    println!("|---|---|---|---|---|");
    let mut before = (0usize, base);
    for r in rows {
        let n = r.n as f64;
        let added = (r.n - before.0) as f64;
        let marginal = r.authed.saturating_sub(before.1) as f64 / added;
        println!(
            "| {} | {} KiB | {:.1} | {marginal:.1} | {:.0} /s ({:.0} /s, {:.0} /s) |",
            r.n,
            r.authed,
            r.authed.saturating_sub(base) as f64 / n,
            added / (r.open + r.auth).as_secs_f64(),
            added / r.open.as_secs_f64(),
            added / r.auth.as_secs_f64(),
        );
        before = (r.n, r.authed);
    }
    debug_assert_eq!(before.0, most);
}

/// Every reply starts with `word` and reports no closed connection.
fn check_replies(replies: &[String], word: &str) -> Result<()> {
    for (k, r) in replies.iter().enumerate() {
        let mut f = r.split_whitespace();
        ensure!(
            f.next() == Some(word),
            "client {k}: expected {word}, got {r:?}"
        );
        let closed = f
            .skip_while(|w| *w != "closed")
            .nth(1)
            .and_then(|c| c.parse::<usize>().ok());
        ensure!(
            closed == Some(0),
            "client {k}: the server closed connections ({r:?})"
        );
    }
    Ok(())
}

/// Files `pid` has open.
fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// `pid`'s soft open-file limit as /proc shows it.
fn file_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// A client process: one command line in, one reply line out.
struct ClientProc {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl ClientProc {
    /// Client process `k`: users from `FIRST_USER + k * per_client`, source
    /// address 127.0.0.(10 + k).
    fn spawn(server: SocketAddr, k: usize, per_client: usize) -> Result<ClientProc> {
        let octet = u8::try_from(10 + k).context("too many client processes")?;
        let source = Ipv4Addr::new(127, 0, 0, octet);
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--client")
            .arg(server.to_string())
            .arg("--first")
            .arg((FIRST_USER + (k * per_client) as u64).to_string())
            .arg("--source")
            .arg(source.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a client process")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("client stdout")?).lines();
        Ok(ClientProc {
            child,
            stdin,
            stdout,
        })
    }

    async fn command(&mut self, line: String) -> Result<String> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        self.reply().await
    }

    async fn reply(&mut self) -> Result<String> {
        match tokio::time::timeout(COMMAND_WAIT, self.stdout.next_line()).await {
            Err(_) => bail!("a client process did not answer within {COMMAND_WAIT:?}"),
            Ok(Ok(Some(l))) => Ok(l),
            Ok(Ok(None)) => bail!("a client process exited"),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    async fn quit(&mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        let _ = self.stdin.flush().await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// What a client process's readers share.
#[derive(Default)]
struct Counts {
    /// Connections authenticated (and read).
    authed: AtomicUsize,
    notices: AtomicUsize,
    closed: AtomicUsize,
}

/// A client process: commands on stdin (`open N`: have N WebSockets
/// open, `auth`: authenticate those that are not, `quit`), one reply line
/// each on stdout; `noticed N closed C` once every authenticated
/// connection has had a notice.
async fn client(server: SocketAddr, first: u64, source: IpAddr) -> Result<()> {
    let counts = Arc::new(Counts::default());
    let mut opened: Vec<(u64, ChatClient)> = Vec::new();
    let mut next = first;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|n| n.parse::<u64>().ok()),
        ) {
            (Some("open"), Some(n)) => {
                let upto = first + n;
                let mut pending = futures_util::stream::iter(next..upto)
                    .map(|user| async move {
                        let c = tokio::time::timeout(
                            Duration::from_secs(30),
                            ChatClient::raw_from(source, server, config),
                        )
                        .await
                        .with_context(|| format!("user {user}: no upgrade within 30 s"))?
                        .with_context(|| format!("user {user}: connect"))?;
                        anyhow::Ok((user, c))
                    })
                    .buffer_unordered(CONNECT_PARALLEL);
                while let Some(c) = pending.next().await {
                    opened.push(c?);
                }
                next = next.max(upto);
                say(&format!(
                    "opened {} closed {}",
                    next - first,
                    counts.closed.load(Ordering::Relaxed)
                ));
            }
            (Some("auth"), None) => {
                let mut pending = futures_util::stream::iter(opened.drain(..))
                    .map(|(user, mut c)| async move {
                        let token = iim_kit::token(user);
                        tokio::time::timeout(
                            Duration::from_secs(30),
                            c.authenticate(&token, "bench"),
                        )
                        .await
                        .with_context(|| format!("user {user}: no welcome within 30 s"))?
                        .with_context(|| format!("user {user}: auth"))?;
                        anyhow::Ok(c.into_socket())
                    })
                    .buffer_unordered(CONNECT_PARALLEL);
                while let Some(socket) = pending.next().await {
                    counts.authed.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(read(socket?, counts.clone()));
                }
                say(&format!(
                    "authed {} closed {}",
                    counts.authed.load(Ordering::Relaxed),
                    counts.closed.load(Ordering::Relaxed)
                ));
            }
            (Some("quit"), None) => break,
            _ => bail!("client: unknown command {line:?}"),
        }
    }
    Ok(())
}

/// One reply line to the bench.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Reads one connection until it ends: answers pings, counts a notice
/// (and says so when it was the last one missing).
async fn read(mut socket: Socket, counts: Arc<Counts>) {
    while let Some(frame) = socket.next().await {
        match frame {
            Ok(Message::Text(t)) if t.as_str().contains(r#""op":"notice""#) => {
                let n = counts.notices.fetch_add(1, Ordering::Relaxed) + 1;
                if n == counts.authed.load(Ordering::Relaxed) {
                    say(&format!(
                        "noticed {n} closed {}",
                        counts.closed.load(Ordering::Relaxed)
                    ));
                }
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
    counts.closed.fetch_add(1, Ordering::Relaxed);
}
