//! Two and three exchange cores on one hand-driven network: peer links
//! dialled from the registry, a 905 relayed once per peer exchange, outcomes
//! back to the origin, and a target moving between exchanges with what was
//! on its way to it following in order. The registry is a small model that
//! answers at once (the simulator in `iim-sim` answers late, wrongly or
//! never).

mod common;

use bytes::BytesMut;
use common::forward;
use iim_core::ConnId;
use iim_core::exchange::{
    Answer, AppServerRow, Config, Exchange, ExchangeMetrics, ExchangeRow, LinkEnd, Output, Query,
    Registration, RouteState,
};
use iim_core::origin::Origin;
use iim_proto::types::{MessageId, ServerId};
use iim_proto::wire::{
    self, Ack906, DEFAULT_MAX_FRAME, DeliveryStatus, Frame, Register, ReportEntry,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(2);

fn config(id: ServerId) -> Config {
    Config {
        id,
        epoch: 1,
        lease: LEASE,
        rejoin: LEASE,
        grace: Duration::from_secs(1),
        max_frame: DEFAULT_MAX_FRAME,
        handshake_timeout: Duration::from_secs(5),
        max_links: 16,
        queue_max_frames: 1_000,
        queue_max_bytes: 1 << 20,
        sweep_period: LEASE / 3,
        ask_timeout: Duration::from_secs(30),
        split: Default::default(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// Exchange (by index), its connection.
    Ex(usize, ConnId),
    /// An app server.
    App(u32),
}

#[derive(Default)]
struct Row {
    epoch: u64,
    exchange: Option<ServerId>,
    attach_epoch: u64,
    down: bool,
}

struct Net {
    ex: Vec<Exchange>,
    ids: Vec<ServerId>,
    now: Instant,
    /// Both ends of every open connection.
    pipes: BTreeMap<End, End>,
    /// Accepted connections whose first frame is still to come.
    first_frame: BTreeSet<End>,
    registry: BTreeMap<u32, Row>,
    /// Frames written to each app server, not yet looked at.
    inbox: BTreeMap<u32, Vec<Frame>>,
    next_conn: u64,
    /// App server -> (exchange index, its connection there).
    attached: BTreeMap<u32, (usize, ConnId)>,
    /// Dials asked for, carried out once everything else has moved (so the
    /// peer has read the registry, as it would have in the time a
    /// handshake takes).
    dials: VecDeque<(usize, ServerId)>,
    /// Pairs of exchanges that cannot reach each other (dials fail).
    cut: BTreeSet<(usize, usize)>,
}

impl Net {
    /// `n` exchanges (ids 100, 101, …) and app servers `apps`, none
    /// attached yet; the first sweep links the exchanges.
    fn new(n: usize, apps: &[u32]) -> Net {
        let now = Instant::now();
        let ids: Vec<ServerId> = (0..n).map(|i| ServerId(100 + i as u32)).collect();
        let ex = ids
            .iter()
            .map(|id| {
                Exchange::new(
                    config(*id),
                    vec![],
                    Arc::new(ExchangeMetrics::default()),
                    now,
                )
            })
            .collect();
        let mut net = Net {
            ex,
            ids,
            now,
            pipes: BTreeMap::new(),
            first_frame: BTreeSet::new(),
            registry: apps
                .iter()
                .map(|a| {
                    (
                        *a,
                        Row {
                            epoch: 1,
                            ..Row::default()
                        },
                    )
                })
                .collect(),
            inbox: BTreeMap::new(),
            next_conn: 1,
            attached: BTreeMap::new(),
            dials: VecDeque::new(),
            cut: BTreeSet::new(),
        };
        for i in 0..n {
            net.ex[i].handle_timeout(now);
        }
        net.pump();
        net
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        ConnId(self.next_conn)
    }

    fn answer(&mut self, i: usize, query: Query) -> Answer {
        let me = self.ids[i];
        match query {
            Query::RecordRegistration { server, epoch } => {
                let r = self.registry.get_mut(&server.0).expect("known server");
                if epoch != r.epoch {
                    return Answer::Registration(Ok(Registration::StaleEpoch { current: r.epoch }));
                }
                r.attach_epoch += 1;
                r.exchange = Some(me);
                r.down = false;
                Answer::Registration(Ok(Registration::Accepted {
                    attach_epoch: r.attach_epoch,
                }))
            }
            Query::MarkDown {
                server,
                epoch,
                attach_epoch,
            } => {
                let r = self.registry.get_mut(&server.0).expect("known server");
                let guard = match attach_epoch {
                    Some(a) => r.attach_epoch == a,
                    None => r.exchange == Some(me),
                };
                let applied = r.epoch == epoch && guard;
                if applied {
                    r.down = true;
                }
                Answer::MarkedDown(Ok(applied))
            }
            Query::AppServers => Answer::AppServers(Ok(self
                .registry
                .iter()
                .map(|(id, r)| AppServerRow {
                    id: ServerId(*id),
                    epoch: r.epoch,
                    exchange: r.exchange,
                    attach_epoch: r.attach_epoch,
                    down: r.down,
                })
                .collect())),
            Query::Exchanges => Answer::Exchanges(Ok(self
                .ids
                .iter()
                .map(|id| ExchangeRow {
                    id: *id,
                    epoch: 1,
                    up: true,
                    address: format!("exchange-{}", id.0),
                })
                .collect())),
            Query::Touch(_) | Query::RecordLinks { .. } => Answer::Done(Ok(())),
        }
    }

    /// Carry every output until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.ex.len() {
                while let Some(o) = self.ex[i].poll_output() {
                    moved = true;
                    self.output(i, o);
                }
            }
            if !moved {
                match self.dials.pop_front() {
                    Some((i, peer)) => self.dial(i, peer),
                    None => return,
                }
            }
        }
    }

    fn output(&mut self, i: usize, o: Output) {
        let now = self.now;
        match o {
            Output::Ask { id, query } => {
                let a = self.answer(i, query);
                self.ex[i].handle_answer(id, a, now);
            }
            Output::Dial { peer, .. } => self.dials.push_back((i, peer)),
            Output::Transmit(conn) => {
                let mut buf = BytesMut::new();
                for c in self.ex[i].poll_transmit(conn, usize::MAX) {
                    buf.extend_from_slice(&c);
                }
                let mut frames = VecDeque::new();
                while let Some(f) = wire::decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
                    frames.push_back(f);
                }
                match self.pipes.get(&End::Ex(i, conn)).copied() {
                    Some(End::App(s)) => self.inbox.entry(s).or_default().extend(frames),
                    Some(end @ End::Ex(j, c)) => {
                        if self.first_frame.remove(&end) {
                            match frames.pop_front() {
                                Some(Frame::PeerHello(h)) => {
                                    self.ex[j].handle_peer_hello(c, h, Ok(()), now)
                                }
                                other => panic!("first frame on a peer link: {other:?}"),
                            }
                        }
                        if !frames.is_empty() {
                            self.ex[j].handle_frames(c, frames.into(), now);
                        }
                    }
                    None => {}
                }
            }
            Output::Close { conn, .. } => {
                if let Some(other) = self.pipes.remove(&End::Ex(i, conn)) {
                    self.pipes.remove(&other);
                    if let End::Ex(j, c) = other {
                        let end = LinkEnd::Closed {
                            clean: false,
                            detail: "closed by the peer".into(),
                        };
                        self.ex[j].handle_end(c, end, now);
                    }
                    if let End::App(s) = other {
                        self.attached.remove(&s);
                    }
                }
            }
            Output::Stopped => {}
        }
    }

    fn dial(&mut self, i: usize, peer: ServerId) {
        let now = self.now;
        let j = self
            .ids
            .iter()
            .position(|x| *x == peer)
            .expect("known peer");
        if self.cut.contains(&(i.min(j), i.max(j))) {
            self.ex[i].dial_failed(peer, now);
            return;
        }
        let (a, b) = (self.conn(), self.conn());
        self.pipes.insert(End::Ex(i, a), End::Ex(j, b));
        self.pipes.insert(End::Ex(j, b), End::Ex(i, a));
        self.first_frame.insert(End::Ex(j, b));
        self.ex[j].accept(b, now);
        self.ex[i].peer_dialed(a, peer, now);
    }

    /// App server `s` registers with exchange `i`.
    fn register(&mut self, s: u32, i: usize) {
        let c = self.conn();
        self.pipes.insert(End::Ex(i, c), End::App(s));
        self.pipes.insert(End::App(s), End::Ex(i, c));
        self.attached.insert(s, (i, c));
        let now = self.now;
        self.ex[i].accept(c, now);
        let reg = Register {
            server: ServerId(s),
            epoch: self.registry[&s].epoch,
            max_frame: DEFAULT_MAX_FRAME as u32,
        };
        self.ex[i].handle_register(c, reg, Ok(()), now);
        self.pump();
        let first = self.inbox.get_mut(&s).map(|v| v.remove(0));
        assert!(matches!(first, Some(Frame::Registered(_))), "{first:?}");
    }

    /// Exchanges `i` and `j` can no longer reach each other: their link
    /// goes down (both notice) and dials fail until `heal`.
    fn cut_peers(&mut self, i: usize, j: usize) {
        self.cut.insert((i.min(j), i.max(j)));
        let c = self.ex[i].peer_link(self.ids[j]).expect("linked");
        let other = self.pipes.remove(&End::Ex(i, c)).expect("pipe");
        self.pipes.remove(&other);
        let now = self.now;
        let lost = || LinkEnd::Closed {
            clean: false,
            detail: "cut".into(),
        };
        self.ex[i].handle_end(c, lost(), now);
        if let End::Ex(k, c2) = other {
            self.ex[k].handle_end(c2, lost(), now);
        }
        self.pump();
    }

    fn heal(&mut self, i: usize, j: usize) {
        self.cut.remove(&(i.min(j), i.max(j)));
    }

    /// App server `s`'s link is lost (the exchange notices).
    fn lose(&mut self, s: u32) {
        let (i, c) = self.attached.remove(&s).expect("attached");
        self.pipes.remove(&End::Ex(i, c));
        self.pipes.remove(&End::App(s));
        let end = LinkEnd::Closed {
            clean: false,
            detail: "timed out".into(),
        };
        let now = self.now;
        self.ex[i].handle_end(c, end, now);
        self.pump();
    }

    fn send(&mut self, s: u32, frames: Vec<Frame>) {
        let (i, c) = self.attached[&s];
        let now = self.now;
        self.ex[i].handle_frames(c, frames, now);
        self.pump();
    }

    fn take(&mut self, s: u32) -> Vec<Frame> {
        self.inbox.remove(&s).unwrap_or_default()
    }

    /// Take the 906s written to `s`, acknowledge them all; their (id, seq).
    fn deliver(&mut self, s: u32) -> Vec<(MessageId, u64)> {
        let got: Vec<_> = self
            .take(s)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Deliver(d) => Some(d),
                _ => None,
            })
            .collect();
        if let Some(last) = got.last() {
            let upto = last.no;
            self.send(s, vec![Frame::Ack(Ack906 { upto })]);
        }
        got.into_iter().map(|d| (d.id, d.seq)).collect()
    }

    fn reports(&mut self, s: u32) -> Vec<ReportEntry> {
        self.take(s)
            .into_iter()
            .flat_map(|f| match f {
                Frame::Report(r) => r.entries,
                _ => vec![],
            })
            .collect()
    }

    /// Let `d` pass, in steps of 50 ms (timers fire when they are due).
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + Duration::from_millis(50)).min(end);
            for i in 0..self.ex.len() {
                self.ex[i].handle_timeout(self.now);
            }
            self.pump();
        }
    }
}

fn delivered(id: MessageId, server: u32) -> ReportEntry {
    ReportEntry {
        id,
        server: ServerId(server),
        status: DeliveryStatus::Delivered,
    }
}

#[test]
fn a_905_is_relayed_once_per_peer_and_reported_to_its_origin() {
    let mut net = Net::new(3, &[1, 2, 3, 4]);
    for i in 0..3 {
        assert_eq!(
            net.ex[i].peer_links(),
            2,
            "exchange {i} linked to both others"
        );
    }
    net.register(1, 0);
    net.register(2, 1);
    net.register(3, 1);
    net.register(4, 2);
    assert_eq!(
        net.ex[0].route_place(ServerId(2)),
        Some((ServerId(101), Some(1))),
        "announced at once"
    );
    let mut origin = Origin::new(ServerId(1), 1);
    let (id, f) = forward(&mut origin, ServerId(100), &[2, 3, 4]);
    net.send(1, vec![f]);
    // One relay per peer exchange, carrying only its servers' rows.
    assert_eq!(net.ex[1].metrics().relays_in.get(), 1);
    assert_eq!(net.ex[2].metrics().relays_in.get(), 1);
    assert_eq!(net.ex[0].metrics().relays_out.get(), 3);
    assert_eq!(net.ex[0].relays_pending(ServerId(101)), 2);
    assert_eq!(net.deliver(2), vec![(id, 1)]);
    assert_eq!(net.deliver(3), vec![(id, 1)]);
    assert_eq!(net.deliver(4), vec![(id, 1)]);
    let mut got = net.reports(1);
    got.sort_by_key(|e| e.server);
    assert_eq!(
        got,
        vec![delivered(id, 2), delivered(id, 3), delivered(id, 4)]
    );
    assert_eq!(net.ex[0].relays_pending(ServerId(101)), 0);
    assert_eq!(net.ex[0].relays_pending(ServerId(102)), 0);
}

#[test]
fn refusals_at_the_peer_reach_the_origin_and_are_repeated_to_a_resend() {
    let mut net = Net::new(2, &[1, 2]);
    net.register(1, 0);
    net.register(2, 1);
    net.lose(2);
    net.advance(LEASE);
    assert_eq!(net.ex[1].route_state(ServerId(2)), Some(RouteState::Down));
    // Exchange 100 has not swept since: it still relays, and hears
    // server_down from the exchange the target was attached to.
    let mut origin = Origin::new(ServerId(1), 1);
    let (id, f) = forward(&mut origin, ServerId(100), &[2]);
    net.send(1, vec![f.clone()]);
    let down = ReportEntry {
        id,
        server: ServerId(2),
        status: DeliveryStatus::ServerDown,
    };
    assert_eq!(net.reports(1), vec![down]);
    // The origin sends it again without having heard: the same answer,
    // from memory, without asking the peer.
    let relays = net.ex[0].metrics().relays_out.get();
    net.send(1, vec![f]);
    assert_eq!(net.reports(1), vec![down]);
    assert_eq!(net.ex[0].metrics().relays_out.get(), relays);
}

#[test]
fn a_target_moving_exchanges_gets_what_was_on_its_way_once_and_in_order() {
    let mut net = Net::new(2, &[1, 2]);
    net.register(1, 0);
    net.register(2, 1);
    let mut origin = Origin::new(ServerId(1), 1);
    // Three 905s reach exchange 101; the target takes the first only, and
    // its acknowledgement is lost with its link.
    let sent: Vec<(MessageId, Frame)> = (0..3)
        .map(|_| forward(&mut origin, ServerId(100), &[2]))
        .collect();
    net.send(1, sent.iter().map(|(_, f)| f.clone()).collect());
    let first = net.take(2);
    assert_eq!(first.len(), 3);
    net.lose(2);
    // It re-attaches to exchange 100, the origin's own. Exchange 101 hears
    // of it (an announcement) and hands back what it held: the whole run
    // again, in order, ahead of anything newer.
    net.register(2, 0);
    assert_eq!(
        net.ex[1].route_state(ServerId(2)),
        Some(RouteState::Elsewhere)
    );
    let (late, f) = forward(&mut origin, ServerId(100), &[2]);
    net.send(1, vec![f]);
    let got = net.deliver(2);
    let ids: Vec<MessageId> = got.iter().map(|(id, _)| *id).collect();
    let mut want: Vec<MessageId> = sent.iter().map(|(id, _)| *id).collect();
    want.push(late);
    assert_eq!(ids, want, "in the origin's order, each once");
    let seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    // Each outcome reported once: delivered.
    let mut reports = net.reports(1);
    reports.sort_by_key(|e| e.id.seq);
    assert_eq!(
        reports,
        want.iter().map(|id| delivered(*id, 2)).collect::<Vec<_>>()
    );
    // Nothing left anywhere, and the lease at 101 marks nothing down.
    net.advance(LEASE * 2);
    assert_eq!(net.ex[1].queued(ServerId(2)), (0, 0));
    assert_eq!(net.ex[0].relays_pending(ServerId(101)), 0);
    assert!(!net.registry[&2].down);
    assert_eq!(net.ex[1].metrics().marked_down.get(), 0);
}

#[test]
fn a_relay_to_an_exchange_the_target_left_is_answered_with_where_it_is() {
    let mut net = Net::new(3, &[1, 2]);
    net.register(1, 0);
    net.register(2, 1);
    // Server 2 moves from 101 to 102, and exchange 100 misses the
    // announcement (its link to 102 is down for the moment).
    net.cut_peers(0, 2);
    net.lose(2);
    net.register(2, 2);
    // 100 learnt nothing from 102; 101 knows (announced to it).
    assert_eq!(
        net.ex[0].route_place(ServerId(2)).map(|p| p.0),
        Some(ServerId(101))
    );
    assert_eq!(
        net.ex[1].route_place(ServerId(2)).map(|p| p.0),
        Some(ServerId(102))
    );
    // A send relayed to 101 is answered "attached to 102"; it waits at 100
    // until the link to 102 is back (the next sweep dials it).
    let mut origin = Origin::new(ServerId(1), 1);
    let (id, f) = forward(&mut origin, ServerId(100), &[2]);
    net.send(1, vec![f]);
    assert_eq!(net.ex[1].metrics().relays_not_here.get(), 1);
    assert_eq!(net.ex[0].relays_pending(ServerId(102)), 1);
    assert!(net.take(2).is_empty());
    net.heal(0, 2);
    net.advance(LEASE / 3);
    assert_eq!(net.ex[0].peer_links(), 2);
    assert_eq!(net.deliver(2), vec![(id, 1)]);
    assert_eq!(net.reports(1), vec![delivered(id, 2)]);
}

#[test]
fn a_lease_ending_at_an_exchange_the_server_left_marks_nothing_down() {
    let mut net = Net::new(2, &[1, 2]);
    net.register(1, 0);
    net.register(2, 0);
    // Exchange 100 never hears that 2 moved to 101 (their link is cut), and
    // holds a 906 for it when the lease ends: the registry refuses the
    // mark-down (a newer attachment), the sweep says where 2 is, and the
    // 906 goes there instead of being reported server_down.
    net.cut_peers(0, 1);
    net.lose(2);
    let mut origin = Origin::new(ServerId(1), 1);
    let (id, f) = forward(&mut origin, ServerId(100), &[2]);
    net.send(1, vec![f]);
    net.register(2, 1);
    net.heal(0, 1);
    net.advance(LEASE);
    assert!(!net.registry[&2].down, "the fence held");
    assert_eq!(
        net.ex[0].route_state(ServerId(2)),
        Some(RouteState::Elsewhere)
    );
    // The peer link came back at a sweep meanwhile: delivered, and nothing
    // but delivered was reported.
    net.advance(LEASE / 3);
    assert_eq!(net.deliver(2), vec![(id, 1)]);
    assert_eq!(net.reports(1), vec![delivered(id, 2)]);
    assert_eq!(net.ex[0].metrics().marked_down.get(), 0);
}

#[test]
fn relays_to_an_unreachable_exchange_are_reported_timed_out_within_a_lease() {
    let mut net = Net::new(2, &[1, 2]);
    net.register(1, 0);
    net.register(2, 1);
    net.cut_peers(0, 1);
    let mut origin = Origin::new(ServerId(1), 1);
    let (first, f) = forward(&mut origin, ServerId(100), &[2]);
    net.send(1, vec![f]);
    assert!(
        net.reports(1).is_empty(),
        "not yet: the peer may be back soon"
    );
    // A lease without a link: what waits is reported timed_out (outcome
    // unknown) and given up, and so is anything for that peer from now on,
    // at once.
    net.advance(LEASE + LEASE / 3);
    let timed_out = |id| ReportEntry {
        id,
        server: ServerId(2),
        status: DeliveryStatus::TimedOut,
    };
    assert_eq!(net.reports(1), vec![timed_out(first)]);
    let (second, f) = forward(&mut origin, ServerId(100), &[2]);
    net.send(1, vec![f]);
    assert_eq!(net.reports(1), vec![timed_out(second)]);
    assert_eq!(net.ex[0].metrics().relays_unreachable.get(), 2);
    assert_eq!(net.ex[0].relays_pending(ServerId(101)), 0);
    // The exchanges reach each other again: new messages flow; the ones
    // given up do not arrive late behind them.
    net.heal(0, 1);
    net.advance(LEASE / 3);
    assert_eq!(net.ex[0].peer_links(), 1);
    let (third, f) = forward(&mut origin, ServerId(100), &[2]);
    net.send(1, vec![f]);
    assert_eq!(net.deliver(2), vec![(third, 3)]);
    assert_eq!(net.reports(1), vec![delivered(third, 2)]);
}
