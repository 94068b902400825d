//! The client gateway: end users' WebSocket connections (`ws://HOST:PORT/ws`,
//! JSON text frames, `docs/client-protocol.md`).
//!
//! One task per WebSocket owns everything about it: the auth handshake, the
//! connection's [`Connections`] entry (and so its `sessions` row), its rate
//! limit, its pings and idle timer, the pushes queued for it and its writes.
//! Requests are handled one at a time, in order, so a client's sends are
//! acknowledged in the order it made them; pushes interleave with answers.
//!
//! The gateway owns no chat logic: it validates and translates frames and
//! calls a [`ChatApi`] (the built-in [`Chat`], or a test double). It never
//! panics on client input and every bad frame gets an error frame with a
//! stable `code` and a metric.

mod frames;

use crate::chat::{Chat, ChatError, SendAck, SendRequest, SyncPage, SyncRequest, Welcome};
use crate::config::ClientLimits;
use crate::connections::Connections;
use crate::metrics::AppMetrics;
use crate::presence::Presence;
use crate::push::{Push, presence_frame, tagged};
use axum::Router;
use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::Extensions;
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use frames::{
    Fields, Hello, Refusal, bad, chat_refusal, error_frame, parse_hello, parse_send, parse_status,
    parse_subscribe, parse_sync, peek_req,
};
use futures_util::SinkExt as _;
use iim::token::{TokenError, TokenVerifier};
use iim::types::{ChannelId, UserId};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Span, debug, info, warn};

/// Longest `req` (client message id), in characters.
pub const MAX_REQ_CHARS: usize = 64;
/// Longest `type`, in characters.
pub const MAX_TYPE_CHARS: usize = 32;
/// Longest `device`, in characters (the sessions table's column).
pub const MAX_DEVICE_CHARS: usize = 64;
/// `device` when the auth frame names none.
pub const DEFAULT_DEVICE: &str = "default";
/// Pushes written to the socket in one batch before flushing.
const PUSH_BATCH: usize = 64;
/// How long a closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the gateway needs from the chat service. Implemented by [`Chat`];
/// tests implement it with a double to exercise the gateway alone.
pub trait ChatApi: Send + Sync + 'static {
    fn send(
        &self,
        user: UserId,
        channel: ChannelId,
        req: SendRequest,
    ) -> impl Future<Output = Result<SendAck, ChatError>> + Send;

    fn sync(
        &self,
        user: UserId,
        req: SyncRequest,
    ) -> impl Future<Output = Result<SyncPage, ChatError>> + Send;

    fn welcome(
        &self,
        user: UserId,
        device: &str,
    ) -> impl Future<Output = Result<Welcome, ChatError>> + Send;
}

impl ChatApi for Chat {
    fn send(
        &self,
        user: UserId,
        channel: ChannelId,
        req: SendRequest,
    ) -> impl Future<Output = Result<SendAck, ChatError>> + Send {
        Chat::send(self, user, channel, req)
    }

    fn sync(
        &self,
        user: UserId,
        req: SyncRequest,
    ) -> impl Future<Output = Result<SyncPage, ChatError>> + Send {
        Chat::sync(self, user, req)
    }

    fn welcome(
        &self,
        user: UserId,
        device: &str,
    ) -> impl Future<Output = Result<Welcome, ChatError>> + Send {
        Chat::welcome(self, user, device)
    }
}

/// Everything a gateway connection task needs.
pub struct GatewayState<C: ChatApi> {
    pub chat: Arc<C>,
    pub connections: Arc<Connections>,
    pub verifier: Arc<dyn TokenVerifier>,
    /// Presence (absent in gateway-only tests).
    pub presence: Option<Arc<Presence>>,
    pub metrics: Arc<AppMetrics>,
    pub limits: ClientLimits,
    /// Cancelled when the server stops: connections close with 1001.
    pub stop: CancellationToken,
    /// Connection tasks are tracked here so a stopping server waits for
    /// them to detach.
    pub tracker: TaskTracker,
}

impl<C: ChatApi> Clone for GatewayState<C> {
    fn clone(&self) -> Self {
        GatewayState {
            chat: self.chat.clone(),
            connections: self.connections.clone(),
            verifier: self.verifier.clone(),
            presence: self.presence.clone(),
            metrics: self.metrics.clone(),
            limits: self.limits.clone(),
            stop: self.stop.clone(),
            tracker: self.tracker.clone(),
        }
    }
}

/// The gateway's routes: `GET /ws`.
pub fn router<C: ChatApi>(state: GatewayState<C>) -> Router {
    Router::new()
        .route("/ws", get(upgrade::<C>))
        .with_state(state)
}

/// Serve the gateway on `listener` until the state's stop token is
/// cancelled. Connection tasks run on; they see the same token.
pub async fn serve<C: ChatApi>(
    listener: TcpListener,
    state: GatewayState<C>,
) -> std::io::Result<()> {
    let stop = state.stop.clone();
    // Pushes and answers are small writes back to back: without
    // TCP_NODELAY each one after the first waits for the client's delayed
    // ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on a client connection");
        }
    });
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await
}

async fn upgrade<C: ChatApi>(
    State(st): State<GatewayState<C>>,
    ext: Extensions,
    ws: WebSocketUpgrade,
) -> Response {
    let peer = ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    // Frames up to 4x the message limit reach us (and get `too_large`);
    // larger ones are refused by the WebSocket layer itself.
    let hard = st.limits.max_message_bytes.saturating_mul(4);
    ws.max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| {
            let tracker = st.tracker.clone();
            tracker.track_future(connection(st, socket, peer))
        })
}

/// Error codes sent to clients (the `code` of an `error` frame).
pub mod code {
    pub const AUTH_FAILED: &str = "auth_failed";
    pub const AUTH_EXPIRED: &str = "auth_expired";
    pub const AUTH_REQUIRED: &str = "auth_required";
    pub const INVALID_JSON: &str = "invalid_json";
    pub const UNKNOWN_OP: &str = "unknown_op";
    pub const BINARY_NOT_SUPPORTED: &str = "binary_not_supported";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const FORGED_FROM: &str = "forged_from";
    pub const TOO_LARGE: &str = "too_large";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const TOO_SLOW: &str = "too_slow";
    pub const UNAVAILABLE: &str = "unavailable";
}

/// A token bucket: `rate` per second sustained, `burst` at once. Pure: the
/// caller passes the time.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: now,
        }
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a connection task ended.
#[derive(Debug)]
enum End {
    /// The client closed, or the socket failed.
    Gone(&'static str),
    /// We close with this code and reason.
    Close(u16, &'static str),
}

/// One client connection, from upgrade to close.
#[tracing::instrument(
    name = "client",
    skip_all,
    fields(peer = ?peer, user = tracing::field::Empty, device = tracing::field::Empty)
)]
async fn connection<C: ChatApi>(st: GatewayState<C>, ws: WebSocket, peer: Option<SocketAddr>) {
    st.metrics.ws_connections.add(1);
    let _open = OpenGauge(st.metrics.clone());
    let mut conn = Conn {
        ws,
        st,
        bucket: None,
        last_rx: Instant::now(),
    };
    let end = conn.run().await;
    match &end {
        End::Gone(why) => {
            conn.st.metrics.ws_closes.inc("client_gone");
            debug!(why, "client connection ended");
        }
        End::Close(code, why) => {
            conn.st.metrics.ws_closes.inc(&why.replace(' ', "_"));
            debug!(code, why, "client connection closed");
        }
    }
    if let End::Close(code, why) = end {
        conn.close(code, why).await;
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
        let (user, device) = match self.authenticate().await {
            Ok(v) => v,
            Err(end) => return end,
        };
        let span = Span::current();
        span.record("user", user.0);
        span.record("device", device.as_str());
        let attached = match self.st.connections.attach(user, &device).await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "cannot record the session; refusing the client");
                let _ = self
                    .write_error(
                        code::UNAVAILABLE,
                        None,
                        "cannot register the connection, retry",
                    )
                    .await;
                return End::Close(close_code::AGAIN, "try again later");
            }
        };
        let channel = attached.session.channel;
        info!(channel = %channel, "client authenticated");
        let end = self.serve(user, channel, &device, attached.rx).await;
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

    /// Wait for the `auth` frame: the user and device, or how to end.
    async fn authenticate(&mut self) -> Result<(UserId, String), End> {
        let deadline = Instant::now() + Duration::from_millis(self.st.limits.auth_timeout_ms);
        let stop = self.st.stop.clone();
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return Err(End::Close(close_code::AWAY, "going away")),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(self.refuse_auth("timeout", code::AUTH_REQUIRED,
                        "no auth frame within the auth timeout").await);
                }
                f = self.recv() => f?,
            };
            let text = match frame {
                Incoming::Control => continue,
                Incoming::Binary => {
                    return Err(self
                        .refuse_auth(
                            "not_first",
                            code::AUTH_REQUIRED,
                            "the first frame must be auth",
                        )
                        .await);
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
                    self.st.metrics.client_ops.inc("auth");
                    (token, device)
                }
                Ok(Hello::Other) => {
                    return Err(self
                        .refuse_auth(
                            "not_first",
                            code::AUTH_REQUIRED,
                            "the first frame must be auth",
                        )
                        .await);
                }
                Err(msg) => return Err(self.refuse_auth("invalid", code::AUTH_FAILED, &msg).await),
            };
            let Some(token) = token else {
                return Err(self
                    .refuse_auth("missing", code::AUTH_REQUIRED, "token: required")
                    .await);
            };
            return match self.st.verifier.verify(&token) {
                Ok(user) => Ok((user, device)),
                Err(TokenError::Expired) => Err(self
                    .refuse_auth(
                        "expired",
                        code::AUTH_EXPIRED,
                        "token expired; get a new one",
                    )
                    .await),
                Err(e @ TokenError::Invalid(_)) => Err(self
                    .refuse_auth("invalid", code::AUTH_FAILED, &e.to_string())
                    .await),
            };
        }
    }

    async fn refuse_auth(&mut self, reason: &'static str, code: &'static str, msg: &str) -> End {
        self.st.metrics.auth_failures.inc(reason);
        info!(reason, "client authentication refused");
        match self.write_error(code, None, msg).await {
            Ok(()) => End::Close(close_code::POLICY, "authentication failed"),
            Err(end) => end,
        }
    }

    /// The authenticated connection's loop.
    async fn serve(
        &mut self,
        user: UserId,
        channel: ChannelId,
        device: &str,
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
                self.st.metrics.auth_failures.inc("unknown_user");
                info!(error = %e, "token for a user the directory does not know");
                let _ = self.write_error(e.code(), None, &e.to_string()).await;
                return End::Close(close_code::POLICY, "unknown user");
            }
            Err(e) => {
                warn!(error = %e, "welcome failed; closing the client");
                let _ = self.write_error(e.code(), None, &e.to_string()).await;
                return End::Close(close_code::AGAIN, "try again later");
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
        let stop = self.st.stop.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return End::Close(close_code::AWAY, "going away"),
                _ = tokio::time::sleep_until(self.last_rx + idle) => {
                    return End::Close(close_code::NORMAL, "idle timeout");
                }
                _ = ping.tick() => {
                    if let Err(end) = self.write(Message::Ping(Default::default())).await {
                        return end;
                    }
                }
                push = rx.recv() => {
                    let Some(first) = push else {
                        // Connections cut us: the queue overflowed.
                        let _ = self.write_error(code::TOO_SLOW, None,
                            "not reading fast enough; reconnect and sync").await;
                        return End::Close(close_code::AGAIN, "too slow");
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
                    if let Err(end) = self.handle(user, channel, frame).await {
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
            _ = stop.cancelled() => Err(End::Close(close_code::AWAY, "going away")),
            r = tokio::time::timeout(timeout, write) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::Gone("write failed")),
                Err(_) => Err(End::Gone("write timed out")),
            },
        }
    }

    /// Handle one frame from the authenticated client.
    async fn handle(
        &mut self,
        user: UserId,
        channel: ChannelId,
        frame: Incoming,
    ) -> Result<(), End> {
        let text = match frame {
            Incoming::Control => return Ok(()),
            Incoming::Binary => {
                if !self.take_token() {
                    return self
                        .write_error(code::RATE_LIMITED, None, "slow down")
                        .await;
                }
                return self
                    .write_error(
                        code::BINARY_NOT_SUPPORTED,
                        None,
                        "frames are JSON text; binary frames are not supported",
                    )
                    .await;
            }
            Incoming::Text(t) => t,
        };
        let max = self.st.limits.max_message_bytes;
        if !self.take_token() {
            let req = if text.len() <= max {
                peek_req(text.as_str())
            } else {
                None
            };
            return self
                .write_error(
                    code::RATE_LIMITED,
                    req.as_deref(),
                    "rate limit exceeded; the request was dropped",
                )
                .await;
        }
        if text.len() > max {
            let req = peek_req(text.as_str());
            let msg = format!("frame of {} bytes; the limit is {max}", text.len());
            return self
                .write_error(code::TOO_LARGE, req.as_deref(), &msg)
                .await;
        }
        let out = self.op(user, channel, text.as_str()).await;
        match out {
            Ok(frame) => self.write_text(frame).await,
            Err((req, r)) => self.write_error(r.code, req.as_deref(), &r.message).await,
        }
    }

    /// Carry out one request: the answer frame, or the refusal (with the
    /// request's `req` when it had one).
    async fn op(
        &mut self,
        user: UserId,
        channel: ChannelId,
        text: &str,
    ) -> Result<String, (Option<String>, Refusal)> {
        let f = Fields::parse(text).map_err(|r| (None, r))?;
        // `req` is echoed on errors whenever it is a valid one.
        let req = f.string("req", MAX_REQ_CHARS).ok().flatten();
        let fail = |r: Refusal| (req.clone(), r);
        let op: String = f.req("op", "a string").map_err(fail)?;
        let metric = match op.as_str() {
            "auth" | "send" | "sync" | "ping" | "set_status" | "presence_subscribe" => op.as_str(),
            _ => "other",
        };
        self.st.metrics.client_ops.inc(metric);
        match op.as_str() {
            "send" => {
                let sr = parse_send(&f, user).map_err(fail)?;
                debug!(req = %sr.req, to = sr.to, "send");
                let ack = self
                    .st
                    .chat
                    .send(user, channel, sr)
                    .await
                    .map_err(|e| fail(chat_refusal(e)))?;
                Ok(tagged("ack", &ack))
            }
            "sync" => {
                let sr = parse_sync(&f, self.st.limits.sync_page_max).map_err(fail)?;
                let page = self
                    .st
                    .chat
                    .sync(user, sr)
                    .await
                    .map_err(|e| fail(chat_refusal(e)))?;
                Ok(tagged("sync", &page))
            }
            "ping" => Ok(r#"{"op":"pong"}"#.to_string()),
            "set_status" | "presence_subscribe" => {
                let Some(p) = self.st.presence.clone() else {
                    return Err(fail(Refusal {
                        code: code::UNAVAILABLE,
                        message: "presence is not enabled on this server".into(),
                    }));
                };
                if op == "set_status" {
                    let (status, text) = parse_status(&f).map_err(fail)?;
                    p.set_status(channel, status, &text).await.map_err(|e| {
                        warn!(error = %e, "set_status failed");
                        fail(Refusal {
                            code: code::UNAVAILABLE,
                            message: "presence store unavailable, try again".into(),
                        })
                    })?;
                    Ok(tagged(
                        "status_set",
                        &serde_json::json!({"status": status, "text": text}),
                    ))
                } else {
                    let users = parse_subscribe(&f).map_err(fail)?;
                    let contacts = p.subscribe(user, channel, &users).await.map_err(|e| {
                        warn!(error = %e, "presence_subscribe failed");
                        fail(Refusal {
                            code: code::UNAVAILABLE,
                            message: "presence store unavailable, try again".into(),
                        })
                    })?;
                    Ok(presence_frame(&contacts))
                }
            }
            "auth" => Err(fail(bad("op", "already authenticated"))),
            other => {
                let shown: String = other.chars().take(MAX_TYPE_CHARS).collect();
                Err(fail(Refusal {
                    code: code::UNKNOWN_OP,
                    message: format!("unknown op {shown:?}"),
                }))
            }
        }
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
            Some(Err(e)) => {
                // The WebSocket layer refuses frames over 4x the limit.
                if e.to_string().contains("Message too long") {
                    return Err(End::Close(close_code::SIZE, "frame too large"));
                }
                return Err(End::Gone("read failed"));
            }
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

    async fn write_error(&mut self, code: &str, req: Option<&str>, msg: &str) -> Result<(), End> {
        self.st.metrics.client_errors.inc(code);
        debug!(code, req, msg, "error frame");
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
            _ = self.st.stop.cancelled() => Err(End::Close(close_code::AWAY, "going away")),
            r = tokio::time::timeout(timeout, self.ws.send(m)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(End::Gone("write failed")),
                Err(_) => Err(End::Gone("write timed out")),
            },
        }
    }

    /// Send a close frame and give the client a moment to answer it.
    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 3, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(101)));
        assert!(!b.take(t0 + Duration::from_millis(102)));
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(later) && b.take(later) && b.take(later));
        assert!(!b.take(later));
    }
}
