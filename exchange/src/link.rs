//! One connection to the exchange, as IO — an app server's link, or a peer
//! exchange's (accepted here, or dialled to a peer with a higher id): the
//! TLS handshake, the stream, its writer, and a reader that hands every
//! batch of frames to the hub. What the frames mean — registration, 905s,
//! acks, relays — is decided by the core the hub drives; the only check
//! made here is the one that needs the connection itself: does the
//! certificate name the server that `Register` (or the exchange that
//! `PeerHello`) claims to be.

use crate::accept::{Admission, LogBudget, Slot};
use crate::hub::Event;
use iim::quic::{self, CLOSE_GOING_AWAY, FrameReader, ReadError};
use iim::tls;
use iim::types::ServerId;
use iim::wire::{ErrorCode, Frame};
use iim_core::ConnId;
use iim_core::exchange::{ExchangeMetrics, LinkEnd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{Span, warn};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Batches a link's writer may hold before the hub waits for it.
pub const WRITER_BATCHES: usize = 64;

/// What a link task needs.
pub struct LinkCtx {
    pub events: mpsc::Sender<Event>,
    pub metrics: Arc<ExchangeMetrics>,
    pub handshake_timeout: Duration,
    pub max_frame: usize,
    /// The bound on handshakes in progress.
    pub admission: Admission,
    /// Warnings about failed handshakes, per second.
    pub log_budget: LogBudget,
}

impl LinkCtx {
    /// A failed handshake: counted always, logged within the budget.
    fn handshake_failed(&self, reason: &'static str, detail: &dyn std::fmt::Display) {
        self.metrics.rejections.inc(reason);
        if let Some(skipped) = self.log_budget.allow(std::time::Instant::now()) {
            warn!(reason, %detail, skipped, "handshake failed");
        }
    }
}

/// Serve one incoming connection until it ends.
#[tracing::instrument(skip_all, fields(remote = %incoming.remote_address(), server))]
pub async fn serve(ctx: Arc<LinkCtx>, incoming: quinn::Incoming, slot: Slot) {
    let timeout = ctx.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return ctx.handshake_failed("tls_handshake", &e),
        Err(_) => return ctx.handshake_failed("handshake_timeout", &"TLS handshake timed out"),
    };
    let (send, recv) = match tokio::time::timeout(timeout, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let detail = format!("no stream: {e}");
            ctx.handshake_failed("not_registered", &detail);
            quic::close_with(&conn, ErrorCode::NotRegistered, &detail);
            return;
        }
        Err(_) => {
            ctx.handshake_failed("handshake_timeout", &"no stream in time");
            quic::close_with(&conn, ErrorCode::NotRegistered, "no register frame in time");
            return;
        }
    };
    // Certified and streaming: no longer a handshake in progress (its
    // registration is the core's, under the same timeout).
    drop(slot);
    let id = ConnId(NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed));
    let (writer, writer_task) = quic::spawn_writer(send, WRITER_BATCHES);
    let accepted = Event::Accepted {
        conn: id,
        connection: conn.clone(),
        writer,
    };
    if ctx.events.send(accepted).await.is_err() {
        writer_task.abort();
        return;
    }
    let reader = FrameReader::new(recv, ctx.max_frame);
    let end = read_loop(&ctx, &conn, id, reader, true).await;
    if let Some(end) = end {
        let _ = ctx.events.send(Event::End { conn: id, end }).await;
    }
    writer_task.abort();
}

/// Dial exchange `peer` at `address` (this exchange has the lower id) and
/// serve the peer link until it ends. A failure before the stream is open
/// is reported as `DialFailed`.
pub async fn dial(ctx: Arc<LinkCtx>, dialer: Dialer, peer: ServerId, address: String) {
    let failed = |why: String| {
        warn!(peer = peer.0, %address, %why, "cannot reach peer exchange");
        Event::DialFailed { peer }
    };
    let attempt = async {
        let addr: std::net::SocketAddr =
            address.parse().map_err(|e| format!("bad address: {e}"))?;
        let conn = dialer
            .endpoint
            .connect_with(dialer.config.clone(), addr, &tls::exchange_name(peer))
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, send, recv))
    };
    let (conn, send, recv) = match tokio::time::timeout(ctx.handshake_timeout, attempt).await {
        Ok(Ok(c)) => c,
        Ok(Err(why)) => {
            let _ = ctx.events.send(failed(why)).await;
            return;
        }
        Err(_) => {
            let _ = ctx.events.send(failed("timed out".into())).await;
            return;
        }
    };
    let id = ConnId(NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed));
    let (writer, writer_task) = quic::spawn_writer(send, WRITER_BATCHES);
    let dialed = Event::Dialed {
        conn: id,
        peer,
        connection: conn.clone(),
        writer,
    };
    if ctx.events.send(dialed).await.is_err() {
        writer_task.abort();
        return;
    }
    let reader = FrameReader::new(recv, ctx.max_frame);
    let end = read_loop(&ctx, &conn, id, reader, false).await;
    if let Some(end) = end {
        let _ = ctx.events.send(Event::End { conn: id, end }).await;
    }
    writer_task.abort();
}

/// What dialling a peer needs: the exchange's endpoint, which also acts as
/// a client, and its own certificate as the client's.
#[derive(Clone)]
pub struct Dialer {
    pub endpoint: quinn::Endpoint,
    pub config: quinn::ClientConfig,
}

/// Read frames until the link ends; `None` when the hub is gone. On an
/// accepted connection (`accepted`) the first frame says who is calling:
/// `Register` (an app server) or `PeerHello` (an exchange); on a dialled
/// one, the peer's hello is an ordinary frame for the core.
async fn read_loop(
    ctx: &LinkCtx,
    conn: &quinn::Connection,
    id: ConnId,
    mut reader: FrameReader,
    accepted: bool,
) -> Option<LinkEnd> {
    let mut batch = Vec::new();
    let mut first = accepted;
    loop {
        let more = tokio::select! {
            r = reader.next_batch(&mut batch) => r,
            e = conn.closed() => return Some(closed(e)),
        };
        match more {
            Ok(true) => {}
            Ok(false) => return Some(LinkEnd::Finished),
            Err(ReadError::Wire(w)) => return Some(LinkEnd::Malformed(w)),
            Err(ReadError::Stream(quinn::ReadError::ConnectionLost(e))) => {
                return Some(closed(e));
            }
            Err(ReadError::Stream(e)) => return Some(LinkEnd::Stream(e.to_string())),
        }
        let mut frames = std::mem::take(&mut batch);
        if std::mem::take(&mut first) {
            let mut it = frames.into_iter();
            match it.next() {
                Some(Frame::Register(reg)) => {
                    let identity = tls::verify_peer_name(conn, &tls::server_name(reg.server))
                        .map_err(|e| e.to_string());
                    if identity.is_ok() {
                        Span::current().record("server", reg.server.0);
                    }
                    let ev = Event::Register {
                        conn: id,
                        reg,
                        identity,
                    };
                    ctx.events.send(ev).await.ok()?;
                    frames = it.collect();
                }
                Some(Frame::PeerHello(hello)) => {
                    let name = tls::exchange_name(hello.exchange);
                    let identity = tls::verify_peer_name(conn, &name).map_err(|e| e.to_string());
                    let ev = Event::PeerHello {
                        conn: id,
                        hello,
                        identity,
                    };
                    ctx.events.send(ev).await.ok()?;
                    frames = it.collect();
                }
                // Not a registration: the core refuses the link.
                Some(other) => frames = std::iter::once(other).chain(it).collect(),
                None => frames = Vec::new(),
            }
            if frames.is_empty() {
                continue;
            }
        }
        ctx.events
            .send(Event::Frames { conn: id, frames })
            .await
            .ok()?;
    }
}

fn closed(e: quinn::ConnectionError) -> LinkEnd {
    let clean = matches!(
        &e,
        quinn::ConnectionError::ApplicationClosed(c)
            if u64::from(c.error_code) == u64::from(CLOSE_GOING_AWAY)
    );
    LinkEnd::Closed {
        clean,
        detail: e.to_string(),
    }
}
