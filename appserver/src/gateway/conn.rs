//! One client connection's task, from upgrade to close: the auth
//! handshake, the connection's [`Connections`] entry, its rate limit, its
//! pings and idle timer, the pushes queued for it and its writes. Requests
//! are answered in order; pushes interleave with answers. Sends are
//! pipelined: up to [`MAX_PIPELINED`] are queued for the store before the
//! first is answered (they are stored in the order queued, so a client
//! that sends several at once has them stored in its order, many per
//! transaction); any other request waits until the sends before it are
//! answered, so it sees their effect.
//!
//! [`Connections`]: crate::connections::Connections

use super::frames::{
    Hello, Parsed, Refusal, Request, error_frame, parse_hello, parse_request, peek_req,
};
use super::{Bucket, ChatApi, GatewayState};
use crate::chat::{ChatError, ClientReq, SendAck};
use crate::codes::{AuthFailure, CloseReason, ErrorCode};
use crate::metrics::AppMetrics;
use crate::presence::SubscribeError;
use crate::push::{Push, presence_answer, presence_frame, tagged};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt as _;
use iim::token::TokenError;
use iim::types::{ChannelId, UserId};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tracing::{Span, debug, info, warn};

/// Pushes written to the socket in one batch before flushing.
const PUSH_BATCH: usize = 64;
/// Sends of one connection queued for the store and not yet answered, at
/// most; the next waits for the oldest answer.
pub const MAX_PIPELINED: usize = 16;
/// How long a closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// `typing` frames per second a connection may send, sustained, and in a
/// burst: a client sends one every few seconds while its user types, and
/// each one reaches every connection of the conversation's other members.
const TYPING_PER_SEC: u32 = 1;
const TYPING_BURST: u32 = 3;

/// Why a connection task ended.
#[derive(Debug)]
enum End {
    /// The client closed, or the socket failed (logged with this reason).
    Gone(&'static str),
    /// We close with this reason (and its close code).
    Close(CloseReason),
}

/// One client connection, from upgrade to close.
#[tracing::instrument(
    name = "client",
    skip_all,
    fields(peer = ?peer, user = tracing::field::Empty, device = tracing::field::Empty)
)]
pub(super) async fn connection<C: ChatApi>(
    st: GatewayState<C>,
    ws: WebSocket,
    peer: Option<SocketAddr>,
) {
    st.metrics.ws_connections.add(1);
    let _open = OpenGauge(st.metrics.clone());
    let mut conn = Conn {
        ws,
        st,
        bucket: None,
        typing: None,
        last_rx: Instant::now(),
    };
    match conn.run().await {
        End::Gone(why) => {
            conn.st
                .metrics
                .ws_closes
                .inc(CloseReason::ClientGone.as_str());
            debug!(why, "client connection ended");
        }
        End::Close(reason) => {
            conn.st.metrics.ws_closes.inc(reason.as_str());
            debug!(%reason, "client connection closed");
            conn.close(reason).await;
        }
    }
}

/// Takes a connection off `ws_connections` however its task ends.
struct OpenGauge(Arc<AppMetrics>);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.ws_connections.add(-1);
    }
}

struct Conn<C: ChatApi> {
    ws: WebSocket,
    st: GatewayState<C>,
    bucket: Option<Bucket>,
    /// The connection's own limit on `typing`, within the one above.
    typing: Option<Bucket>,
    /// When the client last sent anything at all.
    last_rx: Instant,
}

/// A frame from the client, as far as the connection loop cares.
enum Incoming {
    Text(axum::extract::ws::Utf8Bytes),
    Binary,
    /// Ping, pong: liveness only.
    Control,
}

impl<C: ChatApi> Conn<C> {
    async fn run(&mut self) -> End {
        let (user, device, valid_until) = match self.authenticate().await {
            Ok(v) => v,
            Err(end) => return end,
        };
        let span = Span::current();
        span.record("user", user.0);
        span.record("device", device.as_str());
        // Held until the connection ends.
        let _per_user = match self.st.admission.admit_user(user) {
            Ok(t) => t,
            Err(_) => {
                info!("too many connections for this user");
                let _ = self
                    .write_error(
                        ErrorCode::TooManyConnections,
                        None,
                        &format!(
                            "at most {} connections per user",
                            self.st.limits.max_connections_per_user
                        ),
                    )
                    .await;
                return End::Close(CloseReason::TooManyConnections);
            }
        };
        let attached = match self.st.connections.attach(user, &device).await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "cannot record the session; refusing the client");
                let _ = self
                    .write_error(
                        ErrorCode::Unavailable,
                        None,
                        "cannot register the connection, retry",
                    )
                    .await;
                return End::Close(CloseReason::TryAgainLater);
            }
        };
        let channel = attached.session.channel;
        info!(channel = %channel, "client authenticated");
        let end = self
            .serve(user, channel, &device, valid_until, attached.rx)
            .await;
        if let Err(e) = self.st.connections.detach(channel).await {
            warn!(error = %e, "could not remove the session");
        }
        // After the session is gone, so the user's presence is recomputed
        // without it.
        if let Some(p) = &self.st.presence {
            p.disconnected(user, channel).await;
        }
        end
    }

    /// Wait for the `auth` frame: the user, the device and until when the
    /// token is valid (Unix seconds), or how to end.
    async fn authenticate(&mut self) -> Result<(UserId, String, u64), End> {
        let deadline = Instant::now() + Duration::from_millis(self.st.limits.auth_timeout_ms);
        let stop = self.st.stop.clone();
        let not_first = || Refusal::new(ErrorCode::AuthRequired, "the first frame must be auth");
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return Err(End::Close(CloseReason::GoingAway)),
                _ = tokio::time::sleep_until(deadline) => {
                    let r = Refusal::new(ErrorCode::AuthRequired, "no auth frame within the auth timeout");
                    return Err(self.refuse_auth(AuthFailure::Timeout, r).await);
                }
                f = self.recv() => f?,
            };
            let text = match frame {
                Incoming::Control => continue,
                Incoming::Binary => {
                    return Err(self.refuse_auth(AuthFailure::NotFirst, not_first()).await);
                }
                Incoming::Text(t) => t,
            };
            let hello = if text.len() > self.st.limits.max_message_bytes {
                Ok(Hello::Other)
            } else {
                parse_hello(text.as_str())
            };
            let (token, device) = match hello {
                Ok(Hello::Auth { token, device }) => {
                    self.st
                        .metrics
                        .client_ops
                        .inc(crate::codes::Op::Auth.as_str());
                    (token, device)
                }
                Ok(Hello::Other) => {
                    return Err(self.refuse_auth(AuthFailure::NotFirst, not_first()).await);
                }
                Err(r) => return Err(self.refuse_auth(AuthFailure::Invalid, r).await),
            };
            let Some(token) = token else {
                let r = Refusal::new(ErrorCode::AuthRequired, "token: required");
                return Err(self.refuse_auth(AuthFailure::Missing, r).await);
            };
            return match self.st.verifier.verify_token(&token) {
                Ok(v) => Ok((v.user, device, v.valid_until)),
                Err(TokenError::Expired) => {
                    let r = Refusal::new(ErrorCode::AuthExpired, "token expired; get a new one");
                    Err(self.refuse_auth(AuthFailure::Expired, r).await)
                }
                Err(e @ TokenError::Invalid(_)) => {
                    let r = Refusal::new(ErrorCode::AuthFailed, e.to_string());
                    Err(self.refuse_auth(AuthFailure::Invalid, r).await)
                }
            };
        }
    }

    async fn refuse_auth(&mut self, reason: AuthFailure, r: Refusal) -> End {
        self.st.metrics.auth_failures.inc(reason.as_str());
        info!(%reason, "client authentication refused");
        match self.write_error(r.code, None, &r.message).await {
            Ok(()) => End::Close(CloseReason::AuthenticationFailed),
            Err(end) => end,
        }
    }

    /// The authenticated connection's loop.
    async fn serve(
        &mut self,
        user: UserId,
        channel: ChannelId,
        device: &str,
        valid_until: u64,
        mut rx: mpsc::Receiver<Push>,
    ) -> End {
        // Attached before the welcome: anything stored after the welcome's
        // `inbox_max` is pushed, anything before it is synced.
        // This user is online (in the database) before it is welcomed; its
        // contacts' presence follows the welcome.
        let contacts = match self.st.presence.clone() {
            Some(p) => match p.connected(user, channel).await {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(error = %e, "presence snapshot unavailable; repair will deliver it");
                    None
                }
            },
            None => None,
        };
        match self.st.chat.welcome(user, device).await {
            Ok(w) => {
                if let Err(end) = self.write_text(tagged("welcome", &w)).await {
                    return end;
                }
                if let Some(c) = contacts
                    && let Err(end) = self.write_text(presence_frame(&c)).await
                {
                    return end;
                }
            }
            Err(e @ ChatError::UnknownUser(_)) => {
                self.st
                    .metrics
                    .auth_failures
                    .inc(AuthFailure::UnknownUser.as_str());
                info!(error = %e, "token for a user the directory does not know");
                let _ = self.write_error(e.code(), None, &e.to_string()).await;
                return End::Close(CloseReason::UnknownUser);
            }
            Err(e) => {
                warn!(error = %e, "welcome failed; closing the client");
                let _ = self.write_error(e.code(), None, &e.to_string()).await;
                return End::Close(CloseReason::TryAgainLater);
            }
        }
        let limits = self.st.limits.clone();
        let idle = Duration::from_secs(limits.idle_timeout_secs);
        let every = Duration::from_secs(limits.ping_interval_secs);
        let mut ping = tokio::time::interval_at(Instant::now() + every, every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.bucket = Some(Bucket::new(
            limits.rate_per_sec,
            limits.rate_burst,
            Instant::now(),
        ));
        self.typing = Some(Bucket::new(TYPING_PER_SEC, TYPING_BURST, Instant::now()));
        let stop = self.st.stop.clone();
        // The connection lives no longer than its token.
        let expires = (valid_until != u64::MAX).then(|| {
            Instant::now()
                + Duration::from_secs(valid_until.saturating_sub(iim::types::unix_secs()))
        });
        // Sends queued for the store, oldest first, with their `req`.
        let mut pending: VecDeque<(ClientReq, C::Answer)> = VecDeque::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return End::Close(CloseReason::GoingAway),
                answer = next_answer(&mut pending), if !pending.is_empty() => {
                    if let Err(end) = self.write_answer(answer).await {
                        return end;
                    }
                }
                _ = tokio::time::sleep_until(self.last_rx + idle) => {
                    return End::Close(CloseReason::IdleTimeout);
                }
                _ = iim::quic::sleep_until_opt(expires) => {
                    let _ = self.write_error(ErrorCode::AuthExpired, None,
                        "token expired; connect again with a new one").await;
                    return End::Close(CloseReason::TokenExpired);
                }
                _ = ping.tick() => {
                    if let Err(end) = self.write(Message::Ping(Default::default())).await {
                        return end;
                    }
                }
                push = rx.recv() => {
                    let Some(first) = push else {
                        // Connections cut us: the queue overflowed.
                        let _ = self.write_error(ErrorCode::TooSlow, None,
                            "not reading fast enough; reconnect and sync").await;
                        return End::Close(CloseReason::TooSlow);
                    };
                    if let Err(end) = self.push_batch(user, first, &mut rx).await {
                        return end;
                    }
                }
                frame = self.recv() => {
                    let frame = match frame {
                        Ok(f) => f,
                        Err(end) => return end,
                    };
                    if let Err(end) = self.handle(user, channel, frame, &mut pending).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Write `first` and whatever else is queued (up to a batch), then
    /// flush once. Each push was decoded once for all its connections;
    /// here it only becomes this client's frame.
    async fn push_batch(
        &mut self,
        user: UserId,
        first: Push,
        rx: &mut mpsc::Receiver<Push>,
    ) -> Result<(), End> {
        let mut frames = Vec::new();
        let mut take = |push: Push| match push.frame_for(user) {
            Some(f) => frames.push(f),
            None => debug!(
                push = push.label(),
                "push not shown to this client; skipped"
            ),
        };
        take(first);
        for _ in 1..PUSH_BATCH {
            match rx.try_recv() {
                Ok(p) => take(p),
                Err(_) => break,
            }
        }
        if frames.is_empty() {
            return Ok(());
        }
        let timeout = self.write_timeout();
        let stop = self.st.stop.clone();
        let ws = &mut self.ws;
        let write = async {
            for f in frames {
                ws.feed(Message::Text(f.into())).await?;
            }
            ws.flush().await
        };
        tokio::select! {
            _ = stop.cancelled() => Err(End::Close(CloseReason::GoingAway)),
            r = tokio::time::timeout(timeout, write) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::Gone("write failed")),
                Err(_) => Err(End::Gone("write timed out")),
            },
        }
    }

    /// Handle one frame from the authenticated client: a send is queued
    /// (answered later, in order); anything else is answered once the
    /// sends before it are.
    async fn handle(
        &mut self,
        user: UserId,
        channel: ChannelId,
        frame: Incoming,
        pending: &mut VecDeque<(ClientReq, C::Answer)>,
    ) -> Result<(), End> {
        let text = match frame {
            Incoming::Control => return Ok(()),
            Incoming::Binary => {
                self.drain(pending).await?;
                if !self.take_token() {
                    return self
                        .write_error(ErrorCode::RateLimited, None, "slow down")
                        .await;
                }
                return self
                    .write_error(
                        ErrorCode::BinaryNotSupported,
                        None,
                        "frames are JSON text; binary frames are not supported",
                    )
                    .await;
            }
            Incoming::Text(t) => t,
        };
        let max = self.st.limits.max_message_bytes;
        if !self.take_token() {
            self.drain(pending).await?;
            let req = (text.len() <= max)
                .then(|| peek_req(text.as_str()))
                .flatten();
            return self
                .write_error(
                    ErrorCode::RateLimited,
                    req.as_ref().map(ClientReq::as_str),
                    "rate limit exceeded; the request was dropped",
                )
                .await;
        }
        if text.len() > max {
            self.drain(pending).await?;
            let req = peek_req(text.as_str());
            let msg = format!("frame of {} bytes; the limit is {max}", text.len());
            return self
                .write_error(
                    ErrorCode::TooLarge,
                    req.as_ref().map(ClientReq::as_str),
                    &msg,
                )
                .await;
        }
        let Parsed {
            op_label,
            req,
            request,
        } = parse_request(text.as_str(), user, &self.st.limits);
        if let Some(op) = op_label {
            self.st.metrics.client_ops.inc(op);
        }
        if let Ok(Request::Send(sr)) = request {
            debug!(req = sr.req.as_str(), to = sr.to, "send");
            while pending.len() >= MAX_PIPELINED {
                let answer = next_answer(pending).await;
                self.write_answer(answer).await?;
            }
            let req = sr.req.clone();
            let answer = self.st.chat.send(user, channel, sr).await;
            pending.push_back((req, answer));
            return Ok(());
        }
        self.drain(pending).await?;
        let answer = match request {
            Ok(r) => self.carry_out(user, channel, r).await,
            Err(r) => Err(r),
        };
        match answer {
            Ok(frame) => {
                let frame = match &req {
                    Some(r) => with_req(frame, r.as_str()),
                    None => frame,
                };
                self.write_text(frame).await
            }
            Err(r) => {
                self.write_error(r.code, req.as_ref().map(ClientReq::as_str), &r.message)
                    .await
            }
        }
    }

    /// Write the answers of every queued send, in order.
    async fn drain(&mut self, pending: &mut VecDeque<(ClientReq, C::Answer)>) -> Result<(), End> {
        while !pending.is_empty() {
            let answer = next_answer(pending).await;
            self.write_answer(answer).await?;
        }
        Ok(())
    }

    /// Write one send's answer: its ack, or why it was refused.
    async fn write_answer(
        &mut self,
        (req, answer): (ClientReq, Result<SendAck, ChatError>),
    ) -> Result<(), End> {
        match answer {
            Ok(ack) => self.write_text(tagged("ack", &ack)).await,
            Err(e) => {
                let r = Refusal::from(e);
                self.write_error(r.code, Some(req.as_str()), &r.message)
                    .await
            }
        }
    }

    /// Carry out one valid request: the answer frame, or the refusal.
    async fn carry_out(
        &mut self,
        user: UserId,
        channel: ChannelId,
        request: Request,
    ) -> Result<String, Refusal> {
        match request {
            Request::Send(sr) => {
                // Not reached: `handle` queues sends. Answered the same way.
                let ack = self.st.chat.send(user, channel, sr).await.await?;
                Ok(tagged("ack", &ack))
            }
            Request::Sync(sr) => {
                let page = self.st.chat.sync(user, sr).await?;
                Ok(tagged("sync", &page))
            }
            Request::Ping => Ok(r#"{"op":"pong"}"#.to_string()),
            Request::SetStatus { status, text } => {
                let p = self.presence()?;
                p.set_status(channel, status, &text).await.map_err(|e| {
                    warn!(error = %e, "set_status failed");
                    presence_unavailable()
                })?;
                Ok(tagged(
                    "status_set",
                    &serde_json::json!({"status": status, "text": text}),
                ))
            }
            Request::PresenceSubscribe(users) => {
                let p = self.presence()?;
                let contacts = p.subscribe(user, channel, &users).await.map_err(|e| match e {
                    SubscribeError::NotAContact(strangers) => {
                        let shown: Vec<u64> = strangers.iter().take(20).map(|u| u.0).collect();
                        Refusal::new(
                            ErrorCode::NotAContact,
                            format!(
                                "only friends and colleagues can be watched; not contacts: {shown:?}{}",
                                if strangers.len() > shown.len() { " …" } else { "" }
                            ),
                        )
                    }
                    SubscribeError::Store(e) => {
                        warn!(error = %e, "presence_subscribe failed");
                        presence_unavailable()
                    }
                })?;
                Ok(presence_answer(&users, &contacts))
            }
            Request::Read { ope, to, seq } => {
                let r = self.receipts()?;
                let set = r.read(user, channel, ope, to, seq).await?;
                Ok(tagged("read_set", &set))
            }
            Request::ReadState => {
                let state = self.receipts()?.read_state(user).await?;
                Ok(tagged("read_state", &state))
            }
            Request::Typing { ope, to } => {
                let r = self.receipts()?;
                if !self.typing.as_mut().is_none_or(|b| b.take(Instant::now())) {
                    self.st.metrics.receipts.typing_limited.inc();
                    return Err(Refusal::new(
                        ErrorCode::RateLimited,
                        format!(
                            "typing: at most {TYPING_PER_SEC} per second (bursts of {TYPING_BURST}); dropped"
                        ),
                    ));
                }
                r.typing(user, ope, to).await?;
                Ok(r#"{"op":"typing_sent"}"#.to_string())
            }
        }
    }

    fn receipts(&self) -> Result<Arc<crate::chat::receipts::Receipts>, Refusal> {
        self.st.receipts.clone().ok_or_else(|| {
            Refusal::new(
                ErrorCode::Unavailable,
                "receipts are not enabled on this server",
            )
        })
    }

    fn presence(&self) -> Result<Arc<crate::presence::Presence>, Refusal> {
        self.st.presence.clone().ok_or_else(|| {
            Refusal::new(
                ErrorCode::Unavailable,
                "presence is not enabled on this server",
            )
        })
    }

    fn take_token(&mut self) -> bool {
        match &mut self.bucket {
            Some(b) => b.take(Instant::now()),
            None => true,
        }
    }

    /// The next frame from the client (any frame resets the idle timer).
    /// Cancel-safe.
    async fn recv(&mut self) -> Result<Incoming, End> {
        let frame = match self.ws.recv().await {
            None => return Err(End::Gone("client disconnected")),
            Some(Err(e)) if frame_too_large(&e) => {
                // The WebSocket layer refuses frames over 4x the limit.
                return Err(End::Close(CloseReason::FrameTooLarge));
            }
            Some(Err(e)) if invalid_utf8(&e) => {
                // RFC 6455 §8.1: fail the connection with 1007.
                return Err(End::Close(CloseReason::InvalidUtf8));
            }
            Some(Err(_)) => return Err(End::Gone("read failed")),
            Some(Ok(m)) => m,
        };
        self.last_rx = Instant::now();
        Ok(match frame {
            Message::Text(t) => Incoming::Text(t),
            Message::Binary(_) => Incoming::Binary,
            Message::Ping(_) | Message::Pong(_) => Incoming::Control,
            Message::Close(_) => return Err(End::Gone("client closed")),
        })
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.st.limits.idle_timeout_secs)
    }

    async fn write_error(
        &mut self,
        code: ErrorCode,
        req: Option<&str>,
        msg: &str,
    ) -> Result<(), End> {
        self.st.metrics.client_errors.inc(code.as_str());
        debug!(%code, req, msg, "error frame");
        self.write_text(error_frame(code, req, msg)).await
    }

    async fn write_text(&mut self, text: String) -> Result<(), End> {
        self.write(Message::Text(text.into())).await
    }

    /// Write one frame, giving up when the server stops or the client does
    /// not take it within the write timeout.
    async fn write(&mut self, m: Message) -> Result<(), End> {
        let timeout = self.write_timeout();
        tokio::select! {
            _ = self.st.stop.cancelled() => Err(End::Close(CloseReason::GoingAway)),
            r = tokio::time::timeout(timeout, self.ws.send(m)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::Gone("write failed")),
                Err(_) => Err(End::Gone("write timed out")),
            },
        }
    }

    /// Send a close frame and give the client a moment to answer it.
    async fn close(&mut self, reason: CloseReason) {
        let Some(code) = reason.code() else {
            return;
        };
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.text().into(),
        }));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if self.ws.send(frame).await.is_err() {
                return;
            }
            while let Some(Ok(_)) = self.ws.recv().await {}
        })
        .await;
    }
}

/// The oldest queued send's answer, once it comes. Cancel-safe: the send
/// stays queued until its answer is taken.
async fn next_answer<A>(pending: &mut VecDeque<(ClientReq, A)>) -> (ClientReq, A::Output)
where
    A: std::future::Future + Unpin,
{
    let Some((_, answer)) = pending.front_mut() else {
        return std::future::pending().await;
    };
    let out = answer.await;
    let (req, _) = pending.pop_front().expect("the front was there");
    (req, out)
}

fn presence_unavailable() -> Refusal {
    Refusal::new(
        ErrorCode::Unavailable,
        "presence store unavailable, try again",
    )
}

/// True when a text frame was not UTF-8.
fn invalid_utf8(e: &axum::Error) -> bool {
    use std::error::Error as _;
    matches!(
        e.source().and_then(|s| s.downcast_ref::<WsError>()),
        Some(WsError::Utf8(_))
    )
}

/// True when the WebSocket layer refused a frame over its size limit.
fn frame_too_large(e: &axum::Error) -> bool {
    use std::error::Error as _;
    matches!(
        e.source().and_then(|s| s.downcast_ref::<WsError>()),
        Some(WsError::Capacity(CapacityError::MessageTooLong { .. }))
    )
}

/// `frame` (`{"op":"name",...}`) with `"req":<req>` right after its op: a
/// request that carries a `req` gets it back on its answer, so a client can
/// match answers to requests by `req` as well as by their order.
fn with_req(frame: String, req: &str) -> String {
    const HEAD: &str = "{\"op\":\"";
    let Some(end) = frame.get(HEAD.len()..).and_then(|rest| rest.find('"')) else {
        return frame;
    };
    if !frame.starts_with(HEAD) {
        return frame;
    }
    let at = HEAD.len() + end + 1;
    let req = serde_json::to_string(req).unwrap_or_default();
    let mut out = String::with_capacity(frame.len() + req.len() + 7);
    out.push_str(&frame[..at]);
    out.push_str(",\"req\":");
    out.push_str(&req);
    out.push_str(&frame[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::with_req;

    #[test]
    fn an_answer_gets_its_request_s_req_after_its_op() {
        assert_eq!(
            with_req(r#"{"op":"typing_sent"}"#.into(), "t-1"),
            r#"{"op":"typing_sent","req":"t-1"}"#
        );
        assert_eq!(
            with_req(r#"{"op":"sync","messages":[],"max":0}"#.into(), "s\"2"),
            r#"{"op":"sync","req":"s\"2","messages":[],"max":0}"#
        );
        // Not an op-first object: left as it is.
        assert_eq!(with_req("[]".into(), "x"), "[]");
    }
}
