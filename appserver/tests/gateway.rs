//! The client gateway over a real WebSocket on loopback: authentication,
//! bad input, limits, liveness, pushes and shutdown. The chat service is a
//! double (the real one is tested end to end elsewhere); the registry is a
//! real SQLite file, so the `sessions` rows are the real ones.

use futures_util::{SinkExt as _, StreamExt as _};
use iim::registry::{Registry, Role, ServerState};
use iim::token::{self, Hs256Verifier};
use iim::types::{Address, ChannelId, MessageId, ServerId, UserId, now_ms};
use iim::wire::{Message as IimMessage, Timing, UserRow};
use iim_appserver::chat::{
    ChatError, ChatMessage, Ope, PushEnvelope, SendAck, SendRequest, SyncPage, SyncRequest, Welcome,
};
use iim_appserver::config::ClientLimits;
use iim_appserver::gateway::{self, ChatApi, GatewayState};
use iim_appserver::push::Push;
use iim_appserver::{AppMetrics, Connections};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SECRET: &[u8] = b"gateway-test-secret";
const SERVER: ServerId = ServerId(1);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

macro_rules! eventually {
    ($what:expr, $cond:expr) => {{
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if $cond {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("timed out waiting for: {}", $what);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

/// Run the paused clock forward by `total` in 10 ms steps, letting every
/// task and the loopback sockets make progress between steps. (Left alone,
/// a paused clock jumps to the next timer whenever the runtime idles, even
/// while a socket has data for a task: a client would answer a ping only
/// after the timer that follows it.) The caller paused the clock once its
/// connections were set up: the registry's SQLite work runs on threads
/// outside the runtime.
async fn run_clock_for(total: Duration) {
    let step = Duration::from_millis(10);
    let mut left = total;
    while !left.is_zero() {
        let d = step.min(left);
        tokio::time::advance(d).await;
        left -= d;
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }
}

/// A chat service that acknowledges everything and remembers what it saw.
#[derive(Default)]
struct FakeChat {
    sends: Mutex<Vec<(UserId, SendRequest)>>,
    syncs: Mutex<Vec<(UserId, SyncRequest)>>,
}

impl ChatApi for FakeChat {
    type Answer = std::future::Ready<Result<SendAck, ChatError>>;

    async fn send(&self, user: UserId, channel: ChannelId, req: SendRequest) -> Self::Answer {
        std::future::ready(self.answer(user, channel, req))
    }

    async fn sync(&self, user: UserId, req: SyncRequest) -> Result<SyncPage, ChatError> {
        self.syncs.lock().unwrap().push((user, req.clone()));
        Ok(SyncPage {
            group: req.group,
            messages: Vec::new(),
            max: req.since,
            more: false,
        })
    }

    async fn welcome(&self, user: UserId, device: &str) -> Result<Welcome, ChatError> {
        Ok(Welcome {
            user: user.0,
            device: device.to_string(),
            server: SERVER.0,
            inbox_max: 7,
            large_groups: Vec::new(),
        })
    }
}

impl FakeChat {
    fn answer(
        &self,
        user: UserId,
        _channel: ChannelId,
        req: SendRequest,
    ) -> Result<SendAck, ChatError> {
        if req.to == 404 {
            return Err(ChatError::UnknownUser(404));
        }
        let mut sends = self.sends.lock().unwrap();
        sends.push((user, req.clone()));
        let n = sends.len() as u64;
        Ok(SendAck {
            req: req.req,
            id: 1000 + n,
            seq: Some(n),
            gseq: None,
            ts: 1_700_000_000_000,
            duplicate: false,
        })
    }
}

struct Gw {
    addr: SocketAddr,
    chat: Arc<FakeChat>,
    metrics: Arc<AppMetrics>,
    connections: Arc<Connections>,
    registry: Registry,
    stop: CancellationToken,
    tracker: TaskTracker,
    _dir: tempfile::TempDir,
}

fn limits() -> ClientLimits {
    ClientLimits {
        max_message_bytes: 1_024,
        ..ClientLimits::default()
    }
}

async fn spawn(limits: ClientLimits, queue: usize) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("registry.db").display());
    let registry = Registry::connect(&url).await.unwrap();
    let epoch = registry
        .begin_epoch(SERVER, Role::App, "test", ServerState::Up, now_ms())
        .await
        .unwrap();
    let metrics = Arc::new(AppMetrics::default());
    let connections = Arc::new(Connections::new(
        SERVER,
        epoch,
        registry.clone(),
        metrics.clone(),
        queue,
    ));
    let chat = Arc::new(FakeChat::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let state = GatewayState {
        chat: chat.clone(),
        connections: connections.clone(),
        verifier: Arc::new(Hs256Verifier::new(SECRET)),
        presence: None,
        receipts: None,
        metrics: metrics.clone(),
        admission: gateway::admission::Admission::new(
            limits.max_connections,
            limits.max_connections_per_ip,
            limits.max_connections_per_user,
            metrics.clone(),
        ),
        limits,
        stop: stop.clone(),
        tracker: tracker.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tracker.spawn(gateway::serve(listener, state));
    Gw {
        addr,
        chat,
        metrics,
        connections,
        registry,
        stop,
        tracker,
        _dir: dir,
    }
}

fn tok(user: u64) -> String {
    token::mint(SECRET, UserId(user), Duration::from_secs(60))
}

async fn connect(gw: &Gw) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

async fn send_raw(ws: &mut Ws, s: &str) {
    ws.send(Message::text(s.to_string())).await.unwrap();
}

/// The next frame other than pings and pongs.
async fn next_frame(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("the connection is open")
            .expect("a good frame");
        match m {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// The next JSON frame.
async fn next_json(ws: &mut Ws) -> Value {
    match next_frame(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// The server's close frame, which must come next: its code and reason.
async fn closed(ws: &mut Ws) -> (CloseCode, String) {
    match next_frame(ws).await {
        Message::Close(Some(f)) => (f.code, f.reason.to_string()),
        Message::Close(None) => panic!("close without a code"),
        Message::Text(t) => panic!("expected a close, got {t}"),
        other => panic!("expected a close, got {other:?}"),
    }
}

async fn expect_error(ws: &mut Ws, code: &str) -> Value {
    let v = next_json(ws).await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

async fn authed(gw: &Gw, user: u64, device: &str) -> Ws {
    let mut ws = connect(gw).await;
    send(
        &mut ws,
        json!({"op": "auth", "token": tok(user), "device": device}),
    )
    .await;
    let w = next_json(&mut ws).await;
    assert_eq!(w["op"], "welcome", "{w}");
    assert_eq!(w["user"], user);
    ws
}

async fn sessions(gw: &Gw, user: u64) -> Vec<iim::Session> {
    gw.registry.sessions_of(&[UserId(user)]).await.unwrap()
}

#[tokio::test]
async fn auth_welcomes_and_the_session_lives_as_long_as_the_socket() {
    let gw = spawn(limits(), 16).await;
    let mut ws = connect(&gw).await;
    eventually!(
        "the socket is counted",
        gw.metrics.ws_connections.get() == 1
    );
    send(
        &mut ws,
        json!({"op": "auth", "token": tok(1001), "device": "phone"}),
    )
    .await;
    let w = next_json(&mut ws).await;
    assert_eq!(
        w,
        json!({"op": "welcome", "user": 1001, "device": "phone", "server": 1,
               "inbox_max": 7, "large_groups": []})
    );
    let s = sessions(&gw, 1001).await;
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].device.as_str(), s[0].server), ("phone", SERVER));
    assert_eq!(gw.connections.len(), 1);
    assert_eq!(gw.metrics.client_ops.get("auth"), 1);

    // A second device of the same user is a second session.
    let mut ws2 = authed(&gw, 1001, "laptop").await;
    assert_eq!(sessions(&gw, 1001).await.len(), 2);

    ws.close(None).await.unwrap();
    eventually!(
        "the session is removed",
        sessions(&gw, 1001).await.len() == 1
    );
    ws2.close(None).await.unwrap();
    eventually!(
        "both sessions are gone",
        sessions(&gw, 1001).await.is_empty()
    );
    eventually!("no connection is left", gw.connections.is_empty());
    eventually!("no socket is counted", gw.metrics.ws_connections.get() == 0);
}

#[tokio::test]
async fn bad_tokens_and_missing_auth_are_refused_and_closed() {
    let gw = spawn(limits(), 16).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cases: Vec<(String, &str, &str)> = vec![
        (
            json!({"op": "auth", "token": token::mint(b"wrong", UserId(5), Duration::from_secs(60))}).to_string(),
            "auth_failed",
            "invalid",
        ),
        (
            json!({"op": "auth", "token": "garbage"}).to_string(),
            "auth_failed",
            "invalid",
        ),
        (
            json!({"op": "auth", "token": token::mint_at(SECRET, UserId(5), now - 600, now - 300)}).to_string(),
            "auth_expired",
            "expired",
        ),
        (
            json!({"op": "auth"}).to_string(),
            "auth_required",
            "missing",
        ),
        (
            json!({"op": "ping"}).to_string(),
            "auth_required",
            "not_first",
        ),
        (
            json!({"op": "send", "req": "x", "ope": 0, "to": 2, "type": "t", "body": 1})
                .to_string(),
            "auth_required",
            "not_first",
        ),
        ("{not json".to_string(), "auth_required", "not_first"),
    ];
    for (frame, code, reason) in &cases {
        let before = gw.metrics.auth_failures.get(reason);
        let mut ws = connect(&gw).await;
        send_raw(&mut ws, frame).await;
        expect_error(&mut ws, code).await;
        let (c, _) = closed(&mut ws).await;
        assert_eq!(c, CloseCode::Policy, "{frame}");
        assert_eq!(gw.metrics.auth_failures.get(reason), before + 1, "{frame}");
    }
    // A binary first frame is not an auth either.
    let mut ws = connect(&gw).await;
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    expect_error(&mut ws, "auth_required").await;
    assert_eq!(closed(&mut ws).await.0, CloseCode::Policy);

    assert!(gw.registry.sessions().await.unwrap().is_empty());
    assert!(gw.connections.is_empty());
    assert_eq!(gw.metrics.client_errors.get("auth_failed"), 2);
    assert_eq!(gw.metrics.client_errors.get("auth_expired"), 1);
    assert_eq!(gw.metrics.client_errors.get("auth_required"), 5);
    eventually!("no socket is counted", gw.metrics.ws_connections.get() == 0);
}

#[tokio::test]
async fn a_client_that_never_authenticates_is_closed_after_the_timeout() {
    let gw = spawn(
        ClientLimits {
            auth_timeout_ms: 300,
            ..limits()
        },
        16,
    )
    .await;
    let started = std::time::Instant::now();
    let mut ws = connect(&gw).await;
    expect_error(&mut ws, "auth_required").await;
    assert_eq!(closed(&mut ws).await.0, CloseCode::Policy);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(gw.metrics.auth_failures.get("timeout"), 1);
}

#[tokio::test]
async fn requests_are_answered_in_order_and_bad_ones_do_not_close_the_connection() {
    let gw = spawn(limits(), 16).await;
    let mut ws = authed(&gw, 1001, "phone").await;

    // A good send, with `from` naming ourselves, and one without `from`.
    send(
        &mut ws,
        json!({"op": "send", "req": "c-1", "ope": 0, "from": 1001, "to": 2001,
               "type": "text", "body": {"text": "hi"}, "ex": {"k": 1}}),
    )
    .await;
    send_raw(
        &mut ws,
        r#"{"op":"send","req":"c-2","ope":1,"to":77,"type":"text","body":{"z":1,"a":2}}"#,
    )
    .await;
    let a1 = next_json(&mut ws).await;
    let a2 = next_json(&mut ws).await;
    assert_eq!(
        a1,
        json!({"op": "ack", "req": "c-1", "id": 1001, "seq": 1,
               "ts": 1_700_000_000_000_i64, "duplicate": false})
    );
    assert_eq!(
        (a2["op"].as_str(), a2["req"].as_str()),
        (Some("ack"), Some("c-2"))
    );
    {
        let sends = gw.chat.sends.lock().unwrap();
        assert_eq!(sends.len(), 2);
        let (u, r) = &sends[0];
        assert_eq!(
            (*u, r.to, r.ope, r.kind.as_str()),
            (UserId(1001), 2001, Ope::Single, "text")
        );
        assert_eq!(r.ex.as_ref().unwrap().get(), r#"{"k":1}"#);
        assert_eq!(sends[1].1.ope, Ope::Group);
        assert_eq!(sends[1].1.body.get(), r#"{"z":1,"a":2}"#, "body verbatim");
    }

    // Forged sender.
    send(
        &mut ws,
        json!({"op": "send", "req": "c-3", "ope": 0, "from": 1002, "to": 2001,
               "type": "text", "body": {}}),
    )
    .await;
    let e = expect_error(&mut ws, "forged_from").await;
    assert_eq!(e["req"], "c-3");

    // Validation errors name the field and carry the req.
    send(
        &mut ws,
        json!({"op": "send", "req": "c-4", "ope": 0, "to": 2001, "body": {}}),
    )
    .await;
    let e = expect_error(&mut ws, "bad_request").await;
    assert_eq!(e["req"], "c-4");
    assert!(e["message"].as_str().unwrap().contains("type"), "{e}");
    send(
        &mut ws,
        json!({"op": "send", "req": "c-5", "ope": 0, "to": 2001, "type": "x".repeat(33), "body": 1}),
    )
    .await;
    let e = expect_error(&mut ws, "bad_request").await;
    assert!(e["message"].as_str().unwrap().contains("type"), "{e}");

    // A chat error comes back with its code.
    send(
        &mut ws,
        json!({"op": "send", "req": "c-6", "ope": 0, "to": 404, "type": "text", "body": 1}),
    )
    .await;
    let e = expect_error(&mut ws, "unknown_user").await;
    assert_eq!(e["req"], "c-6");

    // Sync: negative cursor refused, limit clamped.
    send(&mut ws, json!({"op": "sync", "since": -1})).await;
    let e = expect_error(&mut ws, "bad_request").await;
    assert!(e["message"].as_str().unwrap().contains("since"), "{e}");
    send(
        &mut ws,
        json!({"op": "sync", "since": 17, "limit": 100_000}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"op": "sync", "messages": [], "max": 17, "more": false})
    );
    send(
        &mut ws,
        json!({"op": "sync", "group": 77, "since": 0, "limit": 5}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["group"], 77);
    {
        let syncs = gw.chat.syncs.lock().unwrap();
        assert_eq!(
            syncs[0].1,
            SyncRequest {
                group: None,
                since: 17,
                limit: 200
            }
        );
        assert_eq!(
            syncs[1].1,
            SyncRequest {
                group: Some(77),
                since: 0,
                limit: 5
            }
        );
    }

    // Garbage of every kind.
    send_raw(&mut ws, "{\"op\":").await;
    expect_error(&mut ws, "invalid_json").await;
    send(&mut ws, json!({"op": "teleport"})).await;
    let e = expect_error(&mut ws, "unknown_op").await;
    assert!(e["message"].as_str().unwrap().contains("teleport"), "{e}");
    send(&mut ws, json!({"nop": 1})).await;
    let e = expect_error(&mut ws, "bad_request").await;
    assert!(e["message"].as_str().unwrap().contains("op"), "{e}");
    send_raw(&mut ws, "[1,2,3]").await;
    expect_error(&mut ws, "bad_request").await;
    ws.send(Message::binary(vec![0u8; 10])).await.unwrap();
    expect_error(&mut ws, "binary_not_supported").await;
    send(&mut ws, json!({"op": "auth", "token": tok(1001)})).await;
    expect_error(&mut ws, "bad_request").await;

    // Still connected.
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"op": "pong"}));

    let m = &gw.metrics;
    assert_eq!(m.client_ops.get("send"), 6);
    assert_eq!(m.client_ops.get("sync"), 3);
    assert_eq!(m.client_ops.get("ping"), 1);
    assert_eq!(m.client_ops.get("other"), 1);
    assert_eq!(m.client_errors.get("forged_from"), 1);
    assert_eq!(m.client_errors.get("invalid_json"), 1);
    assert_eq!(m.client_errors.get("unknown_op"), 1);
    assert_eq!(m.client_errors.get("binary_not_supported"), 1);
    assert_eq!(m.client_errors.get("unknown_user"), 1);
    assert_eq!(m.client_errors.get("bad_request"), 6);
    let page = iim::metrics::Render::render(m.as_ref());
    for name in [
        "iim_appserver_ws_connections 1",
        "iim_appserver_client_errors_total{code=\"forged_from\"} 1",
        "iim_appserver_client_ops_total{op=\"send\"} 6",
        "iim_appserver_auth_failures_total{reason=\"timeout\"} 0",
    ] {
        assert!(page.contains(name), "{name} missing from\n{page}");
    }
}

#[tokio::test]
async fn oversized_frames_get_too_large_and_huge_ones_close_with_1009() {
    let gw = spawn(limits(), 16).await;
    let mut ws = authed(&gw, 1001, "phone").await;
    let big = json!({"op": "send", "req": "big-1", "ope": 0, "to": 2, "type": "text",
                     "body": "x".repeat(2_000)});
    send(&mut ws, big).await;
    let e = expect_error(&mut ws, "too_large").await;
    assert_eq!(e["req"], "big-1");
    assert!(gw.chat.sends.lock().unwrap().is_empty());
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["op"], "pong");

    // Over 4x the limit: the WebSocket layer refuses it.
    send_raw(&mut ws, &"y".repeat(4 * 1_024 + 1)).await;
    let (code, _) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Size);
    eventually!(
        "the session is removed",
        sessions(&gw, 1001).await.is_empty()
    );
}

#[tokio::test]
async fn requests_over_the_rate_are_dropped_and_the_connection_stays() {
    let gw = spawn(
        ClientLimits {
            rate_per_sec: 1,
            rate_burst: 3,
            ..limits()
        },
        16,
    )
    .await;
    let mut ws = authed(&gw, 1001, "phone").await;
    for i in 0..6 {
        send(
            &mut ws,
            json!({"op": "send", "req": format!("r-{i}"), "ope": 0, "to": 2,
                             "type": "text", "body": i}),
        )
        .await;
    }
    let mut acked = Vec::new();
    let mut limited = Vec::new();
    for _ in 0..6 {
        let v = next_json(&mut ws).await;
        match v["op"].as_str() {
            Some("ack") => acked.push(v["req"].as_str().unwrap().to_string()),
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited.push(v["req"].as_str().unwrap().to_string());
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!(acked, ["r-0", "r-1", "r-2"]);
    assert_eq!(limited, ["r-3", "r-4", "r-5"]);
    assert_eq!(gw.chat.sends.lock().unwrap().len(), 3);
    assert_eq!(gw.metrics.client_errors.get("rate_limited"), 3);
    // A second later (on the paused clock) the bucket has a token again.
    tokio::time::pause();
    run_clock_for(Duration::from_millis(1_100)).await;
    tokio::time::resume();
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["op"], "pong");
}

/// Every answer carries its request's `req` when the request had one (an
/// ack always has it); without one the answer is as before.
#[tokio::test]
async fn answers_echo_the_req_of_their_request() {
    let gw = spawn(limits(), 16).await;
    let mut ws = authed(&gw, 1001, "phone").await;
    send(&mut ws, json!({"op": "ping", "req": "p-1"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"op": "pong", "req": "p-1"})
    );
    send(&mut ws, json!({"op": "sync", "req": "s-1", "since": 0})).await;
    let page = next_json(&mut ws).await;
    assert_eq!(
        (page["op"].as_str(), page["req"].as_str()),
        (Some("sync"), Some("s-1"))
    );
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"op": "pong"}));
    // A refused request carried it already.
    send(&mut ws, json!({"op": "sync", "req": "s-2", "since": -1})).await;
    assert_eq!(expect_error(&mut ws, "bad_request").await["req"], "s-2");
}

#[tokio::test]
async fn the_server_pings_and_a_client_that_answers_stays_connected() {
    let gw = spawn(
        ClientLimits {
            ping_interval_secs: 1,
            idle_timeout_secs: 2,
            ..limits()
        },
        16,
    )
    .await;
    let mut ws = authed(&gw, 1001, "phone").await;
    // Read (so tungstenite answers pings with pongs) for longer than the
    // idle timeout, on the paused clock, sending nothing of our own.
    tokio::time::pause();
    let stop = CancellationToken::new();
    let reader = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut pings = 0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return (ws, pings),
                    m = ws.next() => match m.expect("open").expect("good frame") {
                        Message::Ping(_) => pings += 1,
                        other => panic!("unexpected {other:?}"),
                    },
                }
            }
        }
    });
    run_clock_for(Duration::from_millis(3_500)).await;
    stop.cancel();
    let (mut ws, pings) = reader.await.unwrap();
    tokio::time::resume();
    assert!(pings >= 3, "{pings} pings");
    assert_eq!(gw.metrics.ws_closes.get("idle_timeout"), 0);
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"op": "pong"}));
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_idle_timeout() {
    let gw = spawn(
        ClientLimits {
            ping_interval_secs: 1,
            idle_timeout_secs: 2,
            ..limits()
        },
        16,
    )
    .await;
    let mut ws = authed(&gw, 1001, "phone").await;
    // Neither read nor write: our pongs never go out.
    tokio::time::pause();
    run_clock_for(Duration::from_millis(3_200)).await;
    tokio::time::resume();
    eventually!(
        "the server closed it for idleness",
        gw.metrics.ws_closes.get("idle_timeout") == 1
    );
    // The client sees the close frame, unless flushing its queued pongs to
    // the already closed socket fails first.
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => {
            assert_eq!(
                (f.code, f.reason.as_str()),
                (CloseCode::Normal, "idle timeout")
            );
        }
        Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) | Ok(Some(Err(_))) | Ok(None) => {}
        other => panic!("expected the connection to end, got {other:?}"),
    }
    eventually!(
        "the session is removed",
        sessions(&gw, 1001).await.is_empty()
    );
}

/// A message as the host hands it to connections: decoded once.
fn message(kind: u16, from: u64, body: Vec<u8>) -> Push {
    Push::decode(&Arc::new(IimMessage {
        id: MessageId {
            origin: SERVER,
            epoch: 1,
            seq: 1,
        },
        source: Address::new(SERVER, UserId(from)),
        target: Address::RECEIVER,
        kind,
        timing: Timing::default(),
        body: body.into(),
        nested: Vec::new(),
    }))
    .expect("a message for connections")
}

async fn row_of(gw: &Gw, user: u64) -> UserRow {
    let s = sessions(gw, user).await;
    assert_eq!(s.len(), 1);
    UserRow {
        user: UserId(user),
        channel: s[0].channel,
    }
}

#[tokio::test]
async fn pushes_become_notice_and_msg_frames() {
    let gw = spawn(limits(), 16).await;
    let mut ws = authed(&gw, 1001, "phone").await;
    let row = row_of(&gw, 1001).await;

    let report = gw.connections.deliver(
        &message(
            iim_appserver::admin::KIND_ADMIN_TEXT,
            42,
            b"hello there".to_vec(),
        ),
        std::slice::from_ref(&row),
    );
    assert_eq!(report.delivered, 1);
    assert_eq!(
        next_json(&mut ws).await,
        json!({"op": "notice", "from": 42, "text": "hello there"})
    );

    // A kind clients do not see, then a chat push for another user only,
    // then one for us: only the last arrives.
    gw.connections
        .deliver(&message(99, 42, b"x".to_vec()), std::slice::from_ref(&row));
    let chat_push = |seqs: Vec<(u64, u64)>| {
        let m: ChatMessage = serde_json::from_value(json!({
            "id": 5001, "req": "c-9", "ope": 0, "from": 2001, "to": 1001,
            "type": "text", "body": {"text": "yo"}, "ts": 1_700_000_000_001_i64
        }))
        .unwrap();
        let env = PushEnvelope {
            m,
            seqs,
            gseq: None,
        };
        message(iim::kinds::CHAT, 2001, serde_json::to_vec(&env).unwrap())
    };
    gw.connections
        .deliver(&chat_push(vec![(3003, 4)]), std::slice::from_ref(&row));
    gw.connections.deliver(
        &chat_push(vec![(2001, 9), (1001, 12)]),
        std::slice::from_ref(&row),
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!({"op": "msg", "seq": 12, "id": 5001, "req": "c-9", "ope": 0, "from": 2001,
               "to": 1001, "type": "text", "body": {"text": "yo"}, "ts": 1_700_000_000_001_i64})
    );
    // Pushes interleave with answers.
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["op"], "pong");
}

#[tokio::test]
async fn a_client_whose_queue_overflows_is_told_too_slow_and_closed() {
    let gw = spawn(limits(), 4).await;
    let mut ws = authed(&gw, 1001, "phone").await;
    let row = row_of(&gw, 1001).await;
    // On this single-threaded runtime the gateway cannot drain the queue
    // between these calls: the fifth overflows it and the connection is cut.
    let mut missing = 0;
    for i in 0..8 {
        let r = gw.connections.deliver(
            &message(
                iim_appserver::admin::KIND_ADMIN_TEXT,
                42,
                format!("n{i}").into_bytes(),
            ),
            std::slice::from_ref(&row),
        );
        missing += r.missing;
    }
    assert_eq!(missing, 4);
    for i in 0..4 {
        assert_eq!(next_json(&mut ws).await["text"], format!("n{i}"));
    }
    expect_error(&mut ws, "too_slow").await;
    assert_eq!(closed(&mut ws).await.0, CloseCode::Again);
    eventually!(
        "the session is removed",
        sessions(&gw, 1001).await.is_empty()
    );
}

#[tokio::test]
async fn stopping_the_server_closes_clients_with_going_away() {
    let gw = spawn(limits(), 16).await;
    let mut a = authed(&gw, 1001, "phone").await;
    let mut b = connect(&gw).await; // not yet authenticated
    eventually!(
        "both sockets are counted",
        gw.metrics.ws_connections.get() == 2
    );
    gw.stop.cancel();
    assert_eq!(closed(&mut a).await.0, CloseCode::Away);
    assert_eq!(closed(&mut b).await.0, CloseCode::Away);
    gw.tracker.close();
    tokio::time::timeout(Duration::from_secs(5), gw.tracker.wait())
        .await
        .expect("the gateway's tasks end");
    assert!(gw.registry.sessions().await.unwrap().is_empty());
    assert_eq!(gw.metrics.ws_connections.get(), 0);
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
            .await
            .is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn a_connection_ends_when_its_token_expires() {
    let gw = spawn(
        ClientLimits {
            ping_interval_secs: 30,
            idle_timeout_secs: 60,
            ..limits()
        },
        16,
    )
    .await;
    let now = iim::types::unix_secs();
    let mut ws = connect(&gw).await;
    let t = token::mint_at(SECRET, UserId(1001), now, now + 1);
    send(&mut ws, json!({"op": "auth", "token": t})).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    // Valid for a second, plus the leeway it was accepted with.
    tokio::time::pause();
    run_clock_for(Duration::from_secs(1 + token::LEEWAY_SECS + 1)).await;
    tokio::time::resume();
    expect_error(&mut ws, "auth_expired").await;
    assert_eq!(
        closed(&mut ws).await,
        (CloseCode::from(4001), "token expired".to_string())
    );
    assert_eq!(gw.metrics.ws_closes.get("token_expired"), 1);
    eventually!(
        "the session is removed",
        sessions(&gw, 1001).await.is_empty()
    );
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let gw = spawn(limits(), 16).await;
    let mut ws = authed(&gw, 1001, "phone").await;
    let bad = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(bad)).await.unwrap();
    let (code, _) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Invalid);
    assert_eq!(gw.metrics.ws_closes.get("invalid_utf8"), 1);
}

#[tokio::test]
async fn bodies_nested_too_deep_are_refused_and_the_connection_stays() {
    let gw = spawn(limits(), 16).await;
    let mut ws = authed(&gw, 1001, "phone").await;
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    let frame =
        format!(r#"{{"op":"send","req":"d1","ope":0,"to":2002,"type":"text","body":{deep}}}"#);
    send_raw(&mut ws, &frame).await;
    let e = expect_error(&mut ws, "bad_request").await;
    assert_eq!(e["req"], "d1");
    assert!(e["message"].as_str().unwrap().contains("64"), "{e}");
    // 64 levels, and strings with brackets in them, are fine.
    let ok = format!(
        r#"{{"op":"send","req":"d2","ope":0,"to":2002,"type":"text","body":{{"t":"[[[[\"]]","v":{}{}}}}}"#,
        "[".repeat(63),
        "]".repeat(63)
    );
    send_raw(&mut ws, &ok).await;
    assert_eq!(next_json(&mut ws).await["op"], "ack");
    // The 20,000-level body of the review, too big for this gateway's
    // message limit in one frame: raise the limit to see the depth check.
    let gw = spawn(
        ClientLimits {
            max_message_bytes: 65_536,
            ..limits()
        },
        16,
    )
    .await;
    let mut ws = authed(&gw, 1001, "phone").await;
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let frame =
        format!(r#"{{"op":"send","req":"d3","ope":0,"to":2002,"type":"text","body":{deep}}}"#);
    send_raw(&mut ws, &frame).await;
    expect_error(&mut ws, "bad_request").await;
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"op": "pong"}));
}

/// Read `tcp` to its end (the server closed it) within 10 s; what it said.
async fn read_to_close(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .expect("closed by the server within 10 s")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_upgrade_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let gw = spawn(
        ClientLimits {
            handshake_timeout_ms: 300,
            ..limits()
        },
        16,
    )
    .await;
    // Nothing at all, and half a request.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
    assert_eq!(read_to_close(&mut half).await, "");
    assert_eq!(gw.metrics.conn_limits.get("handshake_timeout"), 2);
    // An upgraded connection is not subject to it: it authenticates later
    // than the handshake deadline and is welcomed.
    let mut ws = connect(&gw).await;
    ws.send(Message::Ping(vec![1].into())).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(matches!(m, Ok(Some(Ok(Message::Pong(_))))), "{m:?}");
    tokio::time::sleep(Duration::from_millis(400)).await; // past the deadline, on purpose
    send(&mut ws, json!({"op": "auth", "token": tok(7)})).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    assert_eq!(gw.metrics.conn_limits.get("handshake_timeout"), 2);
}

#[tokio::test]
async fn connections_per_ip_and_per_user_are_capped_and_given_back() {
    let gw = spawn(
        ClientLimits {
            max_connections_per_ip: 3,
            max_connections_per_user: 2,
            ..limits()
        },
        16,
    )
    .await;
    let a = authed(&gw, 7, "a").await;
    let _b = authed(&gw, 7, "b").await;
    // A third of user 7: refused after auth, 4008.
    let mut c = connect(&gw).await;
    send(
        &mut c,
        json!({"op": "auth", "token": tok(7), "device": "c"}),
    )
    .await;
    expect_error(&mut c, "too_many_connections").await;
    assert_eq!(closed(&mut c).await.0, CloseCode::Library(4008));
    assert_eq!(gw.metrics.conn_limits.get("per_user"), 1);
    // Three from 127.0.0.1 held (a, b, and one more, once c's place is
    // back): the next gets 503.
    drop(c);
    let _held = admitted(&gw).await;
    let mut over = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let answer = read_to_close(&mut over).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(gw.metrics.conn_limits.get("per_ip") >= 1);
    // A connection that ends gives its places back: per IP and per user.
    drop(a);
    let mut again = admitted(&gw).await;
    send(
        &mut again,
        json!({"op": "auth", "token": tok(7), "device": "d"}),
    )
    .await;
    assert_eq!(next_json(&mut again).await["op"], "welcome");
}

/// A WebSocket as soon as the gateway admits one (a place given back is
/// seen once the server has dropped the connection that held it).
async fn admitted(gw: &Gw) -> Ws {
    for _ in 0..250 {
        match tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr)).await {
            Ok((ws, _)) => return ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
    panic!("no place came back within 5 s");
}
