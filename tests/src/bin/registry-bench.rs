//! `registry-bench`: how long the registry's `user_list` look-up
//! (`Registry::sessions_of`, the one query behind `Iim::user_list`) takes
//! for 10, 1 000 and 100 000 users, each with one live session, on a
//! fresh MariaDB database (`IIM_TEST_MYSQL_URL`, default
//! `mysql://iim:iim@127.0.0.1:3306`) and on SQLite.
//!
//! The sessions are spread over four app servers, as a deployment's would
//! be. Each size is looked up several times (after one unmeasured warm-up
//! look-up); the median and the fastest are printed, with the median per
//! user, so a cost that grows faster than the list shows as a rising last
//! column.
//!
//! ```text
//! cargo build --release -p iim-tests --bin registry-bench
//! target/release/registry-bench            # MariaDB and SQLite
//! target/release/registry-bench --sqlite   # SQLite only
//! ```

use anyhow::{Context, Result};
use iim::presence::Status;
use iim::registry::{LiveSession, Registry, Role, ServerState};
use iim::types::{ChannelId, ServerId, Session, UserId};
use iim_kit::TestDb;
use std::time::{Duration, Instant};

/// Users (and sessions) in the registry.
const USERS: u64 = 100_000;
/// App servers the sessions are spread over.
const SERVERS: u32 = 4;
/// List sizes looked up, and how many times each.
const SIZES: [(usize, usize); 3] = [(10, 200), (1_000, 50), (100_000, 7)];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let sqlite_only = std::env::args().any(|a| a == "--sqlite");
    let mut backends = Vec::new();
    if !sqlite_only {
        let server = std::env::var("IIM_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://iim:iim@127.0.0.1:3306".into());
        backends.push(("MariaDB", TestDb::on(server).await));
    }
    backends.push(("SQLite", TestDb::sqlite()));
    println!(
        "| database | users looked up | sessions found | median | fastest | median per user |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, db) in backends {
        let reg = Registry::connect(db.url()).await.context("registry")?;
        fill(&reg).await?;
        for (n, runs) in SIZES {
            // Every 100 000 / n-th user, so a small list is spread over the
            // whole table rather than its first rows.
            let step = (USERS as usize / n).max(1);
            let users: Vec<UserId> = (0..n).map(|i| UserId(1 + (i * step) as u64)).collect();
            let found = reg.sessions_of(&users).await?.len();
            anyhow::ensure!(found == n, "{name}: {n} users, {found} sessions");
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs {
                let t = Instant::now();
                let s = reg.sessions_of(&users).await?;
                times.push(t.elapsed());
                std::hint::black_box(s);
            }
            times.sort_unstable();
            let median = times[runs / 2];
            println!(
                "| {name} | {n} | {found} | {} | {} | {:.2} µs |",
                show(median),
                show(times[0]),
                median.as_secs_f64() * 1e6 / n as f64
            );
        }
        db.cleanup().await;
    }
    Ok(())
}

/// Four app servers and one session for each of `USERS` users.
async fn fill(reg: &Registry) -> Result<()> {
    let t = Instant::now();
    for s in 1..=SERVERS {
        let epoch = reg
            .begin_epoch(ServerId(s), Role::App, "127.0.0.1:1", ServerState::Up, 0)
            .await?;
        let sessions: Vec<LiveSession> = (1..=USERS)
            .filter(|u| (u % u64::from(SERVERS)) as u32 + 1 == s)
            .map(|u| LiveSession {
                session: Session {
                    user: UserId(u),
                    device: "phone".into(),
                    server: ServerId(s),
                    channel: ChannelId(u),
                },
                status: Status::Online,
                text: String::new(),
                status_at_ms: 0,
            })
            .collect();
        reg.restore_sessions(&sessions, epoch, 0).await?;
    }
    eprintln!(
        "registry-bench: {USERS} sessions written in {:.1?}",
        t.elapsed()
    );
    Ok(())
}

fn show(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}
