//! The end of a run — faults stop, everything heals — and the checks made
//! after every step and at the end.

use super::*;

impl World {
    /// Faults stop; everything heals and restarts, but one app server
    /// (when there are three or more) stops for good: the exchange must
    /// forget it.
    pub(super) fn quiet(&mut self) {
        self.chaos_on = false;
        self.healed_at = Some(self.now);
        if self.reg_mode != RegMode::Normal {
            self.reg_mode = RegMode::Normal;
            self.registry_calm_since = self.now;
        }
        self.log(|| "chaos over: healing".to_string());
        for a in 0..self.apps.len() {
            self.apps[a].partitioned = false;
        }
        if self.apps.len() >= 3 {
            let a = self.apps.len() - 1;
            self.apps[a].gone = true;
            self.kill_app(a);
        }
        self.peer_cuts.clear();
        for x in 0..self.exs.len() {
            if self.exs[x].node.is_none() {
                self.start_exchange(x);
            }
        }
        for a in 0..self.apps.len() {
            if self.apps[a].inc.is_none() && !self.apps[a].gone {
                self.start_app(a);
            }
        }
        // Long enough for leases to end, links to come back and every
        // earlier send to reach its deadline.
        let settle = self.p.lease * 2
            + self.p.idle * 2
            + Duration::from_secs(6)
            + self.p.send_timeout.max(Duration::from_secs(5));
        self.schedule(settle, Ev::FinalRound);
    }

    pub(super) fn final_round(&mut self) {
        let now = self.now;
        // Every send of a live incarnation has an outcome by now.
        for a in 0..self.apps.len() {
            if let Some(inc) = self.apps[a].inc.as_ref() {
                let open = self.oracle.open_sends_of(inc.life).next().map(|s| s.id);
                if let Some(id) = open {
                    let what = format!(
                        "send {id} of server {} has no outcome long after its deadline",
                        self.apps[a].id
                    );
                    return self.fail(what);
                }
                if inc.link.exchange().is_none() {
                    return self.fail(format!(
                        "server {} is not registered after the faults ended",
                        self.apps[a].id
                    ));
                }
            }
        }
        // Once healed, the relay finishes what it was given: a send whose
        // deadline left time to reconnect (the QUIC idle timeout, a lease,
        // a drain and restart of the exchange, backoff, a slow registry)
        // gets its outcome, not `timed_out`.
        let recovered_by = self.healed_at.expect("quiet() ran")
            + self.p.idle
            + self.p.lease
            + Duration::from_secs(10);
        let live: Vec<u64> = self
            .apps
            .iter()
            .filter_map(|a| a.inc.as_ref().map(|i| i.life))
            .collect();
        // (A `timed_out` reported before the deadline is the relay saying
        // the outcome is unknown — a 906 refused after a copy may have
        // reached the target — not a send left hanging.)
        let stuck = self.oracle.sends.iter().find(|s| {
            live.contains(&s.incarnation)
                && s.deadline >= recovered_by
                && s.completed_at.is_none_or(|t| t >= s.deadline)
                && s.outcome
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|(_, st)| *st == DeliveryStatus::TimedOut))
        });
        if let Some(s) = stuck {
            let what = format!(
                "send {} timed out although the deployment healed {} ms before its deadline: {:?}",
                s.id,
                (s.deadline - self.healed_at.expect("set")).as_millis(),
                s.outcome
            );
            return self.fail(what);
        }
        // The server that stopped for good is forgotten by every exchange,
        // and every exchange is linked to every other.
        let mut links = 0;
        let n = self.exs.len();
        for slot in &self.exs {
            let ex = slot.node.as_ref().expect("restarted in quiet()");
            for a in self.apps.iter().filter(|a| a.gone) {
                let state = ex.core.route_state(a.id);
                let queued = ex.core.queued(a.id);
                if state.is_some_and(|s| s != RouteState::Down)
                    || queued != (0, 0)
                    || ex.core.reports_held(a.id) != 0
                    || ex.core.attached_link(a.id).is_some()
                {
                    return self.fail(format!(
                        "exchange {} still holds state for server {} which is gone: {state:?}, queued {queued:?}, {} reports, link {:?}",
                        slot.id,
                        a.id,
                        ex.core.reports_held(a.id),
                        ex.core.attached_link(a.id)
                    ));
                }
            }
            if ex.core.peer_links() != n - 1 {
                return self.fail(format!(
                    "exchange {} has {} peer links, {} other exchanges run",
                    slot.id,
                    ex.core.peer_links(),
                    n - 1
                ));
            }
            links += ex.core.link_count() - ex.core.peer_links();
        }
        let live = self.live_apps();
        if links != live.len() {
            return self.fail(format!(
                "the exchanges hold {links} links for {} live servers",
                live.len()
            ));
        }
        let _ = now;
        // Now every live server in turn sends to every other (one at a
        // time, so even the smallest queues have room); each must arrive.
        let n = live.len() as u32;
        for (i, a) in live.into_iter().enumerate() {
            self.schedule(
                Duration::from_millis(300) * i as u32,
                Ev::FinalSend { app: a },
            );
        }
        let wait = self.p.send_timeout + Duration::from_millis(300) * n + Duration::from_secs(1);
        self.schedule(wait, Ev::End);
    }

    pub(super) fn check_end(&mut self) {
        for slot in &self.exs {
            let Some(ex) = slot.node.as_ref() else {
                continue;
            };
            // What the registry shows operators caught up with the links.
            let others: Vec<ServerId> = self
                .exs
                .iter()
                .map(|s| s.id)
                .filter(|id| *id != slot.id)
                .collect();
            let recorded = self
                .recorded_links
                .get(&slot.id)
                .map(|(_, peers)| peers.clone())
                .unwrap_or_default();
            if recorded != others {
                let what = format!(
                    "exchange {} recorded links to {recorded:?} in the registry; it is linked to {others:?}",
                    slot.id
                );
                return self.fail(what);
            }
            for peer in &self.exs {
                let left = ex.core.relays_to(peer.id);
                if !left.is_empty() {
                    let what = format!(
                        "exchange {} still holds relays to {} at the end: {left:?}",
                        slot.id, peer.id
                    );
                    return self.fail(what);
                }
            }
        }
        let gone: Vec<ServerId> = self.apps.iter().filter(|a| a.gone).map(|a| a.id).collect();
        for &n in &self.final_round.clone() {
            let rec = &self.oracle.sends[n as usize];
            let Some(outcome) = &rec.outcome else {
                return self.fail(format!("final send {} has no outcome", rec.id));
            };
            for (server, status) in outcome {
                let want = if gone.contains(server) {
                    DeliveryStatus::ServerDown
                } else {
                    DeliveryStatus::Delivered
                };
                if *status != want {
                    let id = rec.id;
                    let detail: Vec<_> = self
                        .exs
                        .iter()
                        .filter_map(|s| s.node.as_ref())
                        .map(|e| {
                            (
                                e.core.route_state(*server),
                                e.core.queued(*server),
                                e.core.attached_link(*server),
                            )
                        })
                        .collect();
                    let stuck: Vec<_> = self
                        .exs
                        .iter()
                        .filter_map(|s| s.node.as_ref())
                        .flat_map(|e| {
                            self.exs
                                .iter()
                                .map(|p| (p.id, e.core.relays_to(p.id)))
                                .filter(|(_, v)| !v.is_empty())
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    self.log(|| format!("unanswered relays: {stuck:?}"));
                    return self.fail(format!(
                        "final send {id} to {server}: {}, expected {} in a healed deployment (route, queue, link: {detail:?})",
                        status.as_str(),
                        want.as_str()
                    ));
                }
            }
        }
    }

    /// Bounds and bookkeeping that must hold after every step.
    pub(super) fn check_step(&mut self) {
        for a in &self.apps {
            let registered = a.inc.as_ref().is_some_and(|i| i.link.exchange().is_some());
            if !registered {
                self.up_since.remove(&a.id);
            } else if !self.up_since.contains_key(&a.id) {
                self.up_since.insert(a.id, self.now);
            }
        }
        for x in 0..self.exs.len() {
            self.check_exchange(x);
            if self.violation.is_some() {
                return;
            }
        }
        for a in &self.apps {
            if let Some(inc) = &a.inc
                && inc.link.outstanding() > self.p.max_outstanding
            {
                let (id, n) = (a.id, inc.link.outstanding());
                return self.fail(format!(
                    "server {id} has {n} 905s outstanding: over its bound"
                ));
            }
        }
    }

    fn check_exchange(&mut self, x: usize) {
        if let Some(ex) = self.exs[x].node.as_mut() {
            let mut changes = Vec::new();
            for s in ex.core.servers().collect::<Vec<_>>() {
                let now = (
                    ex.core.route_state(s).expect("listed"),
                    ex.core.route_place(s),
                );
                let before = ex.states.insert(s, now);
                if before != Some(now) {
                    changes.push((s, before.map(|b| b.0), now));
                }
            }
            let me = self.exs[x].id;
            for (s, before, (state, place)) in changes {
                // A lease ran out (whether or not the registry could record
                // it): `server_down` is what that means — unless the server
                // is registered with another exchange by now (it moved).
                let moved = self.apps.iter().any(|a| {
                    a.id == s
                        && a.inc
                            .as_ref()
                            .and_then(|i| i.link.exchange())
                            .is_some_and(|e| e != me)
                });
                if before == Some(RouteState::Disconnected) && state == RouteState::Down && !moved {
                    self.downs.push((s, self.now));
                }
                self.log(|| format!("exchange {me}: route {s} {state:?} {place:?}"));
            }
        }
        if let Some(ex) = self.exs[x].node.as_mut() {
            // A new incarnation attached in this step starts with nothing
            // that was queued for the old one (answered `server_down`).
            let mut fresh = None;
            for s in ex.core.servers().collect::<Vec<_>>() {
                let epoch = ex.core.route_epoch(s).unwrap_or(0);
                let seen = ex.epochs.insert(s, epoch);
                if seen.is_some_and(|e| e < epoch) && ex.core.queued(s) != (0, 0) {
                    fresh = Some((s, epoch, ex.core.queued(s)));
                }
            }
            if let Some((s, epoch, q)) = fresh {
                return self.fail(format!(
                    "server {s}'s new incarnation (epoch {epoch}) inherited 906s of the old one: {q:?}"
                ));
            }
        }
        if let Some(ex) = self.exs[x].node.as_ref() {
            let core = &ex.core;
            let mut queued = 0usize;
            // What moves in with a target (from each peer's relay outbox)
            // comes on top of a queue's own bound.
            let places = self.exs.len();
            let byte_bound = (self.p.queue_max_bytes + self.p.ex_max_frame + HEADER_LEN) * places;
            for s in core.servers().collect::<Vec<_>>() {
                let (frames, bytes) = core.queued(s);
                queued += frames;
                if frames > self.p.queue_max_frames * places || bytes > byte_bound {
                    return self.fail(format!(
                        "queue for {s} holds {frames} frames, {bytes} bytes: over its bound"
                    ));
                }
                if core.reports_held(s) > exchange::MAX_PENDING_REPORTS {
                    return self.fail(format!("reports held for {s} over their bound"));
                }
                if core.attached_link(s).is_some() != (core.route_state(s) == Some(RouteState::Up))
                {
                    return self.fail(format!("route of {s}: link and state disagree"));
                }
            }
            let m = core.metrics();
            if m.queued.get() != queued as i64 {
                return self.fail(format!(
                    "queued gauge {} but {queued} 906s are queued",
                    m.queued.get()
                ));
            }
            if m.links.get() != core.attached_count() as i64 {
                return self.fail(format!(
                    "links gauge {} but {} links attached",
                    m.links.get(),
                    core.attached_count()
                ));
            }
            if core.asks_in_flight() > 1_000 || core.timers_pending() > 100_000 {
                self.fail(format!(
                    "exchange state grows: {} asks, {} timers",
                    core.asks_in_flight(),
                    core.timers_pending()
                ));
            }
        }
    }
}
