//! The network: connections as pairs of ordered byte pipes, delivered
//! after a latency (possibly split), decoded with the real codec.

use super::*;

impl World {
    /// Put bytes on a connection's pipe (towards the exchange when
    /// `to_ex`), in order after what is already in flight.
    pub(super) fn pipe(&mut self, sc: u64, bytes: Bytes, to_ex: bool) {
        let lat = self.latency();
        let now = self.now;
        let split = self.rng.chance(0.1) && bytes.len() > 1;
        let cut_at = if split {
            self.rng.range(1, bytes.len() as u64) as usize
        } else {
            0
        };
        let Some(c) = self.conns.get_mut(&sc) else {
            return;
        };
        if c.cut || !(c.app_open && c.ex_open) {
            return;
        }
        let extra = if now < c.slow_until {
            c.slow_by
        } else {
            Duration::ZERO
        };
        let last = if to_ex {
            &mut c.to_ex_last
        } else {
            &mut c.to_app_last
        };
        let at = (*last).max(now + lat + extra);
        *last = at;
        let parts = if split {
            vec![bytes.slice(..cut_at), bytes.slice(cut_at..)]
        } else {
            vec![bytes]
        };
        for b in parts {
            let ev = if to_ex {
                Ev::ToEx { conn: sc, bytes: b }
            } else {
                Ev::ToApp { conn: sc, bytes: b }
            };
            self.schedule_at(at, ev);
        }
    }

    /// The exchange end of `conn` (which exchange, its connection id), if
    /// it is open on that exchange's running incarnation.
    pub(super) fn ex_side(&self, conn: u64) -> Option<(usize, ConnId)> {
        let c = self.conns.get(&conn)?;
        let ex = self.exs[c.x].node.as_ref()?;
        (c.ex_open && ex.life == c.ex_gen).then_some((c.x, c.ex_conn))
    }

    /// The app server end of `conn`, if that incarnation still holds it.
    pub(super) fn app_side(&self, conn: u64) -> Option<(usize, ConnId)> {
        let c = self.conns.get(&conn)?;
        let inc = self.apps[c.app].inc.as_ref()?;
        (c.app_open && inc.life == c.app_gen).then_some((c.app, c.link))
    }

    pub(super) fn connected(&mut self, a: usize, life: u64, link: ConnId, x: usize) {
        let now = self.now;
        let holds = self.apps[a]
            .inc
            .as_ref()
            .is_some_and(|i| i.life == life && i.link.conn() == Some(link));
        if !holds {
            return;
        }
        let ex_alive = self.exs[x].node.is_some() && !self.apps[a].partitioned;
        if !ex_alive {
            if let Some(inc) = self.apps[a].inc.as_mut() {
                inc.link
                    .handle_down(link, LinkDown::Lost("handshake failed".into()), now);
            }
            return self.pump_app(a);
        }
        let sc = self.next_conn;
        self.next_conn += 1;
        let ex_conn = ConnId(sc);
        self.log(|| {
            format!(
                "server {} connected to {}: conn {sc}",
                self.apps[a].id, self.exs[x].id
            )
        });
        // What other exchanges refused of this origin's 905s it did not
        // hear may now come through this one, late (as after a restart).
        let origin = self.apps[a].id;
        let refused: Vec<(MessageId, ServerId)> = self
            .exs
            .iter()
            .enumerate()
            .filter(|(y, _)| *y != x)
            .filter_map(|(_, s)| s.node.as_ref())
            .flat_map(|e| {
                e.core
                    .refusals_of(origin)
                    .map(|(id, t, _)| (id, t))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.oracle.exchange_refused(refused);
        let ex = self.exs[x].node.as_mut().expect("checked");
        ex.conns.insert(ex_conn, sc);
        let ex_gen = ex.life;
        self.conns.insert(
            sc,
            SimConn {
                x,
                app: a,
                app_gen: life,
                link,
                ex_gen,
                ex_conn,
                app_open: true,
                ex_open: true,
                cut: false,
                to_ex_last: now,
                to_app_last: now,
                ex_rx: BytesMut::new(),
                app_rx: BytesMut::new(),
                ex_first: true,
                slow_until: now,
                slow_by: Duration::ZERO,
            },
        );
        ex.core.accept(ex_conn, now);
        self.pump_ex(x);
        if let Some(inc) = self.apps[a].inc.as_mut() {
            inc.conns.insert(link, sc);
            inc.link.handle_connected(link, now);
        }
        self.pump_app(a);
    }

    pub(super) fn deliver_to_exchange(&mut self, sc: u64, bytes: Bytes) {
        let now = self.now;
        let Some((x, ex_conn)) = self.ex_side(sc) else {
            return;
        };
        let c = self.conns.get_mut(&sc).expect("live");
        if c.cut {
            return;
        }
        c.ex_rx.extend_from_slice(&bytes);
        let max = self.p.ex_max_frame;
        let mut frames = Vec::new();
        let mut bad = None;
        loop {
            match wire::decode(&mut c.ex_rx, max) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        let first = c.ex_first && !frames.is_empty();
        if first {
            c.ex_first = false;
        }
        let ex = self.exs[x].node.as_mut().expect("ex_side checked");
        if first
            && matches!(frames.first(), Some(Frame::Register(_)))
            && let Frame::Register(reg) = frames.remove(0)
        {
            ex.core.handle_register(ex_conn, reg, Ok(()), now);
        }
        if !frames.is_empty() {
            ex.core.handle_frames(ex_conn, frames, now);
        }
        if let Some(e) = bad {
            ex.core.handle_end(ex_conn, LinkEnd::Malformed(e), now);
        }
        self.pump_ex(x);
    }

    pub(super) fn deliver_to_app(&mut self, sc: u64, bytes: Bytes) {
        let now = self.now;
        let Some((a, link)) = self.app_side(sc) else {
            return;
        };
        let c = self.conns.get_mut(&sc).expect("live");
        if c.cut {
            return;
        }
        c.app_rx.extend_from_slice(&bytes);
        let max = self.p.app_max_frame[a];
        let mut frames = Vec::new();
        loop {
            match wire::decode(&mut c.app_rx, max) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    self.fail(format!("server {} could not decode a frame: {e}", a + 1));
                    return;
                }
            }
        }
        if frames.is_empty() {
            return;
        }
        if let Some(inc) = self.apps[a].inc.as_mut() {
            inc.link.handle_frames(link, frames, now);
        }
        self.pump_app(a);
    }
}
