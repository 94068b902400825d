//! The nodes: starting an exchange or an app server incarnation, and
//! carrying out what their cores output.

use super::*;

impl World {
    /// The running incarnation of exchange `x`, if any.
    pub(super) fn ex_life(&self, x: usize) -> Option<u64> {
        self.exs[x].node.as_ref().map(|e| e.life)
    }

    pub(super) fn start_exchange(&mut self, x: usize) {
        self.ex_gens += 1;
        let life = self.ex_gens;
        let me = self.exs[x].id;
        // A configured address stays the same across restarts; one found
        // in the registry may change.
        let port = if self.p.fixed_address {
            4_001
        } else {
            4_000 + life as u16
        };
        let row = self.reg.get_mut(&me).expect("exchange row");
        row.epoch += 1;
        row.state = RegState::Up;
        row.address = format!("10.0.0.{}:{port}", x + 1);
        let epoch = row.epoch;
        self.last_seen.insert(me, self.now);
        let known = self.app_rows();
        // A server alive and reachable, with the registry healthy, must be
        // back before its rejoin lease ends: it must never be marked down
        // (its sessions deleted) while it lives.
        let troubled = self.reg_mode != RegMode::Normal
            || self.p.registry_drop > 0.0
            || self.now
                < self.registry_calm_since + Duration::from_millis(registry::SLOWEST_ANSWER_MS);
        self.exs[x].rejoining = known
            .iter()
            .filter(|r| r.exchange == Some(me) && !r.down)
            .map(|r| {
                let cut = self.apps.iter().any(|a| a.id == r.id && a.partitioned);
                (
                    r.id,
                    Rejoin {
                        epoch: r.epoch,
                        excused: troubled || cut,
                    },
                )
            })
            .collect();
        let rejoining = self.exs[x].rejoining.clone();
        self.log(|| format!("exchange {me}: rejoin lease for {rejoining:?}"));
        let metrics = Arc::new(ExchangeMetrics::default());
        let core = Exchange::new(
            exchange::Config {
                id: me,
                epoch,
                lease: self.p.lease,
                rejoin: exchange::Config::rejoin_for(self.p.lease, self.p.idle),
                grace: Duration::from_millis(800),
                max_frame: self.p.ex_max_frame,
                handshake_timeout: Duration::from_millis(1_500),
                max_links: 64,
                queue_max_frames: self.p.queue_max_frames,
                queue_max_bytes: self.p.queue_max_bytes,
                sweep_period: exchange::Config::sweep_period_for(self.p.lease),
                ask_timeout: Duration::from_secs(5),
                split: Default::default(),
            },
            known,
            metrics,
            self.now,
        );
        self.log(|| format!("exchange {me} starts, epoch {epoch}, port {port}"));
        self.exs[x].node = Some(ExNode {
            core,
            life,
            port,
            conns: HashMap::new(),
            peer_conns: HashMap::new(),
            epochs: BTreeMap::new(),
            states: BTreeMap::new(),
        });
        self.pump_ex(x);
    }

    pub(super) fn start_app(&mut self, a: usize) {
        self.gens += 1;
        let life = self.gens;
        let id = self.apps[a].id;
        let row = self.reg.entry(id).or_insert(RegRow {
            app: true,
            epoch: 0,
            state: RegState::Down,
            exchange: None,
            attach_epoch: 0,
            address: String::new(),
        });
        row.epoch += 1;
        row.state = RegState::Down;
        let epoch = row.epoch;
        let address = self
            .p
            .fixed_address
            .then(|| SocketAddr::from(([10, 0, 0, 1], 4_001)));
        let max_frame = self.p.app_max_frame[a];
        let preferred = self.exs[a % self.exs.len()].id;
        let cfg = link::Config {
            server: id,
            epoch,
            exchange: preferred,
            address,
            max_frame,
            send_timeout: self.p.send_timeout,
            max_outstanding: self.p.max_outstanding,
            heartbeat: Duration::from_millis(200),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(1_000),
            register_timeout: Duration::from_secs(3),
            wall_ms_at_start: 1_700_000_000_000,
        };
        let link = Link::new(cfg, Arc::new(LinkMetrics::default()), self.now);
        self.log(|| format!("server {id} starts, epoch {epoch} (incarnation {life})"));
        self.apps[a].inc = Some(AppInc {
            life,
            link,
            origin: Origin::new(id, epoch),
            send_limit: max_frame,
            conns: HashMap::new(),
        });
        self.pump_app(a);
    }

    pub(super) fn app_rows(&self) -> Vec<AppServerRow> {
        registry::rows_of(&self.reg)
    }

    pub(super) fn pump_ex(&mut self, x: usize) {
        let me = self.exs[x].id;
        loop {
            let Some(ex) = self.exs[x].node.as_mut() else {
                return;
            };
            let Some(out) = ex.core.poll_output() else {
                return;
            };
            let life = ex.life;
            match out {
                exchange::Output::Transmit(conn) => {
                    if self.rng.chance(0.05) {
                        // A writer that is momentarily full.
                        let d = self.rng.millis(1, 40);
                        self.schedule(d, Ev::Writable { x, life, conn });
                    } else {
                        self.ex_transmit(x, conn);
                    }
                }
                exchange::Output::Close { conn, code, reason } => {
                    if let Some((pc, end)) = self.exs[x]
                        .node
                        .as_mut()
                        .and_then(|e| e.peer_conns.remove(&conn))
                    {
                        self.log(|| format!("exchange {me} closes peer conn {pc}: {reason}"));
                        self.close_peer_end(pc, end);
                        continue;
                    }
                    let Some(sc) = self.exs[x]
                        .node
                        .as_mut()
                        .and_then(|e| e.conns.remove(&conn))
                    else {
                        continue;
                    };
                    self.log(|| format!("exchange {me} closes conn {sc}: {code} {reason}"));
                    let lat = self.latency();
                    if let Some(c) = self.conns.get_mut(&sc) {
                        c.ex_open = false;
                        if !c.cut && c.app_open {
                            let at = c.to_app_last.max(self.now + lat);
                            c.to_app_last = at;
                            self.schedule_at(
                                at,
                                Ev::CloseToApp {
                                    conn: sc,
                                    code: code.into(),
                                    reason,
                                },
                            );
                        }
                    }
                }
                exchange::Output::Ask { id, query } => self.ask_registry(x, life, id, query),
                exchange::Output::Dial { peer, address } => self.dial(x, life, peer, address),
                exchange::Output::Stopped => {
                    self.log(|| format!("exchange {me} stopped (drained)"));
                    self.exchange_ends(x);
                    // What it did not close (a link accepted while it
                    // drained) ends for the app server at the idle timeout.
                    if let Some(ex) = self.exs[x].node.take() {
                        self.orphan_conns(&ex);
                    }
                    if let Some(r) = self.reg.get_mut(&me) {
                        r.state = RegState::Down;
                    }
                    let d = self.rng.millis(100, 1_500);
                    self.schedule(d, Ev::RestartEx { x });
                    return;
                }
            }
        }
    }

    pub(super) fn ex_transmit(&mut self, x: usize, conn: ConnId) {
        let Some(ex) = self.exs[x].node.as_mut() else {
            return;
        };
        let chunks = ex.core.poll_transmit(conn, 256 * 1024);
        if let Some(&(pc, end)) = ex.peer_conns.get(&conn) {
            let bytes = concat(chunks);
            if !bytes.is_empty() {
                self.peer_pipe(pc, 1 - end, bytes);
            }
            return;
        }
        let Some(&sc) = ex.conns.get(&conn) else {
            return;
        };
        let bytes = concat(chunks);
        if !bytes.is_empty() {
            self.pipe(sc, bytes, false);
        }
    }

    pub(super) fn pump_app(&mut self, a: usize) {
        let id = self.apps[a].id;
        loop {
            let Some(inc) = self.apps[a].inc.as_mut() else {
                return;
            };
            let life = inc.life;
            let Some(out) = inc.link.poll_output() else {
                break;
            };
            match out {
                link::Output::Locate(ask) => {
                    let d = self.registry_delay();
                    let lost = self.rng.chance(self.p.registry_drop);
                    self.log(|| {
                        format!(
                            "server {id} asks the registry for the exchange{}",
                            if lost { " (answer lost)" } else { "" }
                        )
                    });
                    if !lost {
                        self.schedule(d, Ev::AppAnswer { app: a, life, ask });
                    }
                }
                link::Output::Connect {
                    conn,
                    exchange,
                    addr,
                } => {
                    let x = self.exs.iter().position(|s| s.id == exchange);
                    let reachable = !self.apps[a].partitioned
                        && x.is_some_and(|x| {
                            self.exs[x]
                                .node
                                .as_ref()
                                .is_some_and(|e| e.port == addr.port())
                        });
                    self.log(|| {
                        format!(
                            "server {id} dials {addr} (conn {}): {}",
                            conn.0,
                            if reachable { "reachable" } else { "no answer" }
                        )
                    });
                    if reachable {
                        let d = self.latency() * 2;
                        self.schedule(
                            d,
                            Ev::Connected {
                                app: a,
                                life,
                                link: conn,
                                x: x.expect("reachable"),
                            },
                        );
                    } else {
                        // The QUIC handshake waits out its timeout.
                        let d = self.p.idle;
                        self.schedule(
                            d,
                            Ev::ConnectFailed {
                                app: a,
                                life,
                                link: conn,
                            },
                        );
                    }
                }
                link::Output::Close { conn, code, .. } => {
                    let Some(sc) = self.apps[a]
                        .inc
                        .as_mut()
                        .and_then(|i| i.conns.remove(&conn))
                    else {
                        continue;
                    };
                    self.log(|| format!("server {id} closes conn {sc}: {code}"));
                    let lat = self.latency();
                    if let Some(c) = self.conns.get_mut(&sc) {
                        c.app_open = false;
                        if !c.cut && c.ex_open {
                            let at = c.to_ex_last.max(self.now + lat);
                            c.to_ex_last = at;
                            self.schedule_at(
                                at,
                                Ev::CloseToEx {
                                    conn: sc,
                                    clean: code == CLOSE_GOING_AWAY,
                                },
                            );
                        }
                    }
                }
                link::Output::Deliver { message, users } => {
                    self.log(|| format!("server {id} receives {}", message.id));
                    if let Err(e) = self.oracle.received(id, life, &message, &users) {
                        self.fail(e);
                    }
                }
                link::Output::Completed {
                    reply,
                    results,
                    resent,
                } => {
                    self.log(|| {
                        format!(
                            "server {id} send {reply} completed: {:?}",
                            results
                                .iter()
                                .map(|r| (r.server.0, r.status.as_str()))
                                .collect::<Vec<_>>()
                        )
                    });
                    self.check_server_down(reply, &results);
                    if let Err(e) = self
                        .oracle
                        .completed(reply, life, &results, resent, self.now)
                    {
                        self.fail(e);
                    }
                }
                link::Output::SendLimit(n) => {
                    if let Some(inc) = self.apps[a].inc.as_mut() {
                        inc.send_limit = n;
                    }
                }
                link::Output::Fatal(reason) => {
                    self.fail(format!("server {id} was refused for good: {reason}"))
                }
            }
        }
        // What the link wrote goes on the wire of its connection.
        let Some(inc) = self.apps[a].inc.as_mut() else {
            return;
        };
        if !inc.link.has_transmit() {
            return;
        }
        let bytes = concat(inc.link.poll_transmit());
        let sc = inc.link.conn().and_then(|c| inc.conns.get(&c).copied());
        if let Some(sc) = sc {
            self.pipe(sc, bytes, true);
        }
    }
}

impl World {
    /// `server_down` is exact: the target's incarnation the message was
    /// meant for has ended, or it was not known to be registered when the
    /// message was sent (registered a moment before, or the registry in
    /// trouble), or a lease of it ran out since (the registry marked it
    /// down, or an exchange that lost its link took it down). Never for a server that lived, known to be up, all along —
    /// moving between exchanges, a peer link lost, an exchange drained or
    /// restarted.
    fn check_server_down(&mut self, n: u64, results: &[iim_proto::wire::ReportEntry]) {
        let rec = &self.oracle.sends[n as usize];
        let sent_at = rec.deadline - self.p.send_timeout;
        for r in results {
            if r.status != DeliveryStatus::ServerDown {
                continue;
            }
            let life = rec.target_lives.get(&r.server).copied().unwrap_or(0);
            let lives = self
                .apps
                .iter()
                .any(|a| a.id == r.server && a.inc.as_ref().is_some_and(|i| i.life == life));
            let marked = self
                .downs
                .iter()
                .any(|(s, at)| *s == r.server && *at >= sent_at);
            if life != 0 && lives && rec.known_up.contains(&r.server) && !marked {
                let what = format!(
                    "send {} reported server_down for {}, which lived and was never marked down since",
                    rec.id, r.server
                );
                return self.fail(what);
            }
        }
    }
}
