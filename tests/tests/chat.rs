//! Chat end to end in one process: three app servers and an exchange over
//! real QUIC + mTLS, real WebSocket clients, the registry and message store
//! on MariaDB in CI (issue 3 tests 1, 4 and 5).

use iim::types::UserId;
use iim_kit::client::{ChatClient, ClientError, Device, Frame, Ope, body_text};
use iim_kit::{
    TestCa, TestDb, appserver_config, exchange_config, spawn_appserver, spawn_exchange, token,
    wait_linked,
};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

fn no_repeats(ids: &[u64]) -> bool {
    ids.iter().collect::<BTreeSet<_>>().len() == ids.len()
}

/// Issue test 1: users on three servers chat 1:1, in a small group (write
/// fan-out) and a large group (read fan-out), concurrently. Every device
/// receives every message meant for it exactly once, live; its inbox is
/// gap-free; both devices of one user hold the same inbox; all members see
/// each group's messages in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_servers_one_to_one_small_and_large_groups() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let store = db.directory(&[11, 21, 31]).await;
    let small = store
        .create_group("pair", &[UserId(11), UserId(21)])
        .await
        .unwrap();
    let large = store
        .create_group("all", &[UserId(11), UserId(21), UserId(31)])
        .await
        .unwrap();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut servers = Vec::new();
    for id in 1..=3 {
        let mut cfg = appserver_config(db.url(), id, ex.addr);
        cfg.chat.large_group_threshold = 2;
        servers.push(spawn_appserver(&ca, cfg, vec![]).await);
    }
    for s in &servers {
        wait_linked(s).await;
    }
    let at = |i: usize| servers[i].client_addr.unwrap();
    let d11 = Device::new(
        ChatClient::connect(at(0), &token(11), "phone")
            .await
            .unwrap(),
    );
    let d21a = Device::new(
        ChatClient::connect(at(1), &token(21), "phone")
            .await
            .unwrap(),
    );
    let d21b = Device::new(
        ChatClient::connect(at(2), &token(21), "laptop")
            .await
            .unwrap(),
    );
    let d31 = Device::new(
        ChatClient::connect(at(2), &token(31), "phone")
            .await
            .unwrap(),
    );

    // (device, [(ope, to)]) — each device sends its list in order while the
    // others send theirs.
    let (one, group) = (Ope::Single, Ope::Group);
    let plan: Vec<(Device, Vec<(Ope, u64)>)> = vec![
        (d11, [(one, 21), (group, small), (group, large)].repeat(4)),
        (d21a, [(one, 11)].repeat(5)),
        (d21b, [(group, small), (group, large)].repeat(3)),
        (d31, [(one, 11), (group, large)].repeat(3)),
    ];
    let mut tasks = Vec::new();
    for (mut dev, sends) in plan {
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            // `req` is unique per user across its devices.
            let tag = dev.client.welcome().device.clone();
            for (i, (ope, to)) in sends.into_iter().enumerate() {
                let req = format!("{tag}-{i}");
                let a = dev
                    .client
                    .send(&req, ope, to, &format!("{} #{i}", dev.client.user))
                    .await
                    .unwrap_or_else(|e| panic!("not acknowledged: {e}"));
                acked.push(a.id);
            }
            (dev, acked)
        }));
    }
    let mut devices = Vec::new();
    for t in tasks {
        devices.push(t.await.unwrap());
    }
    // Expected pushes per device: what others sent it (any channel of its
    // user other than itself), inbox and large-group alike.
    // 11: 5 from 21a, 3 from 31, 3 small + 3 large from 21b, 3 large from 31.
    // 21 (each device): 4 from 11 (1:1), 4 small + 4 large from 11, 3 large
    //   from 31, plus what the *other* device of 21 sent.
    // 31: 4 large from 11, 3 large from 21b.
    let expected_pushes = [17usize, 12 + 3 + 6, 12 + 3 + 5, 7];
    for ((dev, _), n) in devices.iter_mut().zip(expected_pushes) {
        dev.await_pushes(n, Duration::from_secs(20)).await;
        assert_eq!(dev.pushed.len(), n, "user {} pushes", dev.client.user);
        assert!(
            no_repeats(&dev.pushed),
            "no message pushed twice: user {} {:?}",
            dev.client.user,
            dev.pushed
        );
    }
    for (dev, _) in devices.iter_mut() {
        dev.sync().await.unwrap();
        let seqs: Vec<u64> = dev.inbox.keys().copied().collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "gap-free inbox"
        );
        assert!(no_repeats(&dev.ids()), "each message once");
    }
    // Inbox sizes: 11 holds 4+4 (own 1:1 and small) + 5 + 3 + 3 = 19,
    // 21 holds 4 + 4 + 5 + 3 = 16, 31 holds its 3 own 1:1 messages.
    let sizes: Vec<usize> = devices.iter().map(|(d, _)| d.inbox.len()).collect();
    assert_eq!(sizes, vec![19, 16, 16, 3]);
    assert_eq!(
        devices[1].0.ids(),
        devices[2].0.ids(),
        "both devices of 21 agree"
    );
    // The small group's order is the same for its two members.
    let small_of = |d: &Device| -> Vec<u64> {
        d.inbox
            .values()
            .filter(|m| m.ope == Ope::Group && m.to == small)
            .map(|m| m.id)
            .collect()
    };
    assert_eq!(small_of(&devices[0].0).len(), 7);
    assert_eq!(small_of(&devices[0].0), small_of(&devices[1].0));
    // The large group's timeline is the same for everyone, gap-free.
    let mut timelines = Vec::new();
    for (dev, _) in devices.iter_mut() {
        let t = dev.client.sync_all(Some(large), 0).await.unwrap();
        let gseqs: Vec<u64> = t.iter().map(|m| m.gseq.unwrap()).collect();
        assert_eq!(gseqs, (1..=10).collect::<Vec<_>>());
        timelines.push(t.iter().map(|m| m.id).collect::<Vec<_>>());
    }
    assert!(timelines.windows(2).all(|w| w[0] == w[1]));
    db.cleanup().await;
}

/// Issue test 4: two devices of one user, one offline during a burst: after
/// sync both hold the identical sequence of messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_offline_during_a_burst_catches_up_identically() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    db.directory(&[11, 21]).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let mut sender = ChatClient::connect(s1.client_addr.unwrap(), &token(11), "phone")
        .await
        .unwrap();
    let mut online = Device::new(
        ChatClient::connect(s2.client_addr.unwrap(), &token(21), "phone")
            .await
            .unwrap(),
    );
    for i in 0..120 {
        let a = sender
            .send(&format!("m{i}"), Ope::Single, 21, &i.to_string())
            .await
            .unwrap_or_else(|e| panic!("not acknowledged: {e}"));
        assert_eq!(a.seq, Some(i + 1), "the sender's own inbox sequence");
    }
    online.await_inbox(120, Duration::from_secs(20)).await;
    assert_eq!(online.pushed.len(), 120, "live pushes");
    let mut later = Device::new(
        ChatClient::connect(s1.client_addr.unwrap(), &token(21), "tablet")
            .await
            .unwrap(),
    );
    assert_eq!(later.client.welcome().inbox_max, 120);
    later.sync().await.unwrap();
    online.sync().await.unwrap();
    assert_eq!(later.inbox.len(), 120);
    assert_eq!(later.ids(), online.ids());
    let texts: Vec<String> = later
        .inbox
        .values()
        .map(|m| body_text(m).unwrap())
        .collect();
    assert_eq!(
        texts,
        (0..120).map(|i| i.to_string()).collect::<Vec<_>>(),
        "sender order"
    );
    db.cleanup().await;
}

/// Issue test 5: bad input gets a clear error and nothing else is affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_client_input_gets_clear_errors_and_harms_no_one() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    db.directory(&[11, 21]).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let a1 = s1.client_addr.unwrap();
    let mut alice = ChatClient::connect(a1, &token(11), "phone").await.unwrap();
    let mut bob = Device::new(
        ChatClient::connect(s2.client_addr.unwrap(), &token(21), "phone")
            .await
            .unwrap(),
    );

    // Unauthenticated: an error, then the connection is closed.
    let mut anon = ChatClient::raw(a1).await.unwrap();
    anon.send_json(
        &json!({"op": "send", "req": "x", "ope": 0, "to": 21, "type": "text", "body": {}}),
    )
    .await
    .unwrap();
    let e = anon
        .next_frame(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let Frame::Error(e) = e else {
        panic!("not an error: {e:?}")
    };
    assert_eq!(e.code, "auth_required");
    assert!(
        anon.next_frame(Duration::from_secs(5))
            .await
            .unwrap()
            .is_none(),
        "closed"
    );
    // A bad token, and a valid token for a user the directory does not know.
    assert!(ChatClient::connect(a1, "not-a-token", "x").await.is_err());
    let mut ghost = ChatClient::raw(a1).await.unwrap();
    ghost
        .send_json(&json!({"op": "auth", "token": token(999), "device": "x"}))
        .await
        .unwrap();
    let e = ghost
        .next_frame(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let Frame::Error(e) = e else {
        panic!("not an error: {e:?}")
    };
    assert_eq!(e.code, "unknown_user");
    assert!(
        ghost
            .next_frame(Duration::from_secs(5))
            .await
            .unwrap()
            .is_none(),
        "closed"
    );

    let mut mallory = ChatClient::connect(a1, &token(11), "laptop").await.unwrap();
    let cases = [
        (json!({"op": "send", "req": "f", "ope": 0, "to": 21, "from": 21, "type": "text", "body": {}}).to_string(), "forged_from"),
        (json!({"op": "send", "req": "big", "ope": 0, "to": 21, "type": "text", "body": {"t": "x".repeat(70_000)}}).to_string(), "too_large"),
        ("{not json".to_string(), "invalid_json"),
        (json!({"op": "sync", "since": -1}).to_string(), "bad_request"),
        (json!({"op": "sync", "since": 1_000_000_000u64}).to_string(), "bad_request"),
        (json!({"op": "send", "req": "g", "ope": 1, "to": 999, "type": "text", "body": {}}).to_string(), "unknown_group"),
        (json!({"op": "send", "req": "u", "ope": 0, "to": 999, "type": "text", "body": {}}).to_string(), "unknown_user"),
        (json!({"op": "fly"}).to_string(), "unknown_op"),
    ];
    for (frame, code) in cases {
        mallory.send_text_frame(&frame).await.unwrap();
        let e = match mallory.answer().await {
            Err(ClientError::Refused(e)) => e,
            other => panic!("{frame:.60}: not an error frame: {other:?}"),
        };
        assert_eq!(e.code, code, "{e:?}");
        assert!(!e.message.is_empty());
    }
    // Mallory's connection still works, and so does everyone else's.
    mallory
        .send("ok", Ope::Single, 21, "still here")
        .await
        .unwrap_or_else(|e| panic!("not acknowledged: {e}"));
    alice
        .send("a1", Ope::Single, 21, "hello bob")
        .await
        .unwrap_or_else(|e| panic!("not acknowledged: {e}"));
    bob.await_inbox(2, Duration::from_secs(20)).await;
    assert_eq!(bob.inbox.len(), 2);
    let texts: Vec<String> = bob.inbox.values().map(|m| body_text(m).unwrap()).collect();
    assert_eq!(texts, vec!["still here", "hello bob"]);
    db.cleanup().await;
}

/// A `req` reused for another target (here a large group the sender is not
/// in) or other contents is refused `req_reused`: nothing is stored or
/// pushed for it, and an exact resend is still acknowledged as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_req_reused_for_another_target_is_refused_and_pushed_to_nobody() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let store = db.directory(&[11, 21, 31, 41]).await;
    let outsiders = store
        .create_group("others", &[UserId(31), UserId(41)])
        .await
        .unwrap();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    cfg.chat.large_group_threshold = 2;
    let s1 = spawn_appserver(&ca, cfg, vec![]).await;
    wait_linked(&s1).await;
    let at = s1.client_addr.unwrap();
    let mut sender = ChatClient::connect(at, &token(11), "phone").await.unwrap();
    let mut watcher = ChatClient::connect(at, &token(31), "phone").await.unwrap();

    let first = sender.send("r-1", Ope::Single, 21, "for 21").await.unwrap();
    assert!(!first.duplicate);
    let again = sender.send("r-1", Ope::Single, 21, "for 21").await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    for (ope, to, text) in [
        (Ope::Group, outsiders, "for 21"),
        (Ope::Single, 31, "for 21"),
        (Ope::Single, 21, "something else"),
    ] {
        match sender.send("r-1", ope, to, text).await {
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.code, "req_reused", "{e:?}");
                assert_eq!(e.req.as_deref(), Some("r-1"));
            }
            other => panic!("expected req_reused, got {other:?}"),
        }
    }
    // 31 (a member of the group and a target above) receives the next
    // message meant for it, and nothing before it.
    let marker = sender.send("r-2", Ope::Single, 31, "marker").await.unwrap();
    let push = watcher
        .next_push(Duration::from_secs(10))
        .await
        .expect("a push");
    let Frame::Msg(m) = push else {
        panic!("expected a message, got {push:?}")
    };
    assert_eq!(m.id, marker.id, "the refused resends reached 31: {m:?}");
    let page = watcher.sync_page(None, 0, 100).await.unwrap();
    assert_eq!(page.messages.len(), 1, "{page:?}");
    let page = watcher.sync_page(Some(outsiders), 0, 100).await.unwrap();
    assert!(page.messages.is_empty(), "{page:?}");
    db.cleanup().await;
}

/// A chat message relayed by 906 whose envelope names another sender than
/// the message's source user is not delivered, and is counted; the next
/// honest message arrives as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_envelope_with_a_forged_sender_is_not_delivered() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    db.directory(&[11, 21, 99]).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let mut c11 = ChatClient::connect(s1.client_addr.unwrap(), &token(11), "phone")
        .await
        .unwrap();
    let mut c21 = ChatClient::connect(s2.client_addr.unwrap(), &token(21), "phone")
        .await
        .unwrap();

    // Server 1 relays, as user 11, a chat envelope that says user 99 wrote it.
    let envelope = json!({"m": {
        "id": 424242, "req": "forged", "ope": 0, "from": 99, "to": 21,
        "type": "text", "body": {"text": "trust me"}, "ts": 1
    }, "seqs": [[21, 1]]});
    let sessions = s1.iim.user_list(&[UserId(21)]).await.unwrap();
    let report = s1
        .iim
        .send(
            iim::Outgoing {
                kind: iim::kinds::CHAT,
                from: UserId(11),
                body: serde_json::to_vec(&envelope).unwrap().into(),
                ..Default::default()
            },
            &sessions,
        )
        .await
        .unwrap();
    assert!(report.all_delivered(), "{report:?}");
    iim_kit::eventually!(
        10,
        "server 2 counted the forged sender",
        s2.metrics.forged_pushes.get() == 1
    );

    let honest = c11.send("h-1", Ope::Single, 21, "honest").await.unwrap();
    let push = c21
        .next_push(Duration::from_secs(10))
        .await
        .expect("a push");
    let Frame::Msg(m) = push else {
        panic!("expected a message, got {push:?}")
    };
    assert_eq!((m.id, m.from), (honest.id, 11), "{m:?}");
    db.cleanup().await;
}

/// `server` dropped pushes at its full push queue, and `recipient` hears
/// `sync_needed` for them.
async fn told_to_sync(server: &iim_appserver::AppServerHandle, recipient: &mut ChatClient) {
    let dropped = server.metrics.chat.pushes_dropped.get();
    assert!(dropped > 0, "the push queue never overflowed");
    let told = loop {
        match recipient.next_push(Duration::from_secs(10)).await {
            Some(Frame::SyncNeeded) => break true,
            Some(_) => {}
            None => break false,
        }
    };
    assert!(told, "{dropped} pushes dropped and no sync_needed arrived");
    assert!(server.metrics.chat.sync_needed.get() >= 1);
}

/// Issue 14: a push dropped because the sending server's push queue is full
/// does not wait for the recipient's next push or reconnect to be noticed:
/// the recipient's connections get `sync_needed`, and a sync brings every
/// message, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_push_tells_its_recipient_to_sync() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let senders: Vec<u64> = (101..=140).collect();
    let mut users = senders.clone();
    users.push(21);
    db.directory(&users).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    // One stored message may wait for its push; the rest of a batch cannot.
    cfg.chat.push_queue = 1;
    let s1 = spawn_appserver(&ca, cfg, vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(db.url(), 2, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let mut recipient = ChatClient::connect(s2.client_addr.unwrap(), &token(21), "phone")
        .await
        .unwrap();

    // Forty senders on server 1 write to 21 at once, three messages each.
    let at = s1.client_addr.unwrap();
    let acked = iim_kit::client::burst(at, &senders, 21, 3).await;
    assert_eq!(acked.len(), 120);
    // The recipient is told; what it holds after a sync is everything.
    told_to_sync(&s1, &mut recipient).await;
    let inbox = recipient.sync_all(None, 0).await.unwrap();
    let seqs: Vec<u64> = inbox.iter().map(|m| m.seq.unwrap()).collect();
    assert_eq!(seqs, (1..=120).collect::<Vec<_>>());
    let ids: BTreeSet<u64> = inbox.iter().map(|m| m.id).collect();
    assert_eq!(ids, acked);
}

/// The same for a large group (read fan-out): a dropped push tells the
/// members online to sync, found by one join of the group's members with
/// the sessions, and a sync of the group's timeline brings every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_group_push_tells_its_members_online_to_sync() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let senders: Vec<u64> = (101..=140).collect();
    let mut users = senders.clone();
    users.extend([21, 22]);
    let store = db.directory(&users).await;
    let members: Vec<UserId> = users.iter().map(|&u| UserId(u)).collect();
    let group = store.create_group("everyone", &members).await.unwrap();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    cfg.chat.push_queue = 1;
    cfg.chat.large_group_threshold = 2;
    let s1 = spawn_appserver(&ca, cfg, vec![]).await;
    let mut cfg = appserver_config(db.url(), 2, ex.addr);
    cfg.chat.large_group_threshold = 2;
    let s2 = spawn_appserver(&ca, cfg, vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    // 21 is online on server 2; 22 never connects.
    let mut recipient = ChatClient::connect(s2.client_addr.unwrap(), &token(21), "phone")
        .await
        .unwrap();

    let at = s1.client_addr.unwrap();
    let acked = iim_kit::client::burst_to(at, &senders, Ope::Group, group, 3).await;
    assert_eq!(acked.len(), 120);
    told_to_sync(&s1, &mut recipient).await;
    let timeline = recipient.sync_all(Some(group), 0).await.unwrap();
    let gseqs: Vec<u64> = timeline.iter().map(|m| m.gseq.unwrap()).collect();
    assert_eq!(gseqs, (1..=120).collect::<Vec<_>>());
    let ids: BTreeSet<u64> = timeline.iter().map(|m| m.id).collect();
    assert_eq!(ids, acked);
}

/// A client may send without waiting for acks: forty sends written at
/// once, mixed with a refused one and a resend, and a sync written after
/// them. The answers come in request order, the messages are stored in the
/// order sent (consecutive sequences), the refusal and the resend are
/// answered in their places, and the sync sees every send before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_sends_are_stored_and_answered_in_the_order_sent() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    db.directory(&[11, 21]).await;
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let s1 = spawn_appserver(&ca, appserver_config(db.url(), 1, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    let at = s1.client_addr.unwrap();
    let mut c = ChatClient::connect(at, &token(11), "phone").await.unwrap();

    // Requests 0..=39 are sends to 21; 20 goes to a user nobody knows and
    // 30 repeats 10's req (a resend); 40 is a sync.
    let mut expected = Vec::new();
    for i in 0..40u64 {
        let (req, to) = match i {
            20 => ("to-nobody".to_string(), 999),
            30 => ("m10".to_string(), 21),
            _ => (format!("m{i}"), 21),
        };
        let body = json!({ "text": format!("#{i}") });
        let body = if i == 30 {
            json!({ "text": "#10" })
        } else {
            body
        };
        c.write(&iim_kit::client::Request::Send {
            req: &req,
            ope: Ope::Single,
            to,
            kind: "text",
            body: &body,
        })
        .await
        .unwrap();
        expected.push(req);
    }
    c.write(&iim_kit::client::Request::Sync {
        since: 0,
        limit: 100,
        group: None,
    })
    .await
    .unwrap();

    let mut seqs = Vec::new();
    for (i, req) in expected.iter().enumerate() {
        match c.next_frame(Duration::from_secs(10)).await.unwrap() {
            Some(Frame::Ack(a)) => {
                assert_eq!(a.req.as_str(), req, "answer {i} is for another request");
                assert_eq!(a.duplicate, i == 30, "answer {i}: {a:?}");
                if i == 30 {
                    assert_eq!(a.seq, Some(11), "the resend has the original's sequence");
                } else {
                    seqs.push(a.seq.unwrap());
                }
            }
            Some(Frame::Error(e)) => {
                assert_eq!(i, 20, "answer {i} refused: {e:?}");
                assert_eq!(e.req.as_deref(), Some("to-nobody"));
            }
            other => panic!("answer {i}: {other:?}"),
        }
    }
    assert_eq!(
        seqs,
        (1..=38).collect::<Vec<_>>(),
        "stored in the order sent"
    );
    let Some(Frame::Sync(page)) = c.next_frame(Duration::from_secs(10)).await.unwrap() else {
        panic!("no sync answer");
    };
    let texts: Vec<String> = page.messages.iter().filter_map(body_text).collect();
    let want: Vec<String> = (0..40)
        .filter(|i| *i != 20 && *i != 30)
        .map(|i| format!("#{i}"))
        .collect();
    assert_eq!(texts, want, "the sync sees every send before it, in order");
}

/// The next `receipt` pushed to `c` (other pushes are skipped).
async fn next_receipt(c: &mut ChatClient) -> iim_kit::client::Receipt {
    loop {
        match c.next_push(Duration::from_secs(10)).await {
            Some(Frame::Receipt(r)) => return r,
            Some(_) => {}
            None => panic!("user {}: no receipt within 10 s", c.user),
        }
    }
}

/// The next `typing` pushed to `c` (other pushes are skipped).
async fn next_typing(c: &mut ChatClient) -> iim_kit::client::Typing {
    loop {
        match c.next_push(Duration::from_secs(10)).await {
            Some(Frame::Typing(t)) => return t,
            Some(_) => {}
            None => panic!("user {}: no typing within 10 s", c.user),
        }
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a refusal: {e}"))
            .to_owned(),
        Ok(v) => panic!("accepted: {v:?}"),
    }
}

/// Issue 14, receipts: a read on one device reaches the other side's
/// device on another server, in that side's own sequences, and the
/// reader's other device; the position only moves forward, survives a
/// reconnect (`read_state`), and bad reads are refused with clear codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_receipt_reaches_the_other_side_and_survives_a_reconnect() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let store = db.directory(&[11, 21, 31]).await;
    let theirs = store
        .create_group("not ours", &[UserId(11), UserId(31)])
        .await
        .unwrap();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut servers = Vec::new();
    for id in 1..=3 {
        servers.push(spawn_appserver(&ca, appserver_config(db.url(), id, ex.addr), vec![]).await);
    }
    for s in &servers {
        wait_linked(s).await;
    }
    let at = |i: usize| servers[i].client_addr.unwrap();
    let mut c11 = ChatClient::connect(at(0), &token(11), "phone")
        .await
        .unwrap();
    let mut c21 = ChatClient::connect(at(1), &token(21), "phone")
        .await
        .unwrap();
    let mut c21b = ChatClient::connect(at(2), &token(21), "laptop")
        .await
        .unwrap();

    // 31 writes to 11 first, so the two inboxes number the conversation
    // differently.
    let mut c31 = ChatClient::connect(at(2), &token(31), "phone")
        .await
        .unwrap();
    c31.send("r-x", Ope::Single, 11, "elsewhere").await.unwrap();
    let first = c21.send("r-0", Ope::Single, 11, "before").await.unwrap();
    assert_eq!(first.seq, Some(1));
    let a = c11.send("r-1", Ope::Single, 21, "one").await.unwrap();
    let b = c11.send("r-2", Ope::Single, 21, "two").await.unwrap();
    assert_eq!((a.seq, b.seq), (Some(3), Some(4)), "11's inbox");
    // In 21's inbox: 1 "before", 2 "one", 3 "two".
    let set = c21.read(Ope::Single, 11, 3).await.unwrap();
    assert_eq!((set.seq, set.moved), (Some(3), true), "{set:?}");

    let r = next_receipt(&mut c11).await;
    assert_eq!(
        (r.reader, r.ope, r.to, r.seq, r.id),
        (21, Ope::Single, 21, Some(4), b.id),
        "the sender sees its own seq of its last message read: {r:?}"
    );
    let r = next_receipt(&mut c21b).await;
    assert_eq!(
        (r.reader, r.to, r.seq, r.id),
        (21, 11, Some(3), b.id),
        "the reader's other device: {r:?}"
    );

    // Only forward: an older position is answered with the stored one.
    let again = c21b.read(Ope::Single, 11, 2).await.unwrap();
    assert_eq!((again.seq, again.moved), (Some(3), false), "{again:?}");

    // Bad reads: refused with their codes, counted; the connection stays.
    assert_eq!(code(c21.read(Ope::Single, 11, 99).await), "bad_request");
    assert_eq!(code(c21.read(Ope::Single, 999, 1).await), "unknown_user");
    assert_eq!(
        code(c21.read(Ope::Group, 424_242, 1).await),
        "unknown_group"
    );
    assert_eq!(code(c21.read(Ope::Group, theirs, 1).await), "not_member");
    c21.send_json(&json!({"op": "read", "ope": 0, "to": 11, "seq": 0}))
        .await
        .unwrap();
    assert_eq!(code(c21.answer().await), "bad_request");
    assert_eq!(servers[1].metrics.receipts.refused.get(), 1);
    assert_eq!(servers[1].metrics.receipts.moved.get(), 1);
    assert_eq!(servers[2].metrics.receipts.unchanged.get(), 1);
    // And on the metrics page, with the refusals by code.
    let page = iim::metrics::Render::render(servers[1].metrics.as_ref());
    assert!(
        page.contains("\niim_receipts_reads_moved_total 1\n"),
        "{page}"
    );
    assert!(page.contains("\niim_receipts_refused_total 1\n"), "{page}");
    assert!(
        page.contains(r#"iim_appserver_client_errors_total{code="unknown_group"} 1"#),
        "{page}"
    );

    // Reconnected elsewhere, both sides still know where 21 stands.
    c21.close().await;
    let mut c21c = ChatClient::connect(at(0), &token(21), "tablet")
        .await
        .unwrap();
    let state = c21c.read_state().await.unwrap();
    assert_eq!(state.mine.len(), 1, "{state:?}");
    assert_eq!(
        (state.mine[0].ope, state.mine[0].to, state.mine[0].seq),
        (Ope::Single, 11, Some(3))
    );
    let state = c11.read_state().await.unwrap();
    assert!(state.mine.is_empty(), "11 read nothing: {state:?}");
    assert_eq!(state.theirs.len(), 1, "{state:?}");
    let t = &state.theirs[0];
    assert_eq!((t.reader, t.ope, t.to, t.seq), (21, Ope::Single, 21, 4));
    db.cleanup().await;
}

/// Issue 14, typing and group receipts: typing reaches the other side's
/// connections on other servers (1:1 and a small group) and is limited per
/// connection; a read in a small group reaches every member in its own
/// sequence; large groups get neither from others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typing_and_group_receipts_reach_the_other_members() {
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
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let mut servers = Vec::new();
    for id in 1..=3 {
        let mut cfg = appserver_config(db.url(), id, ex.addr);
        cfg.chat.large_group_threshold = 3;
        servers.push(spawn_appserver(&ca, cfg, vec![]).await);
    }
    for s in &servers {
        wait_linked(s).await;
    }
    let at = |i: usize| servers[i].client_addr.unwrap();
    let mut c11 = ChatClient::connect(at(0), &token(11), "phone")
        .await
        .unwrap();
    let mut c21 = ChatClient::connect(at(1), &token(21), "phone")
        .await
        .unwrap();
    let mut c31 = ChatClient::connect(at(2), &token(31), "phone")
        .await
        .unwrap();

    c11.typing(Ope::Single, 21).await.unwrap();
    let t = next_typing(&mut c21).await;
    assert_eq!((t.from, t.ope, t.to), (11, Ope::Single, 11), "{t:?}");
    assert!(t.expires_in > 0);
    c11.typing(Ope::Group, small).await.unwrap();
    for c in [&mut c21, &mut c31] {
        let t = next_typing(c).await;
        assert_eq!((t.from, t.ope, t.to), (11, Ope::Group, small), "{t:?}");
    }
    assert_eq!(code(c31.typing(Ope::Group, large).await), "bad_request");
    assert_eq!(code(c31.typing(Ope::Single, 999).await), "unknown_user");
    // A burst of three per connection, then one a second: of a quick run,
    // the fourth (or, on a very slow machine, the fifth) is refused.
    let mut refused_at = None;
    for i in 0..6 {
        match c21.typing(Ope::Single, 11).await {
            Ok(()) => {}
            Err(e) => {
                assert_eq!(e.code(), Some("rate_limited"), "{e}");
                refused_at = Some(i);
                break;
            }
        }
    }
    assert!(
        matches!(refused_at, Some(3..=4)),
        "a burst of three, then refused: {refused_at:?}"
    );
    assert!(servers[1].metrics.receipts.typing_limited.get() >= 1);

    // A small group: 21's read reaches 11 and 31 in their own sequences.
    let m = c11
        .send("g-1", Ope::Group, small, "hello all")
        .await
        .unwrap();
    let mut seq_of = std::collections::HashMap::new();
    seq_of.insert(11, m.seq.unwrap());
    for c in [&mut c21, &mut c31] {
        let seq = loop {
            match c.next_push(Duration::from_secs(10)).await {
                Some(Frame::Msg(got)) if got.id == m.id => break got.seq.unwrap(),
                Some(_) => {}
                None => panic!("no message for {}", c.user),
            }
        };
        seq_of.insert(c.user, seq);
    }
    c21.read(Ope::Group, small, seq_of[&21]).await.unwrap();
    for c in [&mut c11, &mut c31] {
        let r = next_receipt(c).await;
        assert_eq!(
            (r.reader, r.ope, r.to, r.seq, r.id),
            (21, Ope::Group, small, Some(seq_of[&c.user]), m.id),
            "{r:?}"
        );
    }
    // A large group: a read is a timeline position, and nobody else hears
    // of it (31 gets the message push, then nothing more).
    let big = c11
        .send("g-2", Ope::Group, large, "hello many")
        .await
        .unwrap();
    let gseq = big.gseq.unwrap();
    let set = c31.read(Ope::Group, large, gseq).await.unwrap();
    assert_eq!((set.gseq, set.seq), (Some(gseq), None), "{set:?}");
    assert_eq!(
        code(c31.read(Ope::Group, large, gseq + 1).await),
        "bad_request"
    );
    let state = c31.read_state().await.unwrap();
    assert!(
        state
            .mine
            .iter()
            .any(|p| p.to == large && p.gseq == Some(gseq)),
        "{state:?}"
    );
    assert!(
        state
            .theirs
            .iter()
            .any(|t| t.reader == 21 && t.to == small && t.seq == seq_of[&31]),
        "{state:?}"
    );
    // 31's pushes to 11 keep their order (one source, one ordering key):
    // had the large group's read been pushed, it would come first.
    c31.read(Ope::Group, small, seq_of[&31]).await.unwrap();
    let r = next_receipt(&mut c11).await;
    assert_eq!(
        (r.reader, r.to, r.seq),
        (31, small, Some(seq_of[&11])),
        "a large group's read is not pushed to others: {r:?}"
    );
    db.cleanup().await;
}
