//! The app server's link to its exchange.
//!
//! Two tasks: the *connector* finds the exchange (config or registry),
//! connects with mTLS, registers, and hands the connection over; the *link
//! task* reads the current connection's frames and owns everything that
//! must survive reconnects — the outbox of 905s awaiting reports, the 906
//! duplicate filter, pending acks. It never waits on a write (its writer is
//! a separate task behind a bounded channel), and a read is one branch of
//! its `select!`, so reading never holds up the rest. On every new
//! connection the whole outbox is written again in send order, so per
//! (origin, target) order and exactly-once delivery hold across a cut.

use crate::config::ExchangeTarget;
use crate::dedup::{Dedup, Verdict};
use crate::metrics::AppMetrics;
use crate::outbox::Outbox;
use iim::api::{LocalDelivery, Submit};
use iim::quic::{self, CLOSE_GOING_AWAY, FrameReader, ReadError, Writer};
use iim::registry::{Registry, Role, ServerState};
use iim::tls;
use iim::types::{Address, ServerId, now_ms};
use iim::wire::{
    self, Ack906, Deliver906, DeliveryStatus, ErrorCode, Frame, Heartbeat, Message, Register,
    ReportEntry,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Batches the writer may hold before the link task waits.
const WRITER_BATCHES: usize = 64;
/// Submits the link task takes per wake-up.
const SUBMIT_BATCH: usize = 256;
/// Events from connector and readers.
const EVENT_CHANNEL: usize = 256;

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
    /// Set when the exchange refused this incarnation for good (another
    /// process registered the same id with a newer epoch, or the
    /// certificate does not match): the server must stop.
    pub fatal: Option<String>,
}

enum Event {
    Connected {
        attempt_no: u64,
        exchange: ServerId,
        /// The largest frame body the exchange accepts.
        max_frame: usize,
        conn: quinn::Connection,
        writer: Writer,
        writer_task: tokio::task::JoinHandle<()>,
        /// The link task reads the connection itself: no hop through a
        /// reader task per batch of frames.
        reader: FrameReader,
    },
    Fatal(String),
}

/// Start the connector and the link task. `stop` ends both (after the
/// caller drained what it wanted); the link then closes its connection as
/// a clean, intended departure.
pub fn spawn(
    p: LinkParams,
    endpoint: quinn::Endpoint,
    submits: mpsc::Receiver<Submit>,
    host: Arc<dyn LocalDelivery>,
    metrics: Arc<AppMetrics>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> watch::Receiver<LinkState> {
    let (events_tx, events) = mpsc::channel(EVENT_CHANNEL);
    let (state_tx, state_rx) = watch::channel(LinkState {
        idle: true,
        ..LinkState::default()
    });
    let span = info_span!("link", server = p.server.0);
    let connector = Connector {
        server: p.server,
        epoch: p.epoch,
        target: p.exchange.clone(),
        expected: p.exchange_id,
        max_frame: p.max_frame,
        reconnect_min: p.reconnect_min,
        reconnect_max: p.reconnect_max,
        client_config: p.client_config.clone(),
        registry: p.registry.clone(),
        endpoint,
        events: events_tx,
        stop: stop.clone(),
    };
    tracker.spawn(connector.run().instrument(span.clone()));
    let link = Link {
        outbox: Outbox::new(p.epoch),
        dedup: Dedup::default(),
        out: quic::Coalescer::default(),
        cur: None,
        connected_before: false,
        p,
        host,
        metrics,
        state: state_tx,
    };
    tracker.spawn(link.run(submits, events, stop).instrument(span));
    state_rx
}

struct Current {
    attempt_no: u64,
    exchange: ServerId,
    conn: quinn::Connection,
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

/// The next batch of frames from `reader`; never resolves without one, so
/// it can sit in a `select!` whether or not a link is up. Cancel-safe: a
/// read is only interrupted while no frame of the batch is held.
async fn read_frames(
    reader: Option<&mut FrameReader>,
    batch: &mut Vec<Frame>,
) -> Result<bool, ReadError> {
    match reader {
        Some(r) => r.next_batch(batch).await,
        None => std::future::pending().await,
    }
}

struct Link {
    p: LinkParams,
    outbox: Outbox<oneshot::Sender<Vec<ReportEntry>>>,
    dedup: Dedup,
    /// Frames waiting for the writer, coalesced as they come.
    out: quic::Coalescer,
    cur: Option<Current>,
    connected_before: bool,
    host: Arc<dyn LocalDelivery>,
    metrics: Arc<AppMetrics>,
    state: watch::Sender<LinkState>,
}

impl Link {
    async fn run(
        mut self,
        mut submits: mpsc::Receiver<Submit>,
        mut events: mpsc::Receiver<Event>,
        stop: CancellationToken,
    ) {
        let mut subs = Vec::with_capacity(SUBMIT_BATCH);
        let mut frames = Vec::new();
        let mut heartbeat = tokio::time::interval(self.p.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let writer = self
                .cur
                .as_ref()
                .filter(|_| !self.out.is_empty())
                .map(|c| c.writer.clone());
            let deadline = self.outbox.next_deadline().map(Instant::from_std);
            let mut reading = self
                .cur
                .as_mut()
                .and_then(|c| c.reader.take().map(|r| (c.attempt_no, r)));
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                r = read_frames(reading.as_mut().map(|(_, r)| r), &mut frames) => match r {
                    Ok(true) => self.on_frames(std::mem::take(&mut frames)),
                    Ok(false) => self.reader_ended("stream finished by the exchange"),
                    Err(e) => self.reader_ended(&e.to_string()),
                },
                permit = quic::reserve(writer) => match permit {
                    Some(permit) => {
                        permit.send(self.out.take());
                    }
                    None => self.lost(),
                },
                n = submits.recv_many(&mut subs, SUBMIT_BATCH.min(self.room())), if self.room() > 0 => {
                    if n == 0 {
                        break;
                    }
                    for sub in subs.drain(..) {
                        self.on_submit(sub);
                    }
                }
                _ = quic::sleep_until_opt(deadline) => {
                    for (reply, results) in self.outbox.poll_expired(std::time::Instant::now()) {
                        for r in &results {
                            self.metrics.reports_in.inc(r.status.as_str());
                        }
                        let _ = reply.send(results);
                    }
                }
                _ = heartbeat.tick(), if self.cur.is_some() => {
                    let f = Frame::Heartbeat(Heartbeat { sent_at_ms: now_ms() });
                    if let Some(b) = quic::frame_bytes(&f, self.p.max_frame) {
                        self.out.copy(&b);
                    }
                }
            }
            // The reader goes back to its connection, unless that was lost or
            // replaced meanwhile.
            if let (Some((attempt_no, r)), Some(c)) = (reading, self.cur.as_mut())
                && c.attempt_no == attempt_no
            {
                c.reader = Some(r);
            }
            self.publish();
        }
        // Stopping: whatever is still unreported times out for its sender.
        for (reply, results) in self.outbox.abandon() {
            let _ = reply.send(results);
        }
        if let Some(c) = self.cur.take() {
            c.conn
                .close(CLOSE_GOING_AWAY.into(), b"app server draining");
        }
        self.metrics.link_up.set(0);
        self.publish();
    }

    /// 905s the outbox can still take.
    fn room(&self) -> usize {
        self.p.max_outstanding.saturating_sub(self.outbox.len())
    }

    fn publish(&self) {
        let exchange = self.cur.as_ref().map(|c| c.exchange);
        let idle = self.outbox.is_empty();
        self.metrics.outstanding.set(self.outbox.len() as i64);
        {
            // Most iterations change neither: a read lock, no wake-ups.
            let s = self.state.borrow();
            if s.exchange == exchange && s.idle == idle {
                return;
            }
        }
        self.state.send_modify(|s| {
            s.exchange = exchange;
            s.idle = idle;
        });
    }

    fn on_submit(&mut self, sub: Submit) {
        self.metrics.forwards_out.inc();
        if self.cur.is_some() {
            self.out.add(&sub.frame);
        }
        let deadline = std::time::Instant::now() + self.p.send_timeout;
        self.outbox
            .push(sub.id, sub.frame, sub.targets, deadline, sub.reply);
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected {
                attempt_no,
                exchange,
                max_frame,
                conn,
                writer,
                writer_task,
                reader,
            } => {
                self.metrics.link_connects.inc();
                let limit = max_frame.min(self.p.max_frame);
                if limit < self.p.send_limit.fetch_min(limit, Ordering::Relaxed) {
                    warn!(limit, "the exchange accepts smaller frames than configured");
                }
                let too_big = self
                    .outbox
                    .remove_larger_than(limit + wire::HEADER_LEN, DeliveryStatus::Overloaded);
                for (reply, results) in too_big {
                    let _ = reply.send(results);
                }
                self.metrics.link_up.set(1);
                // Acks and heartbeats of the old connection mean nothing to
                // the new one; every unreported 905 goes out again, in order.
                self.out.clear();
                for f in self.outbox.frames() {
                    self.out.add(f);
                }
                if self.connected_before {
                    self.metrics.forwards_resent.add(self.outbox.len() as u64);
                }
                self.connected_before = true;
                info!(
                    exchange = exchange.0,
                    resent = self.outbox.len(),
                    "registered with the exchange"
                );
                self.cur = Some(Current {
                    attempt_no,
                    exchange,
                    conn,
                    writer,
                    writer_task,
                    reader: Some(reader),
                });
            }
            Event::Fatal(reason) => {
                error!(%reason, "the exchange refused this server for good");
                self.state.send_modify(|s| s.fatal = Some(reason));
            }
        }
    }

    /// The connection's stream ended or broke: close it (the connector
    /// then reconnects) and forget it.
    fn reader_ended(&mut self, why: &str) {
        debug!(why, "exchange link read ended");
        if let Some(c) = &self.cur {
            c.conn
                .close(ErrorCode::Protocol.close_code().into(), b"reader ended");
        }
        self.lost();
    }

    fn lost(&mut self) {
        if self.cur.take().is_some() {
            self.metrics.link_up.set(0);
            self.out.clear();
            warn!(outstanding = self.outbox.len(), "link to the exchange lost");
        }
    }

    fn on_frames(&mut self, frames: Vec<Frame>) {
        let mut ack = None;
        for f in frames {
            match f {
                Frame::Deliver(d) => {
                    ack = Some(d.no);
                    self.on_deliver(d);
                }
                Frame::Report(r) => {
                    self.metrics
                        .reports_in
                        .add_each(&DeliveryStatus::tally(r.entries.iter().map(|e| e.status)));
                    for e in r.entries {
                        if let Some((reply, results)) = self.outbox.handle_report(e) {
                            let _ = reply.send(results);
                        }
                    }
                }
                Frame::Heartbeat(_) => {}
                Frame::Error(e) => {
                    warn!(code = ?e.code, detail = %e.detail, "error frame from the exchange")
                }
                other => {
                    self.metrics.rejected.inc("protocol");
                    warn!(kind = other.kind(), "unexpected frame from the exchange");
                    if let Some(c) = &self.cur {
                        quic::close_with(&c.conn, ErrorCode::Protocol, "unexpected frame");
                    }
                    self.lost();
                    return;
                }
            }
        }
        if let Some(upto) = ack {
            self.metrics.acks_out.inc();
            let f = Frame::Ack(Ack906 { upto });
            if let Some(b) = quic::frame_bytes(&f, self.p.max_frame) {
                self.out.copy(&b);
            }
        }
    }

    /// Restore the original message of a 906, drop duplicates, hand it to
    /// the listed local connections. Every 906 is acknowledged, delivered or
    /// not: a bad one must not block the queue behind it.
    fn on_deliver(&mut self, d: Deliver906) {
        self.metrics.delivers_in.inc();
        let Deliver906 {
            id,
            seq,
            users,
            message,
            ..
        } = d;
        let msg = match Message::decode_owned(message) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.rejected.inc("malformed_message");
                warn!(%id, error = %e, "undecodable message in a 906");
                return;
            }
        };
        if msg.id != id || msg.source.server != id.origin || msg.target != Address::RECEIVER {
            self.metrics.rejected.inc("forged_id");
            warn!(%id, inner = %msg.id, "906 whose message does not match its header");
            return;
        }
        match self.dedup.check(id.origin, id.epoch, seq) {
            Verdict::New => {
                debug!(%id, users = users.len(), "906 delivered");
                self.host.deliver(&Arc::new(msg), &users);
            }
            Verdict::Duplicate | Verdict::Stale => self.metrics.duplicates.inc(),
        }
    }
}

struct Connector {
    server: ServerId,
    epoch: u64,
    target: Option<ExchangeTarget>,
    expected: ServerId,
    max_frame: usize,
    reconnect_min: Duration,
    reconnect_max: Duration,
    client_config: quinn::ClientConfig,
    registry: Registry,
    endpoint: quinn::Endpoint,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
}

enum ConnectError {
    /// Try again later.
    Retry(String),
    /// This incarnation may never register: stop trying.
    Fatal(String),
}

impl Connector {
    async fn run(self) {
        let mut backoff = self.reconnect_min;
        let mut attempt_no = 0u64;
        loop {
            attempt_no += 1;
            let attempt = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = self.connect_once(attempt_no) => r,
            };
            match attempt {
                Ok(conn) => {
                    backoff = self.reconnect_min;
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        e = conn.closed() => info!(error = %e, "exchange connection closed"),
                    }
                }
                Err(ConnectError::Fatal(reason)) => {
                    let _ = self.events.send(Event::Fatal(reason)).await;
                    return;
                }
                Err(ConnectError::Retry(reason)) => {
                    debug!(%reason, backoff_ms = backoff.as_millis() as u64, "cannot reach the exchange");
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.reconnect_max);
        }
    }

    /// Where the exchange is: the configured one, else the registry's row of
    /// the exchange this server's 905s are addressed to (found at start).
    async fn locate(&self) -> Result<(ServerId, SocketAddr), ConnectError> {
        if let Some(t) = &self.target {
            return Ok((ServerId(t.id), t.address));
        }
        let servers = self
            .registry
            .servers()
            .await
            .map_err(|e| ConnectError::Retry(format!("registry: {e}")))?;
        let ex = servers
            .iter()
            .find(|s| {
                s.role == Role::Exchange && s.id == self.expected && s.state == ServerState::Up
            })
            .ok_or_else(|| {
                ConnectError::Retry(format!(
                    "exchange {} is not up in the registry",
                    self.expected
                ))
            })?;
        let addr = ex.address.parse().map_err(|_| {
            ConnectError::Retry(format!("exchange {} has address {:?}", ex.id, ex.address))
        })?;
        Ok((ex.id, addr))
    }

    async fn connect_once(&self, attempt_no: u64) -> Result<quinn::Connection, ConnectError> {
        let (exchange, addr) = self.locate().await?;
        let retry = |e: &dyn std::fmt::Display| ConnectError::Retry(e.to_string());
        let conn = self
            .endpoint
            .connect_with(
                self.client_config.clone(),
                addr,
                &tls::exchange_name(exchange),
            )
            .map_err(|e| retry(&e))?
            .await
            .map_err(|e| retry(&e))?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| retry(&e))?;
        let reg = Frame::Register(Register {
            server: self.server,
            epoch: self.epoch,
            max_frame: self.max_frame as u32,
        });
        let bytes = quic::frame_bytes(&reg, self.max_frame)
            .ok_or_else(|| ConnectError::Fatal("cannot encode register".into()))?;
        send.write_all(&bytes).await.map_err(|e| retry(&e))?;
        let mut reader = FrameReader::new(recv, self.max_frame);
        let first = tokio::time::timeout(Duration::from_secs(10), reader.next()).await;
        let exchange_max = match first {
            Ok(Ok(Some(Frame::Registered(r)))) if r.exchange == exchange => r.max_frame as usize,
            Ok(Ok(Some(Frame::Registered(r)))) => {
                return Err(ConnectError::Fatal(format!(
                    "expected exchange {exchange}, reached exchange {}",
                    r.exchange
                )));
            }
            Ok(Ok(Some(other))) => {
                return Err(ConnectError::Retry(format!(
                    "unexpected {} frame",
                    other.kind()
                )));
            }
            Ok(Ok(None)) => return Err(ConnectError::Retry("stream finished".into())),
            Ok(Err(ReadError::Stream(quinn::ReadError::ConnectionLost(
                quinn::ConnectionError::ApplicationClosed(c),
            )))) => {
                let reason = String::from_utf8_lossy(&c.reason).to_string();
                let code = ErrorCode::from_close_code(c.error_code.into_inner());
                return Err(match code {
                    Some(ErrorCode::StaleEpoch | ErrorCode::IdentityMismatch) => {
                        ConnectError::Fatal(format!("{code:?}: {reason}"))
                    }
                    _ => ConnectError::Retry(format!("refused ({code:?}): {reason}")),
                });
            }
            Ok(Err(e)) => return Err(retry(&e)),
            Err(_) => return Err(ConnectError::Retry("no registered frame in time".into())),
        };
        let (writer, writer_task) = quic::spawn_writer(send, WRITER_BATCHES);
        self.events
            .send(Event::Connected {
                attempt_no,
                exchange,
                max_frame: exchange_max.max(1_024),
                conn: conn.clone(),
                writer,
                writer_task,
                reader,
            })
            .await
            .map_err(|_| ConnectError::Retry("link stopped".into()))?;
        Ok(conn)
    }
}
