//! Several exchanges: peer links, relaying 906s to the exchange a target is
//! attached to, and learning where app servers are attached.
//!
//! Every exchange keeps one link to every other live exchange (the lower
//! id dials, both sides say `PeerHello`). A 905's rows for targets attached
//! elsewhere go into that exchange's [`RelayOutbox`] and leave as one
//! `Forward` frame per peer per 905 (the message once, that peer's rows
//! only); the peer splits it into 906s for its own targets and answers each
//! (message, target) with a `Report` entry, which goes on to the origin.
//! An entry stays in the outbox until answered: a lost peer link sends it
//! again, and when its target turns out to be attached somewhere else (an
//! `Attached` from a peer or the registry, with a higher attach epoch),
//! every entry for that target moves there, in order, before anything
//! newer — the same way an origin's outbox keeps per (origin, target)
//! order across a reconnect. See "Several exchanges" in
//! `docs/architecture.md`.

use super::*;
use crate::slots::Slots;
use bytes::BytesMut;
use iim_proto::coalesce::Coalescer;
use iim_proto::types::UserId;
use iim_proto::wire::{self, Attached, PeerHello, RowRef, UserRow};
use std::collections::BTreeSet;

/// One (message, target) relayed to a peer, not answered yet.
#[derive(Debug)]
pub(super) struct Relayed {
    pub id: MessageId,
    pub target: ServerId,
    pub seq: u64,
    pub users: Vec<UserRow>,
    pub message: Bytes,
    /// A copy may have reached the target already (written on a link
    /// since lost, or moved here from another place): a refusal now does
    /// not mean it was never handed over.
    pub maybe_handed: bool,
    /// Written on the current link.
    pub sent: bool,
}

impl Relayed {
    fn size(&self) -> usize {
        self.message.len() + 48 + 20 * self.users.len()
    }

    fn deliver(self) -> Deliver906 {
        Deliver906 {
            no: 0,
            id: self.id,
            seq: self.seq,
            users: self.users,
            message: self.message,
        }
    }
}

/// What this exchange relayed to one peer and has not heard the outcome
/// of, in the order it was relayed. Bounded per target like the delivery
/// queue the peer keeps for it.
#[derive(Debug)]
pub(super) struct RelayOutbox {
    entries: Slots<Relayed>,
    index: Map<(MessageId, ServerId), u64>,
    next: u64,
    /// Every entry below this key has been written on the current link
    /// (a hint: entries above it may be written too).
    unsent_from: u64,
    /// Targets whose entries are held back: the peer said the target is
    /// not attached to it, and this exchange does not know better yet.
    /// Newer entries must not overtake older ones, so none of the target's
    /// go out until the next sweep says where it is.
    blocked: BTreeSet<ServerId>,
    /// Entries and bytes held per target.
    held: Map<ServerId, (usize, usize)>,
    max_entries: usize,
    max_bytes: usize,
}

impl RelayOutbox {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        RelayOutbox {
            entries: Slots::default(),
            index: Map::default(),
            next: 1,
            unsent_from: 1,
            blocked: BTreeSet::new(),
            held: Map::default(),
            max_entries,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Give up every entry: a `timed_out` report entry for each goes to
    /// `out`. How many.
    pub fn give_up_all(&mut self, out: &mut Vec<ReportEntry>) -> usize {
        let n = self.entries.len();
        for r in self.entries.take_all() {
            out.push(ReportEntry {
                id: r.id,
                server: r.target,
                status: DeliveryStatus::TimedOut,
            });
        }
        self.index.clear();
        self.held.clear();
        self.blocked.clear();
        self.unsent_from = self.next;
        n
    }

    /// Hold back every entry for `target` (those written already go out
    /// again when released).
    pub fn block(&mut self, target: ServerId) {
        self.blocked.insert(target);
        for (k, r) in self.entries.iter_mut() {
            if r.target == target && r.sent {
                r.sent = false;
                r.maybe_handed = true;
                self.unsent_from = self.unsent_from.min(k);
            }
        }
    }

    /// Let held-back entries go out again. True if there were any.
    pub fn release_blocked(&mut self) -> bool {
        let any = !std::mem::take(&mut self.blocked).is_empty();
        if any {
            self.unsent_from = 0;
        }
        any
    }

    /// Add an entry at the end. `Ok(false)` when the same (message,
    /// target) is already waiting (an origin's resend): its outcome will
    /// answer both. An entry that moved here with its target is taken
    /// whatever the room (see [`DeliveryQueue::push_moved`]).
    pub fn push(&mut self, r: Relayed) -> Result<bool, PushError> {
        let size = r.size();
        let (n, bytes) = self.held.get(&r.target).copied().unwrap_or((0, 0));
        let full = n >= self.max_entries || (bytes + size > self.max_bytes && n > 0);
        // One probe of the index for both the duplicate check and the insert.
        let std::collections::hash_map::Entry::Vacant(slot) = self.index.entry((r.id, r.target))
        else {
            return Ok(false);
        };
        if full && !r.maybe_handed {
            return Err(PushError::Full);
        }
        let key = self.next;
        slot.insert(key);
        self.next += 1;
        let held = self.held.entry(r.target).or_default();
        held.0 += 1;
        held.1 += size;
        self.entries.push(key, r);
        Ok(true)
    }

    fn release(&mut self, r: &Relayed) {
        if let Some(held) = self.held.get_mut(&r.target) {
            held.0 -= 1;
            held.1 -= r.size();
            if held.0 == 0 {
                self.held.remove(&r.target);
            }
        }
    }

    pub fn remove(&mut self, id: MessageId, target: ServerId) -> Option<Relayed> {
        let key = self.index.remove(&(id, target))?;
        let r = self.entries.remove(key)?;
        self.release(&r);
        Some(r)
    }

    /// Every entry for `target`, in order, taken out.
    pub fn take_for(&mut self, target: ServerId) -> Vec<Relayed> {
        let taken = self.entries.remove_where(|r| r.target == target);
        for r in &taken {
            self.index.remove(&(r.id, r.target));
            self.release(r);
        }
        taken
    }

    /// The link is gone: everything goes out again on the next one.
    pub fn on_disconnect(&mut self) {
        for (_, r) in self.entries.iter_mut() {
            if r.sent {
                r.sent = false;
                r.maybe_handed = true;
            }
        }
        self.unsent_from = 0;
    }

    /// `Forward` frames for the unsent entries (not held back), one per
    /// run of entries of the same message, up to about `max_bytes`,
    /// appended to `out` already coalesced for one write (each message
    /// copied once, straight into the write's buffers). An entry that
    /// cannot be framed (larger than the peer accepts) is taken out and
    /// returned in `too_big`. Returns the frames written, and whether
    /// entries remain to write.
    pub fn poll(
        &mut self,
        peer: ServerId,
        max_frame: usize,
        max_bytes: usize,
        out: &mut Vec<Bytes>,
        too_big: &mut Vec<Relayed>,
    ) -> (u64, bool) {
        let mut frames = Coalescer::default();
        let mut framed = 0u64;
        let mut head = BytesMut::new();
        let mut first_held = None;
        let mut resume = None;
        let mut oversized = Vec::new();
        let blocked = &self.blocked;
        let mut ready = self
            .entries
            .range_mut(self.unsent_from)
            .filter_map(|(k, r)| {
                if r.sent {
                    return None;
                }
                if blocked.contains(&r.target) {
                    first_held.get_or_insert(k);
                    return None;
                }
                Some((k, r))
            })
            .peekable();
        let mut group: Vec<(u64, &mut Relayed)> = Vec::new();
        while let Some((key, first)) = ready.next() {
            if !frames.is_empty() && frames.len() >= max_bytes {
                resume = Some(key);
                break;
            }
            let id = first.id;
            group.clear();
            group.push((key, first));
            while let Some((k, r)) = ready.next_if(|(_, r)| r.id == id) {
                group.push((k, r));
            }
            let message = &group[0].1.message;
            let rows = group.iter().map(|(_, r)| RowRef {
                server: r.target,
                via: peer,
                seq: r.seq,
                users: &r.users,
            });
            head.clear();
            let written = wire::write_forward_head(
                &mut head,
                id,
                Address::new(id.origin, UserId::NONE),
                Address::new(peer, UserId::NONE),
                rows,
                message.len(),
                max_frame,
            );
            match written {
                Ok(()) => {
                    frames.copy(&head);
                    frames.add(message);
                    framed += 1;
                    for (_, r) in group.iter_mut() {
                        r.sent = true;
                    }
                }
                Err(_) => oversized.extend(group.iter().map(|(k, _)| *k)),
            }
        }
        drop(group);
        drop(ready);
        for k in oversized {
            if let Some(r) = self.entries.remove(k) {
                self.index.remove(&(r.id, r.target));
                self.release(&r);
                too_big.push(r);
            }
        }
        out.extend(frames.take());
        self.unsent_from = match (first_held, resume) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(self.next),
        };
        (framed, resume.is_some())
    }
}

/// The peers that relayed one queued 906 here, its outcome owed to each:
/// nearly always one, kept without an allocation.
#[derive(Debug)]
pub(super) enum Askers {
    One(ServerId),
    More(Vec<ServerId>),
}

impl Askers {
    fn add(&mut self, peer: ServerId) {
        match self {
            Askers::One(p) if *p == peer => {}
            Askers::One(p) => *self = Askers::More(vec![*p, peer]),
            Askers::More(v) if v.contains(&peer) => {}
            Askers::More(v) => v.push(peer),
        }
    }
}

impl IntoIterator for Askers {
    type Item = ServerId;
    type IntoIter = AskersIter;

    fn into_iter(self) -> AskersIter {
        match self {
            Askers::One(p) => AskersIter::One(Some(p)),
            Askers::More(v) => AskersIter::More(v.into_iter()),
        }
    }
}

pub(super) enum AskersIter {
    One(Option<ServerId>),
    More(std::vec::IntoIter<ServerId>),
}

impl Iterator for AskersIter {
    type Item = ServerId;

    fn next(&mut self) -> Option<ServerId> {
        match self {
            AskersIter::One(p) => p.take(),
            AskersIter::More(it) => it.next(),
        }
    }
}

/// Another exchange, as this one knows it.
#[derive(Debug)]
pub(super) struct Peer {
    pub epoch: u64,
    pub address: String,
    /// The registry says it is up.
    pub up: bool,
    /// Its link, once both hellos were exchanged.
    pub conn: Option<ConnId>,
    /// A `Dial` was given and not reported back yet.
    pub dialing: bool,
    pub max_frame: usize,
    pub outbox: RelayOutbox,
    /// Outcomes of what it relayed here, to write to it.
    pub reports: Vec<ReportEntry>,
    /// Attachments to tell it.
    pub notes: Vec<Attached>,
    /// Since when there is no link to it (none yet, or lost).
    pub no_link_since: Option<Instant>,
    /// Without a link for a lease: relays to it are reported `timed_out`
    /// at once (and still sent if it comes back).
    pub unreachable: bool,
}

use iim_proto::types::Address;

impl Exchange {
    fn peer_entry(&mut self, peer: ServerId) -> &mut Peer {
        let (frames, bytes, max_frame, now) = (
            self.cfg.queue_max_frames,
            self.cfg.queue_max_bytes,
            self.cfg.max_frame,
            self.now,
        );
        self.peers.entry(peer).or_insert_with(|| Peer {
            epoch: 0,
            address: String::new(),
            up: false,
            conn: None,
            dialing: false,
            max_frame,
            outbox: RelayOutbox::new(frames, bytes),
            reports: Vec::new(),
            notes: Vec::new(),
            no_link_since: Some(now),
            unreachable: false,
        })
    }

    /// Peers with a link up now.
    pub fn peer_links(&self) -> usize {
        self.peers.values().filter(|p| p.conn.is_some()).count()
    }

    /// Entries relayed to `peer` and not answered yet.
    pub fn relays_pending(&self, peer: ServerId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.outbox.len())
    }

    /// The (message, target) pairs relayed to `peer` and not answered, in
    /// relay order.
    pub fn relays_to(&self, peer: ServerId) -> Vec<(MessageId, ServerId)> {
        self.peers
            .get(&peer)
            .map(|p| {
                p.outbox
                    .entries
                    .iter()
                    .map(|(_, r)| (r.id, r.target))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The peer link to `peer`, if up.
    pub fn peer_link(&self, peer: ServerId) -> Option<ConnId> {
        self.peers.get(&peer).and_then(|p| p.conn)
    }

    /// The registry's exchanges: learn peers' incarnations and addresses,
    /// and dial those this exchange should (it has the lower id).
    pub(super) fn exchanges_swept(&mut self, rows: Vec<ExchangeRow>) {
        let me = self.cfg.id;
        let draining = self.draining.is_some();
        for row in rows {
            if row.id == me {
                continue;
            }
            let peer = self.peer_entry(row.id);
            let stale_link = if row.epoch > peer.epoch {
                peer.epoch = row.epoch;
                peer.conn
            } else {
                None
            };
            peer.address = row.address;
            peer.up = row.up;
            if let Some(conn) = stale_link {
                self.close(conn, CLOSE_GOING_AWAY, "peer restarted");
            }
            let peer = self.peers.get_mut(&row.id).expect("entry above");
            if row.up && me < row.id && peer.conn.is_none() && !peer.dialing && !draining {
                peer.dialing = true;
                let address = peer.address.clone();
                self.timers
                    .add(self.now + self.cfg.handshake_timeout, Timer::Dial(row.id));
                self.outputs.push_back(Output::Dial {
                    peer: row.id,
                    address,
                });
            }
        }
    }

    /// The dial to `peer` connected as `conn`: say hello and wait for the
    /// peer's.
    pub fn peer_dialed(&mut self, conn: ConnId, peer: ServerId, now: Instant) {
        self.now = now;
        self.peer_entry(peer).dialing = false;
        let mut link = Link {
            state: LinkState::PeerDialed { peer },
            pending: Coalescer::default(),
            flagged: false,
        };
        if let Some(b) = frame_bytes(&self.hello(), self.cfg.max_frame) {
            link.pending.add(&b);
        }
        self.links.insert(conn, link);
        self.timers
            .add(now + self.cfg.handshake_timeout, Timer::Handshake(conn));
        self.flag(conn);
    }

    /// The dial to `peer` failed; the next sweep tries again.
    pub fn dial_failed(&mut self, peer: ServerId, now: Instant) {
        self.now = now;
        self.peer_entry(peer).dialing = false;
    }

    pub(super) fn dial_timed_out(&mut self, peer: ServerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.dialing = false;
        }
    }

    fn hello(&self) -> Frame {
        Frame::PeerHello(PeerHello {
            exchange: self.cfg.id,
            epoch: self.cfg.epoch,
            max_frame: self.cfg.max_frame as u32,
        })
    }

    /// An accepted connection's first frame is `PeerHello`: another
    /// exchange. `identity` says whether its certificate names the exchange
    /// it claims to be.
    pub fn handle_peer_hello(
        &mut self,
        conn: ConnId,
        hello: PeerHello,
        identity: Result<(), String>,
        now: Instant,
    ) {
        self.now = now;
        self.metrics.frames_in.inc("peer_hello");
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        if !matches!(link.state, LinkState::Handshake) {
            return self.protocol_error(conn, "unexpected peer hello");
        }
        if let Err(e) = identity {
            return self.refuse(
                conn,
                "identity_mismatch",
                ErrorCode::IdentityMismatch,
                &format!("certificate does not name exchange {}: {e}", hello.exchange),
            );
        }
        if hello.exchange == self.cfg.id {
            return self.refuse(
                conn,
                "identity_mismatch",
                ErrorCode::IdentityMismatch,
                "a peer claims this exchange's own id",
            );
        }
        if self.draining.is_some() {
            return self.close(
                conn,
                ErrorCode::ShuttingDown.close_code(),
                "exchange is stopping",
            );
        }
        // Only an exchange the registry shows up (as last swept) is a peer:
        // a certificate alone is not enough. A new one is let in once a
        // sweep has read its row (its dials are retried every sweep).
        if !self.peers.get(&hello.exchange).is_some_and(|p| p.up) {
            return self.refuse(
                conn,
                "unknown_server",
                ErrorCode::UnknownServer,
                &format!("exchange {} is not up in the registry", hello.exchange),
            );
        }
        let known = self.peer_entry(hello.exchange).epoch;
        if hello.epoch < known {
            return self.refuse(
                conn,
                "stale_epoch",
                ErrorCode::StaleEpoch,
                &format!(
                    "exchange {} epoch {} is older than {known}",
                    hello.exchange, hello.epoch
                ),
            );
        }
        if let Some(b) = frame_bytes(&self.hello(), self.cfg.max_frame)
            && let Some(link) = self.links.get_mut(&conn)
        {
            link.pending.add(&b);
        }
        self.peer_up(conn, hello);
    }

    /// Both hellos said: the link carries relays from now on.
    fn peer_up(&mut self, conn: ConnId, hello: PeerHello) {
        let peer = hello.exchange;
        if let Some(link) = self.links.get_mut(&conn) {
            link.state = LinkState::Peer { peer };
        }
        let me = self.cfg.id;
        // Everything attached here, so the peer need not wait for a sweep.
        let notes: Vec<Attached> = self
            .routes
            .iter()
            .filter(|(_, r)| matches!(r.state, RouteState::Up | RouteState::Disconnected))
            .filter_map(|(s, r)| {
                r.attach_epoch.map(|a| Attached {
                    server: *s,
                    epoch: r.epoch,
                    exchange: me,
                    attach_epoch: a,
                })
            })
            .collect();
        let max_frame = (hello.max_frame as usize).clamp(1_024, self.cfg.max_frame);
        let p = self.peer_entry(peer);
        let old = p.conn.replace(conn);
        p.epoch = p.epoch.max(hello.epoch);
        p.max_frame = max_frame;
        p.dialing = false;
        p.no_link_since = None;
        p.unreachable = false;
        p.outbox.on_disconnect();
        p.notes = notes;
        p.notes.sort_by_key(|n| n.server);
        p.reports.clear();
        if old.is_none() {
            self.metrics.peer_links.add(1);
        }
        self.metrics.peer(peer.0, |c| c.up = true);
        if let Some(old) = old.filter(|o| *o != conn) {
            self.close(
                old,
                ErrorCode::Protocol.close_code(),
                "replaced by a newer peer link",
            );
        }
        info!(peer = peer.0, epoch = hello.epoch, "peer link up");
        self.flag(conn);
        self.record_links();
    }

    /// Ask the registry to record the live peer links if they differ from
    /// the last recording: at every sweep, when a link comes or goes, and
    /// when a recording is answered (the links may have changed meanwhile).
    /// One recording is in flight at a time; a failed one is tried again at
    /// the next sweep or change.
    pub(super) fn record_links(&mut self) {
        let mut live: Vec<ServerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.conn.is_some())
            .map(|(id, _)| *id)
            .collect();
        live.sort();
        if self.recording_links || self.links_recorded.as_ref() == Some(&live) {
            return;
        }
        self.recording_links = true;
        self.links_seq += 1;
        debug!(peers = ?live, seq = self.links_seq, "recording the peer links");
        let id = self.ask(Query::RecordLinks {
            peers: live.clone(),
            epoch: self.cfg.epoch,
            seq: self.links_seq,
        });
        self.asked.insert(id, Asked::RecordLinks(live));
    }

    /// A peer link is gone (its `Link` already removed).
    pub(super) fn peer_lost(&mut self, conn: ConnId, peer: ServerId) {
        if let Some(p) = self.peers.get_mut(&peer)
            && p.conn == Some(conn)
        {
            p.conn = None;
            p.no_link_since = Some(self.now);
            p.outbox.on_disconnect();
            p.reports.clear();
            p.notes.clear();
            self.metrics.peer_links.add(-1);
            self.metrics.peer(peer.0, |c| c.up = false);
            info!(peer = peer.0, unanswered = p.outbox.len(), "peer link lost");
            self.record_links();
        }
    }

    /// Frames on a peer link.
    pub(super) fn peer_frames(&mut self, conn: ConnId, frames: Vec<Frame>) {
        for frame in frames {
            self.metrics.frames_in.inc(frame.kind());
            let Some(link) = self.links.get(&conn) else {
                return;
            };
            match (&link.state, frame) {
                (LinkState::PeerDialed { peer }, Frame::PeerHello(h)) if h.exchange == *peer => {
                    self.peer_up(conn, h);
                }
                (LinkState::PeerDialed { .. }, _) => {
                    return self.protocol_error(conn, "the first frame must be peer_hello");
                }
                (LinkState::Peer { peer }, Frame::Forward(fwd)) => {
                    let peer = *peer;
                    self.relay_in(conn, peer, fwd);
                }
                (LinkState::Peer { peer }, Frame::Report(r)) => {
                    let peer = *peer;
                    self.relay_outcomes(peer, r.entries);
                }
                (LinkState::Peer { peer }, Frame::Attached(a)) => {
                    let peer = *peer;
                    self.heard_attached(peer, a);
                }
                (LinkState::Peer { .. }, Frame::Heartbeat(_)) => {}
                (LinkState::Peer { peer }, Frame::Error(e)) => {
                    warn!(peer = peer.0, code = ?e.code, detail = %e.detail, "error frame from a peer")
                }
                (_, other) => {
                    let detail = format!("unexpected {} frame from a peer exchange", other.kind());
                    return self.protocol_error(conn, &detail);
                }
            }
        }
    }

    /// A peer relayed a 905's rows for servers it believes attached here.
    fn relay_in(&mut self, conn: ConnId, peer: ServerId, fwd: Forward905) {
        if let Err(r) = split::validate_relay(&fwd, self.cfg.id, &self.cfg.split) {
            // A peer is an exchange of this deployment: a malformed relay
            // is a bug there, not a message to answer row by row.
            self.metrics.rejections.inc(r.kind());
            return self.protocol_error(conn, &format!("relay refused: {r}"));
        }
        self.metrics.relays_in.inc();
        self.metrics.peer(peer.0, |c| c.relays_in += 1);
        let id = fwd.id;
        let mut outcomes = Vec::new();
        for (target, d) in split::split(fwd) {
            let seq = d.seq;
            // Relayed again (a lost peer link, an origin that moved): the
            // answer the first copy got, so a refused 906 never arrives
            // later behind newer ones.
            let status = match self.refused_before(id.origin, id, target, seq) {
                Some(first) => {
                    self.metrics.repeated_refusals.inc();
                    Some(first)
                }
                None => self.deliver_relayed(peer, target, d).inspect(|status| {
                    self.remember_refusal(id, target, seq, *status);
                }),
            };
            if let Some(status) = status {
                outcomes.push(ReportEntry {
                    id,
                    server: target,
                    status,
                });
            }
        }
        self.report_to_peer(peer, outcomes);
    }

    /// Queue a relayed 906 for a target attached here; the status to
    /// answer at once otherwise (none when the answer is where the target
    /// is instead).
    fn deliver_relayed(
        &mut self,
        peer: ServerId,
        target: ServerId,
        d: Deliver906,
    ) -> Option<DeliveryStatus> {
        let Some(route) = self.routes.get_mut(&target) else {
            return Some(DeliveryStatus::UnknownServer);
        };
        match route.state {
            RouteState::Down => Some(DeliveryStatus::ServerDown),
            RouteState::Elsewhere => {
                // Not here: say where, and the peer moves everything it
                // holds for the target there.
                let note = route.at.map(|at| Attached {
                    server: target,
                    epoch: route.epoch,
                    exchange: at,
                    attach_epoch: route.newest_attach,
                });
                if let Some(note) = note {
                    self.note_to_peer(peer, note);
                }
                self.metrics.relays_not_here.inc();
                None
            }
            RouteState::Up | RouteState::Disconnected | RouteState::Looking => {
                debug!(ex = self.cfg.id.0, id = %d.id, target = target.0, peer = peer.0, "relayed here");
                let key = (d.id, target);
                if let Some(from) = self.relayed.get_mut(&key) {
                    // Relayed again (a lost peer link, or by the new
                    // exchange of an origin that moved): still queued; its
                    // outcome goes to each peer that asked.
                    from.add(peer);
                    return None;
                }
                match route.queue.push(d) {
                    Ok(_) => {
                        self.metrics.queued.add(1);
                        self.relayed.insert(key, Askers::One(peer));
                        if let Some(conn) = route.conn {
                            self.flag(conn);
                        }
                        None
                    }
                    Err(e) => {
                        self.metrics.rejections.inc(match e {
                            PushError::Full => "overloaded",
                            PushError::OverShare => "over_share",
                            PushError::Oversized => "oversized_frame",
                        });
                        Some(DeliveryStatus::Overloaded)
                    }
                }
            }
        }
    }

    /// A peer answered relayed entries: each goes on to its origin, and a
    /// refusal is remembered like one of this exchange's own.
    fn relay_outcomes(&mut self, peer: ServerId, entries: Vec<ReportEntry>) {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            debug!(ex = self.cfg.id.0, id = %e.id, target = e.server.0, peer = peer.0, status = e.status.as_str(), "relay outcome");
            match p.outbox.remove(e.id, e.server) {
                Some(r) => {
                    let e = ReportEntry {
                        status: uncertain(e.status, r.maybe_handed),
                        ..e
                    };
                    if e.status != DeliveryStatus::Delivered {
                        self.remember_refusal(e.id, e.server, r.seq, e.status);
                    }
                    out.push(e);
                }
                // Answered already, or moved to where the target is now.
                None => self.metrics.relay_outcomes_stale.inc(),
            }
        }
        self.report(out);
    }

    pub(super) fn report_to_peer(&mut self, peer: ServerId, mut entries: Vec<ReportEntry>) {
        if entries.is_empty() {
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        match p.conn {
            // Lost otherwise: the peer relays the entry again on its next
            // link, and is answered then.
            Some(conn) if p.reports.len() + entries.len() <= MAX_PENDING_REPORTS => {
                p.reports.append(&mut entries);
                self.flag(conn);
            }
            _ => self.metrics.reports_dropped.add(entries.len() as u64),
        }
    }

    fn note_to_peer(&mut self, peer: ServerId, note: Attached) {
        if let Some(p) = self.peers.get_mut(&peer)
            && let Some(conn) = p.conn
        {
            if p.notes.len() < MAX_PENDING_REPORTS {
                p.notes.push(note);
            }
            self.flag(conn);
        }
    }

    /// Tell every peer that `server` is attached here now.
    pub(super) fn announce(&mut self, server: ServerId, epoch: u64, attach_epoch: u64) {
        let note = Attached {
            server,
            epoch,
            exchange: self.cfg.id,
            attach_epoch,
        };
        let peers: Vec<ServerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.conn.is_some())
            .map(|(id, _)| *id)
            .collect();
        for peer in peers {
            self.note_to_peer(peer, note);
        }
    }

    /// A peer said where `a.server` is attached: an announcement (at the
    /// peer), or the answer to a relay (not at the peer). A "not here" this
    /// exchange cannot act on — it knows nothing newer than the peer, or
    /// the peer names this exchange, which has no link of the server —
    /// holds back the server's relays to that peer until the next sweep:
    /// sending newer ones meanwhile could put them ahead of these.
    fn heard_attached(&mut self, peer: ServerId, a: Attached) {
        if self.learn_attached(a) || a.exchange == peer {
            return;
        }
        let routed_there = self
            .routes
            .get(&a.server)
            .is_some_and(|r| r.state == RouteState::Elsewhere && r.at == Some(peer));
        if routed_there && let Some(p) = self.peers.get_mut(&peer) {
            p.outbox.block(a.server);
            self.metrics.relays_held.inc();
        }
    }

    /// Every relay held back goes out again (after a sweep, which has
    /// moved what it could).
    pub(super) fn release_relays(&mut self) {
        let mut flag = Vec::new();
        for p in self.peers.values_mut() {
            if p.outbox.release_blocked()
                && let Some(conn) = p.conn
            {
                flag.push(conn);
            }
        }
        for conn in flag {
            self.flag(conn);
        }
    }

    /// A claim that `a.server` is attached to `a.exchange`: believed when
    /// its attach epoch is the highest seen; then everything this exchange
    /// holds for the server moves there. True when believed.
    pub(super) fn learn_attached(&mut self, a: Attached) -> bool {
        if a.exchange == self.cfg.id {
            // This exchange records its own attachments.
            return false;
        }
        let fresh = self.new_route(a.epoch);
        let route = self.routes.entry(a.server).or_insert(fresh);
        if a.attach_epoch <= route.newest_attach || a.epoch < route.epoch {
            return false;
        }
        route.newest_attach = a.attach_epoch;
        let new_incarnation = a.epoch > route.epoch;
        route.epoch = a.epoch;
        let old_conn = route.conn.take();
        let was_up = old_conn.is_some();
        route.state = RouteState::Elsewhere;
        route.at = Some(a.exchange);
        route.marking = false;
        route.lease_gen += 1;
        if was_up {
            self.attached -= 1;
            self.metrics.links.add(-1);
        }
        if let Some(conn) = old_conn {
            // The server registered elsewhere since: this link is stale.
            self.close(conn, CLOSE_GOING_AWAY, "attached to another exchange");
        }
        self.metrics.attachments_learnt.inc();
        debug!(
            ex = self.cfg.id.0,
            server = a.server.0,
            at = a.exchange.0,
            attach_epoch = a.attach_epoch,
            "server attached elsewhere"
        );
        if new_incarnation {
            self.incarnation_gone(a.server);
        }
        self.rehome(a.server);
        true
    }

    /// What is held for a server's previous incarnation is undeliverable:
    /// report it `server_down`.
    pub(super) fn incarnation_gone(&mut self, server: ServerId) {
        let Some(route) = self.routes.get_mut(&server) else {
            return;
        };
        let old = route.queue.drain();
        self.metrics.queued.add(-(old.len() as i64));
        self.metrics.reports_dropped.add(route.reports.len() as u64);
        route.reports = Vec::new();
        self.report_dropped(old, server, DeliveryStatus::ServerDown);
        self.fail_relays_for(server, DeliveryStatus::ServerDown);
    }

    /// Answer every relay held for `server` with `status`.
    pub(super) fn fail_relays_for(&mut self, server: ServerId, status: DeliveryStatus) {
        let mut failed = Vec::new();
        for p in self.peers.values_mut() {
            failed.extend(p.outbox.take_for(server));
        }
        for r in &failed {
            self.remember_refusal(r.id, server, r.seq, status);
        }
        self.report(
            failed
                .into_iter()
                .map(|r| ReportEntry {
                    id: r.id,
                    server,
                    status,
                })
                .collect(),
        );
    }

    /// Move everything held for `server` (its local queue, other peers'
    /// outboxes) to where its route says it is now, in order.
    pub(super) fn rehome(&mut self, server: ServerId) {
        let Some(route) = self.routes.get_mut(&server) else {
            return;
        };
        let here = matches!(route.state, RouteState::Up | RouteState::Disconnected);
        let at = route.at.filter(|_| route.state == RouteState::Elsewhere);
        let (epoch, attach) = (route.epoch, route.newest_attach);
        let mut moving: Vec<Deliver906> = Vec::new();
        if !here {
            let queued = route.queue.take_all();
            self.metrics.queued.add(-(queued.len() as i64));
            for d in queued {
                match self.relayed.remove(&(d.id, server)) {
                    // Relayed here by peers: each moves what it holds itself.
                    Some(from) => {
                        if let Some(at) = at {
                            for peer in from {
                                self.note_to_peer(
                                    peer,
                                    Attached {
                                        server,
                                        epoch,
                                        exchange: at,
                                        attach_epoch: attach,
                                    },
                                );
                            }
                        }
                    }
                    None => moving.push(d),
                }
            }
        }
        let mut peers: Vec<ServerId> = self.peers.keys().copied().collect();
        peers.sort();
        for peer in peers {
            if Some(peer) == at {
                continue;
            }
            let p = self.peers.get_mut(&peer).expect("listed");
            moving.extend(p.outbox.take_for(server).into_iter().map(Relayed::deliver));
        }
        if moving.is_empty() {
            return;
        }
        debug!(
            ex = self.cfg.id.0,
            server = server.0,
            count = moving.len(),
            "deliveries moved with their target"
        );
        self.metrics.relays_moved.add(moving.len() as u64);
        // Per origin the order is kept: each source above is in order, and
        // one origin's entries for the server are in one source at a time.
        // Each may have reached the server already where it was.
        for d in moving {
            let (id, seq) = (d.id, d.seq);
            if let Some(status) = self.offer_moved(server, d) {
                let status = uncertain(status, true);
                self.remember_refusal(id, server, seq, status);
                self.report(vec![ReportEntry { id, server, status }]);
            }
        }
    }

    /// [`Exchange::offer`] for a 906 moved with its target: relayed
    /// onwards marked as possibly handed over already, or queued here
    /// whatever the room.
    fn offer_moved(&mut self, target: ServerId, d: Deliver906) -> Option<DeliveryStatus> {
        let route = self.routes.get_mut(&target)?;
        match (route.state, route.at) {
            (RouteState::Elsewhere, Some(at)) => self.relay_entry(at, target, d, true),
            (RouteState::Up | RouteState::Disconnected, _) => match route.queue.push_moved(d) {
                Ok(_) => {
                    self.metrics.queued.add(1);
                    if let Some(conn) = route.conn {
                        self.flag(conn);
                    }
                    None
                }
                Err(_) => {
                    self.metrics.rejections.inc("oversized_frame");
                    Some(DeliveryStatus::Overloaded)
                }
            },
            _ => self.offer(target, d),
        }
    }

    /// Queue a 906 for a target attached to another exchange.
    pub(super) fn relay(
        &mut self,
        peer: ServerId,
        target: ServerId,
        d: Deliver906,
    ) -> Option<DeliveryStatus> {
        self.relay_entry(peer, target, d, false)
    }

    fn relay_entry(
        &mut self,
        peer: ServerId,
        target: ServerId,
        d: Deliver906,
        maybe_handed: bool,
    ) -> Option<DeliveryStatus> {
        let entry = Relayed {
            id: d.id,
            target,
            seq: d.seq,
            users: d.users,
            message: d.message,
            maybe_handed,
            sent: false,
        };
        if entry.size() > self.cfg.max_frame {
            self.metrics.rejections.inc("oversized_frame");
            return Some(DeliveryStatus::Overloaded);
        }
        debug!(ex = self.cfg.id.0, id = %entry.id, target = target.0, peer = peer.0, maybe_handed, "relay queued");
        let p = self.peer_entry(peer);
        if p.unreachable {
            // Said at once, and not kept: a copy sent when the peer is back
            // could arrive behind newer messages that took another way.
            self.metrics.relays_unreachable.inc();
            return Some(DeliveryStatus::TimedOut);
        }
        match p.outbox.push(entry) {
            Ok(_) => {
                self.metrics.relays_out.inc();
                if let Some(conn) = self.peers.get(&peer).and_then(|p| p.conn) {
                    self.flag(conn);
                }
                None
            }
            Err(_) => {
                self.metrics.rejections.inc("overloaded");
                Some(DeliveryStatus::Overloaded)
            }
        }
    }

    /// The bytes for a peer link: attachments, outcomes, then relays.
    pub(super) fn peer_transmit(
        &mut self,
        conn: ConnId,
        peer: ServerId,
        max_bytes: usize,
        out: &mut Vec<Bytes>,
    ) {
        let Some(p) = self.peers.get_mut(&peer).filter(|p| p.conn == Some(conn)) else {
            return;
        };
        let max_frame = p.max_frame;
        for note in std::mem::take(&mut p.notes) {
            out.extend(frame_bytes(&Frame::Attached(note), max_frame));
        }
        if !p.reports.is_empty() {
            let entries = std::mem::take(&mut p.reports);
            for chunk in entries.chunks((max_frame / 32).max(1)) {
                out.extend(report_bytes(chunk, max_frame));
            }
        }
        let mut too_big = Vec::new();
        // Frames, not buffers: the outbox coalesces them for one write.
        let (frames, more) = p.outbox.poll(peer, max_frame, max_bytes, out, &mut too_big);
        if frames > 0 {
            self.metrics.peer(peer.0, |c| c.relays_out += frames);
        }
        for r in too_big {
            self.metrics.rejections.inc("oversized_frame");
            let status = uncertain(DeliveryStatus::Overloaded, r.maybe_handed);
            self.remember_refusal(r.id, r.target, r.seq, status);
            self.report(vec![ReportEntry {
                id: r.id,
                server: r.target,
                status,
            }]);
        }
        if more {
            self.flag(conn);
        }
    }

    /// At every sweep: a peer without a link for a lease is unreachable;
    /// the origins of what waits for it hear `timed_out` now rather than at
    /// their deadline, and the relays are given up (a copy sent before may
    /// still have arrived: the outcome is unknown). Kept, they could reach
    /// their targets after newer messages that took another way.
    pub(super) fn check_unreachable(&mut self) {
        let (now, lease) = (self.now, self.cfg.lease);
        let mut told = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let gone = p.no_link_since.is_some_and(|since| since + lease <= now);
            if !gone || p.unreachable {
                continue;
            }
            p.unreachable = true;
            let n = p.outbox.give_up_all(&mut told);
            warn!(
                peer = id.0,
                relays = n,
                "peer exchange unreachable for a lease: its relays reported timed_out"
            );
        }
        if !told.is_empty() {
            self.metrics.relays_unreachable.add(told.len() as u64);
            self.report(told);
        }
    }

    /// Relays not answered yet, over every peer.
    pub(super) fn relays_unanswered(&self) -> usize {
        self.peers.values().map(|p| p.outbox.len()).sum()
    }
}

/// The status to report for a 906 that may have reached its target already:
/// a refusal now says nothing about the copy that may have arrived, so the
/// outcome is not known (`timed_out`, as an origin reports a refusal of a
/// 905 it sent twice).
fn uncertain(status: DeliveryStatus, maybe_handed: bool) -> DeliveryStatus {
    match status {
        DeliveryStatus::Overloaded | DeliveryStatus::UnknownServer | DeliveryStatus::Refused
            if maybe_handed =>
        {
            DeliveryStatus::TimedOut
        }
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(seq: u64, target: u32, len: usize) -> Relayed {
        Relayed {
            id: MessageId {
                origin: ServerId(1),
                epoch: 7,
                seq,
            },
            target: ServerId(target),
            seq,
            users: vec![UserRow {
                user: UserId(40 + u64::from(target)),
                channel: iim_proto::types::ChannelId(3),
            }],
            message: Bytes::from(vec![b'm'; len]),
            maybe_handed: false,
            sent: false,
        }
    }

    /// The frames `poll` says it wrote are the relay frames in its output,
    /// however the output's buffers are cut (small frames share one, a
    /// large message travels as a buffer of its own), one per message.
    #[test]
    fn poll_counts_frames_not_buffers() {
        let mut ob = RelayOutbox::new(100, 1 << 20);
        for (seq, target, len) in [(1, 5, 100), (1, 6, 100), (2, 5, 100), (3, 5, 40_000)] {
            ob.push(relay(seq, target, len)).unwrap();
        }
        let (mut out, mut too_big) = (Vec::new(), Vec::new());
        let (frames, more) = ob.poll(ServerId(9), 1 << 20, 1 << 20, &mut out, &mut too_big);
        assert_eq!((frames, more), (3, false));
        assert!(too_big.is_empty());
        let mut buf = BytesMut::new();
        for b in &out {
            buf.extend_from_slice(b);
        }
        let mut rows = Vec::new();
        while let Some(f) = wire::decode(&mut buf, 1 << 20).unwrap() {
            let Frame::Forward(f) = f else {
                panic!("not a relay: {f:?}")
            };
            rows.push((f.id.seq, f.rows.len(), f.message.len()));
        }
        assert_eq!(rows, vec![(1, 2, 100), (2, 1, 100), (3, 1, 40_000)]);
        assert_ne!(out.len() as u64, frames, "buffers are not frames here");
        // Everything went out: nothing more until the link is lost.
        let (frames, _) = ob.poll(ServerId(9), 1 << 20, 1 << 20, &mut out, &mut too_big);
        assert_eq!(frames, 0);
    }
}
