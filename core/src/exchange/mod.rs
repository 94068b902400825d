//! The exchange as a state machine: every decision the exchange makes,
//! with no socket, task, channel or clock inside.
//!
//! [`Exchange`] owns the route of every known app server (its incarnation,
//! its state up / disconnected / down, its [`DeliveryQueue`], the reports
//! owed to it as an origin, its lease), the links (connections) and where
//! each stands in the registration handshake, and the registry questions
//! in flight. It is driven like quinn-proto's `Connection`:
//!
//! - inputs: [`Exchange::accept`], [`Exchange::handle_register`],
//!   [`Exchange::handle_frames`], [`Exchange::handle_end`],
//!   [`Exchange::handle_answer`], [`Exchange::handle_timeout`],
//!   [`Exchange::shutdown`], each with the time `now` passed in;
//! - outputs: [`Exchange::poll_output`] (a link has bytes to write, close a
//!   link, ask the registry, stopped), [`Exchange::poll_transmit`] (the
//!   bytes for one link, taken when its writer has room) and
//!   [`Exchange::poll_timeout`] (when to call `handle_timeout` next).
//!
//! The registry is never called from here: the core asks ([`Query`]) and
//! is told the answer ([`Answer`]) — late, failed or never, as the shell
//! or a simulator pleases. The IO shell (`iim-exchange`) moves frames,
//! answers and timers between sockets, the database and this core; the
//! simulator (`iim-sim`) drives the same core on virtual time.

pub mod metrics;
pub mod queue;
pub mod refusals;
pub mod split;

pub use metrics::ExchangeMetrics;

use crate::Map;
pub use crate::RegistryFailure;
use crate::{AskId, ConnId, Timers};
use bytes::Bytes;
use iim_proto::coalesce::{Coalescer, frame_bytes};
use iim_proto::types::{MessageId, ServerId};
use iim_proto::wire::{
    CLOSE_GOING_AWAY, Deliver906, DeliveryStatus, ErrorCode, ErrorFrame, Forward905, Frame,
    Register, Registered, Report, ReportEntry, WireError,
};
use queue::{DeliveryQueue, Dropped, PushError};
use refusals::Refusals;
use split::SplitLimits;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// Most report entries held for an origin between two writes.
pub const MAX_PENDING_REPORTS: usize = 65_536;
/// Frames a link may send after `Register` and before the registry has
/// answered; they are handled once it is attached.
const MAX_EARLY_FRAMES: usize = 1_024;

/// The exchange's settings (validated by the shell's config).
#[derive(Clone, Debug)]
pub struct Config {
    pub id: ServerId,
    /// This exchange's incarnation (from the registry at start).
    pub epoch: u64,
    /// How long a disconnected app server's deliveries are kept for it.
    pub lease: Duration,
    /// How long a shutdown waits for queued deliveries.
    pub grace: Duration,
    /// The largest frame body this exchange accepts and sends.
    pub max_frame: usize,
    /// From a new connection to a valid, recorded `Register`.
    pub handshake_timeout: Duration,
    pub max_links: usize,
    pub queue_max_frames: usize,
    pub queue_max_bytes: usize,
    /// How often `last_seen` is refreshed and new servers are learnt.
    pub sweep_period: Duration,
    /// How long a registry question may stay unanswered before the core
    /// stops waiting for it (a lost answer must not stop the sweeps or
    /// keep its question's state forever).
    pub ask_timeout: Duration,
    pub split: SplitLimits,
}

impl Config {
    /// How long the daemon waits for a registry answer: beyond any query
    /// the registry runs, short enough that a hung one is not waited for
    /// beyond a lease or two.
    pub const ASK_TIMEOUT: Duration = Duration::from_secs(30);

    /// The sweep period the daemon uses for `lease`: a third of it, at
    /// least 200 ms.
    pub fn sweep_period_for(lease: Duration) -> Duration {
        (lease / 3).max(Duration::from_millis(200))
    }
}

/// What the registry says of one app server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppServerRow {
    pub id: ServerId,
    /// Its current incarnation.
    pub epoch: u64,
    /// The exchange it is attached to, if any.
    pub exchange: Option<ServerId>,
    /// Its state is `down`.
    pub down: bool,
}

/// The registry's verdict on a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    Accepted,
    /// The claimed epoch is not the registry's current one.
    StaleEpoch {
        current: u64,
    },
    /// No such server.
    Unknown,
    /// The server is not an app server.
    WrongRole,
}

/// A question for the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// Record that `server` registered its incarnation `epoch` with this
    /// exchange (state up, attached here); answered by
    /// [`Answer::Registration`].
    RecordRegistration { server: ServerId, epoch: u64 },
    /// The incarnation is gone: mark it down and delete its sessions.
    /// Answered by [`Answer::Done`].
    MarkDown { server: ServerId, epoch: u64 },
    /// Every app server the registry knows; answered by
    /// [`Answer::AppServers`].
    AppServers,
    /// Refresh `last_seen` of these incarnations (this exchange's first);
    /// answered by [`Answer::Done`].
    Touch(Vec<(ServerId, u64)>),
}

/// The registry's answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Registration(Result<Registration, RegistryFailure>),
    AppServers(Result<Vec<AppServerRow>, RegistryFailure>),
    Done(Result<(), RegistryFailure>),
}

/// How a link's connection ended, as its reader saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// The connection closed; `clean` when the app server closed it on
    /// purpose (going away), so there is no lease to wait for.
    Closed { clean: bool, detail: String },
    /// The app server finished its stream.
    Finished,
    /// The stream carried bytes that are not a frame.
    Malformed(WireError),
    /// The stream failed otherwise.
    Stream(String),
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The link has bytes to write: call [`Exchange::poll_transmit`] when
    /// its writer has room. Given once until that call.
    Transmit(ConnId),
    /// Close the link's connection with this application code and reason.
    /// The core has forgotten the link.
    Close {
        conn: ConnId,
        code: u32,
        reason: String,
    },
    /// Ask the registry; hand the answer to [`Exchange::handle_answer`].
    Ask { id: AskId, query: Query },
    /// Shutdown is complete: every link is closed.
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteState {
    /// Its link is attached.
    Up,
    /// Its link was lost; its deliveries are kept until the lease ends.
    Disconnected,
    /// Gone: sends to it are answered `server_down` at once.
    Down,
}

/// One app server as the exchange knows it.
#[derive(Debug)]
struct Route {
    epoch: u64,
    state: RouteState,
    queue: DeliveryQueue,
    /// The attached link (state up).
    conn: Option<ConnId>,
    /// Report entries owed to this server as an origin.
    reports: Vec<ReportEntry>,
    /// What its 905s' targets were told instead of a delivery.
    refused: Refusals,
    /// Bumped whenever the lease starts or stops, so that a stale lease
    /// timer finds a different number and does nothing.
    lease_gen: u64,
}

#[derive(Debug)]
enum LinkState {
    /// Connected, waiting for `Register`.
    Handshake,
    /// `Register` received, waiting for the registry.
    Registering {
        server: ServerId,
        epoch: u64,
        max_frame: usize,
        early: Vec<Frame>,
    },
    Attached {
        server: ServerId,
        epoch: u64,
    },
}

#[derive(Debug)]
struct Link {
    state: LinkState,
    /// Frames of the link's own (`Registered`, errors), written before the
    /// route's.
    pending: Coalescer,
    /// A `Transmit` was given and `poll_transmit` not called since.
    flagged: bool,
}

#[derive(Debug)]
enum Asked {
    Registration(ConnId),
    MarkDown {
        server: ServerId,
        epoch: u64,
        why: &'static str,
        failed: usize,
    },
    Sweep,
    Touch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Lease(ServerId, u64),
    Handshake(ConnId),
    Ask(AskId),
    Sweep,
    Drain,
}

/// The exchange core. See the module documentation.
pub struct Exchange {
    cfg: Config,
    routes: Map<ServerId, Route>,
    links: Map<ConnId, Link>,
    /// Links attached to a route.
    attached: usize,
    /// Refusals remembered over every route (none: no look-up per 905).
    refusals: usize,
    asked: Map<AskId, Asked>,
    next_ask: u64,
    sweeping: bool,
    timers: Timers<Timer>,
    outputs: VecDeque<Output>,
    /// The end of the grace period, once shutting down.
    draining: Option<Instant>,
    stopped: bool,
    /// The time of the latest input.
    now: Instant,
    metrics: Arc<ExchangeMetrics>,
}

impl Exchange {
    /// A new exchange that knows the app servers in `known` (the registry
    /// at start). Servers it served before a restart (attached here and not
    /// down) get a lease to come back; every other one is routable as down.
    pub fn new(
        cfg: Config,
        known: Vec<AppServerRow>,
        metrics: Arc<ExchangeMetrics>,
        now: Instant,
    ) -> Exchange {
        let mut ex = Exchange {
            cfg,
            routes: Map::default(),
            links: Map::default(),
            attached: 0,
            refusals: 0,
            asked: Map::default(),
            next_ask: 1,
            sweeping: false,
            timers: Timers::default(),
            outputs: VecDeque::new(),
            draining: None,
            stopped: false,
            now,
            metrics,
        };
        for s in known {
            let ours = s.exchange == Some(ex.cfg.id) && !s.down;
            let route = ex.new_route(s.epoch);
            let route = ex.routes.entry(s.id).or_insert(route);
            if ours {
                route.state = RouteState::Disconnected;
                route.lease_gen += 1;
                ex.timers
                    .add(now + ex.cfg.lease, Timer::Lease(s.id, route.lease_gen));
            }
        }
        ex.timers.add(now, Timer::Sweep);
        ex
    }

    fn new_route(&self, epoch: u64) -> Route {
        Route {
            epoch,
            state: RouteState::Down,
            queue: DeliveryQueue::new(
                self.cfg.queue_max_frames,
                self.cfg.queue_max_bytes,
                self.cfg.max_frame,
            ),
            conn: None,
            reports: Vec::new(),
            refused: Refusals::default(),
            lease_gen: 0,
        }
    }

    // ----- getters -------------------------------------------------------

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<ExchangeMetrics> {
        &self.metrics
    }

    /// The state of `server`'s route, if the exchange knows it.
    pub fn route_state(&self, server: ServerId) -> Option<RouteState> {
        self.routes.get(&server).map(|r| r.state)
    }

    /// The incarnation the exchange holds for `server`.
    pub fn route_epoch(&self, server: ServerId) -> Option<u64> {
        self.routes.get(&server).map(|r| r.epoch)
    }

    /// 906s queued for `server` (sent or not, unacknowledged) and their
    /// bytes.
    pub fn queued(&self, server: ServerId) -> (usize, usize) {
        self.routes
            .get(&server)
            .map_or((0, 0), |r| (r.queue.len(), r.queue.bytes()))
    }

    /// Refusals remembered for `origin`'s 905s: (message, target, what it
    /// was told).
    pub fn refusals_of(
        &self,
        origin: ServerId,
    ) -> impl Iterator<Item = (MessageId, ServerId, DeliveryStatus)> + '_ {
        self.routes
            .get(&origin)
            .into_iter()
            .flat_map(|r| r.refused.iter())
    }

    /// Report entries held for `server` as an origin.
    pub fn reports_held(&self, server: ServerId) -> usize {
        self.routes.get(&server).map_or(0, |r| r.reports.len())
    }

    /// The link attached for `server`, if up.
    pub fn attached_link(&self, server: ServerId) -> Option<ConnId> {
        self.routes.get(&server).and_then(|r| r.conn)
    }

    /// Every server the exchange has a route for.
    pub fn servers(&self) -> impl Iterator<Item = ServerId> + '_ {
        self.routes.keys().copied()
    }

    /// Links the core knows (in any state).
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Links attached to a route.
    pub fn attached_count(&self) -> usize {
        self.attached
    }

    /// Registry questions not answered yet.
    pub fn asks_in_flight(&self) -> usize {
        self.asked.len()
    }

    /// Timers set (some may have become moot): bounded by what happened
    /// within the longest timeout.
    pub fn timers_pending(&self) -> usize {
        self.timers.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    // ----- outputs -------------------------------------------------------

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Exchange::handle_timeout`] must be called next (it may find
    /// nothing to do: timers are not removed when they become moot).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The bytes to write on `conn` now: its own frames, the reports owed
    /// to its server, then unsent 906s up to about `max_bytes`. Empty when
    /// there is nothing (or the link is gone).
    pub fn poll_transmit(&mut self, conn: ConnId, max_bytes: usize) -> Vec<Bytes> {
        let Some(link) = self.links.get_mut(&conn) else {
            return Vec::new();
        };
        link.flagged = false;
        let mut out = link.pending.take();
        let LinkState::Attached { server, .. } = link.state else {
            return out;
        };
        let Some(route) = self
            .routes
            .get_mut(&server)
            .filter(|r| r.conn == Some(conn))
        else {
            return out;
        };
        if !route.reports.is_empty() {
            let entries = std::mem::take(&mut route.reports);
            self.metrics
                .reports_out
                .add_each(&DeliveryStatus::tally(entries.iter().map(|e| e.status)));
            // Split to the server's own frame limit: an entry is at most 31
            // bytes (three u64 and two u32 varints, a status byte).
            let max_frame = route.queue.max_frame();
            for chunk in entries.chunks((max_frame / 32).max(1)) {
                let f = Frame::Report(Report {
                    entries: chunk.to_vec(),
                });
                out.extend(frame_bytes(&f, max_frame));
            }
        }
        let t = route.queue.poll_transmit(max_bytes);
        self.metrics.delivers_out.add(t.frames as u64);
        self.metrics.retransmits.add(t.retransmits as u64);
        out.extend(t.chunks);
        if route.queue.has_unsent() {
            self.flag(conn);
        }
        self.check_drained(server);
        out
    }

    // ----- inputs --------------------------------------------------------

    /// A new connection completed its TLS handshake; its `Register` must
    /// follow within the handshake timeout.
    pub fn accept(&mut self, conn: ConnId, now: Instant) {
        self.now = now;
        self.links.insert(
            conn,
            Link {
                state: LinkState::Handshake,
                pending: Coalescer::default(),
                flagged: false,
            },
        );
        self.timers
            .add(now + self.cfg.handshake_timeout, Timer::Handshake(conn));
        if self.draining.is_some() {
            self.close(
                conn,
                ErrorCode::ShuttingDown.close_code(),
                "exchange is stopping",
            );
        }
    }

    /// The link's first frame, `Register`. `identity` says whether its
    /// certificate names the server it claims to be (the error for logs).
    pub fn handle_register(
        &mut self,
        conn: ConnId,
        reg: Register,
        identity: Result<(), String>,
        now: Instant,
    ) {
        self.now = now;
        self.metrics.frames_in.inc("register");
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        if !matches!(link.state, LinkState::Handshake) {
            return self.protocol_error(conn, "unexpected register frame from an app server");
        }
        let Register {
            server,
            epoch,
            max_frame,
        } = reg;
        if let Err(e) = identity {
            return self.refuse(
                conn,
                "identity_mismatch",
                ErrorCode::IdentityMismatch,
                &format!("certificate does not name server {server}: {e}"),
            );
        }
        if self.attached >= self.cfg.max_links {
            return self.refuse(
                conn,
                "too_many_links",
                ErrorCode::Internal,
                "too many servers connected",
            );
        }
        let id = self.ask(Query::RecordRegistration { server, epoch });
        self.asked.insert(id, Asked::Registration(conn));
        if let Some(link) = self.links.get_mut(&conn) {
            link.state = LinkState::Registering {
                server,
                epoch,
                max_frame: (max_frame as usize).clamp(1_024, self.cfg.max_frame),
                early: Vec::new(),
            };
        }
    }

    /// Frames the link sent (after `Register`, or instead of it).
    pub fn handle_frames(&mut self, conn: ConnId, frames: Vec<Frame>, now: Instant) {
        self.now = now;
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        let (server, epoch) = match &mut link.state {
            LinkState::Attached { server, epoch } => (*server, *epoch),
            LinkState::Registering { early, .. } => {
                if early.len() + frames.len() > MAX_EARLY_FRAMES {
                    return self.protocol_error(conn, "too many frames before registration");
                }
                early.extend(frames);
                return;
            }
            LinkState::Handshake => {
                for f in &frames {
                    self.metrics.frames_in.inc(f.kind());
                }
                return self.refuse(
                    conn,
                    "not_registered",
                    ErrorCode::NotRegistered,
                    "the first frame must be register",
                );
            }
        };
        self.attached_frames(conn, server, epoch, frames);
    }

    fn attached_frames(&mut self, conn: ConnId, server: ServerId, epoch: u64, frames: Vec<Frame>) {
        let mut failures: Vec<ReportEntry> = Vec::new();
        let mut last_ack = None;
        for frame in frames {
            self.metrics.frames_in.inc(frame.kind());
            match frame {
                Frame::Forward(fwd) => {
                    if !self.forward(conn, server, epoch, fwd, &mut failures) {
                        // The link was closed for a forgery.
                        break;
                    }
                }
                Frame::Ack(a) => last_ack = Some(a.upto),
                Frame::Heartbeat(_) => {}
                Frame::Error(e) => {
                    warn!(server = server.0, code = ?e.code, detail = %e.detail, "error frame from server")
                }
                other => {
                    let detail = format!("unexpected {} frame from an app server", other.kind());
                    self.protocol_error(conn, &detail);
                    break;
                }
            }
        }
        if let Some(upto) = last_ack
            && self.links.contains_key(&conn)
        {
            self.ack(conn, server, upto);
        }
        if !failures.is_empty() {
            for f in &failures {
                debug!(id = %f.id, target = f.server.0, status = f.status.as_str(), "905 target refused");
            }
            self.report(failures);
        }
    }

    /// One 905 from `server`'s link. Returns false when the link was closed.
    fn forward(
        &mut self,
        conn: ConnId,
        server: ServerId,
        epoch: u64,
        fwd: Forward905,
        failures: &mut Vec<ReportEntry>,
    ) -> bool {
        if self.draining.is_some() {
            // The origin keeps the 905 and sends it again to whichever
            // exchange it reaches next.
            return true;
        }
        if let Err(r) = split::validate(&fwd, server, epoch, self.cfg.id, &self.cfg.split) {
            if r.is_forgery() {
                let code = ErrorCode::ForgedSource;
                let detail = r.to_string();
                if let Some(link) = self.links.get_mut(&conn) {
                    // Best effort: the close reason carries the same text.
                    let f = Frame::Error(ErrorFrame {
                        code,
                        detail: detail.clone(),
                    });
                    if let Some(b) = frame_bytes(&f, self.cfg.max_frame) {
                        link.pending.add(&b);
                    }
                    self.flag(conn);
                }
                self.refuse(conn, r.kind(), code, &detail);
                return false;
            }
            self.metrics.rejections.inc(r.kind());
            warn!(id = %fwd.id, reason = %r, "905 refused");
            let mut servers: Vec<ServerId> = fwd.rows.iter().map(|r| r.server).collect();
            servers.sort();
            servers.dedup();
            failures.extend(servers.into_iter().map(|s| ReportEntry {
                id: fwd.id,
                server: s,
                status: DeliveryStatus::Refused,
            }));
            return true;
        }
        self.metrics.forwards_in.inc();
        debug!(id = %fwd.id, rows = fwd.rows.len(), "905 in");
        let id = fwd.id;
        for (target, d) in split::split(fwd) {
            let seq = d.seq;
            let status = match self.refused_before(server, id, target, seq) {
                Some(first) => {
                    self.metrics.repeated_refusals.inc();
                    Some(first)
                }
                None => self.offer(target, d).inspect(|status| {
                    self.remember_refusal(id, target, seq, *status);
                }),
            };
            if let Some(status) = status {
                failures.push(ReportEntry {
                    id,
                    server: target,
                    status,
                });
            }
        }
        true
    }

    /// What the first attempt of `id`'s 906 for `target` was told, if it
    /// was refused (the origin sends the 905 again without having heard).
    fn refused_before(
        &self,
        origin: ServerId,
        id: MessageId,
        target: ServerId,
        seq: u64,
    ) -> Option<DeliveryStatus> {
        if self.refusals == 0 {
            return None;
        }
        self.routes.get(&origin)?.refused.get(id, target, seq)
    }

    fn remember_refusal(
        &mut self,
        id: MessageId,
        target: ServerId,
        seq: u64,
        status: DeliveryStatus,
    ) {
        let now = self.now;
        if let Some(r) = self.routes.get_mut(&id.origin) {
            let change = r.refused.remember(id, target, seq, status, now);
            self.refusals = self.refusals.saturating_add_signed(change);
        }
    }

    /// Report undelivered 906s taken out of `target`'s queue, and remember
    /// what their origins were told.
    fn report_dropped(&mut self, dropped: Vec<Dropped>, target: ServerId, status: DeliveryStatus) {
        for d in &dropped {
            self.remember_refusal(d.id, target, d.seq, status);
        }
        self.report(
            dropped
                .into_iter()
                .map(|d| ReportEntry {
                    id: d.id,
                    server: target,
                    status,
                })
                .collect(),
        );
    }

    /// Queue one 906 for its target. The status to report at once when it
    /// cannot be queued.
    fn offer(&mut self, target: ServerId, d: Deliver906) -> Option<DeliveryStatus> {
        let Some(route) = self.routes.get_mut(&target) else {
            return Some(DeliveryStatus::UnknownServer);
        };
        if route.state == RouteState::Down {
            return Some(DeliveryStatus::ServerDown);
        }
        match route.queue.push(d) {
            Ok(_) => {
                self.metrics.queued.add(1);
                if let Some(conn) = route.conn {
                    self.flag(conn);
                }
                None
            }
            Err(e) => {
                debug!(target = target.0, error = %e, queued = route.queue.len(), max_frame = route.queue.max_frame(), "906 not queued");
                self.metrics.rejections.inc(match e {
                    PushError::Full => "overloaded",
                    PushError::Oversized => "oversized_frame",
                });
                Some(DeliveryStatus::Overloaded)
            }
        }
    }

    fn ack(&mut self, conn: ConnId, server: ServerId, upto: u64) {
        let Some(route) = self
            .routes
            .get_mut(&server)
            .filter(|r| r.conn == Some(conn))
        else {
            return;
        };
        match route.queue.handle_ack(upto) {
            Ok(ids) => {
                self.metrics.acks_in.add(ids.len() as u64);
                self.metrics.queued.add(-(ids.len() as i64));
                self.report(entries(ids, server, DeliveryStatus::Delivered));
                self.check_drained(server);
            }
            Err(e) => {
                warn!(server = server.0, error = %e, "protocol violation");
                self.refuse(conn, "protocol", ErrorCode::Protocol, &e.to_string());
            }
        }
    }

    /// The link's reader ended.
    pub fn handle_end(&mut self, conn: ConnId, end: LinkEnd, now: Instant) {
        self.now = now;
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        let registered = matches!(link.state, LinkState::Attached { .. });
        match end {
            LinkEnd::Closed { clean, detail } => {
                info!(conn = conn.0, error = %detail, clean, "link closed");
                self.forget(conn, clean);
            }
            LinkEnd::Finished => {
                info!(conn = conn.0, "link finished by the server");
                self.forget(conn, false);
            }
            LinkEnd::Malformed(w) => self.refuse(
                conn,
                w.kind(),
                ErrorCode::for_wire_error(&w),
                &w.to_string(),
            ),
            LinkEnd::Stream(detail) if registered => self.refuse(
                conn,
                "protocol",
                ErrorCode::Protocol,
                &format!("stream: {detail}"),
            ),
            LinkEnd::Stream(detail) => self.refuse(
                conn,
                "not_registered",
                ErrorCode::NotRegistered,
                &format!("no stream: {detail}"),
            ),
        }
    }

    /// The registry answered question `id`.
    pub fn handle_answer(&mut self, id: AskId, answer: Answer, now: Instant) {
        self.now = now;
        let Some(asked) = self.asked.remove(&id) else {
            return;
        };
        match (asked, answer) {
            (Asked::Registration(conn), Answer::Registration(r)) => self.registration(conn, r),
            (
                Asked::MarkDown {
                    server,
                    epoch,
                    why,
                    failed,
                },
                Answer::Done(r),
            ) => match r {
                Ok(()) => info!(server = server.0, epoch, why, failed, "server marked down"),
                Err(e) => {
                    error!(server = server.0, error = %e.0, why, "could not mark server down in the registry")
                }
            },
            (Asked::Sweep, Answer::AppServers(r)) => {
                self.sweeping = false;
                match r {
                    Ok(rows) => self.swept(rows),
                    Err(e) => warn!(error = %e.0, "registry unavailable for the sweep"),
                }
            }
            (Asked::Touch, Answer::Done(r)) => {
                if let Err(e) = r {
                    warn!(error = %e.0, "could not refresh last_seen");
                }
            }
            (asked, answer) => {
                // A shell bug, not a peer's: say so, and clear what waited.
                error!(?asked, ?answer, "registry answer of the wrong kind");
                self.give_up(asked);
            }
        }
    }

    /// A question will not be answered (in time): let go of what waited.
    fn give_up(&mut self, asked: Asked) {
        match asked {
            Asked::Registration(conn) => self.refuse(
                conn,
                "registry_error",
                ErrorCode::Internal,
                "registry unavailable",
            ),
            Asked::Sweep => self.sweeping = false,
            Asked::MarkDown { .. } | Asked::Touch => {}
        }
    }

    fn registration(&mut self, conn: ConnId, r: Result<Registration, RegistryFailure>) {
        let Some(LinkState::Registering {
            server,
            epoch,
            max_frame,
            ..
        }) = self.links.get(&conn).map(|l| &l.state)
        else {
            return;
        };
        let (server, epoch, max_frame) = (*server, *epoch, *max_frame);
        match r {
            Ok(Registration::Accepted) => self.attach(conn, server, epoch, max_frame),
            Ok(Registration::StaleEpoch { current }) => self.refuse(
                conn,
                "stale_epoch",
                ErrorCode::StaleEpoch,
                &format!("epoch {epoch} is not the registry's current epoch {current}"),
            ),
            Ok(Registration::Unknown) => self.refuse(
                conn,
                "unknown_server",
                ErrorCode::UnknownServer,
                &format!("server {server} is not in the registry"),
            ),
            Ok(Registration::WrongRole) => self.refuse(
                conn,
                "wrong_role",
                ErrorCode::IdentityMismatch,
                &format!("server {server} is not an app server"),
            ),
            Err(e) => {
                error!(server = server.0, error = %e.0, "registry unavailable during registration");
                self.refuse(
                    conn,
                    "registry_error",
                    ErrorCode::Internal,
                    "registry unavailable",
                )
            }
        }
    }

    fn attach(&mut self, conn: ConnId, server: ServerId, epoch: u64, max_frame: usize) {
        if self.draining.is_some() {
            return self.close(
                conn,
                ErrorCode::ShuttingDown.close_code(),
                "exchange is stopping",
            );
        }
        if !self.routes.contains_key(&server) {
            let mut route = self.new_route(epoch);
            route.state = RouteState::Up;
            self.routes.insert(server, route);
        }
        let route = self.routes.get_mut(&server).expect("route inserted above");
        if epoch < route.epoch {
            return self.refuse(
                conn,
                "stale_epoch",
                ErrorCode::StaleEpoch,
                "a newer incarnation is registered",
            );
        }
        if epoch > route.epoch {
            // A new incarnation: what was owed to the old one is
            // undeliverable (its connections are gone).
            let old = route.queue.drain();
            route.epoch = epoch;
            // Reports owed to the old incarnation mean nothing to this one.
            self.metrics.reports_dropped.add(route.reports.len() as u64);
            route.reports = Vec::new();
            self.metrics.queued.add(-(old.len() as i64));
            self.report_dropped(old, server, DeliveryStatus::ServerDown);
        }
        let route = self.routes.get_mut(&server).expect("route exists");
        match route.conn.take() {
            Some(old) => self.close(
                old,
                ErrorCode::Protocol.close_code(),
                "replaced by a newer link",
            ),
            None => {
                self.attached += 1;
                self.metrics.links.add(1);
            }
        }
        let route = self.routes.get_mut(&server).expect("route exists");
        let too_big = route.queue.set_max_frame(max_frame.min(self.cfg.max_frame));
        route.queue.on_disconnect();
        route.conn = Some(conn);
        route.state = RouteState::Up;
        route.lease_gen += 1;
        let queued = route.queue.len();
        if !too_big.is_empty() {
            warn!(
                server = server.0,
                count = too_big.len(),
                max_frame,
                "906s larger than the server accepts"
            );
            self.metrics
                .rejections
                .add("oversized_frame", too_big.len() as u64);
            self.metrics.queued.add(-(too_big.len() as i64));
            self.report_dropped(too_big, server, DeliveryStatus::Overloaded);
        }
        let early = match self.links.get_mut(&conn).map(|l| &mut l.state) {
            Some(state @ LinkState::Registering { .. }) => {
                match std::mem::replace(state, LinkState::Attached { server, epoch }) {
                    LinkState::Registering { early, .. } => early,
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        let reply = Frame::Registered(Registered {
            exchange: self.cfg.id,
            exchange_epoch: self.cfg.epoch,
            lease_ms: self.cfg.lease.as_millis().min(u32::MAX as u128) as u32,
            max_frame: self.cfg.max_frame as u32,
        });
        if let (Some(b), Some(link)) = (
            frame_bytes(&reply, self.cfg.max_frame),
            self.links.get_mut(&conn),
        ) {
            link.pending.add(&b);
        }
        self.flag(conn);
        info!(server = server.0, epoch, queued, "server attached");
        if !early.is_empty() {
            self.attached_frames(conn, server, epoch, early);
        }
    }

    /// Time passed: leases, handshakes, the sweep, the end of a drain.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                Timer::Lease(server, generation) => {
                    if let Some(r) = self.routes.get(&server)
                        && r.state == RouteState::Disconnected
                        && r.lease_gen == generation
                    {
                        self.mark_down(server, "lease expired");
                    }
                }
                Timer::Handshake(conn) => {
                    if self
                        .links
                        .get(&conn)
                        .is_some_and(|l| !matches!(l.state, LinkState::Attached { .. }))
                    {
                        warn!(conn = conn.0, "no registration in time");
                        self.refuse(
                            conn,
                            "handshake_timeout",
                            ErrorCode::NotRegistered,
                            "no register frame in time",
                        );
                    }
                }
                Timer::Ask(id) => {
                    if let Some(asked) = self.asked.remove(&id) {
                        warn!(?asked, "no answer from the registry in time");
                        self.give_up(asked);
                    }
                }
                Timer::Sweep => {
                    if self.refusals > 0 {
                        let mut expired = 0;
                        for r in self.routes.values_mut() {
                            expired += r.refused.expire(now);
                        }
                        self.refusals -= expired;
                    }
                    if self.draining.is_none() {
                        if !self.sweeping {
                            self.sweeping = true;
                            let id = self.ask(Query::AppServers);
                            self.asked.insert(id, Asked::Sweep);
                        }
                        self.timers.add(now + self.cfg.sweep_period, Timer::Sweep);
                    }
                }
                Timer::Drain => {
                    let conns: Vec<ConnId> = self.links.keys().copied().collect();
                    for conn in conns {
                        self.close(conn, CLOSE_GOING_AWAY, "exchange shutting down");
                    }
                    self.maybe_stopped(true);
                }
            }
        }
    }

    /// Begin a graceful shutdown: no new links or 905s; queued 906s are
    /// delivered within the grace period, then every link is closed.
    pub fn shutdown(&mut self, now: Instant) {
        self.now = now;
        if self.draining.is_some() {
            return;
        }
        let deadline = now + self.cfg.grace;
        self.draining = Some(deadline);
        self.timers.add(deadline, Timer::Drain);
        let unattached: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| !matches!(l.state, LinkState::Attached { .. }))
            .map(|(c, _)| *c)
            .collect();
        for conn in unattached {
            self.close(
                conn,
                ErrorCode::ShuttingDown.close_code(),
                "exchange is stopping",
            );
        }
        let servers: Vec<ServerId> = self.routes.keys().copied().collect();
        for s in servers {
            self.check_drained(s);
        }
        self.maybe_stopped(false);
    }

    // ----- internals -----------------------------------------------------

    fn ask(&mut self, query: Query) -> AskId {
        let id = AskId(self.next_ask);
        self.next_ask += 1;
        self.timers
            .add(self.now + self.cfg.ask_timeout, Timer::Ask(id));
        self.outputs.push_back(Output::Ask { id, query });
        id
    }

    fn flag(&mut self, conn: ConnId) {
        if let Some(link) = self.links.get_mut(&conn)
            && !link.flagged
        {
            link.flagged = true;
            self.outputs.push_back(Output::Transmit(conn));
        }
    }

    /// Close a link for something its peer did: count it, say why.
    fn refuse(&mut self, conn: ConnId, reason: &'static str, code: ErrorCode, detail: &str) {
        if !self.links.contains_key(&conn) {
            return;
        }
        self.metrics.rejections.inc(reason);
        warn!(conn = conn.0, reason, %detail, "link refused");
        self.close(conn, code.close_code(), detail);
    }

    fn protocol_error(&mut self, conn: ConnId, detail: &str) {
        self.refuse(conn, "protocol", ErrorCode::Protocol, detail)
    }

    /// Close and forget a link; its route (if it was attached) is
    /// disconnected and its lease starts.
    fn close(&mut self, conn: ConnId, code: u32, reason: &str) {
        if !self.links.contains_key(&conn) {
            return;
        }
        self.outputs.push_back(Output::Close {
            conn,
            code,
            reason: reason.chars().take(512).collect(),
        });
        self.forget(conn, false);
    }

    /// The link is gone; `clean` when its server left on purpose.
    fn forget(&mut self, conn: ConnId, clean: bool) {
        let now = self.now;
        let Some(link) = self.links.remove(&conn) else {
            return;
        };
        let LinkState::Attached { server, .. } = link.state else {
            self.maybe_stopped(false);
            return;
        };
        let lease = self.cfg.lease;
        if let Some(route) = self.routes.get_mut(&server)
            && route.conn == Some(conn)
        {
            route.conn = None;
            self.attached -= 1;
            self.metrics.links.add(-1);
            route.queue.on_disconnect();
            if clean {
                self.mark_down(server, "closed by the server");
            } else {
                info!(
                    server = server.0,
                    lease_ms = lease.as_millis() as u64,
                    "link lost; lease running"
                );
                route.state = RouteState::Disconnected;
                route.lease_gen += 1;
                let generation = route.lease_gen;
                self.timers
                    .add(now + lease, Timer::Lease(server, generation));
            }
        }
        self.maybe_stopped(false);
    }

    fn mark_down(&mut self, server: ServerId, why: &'static str) {
        let Some(route) = self.routes.get_mut(&server) else {
            return;
        };
        route.state = RouteState::Down;
        route.lease_gen += 1;
        // Reports it was owed as an origin go nowhere now.
        self.metrics.reports_dropped.add(route.reports.len() as u64);
        route.reports = Vec::new();
        let epoch = route.epoch;
        let left = route.queue.drain();
        let failed = left.len();
        self.metrics.queued.add(-(failed as i64));
        self.report_dropped(left, server, DeliveryStatus::ServerDown);
        self.metrics.marked_down.inc();
        let id = self.ask(Query::MarkDown { server, epoch });
        self.asked.insert(
            id,
            Asked::MarkDown {
                server,
                epoch,
                why,
                failed,
            },
        );
    }

    /// Send report entries to their origins. An origin that is not
    /// connected or not keeping up loses them; it retransmits the 905 or
    /// reports a timeout, so nothing is lost silently.
    fn report(&mut self, entries: Vec<ReportEntry>) {
        let Some(first) = entries.first() else {
            return;
        };
        // Usually every entry has the same origin: no regrouping then.
        let origin = first.id.origin;
        if entries.iter().all(|e| e.id.origin == origin) {
            return self.report_to(origin, entries);
        }
        let mut by_origin: BTreeMap<ServerId, Vec<ReportEntry>> = BTreeMap::new();
        for e in entries {
            by_origin.entry(e.id.origin).or_default().push(e);
        }
        for (origin, entries) in by_origin {
            self.report_to(origin, entries);
        }
    }

    fn report_to(&mut self, origin: ServerId, mut entries: Vec<ReportEntry>) {
        let n = entries.len();
        let conn = match self.routes.get_mut(&origin) {
            Some(r) if r.conn.is_some() && r.reports.len() + n <= MAX_PENDING_REPORTS => {
                r.reports.append(&mut entries);
                r.conn
            }
            _ => {
                self.metrics.reports_dropped.add(n as u64);
                None
            }
        };
        if let Some(conn) = conn {
            self.flag(conn);
        }
    }

    fn swept(&mut self, rows: Vec<AppServerRow>) {
        let mut touch = vec![(self.cfg.id, self.cfg.epoch)];
        for s in rows {
            match self.routes.get(&s.id) {
                Some(r) if r.state == RouteState::Up => touch.push((s.id, s.epoch)),
                Some(_) => {}
                None => {
                    let route = self.new_route(s.epoch);
                    self.routes.insert(s.id, route);
                }
            }
        }
        let id = self.ask(Query::Touch(touch));
        self.asked.insert(id, Asked::Touch);
    }

    /// Shutting down: a route whose 906s are all acknowledged and whose
    /// reports are written closes its link.
    fn check_drained(&mut self, server: ServerId) {
        if self.draining.is_none() {
            return;
        }
        let Some(route) = self.routes.get(&server) else {
            return;
        };
        if let Some(conn) = route.conn
            && route.queue.is_empty()
            && route.reports.is_empty()
        {
            self.close(conn, CLOSE_GOING_AWAY, "exchange shutting down");
        }
    }

    fn maybe_stopped(&mut self, deadline_passed: bool) {
        if self.stopped || self.draining.is_none() || !self.links.is_empty() {
            return;
        }
        let undelivered: usize = self.routes.values().map(|r| r.queue.len()).sum();
        if undelivered > 0 && !deadline_passed {
            return;
        }
        if undelivered > 0 {
            // Not reported: the origins keep the 905s outstanding and send
            // them again through the next exchange they reach.
            info!(undelivered, "left for the origins to resend");
            for r in self.routes.values_mut() {
                let left = r.queue.drain();
                self.metrics.queued.add(-(left.len() as i64));
            }
        }
        self.stopped = true;
        self.outputs.push_back(Output::Stopped);
    }
}

fn entries(ids: Vec<MessageId>, server: ServerId, status: DeliveryStatus) -> Vec<ReportEntry> {
    ids.into_iter()
        .map(|id| ReportEntry { id, server, status })
        .collect()
}
