//! Nothing acknowledged is lost, whatever single process dies: the real
//! binaries, SIGKILLed in the middle of a burst of 1,000 messages, with
//! real WebSocket clients (issue 3 tests 2 and 3).

use iim::store::Store;
use iim::types::UserId;
use iim_kit::client::{ChatClient, Device, Frame, Ope, SendAck};
use iim_kit::deploy::TestDeployment;
use iim_kit::eventually;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const BURST: usize = 1_000;

/// Send message `i` of the burst and check it is acknowledged.
async fn send_one(sender: &mut ChatClient, i: usize) {
    sender
        .send(&format!("m{i}"), Ope::Single, 21, &i.to_string())
        .await
        .unwrap_or_else(|e| panic!("message {i}: {e}"));
}

/// Issue test 2: SIGKILL the recipient's app server in the middle of the
/// burst, restart it, reconnect the client to another server and sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recipient_server_killed_mid_burst() {
    let mut dep = TestDeployment::start(&[(11, "acme"), (21, "acme")], 3, "").await;
    let mut sender = dep.client(1, 11, "phone").await.unwrap();
    // The recipient reads its pushes while the burst goes on, until its
    // server dies under it.
    let recipient = Device::new(dep.client(2, 21, "phone").await.unwrap());
    let reader = tokio::spawn(async move {
        let mut r = recipient;
        r.await_inbox(BURST, Duration::from_secs(120)).await;
        r
    });
    for i in 0..BURST {
        match i {
            300 => dep.kill_server(2).await,
            600 => {
                dep.start_server(2).unwrap();
            }
            _ => {}
        }
        send_one(&mut sender, i).await;
    }
    // What arrived live before the kill is kept; then a new connection, to
    // another server, syncs from the cursor.
    let mut recipient = reader.await.unwrap();
    assert!(
        recipient.client.ended,
        "the connection died with its server"
    );
    let held = recipient.cursor();
    assert!(
        held > 0,
        "some messages arrived live before the kill (inbox {}, pushed {}, first {:?})",
        recipient.inbox.len(),
        recipient.pushed.len(),
        recipient.inbox.keys().next()
    );
    recipient.client = dep.client(3, 21, "phone").await.unwrap();
    recipient.sync().await.unwrap();
    recipient.assert_holds_burst(BURST);
    dep.db.cleanup().await;
}

/// Issue test 3 (a): the exchange is SIGKILLed mid-burst and restarted.
/// Sending never depends on it; pushes resume; a final sync is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exchange_killed_mid_burst() {
    let mut dep = TestDeployment::start(&[(11, "acme"), (21, "acme")], 3, "").await;
    let mut sender = dep.client(1, 11, "phone").await.unwrap();
    let mut recipient = Device::new(dep.client(2, 21, "phone").await.unwrap());
    for i in 0..BURST {
        match i {
            300 => {
                let x = dep.first_exchange();
                dep.kill_exchange(x).await
            }
            600 => {
                let x = dep.first_exchange();
                dep.start_exchange(x).unwrap();
            }
            _ => {}
        }
        send_one(&mut sender, i).await;
    }
    // Pushes queued while the exchange was down are delivered once it is
    // back; the device then syncs whatever it still lacks.
    recipient.await_inbox(BURST, Duration::from_secs(20)).await;
    recipient.sync().await.unwrap();
    recipient.assert_holds_burst(BURST);
    dep.db.cleanup().await;
}

/// Issue test 3 (b): the sender's own server is SIGKILLed while requests
/// are in flight, before it could acknowledge all of them. The client
/// resends every unacknowledged request with the same `req` through
/// another server: nothing lost, nothing stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sender_server_killed_before_acking_and_the_client_resends() {
    let mut dep = TestDeployment::start(&[(11, "acme"), (21, "acme")], 3, "").await;
    let mut sender = dep.client(1, 11, "phone").await.unwrap();
    let frame = |i: usize| json!({"op": "send", "req": format!("m{i}"), "ope": 0, "to": 21, "type": "text", "body": {"text": i.to_string()}});
    // Pipeline the whole burst, then read acks until the server dies.
    for i in 0..BURST {
        sender.send_json(&frame(i)).await.unwrap();
    }
    let mut acked: BTreeMap<String, SendAck> = BTreeMap::new();
    while acked.len() < 300 {
        let a = sender.answer().await.unwrap();
        let Frame::Ack(a) = a else {
            panic!("not an ack: {a:?}")
        };
        acked.insert(a.req.as_str().to_owned(), a);
    }
    // Stop reading; the server goes on storing the pipelined requests and
    // writing acks this client will never read. Once it has stored more
    // than the client read acks for, it dies: to the client those requests
    // were never acknowledged.
    let store = Store::new(&dep.registry().await.unwrap());
    let read = acked.len() as u64;
    eventually!(
        20,
        "more of the burst stored than acknowledged",
        store.inbox_max(UserId(21)).await.unwrap() > read
    );
    dep.kill_server(1).await;
    drop(sender);
    // Reconnect elsewhere and resend what is unacknowledged, in order.
    let mut sender = dep.client(3, 11, "phone").await.unwrap();
    let mut duplicates = 0;
    let mut resent = 0;
    for i in 0..BURST {
        let req = format!("m{i}");
        if acked.contains_key(&req) {
            continue;
        }
        let a = sender
            .send(&req, Ope::Single, 21, &i.to_string())
            .await
            .unwrap_or_else(|e| panic!("{req}: {e}"));
        resent += 1;
        if a.duplicate {
            duplicates += 1;
        }
        acked.insert(req, a);
    }
    // Every ack names a distinct stored message.
    let ids: std::collections::BTreeSet<u64> = acked.values().map(|a| a.id).collect();
    assert_eq!(ids.len(), BURST);
    let mut recipient = Device::new(dep.client(2, 21, "phone").await.unwrap());
    recipient.sync().await.unwrap();
    recipient.assert_holds_burst(BURST);
    eprintln!("resent {resent} requests, {duplicates} of them already stored");
    assert!(
        duplicates > 0,
        "some requests were stored but never acknowledged to the client"
    );
    dep.db.cleanup().await;
}
