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
//! stable `code` ([`ErrorCode`]) and a metric.
//!
//! This file holds the gateway's state, routes and listener and the rate
//! limiter; `conn` is one connection's task; `frames` parses and renders
//! client frames; `web` serves the web chat at `/`.
//!
//! [`ErrorCode`]: crate::codes::ErrorCode

pub mod admission;
mod conn;
mod frames;
pub mod web;

use crate::chat::receipts::Receipts;
use crate::chat::{Chat, ChatError, SendAck, SendRequest, SyncPage, SyncRequest, Welcome};
use crate::config::ClientLimits;
use crate::connections::Connections;
use crate::metrics::AppMetrics;
use crate::presence::Presence;
use admission::{Admission, Gate, Peer};
use axum::Router;
use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::Extensions;
use axum::response::Response;
use axum::routing::get;
use iim::token::TokenVerifier;
use iim::types::{ChannelId, UserId};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest `device`, in characters (the sessions table's column).
pub const MAX_DEVICE_CHARS: usize = 64;
/// `device` when the auth frame names none.
pub const DEFAULT_DEVICE: &str = "default";

/// What the gateway needs from the chat service. Implemented by [`Chat`];
/// tests implement it with a double to exercise the gateway alone.
pub trait ChatApi: Send + Sync + 'static {
    /// A queued send's answer.
    type Answer: Future<Output = Result<SendAck, ChatError>> + Send + Unpin + 'static;

    /// Queue a send (waiting for room while the store is behind); resolves
    /// to its answer, which comes once it is stored. Sends queued by one
    /// connection are stored and answered in the order queued.
    fn send(
        &self,
        user: UserId,
        channel: ChannelId,
        req: SendRequest,
    ) -> impl Future<Output = Self::Answer> + Send;

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
    type Answer = crate::chat::Queued;

    fn send(
        &self,
        user: UserId,
        channel: ChannelId,
        req: SendRequest,
    ) -> impl Future<Output = Self::Answer> + Send {
        Chat::enqueue(self, user, channel, req)
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
    /// Read receipts and typing (absent in gateway-only tests).
    pub receipts: Option<Arc<Receipts>>,
    pub metrics: Arc<AppMetrics>,
    pub limits: ClientLimits,
    /// Connection counts and caps (total, per IP, per user).
    pub admission: Arc<Admission>,
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
            receipts: self.receipts.clone(),
            metrics: self.metrics.clone(),
            limits: self.limits.clone(),
            admission: self.admission.clone(),
            stop: self.stop.clone(),
            tracker: self.tracker.clone(),
        }
    }
}

/// The gateway's routes: `GET /ws`, and the web chat ([`web`]) with its
/// development token endpoint when the verifier takes the development
/// secret.
pub fn router<C: ChatApi>(state: GatewayState<C>) -> Router {
    let dev_tokens = web::accepts_dev_secret(state.verifier.as_ref());
    Router::new()
        .route("/ws", get(upgrade::<C>))
        .with_state(state)
        .merge(web::router(dev_tokens))
}

/// Serve the gateway on `listener` until the state's stop token is
/// cancelled. Connection tasks run on; they see the same token.
pub async fn serve<C: ChatApi>(
    listener: TcpListener,
    state: GatewayState<C>,
) -> std::io::Result<()> {
    let stop = state.stop.clone();
    let handshake = Duration::from_millis(state.limits.handshake_timeout_ms);
    let gate = Gate::new(listener, state.admission.clone(), handshake);
    axum::serve(
        gate,
        router(state).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await
}

/// Bytes of a connection's WebSocket read buffer.
const READ_BUFFER: usize = 4 * 1024;

async fn upgrade<C: ChatApi>(
    State(st): State<GatewayState<C>>,
    ext: Extensions,
    ws: WebSocketUpgrade,
) -> Response {
    let peer = ext.get::<ConnectInfo<Peer>>().map(|c| c.0.clone());
    let hard = st.limits.max_message_bytes.saturating_mul(4);
    ws.max_message_size(hard)
        .max_frame_size(hard)
        // tungstenite allocates its read buffer whole for every connection
        // (128 KiB by default), and an idle connection holds it for its
        // whole life: with 4 KiB a connection costs a fraction of that
        // (`conn-bench`, docs/benchmarks.md). Larger frames are read in
        // several steps.
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| {
            // Upgraded: the handshake deadline no longer applies (the
            // auth timeout does).
            if let Some(p) = &peer {
                p.upgraded.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let tracker = st.tracker.clone();
            tracker.track_future(conn::connection(st, socket, peer.map(|p| p.addr)))
        })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
