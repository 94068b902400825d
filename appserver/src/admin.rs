//! The admin API: `POST /admin/send`, which sends a text message to users
//! wherever they are connected (operators' notices, smoke tests, the
//! demo). It has a listener of its own (`admin.listen`; `/metrics` and
//! `/health` are on `http_listen`), and every call is checked, in order:
//!
//! 1. `Host` names the listener (its address, or `localhost`, `127.0.0.1`,
//!    `[::1]` on its port) or one of `admin.allowed_hosts`, so a web page
//!    cannot reach it through DNS rebinding → else 421, `bad_host`;
//! 2. `Authorization: Bearer <token>` carries the token of
//!    `admin.token_file`, compared in constant time → else 401,
//!    `no_token` / `bad_token`;
//! 3. `from` is the app server itself (0) or one of `admin.senders` →
//!    else 403, `bad_from`.
//!
//! Each refusal is counted in `iim_appserver_admin_refusals_total{reason}`.
//! The request and response JSON are `iim_http::admin`'s.

use crate::codes::AdminRefusal;
use crate::config::AdminConfig;
use crate::metrics::AppMetrics;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use iim::types::UserId;
use iim::{Iim, Outgoing};
use iim_http::admin::{
    MAX_RECIPIENTS, SEND_PATH, SYSTEM_SENDER, SendRequest, SendResponse, ServerOutcome,
};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::warn;

/// Message kind of text sent through the admin API: a notice, reserved
/// by iim (`iim::kinds`).
pub const KIND_ADMIN_TEXT: u16 = iim::kinds::NOTICE;

/// What every admin call is checked against.
pub struct Guard {
    addr: SocketAddr,
    token: String,
    hosts: BTreeSet<String>,
    senders: BTreeSet<u64>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("addr", &self.addr)
            .field("token", &"***")
            .field("hosts", &self.hosts)
            .field("senders", &self.senders)
            .finish()
    }
}

impl Guard {
    /// The rules of `config` for a listener bound to `addr`; reads the
    /// token file.
    pub fn new(config: &AdminConfig, addr: SocketAddr) -> Result<Guard, String> {
        let path = config
            .token_file
            .as_deref()
            .ok_or("admin.listen is set but admin.token_file is not")?;
        let token = iim_http::admin::read_token_file(path)?;
        warn_if_readable_by_others(path);
        let port = addr.port();
        let mut hosts: BTreeSet<String> = [
            addr.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ]
        .into();
        hosts.extend(config.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
        Ok(Guard {
            addr,
            token,
            hosts,
            senders: config.senders.iter().copied().collect(),
        })
    }

    /// The address the admin API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Why a call with these headers is refused, if it is.
    fn check(&self, headers: &HeaderMap) -> Option<AdminRefusal> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        if !host.is_some_and(|h| self.hosts.contains(&h)) {
            return Some(AdminRefusal::BadHost);
        }
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
        else {
            return Some(AdminRefusal::NoToken);
        };
        if !same(given.trim().as_bytes(), self.token.as_bytes()) {
            return Some(AdminRefusal::BadToken);
        }
        None
    }

    fn may_send_as(&self, from: u64) -> bool {
        from == SYSTEM_SENDER || self.senders.contains(&from)
    }
}

/// Equal, in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        warn!(file = %path.display(), "the admin token file is readable by others: chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &std::path::Path) {}

#[derive(Clone)]
struct AdminState {
    iim: Iim,
    guard: Arc<Guard>,
    metrics: Arc<AppMetrics>,
}

impl AdminState {
    fn refuse(&self, why: AdminRefusal) -> Response {
        self.metrics.admin_refusals.inc(why.as_str());
        let (status, text) = match why {
            AdminRefusal::BadHost => (StatusCode::MISDIRECTED_REQUEST, "unknown Host"),
            AdminRefusal::NoToken => (StatusCode::UNAUTHORIZED, "a bearer token is required"),
            AdminRefusal::BadToken => (StatusCode::UNAUTHORIZED, "bad bearer token"),
            AdminRefusal::BadFrom => (
                StatusCode::FORBIDDEN,
                "from: not a user the admin API may send as (admin.senders)",
            ),
        };
        let mut r = (status, text).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// The admin routes, every one behind `guard`.
pub fn router(iim: Iim, guard: Guard, metrics: Arc<AppMetrics>) -> Router {
    let st = AdminState {
        iim,
        guard: Arc::new(guard),
        metrics,
    };
    Router::new()
        .route(SEND_PATH, post(send))
        .route_layer(middleware::from_fn_with_state(st.clone(), checked))
        .with_state(st)
}

async fn checked(State(st): State<AdminState>, req: Request, next: Next) -> Response {
    match st.guard.check(req.headers()) {
        Some(why) => st.refuse(why),
        None => next.run(req).await,
    }
}

async fn send(State(st): State<AdminState>, Json(req): Json<SendRequest>) -> Response {
    if !st.guard.may_send_as(req.from) {
        return st.refuse(AdminRefusal::BadFrom);
    }
    match deliver(&st.iim, req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn deliver(iim: &Iim, req: SendRequest) -> Result<SendResponse, (StatusCode, String)> {
    if req.to.len() > MAX_RECIPIENTS {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_RECIPIENTS} recipients"),
        ));
    }
    let users: Vec<UserId> = req.to.iter().map(|u| UserId(*u)).collect();
    let sessions = iim
        .user_list(&users)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("registry: {e}")))?;
    let msg = Outgoing {
        kind: KIND_ADMIN_TEXT,
        from: UserId(req.from),
        body: Bytes::from(req.text.into_bytes()),
        ..Default::default()
    };
    let report = iim
        .send(msg, &sessions)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(SendResponse {
        id: report.id.to_string(),
        sessions: sessions.len(),
        local_delivered: report.local.delivered,
        local_missing: report.local.missing,
        servers: report
            .servers
            .iter()
            .map(|(s, st)| ServerOutcome {
                server: s.0,
                status: st.as_str().to_string(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(hosts: &[&str], senders: &[u64]) -> (Guard, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        let config = AdminConfig {
            listen: None,
            token_file: Some(path),
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            senders: senders.to_vec(),
        };
        let g = Guard::new(&config, "127.0.0.1:9301".parse().unwrap()).unwrap();
        (g, dir)
    }

    fn headers(host: Option<&str>, auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, v.parse().unwrap());
        }
        if let Some(v) = auth {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn every_call_needs_a_known_host_and_the_token() {
        let (g, _dir) = guard(&["Admin.Example:443"], &[]);
        let ok = "Bearer 0123456789abcdef0123456789abcdef";
        for host in [
            "127.0.0.1:9301",
            "localhost:9301",
            "[::1]:9301",
            "admin.example:443",
        ] {
            assert_eq!(g.check(&headers(Some(host), Some(ok))), None, "{host}");
        }
        for host in [None, Some("evil.example:9301"), Some("localhost:80")] {
            assert_eq!(
                g.check(&headers(host, Some(ok))),
                Some(AdminRefusal::BadHost)
            );
        }
        let local = Some("127.0.0.1:9301");
        assert_eq!(g.check(&headers(local, None)), Some(AdminRefusal::NoToken));
        assert_eq!(
            g.check(&headers(local, Some("Basic abc"))),
            Some(AdminRefusal::NoToken)
        );
        for bad in [
            "Bearer 0123456789abcdef0123456789abcdee",
            "Bearer 0123456789abcdef0123456789abcdef0",
            "Bearer ",
        ] {
            assert_eq!(
                g.check(&headers(local, Some(bad))),
                Some(AdminRefusal::BadToken)
            );
        }
    }

    #[test]
    fn only_the_server_itself_and_listed_senders_may_be_from() {
        let (g, _dir) = guard(&[], &[1001]);
        assert!(g.may_send_as(0));
        assert!(g.may_send_as(1001));
        assert!(!g.may_send_as(1002));
    }

    #[test]
    fn a_short_or_missing_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "short\n").unwrap();
        let mut config = AdminConfig {
            token_file: Some(path),
            ..Default::default()
        };
        let addr = "127.0.0.1:1".parse().unwrap();
        assert!(
            Guard::new(&config, addr)
                .unwrap_err()
                .contains("at least 32")
        );
        config.token_file = Some(dir.path().join("absent"));
        assert!(
            Guard::new(&config, addr)
                .unwrap_err()
                .contains("cannot read")
        );
        config.token_file = None;
        config.listen = Some(addr);
        assert!(config.validate().unwrap_err().contains("token_file"));
    }
}
