//! `iimctl demo`: the newcomer's tour on the embedded defaults.
//!
//! Starts two real `iim-exchange` and three `iim-appserver` processes (the
//! binaries built next to iimctl) on loopback, with a fresh SQLite registry
//! holding the demo directory (`iimctl demo-data`) and development
//! certificates; sends one message across all three servers (server 1 on
//! one exchange, servers 2 and 3 on the other, so it crosses the link
//! between the exchanges), kills the second exchange and sends again
//! through the first, stops one server and starts it again, then runs
//! `iimctl chat` clients (this binary) on different servers chatting one
//! to one and in a group ([`chat`]), and stops everything. The app servers
//! find their exchange through the registry. The deployment and its processes are the test
//! kit's (`iim_kit::deploy`); every child is stopped with SIGTERM (then
//! killed after a grace period) however iimctl ends.

mod chat;
mod logs;

use crate::view;
use anyhow::Context;
use iim::registry::{Registry, Role, ServerState};
use iim::types::now_ms;
use iim_http::admin::{SendRequest, SendResponse};
use iim_http::client::Client;
use iim_kit::deploy::{Deployment, Spec};
use iim_kit::proc::Binaries;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::time::Instant;

/// The exchanges; server 1 prefers the first, servers 2 and 3 the second.
const EXCHANGES: [u32; 2] = [100, 101];
/// App servers and their demo users.
const SERVERS: [(u32, &[u64]); 3] = [(1, &[1001, 1002]), (2, &[2001, 2002]), (3, &[3001])];
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const SEND_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the demo waits for the deployment to settle after a change.
const WAIT: Duration = Duration::from_secs(30);

pub struct Options {
    pub dir: PathBuf,
    pub keep_running: bool,
}

pub async fn run(opts: Options) -> anyhow::Result<ExitCode> {
    let bins = Binaries::next_to_me("cargo build --bins, or scripts/demo")?;
    let mut slot = None;
    let outcome = tokio::select! {
        r = script(&opts, bins, &mut slot) => r,
        _ = iim::telemetry::wait_for_signal() => {
            println!("\ninterrupted");
            Ok(ExitCode::from(130))
        }
    };
    let Some(dep) = slot.as_mut().filter(|d: &&mut Deployment| d.is_running()) else {
        return outcome;
    };
    // Say what went wrong before the stop messages, not after them.
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("\niimctl: {e:#}");
            ExitCode::FAILURE
        }
    };
    section("Stopping everything (SIGTERM, app servers first)");
    let mut clean = true;
    for stopped in dep.stop_all(STOP_TIMEOUT).await {
        println!("  {stopped}");
        clean &= stopped.clean();
    }
    if !clean && code == ExitCode::SUCCESS {
        return Ok(ExitCode::FAILURE);
    }
    Ok(code)
}

/// The demo proper; the deployment goes into `slot` as soon as it exists,
/// so [`run`] stops it however this ends. Returns the exit code; problems
/// found on the way are printed and make it non-zero without stopping the
/// tour.
async fn script(
    opts: &Options,
    bins: Binaries,
    slot: &mut Option<Deployment>,
) -> anyhow::Result<ExitCode> {
    let dir = &opts.dir;
    let db = dir.join("registry.db");
    let url = format!("sqlite://{}", db.display());
    let mut problems = Vec::new();

    println!(
        "iim demo: two exchanges and three app servers on this machine, sharing a SQLite registry."
    );

    section("1. Certificates: a development CA and one certificate per server");
    let mut spec = Spec::new(dir, &url, bins);
    spec.exchanges = EXCHANGES.to_vec();
    spec.servers = SERVERS.iter().map(|(id, _)| *id).collect();
    spec.attach = SERVERS
        .iter()
        .map(|(id, _)| (*id, if *id == 1 { EXCHANGES[0] } else { EXCHANGES[1] }))
        .collect();
    spec.demo_users = SERVERS.iter().map(|(id, u)| (*id, u.to_vec())).collect();
    spec.admin_senders = SERVERS
        .iter()
        .flat_map(|(_, u)| u.iter().copied())
        .collect();
    spec.name_exchange = false;
    let dep = slot.insert(Deployment::new(spec).context("cannot prepare the demo")?);
    println!("  {}", crate::ca_line(dep.certs_dir(), dep.certs_written()));
    let names: Vec<String> = EXCHANGES
        .iter()
        .map(|x| format!("exchange-{x}"))
        .chain(SERVERS.iter().map(|(id, _)| format!("server-{id}")))
        .collect();
    println!(
        "  issued {} (.pem and .key; each names its server, e.g. DNS server-1.iim)",
        names.join(", ")
    );

    section("2. Registry: a fresh SQLite database");
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

    section("3. Start the two exchanges, then the app servers");
    let started = Instant::now();
    for x in EXCHANGES {
        let pid = dep.start_exchange(x)?;
        println!("  $ iim-exchange {}", dep.exchange_args(x).join(" "));
        let a = dep.exchange(x);
        println!(
            "    pid {pid}, QUIC on {}, metrics at http://{}/metrics",
            a.quic, a.http
        );
    }
    dep.wait_exchanges(&EXCHANGES).await?;
    println!(
        "    both up in the registry after {:.1} s; they find each other there and link \
         (the lower id dials)",
        started.elapsed().as_secs_f32()
    );

    let started = Instant::now();
    for (id, _) in SERVERS {
        let pid = dep.start_server(id)?;
        let a = dep.server(id);
        println!("  $ iim-appserver {}", dep.server_args(id).join(" "));
        println!(
            "    pid {pid}, admin API at http://{}, metrics at http://{}/metrics, clients at ws://{}/ws",
            a.admin, a.http, a.ws
        );
    }
    println!(
        "  (no --exchange flag: each app server chooses its exchange from the registry, \
         --prefer-exchange first)"
    );
    let ids: Vec<u32> = SERVERS.iter().map(|(id, _)| *id).collect();
    dep.wait_servers(&ids).await?;
    println!(
        "  all three answer and are up after {:.1} s; logs in {}",
        started.elapsed().as_secs_f32(),
        dep.logs_dir().display()
    );
    wait_for(
        "each server on its preferred exchange, the exchanges linked",
        async || {
            let attached = attachments(&registry).await?;
            Ok(attached == [(1, 100), (2, 101), (3, 101)] && linked(&registry, &EXCHANGES).await?)
        },
    )
    .await?;

    section(&format!(
        "4. The registry (iimctl servers --database {url})"
    ));
    print!("{}", indent(&servers_table(&registry).await?));
    println!("  Server 1 is attached to exchange 100, servers 2 and 3 to exchange 101.");

    section(
        "5. User 1001 on server 1 sends to 1002 (server 1), 2001 (server 2) and 3001 (server 3)",
    );
    println!(
        "  One 905 to exchange 100, one relay frame to exchange 101 with the rows of servers \
         2 and 3, one 906 to each of them; the reports come back the same way:"
    );
    let admin = dep.admin(1, SEND_TIMEOUT)?;
    let text = "hello from 1001";
    println!(
        "  $ iimctl send --admin {} --admin-token-file {} --from 1001 --to 1002,2001,3001 --text {text:?}",
        dep.server(1).admin,
        dep.admin_token_file().display()
    );
    let report = send(&admin, &[1002, 2001, 3001], text).await?;
    print!("{}", indent(&view::render_report(&report)));
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
        dep.logs_dir().display()
    );
    let expected = [(1, 1002), (2, 2001), (3, 3001)];
    let lines = logs::received_lines(dep, &report.id, &expected).await;
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

    section("6. Kill exchange 101 (SIGKILL) and send again");
    let relays = relay_frames(dep, EXCHANGES[0], EXCHANGES[1]).await;
    let name = iim_kit::deploy::exchange_name(EXCHANGES[1]);
    let pid = dep
        .pids()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| p);
    dep.kill_exchange(EXCHANGES[1]).await;
    let killed = Instant::now();
    println!("  $ kill -9 {}", pid.map_or(name, |p| p.to_string()));
    wait_for("servers 2 and 3 to attach to exchange 100", async || {
        Ok(attachments(&registry).await? == [(1, 100), (2, 100), (3, 100)])
    })
    .await?;
    println!(
        "  servers 2 and 3 noticed (QUIC idle timeout) and attached to exchange 100 after {:.1} s:",
        killed.elapsed().as_secs_f32()
    );
    print!("{}", indent(&servers_table(&registry).await?));
    println!("  The same send, now through exchange 100 alone:");
    let report = send(&admin, &[1002, 2001, 3001], text).await?;
    print!("{}", indent(&view::render_report(&report)));
    if !report.all_delivered() || report.servers.len() != 2 {
        problems.push(format!(
            "after exchange 101 died, expected servers 2 and 3 delivered, got {report:?}"
        ));
    }
    let after = relay_frames(dep, EXCHANGES[0], EXCHANGES[1]).await;
    if after != relays {
        problems.push(format!(
            "exchange 100 relayed to the dead exchange 101: {relays:?} frames before, {after:?} after"
        ));
    }
    let pid = dep.start_exchange(EXCHANGES[1])?;
    dep.wait_exchanges(&EXCHANGES[1..]).await?;
    wait_for("the exchanges to link again", async || {
        linked(&registry, &EXCHANGES).await
    })
    .await?;
    println!(
        "  exchange 101 started again (pid {pid}) and linked to 100; servers 2 and 3 stay on 100 \
         until they next reconnect"
    );

    section("7. Stop app server 3 (SIGTERM) and look again");
    match dep.stop_server(3, STOP_TIMEOUT).await {
        Some(stop) => {
            println!("  {stop}");
            if !stop.clean() {
                problems.push(stop.to_string());
            }
        }
        None => problems.push("server-3 is not running".to_owned()),
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
    let report = send(&admin, &[2001, 3001], "still there?").await?;
    print!("{}", indent(&view::render_report(&report)));
    if report.sessions != 1 || report.status_of(2) != Some("delivered") || report.servers.len() != 1
    {
        problems.push(format!(
            "with server 3 down, expected one session on server 2 delivered, got {report:?}"
        ));
    }

    section("8. Start app server 3 again");
    let pid = dep.start_server(3)?;
    dep.wait_servers(&[3]).await?;
    let epoch = registry
        .server(iim::ServerId(3))
        .await?
        .map_or(0, |s| s.epoch);
    println!("  server 3 is back (pid {pid}) with a new epoch, {epoch}");
    if epoch < 2 {
        problems.push(format!("server 3 restarted with epoch {epoch}, expected 2"));
    }

    let clients: Vec<String> = ids.iter().map(|&id| dep.ws(id).to_string()).collect();
    chat::steps(dep.logs_dir(), &clients, team, &mut problems).await?;

    section("11. Done");
    if opts.keep_running {
        keep_running(dep, &url, &clients).await?;
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
    println!("Read the logs in {}.", dep.logs_dir().display());
    Ok(ExitCode::FAILURE)
}

/// `POST /admin/send` from user 1001.
async fn send(admin: &Client, to: &[u64], text: &str) -> anyhow::Result<SendResponse> {
    let req = SendRequest {
        from: 1001,
        to: to.to_vec(),
        text: text.to_owned(),
    };
    admin.send(&req).await.map_err(crate::refused)
}

/// Prints what to try and waits until a server dies (an error) or iimctl
/// is interrupted (handled by [`run`]).
async fn keep_running(dep: &mut Deployment, url: &str, clients: &[String]) -> anyhow::Result<()> {
    let me = me();
    println!("  Everything keeps running. Chat in a browser: open a server's web chat and");
    println!("  pick a demo user (these servers use the development secret):");
    for (id, _) in SERVERS {
        println!("    server {id}: http://{}/", dep.ws(id));
    }
    println!(
        "  (add ?servers={} to a page's URL and it fails over to those servers too)",
        clients.join(",")
    );
    println!("  Or from two terminals:");
    println!("    {me} chat --server {} --user 1001", clients[0]);
    println!("    {me} chat --server {} --user 2001", clients[1]);
    println!("  then type /to 2001 in the first and a line of text; /help lists the commands.");
    if std::env::var_os("IIM_JWT_SECRET").is_some() {
        println!("  (unset IIM_JWT_SECRET first: these servers use the development secret)");
    }
    println!("  Or try:");
    println!(
        "    {me} send --admin {} --admin-token-file {} --from 2001 --to 1001,3001 --text hi",
        dep.server(2).admin,
        dep.admin_token_file().display()
    );
    println!("    {me} servers --database {url}");
    println!("    {me} sessions --database {url}");
    println!("    tail -f {}", dep.log("server-1").display());
    println!("  Press Ctrl-C to stop.");
    loop {
        dep.check()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `iimctl servers`: the servers table, then the links between exchanges.
async fn servers_table(registry: &Registry) -> anyhow::Result<String> {
    let servers = registry.servers().await?;
    let links = registry.exchange_links().await?;
    Ok(format!(
        "{}\n{}",
        view::servers_table(&servers, now_ms()),
        view::links_table(&servers, &links)
    ))
}

/// (app server, exchange) of every app server that is up.
async fn attachments(registry: &Registry) -> anyhow::Result<Vec<(u32, u32)>> {
    Ok(registry
        .servers()
        .await?
        .iter()
        .filter(|s| s.role == Role::App && s.state == ServerState::Up)
        .filter_map(|s| Some((s.id.0, s.exchange?.0)))
        .collect())
}

/// Every exchange in `ids` recorded a link to every other.
async fn linked(registry: &Registry, ids: &[u32]) -> anyhow::Result<bool> {
    let links = registry.exchange_links().await?;
    Ok(ids.iter().all(|a| {
        ids.iter()
            .filter(|b| *b != a)
            .all(|b| links.iter().any(|l| l.exchange.0 == *a && l.peer.0 == *b))
    }))
}

/// How many relay frames exchange `from` has sent to `to` (its metrics).
async fn relay_frames(dep: &Deployment, from: u32, to: u32) -> Option<f64> {
    let page = Client::new(&dep.exchange_http(from).to_string(), SEND_TIMEOUT)
        .ok()?
        .metrics()
        .await
        .ok()?;
    let series = format!("iim_exchange_peer_relay_frames_out_total{{peer=\"{to}\"}}");
    iim_http::client::metric_value(&page, &series)
}

/// Ask `ready` until it holds; an error after [`WAIT`].
async fn wait_for(
    what: &str,
    ready: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    iim_kit::poll_until(WAIT, ready)
        .await
        .with_context(|| format!("waiting for {what}"))
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
