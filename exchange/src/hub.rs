//! The task that drives the exchange core ([`iim_core::exchange::Exchange`]).
//!
//! It owns the core and the write side of every link, and does only what
//! the core cannot: it feeds the core the events of the link tasks (new
//! connections, frames, ends), the registry's answers and the clock, then
//! carries out the core's outputs — writes each link's bytes when its writer
//! has room, closes connections, runs registry questions as tasks of their
//! own. It never waits on IO: a writer that is full gets a task that waits
//! for room and says so by event; a registry call is a task too.

use crate::link::{Dialer, LinkCtx};
use iim::quic::{self, Writer};
use iim::registry::{Registration as RegistryVerdict, Registry, Role, ServerRecord, ServerState};
use iim::types::now_ms;
use iim::wire::{Frame, PeerHello, Register};
use iim_core::exchange::{
    Answer, AppServerRow, Exchange, ExchangeRow, LinkEnd, Output, Query, Registration,
    RegistryFailure,
};
use iim_core::{AskId, ConnId};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

/// Bound of the hub's event channel.
pub const EVENTS: usize = 4_096;
/// Events the hub takes per wake-up.
const EVENT_BATCH: usize = 256;
/// Most bytes of 906s handed to a writer in one batch.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// What the link tasks, registry calls and writers tell the hub.
pub enum Event {
    /// A connection passed TLS and opened its stream.
    Accepted {
        conn: ConnId,
        connection: quinn::Connection,
        writer: Writer,
    },
    /// Its first frame, `Register`, and whether its certificate names the
    /// server it claims.
    Register {
        conn: ConnId,
        reg: Register,
        identity: Result<(), String>,
    },
    Frames {
        conn: ConnId,
        frames: Vec<Frame>,
    },
    End {
        conn: ConnId,
        end: LinkEnd,
    },
    Answer {
        id: AskId,
        answer: Answer,
    },
    /// A full writer has room again.
    Writable {
        conn: ConnId,
        permit: mpsc::OwnedPermit<Vec<bytes::Bytes>>,
    },
    /// An accepted connection's first frame is `PeerHello`: another
    /// exchange, and whether its certificate names the exchange it claims.
    PeerHello {
        conn: ConnId,
        hello: PeerHello,
        identity: Result<(), String>,
    },
    /// A dial to a peer exchange opened its stream.
    Dialed {
        conn: ConnId,
        peer: iim::ServerId,
        connection: quinn::Connection,
        writer: Writer,
    },
    /// A dial to a peer exchange failed before its stream was open.
    DialFailed {
        peer: iim::ServerId,
    },
}

struct LinkIo {
    connection: quinn::Connection,
    writer: Writer,
    /// A task waits for room in the writer.
    waiting: bool,
}

pub struct Hub {
    core: Exchange,
    links: HashMap<ConnId, LinkIo>,
    /// How to dial peer exchanges, and what their link tasks need.
    dialer: Dialer,
    link_ctx: Arc<LinkCtx>,
    shutdown: CancellationToken,
    registry: Registry,
    events: mpsc::Sender<Event>,
    tracker: TaskTracker,
    /// Links whose reader ended, to forget once the core's outputs for
    /// them (a close with a reason) are carried out.
    ended: Vec<ConnId>,
}

impl Hub {
    pub fn new(
        core: Exchange,
        registry: Registry,
        dialer: Dialer,
        link_ctx: Arc<LinkCtx>,
        events: mpsc::Sender<Event>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Hub {
        Hub {
            core,
            links: HashMap::new(),
            dialer,
            link_ctx,
            shutdown,
            registry,
            events,
            tracker,
            ended: Vec::new(),
        }
    }

    /// Run until the core has stopped (after `shutdown` is cancelled).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        self.carry_out();
        loop {
            let wake = self.core.poll_timeout().map(Instant::from_std);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !self.core.is_draining() => {
                    self.core.shutdown(now());
                }
                n = rx.recv_many(&mut batch, EVENT_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    let now = now();
                    for ev in batch.drain(..) {
                        self.on_event(ev, now);
                    }
                }
                _ = quic::sleep_until_opt(wake) => self.core.handle_timeout(now()),
            }
            if self.carry_out() {
                break;
            }
        }
    }

    fn on_event(&mut self, ev: Event, now: std::time::Instant) {
        match ev {
            Event::Accepted {
                conn,
                connection,
                writer,
            } => {
                self.add_link(conn, connection, writer);
                self.core.accept(conn, now);
            }
            Event::Register {
                conn,
                reg,
                identity,
            } => self.core.handle_register(conn, reg, identity, now),
            Event::Frames { conn, frames } => self.core.handle_frames(conn, frames, now),
            Event::End { conn, end } => {
                self.core.handle_end(conn, end, now);
                self.ended.push(conn);
            }
            Event::Answer { id, answer } => self.core.handle_answer(id, answer, now),
            Event::Writable { conn, permit } => {
                if let Some(l) = self.links.get_mut(&conn) {
                    l.waiting = false;
                }
                permit.send(self.core.poll_transmit(conn, WRITE_BATCH_BYTES));
            }
            Event::PeerHello {
                conn,
                hello,
                identity,
            } => self.core.handle_peer_hello(conn, hello, identity, now),
            Event::Dialed {
                conn,
                peer,
                connection,
                writer,
            } => {
                self.add_link(conn, connection, writer);
                self.core.peer_dialed(conn, peer, now);
            }
            Event::DialFailed { peer } => self.core.dial_failed(peer, now),
        }
    }

    fn add_link(&mut self, conn: ConnId, connection: quinn::Connection, writer: Writer) {
        let io = LinkIo {
            connection,
            writer,
            waiting: false,
        };
        self.links.insert(conn, io);
    }

    /// Carry out every output of the core. True once it has stopped.
    fn carry_out(&mut self) -> bool {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit(conn) => self.transmit(conn),
                Output::Close { conn, code, reason } => {
                    if let Some(l) = self.links.remove(&conn) {
                        l.connection.close(code.into(), reason.as_bytes());
                    }
                }
                Output::Ask { id, query } => self.ask(id, query),
                Output::Dial { peer, address } => self.dial(peer, address),
                Output::Stopped => return true,
            }
        }
        for conn in self.ended.drain(..) {
            self.links.remove(&conn);
        }
        false
    }

    fn transmit(&mut self, conn: ConnId) {
        let Some(l) = self.links.get_mut(&conn) else {
            return;
        };
        if l.waiting {
            return;
        }
        match l.writer.clone().try_reserve_owned() {
            Ok(permit) => {
                permit.send(self.core.poll_transmit(conn, WRITE_BATCH_BYTES));
            }
            Err(mpsc::error::TrySendError::Full(writer)) => {
                l.waiting = true;
                let events = self.events.clone();
                self.tracker.spawn(async move {
                    if let Ok(permit) = writer.reserve_owned().await {
                        let _ = events.send(Event::Writable { conn, permit }).await;
                    }
                });
            }
            // The writer died with its connection; its reader says how.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Dial a peer exchange, as a task of its own (stopped with the
    /// exchange); it reports back by event.
    fn dial(&mut self, peer: iim::ServerId, address: String) {
        let ctx = self.link_ctx.clone();
        let dialer = self.dialer.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = crate::link::dial(ctx, dialer, peer, address) => {}
                }
            }
            .instrument(Span::current()),
        );
    }

    fn ask(&self, id: AskId, query: Query) {
        let registry = self.registry.clone();
        let events = self.events.clone();
        let exchange = self.core.config().id;
        self.tracker.spawn(
            async move {
                let answer = answer(&registry, exchange, query).await;
                let _ = events.send(Event::Answer { id, answer }).await;
            }
            .instrument(Span::current()),
        );
    }
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

async fn answer(registry: &Registry, exchange: iim::ServerId, query: Query) -> Answer {
    let failed = |e: iim::registry::RegistryError| RegistryFailure(e.to_string());
    match query {
        Query::RecordRegistration { server, epoch } => Answer::Registration(
            registry
                .record_registration(server, epoch, exchange, now_ms())
                .await
                .map(|r| match r {
                    RegistryVerdict::Accepted { attach_epoch, .. } => {
                        Registration::Accepted { attach_epoch }
                    }
                    RegistryVerdict::StaleEpoch { current } => Registration::StaleEpoch { current },
                    RegistryVerdict::Unknown => Registration::Unknown,
                    RegistryVerdict::WrongRole => Registration::WrongRole,
                })
                .map_err(failed),
        ),
        Query::MarkDown {
            server,
            epoch,
            attach_epoch,
        } => {
            let done = match attach_epoch {
                Some(a) => {
                    registry
                        .mark_down_attached(server, epoch, a, now_ms())
                        .await
                }
                None => {
                    registry
                        .mark_down_from(server, epoch, exchange, now_ms())
                        .await
                }
            };
            Answer::MarkedDown(done.map_err(failed))
        }
        Query::AppServers => {
            Answer::AppServers(registry.servers().await.map(app_rows).map_err(failed))
        }
        Query::Exchanges => {
            Answer::Exchanges(registry.servers().await.map(exchange_rows).map_err(failed))
        }
        Query::Touch(list) => Answer::Done(registry.touch(&list, now_ms()).await.map_err(failed)),
        Query::RecordLinks { peers, epoch, seq } => Answer::Done(
            registry
                .record_links(exchange, (epoch, seq), &peers, now_ms())
                .await
                .map(drop)
                .map_err(failed),
        ),
    }
}

/// The registry's app servers, as the core knows them.
pub fn app_rows(servers: Vec<ServerRecord>) -> Vec<AppServerRow> {
    servers
        .into_iter()
        .filter(|s| s.role == Role::App)
        .map(|s| AppServerRow {
            id: s.id,
            epoch: s.epoch,
            exchange: s.exchange,
            attach_epoch: s.attach_epoch,
            down: s.state == ServerState::Down,
        })
        .collect()
}

/// The registry's exchanges, as the core knows them.
pub fn exchange_rows(servers: Vec<ServerRecord>) -> Vec<ExchangeRow> {
    servers
        .into_iter()
        .filter(|s| s.role == Role::Exchange)
        .map(|s| ExchangeRow {
            id: s.id,
            epoch: s.epoch,
            up: s.state == ServerState::Up,
            address: s.address,
        })
        .collect()
}
