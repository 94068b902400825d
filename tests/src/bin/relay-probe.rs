//! A quick throughput probe of the relay path (not the benchmark suite):
//! one exchange and 1 + k app servers in this process over real QUIC +
//! mTLS on loopback, SQLite registry; server 1 pipelines `submit`s to one
//! user on each of k target servers and waits for every report.
//!
//! `cargo run --release -p iim-tests --bin relay-probe -- [messages] [bytes] [k]`

use bytes::Bytes;
use iim::types::UserId;
use iim::{DeliveryStatus, Outgoing};
use iim_kit::{
    TestCa, TestDb, appserver_config, exchange_config, spawn_appserver, spawn_exchange, wait_linked,
};
use std::time::Instant;

/// The allocator of the `iim-exchange` and `iim-appserver` binaries.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let messages = *args.first().unwrap_or(&100_000);
    let size = *args.get(1).unwrap_or(&1024);
    let k = *args.get(2).unwrap_or(&1);
    let db = TestDb::sqlite();
    let ca = TestCa::new();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    cfg.max_outstanding = 8_192;
    let origin = spawn_appserver(&ca, cfg, vec![]).await;
    wait_linked(&origin).await;
    let mut sinks = Vec::new();
    let mut targets = Vec::new();
    for i in 0..k {
        let id = 2 + i as u32;
        let mut cfg = appserver_config(db.url(), id, ex.addr);
        cfg.connection_queue = 1 << 20;
        let s = spawn_appserver(&ca, cfg, vec![]).await;
        wait_linked(&s).await;
        let user = UserId(1000 + id as u64);
        let mut conn = s.connections.attach(user, "probe").await.unwrap();
        sinks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while conn.rx.recv().await.is_some() {
                n += 1;
            }
            n
        }));
        targets.push(user);
        std::mem::forget(s);
    }
    let users = origin.iim.user_list(&targets).await.unwrap();
    let body = Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let iim = origin.iim.clone();
    let reports = tokio::spawn(async move {
        let mut delivered = 0usize;
        let (tx, mut rx) = tokio::sync::mpsc::channel(16_384);
        let producer = tokio::spawn(async move {
            for _ in 0..messages {
                let msg = Outgoing {
                    kind: 1,
                    from: UserId(1),
                    body: body.clone(),
                    ..Default::default()
                };
                let p = iim.submit(msg, &users).await.unwrap();
                if tx.send(p).await.is_err() {
                    break;
                }
            }
        });
        while let Some(p) = rx.recv().await {
            let r = p.await;
            delivered += r
                .servers
                .iter()
                .filter(|(_, s)| *s == DeliveryStatus::Delivered)
                .count();
        }
        producer.await.unwrap();
        delivered
    });
    let delivered = reports.await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "messages={messages} bytes={size} targets={k} delivered_906s={delivered} secs={secs:.2} sends/s={:.0} deliveries/s={:.0}",
        messages as f64 / secs,
        delivered as f64 / secs
    );
    assert_eq!(delivered, messages * k, "every 906 acknowledged");
    let _ = sinks;
}
