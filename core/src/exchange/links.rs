//! The life of a link in the exchange core: accepted, registered (the
//! registry asked, the route attached or the link refused), closed or
//! lost — and the registry's answers.

use super::*;

impl Exchange {
    /// A new connection completed its TLS handshake; its `Register` must
    /// follow within the handshake timeout.
    pub fn accept(&mut self, conn: ConnId, now: Instant) {
        self.now = now;
        self.links.insert(
            conn,
            Link {
                state: LinkState::Handshake,
                pending: Coalescer::default(),
                flagged: false,
            },
        );
        self.timers
            .add(now + self.cfg.handshake_timeout, Timer::Handshake(conn));
        if self.draining.is_some() {
            self.close(
                conn,
                ErrorCode::ShuttingDown.close_code(),
                "exchange is stopping",
            );
        }
    }

    /// The link's first frame, `Register`. `identity` says whether its
    /// certificate names the server it claims to be (the error for logs).
    pub fn handle_register(
        &mut self,
        conn: ConnId,
        reg: Register,
        identity: Result<(), String>,
        now: Instant,
    ) {
        self.now = now;
        self.metrics.frames_in.inc("register");
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        if !matches!(link.state, LinkState::Handshake) {
            return self.protocol_error(conn, "unexpected register frame from an app server");
        }
        let Register {
            server,
            epoch,
            max_frame,
        } = reg;
        if let Err(e) = identity {
            return self.refuse(
                conn,
                "identity_mismatch",
                ErrorCode::IdentityMismatch,
                &format!("certificate does not name server {server}: {e}"),
            );
        }
        if self.attached >= self.cfg.max_links {
            return self.refuse(
                conn,
                "too_many_links",
                ErrorCode::Internal,
                "too many servers connected",
            );
        }
        let id = self.ask(Query::RecordRegistration { server, epoch });
        self.asked.insert(id, Asked::Registration(conn));
        if let Some(link) = self.links.get_mut(&conn) {
            link.state = LinkState::Registering {
                server,
                epoch,
                max_frame: (max_frame as usize).clamp(1_024, self.cfg.max_frame),
                early: Vec::new(),
            };
        }
    }

    /// The link's reader ended.
    pub fn handle_end(&mut self, conn: ConnId, end: LinkEnd, now: Instant) {
        self.now = now;
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        let registered = matches!(link.state, LinkState::Attached { .. });
        match end {
            LinkEnd::Closed { clean, detail } => {
                info!(conn = conn.0, error = %detail, clean, "link closed");
                self.forget(conn, clean);
            }
            LinkEnd::Finished => {
                info!(conn = conn.0, "link finished by the server");
                self.forget(conn, false);
            }
            LinkEnd::Malformed(w) => self.refuse(
                conn,
                w.kind(),
                ErrorCode::for_wire_error(&w),
                &w.to_string(),
            ),
            LinkEnd::Stream(detail) if registered => self.refuse(
                conn,
                "protocol",
                ErrorCode::Protocol,
                &format!("stream: {detail}"),
            ),
            LinkEnd::Stream(detail) => self.refuse(
                conn,
                "not_registered",
                ErrorCode::NotRegistered,
                &format!("no stream: {detail}"),
            ),
        }
    }

    /// The registry answered question `id`.
    pub fn handle_answer(&mut self, id: AskId, answer: Answer, now: Instant) {
        self.now = now;
        let Some(asked) = self.asked.remove(&id) else {
            return;
        };
        match (asked, answer) {
            (Asked::Registration(conn), Answer::Registration(r)) => self.registration(conn, r),
            (
                Asked::MarkDown {
                    server,
                    epoch,
                    why,
                    failed,
                },
                Answer::MarkedDown(r),
            ) => {
                match &r {
                    Ok(true) => info!(server = server.0, epoch, why, ?failed, "server marked down"),
                    Ok(false) => {
                        info!(
                            server = server.0,
                            epoch, why, "registry: registered again since; not marked down"
                        )
                    }
                    Err(e) => {
                        error!(server = server.0, error = %e.0, why, "could not mark server down in the registry")
                    }
                }
                if failed.is_none() {
                    // An unanswerable registry does not keep a dead server
                    // up: down here as before.
                    self.marked_down(server, epoch, r.unwrap_or(true));
                }
            }
            (Asked::Sweep, Answer::AppServers(r)) => {
                self.sweeping = false;
                match r {
                    Ok(rows) => self.swept(rows),
                    Err(e) => warn!(error = %e.0, "registry unavailable for the sweep"),
                }
            }
            (Asked::Exchanges, Answer::Exchanges(r)) => match r {
                Ok(rows) => self.exchanges_swept(rows),
                Err(e) => warn!(error = %e.0, "registry unavailable for the exchanges"),
            },
            (Asked::Touch, Answer::Done(r)) => {
                if let Err(e) = r {
                    warn!(error = %e.0, "could not refresh last_seen");
                }
            }
            (Asked::RecordLinks(peers), Answer::Done(r)) => {
                self.recording_links = false;
                match r {
                    Ok(()) => {
                        self.links_recorded = Some(peers);
                        self.record_links();
                    }
                    Err(e) => {
                        // It may still have been made: what the registry
                        // holds is unknown until a recording is answered.
                        self.links_recorded = None;
                        warn!(error = %e.0, "could not record the peer links");
                    }
                }
            }
            (asked, answer) => {
                // A shell bug, not a peer's: say so, and clear what waited.
                error!(?asked, ?answer, "registry answer of the wrong kind");
                self.give_up(asked);
            }
        }
    }

    /// A question will not be answered (in time): let go of what waited.
    pub(super) fn give_up(&mut self, asked: Asked) {
        match asked {
            Asked::Registration(conn) => self.refuse(
                conn,
                "registry_error",
                ErrorCode::Internal,
                "registry unavailable",
            ),
            Asked::Sweep => self.sweeping = false,
            Asked::MarkDown {
                server,
                epoch,
                failed: None,
                ..
            } => self.marked_down(server, epoch, true),
            Asked::RecordLinks(_) => {
                // It may still land: the next recording (a higher seq)
                // is asked at the next sweep whatever the set is then.
                self.recording_links = false;
                self.links_recorded = None;
            }
            Asked::MarkDown { .. } | Asked::Exchanges | Asked::Touch => {}
        }
    }

    pub(super) fn registration(&mut self, conn: ConnId, r: Result<Registration, RegistryFailure>) {
        let Some(LinkState::Registering {
            server,
            epoch,
            max_frame,
            ..
        }) = self.links.get(&conn).map(|l| &l.state)
        else {
            return;
        };
        let (server, epoch, max_frame) = (*server, *epoch, *max_frame);
        match r {
            Ok(Registration::Accepted { attach_epoch }) => {
                self.attach(conn, server, epoch, max_frame, attach_epoch);
            }
            Ok(Registration::StaleEpoch { current }) => self.refuse(
                conn,
                "stale_epoch",
                ErrorCode::StaleEpoch,
                &format!("epoch {epoch} is not the registry's current epoch {current}"),
            ),
            Ok(Registration::Unknown) => self.refuse(
                conn,
                "unknown_server",
                ErrorCode::UnknownServer,
                &format!("server {server} is not in the registry"),
            ),
            Ok(Registration::WrongRole) => self.refuse(
                conn,
                "wrong_role",
                ErrorCode::IdentityMismatch,
                &format!("server {server} is not an app server"),
            ),
            Err(e) => {
                error!(server = server.0, error = %e.0, "registry unavailable during registration");
                self.refuse(
                    conn,
                    "registry_error",
                    ErrorCode::Internal,
                    "registry unavailable",
                )
            }
        }
    }

    pub(super) fn attach(
        &mut self,
        conn: ConnId,
        server: ServerId,
        epoch: u64,
        max_frame: usize,
        attach_epoch: u64,
    ) {
        if self.draining.is_some() {
            return self.close(
                conn,
                ErrorCode::ShuttingDown.close_code(),
                "exchange is stopping",
            );
        }
        let kind = match self.routes.get(&server) {
            Some(r) if r.epoch == epoch && r.state == RouteState::Elsewhere => "moved_here",
            Some(r) if r.epoch == epoch && r.attach_epoch.is_some() => "again",
            _ => "new",
        };
        if !self.routes.contains_key(&server) {
            let mut route = self.new_route(epoch);
            route.state = RouteState::Up;
            self.routes.insert(server, route);
        }
        let route = self.routes.get_mut(&server).expect("route inserted above");
        if epoch < route.epoch {
            return self.refuse(
                conn,
                "stale_epoch",
                ErrorCode::StaleEpoch,
                "a newer incarnation is registered",
            );
        }
        if epoch > route.epoch {
            // A new incarnation: what was owed to the old one (here or
            // relayed for it) is undeliverable (its connections are gone),
            // and reports owed to it mean nothing to this one.
            route.epoch = epoch;
            self.incarnation_gone(server);
        }
        let route = self.routes.get_mut(&server).expect("route exists");
        route.attach_epoch = Some(attach_epoch);
        route.newest_attach = route.newest_attach.max(attach_epoch);
        route.at = None;
        self.metrics.attachments.inc(kind);
        route.marking = false;
        match route.conn.take() {
            Some(old) => self.close(
                old,
                ErrorCode::Protocol.close_code(),
                "replaced by a newer link",
            ),
            None => {
                self.attached += 1;
                self.metrics.links.add(1);
            }
        }
        let route = self.routes.get_mut(&server).expect("route exists");
        let too_big = route.queue.set_max_frame(max_frame.min(self.cfg.max_frame));
        route.queue.on_disconnect();
        route.conn = Some(conn);
        route.state = RouteState::Up;
        route.lease_gen += 1;
        let queued = route.queue.len();
        if !too_big.is_empty() {
            warn!(
                server = server.0,
                count = too_big.len(),
                max_frame,
                "906s larger than the server accepts"
            );
            self.metrics
                .rejections
                .add("oversized_frame", too_big.len() as u64);
            self.metrics.queued.add(-(too_big.len() as i64));
            self.report_dropped(too_big, server, DeliveryStatus::Overloaded);
        }
        let early = match self.links.get_mut(&conn).map(|l| &mut l.state) {
            Some(state @ LinkState::Registering { .. }) => {
                match std::mem::replace(state, LinkState::Attached { server, epoch }) {
                    LinkState::Registering { early, .. } => early,
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        let reply = Frame::Registered(Registered {
            exchange: self.cfg.id,
            exchange_epoch: self.cfg.epoch,
            lease_ms: self.cfg.lease.as_millis().min(u32::MAX as u128) as u32,
            max_frame: self.cfg.max_frame as u32,
        });
        if let (Some(b), Some(link)) = (
            frame_bytes(&reply, self.cfg.max_frame),
            self.links.get_mut(&conn),
        ) {
            link.pending.add(&b);
        }
        self.flag(conn);
        info!(
            server = server.0,
            epoch, queued, attach_epoch, "server attached"
        );
        // What was on its way to it through other exchanges comes here,
        // ahead of anything newer; and the peers learn where it is.
        self.rehome(server);
        self.announce(server, epoch, attach_epoch);
        if !early.is_empty() {
            self.attached_frames(conn, server, epoch, early);
        }
    }

    /// Close a link for something its peer did: count it, say why.
    pub(super) fn refuse(
        &mut self,
        conn: ConnId,
        reason: &'static str,
        code: ErrorCode,
        detail: &str,
    ) {
        if !self.links.contains_key(&conn) {
            return;
        }
        self.metrics.rejections.inc(reason);
        warn!(conn = conn.0, reason, %detail, "link refused");
        self.close(conn, code.close_code(), detail);
    }

    pub(super) fn protocol_error(&mut self, conn: ConnId, detail: &str) {
        self.refuse(conn, "protocol", ErrorCode::Protocol, detail)
    }

    /// Close and forget a link; its route (if it was attached) is
    /// disconnected and its lease starts.
    pub(super) fn close(&mut self, conn: ConnId, code: u32, reason: &str) {
        if !self.links.contains_key(&conn) {
            return;
        }
        self.outputs.push_back(Output::Close {
            conn,
            code,
            reason: reason.chars().take(512).collect(),
        });
        self.forget(conn, false);
    }

    /// The link is gone; `clean` when its server left on purpose.
    pub(super) fn forget(&mut self, conn: ConnId, clean: bool) {
        let now = self.now;
        let Some(link) = self.links.remove(&conn) else {
            return;
        };
        let server = match link.state {
            LinkState::Attached { server, .. } => server,
            LinkState::Peer { peer } => {
                self.peer_lost(conn, peer);
                self.maybe_stopped(false);
                return;
            }
            _ => {
                self.maybe_stopped(false);
                return;
            }
        };
        let lease = self.cfg.lease;
        if let Some(route) = self.routes.get_mut(&server)
            && route.conn == Some(conn)
        {
            route.conn = None;
            self.attached -= 1;
            self.metrics.links.add(-1);
            route.queue.on_disconnect();
            if clean {
                self.mark_down(server, "closed by the server");
            } else {
                info!(
                    server = server.0,
                    lease_ms = lease.as_millis() as u64,
                    "link lost; lease running"
                );
                route.state = RouteState::Disconnected;
                route.lease_gen += 1;
                let generation = route.lease_gen;
                self.timers
                    .add(now + lease, Timer::Lease(server, generation));
            }
        }
        self.maybe_stopped(false);
    }
}
