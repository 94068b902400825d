//! Routing state of the exchange: one task per known app server.
//!
//! Each target task owns its server's [`DeliveryQueue`], its current
//! connection's writer, the reports owed to it as an origin, and its lease.
//! Link readers talk to target tasks over bounded channels only:
//! deliveries are offered with `try_send` (a full channel is reported to
//! the origin as `overloaded`, never waited on), so one slow server cannot
//! stall anyone else. Target tasks never wait on IO: their writer is a
//! separate task behind a bounded channel.

use crate::metrics::ExchangeMetrics;
use crate::queue::{DeliveryQueue, PushError};
use iim::quic::{self, CLOSE_GOING_AWAY, Writer};
use iim::registry::Registry;
use iim::types::{MessageId, ServerId, now_ms};
use iim::wire::{Deliver906, DeliveryStatus, ErrorCode, Frame, Report, ReportEntry};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

/// Bound of each target task's command channel.
const TARGET_CHANNEL: usize = 8_192;
/// Most report entries held for an origin between two writes.
const MAX_PENDING_REPORTS: usize = 65_536;
/// Commands a target task takes per wake-up.
const CMD_BATCH: usize = 256;
/// Most bytes of 906s handed to the writer in one batch.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

pub const STATE_UP: u8 = 0;
pub const STATE_DISCONNECTED: u8 = 1;
pub const STATE_DOWN: u8 = 2;

/// What the rest of the exchange knows about one app server.
#[derive(Clone)]
pub struct Route {
    tx: mpsc::Sender<TargetCmd>,
    state: Arc<AtomicU8>,
}

impl Route {
    pub fn sender(&self) -> &mpsc::Sender<TargetCmd> {
        &self.tx
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

pub enum TargetCmd {
    /// A 906 for this server.
    Deliver(Deliver906),
    /// Outcomes of messages this server originated.
    Reports(Vec<ReportEntry>),
    /// A registered connection of this server (replaces any older one).
    Attach {
        conn_id: u64,
        epoch: u64,
        /// The largest frame body the server accepts.
        max_frame: usize,
        conn: quinn::Connection,
        writer: Writer,
    },
    /// The server acknowledged 906s up to `upto` on connection `conn_id`.
    Ack { conn_id: u64, upto: u64 },
    /// Connection `conn_id` ended; `clean` when the server closed it on
    /// purpose (draining), so there is no lease to wait for.
    Detach { conn_id: u64, clean: bool },
}

/// Shared by every task of one exchange.
pub struct Ctx {
    pub id: ServerId,
    pub epoch: u64,
    pub registry: Registry,
    pub metrics: Arc<ExchangeMetrics>,
    pub hub: Hub,
    pub lease: Duration,
    pub grace: Duration,
    pub max_frame: usize,
    pub handshake_timeout: Duration,
    pub max_links: usize,
    pub queue_max_frames: usize,
    pub queue_max_bytes: usize,
    /// Cancelled when the exchange starts shutting down.
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

#[derive(Default)]
pub struct Hub {
    routes: RwLock<HashMap<ServerId, Route>>,
}

impl Hub {
    /// `f` on the route of `id`, under the read lock: no clone of the route
    /// (two reference counts touched per call) on the per-906 path. `f`
    /// must not wait.
    pub fn with_route<T>(&self, id: ServerId, f: impl FnOnce(&Route) -> T) -> Option<T> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(f)
    }

    /// Servers whose link is up now, with their epochs unknown here: the
    /// sweeper only needs ids.
    pub fn up_servers(&self) -> Vec<ServerId> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| r.state() == STATE_UP)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn contains(&self, id: ServerId) -> bool {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
    }
}

/// The route of `id`, starting its task (in `state`, at `epoch`) if the
/// exchange did not know it yet.
pub fn ensure_route(ctx: &Arc<Ctx>, id: ServerId, epoch: u64, state: u8) -> Route {
    let mut routes = ctx.hub.routes.write().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = routes.get(&id) {
        return r.clone();
    }
    let (tx, rx) = mpsc::channel(TARGET_CHANNEL);
    let route = Route {
        tx,
        state: Arc::new(AtomicU8::new(state)),
    };
    routes.insert(id, route.clone());
    let task = Target {
        id,
        epoch,
        queue: DeliveryQueue::new(ctx.queue_max_frames, ctx.queue_max_bytes, ctx.max_frame),
        conn: None,
        reports: Vec::new(),
        disconnected_since: (state == STATE_DISCONNECTED).then(Instant::now),
        state: route.state.clone(),
        ctx: ctx.clone(),
        rx,
    };
    ctx.tracker
        .spawn(task.run().instrument(info_span!("target", server = id.0)));
    route
}

/// Offer one 906 to its target. Returns the status to report at once when
/// it cannot be queued.
pub fn offer(ctx: &Ctx, target: ServerId, d: Deliver906) -> Option<DeliveryStatus> {
    ctx.hub
        .with_route(target, |route| {
            if route.state() == STATE_DOWN {
                return Some(DeliveryStatus::ServerDown);
            }
            match route.tx.try_send(TargetCmd::Deliver(d)) {
                Ok(()) => None,
                Err(TrySendError::Full(_)) => {
                    ctx.metrics.rejections.inc("overloaded");
                    Some(DeliveryStatus::Overloaded)
                }
                Err(TrySendError::Closed(_)) => Some(DeliveryStatus::ServerDown),
            }
        })
        .unwrap_or(Some(DeliveryStatus::UnknownServer))
}

/// Send report entries to their origins (grouped, one command per origin).
/// An origin that is not connected or not keeping up loses them; it
/// retransmits the 905 or reports a timeout, so nothing is lost silently.
pub fn report(ctx: &Ctx, entries: Vec<ReportEntry>) {
    let Some(first) = entries.first() else {
        return;
    };
    // Usually every entry has the same origin: no regrouping then.
    let origin = first.id.origin;
    if entries.iter().all(|e| e.id.origin == origin) {
        send_reports(ctx, origin, entries);
        return;
    }
    let mut by_origin: HashMap<ServerId, Vec<ReportEntry>> = HashMap::new();
    for e in entries {
        by_origin.entry(e.id.origin).or_default().push(e);
    }
    for (origin, entries) in by_origin {
        send_reports(ctx, origin, entries);
    }
}

fn send_reports(ctx: &Ctx, origin: ServerId, entries: Vec<ReportEntry>) {
    let n = entries.len() as u64;
    let sent = ctx
        .hub
        .with_route(origin, |r| {
            r.tx.try_send(TargetCmd::Reports(entries)).is_ok()
        })
        .unwrap_or(false);
    if !sent {
        ctx.metrics.reports_dropped.add(n);
    }
}

fn entries(ids: Vec<MessageId>, server: ServerId, status: DeliveryStatus) -> Vec<ReportEntry> {
    ids.into_iter()
        .map(|id| ReportEntry { id, server, status })
        .collect()
}

struct Attached {
    conn_id: u64,
    conn: quinn::Connection,
    writer: Writer,
}

struct Target {
    id: ServerId,
    epoch: u64,
    queue: DeliveryQueue,
    conn: Option<Attached>,
    /// Report entries owed to this server as an origin.
    reports: Vec<ReportEntry>,
    disconnected_since: Option<Instant>,
    state: Arc<AtomicU8>,
    ctx: Arc<Ctx>,
    rx: mpsc::Receiver<TargetCmd>,
}

impl Target {
    async fn run(mut self) {
        let mut drain_deadline: Option<Instant> = None;
        let mut cmds = Vec::with_capacity(CMD_BATCH);
        loop {
            if drain_deadline.is_some() && self.queue.is_empty() && self.reports.is_empty() {
                break;
            }
            let want_write =
                self.conn.is_some() && (self.queue.has_unsent() || !self.reports.is_empty());
            let writer = self.conn.as_ref().map(|c| c.writer.clone());
            let lease_at = self.disconnected_since.map(|t| t + self.ctx.lease);
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled(), if drain_deadline.is_none() => {
                    drain_deadline = Some(Instant::now() + self.ctx.grace);
                }
                _ = quic::sleep_until_opt(drain_deadline) => break,
                n = self.rx.recv_many(&mut cmds, CMD_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for cmd in cmds.drain(..) {
                        self.handle(cmd).await;
                    }
                }
                permit = quic::reserve(writer), if want_write => match permit {
                    Some(permit) => {
                        permit.send(self.take_output());
                    }
                    // The writer died with its connection.
                    None => self.detach(false).await,
                },
                _ = quic::sleep_until_opt(lease_at), if self.state.load(Ordering::Acquire) == STATE_DISCONNECTED => {
                    self.mark_down("lease expired").await;
                }
            }
        }
        // Shutting down: what is still queued is not reported. Its origins
        // keep the 905s outstanding and send them again through the next
        // exchange they reach; the target drops what it already has.
        let left = self.queue.drain();
        self.ctx.metrics.queued.add(-(left.len() as i64));
        if !left.is_empty() {
            info!(undelivered = left.len(), "left for the origins to resend");
        }
        if let Some(a) = self.conn.take() {
            a.conn
                .close(CLOSE_GOING_AWAY.into(), b"exchange shutting down");
            self.ctx.metrics.links.add(-1);
        }
    }

    fn take_output(&mut self) -> Vec<bytes::Bytes> {
        let mut out = Vec::new();
        if !self.reports.is_empty() {
            let entries = std::mem::take(&mut self.reports);
            self.ctx
                .metrics
                .reports_out
                .add_each(&DeliveryStatus::tally(entries.iter().map(|e| e.status)));
            // Split to the server's own frame limit: an entry is at most
            // 31 bytes (three u64 and two u32 varints, a status byte).
            let max_frame = self.queue.max_frame();
            for chunk in entries.chunks((max_frame / 32).max(1)) {
                let f = Frame::Report(Report {
                    entries: chunk.to_vec(),
                });
                out.extend(quic::frame_bytes(&f, max_frame));
            }
        }
        let t = self.queue.poll_transmit(WRITE_BATCH_BYTES);
        self.ctx.metrics.delivers_out.add(t.frames as u64);
        self.ctx.metrics.retransmits.add(t.retransmits as u64);
        out.extend(t.chunks);
        out
    }

    async fn handle(&mut self, cmd: TargetCmd) {
        match cmd {
            TargetCmd::Deliver(d) => {
                let id = d.id;
                if self.state.load(Ordering::Acquire) == STATE_DOWN {
                    report(
                        &self.ctx,
                        entries(vec![id], self.id, DeliveryStatus::ServerDown),
                    );
                    return;
                }
                match self.queue.push(d) {
                    Ok(_) => self.ctx.metrics.queued.add(1),
                    Err(e) => {
                        if e == PushError::Full {
                            self.ctx.metrics.rejections.inc("overloaded");
                        } else {
                            self.ctx.metrics.rejections.inc("oversized_frame");
                        }
                        report(
                            &self.ctx,
                            entries(vec![id], self.id, DeliveryStatus::Overloaded),
                        );
                    }
                }
            }
            TargetCmd::Reports(mut r) => {
                if self.conn.is_some() && self.reports.len() + r.len() <= MAX_PENDING_REPORTS {
                    self.reports.append(&mut r);
                } else {
                    self.ctx.metrics.reports_dropped.add(r.len() as u64);
                }
            }
            TargetCmd::Attach {
                conn_id,
                epoch,
                max_frame,
                conn,
                writer,
            } => {
                if epoch < self.epoch {
                    quic::close_with(
                        &conn,
                        ErrorCode::StaleEpoch,
                        "a newer incarnation is registered",
                    );
                    self.ctx.metrics.rejections.inc("stale_epoch");
                    return;
                }
                if epoch > self.epoch {
                    // A new incarnation: what was owed to the old one is
                    // undeliverable (its connections are gone).
                    let old = self.queue.drain();
                    self.ctx.metrics.queued.add(-(old.len() as i64));
                    report(&self.ctx, entries(old, self.id, DeliveryStatus::ServerDown));
                    self.epoch = epoch;
                }
                if let Some(old) = self.conn.take() {
                    quic::close_with(&old.conn, ErrorCode::Protocol, "replaced by a newer link");
                } else {
                    self.ctx.metrics.links.add(1);
                }
                let too_big = self.queue.set_max_frame(max_frame.min(self.ctx.max_frame));
                if !too_big.is_empty() {
                    warn!(
                        count = too_big.len(),
                        max_frame, "906s larger than the server accepts"
                    );
                    self.ctx
                        .metrics
                        .rejections
                        .add("oversized_frame", too_big.len() as u64);
                    self.ctx.metrics.queued.add(-(too_big.len() as i64));
                    report(
                        &self.ctx,
                        entries(too_big, self.id, DeliveryStatus::Overloaded),
                    );
                }
                self.queue.on_disconnect();
                self.conn = Some(Attached {
                    conn_id,
                    conn,
                    writer,
                });
                self.disconnected_since = None;
                self.state.store(STATE_UP, Ordering::Release);
                info!(epoch, queued = self.queue.len(), "server attached");
            }
            TargetCmd::Ack { conn_id, upto } => {
                let Some(a) = self.conn.as_ref().filter(|a| a.conn_id == conn_id) else {
                    return;
                };
                match self.queue.handle_ack(upto) {
                    Ok(ids) => {
                        self.ctx.metrics.acks_in.add(ids.len() as u64);
                        self.ctx.metrics.queued.add(-(ids.len() as i64));
                        report(&self.ctx, entries(ids, self.id, DeliveryStatus::Delivered));
                    }
                    Err(e) => {
                        warn!(error = %e, "protocol violation");
                        self.ctx.metrics.rejections.inc("protocol");
                        quic::close_with(&a.conn, ErrorCode::Protocol, &e.to_string());
                    }
                }
            }
            TargetCmd::Detach { conn_id, clean } => {
                if self.conn.as_ref().is_some_and(|a| a.conn_id == conn_id) {
                    self.detach(clean).await;
                }
            }
        }
    }

    async fn detach(&mut self, clean: bool) {
        if self.conn.take().is_none() {
            return;
        }
        self.ctx.metrics.links.add(-1);
        self.queue.on_disconnect();
        if clean {
            self.mark_down("closed by the server").await;
        } else {
            info!(
                lease_ms = self.ctx.lease.as_millis() as u64,
                "link lost; lease running"
            );
            self.disconnected_since = Some(Instant::now());
            self.state.store(STATE_DISCONNECTED, Ordering::Release);
        }
    }

    async fn mark_down(&mut self, why: &'static str) {
        self.state.store(STATE_DOWN, Ordering::Release);
        self.disconnected_since = None;
        let left = self.queue.drain();
        self.ctx.metrics.queued.add(-(left.len() as i64));
        let failed = left.len();
        report(
            &self.ctx,
            entries(left, self.id, DeliveryStatus::ServerDown),
        );
        self.ctx.metrics.marked_down.inc();
        match self
            .ctx
            .registry
            .mark_down(self.id, self.epoch, now_ms())
            .await
        {
            Ok(_) => info!(epoch = self.epoch, why, failed, "server marked down"),
            Err(e) => {
                tracing::error!(error = %e, why, "could not mark server down in the registry")
            }
        }
    }
}
