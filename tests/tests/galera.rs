//! The registry and the chat store on a three-node MariaDB Galera cluster
//! (`scripts/galera-cluster`, which `scripts/test` starts): the real
//! binaries, given a database url that lists every node, carry on through
//! the other nodes when the one they use is SIGKILLed under chat load, and
//! no acknowledged message is lost, doubled or reordered.
//!
//! Needs `IIM_TEST_GALERA_URL` (the url `scripts/galera-cluster start`
//! prints) and root (it kills and restarts a node through the script).
//! Without it the test is skipped, except in CI, where it fails.

use iim_kit::TestDb;
use iim_kit::client::{ChatClient, ClientError, Device, Ope};
use iim_kit::deploy::TestDeployment;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BURST: usize = 400;

/// The tests of this file take turns: one kills and restarts node 1, which
/// would disturb the other's connections to the cluster.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn galera_url() -> Option<String> {
    match std::env::var("IIM_TEST_GALERA_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but IIM_TEST_GALERA_URL is not set: run scripts/galera-cluster start"
            );
            eprintln!("galera: skipped, IIM_TEST_GALERA_URL is not set");
            None
        }
    }
}

/// `scripts/galera-cluster <args>`, which must succeed.
fn cluster(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/galera-cluster");
    let status = Command::new(script)
        .args(args)
        .status()
        .expect("run scripts/galera-cluster");
    assert!(
        status.success(),
        "scripts/galera-cluster {args:?}: {status}"
    );
}

/// Message `i`, resent with the same `req` until it is acknowledged, as
/// docs/client-protocol.md asks of a client: on an error answer (the
/// database went away under the request) and on a lost connection (a new
/// one, to the same server).
async fn send_until_acked(dep: &TestDeployment, sender: &mut ChatClient, i: usize) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    loop {
        match sender
            .send(&format!("m{i}"), Ope::Single, 21, &i.to_string())
            .await
        {
            Ok(_) => return failures,
            Err(e) => {
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "message {i} not acknowledged within 60 s: {e}"
                );
                assert!(!e.is_fatal(), "message {i}: {e}");
                // A client's pause before it tries again.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if matches!(e, ClientError::Refused(_)) {
                    continue;
                }
                if let Ok(c) = dep.client(1, 11, "phone").await {
                    *sender = c;
                }
            }
        }
    }
}

/// A node of the cluster dies under chat load: the app servers and the
/// exchange, all on node 1 until then, move to node 2 or 3 and go on; the
/// recipient's sync is exactly the acknowledged burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_galera_node_loses_no_acknowledged_message() {
    let Some(server) = galera_url() else { return };
    let _turn = CLUSTER.lock().await;
    let db = TestDb::on(server).await;
    let dep = TestDeployment::start_on(db, &[(11, "acme"), (21, "acme")], 3, "").await;
    let mut sender = dep.client(1, 11, "phone").await.unwrap();
    let mut recipient = Device::new(dep.client(2, 21, "phone").await.unwrap());
    let mut failures = 0;
    let mut killed_at = None;
    let mut slowest = Duration::ZERO;
    for i in 0..BURST {
        if i == BURST / 3 {
            cluster(&["kill", "1"]);
            killed_at = Some(Instant::now());
        }
        let t = Instant::now();
        failures += send_until_acked(&dep, &mut sender, i).await;
        slowest = slowest.max(t.elapsed());
    }
    let after_kill = killed_at.unwrap().elapsed();
    // Every daemon left node 1 for another node (the writes after the kill
    // had to go somewhere else, and this says where).
    let exchange = iim_kit::deploy::exchange_name(dep.first_exchange());
    let names = [exchange.as_str(), "server-1", "server-2"];
    for name in names {
        let log = std::fs::read_to_string(dep.log(name)).unwrap_or_default();
        assert!(
            log.contains("using another node of the cluster"),
            "{name} did not move off the killed node:\n{log}"
        );
    }
    // The node comes back and catches up (IST); every daemon moves back to
    // it, the first node of the list, so they write through one node again.
    cluster(&["start-node", "1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let log = std::fs::read_to_string(dep.log(name)).unwrap_or_default();
            if log.contains("an earlier database node of the list answers again") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not move back to node 1 within 30 s of its return:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // And their metrics say so: on node 1, after two moves (away, back).
    let node1 = iim::registry::node_urls(dep.db.url())[0].clone();
    let node1 = node1
        .split_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap()
        .to_owned();
    for (name, http, prefix) in [
        (
            "exchange",
            dep.exchange_http(dep.first_exchange()),
            "iim_exchange",
        ),
        ("server-1", dep.server(1).http, "iim_appserver"),
        ("server-2", dep.server(2).http, "iim_appserver"),
    ] {
        let client =
            iim_http::client::Client::new(&http.to_string(), Duration::from_secs(10)).unwrap();
        let page = client.metrics().await.unwrap();
        assert!(
            page.contains(&format!(
                "{prefix}_database_active_node{{node=\"{node1}\"}} 1"
            )),
            "{name} does not say it is on {node1}:\n{page}"
        );
        let switches = iim_http::client::metric_value(
            &page,
            &format!("{prefix}_database_node_switches_total"),
        )
        .unwrap_or_else(|| panic!("{name}: no switch count:\n{page}"));
        assert!(switches >= 2.0, "{name}: {switches} switches");
    }

    recipient.sync().await.unwrap();
    recipient.assert_holds_burst(BURST);
    eprintln!(
        "galera: {BURST} messages, node 1 killed after {}; {failures} failed attempts \
         resent; the last {} messages took {after_kill:?}, the slowest ack {slowest:?}",
        BURST / 3,
        BURST - BURST / 3
    );
    dep.db.cleanup().await;
}

/// Two writers bump one server's epoch 40 times each. Through one node
/// (what the daemons do: they all use the first node of the list that
/// answers) InnoDB's row lock serialises them: 80 distinct epochs ending at
/// 80. Through two nodes Galera lets both commit locally and fails one at
/// certification (reported as a deadlock), and the registry runs that
/// transaction again: no call fails. That no increment is lost is *not*
/// asserted there: Galera may lose an update made on two nodes at once
/// (docs/operations.md), which is why the daemons write through one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_on_one_node_lose_no_update_and_on_two_nodes_are_retried() {
    use iim::registry::{Registry, node_urls};
    use iim::types::ServerId;
    let Some(server) = galera_url() else { return };
    let _turn = CLUSTER.lock().await;
    let db = TestDb::on(server).await;
    let nodes = node_urls(db.url());
    assert_eq!(nodes.len(), 3);
    let one = bump_epochs(ServerId(7), [&nodes[2], &nodes[2]]).await;
    let mut all: Vec<u64> = one.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=80).collect::<Vec<u64>>());
    let reg = Registry::connect(&nodes[2]).await.unwrap();
    assert_eq!(reg.server(ServerId(7)).await.unwrap().unwrap().epoch, 80);

    let two = bump_epochs(ServerId(8), [&nodes[1], &nodes[2]]).await;
    let mut all: Vec<u64> = two.into_iter().flatten().collect();
    all.sort_unstable();
    let issued = all.len();
    all.dedup();
    eprintln!(
        "galera: 80 epochs bumped through two nodes: {} distinct ({} lost updates)",
        all.len(),
        issued - all.len()
    );
    db.cleanup().await;
}

/// 40 `begin_epoch`s of `id` through each of two node urls at once; each
/// writer's epochs.
async fn bump_epochs(id: iim::types::ServerId, urls: [&String; 2]) -> Vec<Vec<u64>> {
    use iim::registry::{Registry, Role, ServerState};
    let mut tasks = Vec::new();
    for url in urls {
        let reg = Registry::connect(url).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut epochs = Vec::new();
            for i in 0..40 {
                epochs.push(
                    reg.begin_epoch(id, Role::App, "a", ServerState::Down, i)
                        .await
                        .unwrap(),
                );
            }
            epochs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    all
}
