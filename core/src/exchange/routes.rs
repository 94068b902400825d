//! What the exchange core does with a registered link's frames: 905s
//! split into its targets' queues (or refused, and the refusal remembered),
//! acks turned into reports for the origins; leases that end, sweeps,
//! and the end of a drain.

use super::*;
use iim_proto::types::UserId;
use iim_proto::wire::Attached;

impl Exchange {
    /// Frames the link sent (after `Register`, or instead of it).
    pub fn handle_frames(&mut self, conn: ConnId, frames: Vec<Frame>, now: Instant) {
        self.now = now;
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        let (server, epoch) = match &mut link.state {
            LinkState::Attached { server, epoch } => (*server, *epoch),
            LinkState::PeerDialed { .. } | LinkState::Peer { .. } => {
                return self.peer_frames(conn, frames);
            }
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

    pub(super) fn attached_frames(
        &mut self,
        conn: ConnId,
        server: ServerId,
        epoch: u64,
        frames: Vec<Frame>,
    ) {
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
                debug!(ex = self.cfg.id.0, id = %f.id, target = f.server.0, status = f.status.as_str(), "905 target refused");
            }
            self.report(failures);
        }
    }

    /// One 905 from `server`'s link. Returns false when the link was closed.
    pub(super) fn forward(
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
        // A 905 addressed to another exchange is taken too: any exchange of
        // the deployment serves, and an origin that moved resends its
        // outbox as it was encoded. (This one may not know every other
        // exchange yet: anything not an app server counts as one.)
        let me = self.cfg.id;
        let to = fwd.target;
        let addressed = if to.server != me
            && to.user == UserId::NONE
            && to.server != ServerId::NONE
            && !self.routes.contains_key(&to.server)
        {
            to.server
        } else {
            me
        };
        if let Err(r) = split::validate(&fwd, server, epoch, addressed, &self.cfg.split) {
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
        debug!(ex = self.cfg.id.0, id = %fwd.id, rows = fwd.rows.len(), "905 in");
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
    pub(super) fn refused_before(
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

    pub(super) fn remember_refusal(
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
    pub(super) fn report_dropped(
        &mut self,
        dropped: Vec<Dropped>,
        target: ServerId,
        status: DeliveryStatus,
    ) {
        for d in &dropped {
            self.remember_refusal(d.id, target, d.seq, status);
        }
        self.report_queued(
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

    /// Queue one 906 for its target (here, or relayed to the exchange it
    /// is attached to). The status to report at once when it cannot be
    /// queued.
    pub(super) fn offer(&mut self, target: ServerId, d: Deliver906) -> Option<DeliveryStatus> {
        if !self.routes.contains_key(&target) {
            if self.looking >= MAX_LOOKING {
                return Some(DeliveryStatus::UnknownServer);
            }
            // Not known yet: ask the registry now, hold its 906s meanwhile.
            let mut route = self.new_route(0);
            route.state = RouteState::Looking;
            self.routes.insert(target, route);
            self.looking += 1;
            self.metrics.lookups.inc();
            self.sweep_now();
        }
        let route = self.routes.get_mut(&target).expect("inserted above");
        match (route.state, route.at) {
            (RouteState::Down, _) => return Some(DeliveryStatus::ServerDown),
            (RouteState::Elsewhere, Some(at)) => return self.relay(at, target, d),
            (RouteState::Elsewhere, None) => return Some(DeliveryStatus::ServerDown),
            _ => {}
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
                debug!(ex = self.cfg.id.0, target = target.0, error = %e, queued = route.queue.len(), max_frame = route.queue.max_frame(), "906 not queued");
                self.metrics.rejections.inc(match e {
                    PushError::Full => "overloaded",
                    PushError::OverShare => "over_share",
                    PushError::Oversized => "oversized_frame",
                });
                Some(DeliveryStatus::Overloaded)
            }
        }
    }

    pub(super) fn ack(&mut self, conn: ConnId, server: ServerId, upto: u64) {
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
                self.report_queued(entries(ids, server, DeliveryStatus::Delivered));
                self.check_drained(server);
            }
            Err(e) => {
                warn!(server = server.0, error = %e, "protocol violation");
                self.refuse(conn, "protocol", ErrorCode::Protocol, &e.to_string());
            }
        }
    }

    /// A server held while looked up is in the registry: place it, and
    /// what waits for it goes where it is (or fails as it must).
    fn looked_up(&mut self, s: &AppServerRow) {
        let me = self.cfg.id;
        if let Some(r) = self.routes.get_mut(&s.id) {
            r.epoch = s.epoch;
            r.state = RouteState::Down;
        }
        self.looking -= 1;
        match s.exchange {
            Some(at) if !s.down && at != me => {
                let _ = self.learn_attached(Attached {
                    server: s.id,
                    epoch: s.epoch,
                    exchange: at,
                    attach_epoch: s.attach_epoch,
                });
            }
            Some(_) if !s.down => self.orphan_attachment(s.id, s.epoch, s.attach_epoch),
            _ => {
                // Down, or never attached: what waits is server_down.
                if let Some(r) = self.routes.get_mut(&s.id) {
                    r.newest_attach = s.attach_epoch;
                    r.down_attach = s.attach_epoch;
                    let left = r.queue.drain();
                    self.metrics.queued.add(-(left.len() as i64));
                    self.report_dropped(left, s.id, DeliveryStatus::ServerDown);
                }
            }
        }
    }

    /// A server the registry shows attached here without a link here: its
    /// lease starts now.
    fn orphan_attachment(&mut self, server: ServerId, epoch: u64, attach_epoch: u64) {
        let lease = self.cfg.lease;
        let now = self.now;
        if self.routes.get(&server).is_some_and(|r| r.epoch < epoch) {
            self.incarnation_gone(server);
        }
        let Some(route) = self.routes.get_mut(&server) else {
            return;
        };
        info!(
            server = server.0,
            epoch, attach_epoch, "attached here in the registry without a link; lease running"
        );
        route.epoch = epoch;
        route.state = RouteState::Disconnected;
        route.at = None;
        route.marking = false;
        route.attach_epoch = Some(attach_epoch);
        route.newest_attach = route.newest_attach.max(attach_epoch);
        route.lease_gen += 1;
        let generation = route.lease_gen;
        self.timers
            .add(now + lease, Timer::Lease(server, generation));
        self.rehome(server);
    }

    /// The registry says another exchange marked the server down under an
    /// attachment at least as new as any this one knows: down here too,
    /// without writing anything.
    fn learnt_down(&mut self, server: ServerId, epoch: u64, attach_epoch: u64) {
        let Some(route) = self.routes.get_mut(&server) else {
            return;
        };
        let stale_link = route.conn;
        route.epoch = route.epoch.max(epoch);
        route.newest_attach = route.newest_attach.max(attach_epoch);
        route.at = None;
        if let Some(conn) = stale_link {
            self.close(conn, CLOSE_GOING_AWAY, "marked down by another exchange");
        }
        if let Some(route) = self.routes.get_mut(&server)
            && route.state == RouteState::Elsewhere
        {
            // Nothing queued here: go_down would find nothing to drain.
            route.state = RouteState::Disconnected;
        }
        self.go_down(server);
        self.fail_relays_for(server, DeliveryStatus::ServerDown);
    }

    /// The server left on purpose: down now, and in the registry.
    pub(super) fn mark_down(&mut self, server: ServerId, why: &'static str) {
        let Some(failed) = self.go_down(server) else {
            return;
        };
        self.ask_mark_down(server, why, Some(failed));
    }

    /// Its lease ended: ask the registry to mark it down, and take it down
    /// here only if the registry agrees (or cannot say). A server that
    /// registered with another exchange meanwhile is not down.
    pub(super) fn lease_ended(&mut self, server: ServerId) {
        if let Some(route) = self.routes.get_mut(&server) {
            route.marking = true;
            self.ask_mark_down(server, "lease expired", None);
        }
    }

    fn ask_mark_down(&mut self, server: ServerId, why: &'static str, failed: Option<usize>) {
        let Some(route) = self.routes.get(&server) else {
            return;
        };
        let (epoch, attach_epoch) = (route.epoch, route.attach_epoch);
        let id = self.ask(Query::MarkDown {
            server,
            epoch,
            attach_epoch,
        });
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

    /// The registry answered a mark-down asked when a lease ended.
    pub(super) fn marked_down(&mut self, server: ServerId, epoch: u64, applied: bool) {
        let Some(route) = self.routes.get_mut(&server) else {
            return;
        };
        if !route.marking || route.epoch != epoch || route.state != RouteState::Disconnected {
            return;
        }
        route.marking = false;
        if applied {
            self.go_down(server);
            return;
        }
        // A newer incarnation or attachment exists: find out which, and
        // keep the deliveries until then (the lease runs again meanwhile).
        info!(
            server = server.0,
            epoch, "not marked down: registered again since; asking where"
        );
        route.lease_gen += 1;
        let generation = route.lease_gen;
        self.timers
            .add(self.now + self.cfg.lease, Timer::Lease(server, generation));
        self.sweep_now();
    }

    /// Take the route down: what it was owed fails `server_down`. The
    /// number of 906s failed (none if it was down already).
    pub(super) fn go_down(&mut self, server: ServerId) -> Option<usize> {
        let route = self.routes.get_mut(&server)?;
        if route.state == RouteState::Down {
            return None;
        }
        route.state = RouteState::Down;
        route.marking = false;
        route.lease_gen += 1;
        route.down_attach = route.newest_attach;
        // Reports it was owed as an origin go nowhere now.
        self.metrics.reports_dropped.add(route.reports.len() as u64);
        route.reports = Vec::new();
        let left = route.queue.drain();
        let failed = left.len();
        self.metrics.queued.add(-(failed as i64));
        self.report_dropped(left, server, DeliveryStatus::ServerDown);
        self.metrics.marked_down.inc();
        Some(failed)
    }

    /// Outcomes of 906s that were in a target's queue: those a peer
    /// relayed go back to that peer, the rest to their origins.
    pub(super) fn report_queued(&mut self, mut entries: Vec<ReportEntry>) {
        if !self.relayed.is_empty() {
            // Outcomes of 906s a peer relayed go back to that peer.
            let mut to_peers: BTreeMap<ServerId, Vec<ReportEntry>> = BTreeMap::new();
            entries.retain(|e| match self.relayed.remove(&(e.id, e.server)) {
                Some(from) => {
                    for peer in from {
                        to_peers.entry(peer).or_default().push(*e);
                    }
                    false
                }
                None => true,
            });
            for (peer, list) in to_peers {
                self.report_to_peer(peer, list);
            }
        }
        self.report(entries);
    }

    /// Send report entries to their origins. An origin that is not
    /// connected or not keeping up loses them; it retransmits the 905 or
    /// reports a timeout, so nothing is lost silently.
    pub(super) fn report(&mut self, entries: Vec<ReportEntry>) {
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

    pub(super) fn report_to(&mut self, origin: ServerId, mut entries: Vec<ReportEntry>) {
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

    pub(super) fn swept(&mut self, rows: Vec<AppServerRow>) {
        let me = self.cfg.id;
        let mut touch = vec![(me, self.cfg.epoch)];
        for s in rows {
            let elsewhere = s.exchange.filter(|x| *x != me && !s.down);
            if self
                .routes
                .get(&s.id)
                .is_some_and(|r| r.state == RouteState::Looking)
            {
                self.looked_up(&s);
                continue;
            }
            match self.routes.get(&s.id) {
                Some(r) => {
                    if r.state == RouteState::Up {
                        touch.push((s.id, s.epoch));
                    }
                    let (state, epoch, newest) = (r.state, r.epoch, r.newest_attach);
                    let mine = r.attach_epoch;
                    let down_attach = r.down_attach;
                    if s.exchange == Some(me)
                        && !s.down
                        && s.epoch == epoch
                        && matches!(state, RouteState::Up | RouteState::Disconnected)
                        && mine.is_some_and(|a| a < s.attach_epoch)
                    {
                        // A registration this exchange recorded but never
                        // heard the answer to (a link that died meanwhile):
                        // the attachment is still this exchange's, and its
                        // mark-down must name the registry's number.
                        if let Some(r) = self.routes.get_mut(&s.id) {
                            r.attach_epoch = Some(s.attach_epoch);
                            r.newest_attach = r.newest_attach.max(s.attach_epoch);
                        }
                    } else if s.exchange == Some(me)
                        && !s.down
                        && s.epoch >= epoch
                        && s.attach_epoch >= newest
                        && s.attach_epoch > down_attach
                        && matches!(state, RouteState::Down | RouteState::Elsewhere)
                    {
                        // The registry says it is attached here and up, but
                        // no link of it is (a registration recorded whose
                        // answer never came, so the link was refused). It
                        // is this exchange's to mark down: a lease, as for
                        // a lost link, under the registry's attach epoch.
                        self.orphan_attachment(s.id, s.epoch, s.attach_epoch);
                    } else if s.exchange == Some(me)
                        && !s.down
                        && s.epoch == epoch
                        && s.attach_epoch == down_attach
                        && state == RouteState::Down
                    {
                        // Taken down here when the registry could not say
                        // (an error, no answer): write it again. A read
                        // that is merely behind makes this a no-op.
                        self.ask_mark_down(s.id, "still up in the registry", Some(0));
                    }
                    if let Some(at) = elsewhere {
                        let _ = self.learn_attached(Attached {
                            server: s.id,
                            epoch: s.epoch,
                            exchange: at,
                            attach_epoch: s.attach_epoch,
                        });
                    } else if s.down
                        && ((state == RouteState::Elsewhere
                            && (s.epoch > epoch || s.attach_epoch >= newest))
                            || (matches!(state, RouteState::Up | RouteState::Disconnected)
                                && (s.epoch > epoch || s.attach_epoch > newest)))
                    {
                        // Marked down by the exchange it was attached to
                        // (last, if that was not this one: it moved away
                        // unnoticed, then died).
                        self.learnt_down(s.id, s.epoch, s.attach_epoch);
                    } else if s.epoch > epoch && state == RouteState::Disconnected {
                        // Restarted and not back here yet: the incarnation
                        // this exchange held deliveries for is gone.
                        self.incarnation_gone(s.id);
                        self.go_down(s.id);
                        if let Some(r) = self.routes.get_mut(&s.id) {
                            r.epoch = s.epoch;
                        }
                    }
                }
                None => {
                    let mut route = self.new_route(s.epoch);
                    route.newest_attach = s.attach_epoch;
                    if let Some(at) = elsewhere {
                        route.state = RouteState::Elsewhere;
                        route.at = Some(at);
                    }
                    self.routes.insert(s.id, route);
                }
            }
        }
        // Named by a 905 and not in the registry: unknown after all.
        let unknown: Vec<ServerId> = self
            .routes
            .iter()
            .filter(|(_, r)| r.state == RouteState::Looking)
            .map(|(s, _)| *s)
            .collect();
        for server in unknown {
            if let Some(mut route) = self.routes.remove(&server) {
                self.looking -= 1;
                let left = route.queue.drain();
                self.metrics.queued.add(-(left.len() as i64));
                self.report_dropped(left, server, DeliveryStatus::UnknownServer);
            }
        }
        self.release_relays();
        let id = self.ask(Query::Touch(touch));
        self.asked.insert(id, Asked::Touch);
    }

    /// Shutting down: a route whose 906s are all acknowledged and whose
    /// reports are written closes its link.
    pub(super) fn check_drained(&mut self, server: ServerId) {
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

    pub(super) fn maybe_stopped(&mut self, deadline_passed: bool) {
        if self.stopped || self.draining.is_none() {
            return;
        }
        let peer_link = |l: &Link| {
            matches!(
                l.state,
                LinkState::Peer { .. } | LinkState::PeerDialed { .. }
            )
        };
        if self.links.values().any(|l| !peer_link(l)) {
            return;
        }
        if !self.links.is_empty() {
            // Only peer links are left: they go once what was relayed is
            // answered, both ways (or at the deadline).
            let owed = self.peers.values().any(|p| !p.reports.is_empty());
            if (self.relays_unanswered() > 0 || owed) && !deadline_passed {
                return;
            }
            let conns: Vec<ConnId> = self.links.keys().copied().collect();
            for conn in conns {
                if let Some(link) = self.links.remove(&conn) {
                    if let LinkState::Peer { peer } = link.state {
                        self.peer_lost(conn, peer);
                    }
                    self.outputs.push_back(Output::Close {
                        conn,
                        code: CLOSE_GOING_AWAY,
                        reason: "exchange shutting down".into(),
                    });
                }
            }
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
