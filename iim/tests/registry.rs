//! Registry integration tests. Every test body runs against SQLite (a file in
//! a temporary directory) and against MySQL/MariaDB when `IIM_TEST_MYSQL_URL`
//! names a server (no database: each run creates `iim_t_<random>` and drops
//! it). With `CI=true` a missing `IIM_TEST_MYSQL_URL` fails the MySQL half.

mod common;

use std::future::Future;

use anyhow::{Context, ensure};
use iim::registry::{Registration, Registry, RegistryError, Role, ServerRecord, ServerState};
use iim::types::{ChannelId, ServerId, Session, UserId};
use sqlx::{Connection, Executor};

/// What a test body gets: a registry and the url it was opened with (to open
/// a second handle or poke at the tables directly).
struct Ctx {
    reg: Registry,
    url: String,
}

/// Runs `body` once per available backend (see `common`).
async fn each_backend<F, Fut>(body: F)
where
    F: Fn(Ctx) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    common::each_backend(|reg, url| body(Ctx { reg, url })).await
}

fn session(user: u64, device: &str, server: u32, channel: u64) -> Session {
    Session {
        user: UserId(user),
        device: device.to_owned(),
        server: ServerId(server),
        channel: ChannelId(channel),
    }
}

const T0: i64 = 1_700_000_000_000;

#[tokio::test]
async fn begin_epoch_inserts_then_bumps_and_clears_old_sessions() {
    each_backend(|Ctx { reg, .. }| async move {
        let app = ServerId(7);
        let e1 = reg
            .begin_epoch(app, Role::App, "10.0.0.7:4433", ServerState::Up, T0)
            .await?;
        ensure!(e1 == 1, "first epoch {e1}");
        let rec = reg.server(app).await?.context("row after begin_epoch")?;
        ensure!(rec.epoch == 1 && rec.state == ServerState::Up && rec.role == Role::App);
        ensure!(rec.registered_at_ms == T0 && rec.last_seen_ms == T0);

        reg.add_session(&session(1, "phone", 7, 10), e1, T0).await?;
        reg.add_session(&session(2, "desk", 7, 11), e1, T0).await?;
        reg.add_session(&session(3, "phone", 8, 10), 1, T0).await?;

        let e2 = reg
            .begin_epoch(
                app,
                Role::App,
                "10.0.0.7:4434",
                ServerState::Draining,
                T0 + 5,
            )
            .await?;
        ensure!(e2 == 2, "second epoch {e2}");
        let rec = reg.server(app).await?.context("row after bump")?;
        ensure!(rec.epoch == 2 && rec.address == "10.0.0.7:4434");
        ensure!(rec.state == ServerState::Draining);
        ensure!(rec.registered_at_ms == T0 + 5 && rec.last_seen_ms == T0 + 5);
        // Only server 8's session survives server 7's restart.
        ensure!(reg.sessions().await? == vec![session(3, "phone", 8, 10)]);

        let e3 = reg
            .begin_epoch(app, Role::App, "x", ServerState::Up, T0 + 9)
            .await?;
        ensure!(e3 == 3);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_begin_epoch_yields_distinct_consecutive_epochs() {
    each_backend(|Ctx { reg, .. }| async move {
        for round in 0..2u64 {
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let reg = reg.clone();
                    tokio::spawn(async move {
                        let addr = format!("10.0.0.1:{}", 4000 + i);
                        reg.begin_epoch(ServerId(42), Role::App, &addr, ServerState::Up, T0 + i)
                            .await
                    })
                })
                .collect();
            let mut epochs = Vec::new();
            for task in tasks {
                epochs.push(task.await??);
            }
            epochs.sort_unstable();
            let want: Vec<u64> = (round * 8 + 1..=round * 8 + 8).collect();
            ensure!(epochs == want, "round {round}: epochs {epochs:?}");
        }
        let rec = reg.server(ServerId(42)).await?.context("row")?;
        ensure!(rec.epoch == 16);
        Ok(())
    })
    .await;
}

/// An app server moving from one exchange to another: each registration
/// bumps the attach epoch and names the exchange before it, and the
/// exchange it left can no longer mark it down or delete its sessions;
/// the one it is attached to can.
#[tokio::test]
async fn a_newer_attachment_fences_the_exchange_it_left() {
    each_backend(|Ctx { reg, .. }| async move {
        let (app, x, y) = (ServerId(3), ServerId(1), ServerId(2));
        for ex in [x, y] {
            reg.begin_epoch(ex, Role::Exchange, "ex", ServerState::Up, T0)
                .await?;
        }
        let epoch = reg
            .begin_epoch(app, Role::App, "app:3", ServerState::Down, T0)
            .await?;
        reg.add_session(&session(1, "phone", 3, 10), epoch, T0)
            .await?;
        let at_x = match reg.record_registration(app, epoch, x, T0 + 1).await? {
            Registration::Accepted {
                attach_epoch,
                previous: None,
            } => attach_epoch,
            r => anyhow::bail!("first registration: {r:?}"),
        };
        let at_y = match reg.record_registration(app, epoch, y, T0 + 2).await? {
            Registration::Accepted {
                attach_epoch,
                previous: Some(p),
            } if p == x => attach_epoch,
            r => anyhow::bail!("moving to y: {r:?}"),
        };
        ensure!(at_y > at_x, "{at_x} then {at_y}");
        let rec = reg.server(app).await?.context("row")?;
        ensure!(rec.exchange == Some(y) && rec.attach_epoch == at_y);

        // X's lease on the server ran out: too late, it is y's now — by
        // the attach epoch X recorded, and by the exchange the row names
        // (what an exchange that only read the row at start checks).
        ensure!(!reg.mark_down_attached(app, epoch, at_x, T0 + 3).await?);
        ensure!(!reg.mark_down_from(app, epoch, x, T0 + 3).await?);
        let rec = reg.server(app).await?.context("row")?;
        ensure!(rec.state == ServerState::Up, "{rec:?}");
        ensure!(reg.sessions_of(&[UserId(1)]).await?.len() == 1);

        // Y's lease ran out: down, sessions gone (by either guard).
        ensure!(reg.mark_down_from(app, epoch, y, T0 + 4).await?);
        ensure!(reg.mark_down_attached(app, epoch, at_y, T0 + 4).await?);
        let rec = reg.server(app).await?.context("row")?;
        ensure!(rec.state == ServerState::Down, "{rec:?}");
        ensure!(reg.sessions_of(&[UserId(1)]).await?.is_empty());
        Ok(())
    })
    .await;
}

/// Live exchanges with their load, and the choice an app server makes
/// from them: the preferred one while it is up, else the least attached.
#[tokio::test]
async fn app_servers_choose_the_preferred_or_the_least_attached_exchange() {
    use iim::registry::choose_exchange;
    each_backend(|Ctx { reg, .. }| async move {
        let (x, y, z) = (ServerId(1), ServerId(2), ServerId(9));
        for ex in [x, y, z] {
            reg.begin_epoch(ex, Role::Exchange, "ex", ServerState::Up, T0)
                .await?;
        }
        // z is draining: not a candidate.
        reg.set_state(z, 1, ServerState::Draining, T0).await?;
        // Two app servers up on x, one on y, one on y that is down.
        for (app, ex, up) in [(10, x, true), (11, x, true), (12, y, true), (13, y, false)] {
            let epoch = reg
                .begin_epoch(ServerId(app), Role::App, "app", ServerState::Down, T0)
                .await?;
            reg.record_registration(ServerId(app), epoch, ex, T0)
                .await?;
            if !up {
                reg.mark_down(ServerId(app), epoch, T0).await?;
            }
        }
        let live = reg.exchange_loads().await?;
        let seen: Vec<(u32, u64)> = live.iter().map(|e| (e.id.0, e.attached)).collect();
        ensure!(seen == [(1, 2), (2, 1)], "{seen:?}");
        ensure!(choose_exchange(&live, None).map(|e| e.id) == Some(y));
        ensure!(choose_exchange(&live, Some(x)).map(|e| e.id) == Some(x));
        // A preferred exchange that is not live is passed over.
        ensure!(choose_exchange(&live, Some(z)).map(|e| e.id) == Some(y));
        ensure!(choose_exchange(&[], Some(x)).is_none());
        Ok(())
    })
    .await;
}

/// Two exchanges recording the same server's registration at once (two
/// handles, as two exchange processes would have) get distinct attach
/// epochs, and the row ends with the higher one.
#[tokio::test]
async fn concurrent_registrations_get_distinct_attach_epochs() {
    each_backend(|Ctx { reg, url }| async move {
        let app = ServerId(5);
        let epoch = reg
            .begin_epoch(app, Role::App, "app:5", ServerState::Down, T0)
            .await?;
        let other = Registry::connect(&url).await?;
        let mut tasks = Vec::new();
        for (handle, ex) in [(reg.clone(), ServerId(1)), (other, ServerId(2))] {
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..20 {
                    match handle.record_registration(app, epoch, ex, T0 + i).await? {
                        Registration::Accepted { attach_epoch, .. } => got.push(attach_epoch),
                        r => anyhow::bail!("{r:?}"),
                    }
                }
                Ok(got)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        all.sort_unstable();
        ensure!(all == (1..=40).collect::<Vec<u64>>(), "{all:?}");
        ensure!(reg.server(app).await?.context("row")?.attach_epoch == 40);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn record_registration_outcomes() {
    each_backend(|Ctx { reg, .. }| async move {
        let (app, ex) = (ServerId(3), ServerId(1));
        reg.begin_epoch(ex, Role::Exchange, "ex:1", ServerState::Up, T0)
            .await?;
        reg.begin_epoch(app, Role::App, "app:3", ServerState::Down, T0)
            .await?;
        let epoch = reg
            .begin_epoch(app, Role::App, "app:3", ServerState::Down, T0)
            .await?;
        ensure!(epoch == 2);

        let r = reg.record_registration(app, 2, ex, T0 + 100).await?;
        ensure!(
            r == Registration::Accepted {
                attach_epoch: 1,
                previous: None
            },
            "{r:?}"
        );
        let rec = reg.server(app).await?.context("row")?;
        ensure!(rec.state == ServerState::Up && rec.exchange == Some(ex));
        ensure!(rec.attach_epoch == 1);
        ensure!(rec.registered_at_ms == T0 + 100 && rec.last_seen_ms == T0 + 100);
        // Registering again with the same epoch (a reconnect) is accepted
        // again, as a newer attachment.
        let r = reg.record_registration(app, 2, ex, T0 + 100).await?;
        ensure!(
            r == Registration::Accepted {
                attach_epoch: 2,
                previous: Some(ex)
            },
            "repeat: {r:?}"
        );

        let r = reg.record_registration(app, 1, ex, T0 + 200).await?;
        ensure!(r == Registration::StaleEpoch { current: 2 }, "older: {r:?}");
        let r = reg.record_registration(app, 5, ex, T0 + 200).await?;
        ensure!(r == Registration::StaleEpoch { current: 2 }, "newer: {r:?}");
        let r = reg.record_registration(app, u64::MAX, ex, T0 + 200).await?;
        ensure!(r == Registration::StaleEpoch { current: 2 }, "huge: {r:?}");
        let r = reg.record_registration(ServerId(99), 1, ex, T0).await?;
        ensure!(r == Registration::Unknown, "missing: {r:?}");
        let r = reg.record_registration(ex, 1, ex, T0).await?;
        ensure!(r == Registration::WrongRole, "exchange: {r:?}");

        // Refused claims changed nothing.
        let rec = reg.server(app).await?.context("row")?;
        ensure!(rec.last_seen_ms == T0 + 100);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn set_state_respects_the_epoch_guard() {
    each_backend(|Ctx { reg, .. }| async move {
        let id = ServerId(5);
        reg.begin_epoch(id, Role::App, "a", ServerState::Up, T0)
            .await?;
        let epoch = reg
            .begin_epoch(id, Role::App, "a", ServerState::Up, T0)
            .await?;

        ensure!(
            !reg.set_state(id, epoch - 1, ServerState::Down, T0 + 1)
                .await?
        );
        ensure!(
            !reg.set_state(ServerId(6), epoch, ServerState::Down, T0 + 1)
                .await?
        );
        let rec = reg.server(id).await?.context("row")?;
        ensure!(rec.state == ServerState::Up && rec.last_seen_ms == T0);

        ensure!(
            reg.set_state(id, epoch, ServerState::Draining, T0 + 2)
                .await?
        );
        let rec = reg.server(id).await?.context("row")?;
        ensure!(rec.state == ServerState::Draining && rec.last_seen_ms == T0 + 2);
        // Matching but unchanged values still count as a match.
        ensure!(
            reg.set_state(id, epoch, ServerState::Draining, T0 + 2)
                .await?
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn mark_down_respects_the_epoch_guard_and_deletes_sessions() {
    each_backend(|Ctx { reg, .. }| async move {
        let id = ServerId(9);
        reg.begin_epoch(id, Role::App, "a", ServerState::Up, T0)
            .await?;
        let epoch = reg
            .begin_epoch(id, Role::App, "a", ServerState::Up, T0)
            .await?;
        reg.add_session(&session(1, "d", 9, 1), epoch, T0).await?;
        reg.add_session(&session(2, "d", 9, 2), epoch, T0).await?;
        reg.add_session(&session(1, "d", 10, 1), 1, T0).await?;

        ensure!(!reg.mark_down(id, epoch - 1, T0 + 1).await?);
        ensure!(
            reg.sessions().await?.len() == 3,
            "stale mark_down deleted sessions"
        );
        ensure!(reg.server(id).await?.context("row")?.state == ServerState::Up);

        ensure!(reg.mark_down(id, epoch, T0 + 2).await?);
        let rec = reg.server(id).await?.context("row")?;
        ensure!(rec.state == ServerState::Down && rec.last_seen_ms == T0 + 2);
        ensure!(reg.sessions().await? == vec![session(1, "d", 10, 1)]);
        ensure!(!reg.mark_down(ServerId(77), 1, T0).await?);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn touch_updates_last_seen_of_matching_epochs() {
    each_backend(|Ctx { reg, .. }| async move {
        for id in 1..=3 {
            reg.begin_epoch(ServerId(id), Role::App, "a", ServerState::Up, T0)
                .await?;
        }
        reg.begin_epoch(ServerId(2), Role::App, "a", ServerState::Up, T0)
            .await?;
        reg.touch(&[], T0 + 1).await?;

        // Server 2 is at epoch 2, so its (2, 1) pair is stale. The padding of
        // unknown servers makes the list span more than one statement.
        let mut pairs = vec![(ServerId(1), 1), (ServerId(2), 1), (ServerId(3), 1)];
        pairs.extend((1000..1700).map(|id| (ServerId(id), 1)));
        reg.touch(&pairs, T0 + 50).await?;
        let seen: Vec<i64> = reg
            .servers()
            .await?
            .iter()
            .map(|s| s.last_seen_ms)
            .collect();
        ensure!(seen == vec![T0 + 50, T0, T0 + 50], "{seen:?}");

        reg.touch(&[(ServerId(2), 2)], T0 + 60).await?;
        ensure!(reg.server(ServerId(2)).await?.context("row")?.last_seen_ms == T0 + 60);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn recorded_links_replace_an_exchanges_own_and_keep_their_since() {
    each_backend(|Ctx { reg, .. }| async move {
        let (a, b, c) = (ServerId(100), ServerId(101), ServerId(102));
        for x in [a, b] {
            reg.begin_epoch(x, Role::Exchange, "x", ServerState::Up, T0)
                .await?;
        }
        let view = async || -> anyhow::Result<Vec<(u32, u32, i64)>> {
            Ok(reg
                .exchange_links()
                .await?
                .iter()
                .map(|l| (l.exchange.0, l.peer.0, l.since_ms))
                .collect())
        };
        ensure!(reg.record_links(a, (1, 1), &[], T0).await?);
        ensure!(view().await?.is_empty());
        ensure!(reg.record_links(a, (1, 2), &[b, c], T0 + 1).await?);
        ensure!(reg.record_links(b, (1, 1), &[a], T0 + 2).await?);
        ensure!(
            view().await? == [(100, 101, T0 + 1), (100, 102, T0 + 1), (101, 100, T0 + 2)],
            "{:?}",
            view().await?
        );
        // 102 dropped, 101 stays up since its first recording; 101's own
        // rows are not 100's to change.
        ensure!(reg.record_links(a, (1, 3), &[b], T0 + 10).await?);
        ensure!(view().await? == [(100, 101, T0 + 1), (101, 100, T0 + 2)]);
        // A recording that was given up on and lands late changes nothing;
        // a new incarnation (epoch 2) starts its count again.
        ensure!(!reg.record_links(a, (1, 2), &[b, c], T0 + 11).await?);
        ensure!(view().await? == [(100, 101, T0 + 1), (101, 100, T0 + 2)]);
        ensure!(reg.record_links(a, (2, 1), &[], T0 + 20).await?);
        ensure!(view().await? == [(101, 100, T0 + 2)]);
        ensure!(!reg.record_links(a, (1, 9), &[c], T0 + 21).await?);
        ensure!(view().await? == [(101, 100, T0 + 2)]);
        // An exchange without a row records nothing.
        ensure!(!reg.record_links(c, (1, 1), &[a], T0 + 22).await?);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn add_remove_and_clear_sessions() {
    each_backend(|Ctx { reg, .. }| async move {
        reg.add_session(&session(1, "phone", 4, 100), 1, T0).await?;
        reg.add_session(&session(2, "desk", 4, 101), 1, T0).await?;
        reg.add_session(&session(3, "tab", 5, 100), 1, T0).await?;
        // Same (server, channel): replaced, not duplicated.
        reg.add_session(&session(9, "laptop", 4, 100), 1, T0 + 1)
            .await?;
        ensure!(
            reg.sessions().await?
                == vec![
                    session(2, "desk", 4, 101),
                    session(9, "laptop", 4, 100),
                    session(3, "tab", 5, 100),
                ]
        );

        ensure!(reg.remove_session(ServerId(4), ChannelId(101)).await?);
        ensure!(!reg.remove_session(ServerId(4), ChannelId(101)).await?);
        ensure!(!reg.remove_session(ServerId(6), ChannelId(100)).await?);

        reg.add_session(&session(4, "x", 4, 102), 1, T0).await?;
        ensure!(reg.clear_sessions(ServerId(4)).await? == 2);
        ensure!(reg.clear_sessions(ServerId(4)).await? == 0);
        ensure!(reg.sessions().await? == vec![session(3, "tab", 5, 100)]);

        // Ids above i64::MAX survive the BIGINT column and sort as u64.
        let big = session(u64::MAX - 1, "big", 5, (1 << 63) | 7);
        reg.add_session(&big, 1, T0).await?;
        ensure!(reg.sessions().await? == vec![session(3, "tab", 5, 100), big.clone()]);
        ensure!(reg.sessions_of(&[UserId(u64::MAX - 1)]).await? == vec![big]);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn column_limits_are_the_same_on_both_backends() {
    each_backend(|Ctx { reg, .. }| async move {
        // 64 characters (not bytes) fit in device, 65 do not; 255 in address.
        let fits = session(1, &"é".repeat(64), 1, 1);
        reg.add_session(&fits, 1, T0).await?;
        ensure!(reg.sessions().await? == vec![fits]);
        let long = session(1, &"d".repeat(65), 1, 2);
        ensure!(matches!(
            reg.add_session(&long, 1, T0).await,
            Err(RegistryError::Database(_))
        ));
        let addr = "a".repeat(256);
        let res = reg
            .begin_epoch(ServerId(1), Role::App, &addr, ServerState::Up, T0)
            .await;
        ensure!(matches!(res, Err(RegistryError::Database(_))), "{res:?}");
        ensure!(reg.servers().await?.is_empty());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn sessions_of_several_users_on_several_servers() {
    each_backend(|Ctx { reg, .. }| async move {
        ensure!(reg.sessions_of(&[]).await?.is_empty());
        let all = [
            session(20, "a", 2, 5),
            session(10, "b", 2, 9),
            session(10, "c", 2, 3),
            session(30, "d", 1, 1),
            session(10, "e", 1, 7),
            session(40, "f", 1, 2),
            session(20, "g", 3, 4),
        ];
        for s in &all {
            reg.add_session(s, 1, T0).await?;
        }
        let got = reg
            .sessions_of(&[UserId(20), UserId(10), UserId(99), UserId(10)])
            .await?;
        let want = vec![
            session(10, "e", 1, 7),
            session(10, "c", 2, 3),
            session(10, "b", 2, 9),
            session(20, "a", 2, 5),
            session(20, "g", 3, 4),
        ];
        ensure!(got == want, "{got:#?}");
        ensure!(reg.sessions_of(&[UserId(99)]).await?.is_empty());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn sessions_of_2500_users_spans_several_chunks() {
    each_backend(|Ctx { reg, .. }| async move {
        // Users 1..=2500 asked for; every 25th has sessions, on servers that
        // interleave users from different chunks. Users above 2500 must not
        // appear.
        let mut want = Vec::new();
        for user in (25..=2600u64).step_by(25) {
            for server in [1u32, 2] {
                let s = session(
                    user,
                    "d",
                    server + (user % 2) as u32,
                    user * 10 + u64::from(server),
                );
                reg.add_session(&s, 1, T0).await?;
                if user <= 2500 {
                    want.push(s);
                }
            }
        }
        want.sort_by_key(|s| (s.server, s.user, s.channel));
        let users: Vec<UserId> = (1..=2500).rev().map(UserId).collect();
        let got = reg.sessions_of(&users).await?;
        ensure!(got.len() == 200, "{} sessions", got.len());
        ensure!(got == want);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn servers_are_ordered_and_round_trip_every_field() {
    each_backend(|Ctx { reg, url }| async move {
        ensure!(reg.servers().await?.is_empty());
        let ex = ServerId(2);
        reg.begin_epoch(ServerId(30), Role::App, "[::1]:4433", ServerState::Up, T0)
            .await?;
        reg.begin_epoch(
            ex,
            Role::Exchange,
            "ex.example:443",
            ServerState::Up,
            T0 + 1,
        )
        .await?;
        reg.begin_epoch(
            ServerId(u32::MAX),
            Role::App,
            "héllo-ünïcode",
            ServerState::Draining,
            T0 + 2,
        )
        .await?;
        reg.begin_epoch(
            ServerId(30),
            Role::App,
            "[::1]:4433",
            ServerState::Down,
            T0 + 3,
        )
        .await?;
        ensure!(
            reg.record_registration(ServerId(30), 2, ex, T0 + 4).await?
                == Registration::Accepted {
                    attach_epoch: 1,
                    previous: None
                }
        );

        let want = vec![
            ServerRecord {
                id: ex,
                role: Role::Exchange,
                address: "ex.example:443".into(),
                epoch: 1,
                state: ServerState::Up,
                exchange: None,
                attach_epoch: 0,
                registered_at_ms: T0 + 1,
                last_seen_ms: T0 + 1,
            },
            ServerRecord {
                id: ServerId(30),
                role: Role::App,
                address: "[::1]:4433".into(),
                epoch: 2,
                state: ServerState::Up,
                exchange: Some(ex),
                attach_epoch: 1,
                registered_at_ms: T0 + 4,
                last_seen_ms: T0 + 4,
            },
            ServerRecord {
                id: ServerId(u32::MAX),
                role: Role::App,
                address: "héllo-ünïcode".into(),
                epoch: 1,
                state: ServerState::Draining,
                exchange: None,
                attach_epoch: 0,
                registered_at_ms: T0 + 2,
                last_seen_ms: T0 + 2,
            },
        ];
        let got = reg.servers().await?;
        ensure!(got == want, "{got:#?}");
        ensure!(reg.server(ServerId(30)).await? == Some(want[1].clone()));
        ensure!(reg.server(ServerId(31)).await?.is_none());

        // A second handle on the same database sees the same rows, and its
        // migrations are a no-op.
        let again = Registry::connect(&url).await?;
        ensure!(again.servers().await? == want);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_bad_row_is_an_error_not_a_panic() {
    each_backend(|Ctx { reg, url }| async move {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&url).await?;
        conn.execute(
            "INSERT INTO servers (id, role, address, epoch, state, exchange_id, registered_at, last_seen) \
             VALUES (8589934592, 'app', 'a', 1, 'up', NULL, 0, 0)",
        )
        .await?;
        conn.close().await?;
        match reg.servers().await {
            Err(RegistryError::BadRow { what }) => ensure!(what.contains("out of range"), "{what}"),
            other => anyhow::bail!("expected a bad row, got {other:?}"),
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn connect_urls() {
    let mem = Registry::connect("sqlite::memory:")
        .await
        .expect("in-memory sqlite");
    mem.begin_epoch(ServerId(1), Role::App, "a", ServerState::Up, T0)
        .await
        .expect("begin_epoch");
    // Every clone shares the one in-memory database.
    let other = mem.clone();
    assert_eq!(other.servers().await.expect("servers").len(), 1);

    for bad in ["postgres://localhost/db", "nonsense", "sqlite://"] {
        match Registry::connect(bad).await {
            Err(RegistryError::BadUrl(_)) => {}
            other => panic!("{bad}: expected a bad url error, got {other:?}"),
        }
    }
}

#[test]
fn database_url_is_read_from_a_file_without_its_newline() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("url");
    std::fs::write(
        &file,
        "mysql://iim:secret@db/iim?ssl-mode=verify_identity\n",
    )
    .unwrap();
    assert_eq!(
        iim::registry::read_url_file(&file).unwrap(),
        "mysql://iim:secret@db/iim?ssl-mode=verify_identity"
    );
    for bad in ["", "\n  \n", "sqlite://a.db\nsqlite://b.db\n"] {
        std::fs::write(&file, bad).unwrap();
        match iim::registry::read_url_file(&file) {
            Err(e @ RegistryError::UrlFile { .. }) => {
                // The error names the file, never its contents.
                assert!(e.to_string().contains("url"), "{e}");
                assert!(!e.to_string().contains("sqlite://"), "{e}");
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert!(iim::registry::read_url_file(&dir.path().join("missing")).is_err());
}
