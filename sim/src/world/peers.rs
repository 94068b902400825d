//! Links between exchanges: dialled when a core asks, carried as ordered
//! byte pipes like an app server's link, cut and restored by the chaos,
//! and lost when either exchange crashes (the other side notices after the
//! idle timeout).

use super::*;

impl World {
    /// Exchange `x` (incarnation `life`) dials `peer` at `address`.
    pub(super) fn dial(&mut self, x: usize, life: u64, peer: ServerId, address: String) {
        let to = self.exs.iter().position(|s| s.id == peer);
        let target = to.and_then(|t| {
            let node = self.exs[t].node.as_ref()?;
            let here = format!("10.0.0.{}:{}", t + 1, node.port);
            (here == address && !self.peer_cuts.contains(&pair(x, t))).then_some((t, node.life))
        });
        self.log(|| {
            format!(
                "exchange {} dials exchange {peer} at {address}: {}",
                self.exs[x].id,
                if target.is_some() {
                    "reachable"
                } else {
                    "no answer"
                }
            )
        });
        match target {
            Some((to, to_life)) => {
                let d = self.latency() * 2;
                self.schedule(
                    d,
                    Ev::PeerConnected {
                        x,
                        life,
                        to,
                        to_life,
                    },
                );
            }
            None => {
                let d = self.p.idle;
                self.schedule(d, Ev::PeerDialFailed { x, life, peer });
            }
        }
    }

    pub(super) fn peer_connected(&mut self, x: usize, life: u64, to: usize, to_life: u64) {
        let now = self.now;
        let peer = self.exs[to].id;
        if self.ex_life(x) != Some(life) {
            return;
        }
        if self.ex_life(to) != Some(to_life) || self.peer_cuts.contains(&pair(x, to)) {
            if let Some(ex) = self.exs[x].node.as_mut() {
                ex.core.dial_failed(peer, now);
            }
            return self.pump_ex(x);
        }
        let pc = self.next_conn;
        self.next_conn += 1;
        let (a, b) = (ConnId(pc), ConnId(pc));
        self.log(|| {
            format!(
                "exchange {} linked to {peer}: peer conn {pc}",
                self.exs[x].id
            )
        });
        let end = |x: usize, life: u64, conn: ConnId, first: bool| PeerEnd {
            x,
            life,
            conn,
            open: true,
            rx: BytesMut::new(),
            last: now,
            first,
        };
        self.peer_conns.insert(
            pc,
            PeerConn {
                ends: [end(x, life, a, false), end(to, to_life, b, true)],
                cut: false,
            },
        );
        if let Some(ex) = self.exs[to].node.as_mut() {
            ex.peer_conns.insert(b, (pc, 1));
            ex.core.accept(b, now);
        }
        self.pump_ex(to);
        if let Some(ex) = self.exs[x].node.as_mut() {
            ex.peer_conns.insert(a, (pc, 0));
            ex.core.peer_dialed(a, peer, now);
        }
        self.pump_ex(x);
    }

    /// Bytes towards end `end` of `pc`, in order after what is in flight.
    pub(super) fn peer_pipe(&mut self, pc: u64, end: usize, bytes: Bytes) {
        let lat = self.latency();
        let now = self.now;
        let split = self.rng.chance(0.1) && bytes.len() > 1;
        let cut_at = if split {
            self.rng.range(1, bytes.len() as u64) as usize
        } else {
            0
        };
        let Some(c) = self.peer_conns.get_mut(&pc) else {
            return;
        };
        if c.cut || !(c.ends[0].open && c.ends[1].open) {
            return;
        }
        let e = &mut c.ends[end];
        let at = e.last.max(now + lat);
        e.last = at;
        let parts = if split {
            vec![bytes.slice(..cut_at), bytes.slice(cut_at..)]
        } else {
            vec![bytes]
        };
        for b in parts {
            self.schedule_at(at, Ev::ToPeer { pc, end, bytes: b });
        }
    }

    /// The exchange holding end `end` of `pc`, if that incarnation still
    /// has it open.
    fn peer_side(&self, pc: u64, end: usize) -> Option<(usize, ConnId)> {
        let e = &self.peer_conns.get(&pc)?.ends[end];
        (e.open && self.ex_life(e.x) == Some(e.life)).then_some((e.x, e.conn))
    }

    pub(super) fn deliver_to_peer(&mut self, pc: u64, end: usize, bytes: Bytes) {
        let now = self.now;
        let Some((x, conn)) = self.peer_side(pc, end) else {
            return;
        };
        let c = self.peer_conns.get_mut(&pc).expect("live");
        if c.cut {
            return;
        }
        let e = &mut c.ends[end];
        e.rx.extend_from_slice(&bytes);
        let max = self.p.ex_max_frame;
        let mut frames = Vec::new();
        loop {
            match wire::decode(&mut e.rx, max) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(err) => {
                    let what = format!(
                        "exchange {} could not decode a peer frame: {err}",
                        self.exs[x].id
                    );
                    return self.fail(what);
                }
            }
        }
        let first = e.first && !frames.is_empty();
        if first {
            e.first = false;
        }
        let ex = self.exs[x].node.as_mut().expect("peer_side checked");
        if first
            && matches!(frames.first(), Some(Frame::PeerHello(_)))
            && let Frame::PeerHello(h) = frames.remove(0)
        {
            ex.core.handle_peer_hello(conn, h, Ok(()), now);
        }
        if !frames.is_empty() {
            ex.core.handle_frames(conn, frames, now);
        }
        self.pump_ex(x);
    }

    /// End `end` of `pc` learns that the connection is gone.
    pub(super) fn peer_down(&mut self, pc: u64, end: usize) {
        let now = self.now;
        let Some((x, conn)) = self.peer_side(pc, end) else {
            return;
        };
        if let Some(c) = self.peer_conns.get_mut(&pc) {
            c.ends[end].open = false;
        }
        if let Some(ex) = self.exs[x].node.as_mut() {
            ex.peer_conns.remove(&conn);
            let detail = "peer connection lost".to_string();
            ex.core.handle_end(
                conn,
                LinkEnd::Closed {
                    clean: false,
                    detail,
                },
                now,
            );
        }
        self.pump_ex(x);
        self.forget_peer_conn(pc);
    }

    /// Exchange holding end `end` closed it: the other end hears after a
    /// latency (or at the idle timeout when the pipe is cut).
    pub(super) fn close_peer_end(&mut self, pc: u64, end: usize) {
        let lat = self.latency();
        let idle = self.p.idle;
        let Some(c) = self.peer_conns.get_mut(&pc) else {
            return;
        };
        c.ends[end].open = false;
        let other = 1 - end;
        if c.ends[other].open {
            let at = if c.cut {
                self.now + idle
            } else {
                c.ends[other].last.max(self.now + lat)
            };
            self.schedule_at(at, Ev::PeerDown { pc, end: other });
        }
        self.forget_peer_conn(pc);
    }

    /// The process holding end `end` is gone: the other end notices at the
    /// idle timeout.
    pub(super) fn peer_end_gone(&mut self, pc: u64, end: usize) {
        let j = self.rng.millis(0, 300);
        let idle = self.p.idle;
        let Some(c) = self.peer_conns.get_mut(&pc) else {
            return;
        };
        c.ends[end].open = false;
        if c.ends[1 - end].open {
            self.schedule(idle + j, Ev::PeerDown { pc, end: 1 - end });
        }
        self.forget_peer_conn(pc);
    }

    fn forget_peer_conn(&mut self, pc: u64) {
        if self
            .peer_conns
            .get(&pc)
            .is_some_and(|c| !c.ends[0].open && !c.ends[1].open)
        {
            self.peer_conns.remove(&pc);
        }
    }

    /// Two exchanges cannot reach each other for a while: their link goes
    /// silent (both notice at the idle timeout) and new dials fail.
    pub(super) fn cut_peers(&mut self) {
        let n = self.exs.len();
        let x = self.rng.below(n);
        let y = (x + 1 + self.rng.below(n - 1)) % n;
        let key = pair(x, y);
        if !self.peer_cuts.insert(key) {
            return;
        }
        self.count("cut_exchanges");
        self.log(|| format!("exchanges {key:?} cut off from each other"));
        let idle = self.p.idle;
        let hit: Vec<u64> = self
            .peer_conns
            .iter()
            .filter(|(_, c)| !c.cut && pair(c.ends[0].x, c.ends[1].x) == key)
            .map(|(pc, _)| *pc)
            .collect();
        for pc in hit {
            self.peer_conns.get_mut(&pc).expect("listed").cut = true;
            for end in 0..2 {
                let j = self.rng.millis(0, 300);
                self.schedule(idle + j, Ev::PeerDown { pc, end });
            }
        }
        let heal = self
            .rng
            .millis(200, 2 * self.p.lease.as_millis() as u64 + 1_000);
        self.schedule(heal, Ev::PeerHeal { pair: key });
    }
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}
