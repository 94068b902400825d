//! Issue 4 test 3 with the real binaries: SIGKILL an app server; its users
//! read offline to every contact within lease + the repair bound; after a
//! restart they come back as they reconnect.

use iim::presence::PresenceStore;
use iim::types::UserId;
use iim_kit::deploy::TestDeployment;
use std::time::{Duration, Instant};

const LEASE_SECS: u64 = 2;
const REPAIR_MS: u64 = 500;
/// QUIC idle timeout of the deployment's links (detects the dead server).
const IDLE_MS: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_servers_users_go_offline_within_lease_plus_bound_and_come_back() {
    let extra = format!("[presence]\nrepair_ms = {REPAIR_MS}\n");
    let mut dep = TestDeployment::start(
        &[(11, "acme"), (21, "acme"), (31, "acme")],
        LEASE_SECS,
        &extra,
    )
    .await;
    let reg = iim::registry::Registry::connect(dep.db.url())
        .await
        .unwrap();
    let presence = PresenceStore::new(&reg);
    let mut c11 = dep.client(1, 11, "phone").await.unwrap();
    let mut c31 = dep.client(3, 31, "phone").await.unwrap();
    let c21 = dep.client(2, 21, "phone").await.unwrap();
    for c in [&mut c11, &mut c31] {
        let ok = c
            .await_presence(Duration::from_secs(15), |c| c.status_of(21).0 == "online")
            .await;
        assert!(ok, "{} sees 21 online first", c.user);
    }
    dep.kill_server(2).await;
    let killed = Instant::now();
    drop(c21);
    let bound = Duration::from_millis(IDLE_MS + LEASE_SECS * 1_000 + REPAIR_MS);
    for c in [&mut c11, &mut c31] {
        let ok = c
            .await_presence(bound + Duration::from_secs(5), |c| {
                c.status_of(21).0 == "offline"
            })
            .await;
        assert!(ok, "{} never saw 21 offline", c.user);
    }
    let took = killed.elapsed();
    let row = presence.rows(&[UserId(21)]).await.unwrap();
    assert_eq!(
        row[0].status.as_str(),
        "offline",
        "the database says so too"
    );
    eprintln!(
        "killed server's user offline everywhere after {} ms (idle {IDLE_MS} + lease {} + repair {REPAIR_MS} = {} ms)",
        took.as_millis(),
        LEASE_SECS * 1_000,
        bound.as_millis()
    );
    assert!(
        took <= bound + Duration::from_secs(2),
        "{took:?} beyond the bound {bound:?}"
    );

    // Restart: 21 comes back as it reconnects.
    dep.start_server(2).unwrap();
    dep.wait_servers(&[2]).await.unwrap();
    let _c21 = dep.client(2, 21, "phone").await.unwrap();
    for c in [&mut c11, &mut c31] {
        let ok = c
            .await_presence(Duration::from_secs(15), |c| c.status_of(21).0 == "online")
            .await;
        assert!(ok, "{} sees 21 back online", c.user);
    }
    dep.db.cleanup().await;
}
