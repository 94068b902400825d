//! The schedule of sends and faults: links cut and slowed, app servers
//! and the exchange crashing or draining, the registry in trouble.

use super::*;

impl World {
    pub(super) fn live_apps(&self) -> Vec<usize> {
        (0..self.apps.len())
            .filter(|&a| self.apps[a].inc.is_some())
            .collect()
    }

    pub(super) fn count(&mut self, what: &'static str) {
        *self.stats.faults.entry(what).or_insert(0) += 1;
    }

    pub(super) fn chaos(&mut self) {
        let roll = self.rng.below(100);
        match roll {
            0..=19 => self.cut(),
            20..=39 => self.slow_down(),
            40..=54 => self.crash_app(),
            55..=64 => self.drain_app(),
            65..=74 => self.crash_exchange(),
            75..=81 => self.drain_exchange(),
            82..=85 if self.exs.len() > 1 => self.cut_peers(),
            _ => {
                self.reg_mode = match self.rng.below(3) {
                    0 => RegMode::Slow,
                    1 => RegMode::Failing,
                    _ => {
                        self.reg_stale = self.reg.clone();
                        RegMode::Stale
                    }
                };
                self.count("registry_trouble");
                let mode = self.reg_mode;
                self.log(|| format!("registry in trouble: {mode:?}"));
                for slot in &mut self.exs {
                    for r in slot.rejoining.values_mut() {
                        r.excused = true;
                    }
                }
                let d = self.rng.millis(300, 4_000);
                self.schedule(d, Ev::RegistryNormal);
            }
        }
    }

    pub(super) fn cut(&mut self) {
        let candidates: Vec<usize> = self
            .live_apps()
            .into_iter()
            .filter(|&a| !self.apps[a].partitioned)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let a = candidates[self.rng.below(candidates.len())];
        self.count("cut");
        self.apps[a].partitioned = true;
        let id = self.apps[a].id;
        for slot in &mut self.exs {
            if let Some(r) = slot.rejoining.get_mut(&id) {
                r.excused = true;
            }
        }
        self.log(|| format!("server {} cut off", self.apps[a].id));
        let idle = self.p.idle;
        let conns: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.app == a && (c.app_open || c.ex_open) && !c.cut)
            .map(|(k, _)| *k)
            .collect();
        for sc in sorted(conns) {
            self.conns.get_mut(&sc).expect("listed").cut = true;
            let j1 = self.rng.millis(0, 300);
            let j2 = self.rng.millis(0, 300);
            self.schedule(idle + j1, Ev::IdleEx { conn: sc });
            self.schedule(idle + j2, Ev::IdleApp { conn: sc });
        }
        // Sometimes shorter than the lease, sometimes longer.
        let heal = self
            .rng
            .millis(200, 2 * self.p.lease.as_millis() as u64 + 1_000);
        self.schedule(heal, Ev::Heal { app: a });
    }

    pub(super) fn slow_down(&mut self) {
        let open: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.app_open && c.ex_open && !c.cut)
            .map(|(k, _)| *k)
            .collect();
        let open = sorted(open);
        if open.is_empty() {
            return;
        }
        let sc = open[self.rng.below(open.len())];
        self.count("slow");
        let until = self.now + self.rng.millis(100, 800);
        // Delays stay below the idle timeout: the connection survives.
        let by = self.rng.millis(50, self.p.idle.as_millis() as u64 / 2);
        let c = self.conns.get_mut(&sc).expect("listed");
        c.slow_until = until;
        c.slow_by = by;
    }

    pub(super) fn crash_app(&mut self) {
        let live = self.live_apps();
        if live.is_empty() {
            return;
        }
        let a = live[self.rng.below(live.len())];
        self.count("crash_server");
        self.kill_app(a);
        let d = self
            .rng
            .millis(100, 2 * self.p.lease.as_millis() as u64 + 500);
        self.schedule(d, Ev::RestartApp { app: a });
    }

    /// The process of app server `a` dies: its connections go silent.
    pub(super) fn kill_app(&mut self, a: usize) {
        let Some(inc) = self.apps[a].inc.take() else {
            return;
        };
        self.log(|| format!("server {} crashes", self.apps[a].id));
        let idle = self.p.idle;
        for sc in sorted(inc.conns.values().copied().collect()) {
            if let Some(c) = self.conns.get_mut(&sc) {
                c.app_open = false;
                if c.ex_open && !c.cut {
                    let j = self.rng.millis(0, 300);
                    self.schedule(idle + j, Ev::IdleEx { conn: sc });
                }
            }
        }
    }

    pub(super) fn drain_app(&mut self) {
        let live = self.live_apps();
        if live.is_empty() {
            return;
        }
        let a = live[self.rng.below(live.len())];
        self.count("drain_server");
        self.log(|| format!("server {} drains and stops", self.apps[a].id));
        let now = self.now;
        if let Some(inc) = self.apps[a].inc.as_mut() {
            inc.link.stop(now);
        }
        self.pump_app(a);
        // The server marks itself down; then the process is gone.
        let id = self.apps[a].id;
        let epoch = self.reg.get(&id).map(|r| r.epoch);
        if let (Some(row), Some(_)) = (self.reg.get_mut(&id), epoch) {
            row.state = RegState::Down;
            self.downs.push((id, self.now));
        }
        self.kill_app(a);
        let d = self.rng.millis(200, 3_000);
        self.schedule(d, Ev::RestartApp { app: a });
    }

    /// An exchange incarnation ends: tell the oracle what it refused.
    pub(super) fn exchange_ends(&mut self, x: usize) {
        if let Some(ex) = self.exs[x].node.as_ref() {
            let origins: Vec<ServerId> = self.apps.iter().map(|a| a.id).collect();
            let refused: Vec<(MessageId, ServerId)> = origins
                .into_iter()
                .flat_map(|o| {
                    ex.core
                        .refusals_of(o)
                        .map(|(id, t, _)| (id, t))
                        .collect::<Vec<_>>()
                })
                .collect();
            self.oracle.exchange_refused(refused);
        }
    }

    fn live_exchanges(&self) -> Vec<usize> {
        (0..self.exs.len())
            .filter(|&x| self.exs[x].node.is_some())
            .collect()
    }

    pub(super) fn crash_exchange(&mut self) {
        let live = self.live_exchanges();
        if live.is_empty() {
            return;
        }
        let x = live[self.rng.below(live.len())];
        self.exchange_ends(x);
        let Some(ex) = self.exs[x].node.take() else {
            return;
        };
        self.count("crash_exchange");
        self.log(|| format!("exchange {} crashes", self.exs[x].id));
        self.orphan_conns(&ex);
        let d = self.rng.millis(100, 3_000);
        self.schedule(d, Ev::RestartEx { x });
    }

    /// The exchange process is gone: its connections that the app servers
    /// still hold end for them at the idle timeout.
    pub(super) fn orphan_conns(&mut self, ex: &ExNode) {
        let idle = self.p.idle;
        for (pc, end) in ex.peer_conns.values().copied().collect::<BTreeSet<_>>() {
            self.peer_end_gone(pc, end);
        }
        for sc in sorted(ex.conns.values().copied().collect()) {
            if let Some(c) = self.conns.get_mut(&sc) {
                c.ex_open = false;
                if c.app_open && !c.cut {
                    let j = self.rng.millis(0, 300);
                    self.schedule(idle + j, Ev::IdleApp { conn: sc });
                }
            }
        }
    }

    pub(super) fn drain_exchange(&mut self) {
        let now = self.now;
        let live: Vec<usize> = self
            .live_exchanges()
            .into_iter()
            .filter(|&x| {
                self.exs[x]
                    .node
                    .as_ref()
                    .is_some_and(|e| !e.core.is_draining())
            })
            .collect();
        if live.is_empty() {
            return;
        }
        let x = live[self.rng.below(live.len())];
        self.count("drain_exchange");
        self.log(|| format!("exchange {} drains", self.exs[x].id));
        if let Some(ex) = self.exs[x].node.as_mut() {
            ex.core.shutdown(now);
        }
        self.pump_ex(x);
    }

    pub(super) fn random_send(&mut self) {
        let live: Vec<usize> = self
            .live_apps()
            .into_iter()
            .filter(|&a| {
                let l = &self.apps[a].inc.as_ref().expect("live").link;
                l.room() > 0 && !l.is_stopped()
            })
            .collect();
        if live.is_empty() {
            return;
        }
        let a = live[self.rng.below(live.len())];
        let mut targets: Vec<ServerId> = self
            .apps
            .iter()
            .map(|x| x.id)
            .filter(|id| *id != self.apps[a].id)
            .filter(|_| self.rng.chance(0.6))
            .collect();
        if self.rng.chance(0.03) {
            targets.push(STRANGER);
        }
        if targets.is_empty() {
            let others: Vec<ServerId> = self
                .apps
                .iter()
                .map(|x| x.id)
                .filter(|id| *id != self.apps[a].id)
                .collect();
            targets.push(others[self.rng.below(others.len())]);
        }
        targets.sort();
        let size = if self.rng.chance(0.05) {
            self.rng.range(1_200, 3_000) as usize
        } else {
            self.rng.range(0, 200) as usize
        };
        self.send(a, &targets, size);
    }

    /// App server `a` sends a message of `size` bytes to users on
    /// `targets`.
    pub(super) fn send(&mut self, a: usize, targets: &[ServerId], size: usize) -> Option<u64> {
        let now = self.now;
        let body: Bytes = (0..size).map(|_| self.rng.next_u64() as u8).collect();
        let mut rows: BTreeMap<ServerId, Vec<UserRow>> = BTreeMap::new();
        for t in targets {
            let n = self.rng.range(1, 4);
            rows.insert(
                *t,
                (0..n)
                    .map(|j| UserRow {
                        user: UserId(u64::from(t.0) * 1_000 + j),
                        channel: ChannelId(j + 1),
                    })
                    .collect(),
            );
        }
        let target_lives = targets
            .iter()
            .map(|t| {
                let life = self
                    .apps
                    .iter()
                    .find(|x| x.id == *t)
                    .and_then(|x| x.inc.as_ref())
                    .map_or(0, |i| i.life);
                (*t, life)
            })
            .collect();
        // Every exchange has read a registration within two sweeps, when
        // the registry answers: a sweep may wait out a lost answer (the ask
        // timeout) or a slow one.
        let settled = exchange::Config::sweep_period_for(self.p.lease) * 2
            + Duration::from_secs(5)
            + Duration::from_millis(registry::SLOWEST_ANSWER_MS);
        let calm = self.reg_mode == RegMode::Normal && self.registry_calm_since + settled <= now;
        let known_up: Vec<ServerId> = targets
            .iter()
            .copied()
            .filter(|t| {
                calm && self.reg.get(t).is_some_and(|r| r.state == RegState::Up)
                    && self.up_since.get(t).is_some_and(|u| *u + settled <= now)
            })
            .collect();
        let id = self.apps[a].id;
        let inc = self.apps[a].inc.as_mut()?;
        let mut msg = Message {
            id: MessageId {
                origin: id,
                epoch: 0,
                seq: 0,
            },
            source: Address::new(id, UserId(7)),
            target: Address::RECEIVER,
            kind: 9,
            timing: Timing::default(),
            body: body.clone(),
            nested: vec![],
        };
        let remote = rows
            .iter()
            .flat_map(|(s, us)| us.iter().map(move |u| (*s, *u)));
        let exchange = inc.link.config().exchange;
        let fwd = match inc
            .origin
            .forward(&mut msg, remote, exchange, inc.send_limit)
        {
            Ok(f) => f,
            // Refused to the caller as too large: nothing to follow.
            Err(_) => return None,
        };
        let life = inc.life;
        let n = self.oracle.sent(SendRec {
            origin: id,
            incarnation: life,
            id: fwd.id,
            targets: rows,
            target_lives,
            body,
            deadline: now + self.p.send_timeout,
            outcome: None,
            completed_at: None,
            resent: false,
            known_up,
        });
        self.stats.sends += 1;
        self.log(|| format!("server {id} sends {} (send {n}) to {targets:?}", fwd.id));
        let inc = self.apps[a].inc.as_mut().expect("live");
        inc.link.submit(fwd.id, fwd.frame, fwd.targets, n, now);
        self.pump_app(a);
        Some(n)
    }
}
