//! One app server's connection to the exchange: the mTLS handshake, the
//! Register check (certificate name, then registry), and the reader that
//! turns 905s into 906s for the target tasks.
//!
//! A connection error is logged once, where the connection's task ends.
//! Anything the peer gets wrong closes its own link with an error code and
//! reason it can read, and a rejection metric; no other link is touched.

use crate::hub::{self, Ctx, Route, TargetCmd};
use crate::split::{self, SplitLimits};
use iim::quic::{self, CLOSE_GOING_AWAY, FrameReader, ReadError};
use iim::registry::Registration;
use iim::tls;
use iim::types::{ServerId, now_ms};
use iim::wire::{
    DeliveryStatus, ErrorCode, ErrorFrame, Frame, Register, Registered, ReportEntry, WireError,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::{Span, debug, info, warn};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Batches a link's writer may hold before its owner waits.
const WRITER_BATCHES: usize = 64;

/// Serve one incoming connection until it ends.
#[tracing::instrument(skip_all, fields(remote = %incoming.remote_address(), server))]
pub async fn serve(ctx: Arc<Ctx>, incoming: quinn::Incoming) {
    let timeout = ctx.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            ctx.metrics.rejections.inc("tls_handshake");
            warn!(error = %e, "handshake refused");
            return;
        }
        Err(_) => {
            ctx.metrics.rejections.inc("handshake_timeout");
            warn!("handshake timed out");
            return;
        }
    };
    let registered = match tokio::time::timeout(timeout, register(&ctx, &conn)).await {
        Ok(Ok(r)) => r,
        Ok(Err((reason, code, detail))) => {
            ctx.metrics.rejections.inc(reason);
            warn!(reason, %detail, "registration refused");
            quic::close_with(&conn, code, &detail);
            return;
        }
        Err(_) => {
            ctx.metrics.rejections.inc("handshake_timeout");
            warn!("no registration in time");
            quic::close_with(&conn, ErrorCode::NotRegistered, "no register frame in time");
            return;
        }
    };
    let Registered_ {
        server,
        epoch,
        reader,
        route,
        conn_id,
        writer,
        writer_task,
    } = registered;
    Span::current().record("server", server.0);
    info!(epoch, "server registered");
    let end = read_loop(&ctx, &conn, server, epoch, conn_id, &route, &writer, reader).await;
    drop(writer);
    let clean = matches!(
        &end,
        LinkEnd::Closed(quinn::ConnectionError::ApplicationClosed(c))
            if u64::from(c.error_code) == u64::from(CLOSE_GOING_AWAY)
    );
    match &end {
        LinkEnd::Closed(e) => info!(error = %e, clean, "link closed"),
        LinkEnd::Finished => info!("link finished by the server"),
        LinkEnd::Refused(reason, detail) => {
            ctx.metrics.rejections.inc(reason);
            warn!(reason, %detail, "link closed for a protocol error");
        }
        LinkEnd::Shutdown => {}
    }
    let _ = route
        .sender()
        .send(TargetCmd::Detach { conn_id, clean })
        .await;
    writer_task.abort();
}

struct Registered_ {
    server: ServerId,
    epoch: u64,
    reader: FrameReader,
    route: Route,
    conn_id: u64,
    writer: quic::Writer,
    writer_task: tokio::task::JoinHandle<()>,
}

type Refusal = (&'static str, ErrorCode, String);

async fn register(ctx: &Arc<Ctx>, conn: &quinn::Connection) -> Result<Registered_, Refusal> {
    let (send, recv) = conn.accept_bi().await.map_err(|e| {
        (
            "not_registered",
            ErrorCode::NotRegistered,
            format!("no stream: {e}"),
        )
    })?;
    let mut reader = FrameReader::new(recv, ctx.max_frame);
    let first = reader.next().await.map_err(|e| read_refusal(&e))?;
    let Some(Frame::Register(Register {
        server,
        epoch,
        max_frame: peer_max_frame,
    })) = first
    else {
        return Err((
            "not_registered",
            ErrorCode::NotRegistered,
            "the first frame must be register".into(),
        ));
    };
    ctx.metrics.frames_in.inc("register");
    tls::verify_peer_name(conn, &tls::server_name(server)).map_err(|e| {
        (
            "identity_mismatch",
            ErrorCode::IdentityMismatch,
            format!("certificate does not name server {server}: {e}"),
        )
    })?;
    if ctx.metrics.links.get() >= ctx.max_links as i64 {
        return Err((
            "too_many_links",
            ErrorCode::Internal,
            "too many servers connected".into(),
        ));
    }
    match ctx
        .registry
        .record_registration(server, epoch, ctx.id, now_ms())
        .await
    {
        Ok(Registration::Accepted) => {}
        Ok(Registration::StaleEpoch { current }) => {
            return Err((
                "stale_epoch",
                ErrorCode::StaleEpoch,
                format!("epoch {epoch} is not the registry's current epoch {current}"),
            ));
        }
        Ok(Registration::Unknown) => {
            return Err((
                "unknown_server",
                ErrorCode::UnknownServer,
                format!("server {server} is not in the registry"),
            ));
        }
        Ok(Registration::WrongRole) => {
            return Err((
                "wrong_role",
                ErrorCode::IdentityMismatch,
                format!("server {server} is not an app server"),
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "registry unavailable during registration");
            return Err((
                "registry_error",
                ErrorCode::Internal,
                "registry unavailable".into(),
            ));
        }
    }
    let (writer, writer_task) = quic::spawn_writer(send, WRITER_BATCHES);
    let reply = Frame::Registered(Registered {
        exchange: ctx.id,
        exchange_epoch: ctx.epoch,
        lease_ms: ctx.lease.as_millis().min(u32::MAX as u128) as u32,
        max_frame: ctx.max_frame as u32,
    });
    if let Some(b) = quic::frame_bytes(&reply, ctx.max_frame) {
        let _ = writer.send(vec![b]).await;
    }
    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let route = hub::ensure_route(ctx, server, epoch, hub::STATE_UP);
    route
        .sender()
        .send(TargetCmd::Attach {
            conn_id,
            epoch,
            max_frame: (peer_max_frame as usize).clamp(1_024, ctx.max_frame),
            conn: conn.clone(),
            writer: writer.clone(),
        })
        .await
        .map_err(|_| {
            (
                "registry_error",
                ErrorCode::ShuttingDown,
                "exchange is stopping".to_string(),
            )
        })?;
    Ok(Registered_ {
        server,
        epoch,
        reader,
        route,
        conn_id,
        writer,
        writer_task,
    })
}

fn read_refusal(e: &ReadError) -> Refusal {
    match e {
        ReadError::Wire(w) => (w.kind(), ErrorCode::for_wire_error(w), w.to_string()),
        ReadError::Stream(s) => ("not_registered", ErrorCode::NotRegistered, s.to_string()),
    }
}

enum LinkEnd {
    Closed(quinn::ConnectionError),
    Finished,
    Refused(&'static str, String),
    Shutdown,
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    ctx: &Arc<Ctx>,
    conn: &quinn::Connection,
    server: ServerId,
    epoch: u64,
    conn_id: u64,
    route: &Route,
    writer: &quic::Writer,
    mut reader: FrameReader,
) -> LinkEnd {
    let limits = SplitLimits::default();
    let mut batch = Vec::new();
    loop {
        batch.clear();
        let more = tokio::select! {
            r = reader.next_batch(&mut batch) => r,
            e = conn.closed() => return LinkEnd::Closed(e),
        };
        match more {
            Ok(true) => {}
            Ok(false) => return LinkEnd::Finished,
            Err(ReadError::Wire(w)) => return refuse(conn, &w),
            Err(ReadError::Stream(quinn::ReadError::ConnectionLost(e))) => {
                return LinkEnd::Closed(e);
            }
            Err(ReadError::Stream(e)) => {
                return LinkEnd::Refused("protocol", format!("stream: {e}"));
            }
        }
        let mut failures: Vec<ReportEntry> = Vec::new();
        let mut last_ack = None;
        let draining = ctx.shutdown.is_cancelled();
        for frame in batch.drain(..) {
            ctx.metrics.frames_in.inc(frame.kind());
            match frame {
                Frame::Forward(fwd) => {
                    if draining {
                        // Draining: the origin keeps the 905 and sends it
                        // again to whichever exchange it reaches next.
                        continue;
                    }
                    if let Err(r) = split::validate(&fwd, server, epoch, ctx.id, &limits) {
                        if r.is_forgery() {
                            let code = ErrorCode::ForgedSource;
                            send_error(writer, ctx.max_frame, code, &r.to_string());
                            quic::close_with(conn, code, &r.to_string());
                            return LinkEnd::Refused(r.kind(), r.to_string());
                        }
                        ctx.metrics.rejections.inc(r.kind());
                        warn!(id = %fwd.id, reason = %r, "905 refused");
                        let mut servers: Vec<ServerId> =
                            fwd.rows.iter().map(|r| r.server).collect();
                        servers.sort();
                        servers.dedup();
                        failures.extend(servers.into_iter().map(|s| ReportEntry {
                            id: fwd.id,
                            server: s,
                            status: DeliveryStatus::Refused,
                        }));
                        continue;
                    }
                    ctx.metrics.forwards_in.inc();
                    debug!(id = %fwd.id, rows = fwd.rows.len(), "905 in");
                    let id = fwd.id;
                    for (target, d) in split::split(fwd) {
                        if let Some(status) = hub::offer(ctx, target, d) {
                            failures.push(ReportEntry {
                                id,
                                server: target,
                                status,
                            });
                        }
                    }
                }
                Frame::Ack(a) => last_ack = Some(a.upto),
                Frame::Heartbeat(_) => {}
                Frame::Error(e) => {
                    warn!(code = ?e.code, detail = %e.detail, "error frame from server")
                }
                other => {
                    let detail = format!("unexpected {} frame from an app server", other.kind());
                    quic::close_with(conn, ErrorCode::Protocol, &detail);
                    return LinkEnd::Refused("protocol", detail);
                }
            }
        }
        if let Some(upto) = last_ack
            && route
                .sender()
                .send(TargetCmd::Ack { conn_id, upto })
                .await
                .is_err()
        {
            return LinkEnd::Shutdown;
        }
        if !failures.is_empty() {
            for f in &failures {
                debug!(id = %f.id, target = f.server.0, status = f.status.as_str(), "905 target refused");
            }
            hub::report(ctx, failures);
        }
    }
}

fn refuse(conn: &quinn::Connection, w: &WireError) -> LinkEnd {
    quic::close_with(conn, ErrorCode::for_wire_error(w), &w.to_string());
    LinkEnd::Refused(w.kind(), w.to_string())
}

/// Best effort: an error frame ahead of the close (the close reason carries
/// the same text reliably; the frame may be cut off by it).
fn send_error(writer: &quic::Writer, max_frame: usize, code: ErrorCode, detail: &str) {
    let f = Frame::Error(ErrorFrame {
        code,
        detail: detail.to_string(),
    });
    if let Some(b) = quic::frame_bytes(&f, max_frame) {
        let _ = writer.try_send(vec![b]);
    }
}
