//! What the exchange core does with a registered link's frames: 905s
//! split into its targets' queues (or refused, and the refusal remembered),
//! acks turned into reports for the origins; leases that end, sweeps,
//! and the end of a drain.

use super::*;

impl Exchange {
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
                debug!(id = %f.id, target = f.server.0, status = f.status.as_str(), "905 target refused");
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
    pub(super) fn offer(&mut self, target: ServerId, d: Deliver906) -> Option<DeliveryStatus> {
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
                self.report(entries(ids, server, DeliveryStatus::Delivered));
                self.check_drained(server);
            }
            Err(e) => {
                warn!(server = server.0, error = %e, "protocol violation");
                self.refuse(conn, "protocol", ErrorCode::Protocol, &e.to_string());
            }
        }
    }

    pub(super) fn mark_down(&mut self, server: ServerId, why: &'static str) {
        let Some(route) = self.routes.get_mut(&server) else {
            return;
        };
        route.state = RouteState::Down;
        route.lease_gen += 1;
        // Reports it was owed as an origin go nowhere now.
        self.metrics.reports_dropped.add(route.reports.len() as u64);
        route.reports = Vec::new();
        let epoch = route.epoch;
        let attach_epoch = route.attach_epoch;
        let left = route.queue.drain();
        let failed = left.len();
        self.metrics.queued.add(-(failed as i64));
        self.report_dropped(left, server, DeliveryStatus::ServerDown);
        self.metrics.marked_down.inc();
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
