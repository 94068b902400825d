//! The relay path end to end: exchange + app servers in one process over
//! real QUIC + mTLS on loopback, registry on MariaDB in CI.

use bytes::Bytes;
use iim::api::LocalReport;
use iim::types::{Address, ChannelId, MessageId, ServerId, Session, UserId};
use iim::wire::{DeliveryStatus, Message, Timing, UserRow};
use iim::{Iim, Outgoing, Plugin};
use iim_appserver::push::Push;
use iim_kit::{
    TestCa, TestDb, UdpProxy, appserver_config, eventually, exchange_config, spawn_appserver,
    spawn_exchange, wait_linked,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn text(kind: u16, from: u64, body: &str) -> Outgoing {
    Outgoing {
        kind,
        from: UserId(from),
        body: Bytes::from(body.to_string()),
        ..Default::default()
    }
}

async fn recv(rx: &mut tokio::sync::mpsc::Receiver<Push>) -> Arc<Message> {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("a message within 15 s")
        .and_then(Push::into_message)
        .expect("connection open")
}

/// Issue test 1: one `send` from server 1 to users on servers 1, 2 and 3 is
/// one 905 and two 906s; every listed connection gets the message once,
/// addressed (0,0), unchanged (nested message and timing included).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_send_is_one_905_and_one_906_per_target_server() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut s = Vec::new();
    for id in 1..=3 {
        s.push(spawn_appserver(&ca, appserver_config(db.url(), id, ex.addr), vec![]).await);
    }
    for srv in &s {
        wait_linked(srv).await;
    }
    let _sender = s[0].connections.attach(UserId(11), "phone").await.unwrap();
    let mut r12 = s[0].connections.attach(UserId(12), "phone").await.unwrap();
    let mut r21a = s[1].connections.attach(UserId(21), "phone").await.unwrap();
    let mut r21b = s[1].connections.attach(UserId(21), "laptop").await.unwrap();
    let mut r22 = s[1].connections.attach(UserId(22), "phone").await.unwrap();
    let mut r31 = s[2].connections.attach(UserId(31), "phone").await.unwrap();
    let users = s[0]
        .iim
        .user_list(&[UserId(12), UserId(21), UserId(22), UserId(31)])
        .await
        .unwrap();
    assert_eq!(users.len(), 5, "five live connections: {users:?}");

    let quoted = Message {
        id: MessageId {
            origin: ServerId(3),
            epoch: 1,
            seq: 9,
        },
        source: Address::new(ServerId(3), UserId(31)),
        target: Address::new(ServerId(1), UserId(11)),
        kind: 7,
        timing: Timing {
            sent_at_ms: 1,
            ordering_key: 2,
        },
        body: Bytes::from_static(b"quoted"),
        nested: vec![],
    };
    let mut out = text(7, 11, "hello everyone");
    out.nested = vec![quoted.clone()];
    out.ordering_key = 77;
    let report = s[0].iim.send(out, &users).await.unwrap();

    assert_eq!(
        report.local,
        LocalReport {
            delivered: 1,
            missing: 0
        }
    );
    assert_eq!(
        report.servers,
        vec![
            (ServerId(2), DeliveryStatus::Delivered),
            (ServerId(3), DeliveryStatus::Delivered)
        ]
    );
    assert_eq!(ex.metrics.forwards_in.get(), 1, "exactly one 905");
    assert_eq!(ex.metrics.frames_in.get("905"), 1);
    assert_eq!(ex.metrics.delivers_out.get(), 2, "exactly two 906s");
    assert_eq!(ex.metrics.acks_in.get(), 2);
    assert_eq!(s[1].metrics.link.delivers_in.get(), 1);
    assert_eq!(s[2].metrics.link.delivers_in.get(), 1);

    // "Delivered" is reported after the target handed the message over, so
    // every connection holds it now.
    for rx in [&mut r12, &mut r21a, &mut r21b, &mut r22, &mut r31] {
        let m = rx
            .rx
            .try_recv()
            .ok()
            .and_then(Push::into_message)
            .expect("delivered before the report");
        assert_eq!(m.id, report.id);
        assert_eq!(m.target, Address::RECEIVER, "target (0,0)");
        assert_eq!(m.source, Address::new(ServerId(1), UserId(11)));
        assert_eq!(m.kind, 7);
        assert_eq!(&m.body[..], b"hello everyone");
        assert_eq!(m.timing.ordering_key, 77);
        assert_eq!(m.nested, vec![quoted.clone()], "nested message intact");
        assert!(rx.rx.try_recv().is_err(), "exactly once");
    }
    assert_eq!(
        s[1].metrics.link.duplicates.get() + s[2].metrics.link.duplicates.get(),
        0
    );

    // A purely local send never touches the exchange.
    let local = s[0].iim.user_list(&[UserId(12)]).await.unwrap();
    let r = s[0].iim.send(text(7, 11, "local"), &local).await.unwrap();
    assert!(r.servers.is_empty());
    assert_eq!(r.local.delivered, 1);
    assert_eq!(ex.metrics.forwards_in.get(), 1);
    db.cleanup().await;
}

/// Unknown and down targets are reported, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_and_down_servers_are_reported() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let _c = s2.connections.attach(UserId(21), "phone").await.unwrap();
    let stale = s1.iim.user_list(&[UserId(21)]).await.unwrap();
    // Server 2 leaves cleanly: the exchange marks it down at once.
    s2.stopped().await;
    let rec = s1.registry.server(ServerId(2)).await.unwrap().unwrap();
    assert_eq!(rec.state, iim::registry::ServerState::Down);
    assert!(
        s1.iim.user_list(&[UserId(21)]).await.unwrap().is_empty(),
        "sessions cleared"
    );

    let mut users = stale;
    users.push(Session {
        user: UserId(77),
        device: "ghost".into(),
        server: ServerId(77),
        channel: ChannelId(1),
    });
    let r = s1.iim.send(text(1, 1, "anyone?"), &users).await.unwrap();
    assert_eq!(
        r.servers,
        vec![
            (ServerId(2), DeliveryStatus::ServerDown),
            (ServerId(77), DeliveryStatus::UnknownServer)
        ]
    );
    db.cleanup().await;
}

/// Every report of a burst says `delivered` to server 2, and the connection
/// received the bodies "0", "1", … once each, in order, and nothing more.
async fn assert_burst_delivered(pending: Vec<iim::PendingReport>, r: &mut iim_appserver::Attached) {
    let n = pending.len();
    for (i, p) in pending.into_iter().enumerate() {
        let rep = tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("report in time");
        assert_eq!(
            rep.servers,
            vec![(ServerId(2), DeliveryStatus::Delivered)],
            "message {i}"
        );
    }
    for i in 0..n {
        let m = recv(&mut r.rx).await;
        assert_eq!(
            std::str::from_utf8(&m.body).unwrap(),
            i.to_string(),
            "in order, no loss, no duplicate"
        );
    }
    assert!(r.rx.try_recv().is_err(), "nothing beyond the burst");
}

async fn burst_across_a_cut(cut_origin: bool) {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let proxy = UdpProxy::start(ex.addr).await;
    let (a1, a2) = if cut_origin {
        (proxy.addr(), ex.addr)
    } else {
        (ex.addr, proxy.addr())
    };
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, a1), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, a2), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let cut_side = if cut_origin { &s1 } else { &s2 };
    let mut r = s2.connections.attach(UserId(21), "phone").await.unwrap();
    let users = s1.iim.user_list(&[UserId(21)]).await.unwrap();

    let mut pending = Vec::with_capacity(1000);
    for i in 0..1000u32 {
        if i == 300 {
            // Cut in the middle of the burst, and keep it cut until QUIC
            // gives the connection up (idle timeout 1 s).
            proxy.cut();
            eventually!(
                10,
                "the cut link to drop",
                cut_side.link().exchange.is_none()
            );
        }
        if i == 700 {
            proxy.restore();
        }
        pending.push(
            s1.iim
                .submit(text(1, 1, &i.to_string()), &users)
                .await
                .unwrap(),
        );
    }
    assert_burst_delivered(pending, &mut r).await;
    assert!(
        cut_side.metrics.link.link_connects.get() >= 2,
        "the link really reconnected"
    );
    if cut_origin {
        assert!(
            s1.metrics.link.forwards_resent.get() > 0,
            "905s were sent again"
        );
    }
    db.cleanup().await;
}

/// Issue test 2: 1,000 messages from server 1 to a user on server 2 arrive
/// in order although the link between server 2 and the exchange is cut and
/// restored in the middle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_in_order_across_a_target_link_cut() {
    burst_across_a_cut(false).await;
}

/// The same with the origin's link cut: its unreported 905s are sent again
/// and the target drops what it already delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_in_order_across_an_origin_link_cut() {
    burst_across_a_cut(true).await;
}

/// Records every delivery it sees and answers kind-7 messages by sending a
/// kind-8 reply to the sender, as a plugin author would.
struct Echo {
    iim: Mutex<Option<Iim>>,
    seen: Mutex<Vec<(MessageId, Vec<UserRow>)>>,
}

impl Plugin for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn start(&self, iim: Iim) {
        *self.iim.lock().unwrap() = Some(iim);
    }

    fn on_message(&self, msg: &Arc<Message>, recipients: &[UserRow]) {
        self.seen
            .lock()
            .unwrap()
            .push((msg.id, recipients.to_vec()));
        if msg.kind != 7 {
            return;
        }
        let Some(iim) = self.iim.lock().unwrap().clone() else {
            return;
        };
        let to = msg.source.user;
        let from = recipients[0].user;
        tokio::spawn(async move {
            let users = iim.user_list(&[to]).await.unwrap();
            let _ = iim.send(text(8, from.0, "pong"), &users).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_receives_deliveries_and_sends_through_the_relay() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let echo = Arc::new(Echo {
        iim: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
    });
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(
        &ca,
        appserver_config(db.url(), 2, ex.addr),
        vec![echo.clone()],
    )
    .await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let mut alice = s1.connections.attach(UserId(11), "phone").await.unwrap();
    let _bob = s2.connections.attach(UserId(21), "phone").await.unwrap();
    let users = s1.iim.user_list(&[UserId(21)]).await.unwrap();
    let rep = s1.iim.send(text(7, 11, "ping"), &users).await.unwrap();
    assert!(rep.all_delivered());
    let pong = recv(&mut alice.rx).await;
    assert_eq!(pong.kind, 8);
    assert_eq!(&pong.body[..], b"pong");
    assert_eq!(pong.source, Address::new(ServerId(2), UserId(21)));
    let seen = echo.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, rep.id);
    assert_eq!(seen[0].1[0].user, UserId(21));
    db.cleanup().await;
}

/// The exchange crashes in the middle of a burst and comes back on the same
/// address: every message still arrives once, in order. Nothing the
/// exchange held in memory is needed: the origin's outbox resends what was
/// not reported, the target's filter drops what it already had.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_in_order_across_an_exchange_crash() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let mut cfg = exchange_config(db.url());
    cfg.listen = format!("127.0.0.1:{}", iim_kit::proc::free_port(true))
        .parse()
        .unwrap();
    let ex = iim_kit::CrashableExchange::start(&ca, cfg.clone());
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let mut r = s2.connections.attach(UserId(21), "phone").await.unwrap();
    let users = s1.iim.user_list(&[UserId(21)]).await.unwrap();
    let mut ex = Some(ex);
    let mut pending = Vec::with_capacity(1000);
    for i in 0..1000u32 {
        if i == 400 {
            ex.take().unwrap().crash();
            eventually!(
                10,
                "both links to notice",
                s1.link().exchange.is_none() && s2.link().exchange.is_none()
            );
        }
        if i == 600 {
            ex = Some(iim_kit::CrashableExchange::start(&ca, cfg.clone()));
        }
        pending.push(
            s1.iim
                .submit(text(1, 1, &i.to_string()), &users)
                .await
                .unwrap(),
        );
    }
    assert_burst_delivered(pending, &mut r).await;
    assert!(s1.metrics.link.forwards_resent.get() > 0);
    assert!(ex.unwrap().metrics.forwards_in.get() > 0);
    db.cleanup().await;
}

/// Frame limits differ between nodes: a 906 the target would refuse is
/// reported, not retried forever; a 905 the exchange would refuse is
/// refused to the caller; everything within limits still flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frame_limits_announced_by_peers_are_honoured() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let mut ecfg = exchange_config(db.url());
    ecfg.max_frame_bytes = 64 * 1024;
    let (ex, _stop) = spawn_exchange(&ca, ecfg).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let mut small = appserver_config(db.url(), 2, ex.addr);
    small.max_frame_bytes = 4_096;
    let s2 = spawn_appserver(&ca, small, vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let mut r = s2.connections.attach(UserId(21), "phone").await.unwrap();
    let users = s1.iim.user_list(&[UserId(21)]).await.unwrap();

    let big = "x".repeat(8_000);
    let rep = s1.iim.send(text(1, 1, &big), &users).await.unwrap();
    assert_eq!(rep.servers, vec![(ServerId(2), DeliveryStatus::Overloaded)]);
    let huge = "y".repeat(100_000);
    let err = s1.iim.send(text(1, 1, &huge), &users).await.unwrap_err();
    assert!(
        matches!(err, iim::SendError::TooLarge { max: 65_536, .. }),
        "{err:?}"
    );

    let rep = s1.iim.send(text(1, 1, "fits"), &users).await.unwrap();
    assert!(rep.all_delivered());
    assert_eq!(&recv(&mut r.rx).await.body[..], b"fits");
    assert!(r.rx.try_recv().is_err());
    assert_eq!(s2.metrics.link.link_connects.get(), 1, "no reconnect loop");
    db.cleanup().await;
}

/// Every live client connection keeps its session row, which is how
/// senders find it. An exchange that loses sight of an app server for a
/// lease marks it down and deletes its rows — also when the server was
/// alive all along (cut off here; after an exchange restart, a server that
/// came back a moment late). When the server registers again, its audit
/// writes the rows back: its users are found by `user_list`, receive what
/// is sent to them, and are online again in the presence table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_server_marked_down_gets_its_sessions_back_when_it_returns() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let mut cfg = exchange_config(db.url());
    cfg.lease_secs = 1;
    let (ex, _stop) = spawn_exchange(&ca, cfg).await;
    let proxy = UdpProxy::start(ex.addr).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, proxy.addr()), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let mut r = s2.connections.attach(UserId(21), "phone").await.unwrap();
    let channel = r.session.channel;
    let reg = iim::registry::Registry::connect(db.url()).await.unwrap();
    let presence = iim::presence::PresenceStore::new(&reg);
    let online = || async {
        presence
            .rows(&[UserId(21)])
            .await
            .unwrap()
            .first()
            .is_some_and(|p| p.status == iim::presence::Status::Online)
    };
    // What the gateway does for a client that connects.
    presence
        .recompute(UserId(21), ServerId(2), iim::types::now_ms())
        .await
        .unwrap();
    assert!(online().await);

    proxy.cut();
    let state = || async {
        reg.server(ServerId(2))
            .await
            .unwrap()
            .map(|s| s.state.to_string())
    };
    // Marked down by the exchange: the row and the user's presence go.
    eventually!(
        20,
        "server 2 marked down",
        state().await.as_deref() == Some("down")
    );
    assert!(s1.iim.user_list(&[UserId(21)]).await.unwrap().is_empty());
    assert!(!online().await, "21 offline once its server is marked down");
    assert_eq!(
        s2.epoch,
        reg.server(ServerId(2)).await.unwrap().unwrap().epoch
    );

    proxy.restore();
    eventually!(
        20,
        "server 2 back up",
        state().await.as_deref() == Some("up")
    );
    eventually!(
        20,
        "the live connection's session row written back",
        s1.iim.user_list(&[UserId(21)]).await.unwrap().len() == 1
    );
    let users = s1.iim.user_list(&[UserId(21)]).await.unwrap();
    assert_eq!(users[0].channel, channel);
    assert!(s2.metrics.sessions_restored.get() >= 1);
    eventually!(20, "21 online again", online().await);
    let report = s1.iim.send(text(100, 11, "after"), &users).await.unwrap();
    assert!(report.all_delivered(), "{report:?}");
    assert_eq!(&recv(&mut r.rx).await.body[..], b"after");
    db.cleanup().await;
}
