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

mod links;
pub mod metrics;
mod peers;
pub mod queue;
pub mod refusals;
mod routes;
pub mod split;

pub use metrics::ExchangeMetrics;

use crate::Map;
pub use crate::RegistryFailure;
use crate::{AskId, ConnId, Timers};
use bytes::Bytes;
use iim_proto::coalesce::{Coalescer, frame_bytes, report_bytes};
use iim_proto::types::{MessageId, ServerId};
use iim_proto::wire::{
    CLOSE_GOING_AWAY, Deliver906, DeliveryStatus, ErrorCode, ErrorFrame, Forward905, Frame,
    Register, Registered, ReportEntry, WireError,
};
use peers::Peer;
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
    /// The lease a restarted exchange gives each server it served before
    /// (attached here and not down in the registry) to come back: at least
    /// `lease` plus the QUIC idle timeout ([`Config::rejoin_for`]). Such a
    /// server may notice the old exchange is gone only after the idle
    /// timeout, and must not be marked down (its sessions deleted) for
    /// reconnecting a moment after one plain lease.
    pub rejoin: Duration,
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

    /// The rejoin lease the daemon uses: the lease plus the QUIC idle
    /// timeout. An app server reconnects within half a lease of noticing
    /// (its connection attempts and backoff are bounded by a quarter of the
    /// lease each), and notices within the idle timeout.
    pub fn rejoin_for(lease: Duration, idle_timeout: Duration) -> Duration {
        lease + idle_timeout
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
    /// The fence of that attachment (bumped by every recorded
    /// registration).
    pub attach_epoch: u64,
    /// Its state is `down`.
    pub down: bool,
}

/// What the registry says of one exchange (this one included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeRow {
    pub id: ServerId,
    pub epoch: u64,
    /// Its state is `up`.
    pub up: bool,
    /// Where it listens (for the shell; the core only passes it on).
    pub address: String,
}

/// The registry's verdict on a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// Recorded, under this attach epoch (bumped by every recorded
    /// registration): a later mark-down naming it changes nothing once the
    /// server has registered again, here or elsewhere.
    Accepted { attach_epoch: u64 },
    /// The claimed epoch is not the registry's current one.
    StaleEpoch { current: u64 },
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
    /// The incarnation is gone: mark it down and delete its sessions, but
    /// only while it is still attached here under `attach_epoch` (the
    /// attachment this exchange recorded, or read at start or in a sweep).
    /// A server that has since registered again, here or with another
    /// exchange, is left alone. (`None`, guarded only by the row naming
    /// this exchange, is not asked by the core any more: it cannot tell a
    /// new attachment here from the old one.) Answered by
    /// [`Answer::MarkedDown`].
    MarkDown {
        server: ServerId,
        epoch: u64,
        attach_epoch: Option<u64>,
    },
    /// Every app server the registry knows; answered by
    /// [`Answer::AppServers`].
    AppServers,
    /// Every exchange the registry knows; answered by [`Answer::Exchanges`].
    Exchanges,
    /// Refresh `last_seen` of these incarnations (this exchange's first);
    /// answered by [`Answer::Done`].
    Touch(Vec<(ServerId, u64)>),
    /// The peer exchanges this one has a live link to now, replacing what
    /// it recorded before (for operators: `iimctl servers`), unless a
    /// recording with a higher `(epoch, seq)` (this exchange's epoch, a
    /// count of its recordings) is there already: a recording given up on
    /// may still land late, and must not undo a newer one. Asked when the
    /// set differs from the last one recorded; answered by
    /// [`Answer::Done`].
    RecordLinks {
        peers: Vec<ServerId>,
        epoch: u64,
        seq: u64,
    },
}

/// The registry's answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Registration(Result<Registration, RegistryFailure>),
    AppServers(Result<Vec<AppServerRow>, RegistryFailure>),
    Exchanges(Result<Vec<ExchangeRow>, RegistryFailure>),
    /// Whether the mark-down changed the row (false: the server has a newer
    /// incarnation or attachment than the one named).
    MarkedDown(Result<bool, RegistryFailure>),
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
    /// Open a peer link to exchange `peer` at `address` (this exchange has
    /// the lower id), then call [`Exchange::peer_dialed`] with the new
    /// connection, or [`Exchange::dial_failed`].
    Dial { peer: ServerId, address: String },
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
    /// Attached to another exchange: its 906s are relayed there.
    Elsewhere,
    /// Named by a 905 but not known here yet (registered a moment ago,
    /// perhaps with another exchange): its 906s wait for the registry's
    /// answer, asked at once; with no row there they are `unknown_server`.
    Looking,
}

/// Most servers looked up in the registry at once; a 905 naming more
/// unknown servers gets `unknown_server` for the rest at once.
pub const MAX_LOOKING: usize = 256;

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
    /// The newest attach epoch this exchange knows for it: of the last
    /// registration it recorded itself, or learnt from a peer or the
    /// registry (none for a route rebuilt from the registry at start).
    attach_epoch: Option<u64>,
    /// The exchange it is attached to, when that is another one (state
    /// `Elsewhere`).
    at: Option<ServerId>,
    /// Its lease ended and the registry was asked to mark it down; until
    /// the answer, it is still routable (a server that moved to another
    /// exchange is not down).
    marking: bool,
    /// The highest attach epoch seen for it from any source (the registry
    /// at start, a sweep, a peer, a registration): a claim about where it
    /// is attached is believed only above this.
    newest_attach: u64,
    /// `newest_attach` when this exchange last took it down: a read that
    /// still shows it attached here under that number is behind, not a
    /// registration this exchange missed.
    down_attach: u64,
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
    /// A peer link this exchange dialled, waiting for the peer's
    /// `PeerHello`.
    PeerDialed {
        peer: ServerId,
    },
    /// A peer link (either direction) after both hellos.
    Peer {
        peer: ServerId,
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
        /// The route went down when asked (a clean close), with this many
        /// 906s failed; else it goes down only if the registry agrees.
        failed: Option<usize>,
    },
    Sweep,
    Exchanges,
    Touch,
    RecordLinks(Vec<ServerId>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Lease(ServerId, u64),
    Handshake(ConnId),
    Ask(AskId),
    Sweep,
    Drain,
    /// A dial not reported back in time.
    Dial(ServerId),
}

/// The exchange core. See the module documentation.
pub struct Exchange {
    cfg: Config,
    routes: Map<ServerId, Route>,
    links: Map<ConnId, Link>,
    /// The other exchanges: their links and what is relayed to them.
    peers: Map<ServerId, Peer>,
    /// 906s queued here that peers relayed: the peers their outcome goes
    /// back to (usually one; more when an origin moved and its new exchange
    /// relayed the message again), by (message, target).
    relayed: Map<(MessageId, ServerId), peers::Askers>,
    /// Links attached to a route.
    attached: usize,
    /// Refusals remembered over every route (none: no look-up per 905).
    refusals: usize,
    /// Routes in state `Looking`.
    looking: usize,
    asked: Map<AskId, Asked>,
    next_ask: u64,
    sweeping: bool,
    /// The peer links last recorded in the registry (`None`: unknown —
    /// nothing recorded since start, or a recording failed or went
    /// unanswered and may still land), and whether one is in flight.
    links_recorded: Option<Vec<ServerId>>,
    recording_links: bool,
    /// Recordings of the links asked so far (their `seq`).
    links_seq: u64,
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
    /// down) get the rejoin lease to come back; every other one is routable
    /// as down.
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
            peers: Map::default(),
            relayed: Map::default(),
            attached: 0,
            refusals: 0,
            looking: 0,
            asked: Map::default(),
            next_ask: 1,
            sweeping: false,
            links_recorded: None,
            recording_links: false,
            links_seq: 0,
            timers: Timers::default(),
            outputs: VecDeque::new(),
            draining: None,
            stopped: false,
            now,
            metrics,
        };
        for s in known {
            let ours = s.exchange == Some(ex.cfg.id) && !s.down;
            let elsewhere = s.exchange.filter(|x| *x != ex.cfg.id && !s.down);
            let route = ex.new_route(s.epoch);
            let route = ex.routes.entry(s.id).or_insert(route);
            route.newest_attach = s.attach_epoch;
            if let Some(at) = elsewhere {
                route.state = RouteState::Elsewhere;
                route.at = Some(at);
            }
            if ours {
                // The attachment as read at start (a read that may be
                // behind: then the mark-down fails the fence, the sweep
                // reads the row again and the next one names it right).
                route.attach_epoch = Some(s.attach_epoch);
                route.state = RouteState::Disconnected;
                route.lease_gen += 1;
                ex.timers
                    .add(now + ex.cfg.rejoin, Timer::Lease(s.id, route.lease_gen));
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
            attach_epoch: None,
            at: None,
            marking: false,
            newest_attach: 0,
            down_attach: 0,
        }
    }

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

    /// The exchange `server` is attached to, as this one believes, and the
    /// attach epoch that belief rests on: this exchange's own id while the
    /// route is here (up or disconnected).
    pub fn route_place(&self, server: ServerId) -> Option<(ServerId, Option<u64>)> {
        let r = self.routes.get(&server)?;
        match r.state {
            RouteState::Up | RouteState::Disconnected => Some((self.cfg.id, r.attach_epoch)),
            RouteState::Elsewhere => r.at.map(|x| (x, Some(r.newest_attach))),
            RouteState::Down | RouteState::Looking => None,
        }
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
        let server = match link.state {
            LinkState::Attached { server, .. } => server,
            LinkState::Peer { peer } => {
                self.peer_transmit(conn, peer, max_bytes, &mut out);
                if self.draining.is_some() {
                    self.maybe_stopped(false);
                }
                return out;
            }
            _ => return out,
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
                out.extend(report_bytes(chunk, max_frame));
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

    /// Time passed: leases, handshakes, the sweep, the end of a drain.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                Timer::Lease(server, generation) => {
                    if let Some(r) = self.routes.get(&server)
                        && r.state == RouteState::Disconnected
                        && r.lease_gen == generation
                        && !r.marking
                    {
                        self.lease_ended(server);
                    }
                }
                Timer::Handshake(conn) => {
                    if self.links.get(&conn).is_some_and(|l| {
                        !matches!(l.state, LinkState::Attached { .. } | LinkState::Peer { .. })
                    }) {
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
                        self.check_unreachable();
                        self.sweep_now();
                        self.record_links();
                        self.timers.add(now + self.cfg.sweep_period, Timer::Sweep);
                    }
                }
                Timer::Dial(peer) => self.dial_timed_out(peer),
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
        // Links to app servers not registered yet go now. Peer links stay
        // until what was relayed either way is answered (`maybe_stopped`):
        // an outcome owed to a peer and lost with the link would leave the
        // peer to resend a refused 906 after later ones were delivered.
        let unattached: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                !matches!(
                    l.state,
                    LinkState::Attached { .. }
                        | LinkState::Peer { .. }
                        | LinkState::PeerDialed { .. }
                )
            })
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

    fn ask(&mut self, query: Query) -> AskId {
        let id = AskId(self.next_ask);
        self.next_ask += 1;
        self.timers
            .add(self.now + self.cfg.ask_timeout, Timer::Ask(id));
        self.outputs.push_back(Output::Ask { id, query });
        id
    }

    /// Ask the registry for every app server and exchange now (unless a
    /// sweep is in flight).
    fn sweep_now(&mut self) {
        if !self.sweeping {
            self.sweeping = true;
            let id = self.ask(Query::AppServers);
            self.asked.insert(id, Asked::Sweep);
            let id = self.ask(Query::Exchanges);
            self.asked.insert(id, Asked::Exchanges);
        }
    }

    fn flag(&mut self, conn: ConnId) {
        if let Some(link) = self.links.get_mut(&conn)
            && !link.flagged
        {
            link.flagged = true;
            self.outputs.push_back(Output::Transmit(conn));
        }
    }
}

fn entries(ids: Vec<MessageId>, server: ServerId, status: DeliveryStatus) -> Vec<ReportEntry> {
    ids.into_iter()
        .map(|id| ReportEntry { id, server, status })
        .collect()
}
