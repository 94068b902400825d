//! The app server's link to its exchange, as IO: the task that drives the
//! link core ([`iim_core::link::Link`]).
//!
//! The core decides everything — when to connect and to which address,
//! what to write, when a send is finished, when to give up for good. This
//! task carries it out: it asks the registry where the exchange is, makes
//! the QUIC connection, reads the connection's frames itself (one branch
//! of its `select!`, no hop through a reader task), hands the core's bytes
//! to the connection's writer when it has room, takes 905s from
//! `Iim::submit` while the outbox has room, hands new messages to the local
//! delivery path and completes each send's report.

use crate::config::ExchangeTarget;
use iim::api::{LocalDelivery, Submit};
use iim::quic::{self, FrameReader, ReadError, Writer};
use iim::registry::{Registry, Role, ServerState};
use iim::tls;
use iim::types::{ServerId, now_ms};
use iim::wire::{Frame, ReportEntry};
use iim_core::link::{self as core, ExchangeRow, Link, LinkDown, LinkMetrics, Output};
use iim_core::{AskId, ConnId, RegistryFailure};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span};

/// Batches the writer may hold before the link task waits.
const WRITER_BATCHES: usize = 64;
/// Submits the link task takes per wake-up.
const SUBMIT_BATCH: usize = 256;
/// How long the exchange has to answer `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct LinkParams {
    pub server: ServerId,
    pub epoch: u64,
    pub exchange: Option<ExchangeTarget>,
    /// The exchange every 905 is addressed to.
    pub exchange_id: ServerId,
    pub max_frame: usize,
    /// The 905 size limit shared with `Iim`, lowered to the exchange's.
    pub send_limit: Arc<AtomicUsize>,
    pub send_timeout: Duration,
    pub max_outstanding: usize,
    pub heartbeat: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub client_config: quinn::ClientConfig,
    pub registry: Registry,
}

/// What the rest of the app server can observe of the link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    /// The exchange registered with now, if any.
    pub exchange: Option<ServerId>,
    /// No 905 is waiting for its report. (Only the transitions wake
    /// watchers; the exact count is the `outstanding_905` gauge.)
    pub idle: bool,
    /// Registrations with the exchange so far. After each, the session rows
    /// are audited: the exchange may have marked this server down (deleting
    /// them) before it could come back.
    pub registrations: u64,
    /// Set when the exchange refused this incarnation for good (another
    /// process registered the same id with a newer epoch, or the
    /// certificate does not match): the server must stop.
    pub fatal: Option<String>,
}

type Reply = oneshot::Sender<Vec<ReportEntry>>;
type Connected = (quinn::Connection, quinn::SendStream, quinn::RecvStream);
type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

/// Start the link task. `stop` ends it (after the caller drained what it
/// wanted); the link then closes its connection as a clean, intended
/// departure.
pub fn spawn(
    p: LinkParams,
    endpoint: quinn::Endpoint,
    submits: mpsc::Receiver<Submit>,
    host: Arc<dyn LocalDelivery>,
    metrics: Arc<LinkMetrics>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> watch::Receiver<LinkState> {
    let (state_tx, state_rx) = watch::channel(LinkState {
        idle: true,
        ..LinkState::default()
    });
    let span = info_span!("link", server = p.server.0);
    let core = Link::new(
        core::Config {
            server: p.server,
            epoch: p.epoch,
            exchange: p.exchange_id,
            address: p.exchange.as_ref().map(|t| t.address),
            max_frame: p.max_frame,
            send_timeout: p.send_timeout,
            max_outstanding: p.max_outstanding,
            heartbeat: p.heartbeat,
            reconnect_min: p.reconnect_min,
            reconnect_max: p.reconnect_max,
            register_timeout: REGISTER_TIMEOUT,
            wall_ms_at_start: now_ms(),
        },
        metrics.clone(),
        now(),
    );
    let shell = Shell {
        core,
        cur: None,
        connecting: None,
        connecting_conn: None,
        locating: None,
        endpoint,
        client_config: p.client_config,
        registry: p.registry,
        send_limit: p.send_limit,
        host,
        metrics,
        state: state_tx,
    };
    tracker.spawn(shell.run(submits, stop).instrument(span));
    state_rx
}

/// The connection the core holds, as IO.
struct Current {
    conn: ConnId,
    connection: quinn::Connection,
    writer: Writer,
    writer_task: tokio::task::JoinHandle<()>,
    /// `None` while a read is in progress (the loop holds it then).
    reader: Option<FrameReader>,
}

impl Drop for Current {
    fn drop(&mut self) {
        self.writer_task.abort();
    }
}

struct Shell {
    core: Link<Reply>,
    cur: Option<Current>,
    connecting: Pending<(ConnId, Result<Connected, LinkDown>)>,
    /// The attempt `connecting` carries out.
    connecting_conn: Option<ConnId>,
    locating: Pending<(AskId, Result<Vec<ExchangeRow>, RegistryFailure>)>,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    registry: Registry,
    send_limit: Arc<AtomicUsize>,
    host: Arc<dyn LocalDelivery>,
    metrics: Arc<LinkMetrics>,
    state: watch::Sender<LinkState>,
}

impl Shell {
    async fn run(mut self, mut submits: mpsc::Receiver<Submit>, stop: CancellationToken) {
        let mut subs = Vec::with_capacity(SUBMIT_BATCH);
        let mut frames = Vec::new();
        self.carry_out();
        loop {
            let writer = self
                .cur
                .as_ref()
                .filter(|_| self.core.has_transmit())
                .map(|c| c.writer.clone());
            let wake = self.core.poll_timeout().map(Instant::from_std);
            let room = self.core.room();
            let mut reading = self
                .cur
                .as_mut()
                .and_then(|c| c.reader.take().map(|r| (c.conn, r)));
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                (conn, r) = read_frames(reading.as_mut(), &mut frames) => {
                    match r {
                        Ok(true) => self.core.handle_frames(conn, std::mem::take(&mut frames), now()),
                        Ok(false) => self.core.handle_down(
                            conn,
                            LinkDown::Lost("stream finished by the exchange".into()),
                            now(),
                        ),
                        Err(e) => self.core.handle_down(conn, down_of(&e), now()),
                    }
                }
                permit = quic::reserve(writer) => match permit {
                    Some(permit) => {
                        permit.send(self.core.poll_transmit());
                    }
                    None => {
                        if let Some(c) = &self.cur {
                            let down = LinkDown::Lost("writer stopped".into());
                            self.core.handle_down(c.conn, down, now());
                        }
                    }
                },
                n = submits.recv_many(&mut subs, SUBMIT_BATCH.min(room)), if room > 0 => {
                    if n == 0 {
                        break;
                    }
                    let now = now();
                    for s in subs.drain(..) {
                        self.core.submit(s.id, s.frame, s.targets, s.reply, now);
                    }
                }
                (conn, r) = pending(&mut self.connecting) => {
                    self.connecting = None;
                    self.connecting_conn = None;
                    match r {
                        Ok((connection, send, recv)) => {
                            let (writer, writer_task) = quic::spawn_writer(send, WRITER_BATCHES);
                            self.cur = Some(Current {
                                conn,
                                connection,
                                writer,
                                writer_task,
                                reader: Some(FrameReader::new(recv, self.core.config().max_frame)),
                            });
                            self.core.handle_connected(conn, now());
                        }
                        Err(down) => self.core.handle_down(conn, down, now()),
                    }
                }
                (ask, rows) = pending(&mut self.locating) => {
                    self.locating = None;
                    self.core.handle_exchanges(ask, rows, now());
                }
                _ = quic::sleep_until_opt(wake) => self.core.handle_timeout(now()),
            }
            // The reader goes back to its connection, unless that was lost
            // or replaced meanwhile.
            if let (Some((conn, r)), Some(c)) = (reading, self.cur.as_mut())
                && c.conn == conn
            {
                c.reader = Some(r);
            }
            self.carry_out();
        }
        self.core.stop(now());
        self.carry_out();
        self.cur = None;
        self.publish();
    }

    /// Carry out every output of the core, then let go of a connection the
    /// core no longer holds.
    fn carry_out(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Locate(ask) => {
                    let registry = self.registry.clone();
                    self.locating =
                        Some(Box::pin(async move { (ask, exchanges(&registry).await) }));
                }
                Output::Connect {
                    conn,
                    exchange,
                    addr,
                } => {
                    let endpoint = self.endpoint.clone();
                    let config = self.client_config.clone();
                    self.connecting_conn = Some(conn);
                    self.connecting = Some(Box::pin(async move {
                        (conn, connect(endpoint, config, exchange, addr).await)
                    }));
                }
                Output::Close { conn, code, reason } => {
                    if let Some(c) = self.cur.take_if(|c| c.conn == conn) {
                        c.connection.close(code.into(), reason.as_bytes());
                    }
                }
                Output::Deliver { message, users } => {
                    self.host.deliver(&Arc::new(message), &users);
                }
                Output::Completed {
                    reply,
                    mut results,
                    resent,
                } => {
                    let changed = core::outbox::Done::<Reply>::for_sender(&mut results, resent);
                    self.metrics.reports_uncertain.add(changed as u64);
                    let _ = reply.send(results);
                }
                Output::SendLimit(limit) => {
                    self.send_limit.fetch_min(limit, Ordering::Relaxed);
                }
                Output::Fatal(reason) => self.state.send_modify(|s| s.fatal = Some(reason)),
            }
        }
        if self
            .cur
            .as_ref()
            .is_some_and(|c| Some(c.conn) != self.core.conn())
        {
            self.cur = None;
        }
        // An attempt the core gave up (its deadline passed): dropping it
        // abandons the handshake.
        if self.connecting_conn.is_some() && self.connecting_conn != self.core.conn() {
            self.connecting = None;
            self.connecting_conn = None;
        }
        self.publish();
    }

    fn publish(&self) {
        let exchange = self.core.exchange();
        let idle = self.core.is_idle();
        let registrations = self.core.registrations();
        self.metrics.outstanding.set(self.core.outstanding() as i64);
        {
            // Most iterations change nothing: a read lock, no wake-ups.
            let s = self.state.borrow();
            if s.exchange == exchange && s.idle == idle && s.registrations == registrations {
                return;
            }
        }
        self.state.send_modify(|s| {
            s.exchange = exchange;
            s.idle = idle;
            s.registrations = registrations;
        });
    }
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The next batch of frames from `reader`; never resolves without one, so
/// it can sit in a `select!` whether or not a link is up. Cancel-safe: a
/// read is only interrupted while no frame of the batch is held.
async fn read_frames(
    reader: Option<&mut (ConnId, FrameReader)>,
    batch: &mut Vec<Frame>,
) -> (ConnId, Result<bool, ReadError>) {
    match reader {
        Some((conn, r)) => (*conn, r.next_batch(batch).await),
        None => std::future::pending().await,
    }
}

/// The result of a pending future; never resolves without one.
async fn pending<T>(f: &mut Pending<T>) -> T {
    match f {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

fn down_of(e: &ReadError) -> LinkDown {
    match e {
        ReadError::Stream(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(c),
        )) => LinkDown::Refused {
            code: c.error_code.into_inner(),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        e => LinkDown::Lost(e.to_string()),
    }
}

/// An exchange whose row was not refreshed for this long is taken for
/// dead (exchanges refresh theirs every third of a lease; leases are at
/// most a few seconds).
const EXCHANGE_STALE_MS: i64 = 10_000;

/// The exchanges the registry knows.
async fn exchanges(registry: &Registry) -> Result<Vec<ExchangeRow>, RegistryFailure> {
    let servers = registry
        .servers()
        .await
        .map_err(|e| RegistryFailure(e.to_string()))?;
    let now = iim::types::now_ms();
    let mut attached: std::collections::HashMap<ServerId, u64> = Default::default();
    for s in &servers {
        if s.role == Role::App
            && s.state == ServerState::Up
            && let Some(x) = s.exchange
        {
            *attached.entry(x).or_default() += 1;
        }
    }
    Ok(servers
        .into_iter()
        .filter(|s| s.role == Role::Exchange)
        .map(|s| ExchangeRow {
            id: s.id,
            // A killed exchange's row still says up: it must also have
            // refreshed its row (every sweep, a third of its lease) lately.
            up: s.state == ServerState::Up && now - s.last_seen_ms < EXCHANGE_STALE_MS,
            attached: attached.get(&s.id).copied().unwrap_or(0),
            address: s.address,
        })
        .collect())
}

/// Connect with mTLS and open the link's stream.
async fn connect(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    exchange: ServerId,
    addr: SocketAddr,
) -> Result<Connected, LinkDown> {
    let lost = |e: &dyn std::fmt::Display| LinkDown::Lost(e.to_string());
    let conn = endpoint
        .connect_with(config, addr, &tls::exchange_name(exchange))
        .map_err(|e| lost(&e))?
        .await
        .map_err(|e| lost(&e))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    Ok((conn, send, recv))
}
