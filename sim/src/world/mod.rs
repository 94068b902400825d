//! The simulated deployment: one to three exchange cores and N app-server
//! link cores on a virtual clock, joined by a network of ordered byte
//! pipes (app server to exchange, exchange to exchange), a model of the
//! registry, and a seeded schedule of sends and faults.
//!
//! Everything the daemons' IO shells do is done here instead, in memory:
//! bytes a core hands out are delivered to the other side after a latency
//! (in order, possibly split), decoded with the real codec and fed in;
//! registry questions are answered from a model of the `servers` table,
//! late, with an error, or not at all; connections die when a process
//! crashes or a link is cut, each side noticing after the QUIC idle
//! timeout. One [`crate::rng::Rng`] makes every choice, so a run is a
//! function of its seed.

mod chaos;
mod end;
mod net;
mod nodes;
mod peers;
mod registry;

use crate::oracle::{Oracle, SendRec};
use crate::rng::Rng;
use bytes::{Bytes, BytesMut};
use iim_core::exchange::{
    self, Answer, AppServerRow, Exchange, ExchangeMetrics, LinkEnd, Query, Registration, RouteState,
};
use iim_core::link::{self, ExchangeRow, Link, LinkDown, LinkMetrics};
use iim_core::origin::Origin;
use iim_core::{AskId, ConnId, RegistryFailure};
use iim_proto::types::{Address, ChannelId, MessageId, ServerId, UserId};
use iim_proto::wire::{
    self, CLOSE_GOING_AWAY, DeliveryStatus, Frame, HEADER_LEN, Message, Timing, UserRow,
};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first exchange's id in every run (the others follow it).
pub const EXCHANGE: ServerId = ServerId(100);
/// An exchange row not refreshed for this long is taken for a dead
/// exchange's (as the app server's shell does).
const EXCHANGE_STALE: Duration = Duration::from_secs(10);
/// A server id no registry row has.
const STRANGER: ServerId = ServerId(99);

/// The shape of one run, drawn from its seed.
#[derive(Clone, Debug)]
pub struct Params {
    pub servers: usize,
    /// Exchanges; app server `i` prefers exchange `i % exchanges`.
    pub exchanges: usize,
    pub lease: Duration,
    /// QUIC's idle timeout: how long each side takes to notice a dead
    /// connection.
    pub idle: Duration,
    pub latency_ms: (u64, u64),
    pub send_timeout: Duration,
    pub max_outstanding: usize,
    pub queue_max_frames: usize,
    pub queue_max_bytes: usize,
    pub ex_max_frame: usize,
    /// Per app server: its own frame limit.
    pub app_max_frame: Vec<usize>,
    /// App servers have the exchange's address in their config (else they
    /// ask the registry at every attempt).
    pub fixed_address: bool,
    /// How long faults are injected.
    pub chaos: Duration,
    /// Mean gap between two bursts of sends.
    pub send_gap_ms: u64,
    /// Mean gap between two faults.
    pub fault_gap_ms: u64,
    /// Probability that a registry answer is lost (the change it made may
    /// still have happened).
    pub registry_drop: f64,
}

/// Seeds with this bit set always run two or three exchanges (the others
/// run one in two fifths of the seeds). The bit is part of the seed, so
/// `SEED=<n>` replays such a run like any other.
pub const FEDERATED: u64 = 1 << 40;

impl Params {
    /// `federated`: two or three exchanges, never one.
    pub fn draw(rng: &mut Rng, federated: bool) -> Params {
        let servers = rng.range(2, 6) as usize;
        let small_queues = rng.chance(0.25);
        let exchanges = if !federated && rng.chance(0.4) {
            1
        } else {
            rng.range(2, 4) as usize
        };
        Params {
            servers,
            exchanges,
            lease: rng.millis(800, 3_000),
            idle: rng.millis(300, 1_200),
            latency_ms: (1, rng.range(2, 30)),
            send_timeout: rng.millis(8_000, 25_000),
            max_outstanding: if rng.chance(0.25) {
                rng.range(2, 16) as usize
            } else {
                4_096
            },
            queue_max_frames: if small_queues {
                rng.range(2, 24) as usize
            } else {
                65_536
            },
            queue_max_bytes: if small_queues { 8 * 1024 } else { 64 << 20 },
            ex_max_frame: if rng.chance(0.2) { 2_048 } else { 1 << 20 },
            app_max_frame: (0..servers)
                .map(|_| if rng.chance(0.15) { 1_500 } else { 1 << 20 })
                .collect(),
            fixed_address: exchanges == 1 && rng.chance(0.3),
            chaos: rng.millis(5_000, 20_000),
            send_gap_ms: rng.range(5, 60),
            fault_gap_ms: rng.range(300, 3_000),
            registry_drop: if rng.chance(0.3) { 0.02 } else { 0.0 },
        }
    }
}

/// What a run did, for the summary line.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: u64,
    pub sends: u64,
    pub deliveries: u64,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub faults: BTreeMap<&'static str, u64>,
    pub virtual_ms: u64,
}

#[derive(Debug)]
enum Ev {
    Sends,
    Chaos,
    Quiet,
    FinalRound,
    FinalSend {
        app: usize,
    },
    End,
    ToEx {
        conn: u64,
        bytes: Bytes,
    },
    ToApp {
        conn: u64,
        bytes: Bytes,
    },
    CloseToEx {
        conn: u64,
        clean: bool,
    },
    CloseToApp {
        conn: u64,
        code: u64,
        reason: String,
    },
    IdleEx {
        conn: u64,
    },
    IdleApp {
        conn: u64,
    },
    Connected {
        app: usize,
        life: u64,
        link: ConnId,
        x: usize,
    },
    ConnectFailed {
        app: usize,
        life: u64,
        link: ConnId,
    },
    ExAnswer {
        x: usize,
        life: u64,
        id: AskId,
        query: Query,
    },
    AppAnswer {
        app: usize,
        life: u64,
        ask: AskId,
    },
    Writable {
        x: usize,
        life: u64,
        conn: ConnId,
    },
    RestartApp {
        app: usize,
    },
    RestartEx {
        x: usize,
    },
    /// A dial from exchange `x` reached exchange `to`.
    PeerConnected {
        x: usize,
        life: u64,
        to: usize,
        to_life: u64,
    },
    PeerDialFailed {
        x: usize,
        life: u64,
        peer: ServerId,
    },
    /// Bytes arrive at end `end` (0: the dialer) of peer connection `pc`.
    ToPeer {
        pc: u64,
        end: usize,
        bytes: Bytes,
    },
    /// End `end` of `pc` learns the connection is gone (closed by the
    /// other side, or silent for the idle timeout).
    PeerDown {
        pc: u64,
        end: usize,
    },
    /// A cut between two exchanges heals.
    PeerHeal {
        pair: (usize, usize),
    },
    Heal {
        app: usize,
    },
    RegistryNormal,
}

struct Scheduled {
    at: Instant,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegState {
    Up,
    Down,
}

#[derive(Clone, Debug)]
struct RegRow {
    app: bool,
    epoch: u64,
    state: RegState,
    exchange: Option<ServerId>,
    /// Bumped by every recorded registration.
    attach_epoch: u64,
    address: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegMode {
    Normal,
    Slow,
    Failing,
    /// Reads answer from a copy of the table taken when the trouble began
    /// (a replica behind): old epochs and states in the sweep, an old
    /// exchange address. (Registrations are writes: they see the primary.)
    Stale,
}

/// A server given the rejoin lease by a restarted exchange.
#[derive(Clone, Copy, Debug)]
struct Rejoin {
    epoch: u64,
    /// Cut off, or the registry in trouble, since the exchange started:
    /// being marked down is then no broken promise.
    excused: bool,
}

struct ExNode {
    core: Exchange,
    life: u64,
    port: u16,
    /// Exchange-side connection id -> simulated connection.
    conns: HashMap<ConnId, u64>,
    /// Exchange-side connection id -> peer connection and this side's end.
    peer_conns: HashMap<ConnId, (u64, usize)>,
    /// Each route's incarnation as last checked.
    epochs: BTreeMap<ServerId, u64>,
    /// Each route's state as last checked (for the trace).
    states: BTreeMap<ServerId, RouteSeen>,
}

/// A route's state and place (exchange, attach epoch) as last traced.
type RouteSeen = (RouteState, Option<(ServerId, Option<u64>)>);

/// One exchange of the deployment, running or not.
struct ExSlot {
    id: ServerId,
    node: Option<ExNode>,
    /// The servers its running incarnation gave the rejoin lease (it
    /// served them before it restarted) and that have not registered with
    /// it yet: epoch, and whether a fault since the start excuses a late
    /// return.
    rejoining: BTreeMap<ServerId, Rejoin>,
}

/// One end of a connection between two exchanges.
struct PeerEnd {
    x: usize,
    life: u64,
    conn: ConnId,
    open: bool,
    rx: BytesMut,
    /// When the last bytes sent towards this end arrive.
    last: Instant,
    /// The first frame (the acceptor's: a `PeerHello`) is still to come.
    first: bool,
}

/// A connection between two exchanges: end 0 dialled, end 1 accepted.
struct PeerConn {
    ends: [PeerEnd; 2],
    cut: bool,
}

struct AppInc {
    life: u64,
    link: Link<u64>,
    origin: Origin,
    send_limit: usize,
    /// Link-side connection id -> simulated connection.
    conns: HashMap<ConnId, u64>,
}

struct AppNode {
    id: ServerId,
    inc: Option<AppInc>,
    /// Cut off from the exchange.
    partitioned: bool,
    /// Stopped at the end of the run, never restarted: the exchange must
    /// forget it.
    gone: bool,
}

struct SimConn {
    /// The exchange it connects to.
    x: usize,
    app: usize,
    app_gen: u64,
    link: ConnId,
    ex_gen: u64,
    ex_conn: ConnId,
    app_open: bool,
    ex_open: bool,
    cut: bool,
    to_ex_last: Instant,
    to_app_last: Instant,
    ex_rx: BytesMut,
    app_rx: BytesMut,
    ex_first: bool,
    slow_until: Instant,
    slow_by: Duration,
}

/// A broken promise: what, when, and the seed that shows it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub at_ms: u64,
    pub step: u64,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} broke a guarantee at {} ms (step {}): {}\n  replay: SEED={} cargo test -p iim-sim --release -- --nocapture replay",
            self.seed, self.at_ms, self.step, self.what, self.seed
        )
    }
}

pub struct World {
    seed: u64,
    rng: Rng,
    pub p: Params,
    base: Instant,
    now: Instant,
    seq: u64,
    events: BinaryHeap<Reverse<Scheduled>>,
    reg: BTreeMap<ServerId, RegRow>,
    reg_mode: RegMode,
    /// The table as a lagging replica still sees it.
    reg_stale: BTreeMap<ServerId, RegRow>,
    exs: Vec<ExSlot>,
    ex_gens: u64,
    /// When each exchange last refreshed its row.
    last_seen: BTreeMap<ServerId, Instant>,
    /// The registry's `exchange_links`: the peers each exchange recorded
    /// a live link to, under the version of that recording.
    recorded_links: BTreeMap<ServerId, ((u64, u64), Vec<ServerId>)>,
    peer_conns: BTreeMap<u64, PeerConn>,
    /// Pairs of exchanges that cannot reach each other now.
    peer_cuts: BTreeSet<(usize, usize)>,
    /// Every time the registry marked an app server down, and when.
    downs: Vec<(ServerId, Instant)>,
    /// Since when each app server has been registered with an exchange
    /// without a break (as its link core says).
    up_since: BTreeMap<ServerId, Instant>,
    /// When the registry's latest trouble ended (answers drawn slow before
    /// may still be on their way for a while).
    registry_calm_since: Instant,
    apps: Vec<AppNode>,
    gens: u64,
    conns: HashMap<u64, SimConn>,
    next_conn: u64,
    oracle: Oracle,
    chaos_on: bool,
    /// When the faults stopped.
    healed_at: Option<Instant>,
    /// Sends of the final round: (send number, target) pairs expected
    /// delivered, and those expected `server_down`.
    final_round: Vec<u64>,
    stats: Stats,
    trace: bool,
    violation: Option<Violation>,
}

impl World {
    pub fn new(seed: u64, trace: bool) -> World {
        let mut rng = Rng::new(seed);
        let p = Params::draw(&mut rng, seed & FEDERATED != 0);
        let base = Instant::now();
        let mut w = World {
            seed,
            rng,
            base,
            now: base,
            seq: 0,
            events: BinaryHeap::new(),
            reg: BTreeMap::new(),
            reg_mode: RegMode::Normal,
            reg_stale: BTreeMap::new(),
            exs: Vec::new(),
            ex_gens: 0,
            last_seen: BTreeMap::new(),
            recorded_links: BTreeMap::new(),
            peer_conns: BTreeMap::new(),
            peer_cuts: BTreeSet::new(),
            downs: Vec::new(),
            up_since: BTreeMap::new(),
            registry_calm_since: base,
            apps: Vec::new(),
            gens: 0,
            conns: HashMap::new(),
            next_conn: 1,
            oracle: Oracle::default(),
            chaos_on: true,
            healed_at: None,
            final_round: Vec::new(),
            stats: Stats::default(),
            trace,
            violation: None,
            p,
        };
        for x in 0..w.p.exchanges {
            let id = ServerId(EXCHANGE.0 + x as u32);
            w.reg.insert(
                id,
                RegRow {
                    app: false,
                    epoch: 0,
                    state: RegState::Down,
                    exchange: None,
                    attach_epoch: 0,
                    address: String::new(),
                },
            );
            w.exs.push(ExSlot {
                id,
                node: None,
                rejoining: BTreeMap::new(),
            });
        }
        for i in 0..w.p.servers {
            let id = ServerId(i as u32 + 1);
            w.apps.push(AppNode {
                id,
                inc: None,
                partitioned: false,
                gone: false,
            });
        }
        for x in 0..w.p.exchanges {
            w.start_exchange(x);
        }
        for a in 0..w.p.servers {
            w.start_app(a);
        }
        w.schedule(Duration::from_millis(50), Ev::Sends);
        let first = w.rng.range(1, 2 * w.p.fault_gap_ms);
        w.schedule(Duration::from_millis(first), Ev::Chaos);
        let chaos = w.p.chaos;
        w.schedule(chaos, Ev::Quiet);
        w
    }

    /// Run to the end. `Err` at the first broken guarantee.
    pub fn run(mut self) -> Result<Stats, Violation> {
        loop {
            let next_event = self.events.peek().map(|Reverse(s)| s.at);
            let next_timer = self.next_timer();
            let (at, timer) = match (next_event, next_timer) {
                (Some(e), Some(t)) if t < e => (t, true),
                (Some(e), _) => (e, false),
                (None, Some(t)) => (t, true),
                (None, None) => break,
            };
            self.now = self.now.max(at);
            self.stats.steps += 1;
            if timer {
                self.fire_timers();
            } else {
                let Reverse(s) = self.events.pop().expect("peeked");
                if matches!(s.ev, Ev::End) {
                    self.check_end();
                    if let Some(v) = self.violation.take() {
                        return Err(v);
                    }
                    break;
                }
                self.on_event(s.ev);
            }
            self.check_step();
            if let Some(v) = self.violation.take() {
                return Err(v);
            }
            if self.stats.steps > 5_000_000 {
                self.fail("the run did not end (five million steps)".into());
                return Err(self.violation.take().expect("just set"));
            }
        }
        self.stats.virtual_ms = self.ms();
        self.stats.deliveries = self.oracle.deliveries;
        self.stats.outcomes = self.oracle.outcomes.clone();
        Ok(self.stats)
    }

    fn ms(&self) -> u64 {
        (self.now - self.base).as_millis() as u64
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.schedule_at(self.now + after, ev);
    }

    fn schedule_at(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn latency(&mut self) -> Duration {
        let (lo, hi) = self.p.latency_ms;
        self.rng.millis(lo, hi)
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            println!("{:>7} ms  {}", self.ms(), what());
        }
    }

    fn fail(&mut self, what: String) {
        if self.violation.is_none() {
            self.log(|| format!("VIOLATION: {what}"));
            self.violation = Some(Violation {
                seed: self.seed,
                at_ms: self.ms(),
                step: self.stats.steps,
                what,
            });
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let ex = self
            .exs
            .iter()
            .filter_map(|s| s.node.as_ref().and_then(|e| e.core.poll_timeout()))
            .min();
        let apps = self
            .apps
            .iter()
            .filter_map(|a| a.inc.as_ref().and_then(|i| i.link.poll_timeout()))
            .min();
        match (ex, apps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        for x in 0..self.exs.len() {
            if let Some(ex) = self.exs[x].node.as_mut()
                && ex.core.poll_timeout().is_some_and(|t| t <= now)
            {
                ex.core.handle_timeout(now);
                self.pump_ex(x);
            }
        }
        for a in 0..self.apps.len() {
            if let Some(inc) = self.apps[a].inc.as_mut()
                && inc.link.poll_timeout().is_some_and(|t| t <= now)
            {
                inc.link.handle_timeout(now);
                self.pump_app(a);
            }
        }
    }

    fn on_event(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Sends => {
                if self.chaos_on {
                    let n = self.rng.range(1, 5);
                    for _ in 0..n {
                        self.random_send();
                    }
                    let gap = self.rng.range(1, 2 * self.p.send_gap_ms);
                    self.schedule(Duration::from_millis(gap), Ev::Sends);
                }
            }
            Ev::Chaos => {
                if self.chaos_on {
                    self.chaos();
                    let gap = self.rng.range(1, 2 * self.p.fault_gap_ms);
                    self.schedule(Duration::from_millis(gap), Ev::Chaos);
                }
            }
            Ev::Quiet => self.quiet(),
            Ev::FinalRound => self.final_round(),
            Ev::FinalSend { app } => {
                let all: Vec<ServerId> = self.apps.iter().map(|a| a.id).collect();
                let me = self.apps[app].id;
                let targets: Vec<ServerId> = all.into_iter().filter(|t| *t != me).collect();
                if let Some(n) = self.send(app, &targets, 16) {
                    self.final_round.push(n);
                }
            }
            Ev::End => {}
            Ev::ToEx { conn, bytes } => self.deliver_to_exchange(conn, bytes),
            Ev::ToApp { conn, bytes } => self.deliver_to_app(conn, bytes),
            Ev::CloseToEx { conn, clean } => {
                if let Some((x, ex_conn)) = self.ex_side(conn) {
                    self.conns.get_mut(&conn).expect("live").ex_open = false;
                    if let Some(ex) = self.exs[x].node.as_mut() {
                        ex.conns.remove(&ex_conn);
                        let detail = "closed by the server".to_string();
                        ex.core
                            .handle_end(ex_conn, LinkEnd::Closed { clean, detail }, now);
                    }
                    self.pump_ex(x);
                }
            }
            Ev::CloseToApp { conn, code, reason } => {
                if let Some((a, link)) = self.app_side(conn) {
                    self.conns.get_mut(&conn).expect("live").app_open = false;
                    if let Some(inc) = self.apps[a].inc.as_mut() {
                        inc.conns.remove(&link);
                        inc.link
                            .handle_down(link, LinkDown::Refused { code, reason }, now);
                    }
                    self.pump_app(a);
                }
            }
            Ev::IdleEx { conn } => {
                if let Some((x, ex_conn)) = self.ex_side(conn) {
                    self.conns.get_mut(&conn).expect("live").ex_open = false;
                    if let Some(ex) = self.exs[x].node.as_mut() {
                        ex.conns.remove(&ex_conn);
                        let end = LinkEnd::Closed {
                            clean: false,
                            detail: "timed out".into(),
                        };
                        ex.core.handle_end(ex_conn, end, now);
                    }
                    self.pump_ex(x);
                }
            }
            Ev::IdleApp { conn } => {
                if let Some((a, link)) = self.app_side(conn) {
                    self.conns.get_mut(&conn).expect("live").app_open = false;
                    if let Some(inc) = self.apps[a].inc.as_mut() {
                        inc.conns.remove(&link);
                        inc.link
                            .handle_down(link, LinkDown::Lost("timed out".into()), now);
                    }
                    self.pump_app(a);
                }
            }
            Ev::Connected { app, life, link, x } => self.connected(app, life, link, x),
            Ev::ConnectFailed { app, life, link } => {
                if let Some(inc) = self.apps[app].inc.as_mut()
                    && inc.life == life
                {
                    inc.link
                        .handle_down(link, LinkDown::Lost("handshake timed out".into()), now);
                    self.pump_app(app);
                }
            }
            Ev::ExAnswer { x, life, id, query } => {
                if self.ex_life(x) == Some(life) {
                    let answer = self.registry_answer(x, query);
                    if let Some(ex) = self.exs[x].node.as_mut() {
                        ex.core.handle_answer(id, answer, now);
                    }
                    self.pump_ex(x);
                }
            }
            Ev::AppAnswer { app, life, ask } => {
                if self.apps[app].inc.as_ref().is_some_and(|i| i.life == life) {
                    let rows = self.exchange_rows();
                    self.log(|| {
                        format!(
                            "server {} hears from the registry: {:?}",
                            self.apps[app].id,
                            rows.as_ref().map(|r| r
                                .iter()
                                .map(|x| (x.address.clone(), x.up))
                                .collect::<Vec<_>>())
                        )
                    });
                    if let Some(inc) = self.apps[app].inc.as_mut() {
                        inc.link.handle_exchanges(ask, rows, now);
                    }
                    self.pump_app(app);
                }
            }
            Ev::Writable { x, life, conn } => {
                if self.ex_life(x) == Some(life) {
                    self.ex_transmit(x, conn);
                }
            }
            Ev::RestartApp { app } => {
                if self.apps[app].inc.is_none() && !self.apps[app].gone {
                    self.start_app(app);
                }
            }
            Ev::RestartEx { x } => {
                if self.exs[x].node.is_none() {
                    self.start_exchange(x);
                }
            }
            Ev::PeerConnected {
                x,
                life,
                to,
                to_life,
            } => self.peer_connected(x, life, to, to_life),
            Ev::PeerDialFailed { x, life, peer } => {
                if self.ex_life(x) == Some(life) {
                    if let Some(ex) = self.exs[x].node.as_mut() {
                        ex.core.dial_failed(peer, now);
                    }
                    self.pump_ex(x);
                }
            }
            Ev::ToPeer { pc, end, bytes } => self.deliver_to_peer(pc, end, bytes),
            Ev::PeerDown { pc, end } => self.peer_down(pc, end),
            Ev::PeerHeal { pair } => {
                self.log(|| format!("exchanges {pair:?} reach each other again"));
                self.peer_cuts.remove(&pair);
            }
            Ev::Heal { app } => {
                if self.apps[app].partitioned {
                    self.log(|| format!("server {} healed", self.apps[app].id));
                    self.apps[app].partitioned = false;
                }
            }
            Ev::RegistryNormal => {
                self.log(|| "registry normal again".to_string());
                self.reg_mode = RegMode::Normal;
                self.registry_calm_since = now;
            }
        }
    }
}

fn concat(chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().expect("one"),
        _ => {
            let mut b = BytesMut::with_capacity(chunks.iter().map(|c| c.len()).sum());
            for c in chunks {
                b.extend_from_slice(&c);
            }
            b.freeze()
        }
    }
}

/// Hash-map keys in a fixed order: iteration order must not depend on the
/// hasher's random state.
fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}
