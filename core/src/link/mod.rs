//! An app server's link to its exchange as a state machine: every decision
//! the link makes, with no socket, task, channel or clock inside.
//!
//! [`Link`] owns what must survive reconnects — the [`Outbox`] of 905s
//! awaiting their reports, the [`Dedup`] filter of 906s, the frames
//! waiting to be written — and the connection's lifecycle: find the
//! exchange (ask the registry, unless its address is configured), connect,
//! `Register`, wait for `Registered`, resend the whole outbox in send order,
//! heartbeat, and after a loss back off (doubling up to a bound) and start
//! again. A refusal that can never succeed (a newer incarnation of this
//! server registered, a certificate naming another server, another exchange
//! answering) is fatal: the link stops trying.
//!
//! Driven like quinn-proto's `Connection`: inputs are the `handle_*`
//! methods and [`Link::submit`] with `now` passed in; outputs are
//! [`Link::poll_output`] (connect, ask the registry, close, deliver a
//! message to local users, complete a send), [`Link::poll_transmit`] (the
//! bytes to write, taken when the writer has room) and
//! [`Link::poll_timeout`]. `R` is whatever the caller completes a send
//! with (a channel's sender in the app server, a number in the simulator).

pub mod dedup;
pub mod metrics;
pub mod outbox;

pub use dedup::{Dedup, Verdict};
pub use metrics::LinkMetrics;
pub use outbox::Outbox;

use crate::{AskId, ConnId, RegistryFailure};
use bytes::Bytes;
use iim_proto::coalesce::{Coalescer, frame_bytes};
use iim_proto::types::{Address, MessageId, ServerId};
use iim_proto::wire::{
    self, CLOSE_GOING_AWAY, Deliver906, DeliveryStatus, ErrorCode, Frame, Heartbeat, Message,
    Register, Registered, ReportEntry, UserRow,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// The shortest a connection attempt is given, however short the lease.
pub const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

/// The link's settings (validated by the app server's config).
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerId,
    pub epoch: u64,
    /// The exchange this server prefers (its 905s are addressed to it).
    /// Located in the registry, another live exchange is taken while this
    /// one is not up there (see [`choose_exchange`]); any exchange of the
    /// deployment accepts a 905 addressed to another one.
    pub exchange: ServerId,
    /// Its address, when configured: then only this exchange is used.
    /// Else the registry is asked at every attempt.
    pub address: Option<SocketAddr>,
    /// The largest frame body this server accepts and sends.
    pub max_frame: usize,
    /// How long a send waits for its reports before `timed_out`.
    pub send_timeout: Duration,
    /// 905s awaiting reports, at most.
    pub max_outstanding: usize,
    pub heartbeat: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// From the connection to the exchange's `Registered`, and from a
    /// question to the registry to its answer; also the longest a
    /// connection attempt may take before a lease is known (then a quarter
    /// of the lease, at least [`MIN_CONNECT_TIMEOUT`]).
    pub register_timeout: Duration,
    /// The wall clock (unix ms) at the `now` the link was created: a
    /// heartbeat carries the sender's wall clock.
    pub wall_ms_at_start: i64,
}

impl<R> From<outbox::Done<R>> for Output<R> {
    fn from(d: outbox::Done<R>) -> Self {
        Output::Completed {
            reply: d.reply,
            results: d.results,
            resent: d.resent,
        }
    }
}

/// The registry's row of one exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeRow {
    pub id: ServerId,
    pub address: String,
    /// Its state is `up` and it refreshed its row recently (a killed
    /// exchange's row still says `up` until it is seen stale).
    pub up: bool,
    /// App servers attached to it now.
    pub attached: u64,
}

/// The exchange to attach to: the one just lost while a reconnect to it
/// is still worth trying (`stay`), else the preferred one if it is up,
/// else the live one with the fewest attached servers (ties by id),
/// avoiding those in `avoid` (the one just lost, then the one an attempt
/// just failed at: the last named is avoided longest) while any other is
/// up.
pub fn choose_exchange<'a>(
    rows: &'a [ExchangeRow],
    preferred: ServerId,
    stay: Option<ServerId>,
    avoid: &[ServerId],
) -> Option<&'a ExchangeRow> {
    let up = || rows.iter().filter(|r| r.up);
    if let Some(s) = stay
        && let Some(r) = up().find(|r| r.id == s)
    {
        return Some(r);
    }
    // Avoid them all if another is up; else avoid those named last (the
    // latest failure) only; else take any.
    (0..=avoid.len()).find_map(|skip| {
        let avoided = &avoid[skip..];
        let ok = || up().filter(|r| !avoided.contains(&r.id));
        ok().find(|r| r.id == preferred)
            .or_else(|| ok().min_by_key(|r| (r.attached, r.id)))
    })
}

/// How a connection to the exchange ended or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkDown {
    /// The exchange closed it with this application code and reason.
    Refused { code: u64, reason: String },
    /// Anything else: no route, timeout, reset, stream finished or broken.
    Lost(String),
}

/// What the shell must do.
#[derive(Debug)]
pub enum Output<R> {
    /// Ask the registry for the exchanges; answer with
    /// [`Link::handle_exchanges`].
    Locate(AskId),
    /// Connect to `exchange` at `addr` and open the link's stream; then
    /// [`Link::handle_connected`], or [`Link::handle_down`] if that fails.
    Connect {
        conn: ConnId,
        exchange: ServerId,
        addr: SocketAddr,
    },
    /// Close the connection with this application code and reason.
    Close {
        conn: ConnId,
        code: u32,
        reason: String,
    },
    /// A new message for these local users (duplicates already dropped).
    Deliver {
        message: Message,
        users: Vec<UserRow>,
    },
    /// A send is finished: one outcome per target server.
    Completed {
        reply: R,
        results: Vec<ReportEntry>,
        /// See [`outbox::Done::resent`]: `overloaded` then proves nothing.
        resent: bool,
    },
    /// 905s may now be at most this long (the exchange accepts less than
    /// configured).
    SendLimit(usize),
    /// The exchange refused this incarnation for good: stop the server.
    Fatal(String),
}

#[derive(Debug)]
enum State {
    /// Waiting until `at` to (re)connect.
    Idle {
        at: Instant,
    },
    /// Waiting for the registry's answer until `deadline`.
    Locating {
        ask: AskId,
        deadline: Instant,
    },
    /// Waiting for the connection (handshake and stream) until
    /// `deadline`.
    Connecting {
        conn: ConnId,
        exchange: ServerId,
        deadline: Instant,
    },
    /// `Register` written; waiting for `Registered` until `deadline`.
    Registering {
        conn: ConnId,
        exchange: ServerId,
        deadline: Instant,
    },
    Up {
        conn: ConnId,
        exchange: ServerId,
        next_heartbeat: Instant,
    },
    Fatal,
    Stopped,
}

/// The link core. See the module documentation.
pub struct Link<R> {
    cfg: Config,
    state: State,
    outbox: Outbox<R>,
    dedup: Dedup,
    /// Frames waiting for the writer, coalesced as they come.
    out: Coalescer,
    backoff: Duration,
    next_conn: u64,
    next_ask: u64,
    connected_before: bool,
    /// Registrations accepted so far (each one may follow a mark-down
    /// that deleted this server's session rows: the shell audits them).
    registrations: u64,
    /// The lease the exchange granted at the latest registration.
    lease: Option<Duration>,
    /// The 905 size limit in force.
    send_limit: usize,
    started: Instant,
    fatal: Option<String>,
    outputs: VecDeque<Output<R>>,
    metrics: Arc<LinkMetrics>,
    /// The exchange of the last registration, and until when a reconnect
    /// goes back to it (a quarter of the lease after the link was lost:
    /// a blip must not move the server, a dead exchange must not hold it).
    last_exchange: Option<ServerId>,
    stay_until: Option<Instant>,
    /// The exchange the latest attempt failed at (until one succeeds).
    failed_exchange: Option<ServerId>,
}

impl<R> Link<R> {
    pub fn new(cfg: Config, metrics: Arc<LinkMetrics>, now: Instant) -> Link<R> {
        Link {
            outbox: Outbox::new(cfg.epoch),
            dedup: Dedup::default(),
            out: Coalescer::default(),
            backoff: cfg.reconnect_min,
            send_limit: cfg.max_frame,
            state: State::Idle { at: now },
            next_conn: 1,
            next_ask: 1,
            connected_before: false,
            registrations: 0,
            lease: None,
            started: now,
            fatal: None,
            outputs: VecDeque::new(),
            last_exchange: None,
            stay_until: None,
            failed_exchange: None,
            metrics,
            cfg,
        }
    }

    // ----- getters -------------------------------------------------------

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<LinkMetrics> {
        &self.metrics
    }

    /// The exchange registered with now, if any.
    pub fn exchange(&self) -> Option<ServerId> {
        match self.state {
            State::Up { exchange, .. } => Some(exchange),
            _ => None,
        }
    }

    /// The connection the link holds now (connecting, registering or up).
    /// Registrations accepted so far: each may follow a mark-down that
    /// deleted this server's session rows, so the shell checks them after
    /// every one.
    pub fn registrations(&self) -> u64 {
        self.registrations
    }

    pub fn conn(&self) -> Option<ConnId> {
        match self.state {
            State::Connecting { conn, .. }
            | State::Registering { conn, .. }
            | State::Up { conn, .. } => Some(conn),
            _ => None,
        }
    }

    /// 905s awaiting their reports.
    pub fn outstanding(&self) -> usize {
        self.outbox.len()
    }

    /// No 905 is waiting for its report.
    pub fn is_idle(&self) -> bool {
        self.outbox.is_empty()
    }

    /// 905s the outbox can still take.
    pub fn room(&self) -> usize {
        match self.state {
            State::Stopped => 0,
            _ => self.cfg.max_outstanding.saturating_sub(self.outbox.len()),
        }
    }

    /// Why the exchange refused this incarnation for good.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.state, State::Stopped)
    }

    /// The 905 size limit in force.
    pub fn send_limit(&self) -> usize {
        self.send_limit
    }

    // ----- outputs -------------------------------------------------------

    pub fn poll_output(&mut self) -> Option<Output<R>> {
        self.outputs.pop_front()
    }

    /// Bytes are waiting for the current connection's writer.
    pub fn has_transmit(&self) -> bool {
        !self.out.is_empty() && self.conn().is_some()
    }

    /// Everything waiting to be written on the current connection.
    pub fn poll_transmit(&mut self) -> Vec<Bytes> {
        self.out.take()
    }

    /// When [`Link::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let state = match self.state {
            State::Idle { at } => Some(at),
            State::Locating { deadline, .. }
            | State::Connecting { deadline, .. }
            | State::Registering { deadline, .. } => Some(deadline),
            State::Up { next_heartbeat, .. } => Some(next_heartbeat),
            _ => None,
        };
        match (state, self.outbox.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ----- inputs --------------------------------------------------------

    /// A 905 from `iim::Iim::submit` (in sequence order), to be reported
    /// back with `reply`. The caller keeps within [`Link::room`].
    pub fn submit(
        &mut self,
        id: MessageId,
        frame: Bytes,
        targets: Vec<ServerId>,
        reply: R,
        now: Instant,
    ) {
        self.metrics.forwards_out.inc();
        let up = matches!(self.state, State::Up { .. });
        if up {
            self.out.add(&frame);
        }
        self.outbox
            .push(id, frame, targets, now + self.cfg.send_timeout, reply);
        if up {
            self.outbox.transmitted_last();
        }
    }

    /// The registry's exchanges (answer to [`Output::Locate`]).
    pub fn handle_exchanges(
        &mut self,
        ask: AskId,
        rows: Result<Vec<ExchangeRow>, RegistryFailure>,
        now: Instant,
    ) {
        if !matches!(self.state, State::Locating { ask: a, .. } if a == ask) {
            return;
        }
        let stay = self
            .last_exchange
            .filter(|_| self.stay_until.is_none_or(|t| now < t));
        let avoid: Vec<ServerId> = self
            .last_exchange
            .filter(|_| stay.is_none())
            .into_iter()
            .chain(self.failed_exchange)
            .collect();
        let found = rows
            .map_err(|e| format!("registry: {}", e.0))
            .and_then(|rows| {
                let ex = choose_exchange(&rows, self.cfg.exchange, stay, &avoid)
                    .ok_or_else(|| "no exchange is up in the registry".to_string())?;
                let addr = ex
                    .address
                    .parse::<SocketAddr>()
                    .map_err(|_| format!("exchange {} has address {:?}", ex.id, ex.address))?;
                Ok((ex.id, addr))
            });
        match found {
            Ok((id, addr)) => self.connect(id, addr, now),
            Err(why) => self.retry_later(&why, now),
        }
    }

    /// The connection `conn` is established and its stream open: register.
    pub fn handle_connected(&mut self, conn: ConnId, now: Instant) {
        let State::Connecting {
            conn: c, exchange, ..
        } = self.state
        else {
            return;
        };
        if c != conn {
            return;
        }
        // Acks and heartbeats of an old connection mean nothing to this one.
        self.out.clear();
        let reg = Frame::Register(Register {
            server: self.cfg.server,
            epoch: self.cfg.epoch,
            max_frame: self.cfg.max_frame as u32,
        });
        match frame_bytes(&reg, self.cfg.max_frame) {
            Some(b) => self.out.add(&b),
            None => return self.become_fatal("cannot encode register".into()),
        }
        self.state = State::Registering {
            conn,
            exchange,
            deadline: now + self.cfg.register_timeout,
        };
    }

    /// The connection `conn` failed to come up, or ended.
    pub fn handle_down(&mut self, conn: ConnId, down: LinkDown, now: Instant) {
        if self.conn() != Some(conn) {
            return;
        }
        match (&self.state, down) {
            (State::Up { exchange, .. }, down) => {
                let leaving = matches!(&down, LinkDown::Refused { code, .. }
                    if *code == u64::from(CLOSE_GOING_AWAY)
                        || *code == u64::from(ErrorCode::ShuttingDown.close_code()));
                if leaving {
                    // The exchange is stopping (a drain): attach elsewhere
                    // now rather than wait for it.
                    self.stay_until = Some(now);
                    self.failed_exchange = Some(*exchange);
                } else {
                    self.stay_until =
                        Some(now + self.lease.unwrap_or(self.cfg.register_timeout) / 4);
                }
                self.metrics.link_up.set(0);
                warn!(
                    outstanding = self.outbox.len(),
                    why = ?down,
                    "link to the exchange lost"
                );
                self.close_current(ErrorCode::Protocol.close_code(), "reader ended");
                self.retry_later("link lost", now);
            }
            (State::Registering { .. }, LinkDown::Refused { code, reason }) => {
                match ErrorCode::from_close_code(code) {
                    Some(c @ (ErrorCode::StaleEpoch | ErrorCode::IdentityMismatch)) => {
                        self.become_fatal(format!("{c:?}: {reason}"))
                    }
                    c => self.retry_later(&format!("refused ({c:?}): {reason}"), now),
                }
            }
            (_, down) => self.retry_later(&format!("{down:?}"), now),
        }
    }

    /// Frames read from connection `conn`, in order.
    pub fn handle_frames(&mut self, conn: ConnId, frames: Vec<Frame>, now: Instant) {
        if self.conn() != Some(conn) {
            return;
        }
        let mut frames = frames.into_iter();
        if let State::Registering { exchange, .. } = self.state {
            match frames.next() {
                None => return,
                Some(Frame::Registered(r)) if r.exchange == exchange => {
                    self.registered(conn, &r, now)
                }
                Some(Frame::Registered(r)) => {
                    return self.become_fatal(format!(
                        "expected exchange {exchange}, reached exchange {}",
                        r.exchange
                    ));
                }
                Some(other) => {
                    self.close_current(ErrorCode::Protocol.close_code(), "unexpected frame");
                    return self.retry_later(&format!("unexpected {} frame", other.kind()), now);
                }
            }
        }
        if !matches!(self.state, State::Up { .. }) {
            return;
        }
        let mut ack = None;
        for f in frames {
            match f {
                Frame::Deliver(d) => {
                    ack = Some(d.no);
                    self.deliver(d);
                }
                Frame::Report(r) => {
                    self.metrics
                        .reports_in
                        .add_each(&DeliveryStatus::tally(r.entries.iter().map(|e| e.status)));
                    for e in r.entries {
                        if let Some(done) = self.outbox.handle_report(e) {
                            self.outputs.push_back(done.into());
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
                    self.metrics.link_up.set(0);
                    self.close_current(ErrorCode::Protocol.close_code(), "unexpected frame");
                    return self.retry_later("protocol error", now);
                }
            }
        }
        if let Some(upto) = ack {
            self.metrics.acks_out.inc();
            let mut ack = [0u8; wire::ACK_FRAME_MAX];
            let len = wire::write_ack(&mut ack, upto);
            self.out.copy(&ack[..len]);
        }
    }

    /// Time passed: reconnect, registration deadline, heartbeat, send
    /// deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        for done in self.outbox.poll_expired(now) {
            for r in &done.results {
                self.metrics.reports_in.inc(r.status.as_str());
            }
            self.outputs.push_back(done.into());
        }
        match self.state {
            State::Idle { at } if at <= now => match self.cfg.address {
                Some(addr) => self.connect(self.cfg.exchange, addr, now),
                None => {
                    let ask = AskId(self.next_ask);
                    self.next_ask += 1;
                    self.state = State::Locating {
                        ask,
                        deadline: now + self.cfg.register_timeout,
                    };
                    self.outputs.push_back(Output::Locate(ask));
                }
            },
            State::Locating { deadline, .. } if deadline <= now => {
                self.retry_later("no answer from the registry in time", now);
            }
            State::Connecting { deadline, .. } if deadline <= now => {
                self.close_current(ErrorCode::Protocol.close_code(), "connect timed out");
                self.retry_later("no connection in time", now);
            }
            State::Registering { deadline, .. } if deadline <= now => {
                self.close_current(ErrorCode::Protocol.close_code(), "no registered frame");
                self.retry_later("no registered frame in time", now);
            }
            State::Up {
                ref mut next_heartbeat,
                ..
            } if *next_heartbeat <= now => {
                while *next_heartbeat <= now {
                    *next_heartbeat += self.cfg.heartbeat;
                }
                let wall = self.cfg.wall_ms_at_start
                    + now.saturating_duration_since(self.started).as_millis() as i64;
                let f = Frame::Heartbeat(Heartbeat { sent_at_ms: wall });
                if let Some(b) = frame_bytes(&f, self.cfg.max_frame) {
                    self.out.copy(&b);
                }
            }
            _ => {}
        }
    }

    /// Stop for good (the server is draining and done waiting): whatever
    /// is still unreported completes `timed_out`; the connection is closed
    /// as a clean, intended departure.
    pub fn stop(&mut self, _now: Instant) {
        for done in self.outbox.abandon() {
            self.outputs.push_back(done.into());
        }
        self.close_current(CLOSE_GOING_AWAY, "app server draining");
        self.metrics.link_up.set(0);
        self.out.clear();
        self.state = State::Stopped;
    }

    // ----- internals -----------------------------------------------------

    fn connect(&mut self, exchange: ServerId, addr: SocketAddr, now: Instant) {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.state = State::Connecting {
            conn,
            exchange,
            deadline: now + self.connect_timeout(),
        };
        self.outputs.push_back(Output::Connect {
            conn,
            exchange,
            addr,
        });
    }

    /// How long one connection attempt may take. Once the exchange has
    /// granted a lease, an attempt plus the longest backoff stays within
    /// half of it: after an exchange restart (which gives the servers it
    /// served one lease to come back) a live server is back in time even
    /// when its attempt started just before the exchange listened again
    /// and has to be given up first. A QUIC handshake to nobody otherwise
    /// waits out the whole idle timeout.
    fn connect_timeout(&self) -> Duration {
        match self.lease {
            Some(lease) => (lease / 4)
                .max(MIN_CONNECT_TIMEOUT)
                .min(self.cfg.register_timeout),
            None => self.cfg.register_timeout,
        }
    }

    /// The longest backoff between attempts: `reconnect_max`, and at most
    /// a quarter of the lease granted (see [`Link::connect_timeout`]).
    fn backoff_max(&self) -> Duration {
        match self.lease {
            Some(lease) => self
                .cfg
                .reconnect_max
                .min(lease / 4)
                .max(self.cfg.reconnect_min),
            None => self.cfg.reconnect_max,
        }
    }

    fn registered(&mut self, conn: ConnId, r: &Registered, now: Instant) {
        let exchange = r.exchange;
        self.last_exchange = Some(exchange);
        self.stay_until = None;
        self.failed_exchange = None;
        let exchange_max = r.max_frame as usize;
        self.registrations += 1;
        self.lease = Some(Duration::from_millis(u64::from(r.lease_ms)));
        self.metrics.link_connects.inc();
        let limit = exchange_max.max(1_024).min(self.cfg.max_frame);
        if limit < self.send_limit {
            warn!(limit, "the exchange accepts smaller frames than configured");
            self.send_limit = limit;
            self.outputs.push_back(Output::SendLimit(limit));
        }
        for done in self
            .outbox
            .remove_larger_than(limit + wire::HEADER_LEN, DeliveryStatus::Overloaded)
        {
            self.outputs.push_back(done.into());
        }
        self.metrics.link_up.set(1);
        // Every unreported 905 goes out again, in order, before anything
        // new.
        for f in self.outbox.resend(self.cfg.max_frame) {
            self.out.add(&f);
        }
        if self.connected_before {
            self.metrics.forwards_resent.add(self.outbox.len() as u64);
        }
        self.connected_before = true;
        self.backoff = self.cfg.reconnect_min;
        info!(
            exchange = exchange.0,
            resent = self.outbox.len(),
            "registered with the exchange"
        );
        self.state = State::Up {
            conn,
            exchange,
            next_heartbeat: now + self.cfg.heartbeat,
        };
    }

    /// Restore the original message of a 906, drop duplicates, hand it to
    /// the listed local users. Every 906 is acknowledged, delivered or not:
    /// a bad one must not block the queue behind it.
    fn deliver(&mut self, d: Deliver906) {
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
            verdict @ (Verdict::New | Verdict::Late) => {
                if verdict == Verdict::Late {
                    self.metrics.late.inc();
                    warn!(%id, "906 filling an earlier gap: delivered after later messages");
                }
                debug!(%id, users = users.len(), "906 delivered");
                self.outputs.push_back(Output::Deliver {
                    message: msg,
                    users,
                });
            }
            Verdict::Duplicate | Verdict::Stale => self.metrics.duplicates.inc(),
        }
    }

    fn close_current(&mut self, code: u32, reason: &str) {
        if let Some(conn) = self.conn() {
            self.outputs.push_back(Output::Close {
                conn,
                code,
                reason: reason.to_string(),
            });
        }
    }

    /// Forget the current connection and try again after the backoff,
    /// which doubles up to its bound.
    fn retry_later(&mut self, why: &str, now: Instant) {
        debug!(
            why,
            backoff_ms = self.backoff.as_millis() as u64,
            "cannot reach the exchange"
        );
        self.out.clear();
        if let State::Connecting { exchange, .. } | State::Registering { exchange, .. } = self.state
        {
            self.failed_exchange = Some(exchange);
        }
        self.state = State::Idle {
            at: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(self.backoff_max());
    }

    fn become_fatal(&mut self, reason: String) {
        error!(%reason, "the exchange refused this server for good");
        self.close_current(ErrorCode::Protocol.close_code(), "refused");
        self.metrics.link_up.set(0);
        self.out.clear();
        self.state = State::Fatal;
        self.fatal = Some(reason.clone());
        self.outputs.push_back(Output::Fatal(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u32, up: bool, attached: u64) -> ExchangeRow {
        ExchangeRow {
            id: ServerId(id),
            address: format!("127.0.0.1:{id}"),
            up,
            attached,
        }
    }

    #[test]
    fn an_exchange_is_chosen_from_the_registry() {
        let rows = [
            row(100, true, 5),
            row(101, true, 1),
            row(102, true, 1),
            row(103, false, 0),
        ];
        let pick = |pref, stay, avoid: Option<ServerId>| {
            let avoid: Vec<ServerId> = avoid.into_iter().collect();
            choose_exchange(&rows, ServerId(pref), stay, &avoid).map(|r| r.id.0)
        };
        // The preferred one while it is up; else the least attached, ties by id.
        assert_eq!(pick(100, None, None), Some(100));
        assert_eq!(pick(103, None, None), Some(101));
        // Back to the one just lost while that is worth a try.
        assert_eq!(pick(100, Some(ServerId(102)), None), Some(102));
        // Then away from it, even when it is the preferred one.
        assert_eq!(pick(100, None, Some(ServerId(100))), Some(101));
        assert_eq!(pick(103, None, Some(ServerId(101))), Some(102));
        // Unless nothing else is up.
        let alone = [row(100, true, 3), row(101, false, 0)];
        assert_eq!(
            choose_exchange(&alone, ServerId(101), None, &[ServerId(100)]).map(|r| r.id.0),
            Some(100)
        );
        assert!(choose_exchange(&[row(100, false, 0)], ServerId(100), None, &[]).is_none());
        // Away from both the one lost and the one an attempt failed at.
        assert_eq!(
            choose_exchange(&rows, ServerId(100), None, &[ServerId(100), ServerId(101)])
                .map(|r| r.id.0),
            Some(102)
        );
    }
}
