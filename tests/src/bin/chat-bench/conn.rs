//! The WebSocket connections of a scenario: opened through the test kit's
//! client (auth, welcome), then driven raw for the hot path. A reader per
//! connection matches pushes and acks to flows; a writer per connection
//! sends as the phase says.

use crate::flow::{Entry, Flow, Shared, lock};
use crate::{
    CONNECT_PARALLEL, KEEPALIVE, KEY_LEN, KEY_PREFIX, LOST_AFTER, PACED_CAP, at_us, now_us,
};
use anyhow::{Context, Result, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use iim_kit::client::{ChatClient, Socket};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as Ws;

/// Connect, authenticate, wait for the welcome; the socket from then on.
pub async fn connect(addr: SocketAddr, user: u64) -> Result<Socket> {
    let token = iim_kit::token(user);
    let c = tokio::time::timeout(
        Duration::from_secs(20),
        ChatClient::connect(addr, &token, "bench"),
    )
    .await
    .with_context(|| format!("user {user}: no welcome within 20 s"))?
    .with_context(|| format!("user {user}: auth at {addr}"))?;
    Ok(c.into_socket())
}

/// Open connections for (server address, user) pairs, a few at a time.
pub async fn connect_all(list: &[(SocketAddr, u64)]) -> Result<Vec<Socket>> {
    let mut out: Vec<Option<Socket>> = (0..list.len()).map(|_| None).collect();
    let mut results = futures_util::stream::iter(list.iter().copied().enumerate())
        .map(|(i, (a, u))| async move { (i, connect(a, u).await) })
        .buffer_unordered(CONNECT_PARALLEL);
    while let Some((i, r)) = results.next().await {
        out[i] = Some(r?);
    }
    drop(results);
    out.into_iter()
        .map(|w| w.context("connection missing"))
        .collect()
}

/// The key `flow.i.t` of one of our bodies in a frame, if it carries one.
pub fn parse_key(text: &str) -> Option<(usize, u64, u64)> {
    let at = text.find(KEY_PREFIX)? + KEY_PREFIX.len();
    let key = text.get(at..at + KEY_LEN)?;
    let mut it = key.split('.');
    let f = it.next()?.parse().ok()?;
    let i = it.next()?.parse().ok()?;
    let t = it.next()?.parse().ok()?;
    Some((f, i, t))
}

/// The message index in the `req` of one of our acks.
pub fn ack_index(text: &str) -> Option<u64> {
    const REQ: &str = "\"req\":\"b";
    let at = text.find(REQ)? + REQ.len();
    let rest = text.get(at..)?;
    rest[..rest.find('"')?].parse().ok()
}

/// Everything a connection on server `side` (0 = A, 1 = B) receives:
/// pushes (ours carry a key), acks and errors for its own sends (flow
/// `own`), and whatever else the server says.
pub async fn read_loop(
    mut rx: SplitStream<Socket>,
    side: usize,
    own: Option<usize>,
    shared: Arc<Shared>,
) {
    while let Some(m) = rx.next().await {
        let text = match m {
            Ok(Ws::Text(t)) => t,
            Ok(Ws::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let text = text.as_str();
        if let Some((f, i, t)) = parse_key(text) {
            shared.on_push(f, i, t, side);
            continue;
        }
        if text.starts_with("{\"op\":\"ack\"") {
            match (own, ack_index(text)) {
                (Some(f), Some(i)) => shared.on_ack(f, i),
                _ => {
                    shared.acks.fetch_add(1, Ordering::Relaxed);
                }
            }
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        if v["op"] == "error" {
            let code = v["code"].as_str().unwrap_or("?").to_string();
            *lock(&shared.errors).entry(code).or_default() += 1;
            let i = v["req"]
                .as_str()
                .and_then(|r| r.strip_prefix('b'))
                .and_then(|r| r.parse().ok());
            if let (Some(f), Some(i)) = (own, i) {
                shared.on_refused(f, i);
            }
        }
    }
    if !shared.closing.load(Ordering::Relaxed) {
        shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// What senders do now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    Idle,
    /// Keep `window` messages in flight; messages sent within
    /// `[record_from, record_until)` µs are recorded in the histograms.
    Saturate {
        window: usize,
        record_from: u64,
        record_until: u64,
    },
    /// Open loop: `rate` messages/s over all flows, message k due at
    /// `t0 + k / rate`, until `end`; recorded from `record_from`.
    Paced {
        generation: u64,
        rate: f64,
        t0: u64,
        end: u64,
        record_from: u64,
    },
    Done,
}

pub type Sink = SplitSink<Socket, Ws>;

pub fn frame(shared: &Shared, flow: &Flow, i: u64, t: u64) -> Ws {
    Ws::Text(
        format!(
            "{{\"op\":\"send\",\"req\":\"b{i}\",\"ope\":{},\"to\":{},\"type\":\"text\",\"body\":{KEY_PREFIX}{:04}.{i:010}.{t:013}\",\"p\":\"{}\"}}}}",
            flow.ope, flow.to, flow.id, shared.pad
        )
        .into(),
    )
}

/// Register message `i` of `flow` as in flight and queue its frame.
pub async fn send_one(
    tx: &mut Sink,
    shared: &Shared,
    flow: &Flow,
    intended: u64,
    record: bool,
) -> Result<()> {
    let i = {
        let mut st = lock(&flow.st);
        let i = st.next_i;
        st.next_i += 1;
        st.inflight.insert(
            i,
            Entry {
                intended_us: intended,
                sent: Instant::now(),
                got: [0, 0],
                acked: false,
                record,
            },
        );
        i
    };
    shared.sent.fetch_add(1, Ordering::Relaxed);
    tx.feed(frame(shared, flow, i, intended)).await?;
    Ok(())
}

/// Wait until `flow` makes progress, the phase changes, or 250 ms pass
/// (then what has been in flight too long is counted lost). False once
/// the phase's sender is gone.
async fn await_progress(phase: &mut watch::Receiver<Phase>, flow: &Flow, shared: &Shared) -> bool {
    tokio::select! {
        r = phase.changed() => return r.is_ok(),
        _ = flow.progress.notified() => {}
        _ = tokio::time::sleep(Duration::from_millis(250)) => shared.expire(flow, LOST_AFTER),
    }
    true
}

/// The writing side of one connection: sends for its flow as the phase
/// says, or only keeps the connection alive.
pub async fn drive(
    mut tx: Sink,
    flow: Option<Arc<Flow>>,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) -> Result<()> {
    let nflows = shared.flows.len().max(1) as u64;
    let mut last_write = tokio::time::Instant::now();
    // (generation, messages of this flow scheduled so far) of a paced run.
    let mut paced: (u64, u64) = (u64::MAX, 0);
    loop {
        let now_phase = *phase.borrow_and_update();
        let keepalive = last_write + KEEPALIVE;
        let flow = match (&flow, now_phase) {
            (_, Phase::Done) => {
                let _ = tx.close().await;
                return Ok(());
            }
            (Some(f), Phase::Saturate { .. } | Phase::Paced { .. }) => f,
            _ => {
                tokio::select! {
                    r = phase.changed() => if r.is_err() { return Ok(()) },
                    _ = tokio::time::sleep_until(keepalive) => {
                        tx.send(Ws::Text("{\"op\":\"ping\"}".into())).await?;
                        last_write = tokio::time::Instant::now();
                    }
                }
                continue;
            }
        };
        match now_phase {
            Phase::Saturate {
                window,
                record_from,
                record_until,
            } => {
                let room = window.saturating_sub(lock(&flow.st).inflight.len());
                if room == 0 {
                    if !await_progress(&mut phase, flow, &shared).await {
                        return Ok(());
                    }
                    continue;
                }
                for _ in 0..room {
                    let t = now_us();
                    let record = (record_from..record_until).contains(&t);
                    send_one(&mut tx, &shared, flow, t, record).await?;
                }
                tx.flush().await?;
                last_write = tokio::time::Instant::now();
            }
            Phase::Paced {
                generation,
                rate,
                t0,
                end,
                record_from,
            } => {
                if paced.0 != generation {
                    paced = (generation, 0);
                }
                let due = |j: u64| t0 + ((j * nflows + flow.id as u64) as f64 * 1e6 / rate) as u64;
                let next = due(paced.1);
                if next >= end {
                    // This flow's part of the run is over.
                    if !await_progress(&mut phase, flow, &shared).await {
                        return Ok(());
                    }
                    continue;
                }
                if next > now_us() {
                    tokio::select! {
                        r = phase.changed() => if r.is_err() { return Ok(()) },
                        _ = tokio::time::sleep_until(at_us(next)) => {}
                    }
                    continue;
                }
                if lock(&flow.st).inflight.len() >= PACED_CAP {
                    if !await_progress(&mut phase, flow, &shared).await {
                        return Ok(());
                    }
                    continue;
                }
                // Everything due by now, within the cap, in one write.
                let mut j = paced.1;
                let now = now_us();
                while due(j) <= now && due(j) < end && lock(&flow.st).inflight.len() < PACED_CAP {
                    let t = due(j);
                    send_one(&mut tx, &shared, flow, t, t >= record_from).await?;
                    j += 1;
                }
                paced.1 = j;
                tx.flush().await?;
                last_write = tokio::time::Instant::now();
            }
            Phase::Idle | Phase::Done => {}
        }
    }
}

/// The connections of one scenario and their tasks.
pub struct Scenario {
    pub shared: Arc<Shared>,
    pub phase: watch::Sender<Phase>,
    pub readers: Vec<JoinHandle<()>>,
    pub drivers: Vec<JoinHandle<Result<()>>>,
}

impl Scenario {
    /// `conns`: each connection with its server (0 = A, 1 = B) and the flow
    /// it sends for, if any.
    pub fn start(conns: Vec<(Socket, usize, Option<usize>)>, shared: Arc<Shared>) -> Scenario {
        let (phase, rx) = watch::channel(Phase::Idle);
        let mut readers = Vec::new();
        let mut drivers = Vec::new();
        for (ws, side, own) in conns {
            let (tx, stream) = ws.split();
            readers.push(tokio::spawn(read_loop(stream, side, own, shared.clone())));
            let flow = own.and_then(|f| shared.flows.get(f).cloned());
            drivers.push(tokio::spawn(drive(tx, flow, shared.clone(), rx.clone())));
        }
        Scenario {
            shared,
            phase,
            readers,
            drivers,
        }
    }

    pub fn set(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    /// Fail early if a writer died or connections were closed by a server.
    pub fn check(&self) -> Result<()> {
        for d in &self.drivers {
            if d.is_finished() {
                bail!("a sending connection failed (write error)");
            }
        }
        let closed = self.shared.closed.load(Ordering::Relaxed);
        if closed > 0 {
            bail!("{closed} client connection(s) were closed by the server");
        }
        Ok(())
    }

    /// Wait until nothing is in flight (or `max` passes; what is left is
    /// then counted lost).
    pub async fn drain(&self, max: Duration) {
        let deadline = Instant::now() + max;
        while self.shared.inflight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for f in &self.shared.flows {
            self.shared.expire(f, Duration::ZERO);
        }
    }

    pub async fn stop(self) -> Result<()> {
        self.shared.closing.store(true, Ordering::Relaxed);
        self.set(Phase::Done);
        let mut first_err = None;
        for d in self.drivers {
            match tokio::time::timeout(Duration::from_secs(5), d).await {
                Ok(Ok(Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(anyhow::anyhow!("driver task: {e}"));
                }
                _ => {}
            }
        }
        for r in self.readers {
            // A server that does not answer the close is left behind.
            let abort = r.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), r)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
