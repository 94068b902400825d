//! Identity and bad input at the exchange, with hand-driven QUIC clients
//! next to well-behaved app servers (issue tests 3 and 4).

use bytes::{BufMut, Bytes, BytesMut};
use iim::quic::FrameReader;
use iim::registry::{Role, ServerState};
use iim::tls::TlsMaterial;
use iim::types::{Address, MessageId, ServerId, UserId, now_ms};
use iim::wire::{
    self, DEFAULT_MAX_FRAME, ErrorCode, Forward905, Frame, Message, Register, ServerRow, Timing,
    UserRow,
};
use iim::{DeliveryStatus, Outgoing};
use iim_appserver::AppServerHandle;
use iim_appserver::push::Push;
use iim_exchange::ExchangeHandle;
use iim_kit::{
    EXCHANGE, TestCa, TestDb, appserver_config, eventually, exchange_config, spawn_appserver,
    spawn_exchange, wait_linked,
};
use std::net::SocketAddr;
use std::time::Duration;

/// A QUIC client speaking the link protocol by hand.
struct Raw {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    _endpoint: quinn::Endpoint,
}

async fn connect(tls: &TlsMaterial, addr: SocketAddr) -> Result<Raw, String> {
    let cfg = iim::tls::quic_client_config(tls, iim_kit::test_quic().transport())
        .map_err(|e| e.to_string())?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(cfg, addr, &iim::tls::exchange_name(EXCHANGE))
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    Ok(Raw {
        conn,
        send,
        reader: FrameReader::new(recv, DEFAULT_MAX_FRAME),
        _endpoint: endpoint,
    })
}

impl Raw {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.send.write_all(bytes).await.map_err(|e| e.to_string())
    }

    async fn frame(&mut self, f: &Frame) -> Result<(), String> {
        let b = wire::encode_to_bytes(f, DEFAULT_MAX_FRAME).unwrap();
        self.write(&b).await
    }

    async fn register(&mut self, server: ServerId, epoch: u64) -> Result<Frame, String> {
        self.frame(&Frame::Register(Register {
            server,
            epoch,
            max_frame: DEFAULT_MAX_FRAME as u32,
        }))
        .await?;
        match tokio::time::timeout(Duration::from_secs(10), self.reader.next()).await {
            Ok(Ok(Some(f))) => Ok(f),
            Ok(Ok(None)) => Err("stream finished".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".into()),
        }
    }

    /// The next frame, which must be a report.
    async fn report(&mut self) -> iim::wire::Report {
        match tokio::time::timeout(Duration::from_secs(10), self.reader.next()).await {
            Ok(Ok(Some(Frame::Report(r)))) => r,
            other => panic!("expected a report, got {other:?}"),
        }
    }

    /// How the exchange closed this connection: its error code.
    async fn closed_with(&self) -> Option<ErrorCode> {
        let e = tokio::time::timeout(Duration::from_secs(10), self.conn.closed())
            .await
            .expect("the exchange closes the connection");
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                ErrorCode::from_close_code(c.error_code.into_inner())
            }
            _ => None,
        }
    }
}

/// A raw client registered as `id` (its epoch taken from the registry).
async fn registered(
    ca: &TestCa,
    ex: &ExchangeHandle,
    reg: &iim::registry::Registry,
    id: u32,
) -> Raw {
    let epoch = reg
        .begin_epoch(ServerId(id), Role::App, "raw", ServerState::Down, now_ms())
        .await
        .unwrap();
    let mut raw = connect(&ca.server(ServerId(id)), ex.addr).await.unwrap();
    let answer = raw.register(ServerId(id), epoch).await.unwrap();
    assert!(matches!(answer, Frame::Registered(_)), "{answer:?}");
    raw
}

struct World {
    db: TestDb,
    ca: TestCa,
    ex: ExchangeHandle,
    s1: AppServerHandle,
    s2: AppServerHandle,
    rx2: iim_appserver::Attached,
}

async fn world() -> World {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let (ex, _) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let rx2 = s2.connections.attach(UserId(21), "phone").await.unwrap();
    World {
        db,
        ca,
        ex,
        s1,
        s2,
        rx2,
    }
}

impl World {
    /// A legitimate send from server 1 to user 21 on server 2 still works,
    /// and neither well-behaved link was disturbed.
    async fn still_serving(&mut self, body: &str) {
        let users = self.s1.iim.user_list(&[UserId(21)]).await.unwrap();
        let out = Outgoing {
            kind: 1,
            from: UserId(11),
            body: Bytes::from(body.to_string()),
            ..Default::default()
        };
        let r = self.s1.iim.send(out, &users).await.unwrap();
        assert_eq!(r.servers, vec![(ServerId(2), DeliveryStatus::Delivered)]);
        let m = queued(&mut self.rx2).expect("delivered");
        assert_eq!(&m.body[..], body.as_bytes());
        assert_eq!(self.s1.metrics.link.link_connects.get(), 1);
        assert_eq!(self.s2.metrics.link.link_connects.get(), 1);
    }
}

/// The relayed message queued for a connection, if any.
fn queued(c: &mut iim_appserver::Attached) -> Option<std::sync::Arc<Message>> {
    c.rx.try_recv().ok().and_then(Push::into_message)
}

fn forward(origin: u32, source: u32, target_server: u32, channel: u64) -> Frame {
    let id = MessageId {
        origin: ServerId(origin),
        epoch: 1,
        seq: 1,
    };
    let msg = Message {
        id,
        source: Address::new(ServerId(source), UserId(5)),
        target: Address::RECEIVER,
        kind: 1,
        timing: Timing::default(),
        body: Bytes::from_static(b"forged"),
        nested: vec![],
    };
    Frame::Forward(Forward905 {
        id,
        source: Address::new(ServerId(source), UserId(5)),
        target: Address::new(EXCHANGE, UserId::NONE),
        rows: vec![ServerRow {
            server: ServerId(target_server),
            via: EXCHANGE,
            seq: 1,
            users: vec![UserRow {
                user: UserId(21),
                channel: iim::ChannelId(channel),
            }],
        }],
        message: msg.encode(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_from_another_ca_is_refused() {
    let mut w = world().await;
    let other = TestCa::new();
    // The TLS 1.3 refusal shows on the first stream operation.
    let refused = match connect(&other.server(ServerId(7)), w.ex.addr).await {
        Err(e) => Some(e),
        Ok(mut raw) => raw.register(ServerId(7), 1).await.err(),
    };
    assert!(refused.is_some(), "a foreign certificate must not get in");
    eventually!(
        10,
        "the refusal counted",
        w.ex.metrics.rejections.get("tls_handshake") == 1
    );
    // An app server configured with such a certificate never links.
    let mut cfg = appserver_config(w.db.url(), 8, w.ex.addr);
    cfg.reconnect_max_ms = 100;
    let tls = other.server(ServerId(8));
    let s8 = iim_appserver::start(cfg, tls, vec![], Default::default())
        .await
        .unwrap();
    eventually!(
        10,
        "repeated refusals",
        w.ex.metrics.rejections.get("tls_handshake") >= 3
    );
    assert_eq!(s8.link().exchange, None);
    w.still_serving("after foreign CA").await;
    w.db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certified_server_claiming_another_id_is_refused() {
    let mut w = world().await;
    let reg = w.s1.registry.clone();
    let epoch5 = reg
        .begin_epoch(ServerId(5), Role::App, "raw", ServerState::Down, now_ms())
        .await
        .unwrap();
    // Server 6's certificate, claiming to be server 5.
    let mut raw = connect(&w.ca.server(ServerId(6)), w.ex.addr).await.unwrap();
    assert!(raw.register(ServerId(5), epoch5).await.is_err());
    assert_eq!(raw.closed_with().await, Some(ErrorCode::IdentityMismatch));
    assert_eq!(w.ex.metrics.rejections.get("identity_mismatch"), 1);
    assert_eq!(
        reg.server(ServerId(5)).await.unwrap().unwrap().state,
        ServerState::Down,
        "the registry never recorded the claim"
    );

    // A correctly certified server with an epoch the registry did not issue.
    let mut raw = connect(&w.ca.server(ServerId(5)), w.ex.addr).await.unwrap();
    assert!(raw.register(ServerId(5), epoch5 + 7).await.is_err());
    assert_eq!(raw.closed_with().await, Some(ErrorCode::StaleEpoch));
    assert_eq!(w.ex.metrics.rejections.get("stale_epoch"), 1);

    // The app server with a mismatched certificate learns it for good.
    let cfg = appserver_config(w.db.url(), 9, w.ex.addr);
    let s9 = iim_appserver::start(cfg, w.ca.server(ServerId(6)), vec![], Default::default())
        .await
        .unwrap();
    let mut watch = s9.link_watch();
    let fatal = tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| s.fatal.is_some()),
    )
    .await
    .expect("fatal in time")
    .unwrap()
    .fatal
    .clone()
    .unwrap();
    assert!(fatal.contains("IdentityMismatch"), "{fatal}");
    w.still_serving("after impostors").await;
    w.db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_905_with_a_forged_source_is_refused_and_counted() {
    let mut w = world().await;
    let reg = w.s1.registry.clone();
    let channel = w.rx2.session.channel.0;

    // Registered as 7, claims its 905 comes from server 1.
    let mut raw = registered(&w.ca, &w.ex, &reg, 7).await;
    raw.frame(&forward(1, 1, 2, channel)).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::ForgedSource));
    assert_eq!(w.ex.metrics.rejections.get("forged_source"), 1);

    // Honest source, forged message id origin.
    let mut raw = registered(&w.ca, &w.ex, &reg, 7).await;
    raw.frame(&forward(1, 7, 2, channel)).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::ForgedSource));
    assert_eq!(w.ex.metrics.rejections.get("forged_source"), 2);

    // Honest source and origin, an epoch the registry did not issue to it.
    let mut raw = registered(&w.ca, &w.ex, &reg, 7).await;
    let mut f = forward(7, 7, 2, channel);
    if let Frame::Forward(fwd) = &mut f {
        fwd.id.epoch = 999;
    }
    raw.frame(&f).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::ForgedSource));
    assert_eq!(w.ex.metrics.rejections.get("forged_source"), 3);

    assert_eq!(w.ex.metrics.forwards_in.get(), 0, "nothing forwarded");
    assert_eq!(
        w.s2.metrics.link.delivers_in.get(),
        0,
        "the victim received nothing"
    );
    assert!(w.rx2.rx.try_recv().is_err());
    w.still_serving("after forgery").await;
    w.db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_and_malformed_frames_close_only_the_offender() {
    let mut w = world().await;
    let reg = w.s1.registry.clone();

    // A length prefix over the limit: refused before the body arrives.
    let mut raw = registered(&w.ca, &w.ex, &reg, 7).await;
    let mut b = BytesMut::new();
    b.put_u8(wire::VERSION);
    b.put_u32(DEFAULT_MAX_FRAME as u32 + 1);
    raw.write(&b).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::Oversized));
    assert_eq!(w.ex.metrics.rejections.get("oversized_frame"), 1);
    w.still_serving("after oversized").await;

    // A well-framed body that is not a frame.
    let mut raw = registered(&w.ca, &w.ex, &reg, 7).await;
    let mut b = BytesMut::new();
    b.put_u8(wire::VERSION);
    b.put_u32(4);
    b.put_slice(&[0xff, 0xff, 0xff, 0xff]);
    raw.write(&b).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::Malformed));
    assert_eq!(w.ex.metrics.rejections.get("malformed_frame"), 1);
    w.still_serving("after malformed").await;

    // An unknown version byte.
    let mut raw = registered(&w.ca, &w.ex, &reg, 7).await;
    raw.write(&[9, 0, 0, 0, 1, 0]).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::UnsupportedVersion));
    assert_eq!(w.ex.metrics.rejections.get("bad_version"), 1);

    // Garbage before registering.
    let mut raw = connect(&w.ca.server(ServerId(7)), w.ex.addr).await.unwrap();
    raw.write(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(raw.closed_with().await.is_some());
    assert_eq!(w.ex.metrics.rejections.get("bad_version"), 2);

    // A frame an app server must never send.
    let mut raw = registered(&w.ca, &w.ex, &reg, 7).await;
    raw.frame(&Frame::Report(iim::wire::Report { entries: vec![] }))
        .await
        .unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::Protocol));
    assert_eq!(w.ex.metrics.rejections.get("protocol"), 1);

    // The metrics page shows the counts.
    let page = iim::metrics::Render::render(&*w.ex.metrics);
    assert!(page.contains("iim_exchange_rejections_total{reason=\"oversized_frame\"} 1"));
    assert!(page.contains("iim_exchange_rejections_total{reason=\"malformed_frame\"} 1"));
    w.still_serving("after all of it").await;
    w.db.cleanup().await;
}

/// A malformed but not forged 905 is refused message by message: its sender
/// gets a `refused` report and keeps its link, so a bad 905 cannot make the
/// link flap through retransmissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_905_is_reported_refused_and_the_link_stays() {
    let mut w = world().await;
    let reg = w.s1.registry.clone();
    let channel = w.rx2.session.channel.0;
    let epoch = reg
        .begin_epoch(ServerId(7), Role::App, "raw", ServerState::Down, now_ms())
        .await
        .unwrap();
    let mut raw = connect(&w.ca.server(ServerId(7)), w.ex.addr).await.unwrap();
    raw.register(ServerId(7), epoch).await.unwrap();
    let Frame::Forward(mut bad) = forward(7, 7, 2, channel) else {
        unreachable!()
    };
    let reencode = |f: &mut Forward905| {
        let mut m = Message::decode(&f.message).unwrap();
        m.id = f.id;
        f.message = m.encode();
    };
    bad.id.epoch = epoch;
    reencode(&mut bad);
    bad.rows.push(bad.rows[0].clone()); // server 2 listed twice
    raw.frame(&Frame::Forward(bad.clone())).await.unwrap();
    let r = raw.report().await;
    assert_eq!(r.entries.len(), 1);
    assert_eq!(
        (r.entries[0].id, r.entries[0].status),
        (bad.id, DeliveryStatus::Refused)
    );
    assert_eq!(w.ex.metrics.rejections.get("malformed_905"), 1);

    // The same link still relays a good 905.
    bad.rows.pop();
    bad.id.seq = 2;
    reencode(&mut bad);
    raw.frame(&Frame::Forward(bad.clone())).await.unwrap();
    let r = raw.report().await;
    assert_eq!(
        (r.entries[0].id, r.entries[0].status),
        (bad.id, DeliveryStatus::Delivered)
    );
    let m = queued(&mut w.rx2).expect("delivered");
    assert_eq!(m.id, bad.id);
    w.still_serving("after the refusal").await;
    w.db.cleanup().await;
}

/// A connection that just disappears (dropped, closed with QUIC's implicit
/// code 0) is a lost link with a lease, not a goodbye: the server is not
/// marked down and its sessions stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_implicit_close_is_not_a_clean_departure() {
    let w = world().await;
    let reg = w.s1.registry.clone();
    let links = w.ex.metrics.links.get();
    let raw = registered(&w.ca, &w.ex, &reg, 7).await;
    eventually!(
        10,
        "the link counted",
        w.ex.metrics.links.get() == links + 1
    );
    drop(raw);
    eventually!(
        10,
        "the exchange noticed",
        w.ex.metrics.links.get() == links
    );
    assert_eq!(w.ex.metrics.marked_down.get(), 0);
    assert_eq!(
        reg.server(ServerId(7)).await.unwrap().unwrap().state,
        ServerState::Up
    );
    w.db.cleanup().await;
}

/// Under load the exchange makes a client prove its address (a QUIC Retry)
/// before a TLS handshake, and refuses attempts beyond its bound on
/// handshakes in progress; a real app server passes the Retry unaware.
#[tokio::test]
async fn connection_attempts_are_validated_under_load_and_bounded() {
    let ca = TestCa::new();
    let db = TestDb::new().await;
    let mut cfg = exchange_config(db.url());
    // "Under load" from the first attempt on.
    cfg.validate_addresses_above = 0;
    cfg.max_handshakes = 1;
    let (ex, _stop) = spawn_exchange(&ca, cfg).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    assert!(ex.metrics.address_retries.get() >= 1, "a Retry was sent");
    // A client that cannot echo the token never costs a TLS handshake: a
    // bare QUIC client with a certificate from another CA still gets its
    // Retry first (and is then refused by TLS, as before).
    let stranger = TestCa::new();
    let before = ex.metrics.address_retries.get();
    assert!(
        connect(&stranger.server(ServerId(9)), ex.addr)
            .await
            .is_err()
    );
    assert!(ex.metrics.address_retries.get() > before);
    eventually!(
        10,
        "the stranger refused by TLS",
        ex.metrics.rejections.get("tls_handshake") == 1
    );
    db.cleanup().await;
}

/// Both daemons export how long their own certificate has left (the test
/// CA issues leaves for the default 90 days).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_daemons_export_the_seconds_left_on_their_certificate() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (ex, _) = spawn_exchange(
        &ca,
        iim_exchange::Config {
            http_listen: Some(loopback),
            ..exchange_config(db.url())
        },
    )
    .await;
    let s1 = spawn_appserver(
        &ca,
        iim_appserver::Config {
            http_listen: Some(loopback),
            ..appserver_config(db.url(), 1, ex.addr)
        },
        vec![],
    )
    .await;
    let ninety_days = 90.0 * 86_400.0;
    for (addr, series) in [
        (ex.http_addr, "iim_exchange_certificate_expiry_seconds"),
        (s1.http_addr, "iim_appserver_certificate_expiry_seconds"),
    ] {
        let client =
            iim_http::client::Client::new(&addr.unwrap().to_string(), Duration::from_secs(10))
                .unwrap();
        let page = client.metrics().await.unwrap();
        let left = iim_http::client::metric_value(&page, series)
            .unwrap_or_else(|| panic!("{series} missing:\n{page}"));
        assert!(
            (left - ninety_days).abs() < 600.0,
            "{series} = {left}, expected about {ninety_days}"
        );
    }
}

/// Only an exchange's certificate opens a peer link: an app server's
/// certificate claiming to be an exchange, or an exchange claiming another
/// exchange's id, is refused and counted; a genuine peer hello is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_pretending_to_be_a_peer_exchange_is_refused() {
    let mut w = world().await;
    let hello = |exchange: u32| {
        Frame::PeerHello(iim::wire::PeerHello {
            exchange: ServerId(exchange),
            epoch: 1,
            max_frame: DEFAULT_MAX_FRAME as u32,
        })
    };
    // App server 1's certificate, claiming to be exchange 101.
    let mut raw = connect(&w.ca.server(ServerId(1)), w.ex.addr).await.unwrap();
    raw.frame(&hello(101)).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::IdentityMismatch));
    // Exchange 102's certificate, claiming to be exchange 101.
    let mut raw = connect(&w.ca.exchange(ServerId(102)), w.ex.addr)
        .await
        .unwrap();
    raw.frame(&hello(101)).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::IdentityMismatch));
    assert_eq!(w.ex.metrics.rejections.get("identity_mismatch"), 2);
    assert_eq!(w.ex.metrics.peer_links.get(), 0);
    // A relay on a link that never said hello is no relay.
    let mut raw = connect(&w.ca.exchange(ServerId(103)), w.ex.addr)
        .await
        .unwrap();
    raw.frame(&forward(1, 1, 2, 1)).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::NotRegistered));
    // A genuine certificate of an exchange the registry does not show up
    // is not a peer either.
    let mut raw = connect(&w.ca.exchange(ServerId(102)), w.ex.addr)
        .await
        .unwrap();
    raw.frame(&hello(102)).await.unwrap();
    assert_eq!(raw.closed_with().await, Some(ErrorCode::UnknownServer));
    // Once it is up in the registry (and swept), its hello is answered with
    // the exchange's own.
    let reg = w.s1.registry.clone();
    let epoch = reg
        .begin_epoch(
            ServerId(102),
            Role::Exchange,
            "127.0.0.1:9",
            ServerState::Up,
            now_ms(),
        )
        .await
        .unwrap();
    let answered = async {
        loop {
            let mut raw = connect(&w.ca.exchange(ServerId(102)), w.ex.addr)
                .await
                .unwrap();
            raw.frame(&Frame::PeerHello(iim::wire::PeerHello {
                exchange: ServerId(102),
                epoch,
                max_frame: DEFAULT_MAX_FRAME as u32,
            }))
            .await
            .unwrap();
            if let Ok(Ok(Some(Frame::PeerHello(h)))) =
                tokio::time::timeout(Duration::from_secs(10), raw.reader.next()).await
            {
                return (h, raw);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let (h, _raw) = tokio::time::timeout(Duration::from_secs(20), answered)
        .await
        .expect("answered once the registry shows it");
    assert_eq!(h.exchange, EXCHANGE);
    eventually!(
        5,
        "the peer link to count",
        w.ex.metrics.peer_links.get() == 1
    );
    w.still_serving("after impostor exchanges").await;
    w.db.cleanup().await;
}
