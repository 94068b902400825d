//! How fast failures are detected at the daemons' default timing, and
//! whether a loaded machine makes up failures that did not happen.
//!
//! Real processes (an exchange and three app servers from `target/`), real
//! WebSocket clients; users 11, 21 and 31 are colleagues on servers 1, 2
//! and 3. Three measurements:
//!
//! 1. `kill -9` of app server 2 → user 11 on server 1 sees 21 offline
//!    (QUIC idle timeout + lease at the exchange + presence repair).
//! 2. `kill -9` of the exchange, restarted at once → a message 11 sends
//!    right after the kill is pushed to 31 on server 3 (both servers notice,
//!    reconnect and register; the origin resends).
//! 3. `--soak-secs S`: for S seconds, `--burners` threads spin on every
//!    core while 11 and 21 chat without pause; afterwards the exchange's
//!    `iim_exchange_servers_marked_down_total` (must be 0: nobody died) and
//!    every server's re-registrations are read from their metrics.
//!
//! `--exchanges N` runs N exchanges (100, 101, ...), app server `s`
//! preferring the `s`-th (round robin) and finding it in the registry;
//! measurement 2 then kills the exchange the sender's server is attached
//! to, and the receiver's, in turn (the servers re-attach to another one),
//! and the soak counts mark-downs and unreachable peers over every
//! exchange.
//!
//! With `--leave-down` the killed exchange stays down until the push has
//! gone through another exchange: the time then covers noticing the loss
//! (QUIC idle timeout), choosing another exchange in the registry,
//! attaching, and the origin's resend.
//!
//! `--idle-ms`, `--keep-alive-ms` and `--lease-secs` override the defaults
//! (to compare settings in one sitting). The registry is MariaDB when
//! `IIM_TEST_MYSQL_URL` is set, else SQLite.
//!
//!     cargo build --release --workspace --bins
//!     target/release/failover-probe --kills 10 --soak-secs 600

use anyhow::{Context, bail};
use clap::Parser;
use iim::registry::Registry;
use iim::store::{Store, User};
use iim::types::UserId;
use iim_kit::TestDb;
use iim_kit::client::{ChatClient, Frame, Ope};
use iim_kit::deploy::{Deployment, Spec};
use iim_kit::proc::Binaries;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    about = "Failure detection times at the default timing, and spurious mark-downs under load"
)]
struct Args {
    /// Kills of app server 2, and of the exchange, each.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Seconds of chat under CPU load (0: skip).
    #[arg(long, default_value_t = 0)]
    soak_secs: u64,
    /// Threads spinning during the soak (default: two per core).
    #[arg(long)]
    burners: Option<usize>,
    /// Override `[quic] idle_timeout_ms` of every daemon.
    #[arg(long)]
    idle_ms: Option<u64>,
    /// Override `[quic] keep_alive_ms` of every daemon.
    #[arg(long)]
    keep_alive_ms: Option<u64>,
    /// Override the exchange's `lease_secs`.
    #[arg(long)]
    lease_secs: Option<u64>,
    /// How many exchanges.
    #[arg(long, default_value_t = 1)]
    exchanges: u32,
    /// With several exchanges: the killed exchange stays down until the
    /// push has gone through another one (the servers must notice the loss
    /// and re-attach, rather than meet the restarted exchange), then comes
    /// back before the next kill.
    #[arg(long)]
    leave_down: bool,
}

const USERS: [(u64, u32); 3] = [(11, 1), (21, 2), (31, 3)];
const WAIT: Duration = Duration::from_secs(60);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = TestDb::new().await;
    let store = Store::new(&Registry::connect(db.url()).await?);
    for (u, _) in USERS {
        store
            .add_user(&User {
                id: UserId(u),
                name: format!("user{u}"),
                org: "acme".into(),
            })
            .await?;
    }
    let dir = tempfile::tempdir()?;
    let bins = Binaries::next_to_me("cargo build --release --workspace --bins")?;
    let mut spec = Spec::new(dir.path(), db.url(), bins);
    let mut quic = String::new();
    if let Some(ms) = args.idle_ms {
        quic += &format!("idle_timeout_ms = {ms}\n");
    }
    if let Some(ms) = args.keep_alive_ms {
        quic += &format!("keep_alive_ms = {ms}\n");
    }
    let quic = if quic.is_empty() {
        quic
    } else {
        format!("[quic]\n{quic}")
    };
    let lease = args
        .lease_secs
        .map(|s| format!("lease_secs = {s}\n"))
        .unwrap_or_default();
    spec.exchange_toml = format!("{lease}{quic}");
    spec.server_toml = format!(
        "[limits]\nrate_per_sec = 100000\nrate_burst = 100000\nmax_connections_per_ip = 100000\n{quic}"
    );
    spec.jwt_secret = Some(iim_kit::JWT_SECRET.to_owned());
    if args.exchanges == 0 {
        bail!("--exchanges must be at least 1");
    }
    if args.leave_down && args.exchanges < 2 {
        bail!("--leave-down needs --exchanges 2 or more (somewhere to re-attach to)");
    }
    spec.exchanges = (0..args.exchanges).map(|i| 100 + i).collect();
    if args.exchanges > 1 {
        spec.name_exchange = false;
        spec.attach = USERS
            .iter()
            .map(|(_, s)| (*s, spec.exchanges[(*s as usize - 1) % spec.exchanges.len()]))
            .collect();
    }
    let mut dep = Deployment::launch(spec).await.context("deployment")?;
    println!("exchanges: {:?}", dep.spec().exchanges);
    println!(
        "timing: {}",
        if args.idle_ms.is_none() && args.keep_alive_ms.is_none() && args.lease_secs.is_none() {
            "the daemons' defaults".to_string()
        } else {
            format!(
                "idle {:?} ms, keep-alive {:?} ms, lease {:?} s (unset: default)",
                args.idle_ms, args.keep_alive_ms, args.lease_secs
            )
        }
    );

    let mut watcher = client(&dep, 11).await?;
    let mut downs = Vec::new();
    for _ in 0..args.kills {
        let c21 = client(&dep, 21).await?;
        if !watcher
            .await_presence(WAIT, |c| c.status_of(21).0 == "online")
            .await
        {
            bail!("11 never saw 21 online");
        }
        let t0 = Instant::now();
        dep.kill_server(2).await;
        drop(c21);
        if !watcher
            .await_presence(WAIT, |c| c.status_of(21).0 == "offline")
            .await
        {
            bail!("11 never saw 21 offline after the kill");
        }
        downs.push(t0.elapsed());
        dep.start_server(2)?;
        dep.wait_servers(&[2]).await?;
    }
    report(
        "kill -9 of an app server → its user offline for a contact elsewhere",
        &mut downs,
    );

    let mut receiver = client(&dep, 31).await?;
    let mut backs = Vec::new();
    for k in 0..args.kills {
        // Linked and pushing before the kill.
        send(&mut watcher, &format!("warm{k}"), 31).await?;
        await_push(&mut receiver, &format!("warm{k}")).await?;
        // One exchange: kill it. Several: the sender's, then the
        // receiver's (their servers move to another one).
        let x = if args.exchanges == 1 {
            dep.first_exchange()
        } else {
            exchange_of(&mut dep, if k % 2 == 0 { 1 } else { 3 }).await?
        };
        let t0 = Instant::now();
        dep.kill_exchange(x).await;
        if !args.leave_down {
            dep.start_exchange(x)?;
        }
        let text = format!("after{k}");
        send(&mut watcher, &text, 31).await?;
        await_push(&mut receiver, &text).await?;
        backs.push(t0.elapsed());
        if args.leave_down {
            dep.start_exchange(x)?;
            wait_all_linked(&dep).await?;
        }
    }
    report(
        if args.exchanges == 1 {
            "kill -9 of the exchange, restarted at once → pushes across servers again"
        } else if args.leave_down {
            "kill -9 of the sender's or receiver's exchange, left down → pushes across servers \
             again (its servers re-attached to another exchange)"
        } else {
            "kill -9 of the sender's or receiver's exchange, restarted at once → pushes across \
             servers again (through another exchange)"
        },
        &mut backs,
    );

    if args.soak_secs > 0 {
        soak(&mut dep, &args, &mut watcher).await?;
    }
    let _ = dep.stop_all(Duration::from_secs(5)).await;
    db.cleanup().await;
    Ok(())
}

/// The exchange app server `server` is attached to in the registry.
async fn exchange_of(dep: &mut Deployment, server: u32) -> anyhow::Result<u32> {
    let row = dep
        .registry()
        .await?
        .server(iim::types::ServerId(server))
        .await?
        .with_context(|| format!("no registry row for server {server}"))?;
    row.exchange
        .map(|x| x.0)
        .with_context(|| format!("server {server} is attached to no exchange"))
}

async fn client(dep: &Deployment, user: u64) -> anyhow::Result<ChatClient> {
    let server = USERS.iter().find(|(u, _)| *u == user).expect("user").1;
    let token = iim::token::mint(
        iim_kit::JWT_SECRET.as_bytes(),
        UserId(user),
        Duration::from_secs(86_400),
    );
    Ok(ChatClient::connect(dep.ws(server), &token, "probe").await?)
}

async fn send(c: &mut ChatClient, text: &str, to: u64) -> anyhow::Result<()> {
    c.send(text, Ope::Single, to, text).await?;
    Ok(())
}

/// Until a push whose text is `text` reaches `c`.
async fn await_push(c: &mut ChatClient, text: &str) -> anyhow::Result<()> {
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        if let Some(Frame::Msg(m)) = c.next_push(end - Instant::now()).await
            && iim_kit::client::body_text(&m).as_deref() == Some(text)
        {
            return Ok(());
        }
    }
    bail!("no push of {text:?} within {WAIT:?}")
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    if times.is_empty() {
        return;
    }
    let ms = |d: Duration| d.as_millis();
    println!(
        "{what}: p50 {} ms, max {} ms over {} kills (all: {:?})",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
        times.len(),
        times.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
}

/// Chat without pause while every core is busy; then count what the
/// daemons took for failures.
async fn soak(dep: &mut Deployment, args: &Args, c11: &mut ChatClient) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let burners = args.burners.unwrap_or(2 * cores);
    // Every server linked to the exchange again (after the last restart
    // above) before anything is counted.
    wait_all_linked(dep).await?;
    let before = counts(dep).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let spins = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..burners)
        .map(|_| {
            let stop = stop.clone();
            let spins = spins.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..100_000u64 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                    }
                    spins.fetch_add(1, Ordering::Relaxed);
                }
                std::hint::black_box(x);
            })
        })
        .collect();
    let mut c21 = client(dep, 21).await?;
    let end = Instant::now() + Duration::from_secs(args.soak_secs);
    let mut sent = 0u64;
    let mut slowest = Duration::ZERO;
    while Instant::now() < end {
        let t = Instant::now();
        send(c11, &format!("s{sent}"), 21).await?;
        slowest = slowest.max(t.elapsed());
        sent += 1;
        // Keep the recipient's queue drained.
        while c21.next_push(Duration::ZERO).await.is_some() {}
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let after = counts(dep).await?;
    println!(
        "soak: {} s with {burners} spinning threads on {cores} cores, {} exchanges, {sent} \
         messages sent (slowest ack {} ms); marked down: {}; relays given up for an \
         unreachable peer: {}; re-registrations: {} (servers 1, 2, 3: {:?})",
        args.soak_secs,
        args.exchanges,
        slowest.as_millis(),
        after.0 - before.0,
        after.2 - before.2,
        after
            .1
            .iter()
            .zip(&before.1)
            .map(|(a, b)| a - b)
            .sum::<f64>(),
        after
            .1
            .iter()
            .zip(&before.1)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// Until [`all_linked`] (polling the metrics pages).
async fn wait_all_linked(dep: &Deployment) -> anyhow::Result<()> {
    let linked_by = Instant::now() + WAIT;
    while !all_linked(dep).await? {
        if Instant::now() > linked_by {
            bail!("the exchanges and app servers did not all link within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The exchanges hold a link of every app server between them and are
/// linked to each other, and every app server's link is up.
async fn all_linked(dep: &Deployment) -> anyhow::Result<bool> {
    use iim_http::client::{Client, metric_value};
    let exchanges = dep.spec().exchanges.clone();
    let mut links = 0.0;
    for &x in &exchanges {
        // A restarted exchange may not be listening yet: not linked.
        let Ok(page) = Client::new(&dep.exchange_http(x).to_string(), Duration::from_secs(5))?
            .metrics()
            .await
        else {
            return Ok(false);
        };
        links += metric_value(&page, "iim_exchange_links").unwrap_or(0.0);
        let peers = metric_value(&page, "iim_exchange_peer_links").unwrap_or(0.0);
        if peers != (exchanges.len() - 1) as f64 {
            return Ok(false);
        }
    }
    if links != USERS.len() as f64 {
        return Ok(false);
    }
    for (_, server) in USERS {
        let page = Client::new(&dep.http(server).to_string(), Duration::from_secs(5))?
            .metrics()
            .await?;
        if metric_value(&page, "iim_appserver_link_up") != Some(1.0) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The exchanges' mark-downs, each app server's registrations, and the
/// relays the exchanges gave up for an unreachable peer, so far.
async fn counts(dep: &Deployment) -> anyhow::Result<(f64, Vec<f64>, f64)> {
    use iim_http::client::{Client, metric_value};
    let (mut down, mut unreachable) = (0.0, 0.0);
    for &x in &dep.spec().exchanges {
        let page = Client::new(&dep.exchange_http(x).to_string(), Duration::from_secs(5))?
            .metrics()
            .await?;
        down += metric_value(&page, "iim_exchange_servers_marked_down_total").unwrap_or(0.0);
        unreachable += metric_value(&page, "iim_exchange_relays_unreachable_total").unwrap_or(0.0);
    }
    let mut regs = Vec::new();
    for (_, server) in USERS {
        let page = Client::new(&dep.http(server).to_string(), Duration::from_secs(5))?
            .metrics()
            .await?;
        regs.push(metric_value(&page, "iim_appserver_link_connects_total").unwrap_or(0.0));
    }
    Ok((down, regs, unreachable))
}
