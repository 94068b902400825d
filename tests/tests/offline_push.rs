//! Offline push end to end (issue 14): real app servers and an exchange
//! over QUIC, real WebSocket clients, and the operator's gateway played by
//! an HTTP receiver on 127.0.0.1 that checks every request's signature.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use iim::types::UserId;
use iim_appserver::config::OfflinePushConfig;
use iim_kit::client::{ChatClient, Ope};
use iim_kit::{
    TestCa, TestDb, appserver_config, eventually, exchange_config, spawn_appserver, spawn_exchange,
    token, wait_linked,
};
use ring::hmac;
use ring::rand::SecureRandom;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// How long a test waits for the receiver to be called.
const WAIT: Duration = Duration::from_secs(20);

/// One request the receiver got.
#[derive(Debug)]
struct Call {
    /// What it answered.
    status: u16,
    /// The signature and the timestamp checked out.
    signed: bool,
    /// `X-Iim-Batch`.
    batch_header: String,
    /// The JSON body.
    body: Value,
}

#[derive(Clone)]
struct Hook {
    key: Arc<hmac::Key>,
    /// Requests still to answer 500.
    fail: Arc<AtomicU32>,
    /// When set, a request waits for a permit before it is answered.
    gate: Option<Arc<Semaphore>>,
    calls: mpsc::UnboundedSender<Call>,
}

/// A gateway on 127.0.0.1; every request it gets arrives on `calls`.
struct Receiver {
    url: String,
    secret_file: PathBuf,
    calls: mpsc::UnboundedReceiver<Call>,
    _dir: tempfile::TempDir,
}

impl Receiver {
    async fn start(fail_first: u32, gate: Option<Arc<Semaphore>>) -> Receiver {
        Receiver::serve(fail_first, gate, None).await
    }

    /// `tls`: serve HTTPS with this certificate (for 127.0.0.1).
    async fn serve(
        fail_first: u32,
        gate: Option<Arc<Semaphore>>,
        tls: Option<&iim::tls::TlsMaterial>,
    ) -> Receiver {
        // A fresh random secret per test, written where the servers read it.
        let mut secret = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut secret).unwrap();
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("push-secret");
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        let (tx, calls) = mpsc::unbounded_channel();
        let hook = Hook {
            key: Arc::new(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())),
            fail: Arc::new(AtomicU32::new(fail_first)),
            gate,
            calls: tx,
        };
        let app = axum::Router::new()
            .route("/push", axum::routing::post(receive))
            .with_state(hook);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let scheme = match tls {
            None => {
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
                "http"
            }
            Some(m) => {
                let tls = TlsListener::new(listener, m);
                tokio::spawn(async move {
                    let _ = axum::serve(tls, app).await;
                });
                "https"
            }
        };
        Receiver {
            url: format!("{scheme}://{addr}/push"),
            secret_file,
            calls,
            _dir: dir,
        }
    }

    /// The next request, however it was answered.
    async fn next(&mut self) -> Call {
        tokio::time::timeout(WAIT, self.calls.recv())
            .await
            .expect("the receiver was not called in time")
            .expect("receiver gone")
    }

    fn config(&self) -> OfflinePushConfig {
        OfflinePushConfig {
            url: Some(self.url.clone()),
            secret_file: Some(self.secret_file.clone()),
            batch_wait_ms: 0,
            backoff_min_ms: 20,
            backoff_max_ms: 100,
            timeout_ms: 30_000,
            preview_bytes: 8,
            ..OfflinePushConfig::default()
        }
    }
}

/// A TLS listener for the receiver: handshakes one at a time (enough for
/// one app server's one request in flight).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    fn new(tcp: tokio::net::TcpListener, m: &iim::tls::TlsMaterial) -> TlsListener {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        TlsListener {
            tcp,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that refuses our certificate ends here; wait for
            // the next one.
            if let Ok(tls) = self.tls.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// What an operator's gateway does with a request: recompute HMAC-SHA256
/// over `<timestamp>.<body>` with the shared secret, compare in constant
/// time (ring's `verify`), and refuse a timestamp more than five minutes
/// away from now.
fn verify(key: &hmac::Key, headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(ts), Some(sig)) = (header("x-iim-timestamp"), header("x-iim-signature")) else {
        return false;
    };
    let Some(hex) = sig.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(ts_secs) = ts.parse::<u64>() else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(ts_secs) > 300 || hex.len() != 64 {
        return false;
    }
    let Ok(tag) = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(body);
    hmac::verify(key, &signed, &tag).is_ok()
}

async fn receive(State(h): State<Hook>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signed = verify(&h.key, &headers, &body);
    let failing = h
        .fail
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if !signed {
        StatusCode::UNAUTHORIZED
    } else if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let _ = h.calls.send(Call {
        status: status.as_u16(),
        signed,
        batch_header: headers
            .get("x-iim-batch")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    if status == StatusCode::OK
        && let Some(gate) = &h.gate
    {
        gate.acquire().await.unwrap().forget();
    }
    status
}

/// The notices a call carried.
fn notices(call: &Call) -> Vec<&Value> {
    call.body["notices"].as_array().unwrap().iter().collect()
}

/// An offline recipient gets exactly one signed notice per message; an
/// online recipient (on another server) and the sender get none; a resend
/// recognised as a duplicate makes none; a large group's members get none
/// (counted as skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_notice_per_message_per_offline_user_and_none_for_online_ones() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let store = db.directory(&[11, 21, 31, 41]).await;
    let small = store
        .create_group("three", &[UserId(11), UserId(21), UserId(31)])
        .await
        .unwrap();
    let large = store
        .create_group("four", &[UserId(11), UserId(21), UserId(31), UserId(41)])
        .await
        .unwrap();
    let mut rx = Receiver::start(0, None).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut servers = Vec::new();
    for id in 1..=2 {
        let mut cfg = appserver_config(db.url(), id, ex.addr);
        cfg.chat.large_group_threshold = 3;
        cfg.offline_push = rx.config();
        servers.push(spawn_appserver(&ca, cfg, vec![]).await);
    }
    for s in &servers {
        wait_linked(s).await;
    }
    let (s1, s2) = (&servers[0], &servers[1]);
    let mut sender = ChatClient::connect(s1.client_addr.unwrap(), &token(11), "phone")
        .await
        .unwrap();
    // 21 is online on the other server; 31 and 41 are not connected at all.
    let _online = ChatClient::connect(s2.client_addr.unwrap(), &token(21), "phone")
        .await
        .unwrap();

    let to_online = sender.send("m1", Ope::Single, 21, "hi 21").await.unwrap();
    let to_offline = sender
        .send("m2", Ope::Single, 31, "hello offline world")
        .await
        .unwrap();
    let in_small = sender
        .send("m3", Ope::Group, small, "group hello")
        .await
        .unwrap();
    let in_large = sender
        .send("m4", Ope::Group, large, "large hello")
        .await
        .unwrap();
    let resent = sender
        .send("m2", Ope::Single, 31, "hello offline world")
        .await
        .unwrap();
    assert!(resent.duplicate && resent.id == to_offline.id, "{resent:?}");
    // Pushes leave in order, and so do their notices: once this one's has
    // arrived, any notice of the messages before it would have too.
    let last = sender.send("m5", Ope::Single, 31, "last").await.unwrap();

    let mut got = Vec::new();
    while !got.iter().any(|n: &Value| n["id"] == last.id) {
        let call = rx.next().await;
        assert!(call.signed, "a request with a bad signature: {call:?}");
        assert_eq!(call.status, 200);
        assert_eq!(call.body["batch"], call.batch_header.as_str());
        assert_eq!(call.body["server"], 1, "{call:?}");
        got.extend(notices(&call).into_iter().cloned());
    }
    let notice = |id: u64, ope: u8, to: u64, preview: &str| {
        serde_json::json!({
            "user": 31, "id": id, "from": 11, "ope": ope, "to": to,
            "type": "text", "preview": preview,
        })
    };
    // Everything but the storage timestamp, which the test cannot know.
    for n in &mut got {
        assert!(n["ts"].as_i64().unwrap() > 0, "{n}");
        n.as_object_mut().unwrap().remove("ts");
    }
    assert_eq!(
        got,
        [
            // The preview is capped at 8 bytes.
            notice(to_offline.id, 0, 31, "hello of"),
            notice(in_small.id, 1, small, "group he"),
            notice(last.id, 0, 31, "last"),
        ],
        "online 21 ({}), the sender, the resend and the large group ({}) make none",
        to_online.id,
        in_large.id
    );
    let m = &s1.metrics.offline;
    assert_eq!(m.queued.get(), 3);
    assert_eq!(m.skipped.get("large_group"), 1);
    eventually!(10, "three notices counted as sent", m.sent.get() == 3);
    assert_eq!(m.failed.get(), 0);
    for reason in ["queue_full", "gave_up", "shutdown"] {
        assert_eq!(m.dropped.get(reason), 0, "{reason}");
    }
    // The other server stored nothing, so it notified no one.
    assert_eq!(s2.metrics.offline.queued.get(), 0);
    db.cleanup().await;
}

/// A receiver that answers 500 at first gets the same batch again after a
/// backoff, and the failures are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_receiver_gets_the_batch_after_a_retry() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    db.directory(&[11, 31]).await;
    let mut rx = Receiver::start(2, None).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    cfg.offline_push = rx.config();
    let s1 = spawn_appserver(&ca, cfg, vec![]).await;
    wait_linked(&s1).await;
    let mut sender = ChatClient::connect(s1.client_addr.unwrap(), &token(11), "phone")
        .await
        .unwrap();
    let a = sender
        .send("r1", Ope::Single, 31, "are you there")
        .await
        .unwrap();

    let calls = [rx.next().await, rx.next().await, rx.next().await];
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    for c in &calls {
        assert!(c.signed, "{c:?}");
        // The same batch each time, with the same notices.
        assert_eq!(c.body["batch"], calls[0].body["batch"]);
        assert_eq!(c.body["notices"], calls[0].body["notices"]);
    }
    let n = notices(&calls[2]);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0]["user"], 31);
    assert_eq!(n[0]["id"], a.id);
    let m = &s1.metrics.offline;
    eventually!(10, "the delivery counted", m.sent.get() == 1);
    assert_eq!((m.failed.get(), m.batches.get()), (2, 1));
    assert_eq!(m.dropped.get("gave_up"), 0);
    db.cleanup().await;
}

/// While the receiver is stuck on one batch, notices beyond the queue's
/// bound push the oldest out: they are counted as dropped, and what is
/// delivered afterwards is the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_bound_drops_the_oldest_and_counts_them() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    db.directory(&[11, 31]).await;
    let gate = Arc::new(Semaphore::new(0));
    let mut rx = Receiver::start(0, Some(gate.clone())).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    cfg.offline_push = OfflinePushConfig {
        queue: 2,
        batch_max: 1,
        ..rx.config()
    };
    let s1 = spawn_appserver(&ca, cfg, vec![]).await;
    wait_linked(&s1).await;
    let mut sender = ChatClient::connect(s1.client_addr.unwrap(), &token(11), "phone")
        .await
        .unwrap();
    let first = sender.send("q0", Ope::Single, 31, "first").await.unwrap();
    // The receiver holds the first batch unanswered.
    let call = rx.next().await;
    assert_eq!(notices(&call)[0]["id"], first.id);
    let mut ids = Vec::new();
    for i in 1..=4 {
        let a = sender
            .send(&format!("q{i}"), Ope::Single, 31, "more")
            .await
            .unwrap();
        ids.push(a.id);
    }
    let m = &s1.metrics.offline;
    eventually!(10, "all five notices queued", m.queued.get() == 5);
    // Four behind a queue of two: the two oldest went.
    assert_eq!(m.dropped.get("queue_full"), 2);
    assert_eq!(m.queue.get(), 2);
    gate.add_permits(3);
    let mut delivered = Vec::new();
    for _ in 0..2 {
        let call = rx.next().await;
        assert!(call.signed && call.status == 200, "{call:?}");
        delivered.extend(notices(&call).iter().map(|n| n["id"].as_u64().unwrap()));
    }
    assert_eq!(delivered, &ids[2..]);
    eventually!(10, "three notices sent", m.sent.get() == 3);
    assert_eq!(m.queue.get(), 0);
    db.cleanup().await;
}

/// An in-process integration: notices reach a plugin's own
/// [`OfflinePush`] the same way (queue, batches, retries), and giving one
/// beside a webhook URL is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_process_offline_push_gets_the_notices() {
    use iim_appserver::offline::{Batch, Delivery, OfflinePush};

    struct ToChannel(mpsc::UnboundedSender<Batch>);
    impl OfflinePush for ToChannel {
        fn deliver<'a>(&'a self, batch: &'a Batch) -> Delivery<'a> {
            Box::pin(async move {
                let _ = self.0.send(batch.clone());
                Ok(())
            })
        }
    }

    let db = TestDb::new().await;
    let ca = TestCa::new();
    db.directory(&[11, 31]).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let (tx, mut batches) = mpsc::unbounded_channel();
    let extras = |sink: &mpsc::UnboundedSender<Batch>| iim_appserver::Extras {
        offline_push: Some(Arc::new(ToChannel(sink.clone()))),
        ..Default::default()
    };
    let start = |cfg, sink| {
        iim_appserver::start_with_extras(
            cfg,
            ca.server(iim::types::ServerId(1)),
            vec![],
            sink,
            tokio_util::sync::CancellationToken::new(),
        )
    };

    // A webhook URL as well: which one should get the notices? Refused.
    let rx = Receiver::start(0, None).await;
    let mut both = appserver_config(db.url(), 1, ex.addr);
    both.offline_push = rx.config();
    let e = start(both, extras(&tx)).await.err().expect("refused");
    assert!(e.to_string().contains("keep one"), "{e}");

    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    cfg.offline_push.batch_wait_ms = 0;
    let s1 = start(cfg, extras(&tx)).await.unwrap();
    wait_linked(&s1).await;
    let mut sender = ChatClient::connect(s1.client_addr.unwrap(), &token(11), "phone")
        .await
        .unwrap();
    let a = sender.send("p1", Ope::Single, 31, "psst").await.unwrap();
    let b = tokio::time::timeout(WAIT, batches.recv())
        .await
        .expect("no batch in time")
        .unwrap();
    let got: Vec<(u64, u64, Option<&str>)> = b
        .notices
        .iter()
        .map(|n| (n.user, n.id, n.preview.as_deref()))
        .collect();
    assert_eq!(got, [(31, a.id, Some("psst"))]);
    assert_eq!(b.server, 1);
    eventually!(10, "the batch counted", s1.metrics.offline.sent.get() == 1);
    db.cleanup().await;
}

/// HTTPS to a gateway whose certificate comes from a private CA: accepted
/// with that CA in `ca_file`, refused (never reaching the receiver, counted
/// as failed, then dropped) with the system's roots alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_to_a_gateway_of_a_private_ca_given_in_ca_file() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    db.directory(&[11, 31]).await;
    let gateway_ca = iim::tls::dev::DevCa::new("offline push test CA").unwrap();
    let cert = gateway_ca
        .issue_for(&["127.0.0.1"], Duration::from_secs(3_600))
        .unwrap();
    let mut rx = Receiver::serve(0, None, Some(&cert)).await;
    assert!(rx.url.starts_with("https://127.0.0.1:"), "{}", rx.url);
    let ca_file = rx._dir.path().join("gateway-ca.pem");
    std::fs::write(&ca_file, gateway_ca.ca_pem()).unwrap();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut trusting = appserver_config(db.url(), 1, ex.addr);
    trusting.offline_push = OfflinePushConfig {
        ca_file: Some(ca_file),
        ..rx.config()
    };
    let mut untrusting = appserver_config(db.url(), 2, ex.addr);
    untrusting.offline_push = OfflinePushConfig {
        max_attempts: 2,
        ..rx.config()
    };
    let s1 = spawn_appserver(&ca, trusting, vec![]).await;
    let s2 = spawn_appserver(&ca, untrusting, vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;

    // Through the server that does not trust the gateway's CA first.
    let mut c = ChatClient::connect(s2.client_addr.unwrap(), &token(11), "laptop")
        .await
        .unwrap();
    c.send("t0", Ope::Single, 31, "unseen").await.unwrap();
    let m2 = &s2.metrics.offline;
    eventually!(
        20,
        "both attempts failed and the batch was dropped",
        m2.dropped.get("gave_up") == 1
    );
    assert_eq!((m2.failed.get(), m2.sent.get()), (2, 0));
    assert!(
        rx.calls.try_recv().is_err(),
        "a request reached the receiver over a certificate the server must refuse"
    );

    let mut c = ChatClient::connect(s1.client_addr.unwrap(), &token(11), "phone")
        .await
        .unwrap();
    let a = c.send("t1", Ope::Single, 31, "over tls").await.unwrap();
    let call = rx.next().await;
    assert!(call.signed && call.status == 200, "{call:?}");
    let n = notices(&call);
    assert_eq!(
        (&n[0]["id"], &n[0]["user"]),
        (&Value::from(a.id), &Value::from(31))
    );
    eventually!(
        10,
        "the delivery counted",
        s1.metrics.offline.sent.get() == 1
    );
    assert_eq!(s1.metrics.offline.failed.get(), 0);
    db.cleanup().await;
}

/// Pushes dropped because the push queue is full still make their offline
/// recipients' notices: forty senders write to an offline user at once
/// through a push queue of one, and the receiver gets exactly one notice
/// per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_dropped_at_the_full_queue_still_notifies_its_offline_recipient() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let senders: Vec<u64> = (101..=140).collect();
    let mut users = senders.clone();
    users.push(31);
    db.directory(&users).await;
    let mut rx = Receiver::start(0, None).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    cfg.chat.push_queue = 1;
    cfg.offline_push = rx.config();
    let s1 = spawn_appserver(&ca, cfg, vec![]).await;
    wait_linked(&s1).await;

    let at = s1.client_addr.unwrap();
    let acked = iim_kit::client::burst(at, &senders, 31, 3).await;
    assert_eq!(acked.len(), 120);
    assert!(
        s1.metrics.chat.pushes_dropped.get() > 0,
        "the push queue never overflowed"
    );

    let mut notified = Vec::new();
    while notified.len() < acked.len() {
        let call = rx.next().await;
        assert!(call.signed && call.status == 200, "{call:?}");
        for n in notices(&call) {
            assert_eq!(n["user"], 31, "{n}");
            notified.push(n["id"].as_u64().unwrap());
        }
    }
    notified.sort_unstable();
    assert_eq!(
        notified,
        acked.into_iter().collect::<Vec<_>>(),
        "one notice per message, dropped push or not"
    );
    assert_eq!(s1.metrics.offline.skipped.get("push_queue_full"), 0);
    db.cleanup().await;
}
