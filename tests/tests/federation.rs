//! Several exchanges on one registry, in one process over real QUIC + mTLS
//! on loopback (registry on MariaDB in CI): app servers attach to their
//! preferred exchange, exchanges link to each other and relay a 905's rows
//! once per peer; when an exchange is killed its app servers attach to
//! another and nothing acknowledged is lost or delivered twice.

use bytes::Bytes;
use iim::types::{ServerId, UserId};
use iim::wire::DeliveryStatus;
use iim::{Outgoing, PendingReport};
use iim_appserver::push::Push;
use iim_kit::{
    CrashableExchange, TestCa, TestDb, appserver_config, eventually, exchange_config,
    spawn_appserver, spawn_exchange, wait_linked,
};
use std::time::{Duration, Instant};

fn text(from: u64, body: &str) -> Outgoing {
    Outgoing {
        kind: 1,
        from: UserId(from),
        body: Bytes::from(body.to_string()),
        ..Default::default()
    }
}

fn exchange(db: &str, id: u32) -> iim_exchange::Config {
    let mut cfg = exchange_config(db);
    cfg.id = id;
    cfg.lease_secs = 2;
    cfg.listen = format!("127.0.0.1:{}", iim_kit::proc::free_port(true))
        .parse()
        .expect("addr");
    cfg
}

/// An app server that finds its exchange in the registry, preferring
/// `prefer`.
fn server(db: &str, id: u32, prefer: u32) -> iim_appserver::Config {
    let mut cfg = appserver_config(db, id, "127.0.0.1:1".parse().expect("addr"));
    cfg.exchange = None;
    cfg.prefer_exchange = Some(prefer);
    cfg
}

/// Every pending report says delivered to `target`, and `rx` got exactly
/// those messages, in send order, once each.
async fn assert_all_delivered(
    pending: Vec<PendingReport>,
    target: ServerId,
    rx: &mut tokio::sync::mpsc::Receiver<Push>,
) {
    let mut ids = Vec::new();
    for p in pending {
        let id = p.id();
        let r = tokio::time::timeout(Duration::from_secs(40), p)
            .await
            .expect("a report within 40 s");
        assert_eq!(
            r.servers,
            vec![(target, DeliveryStatus::Delivered)],
            "message {id}"
        );
        ids.push(id);
    }
    for id in ids {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("delivered before its report")
            .and_then(Push::into_message)
            .expect("connection open");
        assert_eq!(m.id, id, "in send order, each once");
    }
    assert!(rx.try_recv().is_err(), "nothing more, nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_exchanges_relay_once_per_peer_and_survive_one_killed() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let (x100, _stop100) = spawn_exchange(&ca, exchange(db.url(), 100)).await;
    let cfg101 = exchange(db.url(), 101);
    let x101 = CrashableExchange::start(&ca, cfg101.clone());
    let s1 = spawn_appserver(&ca, server(db.url(), 1, 100), vec![]).await;
    let s2 = spawn_appserver(&ca, server(db.url(), 2, 101), vec![]).await;
    let s3 = spawn_appserver(&ca, server(db.url(), 3, 101), vec![]).await;
    for s in [&s1, &s2, &s3] {
        wait_linked(s).await;
    }
    assert_eq!(s1.link().exchange, Some(ServerId(100)));
    assert_eq!(s2.link().exchange, Some(ServerId(101)));
    assert_eq!(s3.link().exchange, Some(ServerId(101)));
    eventually!(
        10,
        "the exchanges to link to each other",
        x100.metrics.peer_links.get() == 1 && x101.metrics.peer_links.get() == 1
    );

    let mut r2 = s2.connections.attach(UserId(21), "phone").await.unwrap();
    let mut r3 = s3.connections.attach(UserId(31), "phone").await.unwrap();
    let both = s1.iim.user_list(&[UserId(21), UserId(31)]).await.unwrap();
    // Exchange 100 may learn of 2 and 3 from 101's announcements a moment
    // after they registered: wait for the first delivery.
    let first = s1.iim.send(text(11, "hello"), &both).await.unwrap();
    assert_eq!(
        first.servers,
        vec![
            (ServerId(2), DeliveryStatus::Delivered),
            (ServerId(3), DeliveryStatus::Delivered)
        ]
    );
    // Both rows left exchange 100 in one relay frame to 101.
    assert_eq!(x100.metrics.relays_out.get(), 2);
    assert_eq!(x101.metrics.relays_in.get(), 1);
    for rx in [&mut r2, &mut r3] {
        let m = rx.rx.try_recv().ok().and_then(Push::into_message).unwrap();
        assert_eq!(m.id, first.id);
        assert!(rx.rx.try_recv().is_err(), "exactly once");
    }

    // Exchange 101 is killed while server 1 sends 300 messages to a user on
    // server 2; servers 2 and 3 attach to exchange 100.
    let to2 = s1.iim.user_list(&[UserId(21)]).await.unwrap();
    let mut pending = Vec::new();
    let mut x101 = Some(x101);
    let mut killed_at = None;
    for i in 0..300u32 {
        if i == 100 {
            x101.take().unwrap().crash();
            killed_at = Some(Instant::now());
        }
        pending.push(s1.iim.submit(text(11, &i.to_string()), &to2).await.unwrap());
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eventually!(
        20,
        "servers 2 and 3 to attach to exchange 100",
        s2.link().exchange == Some(ServerId(100)) && s3.link().exchange == Some(ServerId(100))
    );
    let moved = killed_at.unwrap().elapsed();
    println!(
        "servers re-attached {} ms after the kill",
        moved.as_millis()
    );
    // Exchange 100 counts them as re-attachments (they were attached to
    // 101), server 1 as new.
    let page = iim::metrics::Render::render(x100.metrics.as_ref());
    let kind = |k: &str| {
        let series = format!("iim_exchange_attachments_total{{kind=\"{k}\"}}");
        iim_http::client::metric_value(&page, &series)
    };
    assert_eq!(
        (kind("new"), kind("moved_here")),
        (Some(1.0), Some(2.0)),
        "{page}"
    );
    assert_all_delivered(pending, ServerId(2), &mut r2.rx).await;

    // From their new exchange they reach each other.
    let to3 = s2.iim.user_list(&[UserId(31)]).await.unwrap();
    let r = s2.iim.send(text(21, "after"), &to3).await.unwrap();
    assert_eq!(r.servers, vec![(ServerId(3), DeliveryStatus::Delivered)]);
    let m = r3.rx.recv().await.and_then(Push::into_message).unwrap();
    assert_eq!(&m.body[..], b"after");

    // Exchange 101 comes back: the peer link is restored.
    let x101 = CrashableExchange::start(&ca, cfg101);
    eventually!(
        15,
        "the peer link to come back",
        x100.metrics.peer_links.get() == 1 && x101.metrics.peer_links.get() == 1
    );
    db.cleanup().await;
}

/// A rolling restart of every exchange (SIGTERM: drain) while messages
/// flow both ways: app servers move to the other exchange as theirs
/// stops, and no report says anything but delivered — no `server_down`,
/// no `timed_out`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_exchange_loses_and_refuses_nothing() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let cfg = [exchange(db.url(), 100), exchange(db.url(), 101)];
    let mut xs = Vec::new();
    for c in &cfg {
        xs.push(Some(spawn_exchange(&ca, c.clone()).await));
    }
    let s1 = spawn_appserver(&ca, server(db.url(), 1, 100), vec![]).await;
    let s2 = spawn_appserver(&ca, server(db.url(), 2, 101), vec![]).await;
    for s in [&s1, &s2] {
        wait_linked(s).await;
    }
    let mut r1 = s1.connections.attach(UserId(11), "phone").await.unwrap();
    let mut r2 = s2.connections.attach(UserId(21), "phone").await.unwrap();
    let to2 = s1.iim.user_list(&[UserId(21)]).await.unwrap();
    let to1 = s2.iim.user_list(&[UserId(11)]).await.unwrap();
    for (i, c) in cfg.iter().enumerate() {
        // Messages both ways while exchange `c.id` drains and restarts.
        let mut p12 = Vec::new();
        let mut p21 = Vec::new();
        for n in 0..200u32 {
            if n == 50 {
                let (handle, stop) = xs[i].take().expect("running");
                stop.cancel();
                handle.stopped().await;
            }
            if n == 150 {
                xs[i] = Some(spawn_exchange(&ca, c.clone()).await);
            }
            p12.push(
                s1.iim
                    .submit(text(11, &format!("{i}.{n}")), &to2)
                    .await
                    .unwrap(),
            );
            p21.push(
                s2.iim
                    .submit(text(21, &format!("{i}.{n}")), &to1)
                    .await
                    .unwrap(),
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_all_delivered(p12, ServerId(2), &mut r2.rx).await;
        assert_all_delivered(p21, ServerId(1), &mut r1.rx).await;
        // The server that was on the drained exchange moved (registered
        // again elsewhere) while its exchange was away.
        let moved = [&s1, &s2][i];
        assert!(
            moved.metrics.link.link_connects.get() >= 2,
            "server {} moved",
            i + 1
        );
        eventually!(
            15,
            "the restarted exchange to link to the other again",
            xs.iter()
                .flatten()
                .all(|(h, _)| h.metrics.peer_links.get() == 1)
        );
    }
    db.cleanup().await;
}

/// Three exchanges, two app servers on each: one send from server 1 to a
/// user on every server is one 905 at its exchange, one relay frame to each
/// other exchange, and one 906 per target server; every user gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_exchanges_one_905_one_relay_frame_per_peer_one_906_per_target() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let mut xs = Vec::new();
    for id in [100, 101, 102] {
        xs.push(spawn_exchange(&ca, exchange(db.url(), id)).await);
    }
    let mut s = Vec::new();
    for id in 1..=6u32 {
        let prefer = 100 + (id - 1) / 2;
        s.push(spawn_appserver(&ca, server(db.url(), id, prefer), vec![]).await);
    }
    for (i, srv) in s.iter().enumerate() {
        wait_linked(srv).await;
        assert_eq!(srv.link().exchange, Some(ServerId(100 + i as u32 / 2)));
    }
    eventually!(
        10,
        "every exchange to link to both others",
        xs.iter().all(|(x, _)| x.metrics.peer_links.get() == 2)
    );
    let mut rx = Vec::new();
    for (i, srv) in s.iter().enumerate() {
        rx.push(
            srv.connections
                .attach(UserId(10 + i as u64 + 1), "phone")
                .await
                .unwrap(),
        );
    }
    let everyone: Vec<UserId> = (11..=16).map(UserId).collect();
    let users = s[0].iim.user_list(&everyone).await.unwrap();
    let r = s[0].iim.send(text(11, "to all"), &users).await.unwrap();
    assert_eq!(r.local.delivered, 1);
    assert_eq!(
        r.servers,
        (2..=6)
            .map(|t| (ServerId(t), DeliveryStatus::Delivered))
            .collect::<Vec<_>>()
    );
    let (x100, x101, x102) = (&xs[0].0.metrics, &xs[1].0.metrics, &xs[2].0.metrics);
    assert_eq!(x100.forwards_in.get(), 1, "one 905");
    assert_eq!((x101.forwards_in.get(), x102.forwards_in.get()), (0, 0));
    assert_eq!(x100.relays_out.get(), 4, "four rows relayed");
    assert_eq!(
        (x101.relays_in.get(), x102.relays_in.get()),
        (1, 1),
        "one relay frame to each other exchange"
    );
    assert_eq!(
        (
            x100.delivers_out.get(),
            x101.delivers_out.get(),
            x102.delivers_out.get()
        ),
        (1, 2, 2),
        "one 906 per target server"
    );
    let page = iim::metrics::Render::render(x100.as_ref());
    for peer in [101, 102] {
        for line in [
            format!("iim_exchange_peer_relay_frames_out_total{{peer=\"{peer}\"}} 1"),
            format!("iim_exchange_peer_link_up{{peer=\"{peer}\"}} 1"),
        ] {
            assert!(page.contains(&line), "{line} in\n{page}");
        }
    }
    for a in rx.iter_mut() {
        let m = a.rx.try_recv().ok().and_then(Push::into_message).unwrap();
        assert_eq!(m.id, r.id);
        assert!(a.rx.try_recv().is_err(), "exactly once");
    }
    db.cleanup().await;
}

/// Traffic from every server to every other while each exchange in turn is
/// killed (no drain, no goodbye) and restarted, `KILLS` times: nothing
/// reported delivered is missing, nothing arrives twice, every (origin,
/// target) pair keeps its order. Prints the figures for the failure table
/// in `docs/benchmarks.md`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exchanges_killed_in_turn_under_all_to_all_traffic() {
    const KILLS: usize = 20;
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let cfgs: Vec<iim_exchange::Config> = [100, 101, 102]
        .iter()
        .map(|id| exchange(db.url(), *id))
        .collect();
    let mut xs: Vec<Option<CrashableExchange>> = cfgs
        .iter()
        .map(|c| Some(CrashableExchange::start(&ca, c.clone())))
        .collect();
    let mut s = Vec::new();
    for id in 1..=6u32 {
        s.push(std::sync::Arc::new(
            spawn_appserver(&ca, server(db.url(), id, 100 + (id - 1) / 2), vec![]).await,
        ));
    }
    for srv in &s {
        wait_linked(srv).await;
    }
    // Every receiver records (origin server, number) in arrival order.
    let got: std::sync::Arc<std::sync::Mutex<Vec<(u32, u32, u64)>>> = Default::default();
    for (i, srv) in s.iter().enumerate() {
        let mut a = srv
            .connections
            .attach(UserId(11 + i as u64), "phone")
            .await
            .unwrap();
        let got = got.clone();
        let me = i as u32 + 1;
        tokio::spawn(async move {
            while let Some(p) = a.rx.recv().await {
                if let Some(m) = p.into_message() {
                    let body = std::str::from_utf8(&m.body).unwrap().to_owned();
                    let (o, n) = body.split_once(':').unwrap();
                    got.lock()
                        .unwrap()
                        .push((o.parse().unwrap(), me, n.parse().unwrap()));
                }
            }
        });
    }
    // Every server sends to every other, a message each 20 ms.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut senders = Vec::new();
    for (i, srv) in s.iter().enumerate() {
        let srv = srv.clone();
        let stop = stop.clone();
        let others: Vec<UserId> = (0..6)
            .filter(|j| *j != i)
            .map(|j| UserId(11 + j as u64))
            .collect();
        senders.push(tokio::spawn(async move {
            let users = srv.iim.user_list(&others).await.unwrap();
            let mut pending = Vec::new();
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let body = format!("{}:{n}", i + 1);
                pending.push((n, srv.iim.submit(text(1, &body), &users).await.unwrap()));
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut reports = Vec::new();
            for (n, p) in pending {
                let r = tokio::time::timeout(Duration::from_secs(60), p)
                    .await
                    .expect("a report within 60 s");
                reports.push((n, r.servers));
            }
            reports
        }));
    }
    let mut moved = Vec::new();
    for kill in 0..KILLS {
        let i = kill % 3;
        let id = ServerId(100 + i as u32);
        let on_it: Vec<usize> = (0..6)
            .filter(|j| s[*j].link().exchange == Some(id))
            .collect();
        xs[i].take().unwrap().crash();
        let t0 = Instant::now();
        eventually!(
            20,
            "the killed exchange's servers to attach to another",
            on_it.iter().all(|j| {
                let e = s[*j].link().exchange;
                e.is_some() && e != Some(id)
            })
        );
        if !on_it.is_empty() {
            moved.push(t0.elapsed());
        }
        xs[i] = Some(CrashableExchange::start(&ca, cfgs[i].clone()));
        eventually!(
            20,
            "the restarted exchange to link to both others",
            xs.iter().flatten().all(|x| x.metrics.peer_links.get() == 2)
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let mut sent = 0u64;
    let mut by_status = std::collections::BTreeMap::<&str, u64>::new();
    let mut delivered = std::collections::BTreeSet::new();
    for (i, h) in senders.into_iter().enumerate() {
        for (n, servers) in h.await.unwrap() {
            sent += 1;
            for (t, st) in servers {
                *by_status.entry(st.as_str()).or_default() += 1;
                if st == DeliveryStatus::Delivered {
                    delivered.insert((i as u32 + 1, t.0, n));
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = got.lock().unwrap().clone();
    let received: std::collections::BTreeSet<(u32, u32, u64)> = got.iter().copied().collect();
    assert_eq!(received.len(), got.len(), "nothing arrived twice");
    let lost: Vec<_> = delivered.difference(&received).collect();
    assert!(
        lost.is_empty(),
        "reported delivered, never received: {lost:?}"
    );
    let mut last = std::collections::BTreeMap::<(u32, u32), u64>::new();
    let mut reordered = 0;
    for (o, t, n) in &got {
        if let Some(prev) = last.insert((*o, *t), *n)
            && prev > *n
        {
            reordered += 1;
        }
    }
    assert_eq!(reordered, 0, "per (origin, target) order");
    moved.sort();
    println!(
        "{KILLS} exchange kills; {sent} messages to 5 servers each; outcomes {by_status:?}; \
         {} received; lost 0, duplicated 0, reordered 0; servers re-attached after the kill \
         p50 {} ms, max {} ms",
        got.len(),
        moved[moved.len() / 2].as_millis(),
        moved.last().unwrap().as_millis()
    );
    db.cleanup().await;
}
