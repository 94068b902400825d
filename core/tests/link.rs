//! An app server's link core driven by hand on a clock that only moves when
//! a test moves it: finding the exchange, registering, resending the
//! outbox in order, deduplicating 906s, acknowledging, backing off, giving
//! up for good.

use bytes::{Bytes, BytesMut};
use iim_core::link::{Config, ExchangeRow, Link, LinkDown, LinkMetrics, Output};
use iim_core::origin::Origin;
use iim_core::{ConnId, RegistryFailure};
use iim_proto::types::{Address, ChannelId, MessageId, ServerId, UserId};
use iim_proto::wire::{
    self, DEFAULT_MAX_FRAME, Deliver906, DeliveryStatus, ErrorCode, Frame, Message, Registered,
    Report, ReportEntry, Timing, UserRow,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EX: ServerId = ServerId(100);
const ME: ServerId = ServerId(1);

struct T {
    link: Link<u64>,
    now: Instant,
    outputs: Vec<Output<u64>>,
}

fn config(address: bool) -> Config {
    Config {
        server: ME,
        epoch: 4,
        exchange: EX,
        address: address.then(|| "127.0.0.1:4433".parse().unwrap()),
        max_frame: DEFAULT_MAX_FRAME,
        send_timeout: Duration::from_secs(10),
        max_outstanding: 100,
        heartbeat: Duration::from_secs(1),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(400),
        register_timeout: Duration::from_secs(3),
        wall_ms_at_start: 1_700_000_000_000,
    }
}

impl T {
    fn new(address: bool) -> T {
        let now = Instant::now();
        T {
            link: Link::new(config(address), Arc::new(LinkMetrics::default()), now),
            now,
            outputs: vec![],
        }
    }

    fn drain(&mut self) {
        while let Some(o) = self.link.poll_output() {
            self.outputs.push(o);
        }
    }

    fn tick(&mut self) {
        self.link.handle_timeout(self.now);
        self.drain();
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.tick();
    }

    /// The connection the link asked for.
    fn connect_asked(&mut self) -> ConnId {
        self.drain();
        let i = self
            .outputs
            .iter()
            .position(|o| matches!(o, Output::Connect { .. }))
            .unwrap_or_else(|| panic!("no connect in {:?}", self.outputs));
        match self.outputs.remove(i) {
            Output::Connect { conn, exchange, .. } => {
                assert_eq!(exchange, EX);
                conn
            }
            _ => unreachable!(),
        }
    }

    fn written(&mut self) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        for c in self.link.poll_transmit() {
            buf.extend_from_slice(&c);
        }
        let mut out = vec![];
        while let Some(f) = wire::decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            out.push(f);
        }
        out
    }

    /// Connect and register; what was written after `Register`.
    fn up(&mut self) -> ConnId {
        let conn = self.connect_asked();
        self.link.handle_connected(conn, self.now);
        let written = self.written();
        assert!(
            matches!(written.as_slice(), [Frame::Register(r)] if r.server == ME && r.epoch == 4),
            "{written:?}"
        );
        self.frames(conn, vec![registered(EX)]);
        assert_eq!(self.link.exchange(), Some(EX));
        conn
    }

    fn frames(&mut self, conn: ConnId, frames: Vec<Frame>) {
        self.link.handle_frames(conn, frames, self.now);
        self.drain();
    }

    fn completed(&mut self) -> Vec<(u64, Vec<ReportEntry>)> {
        self.drain();
        let mut done = vec![];
        self.outputs.retain(|o| match o {
            Output::Completed { reply, results, .. } => {
                done.push((*reply, results.clone()));
                false
            }
            _ => true,
        });
        done
    }

    fn delivered(&mut self) -> Vec<MessageId> {
        self.drain();
        let mut got = vec![];
        self.outputs.retain(|o| match o {
            Output::Deliver { message, .. } => {
                got.push(message.id);
                false
            }
            _ => true,
        });
        got
    }

    fn submit(&mut self, origin: &mut Origin, reply: u64) -> MessageId {
        let fwd = origin
            .forward(
                &mut message(origin.server()),
                [(ServerId(2), row())],
                EX,
                DEFAULT_MAX_FRAME,
            )
            .unwrap();
        self.link
            .submit(fwd.id, fwd.frame, fwd.targets, reply, self.now);
        fwd.id
    }
}

fn registered(exchange: ServerId) -> Frame {
    Frame::Registered(Registered {
        exchange,
        exchange_epoch: 1,
        lease_ms: 10_000,
        max_frame: DEFAULT_MAX_FRAME as u32,
    })
}

fn message(from: ServerId) -> Message {
    Message {
        id: MessageId {
            origin: from,
            epoch: 0,
            seq: 0,
        },
        source: Address::new(from, UserId(7)),
        target: Address::RECEIVER,
        kind: 9,
        timing: Timing::default(),
        body: Bytes::from_static(b"x"),
        nested: vec![],
    }
}

fn row() -> UserRow {
    UserRow {
        user: UserId(20),
        channel: ChannelId(1),
    }
}

/// A 906 numbered `no` carrying origin 2's message `seq` (pair sequence
/// `seq`).
fn deliver(no: u64, seq: u64) -> Frame {
    let mut m = message(ServerId(2));
    m.id = MessageId {
        origin: ServerId(2),
        epoch: 1,
        seq,
    };
    Frame::Deliver(Deliver906 {
        no,
        id: m.id,
        seq,
        users: vec![row()],
        message: m.encode(),
    })
}

#[test]
fn the_registry_names_the_exchange_and_a_failed_look_up_backs_off() {
    let mut t = T::new(false);
    t.tick();
    let ask = match t.outputs.pop() {
        Some(Output::Locate(a)) => a,
        other => panic!("{other:?}"),
    };
    t.link
        .handle_exchanges(ask, Err(RegistryFailure("down".into())), t.now);
    // Tried again after the minimum backoff, not before.
    t.advance(Duration::from_millis(99));
    assert!(t.outputs.is_empty());
    t.advance(Duration::from_millis(1));
    let ask = match t.outputs.pop() {
        Some(Output::Locate(a)) => a,
        other => panic!("{other:?}"),
    };
    let rows = vec![ExchangeRow {
        id: EX,
        address: "127.0.0.1:4433".into(),
        up: true,
        attached: 0,
    }];
    t.link.handle_exchanges(ask, Ok(rows), t.now);
    t.connect_asked();
}

#[test]
fn the_whole_outbox_goes_again_in_order_on_every_new_connection() {
    let mut t = T::new(true);
    t.tick();
    let mut origin = Origin::new(ME, 4);
    // Sent before any link: kept.
    let a = t.submit(&mut origin, 1);
    let conn = t.up();
    let b = t.submit(&mut origin, 2);
    let sent: Vec<MessageId> = t
        .written()
        .into_iter()
        .filter_map(|f| match f {
            Frame::Forward(f) => Some(f.id),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![a, b]);
    // a is reported; the link dies before b's report.
    let report = |id| {
        Frame::Report(Report {
            entries: vec![ReportEntry {
                id,
                server: ServerId(2),
                status: DeliveryStatus::Delivered,
            }],
        })
    };
    t.frames(conn, vec![report(a)]);
    assert_eq!(
        t.completed(),
        vec![(
            1,
            vec![ReportEntry {
                id: a,
                server: ServerId(2),
                status: DeliveryStatus::Delivered
            }]
        )]
    );
    let c = t.submit(&mut origin, 3);
    t.link
        .handle_down(conn, LinkDown::Lost("timed out".into()), t.now);
    assert_eq!(t.link.exchange(), None);
    t.advance(Duration::from_millis(100));
    t.up();
    let resent: Vec<MessageId> = t
        .written()
        .into_iter()
        .filter_map(|f| match f {
            Frame::Forward(f) => Some(f.id),
            _ => None,
        })
        .collect();
    assert_eq!(resent, vec![b, c]);
    assert_eq!(t.link.metrics().forwards_resent.get(), 2);
    // Unreported at the deadline: timed out, one outcome per target.
    t.advance(Duration::from_secs(10));
    let done = t.completed();
    assert_eq!(done.len(), 2);
    assert!(
        done.iter()
            .all(|(_, r)| r[0].status == DeliveryStatus::TimedOut)
    );
}

#[test]
fn copies_are_dropped_and_every_batch_is_acknowledged() {
    let mut t = T::new(true);
    t.tick();
    let conn = t.up();
    t.written();
    t.frames(conn, vec![deliver(1, 1), deliver(2, 2)]);
    assert_eq!(t.delivered().len(), 2);
    assert!(matches!(t.written().as_slice(), [Frame::Ack(a)] if a.upto == 2));
    // The exchange sends 2 again (its ack was lost) and then 3.
    t.frames(conn, vec![deliver(2, 2), deliver(3, 3)]);
    assert_eq!(t.delivered().len(), 1);
    assert_eq!(t.link.metrics().duplicates.get(), 1);
    assert!(matches!(t.written().as_slice(), [Frame::Ack(a)] if a.upto == 3));
    // A message not matching its header is refused, yet acknowledged.
    let mut forged = deliver(4, 4);
    if let Frame::Deliver(d) = &mut forged {
        d.id.seq = 99;
    }
    t.frames(conn, vec![forged]);
    assert!(t.delivered().is_empty());
    assert_eq!(t.link.metrics().rejected.get("forged_id"), 1);
    assert!(matches!(t.written().as_slice(), [Frame::Ack(a)] if a.upto == 4));
}

#[test]
fn heartbeats_while_up_and_backoff_doubles_to_its_bound() {
    let mut t = T::new(true);
    t.tick();
    let conn = t.up();
    t.written();
    t.advance(Duration::from_secs(1));
    assert!(matches!(t.written().as_slice(), [Frame::Heartbeat(_)]));
    t.link
        .handle_down(conn, LinkDown::Lost("reset".into()), t.now);
    // 100, 200, 400, 400 ms between failed attempts.
    for wait in [100, 200, 400, 400] {
        t.advance(Duration::from_millis(wait - 1));
        assert!(
            !t.outputs
                .iter()
                .any(|o| matches!(o, Output::Connect { .. }))
        );
        t.advance(Duration::from_millis(1));
        let c = t.connect_asked();
        t.link
            .handle_down(c, LinkDown::Lost("no route".into()), t.now);
    }
    // A registration resets it.
    t.advance(Duration::from_millis(400));
    let c = t.up();
    t.link.handle_down(c, LinkDown::Lost("reset".into()), t.now);
    t.advance(Duration::from_millis(100));
    t.connect_asked();
}

#[test]
fn a_newer_incarnation_or_another_exchange_is_fatal() {
    let mut t = T::new(true);
    t.tick();
    let conn = t.connect_asked();
    t.link.handle_connected(conn, t.now);
    t.link.handle_down(
        conn,
        LinkDown::Refused {
            code: ErrorCode::StaleEpoch.close_code().into(),
            reason: "epoch 4 is not the registry's current epoch 5".into(),
        },
        t.now,
    );
    t.drain();
    assert!(t.link.fatal().is_some_and(|r| r.contains("StaleEpoch")));
    assert!(t.outputs.iter().any(|o| matches!(o, Output::Fatal(_))));
    // It never tries again.
    t.advance(Duration::from_secs(60));
    assert!(
        !t.outputs
            .iter()
            .any(|o| matches!(o, Output::Connect { .. }))
    );

    let mut t = T::new(true);
    t.tick();
    let conn = t.connect_asked();
    t.link.handle_connected(conn, t.now);
    t.frames(conn, vec![registered(ServerId(101))]);
    assert!(
        t.link
            .fatal()
            .is_some_and(|r| r.contains("reached exchange 101"))
    );

    // Any other refusal is retried.
    let mut t = T::new(true);
    t.tick();
    let conn = t.connect_asked();
    t.link.handle_connected(conn, t.now);
    let refused = LinkDown::Refused {
        code: ErrorCode::Internal.close_code().into(),
        reason: "registry unavailable".into(),
    };
    t.link.handle_down(conn, refused, t.now);
    assert!(t.link.fatal().is_none());
    t.advance(Duration::from_millis(100));
    t.connect_asked();
}

#[test]
fn stopping_times_out_what_is_unreported_and_says_goodbye() {
    let mut t = T::new(true);
    t.tick();
    let conn = t.up();
    let mut origin = Origin::new(ME, 4);
    t.submit(&mut origin, 7);
    t.link.stop(t.now);
    let done = t.completed();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1[0].status, DeliveryStatus::TimedOut);
    assert!(t.outputs.iter().any(|o| matches!(
        o,
        Output::Close { conn: c, code, .. } if *c == conn && *code == wire::CLOSE_GOING_AWAY
    )));
    assert_eq!(t.link.room(), 0);
}

/// Once the exchange has granted a lease, a connection attempt is given up
/// after a quarter of it (at least 250 ms) and the backoff stays within a
/// quarter of it: a live server is back within half a lease of the
/// exchange listening again, however long a QUIC handshake to nobody
/// would wait. Every registration is counted (the shell audits the
/// session rows after each).
#[test]
fn a_granted_lease_bounds_connection_attempts_and_backoff() {
    let mut t = T::new(true);
    t.tick();
    // Before any lease: an attempt may take `register_timeout` (3 s).
    let c = t.connect_asked();
    t.advance(Duration::from_millis(2_999));
    assert_eq!(t.link.conn(), Some(c));
    t.advance(Duration::from_millis(1));
    assert_eq!(t.link.conn(), None, "attempt given up at register_timeout");
    t.advance(Duration::from_millis(100));
    assert_eq!(t.link.registrations(), 0);
    let conn = t.connect_asked();
    t.link.handle_connected(conn, t.now);
    t.written();
    t.frames(
        conn,
        vec![Frame::Registered(Registered {
            exchange: EX,
            exchange_epoch: 1,
            lease_ms: 1_200,
            max_frame: DEFAULT_MAX_FRAME as u32,
        })],
    );
    assert_eq!(t.link.registrations(), 1);
    t.link
        .handle_down(conn, LinkDown::Lost("reset".into()), t.now);
    // Lease 1.2 s: attempts end after 300 ms; backoff 100, 200, then 300
    // (not reconnect_max's 400).
    for wait in [100, 200, 300, 300] {
        t.advance(Duration::from_millis(wait));
        let c = t.connect_asked();
        t.advance(Duration::from_millis(299));
        assert_eq!(t.link.conn(), Some(c), "still trying");
        t.advance(Duration::from_millis(1));
        assert_eq!(
            t.link.conn(),
            None,
            "attempt given up after a quarter lease"
        );
        assert!(
            t.outputs
                .iter()
                .any(|o| matches!(o, Output::Close { conn, .. } if *conn == c)),
            "the shell is told to drop the attempt"
        );
        t.outputs.clear();
    }
    t.advance(Duration::from_millis(300));
    let c = t.up();
    assert_eq!(t.link.registrations(), 2);
    assert_eq!(t.link.conn(), Some(c));
}

/// A 905 sent again after a link loss goes without the rows of targets that
/// already have an outcome (a target must never be handed a message after
/// it was reported anything but delivered), and its completion says it
/// was resent: `overloaded` for a later copy then proves nothing, as an
/// earlier copy may have been handed over. A 905 first written after the
/// reconnect is not resent.
#[test]
fn a_resent_905_leaves_out_reported_targets_and_says_it_was_resent() {
    let mut t = T::new(true);
    t.tick();
    let mut origin = Origin::new(ME, 4);
    let conn = t.up();
    let fwd = origin
        .forward(
            &mut message(ME),
            [(ServerId(2), row()), (ServerId(3), row())],
            EX,
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
    let m = fwd.id;
    t.link.submit(fwd.id, fwd.frame, fwd.targets, 7, t.now);
    t.written();
    let entry = |id, server, status| ReportEntry {
        id,
        server: ServerId(server),
        status,
    };
    t.frames(
        conn,
        vec![Frame::Report(Report {
            entries: vec![entry(m, 2, DeliveryStatus::Overloaded)],
        })],
    );
    assert!(t.completed().is_empty(), "3 has no outcome yet");
    t.link
        .handle_down(conn, LinkDown::Lost("timed out".into()), t.now);
    // Submitted while down: its first copy goes out after the reconnect.
    let n = t.submit(&mut origin, 8);
    t.advance(Duration::from_millis(100));
    let conn = t.up();
    let rows: Vec<(MessageId, Vec<ServerId>)> = t
        .written()
        .into_iter()
        .filter_map(|f| match f {
            Frame::Forward(f) => Some((f.id, f.rows.iter().map(|r| r.server).collect())),
            _ => None,
        })
        .collect();
    assert_eq!(
        rows,
        vec![(m, vec![ServerId(3)]), (n, vec![ServerId(2)])],
        "the resent 905 names only the target still waiting"
    );
    t.frames(
        conn,
        vec![Frame::Report(Report {
            entries: vec![
                entry(m, 3, DeliveryStatus::Overloaded),
                entry(n, 2, DeliveryStatus::Overloaded),
            ],
        })],
    );
    t.drain();
    let done: Vec<(u64, bool)> = t
        .outputs
        .iter()
        .filter_map(|o| match o {
            Output::Completed { reply, resent, .. } => Some((*reply, *resent)),
            _ => None,
        })
        .collect();
    assert_eq!(done, vec![(7, true), (8, false)]);
}

/// Locate through the registry: answer the link's question with `rows`
/// and take the connection it asks for.
fn locate(t: &mut T, rows: Vec<ExchangeRow>) -> (ConnId, ServerId) {
    t.drain();
    let i = t
        .outputs
        .iter()
        .position(|o| matches!(o, Output::Locate(_)))
        .unwrap_or_else(|| panic!("no locate in {:?}", t.outputs));
    let Output::Locate(ask) = t.outputs.remove(i) else {
        unreachable!()
    };
    t.link.handle_exchanges(ask, Ok(rows), t.now);
    t.drain();
    let i = t
        .outputs
        .iter()
        .position(|o| matches!(o, Output::Connect { .. }))
        .unwrap_or_else(|| panic!("no connect in {:?}", t.outputs));
    match t.outputs.remove(i) {
        Output::Connect { conn, exchange, .. } => (conn, exchange),
        _ => unreachable!(),
    }
}

fn two_exchanges() -> Vec<ExchangeRow> {
    [EX, ServerId(101)]
        .into_iter()
        .map(|id| ExchangeRow {
            id,
            address: format!("127.0.0.1:{}", 4000 + id.0),
            up: true,
            attached: 0,
        })
        .collect()
}

#[test]
fn a_lost_exchange_is_tried_again_briefly_and_a_stopping_one_left_at_once() {
    let mut t = T::new(false);
    t.tick();
    let (conn, ex) = locate(&mut t, two_exchanges());
    assert_eq!(ex, EX, "the preferred exchange");
    t.link.handle_connected(conn, t.now);
    t.written();
    t.frames(conn, vec![registered(EX)]);
    // A lost link: back to the same exchange first (a blip must not move
    // the server) ...
    t.link
        .handle_down(conn, LinkDown::Lost("timed out".into()), t.now);
    t.advance(Duration::from_millis(100));
    let (conn, ex) = locate(&mut t, two_exchanges());
    assert_eq!(ex, EX);
    // ... for a quarter of the lease (10 s here); then, the attempts at it
    // failing, to the other one.
    t.link
        .handle_down(conn, LinkDown::Lost("no answer".into()), t.now);
    t.advance(Duration::from_millis(2_500));
    let (conn, ex) = locate(&mut t, two_exchanges());
    assert_eq!(ex, ServerId(101));
    t.link.handle_connected(conn, t.now);
    t.written();
    t.frames(conn, vec![registered(ServerId(101))]);
    assert_eq!(t.link.exchange(), Some(ServerId(101)));
    // An exchange that closes the link because it is stopping is left at
    // once (no quarter lease of retries at it).
    t.link.handle_down(
        conn,
        LinkDown::Refused {
            code: u64::from(wire::CLOSE_GOING_AWAY),
            reason: "exchange shutting down".into(),
        },
        t.now,
    );
    t.advance(Duration::from_millis(100));
    let (_, ex) = locate(&mut t, two_exchanges());
    assert_eq!(ex, EX);
}
