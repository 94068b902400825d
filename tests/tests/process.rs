//! The real binaries, started from config files the way an operator would,
//! killed and restarted (issue test 5, and the drain on SIGTERM).

use iim::registry::{Registry, Role, ServerState};
use iim::types::{ServerId, UserId};
use iim_http::admin::{SendRequest, SendResponse};
use iim_http::client::{Client, metric_value};
use iim_kit::proc::{APPSERVER_BIN, Binaries, EXCHANGE_BIN, Proc, free_port};
use iim_kit::{TestDb, eventually};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const LEASE_SECS: u64 = 2;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn exchange_toml(dir: &Path, db: &str, quic: SocketAddr, http: SocketAddr) -> String {
    format!(
        r#"id = 100
listen = "{quic}"
database = "{db}"
http_listen = "{http}"
lease_secs = {LEASE_SECS}
shutdown_grace_secs = 2

[quic]
keep_alive_ms = 200
idle_timeout_ms = 1000

[tls]
ca = "{d}/ca.pem"
cert = "{d}/exchange-100.pem"
key = "{d}/exchange-100.key"
"#,
        d = dir.display()
    )
}

/// The admin API's bearer token, written to `dir/admin.token`.
const ADMIN_TOKEN: &str = "process-test-admin-token-0123456789abcdef";

fn appserver_toml(
    dir: &Path,
    db: &str,
    id: u32,
    (http, admin): (SocketAddr, SocketAddr),
    users: &[u64],
) -> String {
    write(&dir.join("admin.token"), ADMIN_TOKEN);
    format!(
        r#"id = {id}
database = "{db}"
http_listen = "{http}"
client_listen = "127.0.0.1:0"
demo_users = {users:?}
send_timeout_ms = 20000
shutdown_grace_secs = 5
reconnect_min_ms = 50
reconnect_max_ms = 300

[quic]
keep_alive_ms = 200
idle_timeout_ms = 1000

[admin]
listen = "{admin}"
token_file = "{d}/admin.token"
senders = {users:?}

[tls]
ca = "{d}/ca.pem"
cert = "{d}/server-{id}.pem"
key = "{d}/server-{id}.key"
"#,
        d = dir.display()
    )
}

async fn state_of(reg: &Registry, id: u32) -> Option<(ServerState, u64)> {
    reg.server(ServerId(id))
        .await
        .ok()
        .flatten()
        .map(|r| (r.state, r.epoch))
}

/// A daemon of this workspace, its log in `dir` (appended to on restart).
fn spawn(bin: &str, args: &[String], dir: &Path, name: &str) -> Proc {
    let bins = Binaries::next_to_me("cargo build --workspace --bins").unwrap();
    let cmd = bins.daemon(bin, args, std::env::var("RUST_LOG").ok().as_deref());
    Proc::start(name, cmd, &dir.join(format!("{name}.log")), false).unwrap()
}

fn http(addr: SocketAddr) -> Client {
    Client::new(&addr.to_string(), Duration::from_secs(60)).unwrap()
}

async fn admin_send(addr: SocketAddr, to: &[u64], text: &str) -> SendResponse {
    let req = SendRequest {
        from: 1001,
        to: to.to_vec(),
        text: text.into(),
    };
    http(addr)
        .with_token(ADMIN_TOKEN)
        .send(&req)
        .await
        .unwrap_or_else(|e| panic!("admin send: {e}"))
}

fn statuses(r: &SendResponse) -> Vec<(u32, String)> {
    r.servers
        .iter()
        .map(|s| (s.server, s.status.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_server_is_marked_down_after_its_lease_and_returns_with_a_new_epoch() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    iim::tls::dev::write_dev_certs(d, &[ServerId(100)], &[ServerId(1), ServerId(2)]).unwrap();
    let quic: SocketAddr = format!("127.0.0.1:{}", free_port(true)).parse().unwrap();
    let ex_http: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    let h1: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    let h2: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    let a1: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    let a2: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    write(
        &d.join("exchange.toml"),
        &exchange_toml(d, db.url(), quic, ex_http),
    );
    write(
        &d.join("s1.toml"),
        &appserver_toml(d, db.url(), 1, (h1, a1), &[1001]),
    );
    write(
        &d.join("s2.toml"),
        &appserver_toml(d, db.url(), 2, (h2, a2), &[2001]),
    );
    let cfg = |name: &str| vec!["--config".to_string(), d.join(name).display().to_string()];

    let mut ex = spawn(EXCHANGE_BIN, &cfg("exchange.toml"), d, "exchange");
    let reg = Registry::connect(db.url()).await.unwrap();
    eventually!(
        30,
        "the exchange registered",
        state_of(&reg, 100)
            .await
            .is_some_and(|s| s.0 == ServerState::Up)
    );
    // App servers find the exchange through the registry.
    let mut s1 = spawn(APPSERVER_BIN, &cfg("s1.toml"), d, "s1");
    let mut s2 = spawn(APPSERVER_BIN, &cfg("s2.toml"), d, "s2");
    eventually!(30, "both app servers up", {
        let a = state_of(&reg, 1).await;
        let b = state_of(&reg, 2).await;
        a.is_some_and(|s| s.0 == ServerState::Up) && b.is_some_and(|s| s.0 == ServerState::Up)
    });
    let epoch2 = state_of(&reg, 2).await.unwrap().1;
    let r = admin_send(a1, &[2001], "before").await;
    assert_eq!(statuses(&r), vec![(2, "delivered".to_string())]);

    // SIGKILL server 2: no goodbye. A send to its (still registered) user
    // waits in the exchange's queue until the lease runs out, then reads
    // "server down".
    s2.kill9().await;
    let killed = Instant::now();
    let r = admin_send(a1, &[2001], "into the void").await;
    let waited = killed.elapsed();
    assert_eq!(statuses(&r), vec![(2, "server_down".to_string())]);
    assert!(
        waited >= Duration::from_secs(LEASE_SECS),
        "reported only after the lease ({waited:?})"
    );
    eventually!(
        10,
        "server 2 marked down",
        state_of(&reg, 2)
            .await
            .is_some_and(|s| s.0 == ServerState::Down)
    );
    assert!(
        reg.sessions_of(&[UserId(2001)]).await.unwrap().is_empty(),
        "its sessions are cleared"
    );
    let page = http(ex_http).metrics().await.unwrap();
    assert!(
        page.contains("iim_exchange_servers_marked_down_total 1"),
        "{page}"
    );
    assert!(
        page.contains("iim_exchange_reports_total{status=\"server_down\"} 1"),
        "{page}"
    );

    // Restarted: a new epoch, and it receives again.
    let mut s2 = spawn(APPSERVER_BIN, &cfg("s2.toml"), d, "s2");
    eventually!(
        30,
        "server 2 back up",
        state_of(&reg, 2)
            .await
            .is_some_and(|s| s.0 == ServerState::Up)
    );
    let (_, new_epoch) = state_of(&reg, 2).await.unwrap();
    assert!(new_epoch > epoch2, "new epoch {new_epoch} after {epoch2}");
    eventually!(
        10,
        "user 2001 online again",
        !reg.sessions_of(&[UserId(2001)]).await.unwrap().is_empty()
    );
    let r = admin_send(a1, &[2001], "welcome back").await;
    assert_eq!(statuses(&r), vec![(2, "delivered".to_string())]);
    assert!(
        s2.log_text().contains("welcome back"),
        "the demo connection logged it"
    );

    // SIGTERM server 1 while it waits for a report (server 2 killed again):
    // it shows "draining", then "down", and exits cleanly.
    s2.kill9().await;
    let pending = tokio::spawn(admin_send(a1, &[2001], "pending during drain"));
    eventually!(
        10,
        "the send outstanding at server 1",
        http(h1)
            .metrics()
            .await
            .is_ok_and(|p| metric_value(&p, "iim_appserver_outstanding_905") >= Some(1.0))
    );
    s1.sigterm().await;
    eventually!(
        10,
        "server 1 draining",
        state_of(&reg, 1)
            .await
            .is_some_and(|s| s.0 == ServerState::Draining)
    );
    let exit = s1
        .wait(Duration::from_secs(20))
        .await
        .unwrap()
        .expect("server 1 exits");
    assert!(exit.success(), "clean exit: {exit:?}");
    assert_eq!(state_of(&reg, 1).await.unwrap().0, ServerState::Down);
    let r = pending.await.unwrap();
    assert_eq!(
        statuses(&r),
        vec![(2, "server_down".to_string())],
        "the drained send got its report"
    );

    // The exchange drains on SIGTERM too.
    let exit = ex.terminate(Duration::from_secs(20)).await;
    assert!(exit.clean(), "exchange clean exit: {exit}");
    let rec = reg.server(ServerId(100)).await.unwrap().unwrap();
    assert_eq!((rec.role, rec.state), (Role::Exchange, ServerState::Down));
    db.cleanup().await;
}
