//! `iimctl demo`: the newcomer's tour on the embedded defaults.
//!
//! Starts the real `iim-exchange` and three `iim-appserver` processes (the
//! binaries built next to iimctl) on loopback, with a fresh SQLite registry
//! holding the demo directory (`iimctl demo-data`) and development
//! certificates; sends one message across all three servers, stops one
//! server and starts it again, then runs `iimctl chat` clients (this
//! binary) on different servers chatting one to one and in a group, and
//! stops everything. The app servers find the exchange through the
//! registry. Every child is stopped with SIGTERM (then killed after a grace
//! period) however iimctl ends.

use crate::view;
use anyhow::{Context, bail};
use iim::registry::{Registry, Role, ServerState};
use iim::types::now_ms;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::Child;
use tokio::task::JoinSet;
use tokio::time::Instant;

const EXCHANGE_ID: u32 = 100;
/// App servers and their demo users.
const SERVERS: [(u32, &[u64]); 3] = [(1, &[1001, 1002]), (2, &[2001, 2002]), (3, &[3001])];
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const SEND_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the demo's chat receivers print what arrives.
const CHAT_WAIT_SECS: u64 = 4;
/// Environment that would change how the children start or log.
const SCRUBBED_ENV: [&str; 5] = [
    "RUST_LOG",
    "IIM_LOG_JSON",
    "IIM_DATABASE",
    "IIM_EXCHANGE_CONFIG",
    "IIM_APPSERVER_CONFIG",
];

pub struct Options {
    pub dir: PathBuf,
    pub keep_running: bool,
}

pub async fn run(opts: Options) -> anyhow::Result<ExitCode> {
    let bins = Binaries::find()?;
    let mut fleet = Fleet::default();
    let outcome = tokio::select! {
        r = script(&opts, &bins, &mut fleet) => r,
        _ = iim::telemetry::wait_for_signal() => {
            println!("\ninterrupted");
            Ok(ExitCode::from(130))
        }
    };
    if fleet.nodes.is_empty() {
        return outcome;
    }
    // Say what went wrong before the stop messages, not after them.
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("\niimctl: {e:#}");
            ExitCode::FAILURE
        }
    };
    section("Stopping everything (SIGTERM, app servers first)");
    let clean = fleet.stop_all().await;
    if !clean && code == ExitCode::SUCCESS {
        return Ok(ExitCode::FAILURE);
    }
    Ok(code)
}

/// The demo proper. Returns the exit code; problems found on the way are
/// printed and make it non-zero without stopping the tour.
async fn script(opts: &Options, bins: &Binaries, fleet: &mut Fleet) -> anyhow::Result<ExitCode> {
    let dir = &opts.dir;
    let certs = dir.join("certs");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    fleet.logs = logs.clone();
    let mut problems = Vec::new();

    println!(
        "iim demo: one exchange and three app servers on this machine, sharing a SQLite registry."
    );

    section("1. Certificates: a development CA and one certificate per server");
    let servers: Vec<u32> = SERVERS.iter().map(|(id, _)| *id).collect();
    let (ca, _) = crate::write_certs(&certs, &[EXCHANGE_ID], &servers).with_context(|| {
        format!(
            "cannot write the demo certificates into {}",
            certs.display()
        )
    })?;
    println!("  {ca}");
    let names: Vec<String> = std::iter::once(format!("exchange-{EXCHANGE_ID}"))
        .chain(servers.iter().map(|id| format!("server-{id}")))
        .collect();
    println!(
        "  issued {} (.pem and .key; each names its server, e.g. DNS server-1.iim)",
        names.join(", ")
    );

    section("2. Registry: a fresh SQLite database");
    let db = dir.join("registry.db");
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.clone().into_os_string();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", db.display()));
            }
            _ => {}
        }
    }
    let url = format!("sqlite://{}", db.display());
    // Creating the schema here, before any daemon starts, keeps the
    // daemons' migrations from racing each other on a new file.
    let registry = Registry::connect(&url)
        .await
        .with_context(|| format!("cannot create the registry {url}"))?;
    println!("  {url}");
    println!("  $ iimctl demo-data --database {url}");
    for line in crate::directory::load_demo_data(&url).await? {
        println!("    {line}");
    }
    let team = iim::store::Store::new(&registry)
        .groups()
        .await?
        .iter()
        .find(|g| g.name == "team")
        .map(|g| g.id)
        .context("the demo data has no group \"team\"")?;

    section("3. Start the exchange, then the app servers");
    let ports = Ports::pick()?;
    let mut args = vec![
        "--id".to_owned(),
        EXCHANGE_ID.to_string(),
        "--listen".to_owned(),
        format!("127.0.0.1:{}", ports.quic),
        "--http-listen".to_owned(),
        format!("127.0.0.1:{}", ports.exchange_http),
    ];
    args.extend(common_args(&url, &certs));
    let pid = fleet.spawn("exchange", &bins.exchange, &args, true)?;
    println!("  $ iim-exchange {}", args.join(" "));
    println!(
        "    pid {pid}, QUIC on 127.0.0.1:{}, metrics at http://127.0.0.1:{}/metrics",
        ports.quic, ports.exchange_http
    );
    let started = Instant::now();
    fleet
        .wait_until("the exchange to register", async || {
            let servers = registry.servers().await?;
            Ok(servers.iter().any(|s| {
                s.id.0 == EXCHANGE_ID && s.role == Role::Exchange && s.state == ServerState::Up
            }))
        })
        .await?;
    println!(
        "    up in the registry after {:.1} s",
        started.elapsed().as_secs_f32()
    );

    let started = Instant::now();
    for (i, (id, _)) in SERVERS.iter().enumerate() {
        let (args, pid) = spawn_app(fleet, bins, *id, &ports, &url, &certs)?;
        println!("  $ iim-appserver {}", args.join(" "));
        println!(
            "    pid {pid}, admin API at http://127.0.0.1:{}, clients at ws://127.0.0.1:{}/ws",
            ports.app_http[i], ports.client[i]
        );
    }
    println!("  (no --exchange flag: each app server looks the exchange up in the registry)");
    let addrs: Vec<String> = ports
        .app_http
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    fleet
        .wait_until(
            "the app servers to answer /admin/health and show up in the registry",
            async || apps_ready(&registry, &servers, &addrs).await,
        )
        .await?;
    println!(
        "  all three answer and are up after {:.1} s; logs in {}",
        started.elapsed().as_secs_f32(),
        logs.display()
    );

    section(&format!(
        "4. The registry (iimctl servers --database {url})"
    ));
    print!("{}", indent(&servers_table(&registry).await?));

    section(
        "5. User 1001 on server 1 sends to 1002 (server 1), 2001 (server 2) and 3001 (server 3)",
    );
    let text = "hello from 1001";
    let to = [1002, 2001, 3001];
    println!(
        "  $ iimctl send --server-http {} --from 1001 --to 1002,2001,3001 --text {text:?}",
        addrs[0]
    );
    let report = crate::send_message(&addrs[0], 1001, &to, text, SEND_TIMEOUT).await?;
    print!("{}", indent(&report.render()));
    if report.local_delivered != 1 {
        problems.push(format!(
            "expected 1 local delivery on server 1, the report says {}",
            report.local_delivered
        ));
    }
    for server in [2, 3] {
        match report.status_of(server) {
            Some("delivered") => {}
            other => problems.push(format!(
                "expected server {server} delivered, the report says {}",
                other.unwrap_or("nothing")
            )),
        }
    }
    println!();
    println!(
        "  What the demo connections logged (grep received {}/*.log):",
        logs.display()
    );
    let expected = [(1, 1002), (2, 2001), (3, 3001)];
    let lines = received_lines(&logs, &report.id, &expected).await;
    for (server, user) in expected {
        match lines.iter().find(|(s, u, _)| (*s, *u) == (server, user)) {
            Some((_, _, line)) => println!("    server-{server}.log: {line}"),
            None => {
                println!("    server-{server}.log: (nothing for user {user})");
                problems.push(format!(
                    "user {user} on server {server} logged no received line for message {}",
                    report.id
                ));
            }
        }
    }
    println!(
        "  Each user got message {} addressed to (0,0): \"the receiving client itself\".",
        report.id
    );

    section("6. Stop app server 3 (SIGTERM) and look again");
    let stop = fleet.stop("server-3").await;
    println!("  {}", stop.line);
    if !stop.clean {
        problems.push(stop.line.clone());
    }
    let records = registry.servers().await?;
    print!("{}", indent(&view::servers_table(&records, now_ms())));
    match records.iter().find(|s| s.id.0 == 3).map(|s| s.state) {
        Some(ServerState::Down) => {}
        other => problems.push(format!(
            "after a clean stop server 3 should read down, the registry says {}",
            other.map_or("no row".to_owned(), |s| s.to_string())
        )),
    }
    println!(
        "  Server 3 drained and marked itself down, which also removed its sessions: user 3001 \
         is offline now, so a send to 2001 and 3001 only targets server 2:"
    );
    let report =
        crate::send_message(&addrs[0], 1001, &[2001, 3001], "still there?", SEND_TIMEOUT).await?;
    print!("{}", indent(&report.render()));
    if report.sessions != 1 || report.status_of(2) != Some("delivered") || report.servers.len() != 1
    {
        problems.push(format!(
            "with server 3 down, expected one session on server 2 delivered, got {report:?}"
        ));
    }

    section("7. Start app server 3 again");
    let (_, pid) = spawn_app(fleet, bins, 3, &ports, &url, &certs)?;
    fleet
        .wait_until("server 3 to come back", async || {
            apps_ready(&registry, &[3], &addrs[2..3]).await
        })
        .await?;
    let epoch = registry
        .server(iim::ServerId(3))
        .await?
        .map_or(0, |s| s.epoch);
    println!("  server 3 is back (pid {pid}) with a new epoch, {epoch}");
    if epoch < 2 {
        problems.push(format!("server 3 restarted with epoch {epoch}, expected 2"));
    }

    let chat: Vec<String> = ports
        .client
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    chat_steps(&chat, team, &mut problems).await?;

    section("10. Done");
    if opts.keep_running {
        keep_running(fleet, &url, &addrs, &chat).await?;
    } else {
        println!(
            "  Run again with --keep-running to leave the servers up and chat from two terminals."
        );
    }

    if problems.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!();
    println!("The demo did not go as expected:");
    for p in &problems {
        println!("  - {p}");
    }
    println!("Read the logs in {}.", logs.display());
    Ok(ExitCode::FAILURE)
}

/// Prints what to try and waits until a server dies (an error) or iimctl
/// is interrupted (handled by [`run`]).
async fn keep_running(
    fleet: &mut Fleet,
    url: &str,
    addrs: &[String],
    chat: &[String],
) -> anyhow::Result<()> {
    let me = me();
    println!("  Everything keeps running. Chat from two terminals:");
    println!("    {me} chat --server {} --user 1001", chat[0]);
    println!("    {me} chat --server {} --user 2001", chat[1]);
    println!("  then type /to 2001 in the first and a line of text; /help lists the commands.");
    if std::env::var_os("IIM_JWT_SECRET").is_some() {
        println!("  (unset IIM_JWT_SECRET first: these servers use the development secret)");
    }
    println!("  Or try:");
    println!(
        "    {me} send --server-http {} --from 2001 --to 1001,3001 --text hi",
        addrs[1]
    );
    println!("    {me} servers --database {url}");
    println!("    {me} sessions --database {url}");
    println!("    tail -f {}/server-1.log", fleet.logs.display());
    println!("  Press Ctrl-C to stop.");
    loop {
        fleet.check_alive()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Steps 8 and 9: users chatting through `iimctl chat` processes, one to
/// one across two servers, then in the small group "team".
async fn chat_steps(chat: &[String], team: u64, problems: &mut Vec<String>) -> anyhow::Result<()> {
    section("8. Chat: user 1001 on server 1 writes to user 2001 on server 2, over WebSocket");
    println!("  A user connects to any app server's client endpoint with a token (iimctl token);");
    println!("  a message is stored, acknowledged with its seq, then pushed through the exchange.");
    let texts = [
        "hi Carol, Alice here on server 1",
        "the exchange carried this to server 2",
    ];
    let receiver = ChatProc::receiver(&chat[1], 2001).await?;
    let input = format!("/to 2001\n{}\n{}\n", texts[0], texts[1]);
    let sender = ChatProc::sender(&chat[0], 1001, &input)?;
    let sent = sender
        .finish("the sender, user 1001 on server 1", problems)
        .await;
    let acks = sent.iter().filter(|l| l.starts_with("sent, seq ")).count();
    if acks != 2 {
        problems.push(format!("the 1:1 sender printed {acks} acks, expected 2"));
    }
    let got = receiver
        .finish("the receiver, user 2001 on server 2", problems)
        .await;
    for text in texts {
        expect_line(
            &got,
            "user 2001",
            "[seq ",
            &format!("1001 → you: {text}"),
            problems,
        );
    }

    section(&format!(
        "9. A group: user 3001 on server 3 writes to \"team\" (group {team}: 1001, 2001, 3001)"
    ));
    println!(
        "  A small group's message gets a seq in every member's inbox; the history shows step 8."
    );
    let alice = ChatProc::receiver(&chat[0], 1001).await?;
    let carol = ChatProc::receiver(&chat[1], 2001).await?;
    let text = "hello team, Erin here on server 3";
    let sender = ChatProc::sender(&chat[2], 3001, &format!("/group {team}\n{text}\n"))?;
    let sent = sender
        .finish("the sender, user 3001 on server 3", problems)
        .await;
    if !sent.iter().any(|l| l.starts_with("sent, seq ")) {
        problems.push("the group sender printed no ack".to_owned());
    }
    let start = format!("[group {team}, seq ");
    let end = format!("3001: {text}");
    for (proc, user, server) in [(alice, 1001, 1), (carol, 2001, 2)] {
        let got = proc
            .finish(
                &format!("the receiver, user {user} on server {server}"),
                problems,
            )
            .await;
        expect_line(&got, &format!("user {user}"), &start, &end, problems);
    }
    Ok(())
}

/// A live line (not history) starting with `start` and ending with `end`.
fn expect_line(lines: &[String], who: &str, start: &str, end: &str, problems: &mut Vec<String>) {
    if !lines
        .iter()
        .any(|l| l.starts_with(start) && l.ends_with(end))
    {
        problems.push(format!("{who} did not print a line \"{start}…] {end}\""));
    }
}

/// An `iimctl chat` child (this binary), its output collected line by line.
struct ChatProc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: JoinSet<()>,
}

impl ChatProc {
    /// A user that prints what it receives for [`CHAT_WAIT_SECS`]; returns
    /// once it is connected and has printed its history.
    async fn receiver(server: &str, user: u64) -> anyhow::Result<ChatProc> {
        let wait = CHAT_WAIT_SECS.to_string();
        println!("  $ iimctl chat --server {server} --user {user} --wait-secs {wait} &");
        let mut proc = ChatProc::start(server, user, &["--wait-secs", &wait], None)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !proc.output().iter().any(|l| l.starts_with("ready")) {
            if Instant::now() >= deadline || proc.child.try_wait()?.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(proc)
    }

    /// A user that sends `input` and exits once every send is acknowledged.
    fn sender(server: &str, user: u64, input: &str) -> anyhow::Result<ChatProc> {
        println!(
            "  $ printf '{}' | iimctl chat --server {server} --user {user} --exit-after-input",
            input.replace('\n', "\\n")
        );
        ChatProc::start(server, user, &["--exit-after-input"], Some(input))
    }

    fn start(
        server: &str,
        user: u64,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<ChatProc> {
        let me = std::env::current_exe().context("cannot locate the iimctl binary")?;
        let mut cmd = tokio::process::Command::new(me);
        cmd.args(["chat", "--server", server, "--user", &user.to_string()])
            .args(args)
            .env_remove("IIM_JWT_SECRET")
            .env_remove("RUST_LOG")
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("cannot start iimctl chat")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = JoinSet::new();
        if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
            let input = input.to_owned();
            readers.spawn(async move {
                let _ = stdin.write_all(input.as_bytes()).await;
            });
        }
        if let Some(out) = child.stdout.take() {
            readers.spawn(collect_lines(out, lines.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.spawn(collect_lines(err, lines.clone()));
        }
        Ok(ChatProc {
            child,
            lines,
            readers,
        })
    }

    fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for it to exit, prints its output under `title`, and returns
    /// the output.
    async fn finish(mut self, title: &str, problems: &mut Vec<String>) -> Vec<String> {
        let limit = Duration::from_secs(CHAT_WAIT_SECS + 20);
        let failed = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => None,
            Ok(Ok(status)) => Some(status.to_string()),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => {
                let _ = self.child.kill().await;
                Some(format!("still running after {} s, killed", limit.as_secs()))
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.readers.join_next().await.is_some() {}
        })
        .await;
        let lines = self.output();
        println!("  {title}:");
        for line in &lines {
            println!("    {line}");
        }
        if let Some(how) = failed {
            problems.push(format!("iimctl chat for {title} ended with {how}"));
        }
        lines
    }
}

/// Appends each line `stream` yields to `lines`.
async fn collect_lines(stream: impl tokio::io::AsyncRead + Unpin, lines: Arc<Mutex<Vec<String>>>) {
    let mut reader = tokio::io::BufReader::new(stream).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

fn common_args(url: &str, certs: &Path) -> Vec<String> {
    vec![
        "--database".to_owned(),
        url.to_owned(),
        "--certs".to_owned(),
        certs.display().to_string(),
    ]
}

fn spawn_app(
    fleet: &mut Fleet,
    bins: &Binaries,
    id: u32,
    ports: &Ports,
    url: &str,
    certs: &Path,
) -> anyhow::Result<(Vec<String>, u32)> {
    let i = SERVERS
        .iter()
        .position(|(s, _)| *s == id)
        .context("not a demo server")?;
    let users = SERVERS
        .iter()
        .find(|(s, _)| *s == id)
        .map(|(_, u)| u.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    let mut args = vec!["--id".to_owned(), id.to_string()];
    args.extend(common_args(url, certs));
    args.extend([
        "--http-listen".to_owned(),
        format!("127.0.0.1:{}", ports.app_http[i]),
        "--client-listen".to_owned(),
        format!("127.0.0.1:{}", ports.client[i]),
        "--demo-users".to_owned(),
        users,
    ]);
    let first = !fleet.spawned.contains(&format!("server-{id}"));
    let pid = fleet.spawn(&format!("server-{id}"), &bins.app, &args, first)?;
    Ok((args, pid))
}

/// Every listed app server answers `GET /admin/health` and reads `up`.
async fn apps_ready(registry: &Registry, ids: &[u32], addrs: &[String]) -> anyhow::Result<bool> {
    for addr in addrs {
        match crate::http::get(addr, "/admin/health", Duration::from_secs(1)).await {
            Ok(r) if r.is_success() => {}
            Ok(r) => bail!("{addr}/admin/health answered HTTP {}", r.status),
            Err(_) => return Ok(false),
        }
    }
    let servers = registry.servers().await?;
    Ok(ids.iter().all(|id| {
        servers
            .iter()
            .any(|s| s.id.0 == *id && s.role == Role::App && s.state == ServerState::Up)
    }))
}

async fn servers_table(registry: &Registry) -> anyhow::Result<String> {
    Ok(view::servers_table(&registry.servers().await?, now_ms()))
}

/// The `received` lines for message `id` in the servers' logs, as
/// (server, user, line), waiting up to 2 s for all of `expected` to appear.
async fn received_lines(logs: &Path, id: &str, expected: &[(u32, u64)]) -> Vec<(u32, u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut found = Vec::new();
        for &(server, _) in expected {
            let text = std::fs::read_to_string(logs.join(format!("server-{server}.log")))
                .unwrap_or_default();
            for line in text.lines().map(strip_ansi) {
                if line.contains("received") && mentions(&line, "id=", id) {
                    let user = user_of(&line).unwrap_or(0);
                    found.push((server, user, without_timestamp(&line)));
                }
            }
        }
        let complete = expected
            .iter()
            .all(|&(s, u)| found.iter().any(|(fs, fu, _)| (*fs, *fu) == (s, u)));
        if complete || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `line` holds `key` immediately followed by exactly `value`.
fn mentions(line: &str, key: &str, value: &str) -> bool {
    line.match_indices(key).any(|(i, _)| {
        let rest = &line[i + key.len()..];
        rest.strip_prefix(value)
            .is_some_and(|after| after.is_empty() || after.starts_with([' ', '}', ',']))
    })
}

/// The `user=N` of the demo connection's span.
fn user_of(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once("user=")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn without_timestamp(line: &str) -> String {
    match line.split_once(' ') {
        Some((first, rest)) if first.ends_with('Z') && first.contains('T') => {
            rest.trim().to_owned()
        }
        _ => line.trim().to_owned(),
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case a child logs
/// in colour despite NO_COLOR.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn section(title: &str) {
    println!();
    println!("== {title}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// How to run this binary, from the current directory.
fn me() -> String {
    std::env::current_exe()
        .ok()
        .map(|p| shorten(&p))
        .unwrap_or_else(|| "iimctl".to_owned())
}

/// A path relative to the current directory when it is below it.
fn shorten(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_owned())
        .display()
        .to_string()
}

/// The daemons built next to iimctl.
struct Binaries {
    exchange: PathBuf,
    app: PathBuf,
}

impl Binaries {
    fn find() -> anyhow::Result<Binaries> {
        let me = std::env::current_exe().context("cannot locate the iimctl binary")?;
        let dir = me.parent().context("iimctl binary has no directory")?;
        let find = |name: &str| {
            let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
            if path.is_file() {
                Ok(path)
            } else {
                bail!(
                    "{} not found next to iimctl; run `cargo build --bins` (or scripts/demo) first",
                    path.display()
                )
            }
        };
        Ok(Binaries {
            exchange: find("iim-exchange")?,
            app: find("iim-appserver")?,
        })
    }
}

/// Free loopback ports, found by binding port 0 and letting go. Another
/// process could take one in between; on this demo's scale that is rare
/// and shows as a clear "cannot listen" in a log.
struct Ports {
    quic: u16,
    exchange_http: u16,
    app_http: [u16; 3],
    /// The app servers' client (WebSocket) endpoints.
    client: [u16; 3],
}

impl Ports {
    fn pick() -> anyhow::Result<Ports> {
        // Hold every socket until all are picked so no port comes up twice.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").context("no free UDP port")?;
        let tcp = (0..7)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()
            .context("no free TCP port")?;
        let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port());
        Ok(Ports {
            quic: udp.local_addr()?.port(),
            exchange_http: port(&tcp[0])?,
            app_http: [port(&tcp[1])?, port(&tcp[2])?, port(&tcp[3])?],
            client: [port(&tcp[4])?, port(&tcp[5])?, port(&tcp[6])?],
        })
    }
}

struct Node {
    name: String,
    log: PathBuf,
    child: Child,
}

/// The demo's child processes. Each is killed when dropped, as a last
/// resort; [`Fleet::stop_all`] stops them gracefully.
#[derive(Default)]
struct Fleet {
    logs: PathBuf,
    nodes: Vec<Node>,
    /// Names ever started (a restart appends to the log).
    spawned: Vec<String>,
}

/// How one child stopped.
struct Stopped {
    clean: bool,
    line: String,
}

impl Fleet {
    /// Starts `program` with output to `<logs>/<name>.log` (truncated when
    /// `fresh_log`); returns its pid.
    fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        fresh_log: bool,
    ) -> anyhow::Result<u32> {
        let log = self.logs.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(!fresh_log)
            .truncate(fresh_log)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id().unwrap_or_default();
        self.nodes.push(Node {
            name: name.to_owned(),
            log,
            child,
        });
        self.spawned.push(name.to_owned());
        Ok(pid)
    }

    /// An error naming the first child that exited, with its log's tail.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if let Some(status) = node.child.try_wait()? {
                bail!(
                    "{} exited unexpectedly ({status}); end of {}:\n{}",
                    node.name,
                    node.log.display(),
                    tail(&node.log, 15).trim_end()
                );
            }
        }
        Ok(())
    }

    /// Polls `ready` until it holds, a child dies, or [`START_TIMEOUT`].
    async fn wait_until(
        &mut self,
        what: &str,
        mut ready: impl AsyncFnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = None;
        loop {
            self.check_alive()?;
            match ready().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_error = Some(format!("{e:#}")),
            }
            if Instant::now() >= deadline {
                let logs = self
                    .nodes
                    .iter()
                    .map(|n| n.log.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let cause = last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                bail!(
                    "timed out after {} s waiting for {what}{cause}; read the logs: {logs}",
                    START_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(&mut self, name: &str) -> Stopped {
        match self.nodes.iter().position(|n| n.name == name) {
            Some(i) => stop_node(self.nodes.remove(i)).await,
            None => Stopped {
                clean: false,
                line: format!("{name} is not running"),
            },
        }
    }

    /// App servers first, so they drain against a live exchange, then the
    /// exchange. Returns whether every child stopped on SIGTERM with success.
    async fn stop_all(&mut self) -> bool {
        let (exchanges, apps): (Vec<Node>, Vec<Node>) = self
            .nodes
            .drain(..)
            .partition(|n| n.name.starts_with("exchange"));
        let mut clean = true;
        for group in [apps, exchanges] {
            let mut set = JoinSet::new();
            for node in group {
                set.spawn(stop_node(node));
            }
            for stopped in set.join_all().await {
                println!("  {}", stopped.line);
                clean &= stopped.clean;
            }
        }
        clean
    }
}

/// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL.
async fn stop_node(mut node: Node) -> Stopped {
    match node.child.try_wait() {
        Ok(Some(status)) => {
            return Stopped {
                clean: false,
                line: format!("{} had already exited ({status})", node.name),
            };
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(node = %node.name, error = %e, "try_wait failed"),
    }
    let started = Instant::now();
    if let Some(pid) = node.child.id() {
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if !sent.is_ok_and(|s| s.success()) {
            tracing::debug!(node = %node.name, pid, "kill -TERM failed (already gone?)");
        }
    }
    match tokio::time::timeout(STOP_TIMEOUT, node.child.wait()).await {
        Ok(Ok(status)) => Stopped {
            clean: status.success(),
            line: format!(
                "{} stopped in {:.1} s ({status})",
                node.name,
                started.elapsed().as_secs_f32()
            ),
        },
        Ok(Err(e)) => Stopped {
            clean: false,
            line: format!("{}: cannot wait for it: {e}", node.name),
        },
        Err(_) => {
            let _ = node.child.kill().await;
            Stopped {
                clean: false,
                line: format!(
                    "{} did not stop within {} s of SIGTERM and was killed; see {}",
                    node.name,
                    STOP_TIMEOUT.as_secs(),
                    node.log.display()
                ),
            }
        }
    }
}

/// The last `n` lines of a log, indented, without colour.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {}\n", strip_ansi(l)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_received_lines_for_one_message() {
        let line = "2025-01-01T00:00:00.123456Z  INFO demo{server=2 user=2001}: received \
                    id=1.1.1 from=(1,1001) target=(0,0) text=hi";
        assert!(mentions(line, "id=", "1.1.1"));
        assert!(!mentions(line, "id=", "1.1.10"));
        assert!(!mentions(line, "id=", "1.1"));
        assert_eq!(user_of(line), Some(2001));
        assert!(without_timestamp(line).starts_with("INFO demo{server=2"));
    }

    #[test]
    fn strips_colour() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2025  INFO x"
        );
    }
}
