//! The push path of one write-fan-out group message on a receiving app
//! server: the host's in-process delivery to n local connections, then each
//! connection rendering its client frame (what every gateway connection
//! task does with a push), for groups of 10, 100 and 500 members.
//!
//! The message is a chat push as the chat service sends it: the message
//! once plus every member's own inbox sequence. One iteration = one message
//! delivered to all n members and rendered n times.
//!
//! `cargo bench -p iim-appserver --bench push`

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use iim::api::LocalDelivery;
use iim::registry::{Registry, Role, ServerState};
use iim::types::{Address, MessageId, ServerId, UserId, now_ms};
use iim::wire::{Message, Timing, UserRow};
use iim_appserver::chat::{ChatMessage, PushEnvelope};
use iim_appserver::host::Host;
use iim_appserver::{AppMetrics, Attached, Connections};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const SERVER: ServerId = ServerId(1);
/// Group sizes measured.
const SIZES: [usize; 3] = [10, 100, 500];
/// The first member's user id; members are consecutive.
const FIRST_USER: u64 = 100_000;

/// n members connected to this server, and the host delivering to them.
struct Receiver {
    host: Host,
    members: Vec<Attached>,
    rows: Vec<UserRow>,
    _dir: tempfile::TempDir,
}

async fn receiver(n: usize) -> Receiver {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("registry.db").display());
    let registry = Registry::connect(&url).await.expect("registry");
    let epoch = registry
        .begin_epoch(SERVER, Role::App, "bench", ServerState::Up, now_ms())
        .await
        .expect("epoch");
    let metrics = Arc::new(AppMetrics::default());
    let connections = Arc::new(Connections::new(
        SERVER,
        epoch,
        registry,
        metrics.clone(),
        16,
    ));
    let mut members = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let a = connections
            .attach(UserId(FIRST_USER + i), "bench")
            .await
            .expect("attach");
        members.push(a);
    }
    let rows = members
        .iter()
        .map(|a| UserRow {
            user: a.session.user,
            channel: a.session.channel,
        })
        .collect();
    let host = Host::new(connections, Vec::new(), metrics);
    Receiver {
        host,
        members,
        rows,
        _dir: dir,
    }
}

/// A group message to n members as the chat service pushes it: every
/// member's own sequence in the envelope.
fn group_push(n: usize) -> Arc<Message> {
    let m: ChatMessage = serde_json::from_value(serde_json::json!({
        "id": 5_000_001, "req": "c-42", "ope": 1, "from": FIRST_USER, "to": 77,
        "type": "text", "body": {"text": "the quarterly numbers are in, see the shared sheet"},
        "ts": 1_767_225_601_456_i64
    }))
    .expect("chat message");
    let env = PushEnvelope {
        m,
        seqs: (0..n as u64).map(|i| (FIRST_USER + i, 1_000 + i)).collect(),
        gseq: None,
    };
    Arc::new(Message {
        id: MessageId {
            origin: ServerId(2),
            epoch: 1,
            seq: 1,
        },
        source: Address::new(ServerId(2), UserId(FIRST_USER)),
        target: Address::RECEIVER,
        kind: iim::kinds::CHAT,
        timing: Timing {
            sent_at_ms: 1_767_225_601_456,
            ordering_key: 5_000_001,
        },
        body: Bytes::from(serde_json::to_vec(&env).expect("envelope")),
        nested: Vec::new(),
    })
}

/// Deliver `msg` to every member, then let each connection render its
/// frame. Returns the bytes rendered (so nothing is optimised away).
fn deliver_and_render(r: &mut Receiver, msg: &Arc<Message>) -> usize {
    let report = r.host.deliver(msg, &r.rows);
    assert_eq!(report.delivered, r.members.len());
    let mut bytes = 0;
    for a in &mut r.members {
        let push = a.rx.try_recv().expect("queued");
        let frame = push.frame_for(a.session.user).expect("a frame");
        bytes += frame.len();
    }
    bytes
}

/// Every member gets a `msg` frame with its own sequence.
fn check(r: &mut Receiver, msg: &Arc<Message>) {
    r.host.deliver(msg, &r.rows);
    for a in &mut r.members {
        let push = a.rx.try_recv().expect("queued");
        let frame = push.frame_for(a.session.user).expect("a frame");
        let v: serde_json::Value = serde_json::from_str(&frame).expect("JSON");
        assert_eq!(v["op"], "msg");
        assert_eq!(v["seq"], 1_000 + (a.session.user.0 - FIRST_USER));
    }
}

fn push(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("push/write_fanout");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));
    for n in SIZES {
        let mut r = rt.block_on(receiver(n));
        let msg = group_push(n);
        check(&mut r, &msg);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let _guard = rt.enter();
            b.iter(|| black_box(deliver_and_render(&mut r, &msg)))
        });
    }
    g.finish();
}

criterion_group!(benches, push);
criterion_main!(benches);
