//! App server configuration: TOML with validated defaults.

use iim::quic::QuicTuning;
use iim::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A fixed exchange to connect to, instead of finding one in the registry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExchangeTarget {
    pub id: u32,
    pub address: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This server's id; its certificate must name `server-<id>.iim`.
    pub id: u32,
    /// Address recorded in the registry; defaults to the metrics address
    /// (`http_listen`), never the admin API's.
    pub advertise: Option<String>,
    /// `mysql://user:pass@host/db` or `sqlite://file.db`. A `mysql://`
    /// url to another host must say `ssl-mode` (best:
    /// `?ssl-mode=verify_identity&ssl-ca=/path/to/ca.pem`).
    pub database: String,
    /// A file holding the database url (one line; keep it mode 0600), so
    /// the password is in neither this config nor a command line. When
    /// set it replaces `database`.
    pub database_file: Option<PathBuf>,
    /// A fixed exchange to use (and only it). When absent, the exchange is
    /// chosen from the registry at every reconnect: `prefer_exchange` while
    /// it is up, else the live exchange with the fewest attached servers.
    pub exchange: Option<ExchangeTarget>,
    /// With several exchanges, the one this server attaches to while it is
    /// up (e.g. the one in its zone). Ignored with `exchange`.
    pub prefer_exchange: Option<u32>,
    /// `/metrics` and `/health`, unauthenticated and read-only; empty to
    /// disable. A warning is logged when it is not on loopback.
    pub http_listen: Option<SocketAddr>,
    /// The admin API, on a listener of its own.
    pub admin: AdminConfig,
    /// Largest frame body sent or accepted.
    pub max_frame_bytes: usize,
    /// A remote target without an outcome after this long reads `timed_out`.
    pub send_timeout_ms: u64,
    /// Most 905s awaiting their reports; `send` waits beyond this.
    pub max_outstanding: usize,
    pub heartbeat_ms: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Messages buffered per local connection before it is cut as too slow.
    pub connection_queue: usize,
    /// How often the session rows are checked against the live
    /// connections (besides after every registration with the exchange).
    pub session_audit_ms: u64,
    /// On SIGTERM: how long to wait for outstanding reports.
    pub shutdown_grace_secs: u64,
    /// Users given an in-process connection that logs what it receives
    /// (for the local demo; real clients arrive with the gateway).
    pub demo_users: Vec<u64>,
    /// The client WebSocket endpoint, `ws://HOST:PORT/ws`; empty for no
    /// client gateway.
    pub client_listen: Option<SocketAddr>,
    pub quic: QuicTuning,
    pub tls: TlsFiles,
    pub auth: AuthConfig,
    pub limits: ClientLimits,
    pub chat: ChatConfig,
    pub presence: crate::presence::PresenceConfig,
    /// Notifications for users with no live session (off unless `url` is
    /// set).
    pub offline_push: OfflinePushConfig,
}

/// The admin API (`POST /admin/send`): off unless `listen` is set, and
/// then every call must carry the bearer token in `token_file`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the admin API listens; empty (the default) for none.
    pub listen: Option<SocketAddr>,
    /// A file holding the bearer token every admin call must present (at
    /// least 32 bytes; keep the file 0600). Required with `listen`.
    pub token_file: Option<PathBuf>,
    /// `Host` headers accepted besides the listen address itself and
    /// `localhost` / `127.0.0.1` / `[::1]` on its port — a name the admin
    /// API is reached by. Any other `Host` is refused (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Users the admin API may send as (`from`); without `from`, a send
    /// comes from the app server itself (user 0).
    pub senders: Vec<u64>,
}

impl AdminConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(addr) = self.listen
            && self.token_file.is_none()
        {
            return Err(format!(
                "admin.listen is {addr} but admin.token_file is not set: every admin call \
                 must carry a bearer token (at least {} bytes, from a file)",
                iim_http::admin::MIN_TOKEN_BYTES
            ));
        }
        if self.senders.contains(&0) {
            return Err("admin.senders: 0 is the app server itself, always allowed".into());
        }
        Ok(())
    }
}

/// How clients prove who they are.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret that client tokens are signed with (see `iimctl
    /// token`); at least 32 bytes. The default is the public development
    /// secret: accepted only while `client_listen` is a loopback address
    /// (or `allow_dev_secret` says otherwise). Empty: no HS256 tokens at
    /// all (then `keys` or `jwks_file` must be set).
    pub jwt_secret: String,
    /// Read the HS256 secret from this file instead (trailing newline
    /// ignored; at least 32 bytes), so it need not sit in the config file.
    /// `jwt_secret` must then be left unset.
    pub jwt_secret_file: Option<PathBuf>,
    /// Accept the development secret on a client listener that is not on
    /// loopback (a development machine reached from elsewhere). Never in
    /// production: anyone can mint tokens for any user with it.
    pub allow_dev_secret: bool,
    /// Public keys tokens minted elsewhere are signed with (EdDSA, RS256,
    /// ES256), each by its key id.
    pub keys: Vec<iim::token::KeyFile>,
    /// A JWKS file with more such keys.
    pub jwks_file: Option<PathBuf>,
    /// The `iss` every token must carry, if set.
    pub issuer: Option<String>,
    /// An `aud` every token must carry, if set.
    pub audience: Option<String>,
    /// Tokens valid for longer than this when presented are refused;
    /// a connection is closed when its token expires.
    pub max_token_lifetime_secs: u64,
}

/// The shortest HS256 secret accepted (but for the development one).
pub const MIN_SECRET_BYTES: usize = 32;

/// The secret in `path`, without its trailing line break; refused when
/// shorter than [`MIN_SECRET_BYTES`].
fn read_secret_file(path: &std::path::Path) -> Result<Vec<u8>, iim::token::KeyError> {
    let mut bytes = std::fs::read(path).map_err(|source| iim::token::KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(iim::token::KeyError::Bad {
            what: format!("auth.jwt_secret_file {}", path.display()),
            detail: format!(
                "{} bytes; at least {MIN_SECRET_BYTES} are required",
                bytes.len()
            ),
        });
    }
    Ok(bytes)
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: iim::token::DEV_SECRET.into(),
            jwt_secret_file: None,
            allow_dev_secret: false,
            keys: Vec::new(),
            jwks_file: None,
            issuer: None,
            audience: None,
            max_token_lifetime_secs: iim::token::DEFAULT_MAX_LIFETIME_SECS,
        }
    }
}

impl AuthConfig {
    /// True when the shipped development secret is in use.
    pub fn is_dev_secret(&self) -> bool {
        self.jwt_secret_file.is_none() && self.jwt_secret == iim::token::DEV_SECRET
    }

    /// The keys and rules tokens are checked with, read from their files.
    pub fn key_set(&self) -> Result<iim::token::KeySet, iim::token::KeyError> {
        let from_file = match &self.jwt_secret_file {
            Some(path) => Some(read_secret_file(path)?),
            None => None,
        };
        let secret = match &from_file {
            Some(s) => Some(s.as_slice()),
            None => (!self.jwt_secret.is_empty()).then_some(self.jwt_secret.as_bytes()),
        };
        iim::token::KeySet::load(
            secret,
            &self.keys,
            self.jwks_file.as_deref(),
            iim::token::Policy {
                issuer: self.issuer.clone(),
                audience: self.audience.clone(),
                max_lifetime: std::time::Duration::from_secs(self.max_token_lifetime_secs),
            },
        )
    }

    fn validate(&self, client_listen: Option<SocketAddr>) -> Result<(), String> {
        if self.jwt_secret_file.is_some() {
            if !self.jwt_secret.is_empty() && self.jwt_secret != iim::token::DEV_SECRET {
                return Err(
                    "auth.jwt_secret and auth.jwt_secret_file are both set: keep one".into(),
                );
            }
        } else if self.is_dev_secret() {
            if let Some(addr) = client_listen
                && !addr.ip().is_loopback()
                && !self.allow_dev_secret
            {
                return Err(format!(
                    "auth.jwt_secret: the development secret is public (anyone can mint tokens \
                     for any user), and client_listen {addr} is not on loopback: set a secret \
                     of at least {MIN_SECRET_BYTES} bytes, or auth.allow_dev_secret = true on a \
                     development machine"
                ));
            }
        } else if self.jwt_secret.is_empty() {
            if self.keys.is_empty() && self.jwks_file.is_none() {
                return Err(
                    "auth.jwt_secret: empty, and no auth.keys or auth.jwks_file: no token could \
                     be checked"
                        .into(),
                );
            }
        } else if self.jwt_secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "auth.jwt_secret: {} bytes; at least {MIN_SECRET_BYTES} are required",
                self.jwt_secret.len()
            ));
        }
        if !(60..=30 * 86_400).contains(&self.max_token_lifetime_secs) {
            return Err(format!(
                "auth.max_token_lifetime_secs: {} is outside 60..=2592000",
                self.max_token_lifetime_secs
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &"***")
            .field("jwt_secret_file", &self.jwt_secret_file)
            .field("allow_dev_secret", &self.allow_dev_secret)
            .field("keys", &self.keys)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("max_token_lifetime_secs", &self.max_token_lifetime_secs)
            .finish()
    }
}

/// Per-connection limits of the client gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientLimits {
    /// Largest client text frame accepted as a request; larger ones get
    /// `too_large`. Frames over 4x this are refused by the WebSocket layer
    /// and close the connection (1009).
    pub max_message_bytes: usize,
    /// Sustained requests per second per connection (token bucket).
    pub rate_per_sec: u32,
    /// Requests a connection may make at once above the sustained rate.
    pub rate_burst: u32,
    /// The `auth` frame must arrive within this long of connecting.
    pub auth_timeout_ms: u64,
    /// A connection from which nothing (not even a pong) arrives for this
    /// long is closed.
    pub idle_timeout_secs: u64,
    /// The server pings every connection this often.
    pub ping_interval_secs: u64,
    /// Most messages one `sync` returns (the client's `limit` is clamped
    /// to this).
    pub sync_page_max: u32,
    /// Deepest nesting of arrays and objects a message's `body` or `ex`
    /// may have (`bad_request` beyond): clients parse what they sync.
    pub max_body_depth: usize,
    /// A connection must finish its WebSocket upgrade (the HTTP request
    /// read and answered) within this long, else it is dropped.
    pub handshake_timeout_ms: u64,
    /// Most client connections at once (upgrading or upgraded); beyond
    /// it a new one gets HTTP 503 and is closed.
    pub max_connections: usize,
    /// Most connections at once from one IP address; beyond it HTTP 503.
    /// Raise it when clients arrive through a proxy or a large NAT.
    pub max_connections_per_ip: usize,
    /// Most authenticated connections of one user at once on this server;
    /// beyond it `too_many_connections`, closed 4008.
    pub max_connections_per_user: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_message_bytes: 65_536,
            rate_per_sec: 50,
            rate_burst: 100,
            auth_timeout_ms: 5_000,
            idle_timeout_secs: 60,
            ping_interval_secs: 20,
            sync_page_max: 200,
            max_body_depth: 64,
            handshake_timeout_ms: 10_000,
            max_connections: 100_000,
            max_connections_per_ip: 1_024,
            max_connections_per_user: 32,
        }
    }
}

impl ClientLimits {
    fn validate(&self) -> Result<(), String> {
        if !(1_024..=(16 << 20)).contains(&self.max_message_bytes) {
            return Err(format!(
                "limits.max_message_bytes: {} is outside 1024..=16777216",
                self.max_message_bytes
            ));
        }
        if self.rate_per_sec == 0 || self.rate_burst == 0 {
            return Err("limits.rate_per_sec and limits.rate_burst must be > 0".into());
        }
        if self.auth_timeout_ms == 0 {
            return Err("limits.auth_timeout_ms must be > 0".into());
        }
        if self.ping_interval_secs == 0 || self.ping_interval_secs >= self.idle_timeout_secs {
            return Err(format!(
                "limits.ping_interval_secs: {} must be > 0 and below limits.idle_timeout_secs ({}), \
                 or idle clients that only answer pings are cut",
                self.ping_interval_secs, self.idle_timeout_secs
            ));
        }
        if self.handshake_timeout_ms == 0 {
            return Err("limits.handshake_timeout_ms must be > 0".into());
        }
        if self.max_connections == 0
            || self.max_connections_per_ip == 0
            || self.max_connections_per_user == 0
        {
            return Err(
                "limits.max_connections, max_connections_per_ip and max_connections_per_user \
                 must be > 0"
                    .into(),
            );
        }
        if !(1..=1_000).contains(&self.max_body_depth) {
            return Err(format!(
                "limits.max_body_depth: {} is outside 1..=1000",
                self.max_body_depth
            ));
        }
        if !(1..=10_000).contains(&self.sync_page_max) {
            return Err(format!(
                "limits.sync_page_max: {} is outside 1..=10000",
                self.sync_page_max
            ));
        }
        Ok(())
    }
}

/// The built-in chat service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    /// Groups with more than this many members are read from a shared
    /// timeline (read fan-out) instead of being copied to every member's
    /// inbox.
    pub large_group_threshold: usize,
    /// Most sends stored in one transaction. Sends that queue up while a
    /// transaction runs are stored together by the next one (nothing waits
    /// for a batch to fill), so this bounds a transaction's size, not a
    /// send's latency.
    pub store_batch_max: usize,
    /// Stored messages waiting to be pushed, at most; beyond it a push is
    /// dropped and its recipients are sent `sync_needed`.
    pub push_queue: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            large_group_threshold: 500,
            store_batch_max: 64,
            push_queue: 4_096,
        }
    }
}

/// The built-in offline push webhook: each batch of notices for users
/// with no live session is POSTed as JSON to `url`, signed with the secret
/// in `secret_file` (see docs/operations.md). Off unless `url` is set.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OfflinePushConfig {
    /// Where batches are POSTed: `https://…`, or `http://` to a loopback
    /// host only (a gateway on the same machine).
    pub url: Option<String>,
    /// A file holding the HMAC-SHA256 key the requests are signed with (at
    /// least 32 bytes, trailing newline ignored; keep it 0600). Required
    /// with `url`.
    pub secret_file: Option<PathBuf>,
    /// A PEM file of CA certificates trusted for the gateway's HTTPS
    /// certificate besides the system's roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Most notices waiting; beyond it the oldest are dropped (counted).
    pub queue: usize,
    /// Most notices in one request.
    pub batch_max: usize,
    /// How long a batch gathers after its first notice before it is sent
    /// (sooner when full).
    pub batch_wait_ms: u64,
    /// One request's deadline, connecting included.
    pub timeout_ms: u64,
    /// Requests for one batch, the first included, before it is dropped.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled per retry up to
    /// `backoff_max_ms`, each jittered down by up to half.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Longest preview of a message's text in a notice, in bytes (cut at
    /// a character boundary); 0 sends no message content at all.
    pub preview_bytes: usize,
}

impl Default for OfflinePushConfig {
    fn default() -> Self {
        OfflinePushConfig {
            url: None,
            secret_file: None,
            ca_file: None,
            queue: 10_000,
            batch_max: 100,
            batch_wait_ms: 100,
            timeout_ms: 5_000,
            max_attempts: 5,
            backoff_min_ms: 500,
            backoff_max_ms: 30_000,
            preview_bytes: 100,
        }
    }
}

/// The most a preview may be, in bytes.
pub const MAX_PREVIEW_BYTES: usize = 1_024;

impl OfflinePushConfig {
    /// The webhook's URL, checked: `None` when offline push is off.
    pub fn parsed_url(&self) -> Result<Option<reqwest::Url>, String> {
        let Some(raw) = &self.url else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(raw)
            .map_err(|e| format!("offline_push.url {raw:?}: not a URL ({e})"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "offline_push.url: no credentials in the URL; requests are authenticated by \
                 their signature (offline_push.secret_file)"
                    .into(),
            );
        }
        let host = url.host_str().unwrap_or_default();
        // An IPv6 host keeps its brackets here.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = bare.eq_ignore_ascii_case("localhost")
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(format!(
                    "offline_push.url {raw:?}: plain http is accepted to a loopback host only; \
                     use https (the notices carry who wrote to whom)"
                ));
            }
            other => {
                return Err(format!(
                    "offline_push.url {raw:?}: scheme {other:?} is neither https nor http"
                ));
            }
        }
        if host.is_empty() {
            return Err(format!("offline_push.url {raw:?}: no host"));
        }
        Ok(Some(url))
    }

    /// The signing secret from `secret_file`, without its trailing line
    /// break; refused when shorter than [`MIN_SECRET_BYTES`].
    pub fn secret(&self) -> Result<Vec<u8>, String> {
        let path = self
            .secret_file
            .as_ref()
            .ok_or("offline_push.secret_file is not set")?;
        let mut bytes = std::fs::read(path).map_err(|e| {
            format!(
                "offline_push.secret_file {}: cannot read it: {e}",
                path.display()
            )
        })?;
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "offline_push.secret_file {}: {} bytes; at least {MIN_SECRET_BYTES} are required",
                path.display(),
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    /// The certificates of `ca_file` (none when unset); an error when it
    /// cannot be read or holds none.
    pub fn extra_roots(&self) -> Result<Vec<reqwest::Certificate>, String> {
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let what = || format!("offline_push.ca_file {}", path.display());
        let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", what()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: not PEM certificates: {e}", what()))?;
        if certs.is_empty() {
            return Err(format!("{}: holds no certificate", what()));
        }
        Ok(certs)
    }

    fn validate(&self) -> Result<(), String> {
        if self.parsed_url()?.is_none() {
            if self.secret_file.is_some() || self.ca_file.is_some() {
                return Err(
                    "offline_push.secret_file or ca_file is set but offline_push.url is not: \
                     set url and secret_file to turn offline push on"
                        .into(),
                );
            }
        } else if self.secret_file.is_none() {
            return Err(format!(
                "offline_push.url is set but offline_push.secret_file is not: every request \
                 is signed with a secret of at least {MIN_SECRET_BYTES} bytes read from a file"
            ));
        }
        let ranges: [(&str, u64, u64, u64); 7] = [
            ("queue", self.queue as u64, 1, 10_000_000),
            ("batch_max", self.batch_max as u64, 1, 10_000),
            ("batch_wait_ms", self.batch_wait_ms, 0, 60_000),
            ("timeout_ms", self.timeout_ms, 100, 300_000),
            ("max_attempts", self.max_attempts as u64, 1, 100),
            ("backoff_min_ms", self.backoff_min_ms, 1, 3_600_000),
            (
                "preview_bytes",
                self.preview_bytes as u64,
                0,
                MAX_PREVIEW_BYTES as u64,
            ),
        ];
        for (field, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(format!("offline_push.{field}: {v} is outside {lo}..={hi}"));
            }
        }
        if !(self.backoff_min_ms..=3_600_000).contains(&self.backoff_max_ms) {
            return Err(format!(
                "offline_push.backoff_max_ms: {} must be between backoff_min_ms ({}) and 3600000",
                self.backoff_max_ms, self.backoff_min_ms
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: 1,
            advertise: None,
            database: "sqlite://iim-dev.db".into(),
            database_file: None,
            exchange: None,
            prefer_exchange: None,
            http_listen: Some("127.0.0.1:9201".parse().expect("literal address")),
            max_frame_bytes: iim::wire::DEFAULT_MAX_FRAME,
            send_timeout_ms: 30_000,
            max_outstanding: 65_536,
            heartbeat_ms: 1_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 2_000,
            connection_queue: 1_024,
            session_audit_ms: 60_000,
            shutdown_grace_secs: 5,
            demo_users: Vec::new(),
            client_listen: Some("127.0.0.1:8201".parse().expect("literal address")),
            quic: QuicTuning::default(),
            tls: TlsFiles {
                ca: PathBuf::from("certs/dev/ca.pem"),
                cert: PathBuf::from("certs/dev/server-1.pem"),
                key: PathBuf::from("certs/dev/server-1.key"),
            },
            admin: AdminConfig::default(),
            auth: AuthConfig::default(),
            limits: ClientLimits::default(),
            chat: ChatConfig::default(),
            presence: Default::default(),
            offline_push: OfflinePushConfig::default(),
        }
    }
}

impl Config {
    /// The database url: read from `database_file` if set, else
    /// `database`.
    pub fn database_url(&self) -> Result<String, iim::registry::RegistryError> {
        match &self.database_file {
            Some(path) => iim::registry::read_url_file(path),
            None => Ok(self.database.clone()),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("id: 0 is reserved".into());
        }
        if self.database.trim().is_empty() {
            return Err("database: must not be empty".into());
        }
        if !(4_096..=(64 << 20)).contains(&self.max_frame_bytes) {
            return Err(format!(
                "max_frame_bytes: {} is outside 4096..=67108864",
                self.max_frame_bytes
            ));
        }
        if self.send_timeout_ms == 0 || self.max_outstanding == 0 || self.connection_queue == 0 {
            return Err("send_timeout_ms, max_outstanding and connection_queue must be > 0".into());
        }
        if !(1_000..=86_400_000).contains(&self.session_audit_ms) {
            return Err(format!(
                "session_audit_ms: {} is outside 1000..=86400000",
                self.session_audit_ms
            ));
        }
        if self.heartbeat_ms == 0 {
            return Err("heartbeat_ms must be > 0".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err("reconnect_min_ms must be > 0 and <= reconnect_max_ms".into());
        }
        if self
            .exchange
            .as_ref()
            .is_some_and(|e| e.id == self.id || e.id == 0)
        {
            return Err("exchange.id must differ from id and from 0".into());
        }
        self.admin.validate()?;
        self.auth.validate(self.client_listen)?;
        self.limits.validate()?;
        if self.chat.large_group_threshold < 2 {
            return Err("chat.large_group_threshold must be >= 2".into());
        }
        if !(1..=1_024).contains(&self.chat.store_batch_max) {
            return Err("chat.store_batch_max must be 1..=1024".into());
        }
        if !(1..=1_000_000).contains(&self.chat.push_queue) {
            return Err("chat.push_queue must be 1..=1000000".into());
        }
        self.presence.validate()?;
        self.offline_push.validate()?;
        self.quic.validate()
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_file_replaces_database() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db-url");
        std::fs::write(&file, "mysql://iim:from-file@127.0.0.1/iim\n").unwrap();
        let c = Config {
            database_file: Some(file.clone()),
            ..Config::default()
        };
        c.validate().unwrap();
        assert_eq!(
            c.database_url().unwrap(),
            "mysql://iim:from-file@127.0.0.1/iim"
        );
        let text = toml::to_string_pretty(&c).unwrap();
        assert!(text.contains("database_file"), "{text}");
        let missing = Config {
            database_file: Some(dir.path().join("nope")),
            ..Config::default()
        };
        assert!(missing.database_url().is_err());
    }

    #[test]
    fn default_config_round_trips_and_validates() {
        let c = Config {
            exchange: Some(ExchangeTarget {
                id: 100,
                address: "127.0.0.1:7100".parse().unwrap(),
            }),
            demo_users: vec![1001],
            client_listen: Some("127.0.0.1:0".parse().unwrap()),
            auth: AuthConfig {
                jwt_secret: "a-secret-of-at-least-thirty-two-bytes".into(),
                ..AuthConfig::default()
            },
            limits: ClientLimits {
                max_message_bytes: 4_096,
                rate_per_sec: 5,
                rate_burst: 7,
                auth_timeout_ms: 300,
                idle_timeout_secs: 9,
                ping_interval_secs: 3,
                sync_page_max: 50,
                ..ClientLimits::default()
            },
            chat: ChatConfig {
                large_group_threshold: 100,
                store_batch_max: 16,
                push_queue: 10,
            },
            ..Default::default()
        };
        c.validate().unwrap();
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), c);
        let d = Config::default();
        d.validate().unwrap();
        let text = toml::to_string_pretty(&d).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), d);
        assert!(d.auth.is_dev_secret());
        assert!(!format!("{d:?}").contains(iim::token::DEV_SECRET));
        let none = Config::from_toml("[limits]\nrate_burst = 3\n").unwrap();
        assert_eq!(none.limits.rate_burst, 3);
        assert_eq!(none.limits.rate_per_sec, 50);
        assert_eq!(none.client_listen, d.client_listen);
    }

    #[test]
    fn the_development_secret_stays_on_loopback_unless_allowed() {
        let on = |listen: &str, extra: &str| {
            Config::from_toml(&format!("client_listen = \"{listen}\"\n[auth]\n{extra}"))
        };
        assert!(on("127.0.0.1:8201", "").is_ok());
        assert!(on("[::1]:8201", "").is_ok());
        assert!(on("10.0.0.5:8201", "").is_err());
        assert!(on("10.0.0.5:8201", "allow_dev_secret = true").is_ok());
        assert!(
            on(
                "10.0.0.5:8201",
                "jwt_secret = \"0123456789abcdef0123456789abcdef\""
            )
            .is_ok()
        );
        // Keys minted elsewhere, no HS256 at all.
        let keys = "jwt_secret = \"\"\n[[auth.keys]]\nkid = \"k1\"\nalg = \"EdDSA\"\npublic_key_file = \"k1.pem\"";
        let c = on("10.0.0.5:8201", keys).unwrap();
        assert_eq!(c.auth.keys[0].kid, "k1");
        // A key file that is not there is an error at start.
        assert!(c.auth.key_set().is_err());
    }

    #[test]
    fn the_secret_can_come_from_a_file_of_at_least_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let on = |secret: &[u8], extra: &str| {
            let path = dir.path().join("secret");
            std::fs::write(&path, secret).unwrap();
            let c = Config::from_toml(&format!(
                "client_listen = \"10.0.0.5:8201\"\n[auth]\njwt_secret_file = {:?}\n{extra}",
                path.display().to_string()
            ))?;
            assert!(!c.auth.is_dev_secret());
            c.auth.key_set().map(|_| ()).map_err(|e| e.to_string())
        };
        on(b"0123456789abcdef0123456789abcdef\n", "").unwrap();
        let short = on(b"0123456789abcdef0123456789abcde\n", "").unwrap_err();
        assert!(short.contains("31 bytes"), "{short}");
        let both = on(
            b"0123456789abcdef0123456789abcdef",
            "jwt_secret = \"another-secret-of-thirty-two-bytes!\"",
        )
        .unwrap_err();
        assert!(both.contains("both set"), "{both}");
        let missing = Config::from_toml("[auth]\njwt_secret_file = \"/nonexistent/secret\"")
            .unwrap()
            .auth
            .key_set()
            .unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/secret"));
    }

    #[test]
    fn offline_push_is_off_by_default_and_refuses_unsafe_settings() {
        let d = Config::default();
        assert_eq!(d.offline_push.parsed_url().unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("push-secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        let on = |url: &str| {
            Config::from_toml(&format!(
                "[offline_push]\nurl = {url:?}\nsecret_file = {:?}\n",
                secret.display().to_string()
            ))
        };
        for ok in [
            "https://push.example.com/iim",
            "http://127.0.0.1:8080/hook",
            "http://[::1]:8080/hook",
            "http://localhost/hook",
        ] {
            let c = on(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(c.offline_push.parsed_url().unwrap().unwrap().as_str(), ok);
            assert_eq!(c.offline_push.secret().unwrap().len(), 32);
        }
        for (bad, why) in [
            ("http://push.example.com/iim", "loopback"),
            ("http://10.0.0.5/iim", "loopback"),
            ("ftp://127.0.0.1/iim", "scheme"),
            ("https://user:pw@push.example.com/", "credentials"),
            ("not a url", "not a URL"),
        ] {
            let e = on(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // The secret: required with the URL, at least 32 bytes.
        let e =
            Config::from_toml("[offline_push]\nurl = \"https://push.example.com/\"").unwrap_err();
        assert!(e.contains("offline_push.secret_file"), "{e}");
        std::fs::write(&secret, "too short\n").unwrap();
        let e = on("https://push.example.com/")
            .unwrap()
            .offline_push
            .secret()
            .unwrap_err();
        assert!(e.contains("9 bytes"), "{e}");
        let e = Config::from_toml("[offline_push]\nsecret_file = \"/x\"").unwrap_err();
        assert!(e.contains("offline_push.url is not"), "{e}");
        let e = Config::from_toml("[offline_push]\nca_file = \"/x\"").unwrap_err();
        assert!(e.contains("offline_push.url is not"), "{e}");
        // A private CA for the gateway: a file of PEM certificates.
        let mut c = on("https://push.example.com/").unwrap().offline_push;
        assert!(c.extra_roots().unwrap().is_empty());
        c.ca_file = Some(dir.path().join("missing.pem"));
        assert!(c.extra_roots().unwrap_err().contains("missing.pem"));
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "no certificate here\n").unwrap();
        c.ca_file = Some(not_pem);
        let e = c.extra_roots().unwrap_err();
        assert!(e.contains("not.pem"), "{e}");
        for (text, field) in [
            ("queue = 0", "offline_push.queue"),
            ("batch_max = 0", "offline_push.batch_max"),
            ("max_attempts = 0", "offline_push.max_attempts"),
            ("timeout_ms = 0", "offline_push.timeout_ms"),
            ("preview_bytes = 5000", "offline_push.preview_bytes"),
            (
                "backoff_min_ms = 100\nbackoff_max_ms = 10",
                "offline_push.backoff_max_ms",
            ),
            ("bogus = 1", "bogus"),
        ] {
            let e = Config::from_toml(&format!("[offline_push]\n{text}")).unwrap_err();
            assert!(e.contains(field), "{text:?}: {e}");
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        assert!(Config::from_toml("bogus = true").is_err());
        assert!(Config::from_toml("id = 0").unwrap_err().contains("id"));
        assert!(Config::from_toml("reconnect_min_ms = 10\nreconnect_max_ms = 5").is_err());
        assert!(
            Config::from_toml("[exchange]\nid = 1\naddress = \"127.0.0.1:1\"")
                .unwrap_err()
                .contains("exchange.id")
        );
        for (text, field) in [
            ("[auth]\njwt_secret = \"\"", "auth.jwt_secret"),
            ("[auth]\njwt_secret = \"short\"", "auth.jwt_secret"),
            ("client_listen = \"0.0.0.0:8201\"", "auth.jwt_secret"),
            (
                "[auth]\nmax_token_lifetime_secs = 1",
                "auth.max_token_lifetime_secs",
            ),
            ("[auth]\nbogus = 1", "bogus"),
            (
                "[limits]\nmax_message_bytes = 10",
                "limits.max_message_bytes",
            ),
            ("[limits]\nrate_per_sec = 0", "limits.rate_per_sec"),
            ("[limits]\nauth_timeout_ms = 0", "limits.auth_timeout_ms"),
            (
                "[limits]\nping_interval_secs = 60",
                "limits.ping_interval_secs",
            ),
            ("[limits]\nsync_page_max = 0", "limits.sync_page_max"),
            ("[chat]\nstore_batch_max = 0", "chat.store_batch_max"),
            ("[chat]\npush_queue = 0", "chat.push_queue"),
            (
                "[chat]\nlarge_group_threshold = 1",
                "chat.large_group_threshold",
            ),
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.contains(field), "{text:?}: {e}");
        }
    }
}
