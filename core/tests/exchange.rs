//! The exchange core driven by hand, one input at a time, on a clock that
//! only moves when a test moves it: registration, the 905 -> 906 path, acks
//! and reports, leases, refusals repeated to a resend, a clean departure,
//! shutdown. (The simulator in `iim-sim` drives the same core through
//! thousands of random schedules; these are the paths spelled out.)

mod common;

use bytes::{Bytes, BytesMut};
use iim_core::exchange::{
    Answer, AppServerRow, Config, Exchange, ExchangeMetrics, LinkEnd, Output, Query, Registration,
    RouteState,
};
use iim_core::origin::Origin;
use iim_core::{AskId, ConnId};
use iim_proto::types::{ServerId, UserId};
use iim_proto::wire::{
    self, Ack906, CLOSE_GOING_AWAY, DEFAULT_MAX_FRAME, DeliveryStatus, ErrorCode, Frame, Message,
    Register, ReportEntry,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EX: ServerId = ServerId(100);
const LEASE: Duration = Duration::from_secs(2);

struct T {
    ex: Exchange,
    now: Instant,
    outputs: Vec<Output>,
    /// The registry's attach epochs: one more per recorded registration.
    attachments: u64,
}

fn config(queue_max_frames: usize) -> Config {
    Config {
        id: EX,
        epoch: 1,
        lease: LEASE,
        rejoin: LEASE,
        grace: Duration::from_secs(1),
        max_frame: DEFAULT_MAX_FRAME,
        handshake_timeout: Duration::from_secs(5),
        max_links: 16,
        queue_max_frames,
        queue_max_bytes: 1 << 20,
        sweep_period: Duration::from_secs(60),
        ask_timeout: Duration::from_secs(30),
        split: Default::default(),
    }
}

impl T {
    fn new(queue_max_frames: usize) -> T {
        let now = Instant::now();
        let ex = Exchange::new(
            config(queue_max_frames),
            vec![],
            Arc::new(ExchangeMetrics::default()),
            now,
        );
        let mut t = T {
            ex,
            now,
            outputs: vec![],
            attachments: 0,
        };
        // The first sweep asks for the app servers: none yet.
        t.ex.handle_timeout(now);
        let id = t.take_ask(|q| *q == Query::AppServers);
        t.ex.handle_answer(id, Answer::AppServers(Ok(vec![])), now);
        let id = t.take_ask(|q| *q == Query::Exchanges);
        t.ex.handle_answer(id, Answer::Exchanges(Ok(vec![])), now);
        let id = t.take_ask(|q| matches!(q, Query::Touch(_)));
        t.ex.handle_answer(id, Answer::Done(Ok(())), now);
        // No peer exchanges: it records that it has no links.
        let id = t.take_ask(|q| matches!(q, Query::RecordLinks { peers, .. } if peers.is_empty()));
        t.ex.handle_answer(id, Answer::Done(Ok(())), now);
        t.drain();
        t.outputs.clear();
        t
    }

    fn drain(&mut self) {
        while let Some(o) = self.ex.poll_output() {
            self.outputs.push(o);
        }
    }

    fn take_ask(&mut self, want: impl Fn(&Query) -> bool) -> AskId {
        self.drain();
        let i = self
            .outputs
            .iter()
            .position(|o| matches!(o, Output::Ask { query, .. } if want(query)))
            .unwrap_or_else(|| panic!("no such question in {:?}", self.outputs));
        match self.outputs.remove(i) {
            Output::Ask { id, .. } => id,
            _ => unreachable!(),
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.ex.handle_timeout(self.now);
        self.drain();
    }

    /// Connect `server` (epoch `epoch`) as link `conn`, registry agreeing;
    /// what the exchange writes after `Registered`.
    fn register(&mut self, conn: u64, server: u32, epoch: u64) -> Vec<Frame> {
        let c = ConnId(conn);
        self.ex.accept(c, self.now);
        let reg = Register {
            server: ServerId(server),
            epoch,
            max_frame: DEFAULT_MAX_FRAME as u32,
        };
        self.ex.handle_register(c, reg, Ok(()), self.now);
        let id = self.take_ask(|q| {
            *q == Query::RecordRegistration {
                server: ServerId(server),
                epoch,
            }
        });
        self.attachments += 1;
        self.ex.handle_answer(
            id,
            Answer::Registration(Ok(Registration::Accepted {
                attach_epoch: self.attachments,
            })),
            self.now,
        );
        let mut frames = self.frames_to(conn);
        assert!(
            matches!(frames.first(), Some(Frame::Registered(r)) if r.exchange == EX),
            "{frames:?}"
        );
        frames.remove(0);
        frames
    }

    /// Everything the exchange writes to `conn` now, decoded.
    fn frames_to(&mut self, conn: u64) -> Vec<Frame> {
        self.drain();
        let mut buf = BytesMut::new();
        for chunk in self.ex.poll_transmit(ConnId(conn), usize::MAX) {
            buf.extend_from_slice(&chunk);
        }
        self.outputs
            .retain(|o| !matches!(o, Output::Transmit(c) if *c == ConnId(conn)));
        let mut out = vec![];
        while let Some(f) = wire::decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            out.push(f);
        }
        out
    }

    fn reports_to(&mut self, conn: u64) -> Vec<ReportEntry> {
        self.frames_to(conn)
            .into_iter()
            .flat_map(|f| match f {
                Frame::Report(r) => r.entries,
                _ => vec![],
            })
            .collect()
    }

    fn closed(&mut self, conn: u64) -> Option<(u32, String)> {
        self.drain();
        self.outputs.iter().find_map(|o| match o {
            Output::Close {
                conn: c,
                code,
                reason,
            } if *c == ConnId(conn) => Some((*code, reason.clone())),
            _ => None,
        })
    }

    fn frames(&mut self, conn: u64, frames: Vec<Frame>) {
        self.ex.handle_frames(ConnId(conn), frames, self.now);
        self.drain();
    }
}

/// One 905 from `origin` to one user on each of `targets`.
fn forward(origin: &mut Origin, targets: &[u32]) -> (iim_proto::types::MessageId, Frame) {
    common::forward(origin, EX, targets)
}

#[test]
fn a_905_becomes_one_906_per_target_and_acks_become_reports() {
    let mut t = T::new(1_000);
    t.register(1, 1, 1);
    t.register(2, 2, 1);
    t.register(3, 3, 1);
    let mut origin = Origin::new(ServerId(1), 1);
    let (id, f) = forward(&mut origin, &[2, 3]);
    t.frames(1, vec![f]);
    for (conn, server) in [(2, 2u32), (3, 3)] {
        let frames = t.frames_to(conn);
        let [Frame::Deliver(d)] = frames.as_slice() else {
            panic!("{frames:?}")
        };
        assert_eq!((d.id, d.no, d.seq), (id, 1, 1));
        assert_eq!(d.users[0].user, UserId(u64::from(server) * 10));
        let msg = Message::decode(&d.message).unwrap();
        assert_eq!(msg.body, Bytes::from_static(b"hello"));
    }
    // Nothing is reported before the targets acknowledge.
    assert!(t.reports_to(1).is_empty());
    t.frames(2, vec![Frame::Ack(Ack906 { upto: 1 })]);
    t.frames(3, vec![Frame::Ack(Ack906 { upto: 1 })]);
    let reports = t.reports_to(1);
    assert_eq!(reports.len(), 2);
    assert!(
        reports
            .iter()
            .all(|r| r.id == id && r.status == DeliveryStatus::Delivered)
    );
    assert_eq!(t.ex.queued(ServerId(2)), (0, 0));
}

#[test]
fn an_ack_for_what_was_never_sent_closes_only_that_link() {
    let mut t = T::new(1_000);
    t.register(1, 1, 1);
    t.register(2, 2, 1);
    t.frames(2, vec![Frame::Ack(Ack906 { upto: 7 })]);
    let (code, _) = t.closed(2).expect("closed");
    assert_eq!(code, ErrorCode::Protocol.close_code());
    assert_eq!(
        t.ex.route_state(ServerId(2)),
        Some(RouteState::Disconnected)
    );
    assert_eq!(t.ex.route_state(ServerId(1)), Some(RouteState::Up));
    assert_eq!(t.ex.metrics().rejections.get("protocol"), 1);
}

#[test]
fn a_forged_source_closes_the_link_and_unknown_targets_are_reported() {
    let mut t = T::new(1_000);
    t.register(1, 1, 1);
    let mut liar = Origin::new(ServerId(2), 1);
    let (_, f) = forward(&mut liar, &[3]);
    t.frames(1, vec![f]);
    let (code, reason) = t.closed(1).expect("closed");
    assert_eq!(code, ErrorCode::ForgedSource.close_code());
    assert!(reason.contains("does not match"), "{reason}");

    t.register(4, 1, 1);
    let mut origin = Origin::new(ServerId(1), 1);
    let (id, f) = forward(&mut origin, &[42]);
    t.frames(4, vec![f]);
    // Not known here: looked up in the registry at once (it may have just
    // registered with another exchange), and unknown there too.
    assert!(t.reports_to(4).is_empty());
    assert_eq!(t.ex.route_state(ServerId(42)), Some(RouteState::Looking));
    let ask = t.take_ask(|q| *q == Query::AppServers);
    t.ex.handle_answer(ask, Answer::AppServers(Ok(vec![])), t.now);
    assert_eq!(
        t.reports_to(4),
        vec![ReportEntry {
            id,
            server: ServerId(42),
            status: DeliveryStatus::UnknownServer
        }]
    );
    assert_eq!(t.ex.route_state(ServerId(42)), None);
}

#[test]
fn a_lost_link_keeps_its_queue_for_the_lease_then_reports_server_down() {
    let mut t = T::new(1_000);
    t.register(1, 1, 1);
    t.register(2, 2, 1);
    let mut origin = Origin::new(ServerId(1), 1);
    let (id, f) = forward(&mut origin, &[2]);
    t.frames(1, vec![f]);
    assert_eq!(t.frames_to(2).len(), 1);
    let end = LinkEnd::Closed {
        clean: false,
        detail: "timed out".into(),
    };
    t.ex.handle_end(ConnId(2), end, t.now);
    assert_eq!(
        t.ex.route_state(ServerId(2)),
        Some(RouteState::Disconnected)
    );
    // Back within the lease (same epoch): the unacknowledged 906 again.
    t.advance(LEASE / 2);
    let again = t.register(3, 2, 1);
    assert!(matches!(again.as_slice(), [Frame::Deliver(d)] if d.id == id && d.no == 1));
    // Gone for longer than the lease: the registry is asked to mark it
    // down, naming the attachment of its last registration (the third the
    // registry recorded), so it would change nothing had the server
    // registered again meanwhile. Until the registry agrees it is not down
    // (it may have attached to another exchange).
    t.ex.handle_end(ConnId(3), LinkEnd::Finished, t.now);
    t.advance(LEASE);
    assert_eq!(
        t.ex.route_state(ServerId(2)),
        Some(RouteState::Disconnected)
    );
    assert_eq!(t.attachments, 3);
    let ask = t.take_ask(|q| {
        *q == Query::MarkDown {
            server: ServerId(2),
            epoch: 1,
            attach_epoch: Some(3),
        }
    });
    assert!(t.reports_to(1).is_empty());
    t.ex.handle_answer(ask, Answer::MarkedDown(Ok(true)), t.now);
    assert_eq!(t.ex.route_state(ServerId(2)), Some(RouteState::Down));
    assert_eq!(
        t.reports_to(1),
        vec![ReportEntry {
            id,
            server: ServerId(2),
            status: DeliveryStatus::ServerDown
        }]
    );
    // Later sends to it are answered at once.
    let (id2, f) = forward(&mut origin, &[2]);
    t.frames(1, vec![f]);
    assert_eq!(
        t.reports_to(1)[0],
        ReportEntry {
            id: id2,
            server: ServerId(2),
            status: DeliveryStatus::ServerDown
        }
    );
}

#[test]
fn a_905_sent_again_gets_the_outcome_its_first_attempt_got() {
    // A queue of one: the second 906 for server 2 is refused.
    let mut t = T::new(1);
    t.register(1, 1, 1);
    t.register(2, 2, 1);
    let mut origin = Origin::new(ServerId(1), 1);
    let (a, fa) = forward(&mut origin, &[2]);
    let (b, fb) = forward(&mut origin, &[2]);
    t.frames(1, vec![fa.clone(), fb.clone()]);
    let reports = t.reports_to(1);
    assert_eq!(
        reports,
        vec![ReportEntry {
            id: b,
            server: ServerId(2),
            status: DeliveryStatus::Overloaded
        }]
    );
    // The target takes the first; the queue has room again.
    t.frames_to(2);
    t.frames(2, vec![Frame::Ack(Ack906 { upto: 1 })]);
    assert_eq!(t.reports_to(1)[0].id, a);
    // The origin, not having heard about b (its link died), sends both
    // again: a is a copy for the target to drop, b is refused again —
    // queueing it now would put it after what the target has since had.
    t.frames(1, vec![fa, fb]);
    let reports = t.reports_to(1);
    assert_eq!(
        reports,
        vec![ReportEntry {
            id: b,
            server: ServerId(2),
            status: DeliveryStatus::Overloaded
        }]
    );
    assert_eq!(t.ex.metrics().repeated_refusals.get(), 1);
    assert_eq!(
        t.ex.queued(ServerId(2)).0,
        1,
        "only the copy of a is queued"
    );
}

#[test]
fn a_clean_departure_is_down_at_once_and_a_new_incarnation_starts_clean() {
    let mut t = T::new(1_000);
    t.register(1, 1, 1);
    t.register(2, 2, 1);
    let mut origin = Origin::new(ServerId(1), 1);
    let (id, f) = forward(&mut origin, &[2]);
    t.frames(1, vec![f]);
    // Server 2 restarts: its new epoch replaces the old incarnation, whose
    // queue is reported undeliverable.
    t.register(3, 2, 2);
    assert_eq!(t.ex.route_epoch(ServerId(2)), Some(2));
    assert_eq!(
        t.reports_to(1)[0],
        ReportEntry {
            id,
            server: ServerId(2),
            status: DeliveryStatus::ServerDown
        }
    );
    let (code, reason) = t.closed(2).expect("old link closed");
    assert_eq!(code, ErrorCode::Protocol.close_code());
    assert_eq!(reason, "replaced by a newer link");
    // The old epoch may not come back.
    t.ex.accept(ConnId(4), t.now);
    let reg = Register {
        server: ServerId(2),
        epoch: 1,
        max_frame: 65_536,
    };
    t.ex.handle_register(ConnId(4), reg, Ok(()), t.now);
    let ask = t.take_ask(|q| matches!(q, Query::RecordRegistration { epoch: 1, .. }));
    t.ex.handle_answer(
        ask,
        Answer::Registration(Ok(Registration::StaleEpoch { current: 2 })),
        t.now,
    );
    assert_eq!(t.closed(4).unwrap().0, ErrorCode::StaleEpoch.close_code());
    // Going away on purpose: down at once, no lease.
    let end = LinkEnd::Closed {
        clean: true,
        detail: "draining".into(),
    };
    t.ex.handle_end(ConnId(3), end, t.now);
    assert_eq!(t.ex.route_state(ServerId(2)), Some(RouteState::Down));
}

#[test]
fn registration_is_refused_without_a_matching_certificate_or_in_time() {
    let mut t = T::new(1_000);
    t.ex.accept(ConnId(1), t.now);
    let reg = Register {
        server: ServerId(5),
        epoch: 1,
        max_frame: 65_536,
    };
    t.ex.handle_register(
        ConnId(1),
        reg.clone(),
        Err("names server-6.iim".into()),
        t.now,
    );
    assert_eq!(
        t.closed(1).unwrap().0,
        ErrorCode::IdentityMismatch.close_code()
    );
    // A link that never registers is closed after the handshake timeout.
    t.ex.accept(ConnId(2), t.now);
    t.advance(Duration::from_secs(4));
    assert!(t.closed(2).is_none());
    t.advance(Duration::from_secs(1));
    assert_eq!(
        t.closed(2).unwrap().0,
        ErrorCode::NotRegistered.close_code()
    );
    assert_eq!(t.ex.link_count(), 0);
    // So is one whose registry question is never answered.
    t.ex.accept(ConnId(3), t.now);
    t.ex.handle_register(ConnId(3), reg, Ok(()), t.now);
    t.advance(Duration::from_secs(6));
    assert!(t.closed(3).is_some());
    assert_eq!(
        t.ex.asks_in_flight(),
        1,
        "the question itself waits for its own timeout"
    );
    t.advance(Duration::from_secs(30));
    assert_eq!(t.ex.asks_in_flight(), 0);
}

#[test]
fn shutdown_delivers_what_is_queued_then_closes_every_link() {
    let mut t = T::new(1_000);
    t.register(1, 1, 1);
    t.register(2, 2, 1);
    t.register(3, 3, 1);
    let mut origin = Origin::new(ServerId(1), 1);
    let (_, f) = forward(&mut origin, &[2]);
    t.frames(1, vec![f]);
    t.ex.shutdown(t.now);
    t.drain();
    // Links with nothing owed go at once (the origin's too: a report for
    // it later is dropped, and it sends the 905 again to the next
    // exchange); server 2 still has a 906 to take.
    assert_eq!(t.closed(3).unwrap().0, CLOSE_GOING_AWAY);
    assert_eq!(t.closed(1).unwrap().0, CLOSE_GOING_AWAY);
    assert!(t.closed(2).is_none());
    assert!(!t.ex.is_stopped());
    // New links are refused.
    t.ex.accept(ConnId(9), t.now);
    assert_eq!(t.closed(9).unwrap().0, ErrorCode::ShuttingDown.close_code());
    assert_eq!(t.ex.queued(ServerId(2)).0, 1);
    assert!(matches!(t.frames_to(2).as_slice(), [Frame::Deliver(_)]));
    t.frames(2, vec![Frame::Ack(Ack906 { upto: 1 })]);
    assert_eq!(t.closed(2).unwrap().0, CLOSE_GOING_AWAY);
    assert_eq!(t.ex.metrics().reports_dropped.get(), 1);
    assert!(t.ex.is_stopped());
    assert!(t.outputs.contains(&Output::Stopped));
}

#[test]
fn servers_served_before_a_restart_get_a_lease_to_come_back() {
    let now = Instant::now();
    let known = vec![
        AppServerRow {
            id: ServerId(1),
            epoch: 3,
            exchange: Some(EX),
            attach_epoch: 4,
            down: false,
        },
        AppServerRow {
            id: ServerId(2),
            epoch: 1,
            exchange: Some(ServerId(101)),
            attach_epoch: 2,
            down: false,
        },
    ];
    let mut ex = Exchange::new(config(10), known, Arc::new(ExchangeMetrics::default()), now);
    assert_eq!(ex.route_state(ServerId(1)), Some(RouteState::Disconnected));
    assert_eq!(ex.route_state(ServerId(2)), Some(RouteState::Elsewhere));
    assert_eq!(ex.route_place(ServerId(2)), Some((ServerId(101), Some(2))));
    ex.handle_timeout(now + LEASE);
    // The mark-down names the attachment read at start: had the server
    // registered again meanwhile (here or elsewhere), it changes nothing.
    // (A read that was behind makes it fail; the sweep then reads the row
    // again.)
    let mut asked = Vec::new();
    while let Some(o) = ex.poll_output() {
        if let Output::Ask { query, .. } = o {
            asked.push(query);
        }
    }
    assert!(
        asked.contains(&Query::MarkDown {
            server: ServerId(1),
            epoch: 3,
            attach_epoch: Some(4)
        }),
        "{asked:?}"
    );
    assert_eq!(ex.route_state(ServerId(1)), Some(RouteState::Disconnected));
}

#[test]
fn a_flooding_origin_cannot_starve_a_well_behaved_one() {
    // Server 3 is slow: it takes 906s but acknowledges none yet.
    let mut t = T::new(10);
    t.register(1, 1, 1);
    t.register(2, 2, 1);
    t.register(3, 3, 1);
    let mut flooder = Origin::new(ServerId(1), 1);
    let frames: Vec<Frame> = (0..40).map(|_| forward(&mut flooder, &[3]).1).collect();
    t.frames(1, frames);
    let refused = t.reports_to(1);
    // It keeps to half the queue; the rest of its 906s are refused.
    assert_eq!(refused.len(), 35);
    assert!(
        refused
            .iter()
            .all(|r| r.status == DeliveryStatus::Overloaded)
    );
    assert_eq!(t.ex.metrics().rejections.get("over_share"), 35);
    // The well-behaved origin's 906s are queued, not refused.
    let mut polite = Origin::new(ServerId(2), 1);
    let (a, fa) = forward(&mut polite, &[3]);
    let (b, fb) = forward(&mut polite, &[3]);
    t.frames(2, vec![fa, fb]);
    assert!(t.reports_to(2).is_empty(), "nothing refused");
    assert_eq!(t.ex.queued(ServerId(3)).0, 7);
    // And they are delivered when the target acknowledges.
    let delivered = t.frames_to(3);
    assert_eq!(delivered.len(), 7);
    t.frames(3, vec![Frame::Ack(Ack906 { upto: 7 })]);
    let reports = t.reports_to(2);
    assert_eq!(reports.len(), 2);
    assert!(
        reports
            .iter()
            .all(|r| (r.id == a || r.id == b) && r.status == DeliveryStatus::Delivered)
    );
}
