//! The iim app server: hosts plugins and local client connections, and
//! links to the exchange so `iim::send` reaches users on every server.
//!
//! [`start`] is what `main` and the tests call. Start-up takes a new epoch
//! from the registry (clearing the sessions an earlier incarnation wrote),
//! then links to the exchange. Shutdown drains: new sends are refused, the
//! registry shows the server `draining`, outstanding reports are awaited
//! within the grace period, the link closes cleanly and the server is
//! marked `down`.

pub mod admin;
mod audit;
pub mod chat;
pub mod codes;
pub mod config;
pub mod connections;
pub mod gateway;
pub mod host;
mod link;
pub mod metrics;
pub mod offline;
pub mod presence;
pub mod push;

pub use config::{Config, ExchangeTarget};
pub use connections::{Attached, Connections};
/// The sans-IO pieces of the link, where they live now.
pub use iim_core::link::{dedup, outbox};
pub use link::LinkState;
pub use metrics::AppMetrics;

use anyhow::Context as _;
use host::Host;
use iim::api::{IimParts, Submit};
use iim::registry::{Registry, Role, ServerState};
use iim::tls::{self, TlsMaterial};
use iim::token::TokenVerifier;
use iim::types::{ServerId, UserId, now_ms};
use iim::{Iim, Plugin};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

/// A running app server.
pub struct AppServerHandle {
    pub id: ServerId,
    pub epoch: u64,
    pub iim: Iim,
    pub connections: Arc<Connections>,
    pub metrics: Arc<AppMetrics>,
    /// `/metrics` and `/health`.
    pub http_addr: Option<SocketAddr>,
    /// The admin API, when it runs.
    pub admin_addr: Option<SocketAddr>,
    /// The client WebSocket endpoint (`ws://{client_addr}/ws`), when the
    /// gateway runs.
    pub client_addr: Option<SocketAddr>,
    pub registry: Registry,
    link: watch::Receiver<LinkState>,
    /// Cancelled to start draining (SIGTERM).
    shutdown: CancellationToken,
    /// Cancelled when sends are refused.
    closing: CancellationToken,
    /// Cancelled to stop the link and the listeners.
    stop: CancellationToken,
    tracker: TaskTracker,
    endpoint: quinn::Endpoint,
    grace: Duration,
}

impl AppServerHandle {
    /// The link's state now.
    pub fn link(&self) -> LinkState {
        self.link.borrow().clone()
    }

    /// Watch the link's state.
    pub fn link_watch(&self) -> watch::Receiver<LinkState> {
        self.link.clone()
    }

    /// Begin a graceful shutdown (what SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Resolves when a shutdown was asked for or the link failed for good.
    pub async fn stop_requested(&self) {
        let mut w = self.link.clone();
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            _ = w.wait_for(|s| s.fatal.is_some()) => {}
        }
    }

    /// Drain and stop: refuse new sends, show `draining`, wait (within the
    /// grace period) for outstanding reports, close the link cleanly, show
    /// `down`.
    pub async fn stopped(self) {
        self.shutdown.cancel();
        self.closing.cancel();
        if let Err(e) = self
            .registry
            .set_state(self.id, self.epoch, ServerState::Draining, now_ms())
            .await
        {
            warn!(error = %e, "could not mark the server draining");
        }
        let mut w = self.link.clone();
        let drained = tokio::time::timeout(self.grace, w.wait_for(|s| s.idle || s.fatal.is_some()))
            .await
            .is_ok();
        info!(drained, "draining done");
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Err(e) = self.registry.mark_down(self.id, self.epoch, now_ms()).await {
            warn!(error = %e, "could not mark the server down");
        }
        info!("app server stopped");
    }
}

/// Start an app server with `plugins`. Returns once its epoch is taken and
/// its listeners are bound; the link to the exchange comes up in the
/// background (see [`AppServerHandle::link`]). Client tokens are checked
/// with the HS256 secret of `[auth]`; see [`start_with`] for another key.
pub async fn start(
    config: Config,
    tls: TlsMaterial,
    plugins: Vec<Arc<dyn Plugin>>,
    shutdown: CancellationToken,
) -> anyhow::Result<AppServerHandle> {
    start_with(config, tls, plugins, None, shutdown).await
}

/// [`start`], with the client gateway checking tokens with `verifier`
/// (e.g. RS256 against an identity provider's public key; see
/// [`iim::token`]). `None`: HS256 with `config.auth.jwt_secret`.
pub async fn start_with(
    config: Config,
    tls: TlsMaterial,
    plugins: Vec<Arc<dyn Plugin>>,
    verifier: Option<Arc<dyn TokenVerifier>>,
    shutdown: CancellationToken,
) -> anyhow::Result<AppServerHandle> {
    let extras = Extras {
        verifier,
        ..Extras::default()
    };
    start_with_extras(config, tls, plugins, extras, shutdown).await
}

/// In-process pieces a program embedding the app server may bring.
#[derive(Default)]
pub struct Extras {
    /// Checks client tokens instead of HS256 with `config.auth.jwt_secret`.
    pub verifier: Option<Arc<dyn TokenVerifier>>,
    /// Receives offline notices instead of the webhook of
    /// `[offline_push]` (whose queue, batching and retry settings apply;
    /// its `url` must then be unset).
    pub offline_push: Option<Arc<dyn offline::OfflinePush>>,
}

/// [`start`], with [`Extras`].
pub async fn start_with_extras(
    config: Config,
    tls: TlsMaterial,
    plugins: Vec<Arc<dyn Plugin>>,
    extras: Extras,
    shutdown: CancellationToken,
) -> anyhow::Result<AppServerHandle> {
    config.validate().map_err(anyhow::Error::msg)?;
    let Extras {
        verifier,
        offline_push,
    } = extras;
    let offline_sink = offline_sink(&config.offline_push, offline_push)?;
    let dev_secret = verifier.is_none() && config.auth.is_dev_secret();
    let verifier: Arc<dyn TokenVerifier> = match verifier {
        Some(v) => v,
        None => Arc::new(
            config
                .auth
                .key_set()
                .context("cannot load the keys client tokens are checked with")?,
        ),
    };
    let id = ServerId(config.id);
    let cert_not_after = tls
        .log_expiry(tls::now_unix())
        .context("cannot read this server's certificate")?;
    let database = config.database_url()?;
    let registry = Registry::connect(&database)
        .await
        .with_context(|| "cannot open the registry database")?;
    let client_config = tls::quic_client_config(&tls, config.quic.transport())?;
    let bind: SocketAddr = match config.exchange.as_ref().map(|e| e.address) {
        Some(SocketAddr::V6(_)) => "[::]:0".parse()?,
        _ => "0.0.0.0:0".parse()?,
    };
    let endpoint = config
        .quic
        .endpoint(bind, None, None)
        .context("cannot bind the QUIC client socket")?;
    let http_listener = match config.http_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a}"))?,
        ),
        None => None,
    };
    let http_addr = http_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    if let Some(a) = http_addr
        && !a.ip().is_loopback()
    {
        warn!(address = %a, "metrics are served without authentication on a non-loopback address");
    }
    let admin = match config.admin.listen {
        Some(a) => {
            let listener = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (admin.listen)"))?;
            let guard = admin::Guard::new(&config.admin, listener.local_addr()?)
                .map_err(anyhow::Error::msg)?;
            Some((listener, guard))
        }
        None => None,
    };
    let admin_addr = admin.as_ref().map(|(_, g)| g.addr());
    let advertise = config
        .advertise
        .clone()
        .or_else(|| http_addr.map(|a| a.to_string()))
        .unwrap_or_default();
    let epoch = registry
        .begin_epoch(id, Role::App, &advertise, ServerState::Down, now_ms())
        .await?;
    let metrics = Arc::new(AppMetrics::default());
    metrics.certificate_not_after.set(cert_not_after);
    let _ = metrics.database.set(registry.as_ref().clone());
    let connections = Arc::new(Connections::new(
        id,
        epoch,
        registry.clone(),
        metrics.clone(),
        config.connection_queue,
    ));
    let host = Arc::new(Host::new(
        connections.clone(),
        plugins.clone(),
        metrics.clone(),
    ));
    let (submit_tx, submit_rx) = mpsc::channel::<Submit>(1_024);
    let closing = CancellationToken::new();
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    // The 905's target names an exchange (any exchange of the deployment
    // takes one addressed to another). With registry discovery this is the
    // preferred exchange, else the first one up; the link chooses where to
    // attach again at every reconnect.
    let exchange_id = match (&config.exchange, config.prefer_exchange) {
        (Some(t), _) => ServerId(t.id),
        (None, Some(p)) => ServerId(p),
        (None, None) => discover_exchange(&registry).await?,
    };
    let send_limit = Arc::new(AtomicUsize::new(config.max_frame_bytes));
    let iim = Iim::new(IimParts {
        server: id,
        epoch,
        exchange: exchange_id,
        max_frame: send_limit.clone(),
        link: submit_tx,
        local: host.clone(),
        closing: closing.clone(),
        registry: registry.clone(),
    });
    let link = link::spawn(
        link::LinkParams {
            server: id,
            epoch,
            exchange: config.exchange.clone(),
            exchange_id,
            max_frame: config.max_frame_bytes,
            send_limit,
            send_timeout: Duration::from_millis(config.send_timeout_ms),
            max_outstanding: config.max_outstanding,
            heartbeat: Duration::from_millis(config.heartbeat_ms),
            reconnect_min: Duration::from_millis(config.reconnect_min_ms),
            reconnect_max: Duration::from_millis(config.reconnect_max_ms),
            client_config,
            registry: registry.clone(),
        },
        endpoint.clone(),
        submit_rx,
        host.clone(),
        metrics.link.clone(),
        stop.clone(),
        &tracker,
    );
    // Plugins get a plugin's handle: the kinds reserved by iim are the
    // built-in services' alone.
    for p in &plugins {
        p.start(iim.for_plugin());
    }
    let offline = offline_sink.map(|sink| {
        let c = &config.offline_push;
        offline::Offline::start(
            sink,
            offline::Settings {
                queue: c.queue,
                batch_max: c.batch_max,
                batch_wait: Duration::from_millis(c.batch_wait_ms),
                max_attempts: c.max_attempts,
                backoff_min: Duration::from_millis(c.backoff_min_ms),
                backoff_max: Duration::from_millis(c.backoff_max_ms),
                preview_bytes: c.preview_bytes,
            },
            format!("{}-{epoch}", id.0),
            id.0,
            metrics.offline.clone(),
            stop.clone(),
            &tracker,
        )
    });
    let receipts = Arc::new(chat::receipts::Receipts::new(
        iim::store::Store::new(&registry),
        iim.clone(),
        config.chat.large_group_threshold,
        metrics.receipts.clone(),
    ));
    let chat = Some(Arc::new(chat::Chat::new(
        iim::store::Store::new(&registry),
        iim.clone(),
        chat::ChatConfig {
            large_group_threshold: config.chat.large_group_threshold,
            sync_page_max: config.limits.sync_page_max,
            store_batch_max: config.chat.store_batch_max,
            push_queue: config.chat.push_queue,
        },
        metrics.chat.clone(),
        offline,
        stop.clone(),
        &tracker,
    )));
    let presence = presence::Presence::start(
        iim.clone(),
        registry.clone(),
        connections.clone(),
        config.presence.clone(),
        metrics.presence.clone(),
        link.clone(),
        stop.clone(),
        &tracker,
    );
    host.set_presence(presence.clone());
    tracker.spawn(
        audit::audit_loop(
            connections.clone(),
            presence.clone(),
            link.clone(),
            Duration::from_millis(config.session_audit_ms),
            stop.clone(),
        )
        .instrument(info_span!("session_audit", server = id.0)),
    );
    let client_addr = match (config.client_listen, chat) {
        (Some(addr), Some(chat)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for clients on {addr}"))?;
            let local = listener.local_addr()?;
            if dev_secret {
                warn!(
                    "auth.jwt_secret is the public development secret: anyone who reaches \
                     the client listener can mint tokens for any user; set a secret of your \
                     own before this server leaves a development machine"
                );
            }
            let state = gateway::GatewayState {
                chat,
                connections: connections.clone(),
                verifier,
                presence: Some(presence.clone()),
                receipts: Some(receipts),
                metrics: metrics.clone(),
                limits: config.limits.clone(),
                admission: gateway::admission::Admission::new(
                    config.limits.max_connections,
                    config.limits.max_connections_per_ip,
                    config.limits.max_connections_per_user,
                    metrics.clone(),
                ),
                stop: stop.clone(),
                tracker: tracker.clone(),
            };
            tracker.spawn(
                async move {
                    if let Err(e) = gateway::serve(listener, state).await {
                        warn!(error = %e, "client listener failed");
                    }
                }
                .instrument(info_span!("gateway", server = id.0)),
            );
            info!(addr = %local, path = "/ws", "client gateway listening");
            Some(local)
        }
        _ => None,
    };
    for user in &config.demo_users {
        let attached = connections.attach(UserId(*user), "demo").await?;
        tracker.spawn(demo_sink(attached, stop.clone()).instrument(info_span!(
            "demo",
            server = id.0,
            user = *user
        )));
    }
    if let Some(listener) = http_listener {
        let router = iim_http::server::metrics_router(metrics.clone());
        let token = stop.clone();
        tracker.spawn(async move {
            if let Err(e) = iim_http::server::serve(listener, router, token).await {
                warn!(error = %e, "metrics listener failed");
            }
        });
    }
    if let Some((listener, guard)) = admin {
        let router = admin::router(iim.clone(), guard, metrics.clone());
        let token = stop.clone();
        tracker.spawn(async move {
            if let Err(e) = iim_http::server::serve(listener, router, token).await {
                warn!(error = %e, "admin listener failed");
            }
        });
    }
    info!(
        id = id.0,
        epoch,
        exchange = exchange_id.0,
        "app server started"
    );
    Ok(AppServerHandle {
        id,
        epoch,
        iim,
        connections,
        metrics,
        http_addr,
        admin_addr,
        client_addr,
        registry,
        link,
        shutdown,
        closing,
        stop,
        tracker,
        endpoint,
        grace: Duration::from_secs(config.shutdown_grace_secs),
    })
}

/// Where offline notices go: the in-process sink if one is given, else the
/// webhook when `[offline_push]` names a URL (its secret read now, so a
/// missing or short one stops the start), else nowhere (off).
fn offline_sink(
    c: &config::OfflinePushConfig,
    in_process: Option<Arc<dyn offline::OfflinePush>>,
) -> anyhow::Result<Option<Arc<dyn offline::OfflinePush>>> {
    let url = c.parsed_url().map_err(anyhow::Error::msg)?;
    match (url, in_process) {
        (Some(_), Some(_)) => anyhow::bail!(
            "offline_push.url is set and an in-process offline push was given: keep one"
        ),
        (None, Some(sink)) => Ok(Some(sink)),
        (Some(url), None) => {
            let secret = c.secret().map_err(anyhow::Error::msg)?;
            let roots = c.extra_roots().map_err(anyhow::Error::msg)?;
            let hook = offline::Webhook::new(
                url.clone(),
                &secret,
                Duration::from_millis(c.timeout_ms),
                roots,
            )
            .map_err(anyhow::Error::msg)?;
            // The host only: a query string may hold something private.
            info!(
                host = url.host_str().unwrap_or_default(),
                "offline push: notices are POSTed to the webhook"
            );
            Ok(Some(Arc::new(hook)))
        }
        (None, None) => Ok(None),
    }
}

/// The lowest-id exchange the registry shows up, waiting up to 30 s for one.
async fn discover_exchange(registry: &Registry) -> anyhow::Result<ServerId> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let servers = registry.servers().await?;
        if let Some(ex) = servers
            .iter()
            .find(|s| s.role == Role::Exchange && s.state == ServerState::Up)
        {
            return Ok(ex.id);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("no exchange is up in the registry; start one or set [exchange]");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A demo connection: logs every message it receives.
async fn demo_sink(mut a: Attached, stop: CancellationToken) {
    loop {
        let push = tokio::select! {
            _ = stop.cancelled() => return,
            m = a.rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        match &push {
            push::Push::Chat(c) => {
                let Some((field, seq)) = c.seq_for(a.session.user) else {
                    continue;
                };
                let m = c.chat();
                info!(
                    id = m.id,
                    seq_field = field,
                    seq,
                    from = m.from,
                    to = m.to,
                    body = %m.body.get(),
                    "received chat message"
                );
            }
            push::Push::Presence(p) => info!(
                user = p.update.user,
                status = p.update.status.as_str(),
                version = p.update.version,
                "received presence"
            ),
            push::Push::Notice(n) => info!(
                id = %n.id(),
                from = n.from().0,
                text = %n.text,
                "received notice"
            ),
            push::Push::SyncNeeded(msg) => info!(
                id = %msg.id,
                from = %msg.source,
                "received sync_needed"
            ),
            push::Push::Receipt(r) => info!(
                reader = r.envelope.reader,
                to = r.envelope.to,
                id = r.envelope.id,
                "received read receipt"
            ),
            push::Push::Typing(t) => info!(
                from = t.envelope.from,
                to = t.envelope.to,
                "received typing"
            ),
            push::Push::Plugin(msg) => info!(
                id = %msg.id,
                from = %msg.source,
                target = %msg.target,
                text = %String::from_utf8_lossy(&msg.body),
                "received"
            ),
        }
    }
}
