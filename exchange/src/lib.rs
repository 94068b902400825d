//! The iim exchange: accepts app servers over QUIC with mutual TLS, records
//! them in the registry, splits each 905 forward request into one 906 per
//! target server, and reports each outcome back to the origin.
//!
//! [`start`] is what `main` and the tests call; it takes a validated config,
//! TLS material and a shutdown token, and returns a handle once the
//! endpoint is listening. See `docs/architecture.md` for the whole path.

mod accept;
pub mod config;
mod hub;
mod link;

pub use config::Config;
pub use iim_core::exchange::ExchangeMetrics;
/// The sans-IO pieces of the exchange, where they live now.
pub use iim_core::exchange::{metrics, queue, split};

use anyhow::Context as _;
use hub::Hub;
use iim::metrics::{Gauge, Page, Render};
use iim::registry::{Registry, Role, ServerState};
use iim::tls::{self, TlsMaterial};
use iim::types::{ServerId, now_ms};
use iim_core::exchange::{self as core, Exchange};
use link::LinkCtx;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

/// A running exchange.
pub struct ExchangeHandle {
    pub id: ServerId,
    pub epoch: u64,
    /// The bound QUIC address.
    pub addr: SocketAddr,
    /// The bound metrics address, if enabled.
    pub http_addr: Option<SocketAddr>,
    pub metrics: Arc<ExchangeMetrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    endpoint: quinn::Endpoint,
    registry: Registry,
}

impl ExchangeHandle {
    /// Begin a graceful shutdown (what SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Wait until the exchange has stopped: queues delivered or the grace
    /// period over, links closed, the registry row marked down.
    pub async fn stopped(self) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
        self.endpoint
            .close(iim::quic::CLOSE_GOING_AWAY.into(), b"exchange stopped");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Err(e) = self
            .registry
            .set_state(self.id, self.epoch, ServerState::Down, now_ms())
            .await
        {
            warn!(error = %e, "could not mark the exchange down in the registry");
        }
        info!("exchange stopped");
    }
}

/// The exchange's `/metrics` page: the core's counters and how long this
/// exchange's certificate has left.
struct Exposition {
    core: Arc<ExchangeMetrics>,
    /// The registry's database, for its node metrics.
    db: iim::registry::Db,
    /// When this exchange's certificate expires, Unix seconds.
    cert_not_after: i64,
}

impl Render for Exposition {
    fn render(&self) -> String {
        let mut page = self.core.render();
        let left = Gauge::default();
        left.set(self.cert_not_after - tls::now_unix());
        let mut p = Page::default();
        p.gauge(
            CERT_EXPIRY_METRIC,
            "Seconds until this exchange's own certificate expires (negative once expired).",
            &left,
        );
        page.push_str(&p.finish());
        page.push_str(&self.db.render_metrics("iim_exchange"));
        page
    }
}

/// The gauge of seconds left on this exchange's certificate.
pub const CERT_EXPIRY_METRIC: &str = "iim_exchange_certificate_expiry_seconds";

/// Start an exchange. Returns once it listens.
pub async fn start(
    config: Config,
    tls: TlsMaterial,
    shutdown: CancellationToken,
) -> anyhow::Result<ExchangeHandle> {
    config.validate().map_err(anyhow::Error::msg)?;
    let id = ServerId(config.id);
    let cert_not_after = tls
        .log_expiry(tls::now_unix())
        .context("cannot read this exchange's certificate")?;
    let database = config.database_url()?;
    let registry = Registry::connect(&database)
        .await
        .with_context(|| "cannot open the registry database")?;
    let mut server_config = tls::quic_server_config(&tls, config.quic.transport())?;
    // quinn's buffers for connection attempts not handled yet: as many as
    // handshakes may run, and little data each (a handshake needs a few
    // kilobytes before it is authenticated).
    server_config
        .max_incoming(config.max_handshakes)
        .incoming_buffer_size(64 * 1024)
        .incoming_buffer_size_total((config.max_handshakes as u64 * 16 * 1024).max(1 << 20));
    let endpoint = config
        .quic
        .endpoint(
            config.listen,
            Some(server_config),
            Some(tls.key_pem.as_bytes()),
        )
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = endpoint.local_addr()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    // Everything is bound before the registry hears of this exchange, so a
    // failed start never leaves an "up" row that nobody answers behind.
    let http_listener = match config.http_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} for metrics"))?,
        ),
        None => None,
    };
    let epoch = registry
        .begin_epoch(id, Role::Exchange, &advertise, ServerState::Up, now_ms())
        .await?;
    let metrics = Arc::new(ExchangeMetrics::default());
    let tracker = TaskTracker::new();
    let lease = Duration::from_secs(config.lease_secs);
    let core = Exchange::new(
        core::Config {
            id,
            epoch,
            lease,
            rejoin: core::Config::rejoin_for(
                lease,
                Duration::from_millis(config.quic.idle_timeout_ms),
            ),
            grace: Duration::from_secs(config.shutdown_grace_secs),
            max_frame: config.max_frame_bytes,
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            max_links: config.max_links,
            queue_max_frames: config.queue_max_frames,
            queue_max_bytes: config.queue_max_bytes,
            sweep_period: core::Config::sweep_period_for(lease),
            ask_timeout: core::Config::ASK_TIMEOUT,
            split: Default::default(),
        },
        hub::app_rows(registry.servers().await?),
        metrics.clone(),
        tokio::time::Instant::now().into_std(),
    );
    let (events, events_rx) = tokio::sync::mpsc::channel(hub::EVENTS);
    let link_ctx = Arc::new(LinkCtx {
        events: events.clone(),
        metrics: metrics.clone(),
        handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
        max_frame: config.max_frame_bytes,
        admission: accept::Admission::new(config.max_handshakes, config.validate_addresses_above),
        log_budget: accept::LogBudget::new(accept::LOGS_PER_SEC, std::time::Instant::now()),
    });
    // Peer exchanges are dialled from the same endpoint, this exchange's
    // own certificate presented as the client's.
    let dialer = link::Dialer {
        endpoint: endpoint.clone(),
        config: tls::quic_client_config(&tls, config.quic.transport())?,
    };
    let hub = Hub::new(
        core,
        registry.clone(),
        dialer,
        link_ctx.clone(),
        events,
        tracker.clone(),
        shutdown.clone(),
    );
    tracker.spawn(
        hub.run(events_rx, shutdown.clone())
            .instrument(info_span!("exchange", id = id.0)),
    );
    let http_addr = match http_listener {
        Some(listener) => {
            let bound = listener.local_addr()?;
            if !bound.ip().is_loopback() {
                warn!(address = %bound, "metrics are served without authentication on a non-loopback address");
            }
            let router = iim_http::server::metrics_router(Arc::new(Exposition {
                core: metrics.clone(),
                db: registry.as_ref().clone(),
                cert_not_after,
            }));
            let token = shutdown.clone();
            tracker.spawn(async move {
                if let Err(e) = iim_http::server::serve(listener, router, token).await {
                    warn!(error = %e, "metrics listener failed");
                }
            });
            Some(bound)
        }
        None => None,
    };
    tracker.spawn(
        accept_loop(
            link_ctx,
            endpoint.clone(),
            shutdown.clone(),
            tracker.clone(),
        )
        .instrument(info_span!("exchange", id = id.0)),
    );
    info!(id = id.0, epoch, %addr, "exchange listening");
    Ok(ExchangeHandle {
        id,
        epoch,
        addr,
        http_addr,
        metrics,
        shutdown,
        tracker,
        endpoint,
        registry,
    })
}

async fn accept_loop(
    ctx: Arc<LinkCtx>,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        match ctx
            .admission
            .decide(incoming.remote_address_validated(), incoming.may_retry())
        {
            accept::Decision::Accept => {
                let slot = ctx.admission.slot();
                tracker.spawn(link::serve(ctx.clone(), incoming, slot));
            }
            accept::Decision::Retry => {
                ctx.metrics.address_retries.inc();
                if incoming.retry().is_err() {
                    ctx.metrics.rejections.inc("handshake_limit");
                }
            }
            accept::Decision::Refuse => {
                ctx.metrics.rejections.inc("handshake_limit");
                if let Some(skipped) = ctx.log_budget.allow(std::time::Instant::now()) {
                    warn!(
                        remote = %incoming.remote_address(),
                        pending = ctx.admission.pending(),
                        skipped,
                        "too many handshakes in progress: connection refused"
                    );
                }
                incoming.refuse();
            }
        }
    }
}
