//! Presence storage integration tests. Every test body runs against SQLite (a
//! file in a temporary directory) and against MySQL/MariaDB when
//! `IIM_TEST_MYSQL_URL` names a server (no database: each run creates
//! `iim_t_<random>` and drops it). With `CI=true` a missing
//! `IIM_TEST_MYSQL_URL` fails the MySQL half.
//!
//! The concurrency test opens one `Registry` per task: separate pools, as
//! separate app servers would have.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use anyhow::{Context, bail, ensure};
use iim::presence::{PresenceError, PresenceRow, PresenceStore, Status};
use iim::registry::{Backend, Registry, Role, ServerState};
use iim::store::{Store, User};
use iim::types::{ChannelId, ServerId, Session, UserId};
use sqlx::{AssertSqlSafe, Connection, Executor, Row};

/// What a test body gets: the registry, the presence and chat stores on it,
/// and the url they were opened with (to open more handles or poke at the
/// tables directly).
struct Ctx {
    reg: Registry,
    presence: PresenceStore,
    store: Store,
    url: String,
}

/// Runs `body` once per available backend (see `common`).
async fn each_backend<F, Fut>(body: F)
where
    F: Fn(Ctx) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    common::each_backend(|reg, url| body(ctx(reg, url))).await
}

fn ctx(reg: Registry, url: String) -> Ctx {
    Ctx {
        presence: PresenceStore::new(&reg),
        store: Store::new(&reg),
        reg,
        url,
    }
}

const T0: i64 = 1_700_000_000_000;

fn session(user: u64, server: u32, channel: u64) -> Session {
    Session {
        user: UserId(user),
        device: "d".to_owned(),
        server: ServerId(server),
        channel: ChannelId(channel),
    }
}

fn row(user: u64, status: Status, text: &str, version: u64, server: u32, at: i64) -> PresenceRow {
    PresenceRow {
        user: UserId(user),
        status,
        text: text.to_owned(),
        version,
        server: ServerId(server),
        updated_at_ms: at,
    }
}

/// The user's row, or `None` when it has none.
async fn row_of(p: &PresenceStore, user: u64) -> anyhow::Result<Option<PresenceRow>> {
    let rows = p.rows(&[UserId(user)]).await?;
    ensure!(rows.len() <= 1, "{rows:?}");
    Ok(rows.into_iter().next())
}

/// `(status, text)` of the user's row; offline and empty without one.
async fn state_of(p: &PresenceStore, user: u64) -> anyhow::Result<(Status, String)> {
    Ok(row_of(p, user)
        .await?
        .map_or((Status::Offline, String::new()), |r| (r.status, r.text)))
}

/// The rule, computed here from `(status, text, status_at)` of the user's
/// sessions: the most available status; the text of the latest status_at
/// (ties: the greater text); offline means empty text.
fn expected(sessions: &[(Status, String, i64)]) -> (Status, String) {
    let status = sessions
        .iter()
        .map(|s| s.0)
        .max()
        .unwrap_or(Status::Offline);
    if status == Status::Offline {
        return (status, String::new());
    }
    let text = sessions
        .iter()
        .map(|(_, t, at)| (*at, t.clone()))
        .max()
        .map(|(_, t)| t)
        .unwrap_or_default();
    (status, text)
}

async fn raw_conn(url: &str) -> anyhow::Result<sqlx::AnyConnection> {
    sqlx::any::install_default_drivers();
    Ok(sqlx::AnyConnection::connect(url).await?)
}

async fn raw_execute(url: &str, sql: &str) -> anyhow::Result<()> {
    let mut conn = raw_conn(url).await?;
    conn.execute(AssertSqlSafe(sql.to_owned())).await?;
    conn.close().await?;
    Ok(())
}

/// The user's sessions as stored, read behind the stores' backs.
async fn raw_sessions(url: &str, user: u64) -> anyhow::Result<Vec<(Status, String, i64)>> {
    let mut conn = raw_conn(url).await?;
    let rows = sqlx::query("SELECT status, text, status_at FROM sessions WHERE user_id = ?")
        .bind(user as i64)
        .fetch_all(&mut conn)
        .await?;
    conn.close().await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<String, _>("status")?.parse()?,
                r.try_get("text")?,
                r.try_get("status_at")?,
            ))
        })
        .collect()
}

/// Number of `presence` rows, version-0 ones included.
async fn raw_presence_count(url: &str) -> anyhow::Result<i64> {
    let mut conn = raw_conn(url).await?;
    let row = sqlx::query("SELECT COUNT(*) AS n FROM presence")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok(row.try_get("n")?)
}

/// The user's row agrees with the user's sessions as stored.
async fn agrees(ctx_url: &str, p: &PresenceStore, user: u64) -> anyhow::Result<()> {
    let sessions = raw_sessions(ctx_url, user).await?;
    let want = expected(&sessions);
    let got = state_of(p, user).await?;
    ensure!(
        got == want,
        "user {user}: row {got:?}, sessions {sessions:?} say {want:?}"
    );
    Ok(())
}

/// Returns once a transaction on the test's database waits for a row lock
/// (MySQL: `information_schema.INNODB_TRX`, joined to the process list for
/// the database, as other tests share the server); fails after 10 s.
/// InnoDB refreshes that table only when it was last read more than 100 ms
/// before, so it is read every 200 ms: faster reads see the same old rows
/// for ever. SQLite has no such list: there the caller's later checks of
/// the outcome must tell on their own.
async fn lock_waited_for(url: &str, backend: Backend) -> anyhow::Result<()> {
    if backend == Backend::Sqlite {
        return Ok(());
    }
    let mut conn = raw_conn(url).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.INNODB_TRX t \
             JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id \
             WHERE t.trx_state = 'LOCK WAIT' AND p.DB = DATABASE()",
        )
        .fetch_one(&mut conn)
        .await?;
        if waiting > 0 {
            conn.close().await?;
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no transaction waited for a lock within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn app(reg: &Registry, id: u32) -> anyhow::Result<u64> {
    Ok(reg
        .begin_epoch(ServerId(id), Role::App, "a", ServerState::Up, T0)
        .await?)
}

#[tokio::test]
async fn aggregate_rules_and_versions() {
    each_backend(
        |Ctx {
             reg,
             presence: p,
             url,
             ..
         }| async move {
            let e = app(&reg, 1).await?;
            let (s1, a, b) = (ServerId(1), ChannelId(1), ChannelId(2));
            // No session, no row: recompute changes nothing and leaves no row.
            ensure!(p.recompute(UserId(5), s1, T0).await?.is_none());
            ensure!(row_of(&p, 5).await?.is_none());
            ensure!(
                raw_presence_count(&url).await? == 0,
                "a version-0 row was left"
            );

            reg.add_session(&session(5, 1, 1), e, T0).await?;
            let r = p.recompute(UserId(5), s1, T0 + 1).await?;
            ensure!(r == Some(row(5, Status::Online, "", 1, 1, T0 + 1)), "{r:?}");
            ensure!(p.recompute(UserId(5), s1, T0 + 2).await?.is_none(), "no-op");
            reg.add_session(&session(5, 1, 2), e, T0).await?;
            ensure!(p.recompute(UserId(5), s1, T0 + 3).await?.is_none());

            // Online beats away; the text set last wins even from a less
            // available connection.
            let r = p.set_status(s1, a, Status::Away, "lunch", T0 + 10).await?;
            ensure!(
                r == Some(row(5, Status::Online, "lunch", 2, 1, T0 + 10)),
                "{r:?}"
            );
            agrees(&url, &p, 5).await?;
            // Away beats busy; b's empty text is now the latest.
            let r = p.set_status(s1, b, Status::Busy, "", T0 + 11).await?;
            ensure!(r == Some(row(5, Status::Away, "", 3, 1, T0 + 11)), "{r:?}");
            // The same again: the session row changes, the aggregate does not.
            ensure!(
                p.set_status(s1, b, Status::Busy, "", T0 + 12)
                    .await?
                    .is_none()
            );
            ensure!(
                p.set_status(s1, b, Status::Busy, "", T0 + 12)
                    .await?
                    .is_none()
            );
            ensure!(row_of(&p, 5).await? == Some(row(5, Status::Away, "", 3, 1, T0 + 11)));
            let r = p.set_status(s1, a, Status::Busy, "call", T0 + 13).await?;
            ensure!(
                r == Some(row(5, Status::Busy, "call", 4, 1, T0 + 13)),
                "{r:?}"
            );
            // A connection going invisible: the other one decides.
            let r = p.set_status(s1, a, Status::Offline, "", T0 + 14).await?;
            ensure!(r == Some(row(5, Status::Busy, "", 5, 1, T0 + 14)), "{r:?}");
            // Only invisible connections: offline, and no text shows.
            let r = p
                .set_status(s1, b, Status::Offline, "hidden", T0 + 15)
                .await?;
            ensure!(
                r == Some(row(5, Status::Offline, "", 6, 1, T0 + 15)),
                "{r:?}"
            );
            let r = p.set_status(s1, b, Status::Online, "back", T0 + 16).await?;
            ensure!(
                r == Some(row(5, Status::Online, "back", 7, 1, T0 + 16)),
                "{r:?}"
            );
            agrees(&url, &p, 5).await?;

            // 140 characters fit, 141 do not, and the refusal changes nothing.
            let long = "é".repeat(140);
            let r = p.set_status(s1, b, Status::Online, &long, T0 + 17).await?;
            ensure!(r.map(|r| r.text) == Some(long.clone()));
            let res = p
                .set_status(s1, a, Status::Online, &"x".repeat(141), T0 + 18)
                .await;
            ensure!(matches!(res, Err(PresenceError::Database(_))), "{res:?}");
            ensure!(state_of(&p, 5).await? == (Status::Online, long));
            agrees(&url, &p, 5).await?;

            // Recompute after removals, recorded with the remover's id.
            ensure!(reg.remove_session(s1, b).await?);
            let r = p.recompute(UserId(5), ServerId(3), T0 + 20).await?;
            ensure!(
                r == Some(row(5, Status::Offline, "", 9, 3, T0 + 20)),
                "{r:?}"
            );
            ensure!(reg.remove_session(s1, a).await?);
            ensure!(
                p.recompute(UserId(5), ServerId(3), T0 + 21)
                    .await?
                    .is_none()
            );
            ensure!(row_of(&p, 5).await? == Some(row(5, Status::Offline, "", 9, 3, T0 + 20)));
            agrees(&url, &p, 5).await?;
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn set_status_on_an_unknown_session() {
    each_backend(
        |Ctx {
             reg,
             presence: p,
             url,
             ..
         }| async move {
            let e = app(&reg, 1).await?;
            let res = p
                .set_status(ServerId(1), ChannelId(9), Status::Away, "", T0)
                .await;
            ensure!(matches!(res, Err(PresenceError::NoSuchSession)), "{res:?}");
            reg.add_session(&session(5, 1, 9), e, T0).await?;
            // Same channel on another server: still no such session.
            let res = p
                .set_status(ServerId(2), ChannelId(9), Status::Away, "", T0)
                .await;
            ensure!(matches!(res, Err(PresenceError::NoSuchSession)), "{res:?}");
            ensure!(raw_presence_count(&url).await? == 0);
            ensure!(raw_sessions(&url, 5).await? == vec![(Status::Online, String::new(), 0)]);
            Ok(())
        },
    )
    .await;
}

/// Server 1 goes down with users 1 (only there), 2 (also on server 2), 3
/// (only on server 2) and 4 (only there, invisible, so already offline).
#[tokio::test]
async fn mark_down_sets_its_users_offline_and_keeps_other_servers() {
    each_backend(
        |Ctx {
             reg,
             presence: p,
             url,
             ..
         }| async move {
            let e1 = app(&reg, 1).await?;
            let e2 = app(&reg, 2).await?;
            reg.add_session(&session(1, 1, 1), e1, T0).await?;
            reg.add_session(&session(2, 1, 2), e1, T0).await?;
            reg.add_session(&session(4, 1, 4), e1, T0).await?;
            reg.add_session(&session(2, 2, 2), e2, T0).await?;
            reg.add_session(&session(3, 2, 3), e2, T0).await?;
            p.set_status(ServerId(1), ChannelId(1), Status::Away, "a", T0 + 1)
                .await?;
            p.set_status(ServerId(2), ChannelId(2), Status::Busy, "b", T0 + 2)
                .await?;
            p.set_status(ServerId(2), ChannelId(3), Status::Online, "c", T0 + 3)
                .await?;
            p.set_status(ServerId(1), ChannelId(4), Status::Offline, "", T0 + 4)
                .await?;
            let before = p
                .rows(&[UserId(1), UserId(2), UserId(3), UserId(4)])
                .await?;
            ensure!(
                before
                    == vec![
                        row(1, Status::Away, "a", 1, 1, T0 + 1),
                        row(2, Status::Online, "b", 1, 2, T0 + 2),
                        row(3, Status::Online, "c", 1, 2, T0 + 3),
                    ],
                "{before:?}"
            );

            // A stale epoch changes nothing.
            ensure!(!reg.mark_down(ServerId(1), e1 + 1, T0 + 50).await?);
            ensure!(p.rows(&[UserId(1), UserId(2), UserId(3)]).await? == before);

            ensure!(reg.mark_down(ServerId(1), e1, T0 + 100).await?);
            let after = p
                .rows(&[UserId(1), UserId(2), UserId(3), UserId(4)])
                .await?;
            ensure!(
                after
                    == vec![
                        row(1, Status::Offline, "", 2, 0, T0 + 100),
                        row(2, Status::Busy, "b", 2, 0, T0 + 100),
                        row(3, Status::Online, "c", 1, 2, T0 + 3),
                    ],
                "{after:?}"
            );
            for u in 1..=4 {
                agrees(&url, &p, u).await?;
            }
            // Down again (same epoch): nothing left to change.
            ensure!(reg.mark_down(ServerId(1), e1, T0 + 200).await?);
            ensure!(
                p.rows(&[UserId(1), UserId(2), UserId(3), UserId(4)])
                    .await?
                    == after
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn begin_epoch_sets_the_old_incarnations_users_offline() {
    each_backend(
        |Ctx {
             reg,
             presence: p,
             url,
             ..
         }| async move {
            let e1 = app(&reg, 1).await?;
            let e2 = app(&reg, 2).await?;
            reg.add_session(&session(1, 1, 1), e1, T0).await?;
            reg.add_session(&session(2, 1, 2), e1, T0).await?;
            reg.add_session(&session(2, 2, 2), e2, T0).await?;
            p.set_status(ServerId(1), ChannelId(1), Status::Busy, "x", T0 + 1)
                .await?;
            p.set_status(ServerId(2), ChannelId(2), Status::Away, "y", T0 + 2)
                .await?;
            ensure!(state_of(&p, 2).await? == (Status::Online, "y".to_owned()));

            let e = reg
                .begin_epoch(ServerId(1), Role::App, "a", ServerState::Up, T0 + 100)
                .await?;
            ensure!(e == e1 + 1);
            let rows = p.rows(&[UserId(1), UserId(2)]).await?;
            ensure!(
                rows == vec![
                    row(1, Status::Offline, "", 2, 0, T0 + 100),
                    row(2, Status::Away, "y", 2, 0, T0 + 100),
                ],
                "{rows:?}"
            );
            agrees(&url, &p, 1).await?;
            agrees(&url, &p, 2).await?;
            ensure!(reg.sessions().await? == vec![session(2, 2, 2)]);
            Ok(())
        },
    )
    .await;
}

/// 1,200 users on a server going down (more than one locking chunk):
/// odd users had only that server and go offline, even users keep a busy
/// session on server 2. Sessions and rows are written directly.
#[tokio::test]
async fn mark_down_of_a_large_server() {
    each_backend(
        |Ctx {
             reg,
             presence: p,
             url,
             ..
         }| async move {
            const N: u64 = 1200;
            let e1 = app(&reg, 1).await?;
            let e2 = app(&reg, 2).await?;
            let users: Vec<u64> = (1..=N).map(|i| i * 1_000_003).collect();
            let mut sessions = Vec::new();
            let mut rows = Vec::new();
            for (i, &u) in users.iter().enumerate() {
                sessions.push(format!("(1, {i}, {u}, 'd', {e1}, 0, 'online', '', 0)"));
                if u % 2 == 0 {
                    sessions.push(format!("(2, {i}, {u}, 'd', {e2}, 0, 'busy', 'b', 5)"));
                }
                rows.push(format!("({u}, 'online', '', {}, 1, 0)", 1 + i % 7));
            }
            raw_execute(
                &url,
                &format!(
                    "INSERT INTO sessions (server_id, channel, user_id, device, epoch, created_at, \
                 status, text, status_at) VALUES {}",
                    sessions.join(", ")
                ),
            )
            .await?;
            raw_execute(
                &url,
                &format!(
                    "INSERT INTO presence (user_id, status, text, version, server_id, updated_at) \
                 VALUES {}",
                    rows.join(", ")
                ),
            )
            .await?;

            let started = std::time::Instant::now();
            ensure!(reg.mark_down(ServerId(1), e1, T0).await?);
            eprintln!("mark_down of {N} users: {:?}", started.elapsed());
            let ids: Vec<UserId> = users.iter().map(|&u| UserId(u)).collect();
            let got = p.rows(&ids).await?;
            ensure!(got.len() == users.len(), "{} rows", got.len());
            for (i, (r, &u)) in got.iter().zip(&users).enumerate() {
                let want = if u % 2 == 0 {
                    row(u, Status::Busy, "b", 2 + (i % 7) as u64, 0, T0)
                } else {
                    row(u, Status::Offline, "", 2 + (i % 7) as u64, 0, T0)
                };
                ensure!(*r == want, "{r:?} != {want:?}");
            }
            ensure!(reg.sessions().await?.len() == (N / 2) as usize);
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn contacts_are_friends_and_colleagues_of_small_orgs() {
    each_backend(
        |Ctx {
             presence: p, store, ..
         }| async move {
            let mut users = Vec::new();
            for id in [1, 2, 3] {
                users.push(User {
                    id: UserId(id),
                    name: format!("u{id}"),
                    org: "small".into(),
                });
            }
            for id in 10..=15 {
                users.push(User {
                    id: UserId(id),
                    name: format!("u{id}"),
                    org: "big".into(),
                });
            }
            let high = u64::MAX - 3;
            users.push(User {
                id: UserId(high),
                name: "high".into(),
                org: "small".into(),
            });
            users.push(User {
                id: UserId(20),
                name: "loner".into(),
                org: "alone".into(),
            });
            store.add_users(&users).await?;
            store.add_friendship(UserId(1), UserId(10)).await?;
            store.add_friendship(UserId(1), UserId(2)).await?; // also a colleague
            store.add_friendship(UserId(11), UserId(10)).await?;

            let ids = |v: &[u64]| v.iter().map(|&u| UserId(u)).collect::<Vec<_>>();
            // Org "small" has 4 users.
            ensure!(p.contacts(UserId(1), 4).await? == ids(&[2, 3, 10, high]));
            ensure!(p.contacts(UserId(1), 200).await? == ids(&[2, 3, 10, high]));
            ensure!(p.contacts(UserId(1), 3).await? == ids(&[2, 10]));
            ensure!(p.contacts(UserId(high), 4).await? == ids(&[1, 2, 3]));
            // Org "big" has 6 users.
            ensure!(p.contacts(UserId(10), 5).await? == ids(&[1, 11]));
            ensure!(p.contacts(UserId(10), 6).await? == ids(&[1, 11, 12, 13, 14, 15]));
            ensure!(p.contacts(UserId(12), 5).await?.is_empty());
            ensure!(p.contacts(UserId(20), 200).await?.is_empty());
            ensure!(p.contacts(UserId(20), 0).await?.is_empty());
            ensure!(p.contacts(UserId(999), 200).await?.is_empty());
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn rows_of_present_absent_and_high_users() {
    each_backend(
        |Ctx {
             reg, presence: p, ..
         }| async move {
            let e = app(&reg, 1).await?;
            let high = u64::MAX;
            reg.add_session(&session(high, 1, 1), e, T0).await?;
            reg.add_session(&session(7, 1, 2), e, T0).await?;
            reg.add_session(&session(8, 1, 3), e, T0).await?;
            p.set_status(ServerId(1), ChannelId(1), Status::Away, "hi", T0 + 1)
                .await?;
            p.recompute(UserId(7), ServerId(1), T0 + 2).await?;
            ensure!(p.rows(&[]).await?.is_empty());
            let got = p
                .rows(&[UserId(high), UserId(3), UserId(7), UserId(high), UserId(8)])
                .await?;
            ensure!(
                got == vec![
                    row(7, Status::Online, "", 1, 1, T0 + 2),
                    row(high, Status::Away, "hi", 1, 1, T0 + 1),
                ],
                "{got:?}"
            );
            Ok(())
        },
    )
    .await;
}

/// 2,500 users with rows (ids around 2^63 included) and 500 without: the
/// digest equals a sum computed here, moves by one when one version does,
/// and is all zeros for users without rows.
#[tokio::test]
async fn digest_sums_versions_per_bucket() {
    each_backend(
        |Ctx {
             reg,
             presence: p,
             url,
             ..
         }| async move {
            const BUCKETS: u32 = 64;
            let e = app(&reg, 1).await?;
            let mut present: BTreeMap<u64, u64> = BTreeMap::new();
            for i in 0..2500u64 {
                let u = if i % 5 == 0 {
                    (1 << 63) + i * 7
                } else {
                    i * 13 + 1
                };
                present.insert(u, 1 + (i * 31) % 97);
            }
            let values: Vec<String> = present
                .iter()
                .map(|(&u, &v)| format!("({}, 'online', '', {v}, 1, 0)", u as i64))
                .collect();
            raw_execute(
                &url,
                &format!(
                    "INSERT INTO presence (user_id, status, text, version, server_id, updated_at) \
                 VALUES {}",
                    values.join(", ")
                ),
            )
            .await?;
            let absent: Vec<u64> = (0..500u64).map(|i| 1_000_000_000 + i * 3).collect();
            let mut users: Vec<UserId> =
                present.keys().chain(&absent).map(|&u| UserId(u)).collect();
            users.reverse();
            users.push(users[0]); // a duplicate counts once

            let want = |present: &BTreeMap<u64, u64>| {
                let mut d = vec![0u64; BUCKETS as usize];
                for (&u, &v) in present {
                    d[(u % u64::from(BUCKETS)) as usize] += v;
                }
                d
            };
            let started = std::time::Instant::now();
            let got = p.digest(&users, BUCKETS).await?;
            eprintln!("digest of {} users: {:?}", users.len(), started.elapsed());
            ensure!(got == want(&present), "{got:?}");

            let absent_ids: Vec<UserId> = absent.iter().map(|&u| UserId(u)).collect();
            ensure!(p.digest(&absent_ids, BUCKETS).await? == vec![0; BUCKETS as usize]);
            ensure!(p.digest(&[], BUCKETS).await? == vec![0; BUCKETS as usize]);
            ensure!(p.digest(&users, 0).await?.is_empty());
            ensure!(p.digest(&users, 1).await? == vec![present.values().sum::<u64>()]);

            // One real change moves one bucket by one.
            let u = *present.keys().nth(1234).context("a user")?;
            reg.add_session(&session(u, 1, 1), e, T0).await?;
            let r = p
                .set_status(ServerId(1), ChannelId(1), Status::Away, "", T0)
                .await?;
            let v = present[&u];
            ensure!(r.as_ref().map(|r| r.version) == Some(v + 1), "{r:?}");
            *present.get_mut(&u).context("entry")? += 1;
            let after = p.digest(&users, BUCKETS).await?;
            ensure!(after == want(&present));
            let moved: Vec<usize> = (0..BUCKETS as usize)
                .filter(|&b| after[b] != got[b])
                .collect();
            ensure!(
                moved == vec![(u % u64::from(BUCKETS)) as usize],
                "{moved:?}"
            );
            Ok(())
        },
    )
    .await;
}

/// Eight app servers (own pools) toggle the status of their own session of
/// one user 25 times each. Every version is handed out once, the versions
/// returned are exactly 1..=n, and the final row is the aggregate of the
/// final sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_status_changes_of_one_user_from_separate_pools() {
    each_backend(
        |Ctx {
             reg,
             presence: p,
             url,
             ..
         }| async move {
            const TASKS: u32 = 8;
            const EACH: i64 = 25;
            const USER: u64 = 77;
            let statuses = [
                Status::Away,
                Status::Busy,
                Status::Online,
                Status::Busy,
                Status::Away,
            ];
            let texts = ["", "x", "y"];
            let mut versions = Vec::new();
            for t in 1..=TASKS {
                let e = app(&reg, t).await?;
                reg.add_session(&session(USER, t, 1), e, T0).await?;
                versions.extend(
                    p.recompute(UserId(USER), ServerId(t), T0)
                        .await?
                        .map(|r| r.version),
                );
            }
            let started = std::time::Instant::now();
            let tasks: Vec<_> = (1..=TASKS)
                .map(|t| {
                    let url = url.clone();
                    tokio::spawn(async move {
                        let reg = Registry::connect(&url).await?;
                        let p = PresenceStore::new(&reg);
                        let mut seen = Vec::new();
                        let mut last = (Status::Online, String::new(), 0);
                        for k in 0..EACH {
                            let status = statuses[(k as usize + t as usize) % statuses.len()];
                            let text = texts[(k as usize / 3 + t as usize) % texts.len()];
                            let now = T0 + 1 + k * i64::from(TASKS) + i64::from(t);
                            if let Some(r) = p
                                .set_status(ServerId(t), ChannelId(1), status, text, now)
                                .await?
                            {
                                ensure!(r.user == UserId(USER) && r.server == ServerId(t), "{r:?}");
                                seen.push(r.version);
                            }
                            last = (status, text.to_owned(), now);
                        }
                        anyhow::Ok((seen, last))
                    })
                })
                .collect();
            let mut finals = Vec::new();
            for task in tasks {
                let (seen, last) = task.await??;
                versions.extend(seen);
                finals.push(last);
            }
            eprintln!(
                "{} status changes from {TASKS} pools ({} real): {:?}",
                i64::from(TASKS) * EACH,
                versions.len(),
                started.elapsed()
            );
            let unique: HashSet<u64> = versions.iter().copied().collect();
            ensure!(
                unique.len() == versions.len(),
                "a version was handed out twice"
            );
            versions.sort_unstable();
            let n = versions.len() as u64;
            ensure!(versions == (1..=n).collect::<Vec<_>>(), "{versions:?}");

            let Some(last) = row_of(&p, USER).await? else {
                bail!("no row");
            };
            ensure!(
                last.version == n,
                "final version {} after {n} changes",
                last.version
            );
            ensure!(
                (last.status, last.text.clone()) == expected(&finals),
                "{last:?} vs {finals:?}"
            );
            let mut stored = raw_sessions(&url, USER).await?;
            stored.sort_by_key(|s| s.2);
            finals.sort_by_key(|s| s.2);
            ensure!(stored == finals, "sessions {stored:?}");
            agrees(&url, &p, USER).await?;
            Ok(())
        },
    )
    .await;
}

/// Another server changes a session of user 9 and its row (as `set_status`
/// does) while server 1 restarts and must recompute the same user: the
/// restart waits for the row and then sees the committed session, so the
/// row keeps agreeing with the sessions. (On MySQL at `REPEATABLE READ`
/// the restart would compute from a snapshot taken before the wait.) The
/// commit comes once MySQL shows the restart waiting for a lock; on SQLite,
/// whose `BEGIN IMMEDIATE` takes the writer lock before any read, the
/// restart sees the committed session whenever it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_epoch_sees_a_change_committed_while_it_waited() {
    each_backend(
        |Ctx {
             reg,
             presence: p,
             url,
             ..
         }| async move {
            let e1 = app(&reg, 1).await?;
            let e2 = app(&reg, 2).await?;
            reg.add_session(&session(9, 1, 1), e1, T0).await?;
            reg.add_session(&session(9, 2, 2), e2, T0).await?;
            p.recompute(UserId(9), ServerId(1), T0).await?;

            let mut other = raw_conn(&url).await?;
            let lock = match reg.backend() {
                Backend::Sqlite => {
                    other.execute("BEGIN IMMEDIATE").await?;
                    ""
                }
                Backend::MySql => {
                    other.execute("BEGIN").await?;
                    " FOR UPDATE"
                }
            };
            other
                .execute(AssertSqlSafe(format!(
                    "SELECT version FROM presence WHERE user_id = 9{lock}"
                )))
                .await?;
            other
                .execute(
                    "UPDATE sessions SET status = 'busy', text = 'b', status_at = 5 \
                 WHERE server_id = 2 AND channel = 2",
                )
                .await?;
            other
                .execute(
                    "UPDATE presence SET status = 'busy', text = 'b', version = 2, server_id = 2, \
                 updated_at = 5 WHERE user_id = 9",
                )
                .await?;
            let restart = tokio::spawn({
                let reg = reg.clone();
                async move {
                    reg.begin_epoch(ServerId(1), Role::App, "a", ServerState::Up, T0 + 100)
                        .await
                }
            });
            lock_waited_for(&url, reg.backend()).await?;
            ensure!(
                !restart.is_finished(),
                "the restart did not wait for the row"
            );
            other.execute("COMMIT").await?;
            other.close().await?;
            ensure!(restart.await?? == e1 + 1);

            ensure!(row_of(&p, 9).await? == Some(row(9, Status::Busy, "b", 2, 2, 5)));
            agrees(&url, &p, 9).await?;
            Ok(())
        },
    )
    .await;
}
