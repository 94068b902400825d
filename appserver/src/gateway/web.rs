//! The web chat on the client listener: the page at `/`, its script and
//! style, and the JavaScript client library under `/js/` (all compiled
//! into the binary, so a server serves the page that matches its protocol
//! and there is nothing to deploy next to it), `/config.json` (what the page
//! needs to know before signing in), plus, in development only,
//! `POST /dev/token`, which mints a short-lived token for a user.
//!
//! Every answer forbids everything the page does not need: scripts, styles
//! and images from this origin only, WebSocket connections to this host
//! only (any port, so the page can fail over to the other app servers of a
//! development machine), no framing, no inline script.
//!
//! The token endpoint exists only when the server accepts tokens signed
//! with the public development secret, which the config allows only on a
//! loopback client listener (or with `auth.allow_dev_secret`): there,
//! anyone can mint tokens already (`iimctl token`), so the endpoint gives
//! away nothing; anywhere else it answers 404 like any unknown path.

use axum::Json;
use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use iim::token::{DEV_SECRET, TokenVerifier};
use iim::types::UserId;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a development token lives. Short, because the page asks for a
/// fresh one whenever the server says the old one expired.
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// One compiled-in file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:expr, $file:literal) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $file)),
        }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// The page and the library files it imports (the browser's share of
/// `clients/js/src`: not the Node-only file storage).
const ASSETS: &[Asset] = &[
    asset!("/", HTML, "web/index.html"),
    asset!("/app.js", JS, "web/app.js"),
    asset!("/view.js", JS, "web/view.js"),
    asset!("/style.css", CSS, "web/style.css"),
    asset!("/favicon.svg", SVG, "web/favicon.svg"),
    asset!("/js/index.js", JS, "../clients/js/src/index.js"),
    asset!("/js/client.js", JS, "../clients/js/src/client.js"),
    asset!("/js/emitter.js", JS, "../clients/js/src/emitter.js"),
    asset!("/js/errors.js", JS, "../clients/js/src/errors.js"),
    asset!(
        "/js/storage/memory.js",
        JS,
        "../clients/js/src/storage/memory.js"
    ),
    asset!(
        "/js/storage/indexeddb.js",
        JS,
        "../clients/js/src/storage/indexeddb.js"
    ),
];

/// True when `verifier` accepts a token signed with the development
/// secret. Asking the verifier itself, rather than the config, ties the
/// endpoint to what it is for: it mints only tokens this server accepts,
/// and never exists beside a custom verifier or a secret of one's own.
pub fn accepts_dev_secret(verifier: &dyn TokenVerifier) -> bool {
    let probe = iim::token::mint(DEV_SECRET.as_bytes(), UserId(1), Duration::from_secs(60));
    verifier.verify(&probe).is_ok()
}

/// The web chat's routes; `POST /dev/token` only when `dev_tokens`.
pub fn router(dev_tokens: bool) -> Router {
    let mut r = Router::new();
    for a in ASSETS {
        r = r.route(a.path, get(move |h: HeaderMap| async move { serve(a, &h) }));
    }
    // What the page needs to know before signing in, so it need not probe
    // the token endpoint (and log a 404) to find out.
    r = r.route(
        "/config.json",
        get(move |h: HeaderMap| async move { page_config(dev_tokens, &h) }),
    );
    if dev_tokens {
        r = r.route("/dev/token", post(dev_token));
    }
    r
}

fn serve(a: &'static Asset, request: &HeaderMap) -> Response {
    let mut res = (StatusCode::OK, a.body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    // The files change with the binary under the same names: always ask.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(h, request);
    res
}

fn page_config(dev_tokens: bool, request: &HeaderMap) -> Response {
    let mut res = Json(serde_json::json!({ "dev_tokens": dev_tokens })).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(h, request);
    res
}

/// The headers every answer of the web chat carries.
fn secure(h: &mut HeaderMap, request: &HeaderMap) {
    if let Ok(csp) = HeaderValue::from_str(&policy(host_name(request))) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// The Content-Security-Policy for a page reached as `host`.
fn policy(host: Option<&str>) -> String {
    // 'self' alone would allow only this server's port; the page also
    // fails over to the other app servers of the same host.
    let sockets = host
        .map(|h| format!(" ws://{h}:* wss://{h}:*"))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// The host name (without port) the request was sent to, if it is a plain
/// DNS name, IPv4 or bracketed IPv6 address: anything else would let a
/// forged `Host` header write into the policy.
fn host_name(request: &HeaderMap) -> Option<&str> {
    let host = request.get(header::HOST)?.to_str().ok()?;
    let name = if host.starts_with('[') {
        &host[..=host.find(']')?]
    } else {
        host.split(':').next()?
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    ok.then_some(name)
}

#[derive(Deserialize)]
struct DevTokenRequest {
    user: u64,
}

#[derive(Serialize)]
struct DevToken {
    user: u64,
    token: String,
    expires_in: u64,
}

/// `POST /dev/token` with `{"user":1001}`: a token for that user. A JSON
/// body is required (axum refuses other content types), so a cross-site
/// form cannot call it without a CORS preflight, which nothing answers.
async fn dev_token(request: HeaderMap, Json(req): Json<DevTokenRequest>) -> Response {
    let mut res = if req.user == 0 {
        (StatusCode::BAD_REQUEST, "user: a positive user id\n").into_response()
    } else {
        let token = iim::token::mint(DEV_SECRET.as_bytes(), UserId(req.user), DEV_TOKEN_TTL);
        Json(DevToken {
            user: req.user,
            token,
            expires_in: DEV_TOKEN_TTL.as_secs(),
        })
        .into_response()
    };
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure(h, &request);
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use iim::token::Hs256Verifier;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `router(dev)` on loopback and sends one raw HTTP/1.1
    /// request; returns the status line, the headers and the body.
    async fn request(dev: bool, raw: &str) -> (String, String, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, router(dev)).await.unwrap();
        });
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        server.abort();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap();
        (status.to_owned(), headers.to_lowercase(), body.to_owned())
    }

    fn post_token(body: &str) -> String {
        format!(
            "POST /dev/token HTTP/1.1\r\nhost: 127.0.0.1:8201\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn serves_the_page_and_the_library_with_a_strict_policy() {
        for (path, kind, needle) in [
            ("/", "text/html", "<script type=\"module\" src=\"/app.js\">"),
            ("/app.js", "text/javascript", "IimClient"),
            ("/js/client.js", "text/javascript", "export class IimClient"),
            ("/style.css", "text/css", "banner"),
        ] {
            let (status, headers, body) = request(
                false,
                &format!(
                    "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:8201\r\nconnection: close\r\n\r\n"
                ),
            )
            .await;
            assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
            assert!(
                headers.contains(&format!("content-type: {kind}")),
                "{path}: {headers}"
            );
            assert!(headers.contains("cache-control: no-cache"), "{path}");
            assert!(
                headers.contains(
                    "connect-src 'self' ws://127.0.0.1:* wss://127.0.0.1:*; base-uri 'none'"
                ),
                "{path}: {headers}"
            );
            assert!(headers.contains("script-src 'self';"), "{path}");
            assert!(body.contains(needle), "{path} lacks {needle}");
        }
    }

    #[tokio::test]
    async fn the_node_only_storage_and_unknown_paths_are_not_served() {
        for path in ["/js/storage/file.js", "/index.html", "/../Cargo.toml"] {
            let (status, _, _) = request(
                false,
                &format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"),
            )
            .await;
            assert_eq!(status, "HTTP/1.1 404 Not Found", "{path}");
        }
    }

    #[test]
    fn a_forged_host_stays_out_of_the_policy() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(v).unwrap());
            host_name(&h).map(str::to_owned)
        };
        assert_eq!(with("chat.example:443").as_deref(), Some("chat.example"));
        assert_eq!(with("[::1]:8201").as_deref(), Some("[::1]"));
        assert_eq!(with("localhost").as_deref(), Some("localhost"));
        assert_eq!(with("evil; script-src *"), None);
        assert_eq!(with("a'b"), None);
        assert!(!policy(None).contains("ws://"));
    }

    #[tokio::test]
    async fn the_dev_token_endpoint_mints_tokens_the_dev_secret_verifies() {
        let (status, headers, body) = request(true, &post_token(r#"{"user":1001}"#)).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers.contains("cache-control: no-store"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["user"], 1001);
        assert_eq!(v["expires_in"], DEV_TOKEN_TTL.as_secs());
        let verified = Hs256Verifier::new(DEV_SECRET.as_bytes())
            .verify_token(v["token"].as_str().unwrap())
            .unwrap();
        assert_eq!(verified.user, UserId(1001));
        let now = u64::try_from(iim::types::now_ms() / 1000).unwrap();
        assert!(verified.valid_until <= now + DEV_TOKEN_TTL.as_secs() + 10);

        let (status, _, _) = request(true, &post_token(r#"{"user":0}"#)).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        // A form post (no JSON content type) is refused.
        let form = "POST /dev/token HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\
                    content-type: application/x-www-form-urlencoded\r\ncontent-length: 9\r\n\r\nuser=1001";
        let (status, _, _) = request(true, form).await;
        assert_eq!(status, "HTTP/1.1 415 Unsupported Media Type");
    }

    #[tokio::test]
    async fn there_is_no_dev_token_endpoint_without_the_dev_secret() {
        let (status, _, body) = request(false, &post_token(r#"{"user":1001}"#)).await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert!(!body.contains("token"));
    }

    #[tokio::test]
    async fn the_page_config_says_whether_dev_tokens_are_offered() {
        for dev in [false, true] {
            let (status, _, body) = request(
                dev,
                "GET /config.json HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
            )
            .await;
            assert_eq!(status, "HTTP/1.1 200 OK");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["dev_tokens"], dev);
        }
    }

    #[test]
    fn only_a_verifier_of_the_dev_secret_gets_the_endpoint() {
        assert!(accepts_dev_secret(&Hs256Verifier::new(
            DEV_SECRET.as_bytes()
        )));
        assert!(!accepts_dev_secret(&Hs256Verifier::new(
            b"a secret of our own, at least 32 bytes long"
        )));
    }
}
