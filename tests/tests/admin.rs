//! The app server's admin API over real HTTP on loopback: its own
//! listener, the bearer token, the `Host` check and the `from` rule, each
//! refusal counted; the metrics listener serves no admin route.

use iim_http::client::metric_value;
use iim_kit::{
    TestCa, TestDb, appserver_config, exchange_config, spawn_appserver, spawn_exchange, wait_linked,
};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "admin-test-token-0123456789abcdef0123";

/// One HTTP/1.1 request; the status code and the body.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = auth
        .map(|a| format!("authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\n{auth}content-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_admin_call_needs_the_token_a_known_host_and_an_allowed_sender() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(db.url())).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut cfg = appserver_config(db.url(), 1, ex.addr);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.admin.token_file = Some(token_file);
    cfg.admin.senders = vec![1001];
    cfg.demo_users = vec![1001, 1002];
    let s = spawn_appserver(&ca, cfg, vec![]).await;
    wait_linked(&s).await;
    let admin = s.admin_addr.expect("admin listener");
    let metrics = s.http_addr.expect("metrics listener");
    assert_ne!(admin, metrics);
    let host = admin.to_string();
    let bearer = format!("Bearer {TOKEN}");
    let send = |from: &str| format!(r#"{{{from}"to":[1002],"text":"hi"}}"#);

    // Refusals, each with its status.
    let (st, _) = call(
        admin,
        "POST",
        "/admin/send",
        &host,
        None,
        &send(r#""from":1001,"#),
    )
    .await;
    assert_eq!(st, 401);
    let (st, _) = call(
        admin,
        "POST",
        "/admin/send",
        &host,
        Some("Bearer not-the-token-at-all-0123456789ab"),
        &send(r#""from":1001,"#),
    )
    .await;
    assert_eq!(st, 401);
    let (st, _) = call(
        admin,
        "POST",
        "/admin/send",
        "rebound.example:80",
        Some(&bearer),
        &send(r#""from":1001,"#),
    )
    .await;
    assert_eq!(st, 421);
    let (st, body) = call(
        admin,
        "POST",
        "/admin/send",
        &host,
        Some(&bearer),
        &send(r#""from":1002,"#),
    )
    .await;
    assert_eq!(st, 403, "{body}");

    // The right token, a listed sender, or none (the server itself).
    let (st, body) = call(
        admin,
        "POST",
        "/admin/send",
        &host,
        Some(&bearer),
        &send(r#""from":1001,"#),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let report: iim_http::admin::SendResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(report.local_delivered, 1);
    let (st, body) = call(
        admin,
        "POST",
        "/admin/send",
        &format!("localhost:{}", admin.port()),
        Some(&bearer),
        &send(""),
    )
    .await;
    assert_eq!(st, 200, "{body}");

    // The metrics listener has no admin route; the admin listener no metrics.
    let (st, _) = call(
        metrics,
        "POST",
        "/admin/send",
        &metrics.to_string(),
        Some(&bearer),
        &send(""),
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = call(admin, "GET", "/metrics", &host, Some(&bearer), "").await;
    assert_eq!(st, 404);
    let (st, body) = call(metrics, "GET", "/health", &metrics.to_string(), None, "").await;
    assert_eq!((st, body.as_str()), (200, "ok"));

    let (st, page) = call(metrics, "GET", "/metrics", &metrics.to_string(), None, "").await;
    assert_eq!(st, 200);
    for reason in ["no_token", "bad_token", "bad_host", "bad_from"] {
        assert_eq!(
            metric_value(
                &page,
                &format!("iim_appserver_admin_refusals_total{{reason=\"{reason}\"}}")
            ),
            Some(1.0),
            "{reason}"
        );
    }
}

#[tokio::test]
async fn an_admin_listener_without_a_token_file_does_not_start() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let mut cfg = appserver_config(db.url(), 1, "127.0.0.1:9".parse().unwrap());
    cfg.admin.listen = Some("0.0.0.0:0".parse().unwrap());
    let tls = ca.server(iim::types::ServerId(1));
    let err = iim_appserver::start(cfg, tls, vec![], tokio_util::sync::CancellationToken::new())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("admin.token_file"), "{err:#}");
}
