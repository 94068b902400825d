//! Thin IO shell shared by both daemons: QUIC transport tuning, a frame
//! reader over a receive stream, and a writer task that coalesces frames
//! into one write per batch.
//!
//! One long-lived bidirectional stream carries a link in each direction
//! (the app server opens it). Frames are written in batches: whatever is
//! queued when the writer becomes free goes out in one write of a few
//! coalesced buffers, which NOTES.md measured as the largest single saving
//! over a write per frame.

use crate::wire::{self, ErrorCode, Frame, WireError};
use bytes::{Bytes, BytesMut};
pub use iim_proto::coalesce::{COALESCED_CHUNK, Coalescer, PASS_THROUGH, frame_bytes};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub use iim_proto::wire::CLOSE_GOING_AWAY;

/// QUIC settings both daemons share.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QuicTuning {
    /// Keep-alive ping interval.
    pub keep_alive_ms: u64,
    /// A link silent for this long is dead.
    pub idle_timeout_ms: u64,
    /// Requested UDP receive and send buffer of the endpoint's socket. The
    /// kernel caps it (`net.core.rmem_max` / `wmem_max`); the size granted
    /// is logged. Small buffers drop datagrams under bursts, and every drop
    /// shrinks QUIC's congestion window (docs/benchmarks.md).
    pub socket_buffer_bytes: usize,
    /// Largest UDP payload this endpoint accepts and probes its paths for
    /// (QUIC path MTU discovery starts at 1200 bytes and climbs towards
    /// this while probes get through). 1452 fits any 1500-byte Ethernet
    /// path; raise it where links carry jumbo frames (on loopback, larger
    /// packets measured slower: docs/benchmarks.md).
    pub max_udp_payload: u16,
}

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            keep_alive_ms: 500,
            idle_timeout_ms: 1_500,
            socket_buffer_bytes: 4 << 20,
            max_udp_payload: 1452,
        }
    }
}

impl QuicTuning {
    pub fn validate(&self) -> Result<(), String> {
        if !(1200..=65_527).contains(&self.max_udp_payload) {
            return Err(format!(
                "quic: max_udp_payload ({}) is outside 1200..=65527",
                self.max_udp_payload
            ));
        }
        if self.keep_alive_ms == 0 || self.idle_timeout_ms <= self.keep_alive_ms {
            return Err(format!(
                "quic: idle_timeout_ms ({}) must exceed keep_alive_ms ({}) > 0",
                self.idle_timeout_ms, self.keep_alive_ms
            ));
        }
        Ok(())
    }

    /// Bind the UDP socket of a QUIC endpoint at `addr`, with the buffers
    /// asked for (as far as the kernel allows).
    pub fn bind_socket(&self, addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind(addr)?;
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        let want = self.socket_buffer_bytes;
        if want > 0 {
            if let Err(e) = state.set_recv_buffer_size((&socket).into(), want) {
                tracing::warn!(error = %e, want, "cannot size the UDP receive buffer");
            }
            if let Err(e) = state.set_send_buffer_size((&socket).into(), want) {
                tracing::warn!(error = %e, want, "cannot size the UDP send buffer");
            }
        }
        let recv = state.recv_buffer_size((&socket).into()).unwrap_or(0);
        let send = state.send_buffer_size((&socket).into()).unwrap_or(0);
        // Linux reports twice what it grants (the doubling covers its own
        // bookkeeping), so half the reading is what was granted.
        if recv / 2 < want {
            tracing::info!(
                want,
                granted = recv / 2,
                "UDP receive buffer capped by the kernel (net.core.rmem_max)"
            );
        }
        tracing::debug!(recv, send, "UDP socket buffers");
        Ok(socket)
    }

    /// A QUIC endpoint on a socket from [`QuicTuning::bind_socket`]:
    /// a server when `server` is given, else a client.
    ///
    /// `reset_secret` (a server's private key) makes the key of its
    /// stateless resets the same in every process that has it: a restarted
    /// exchange then answers a packet of a connection it no longer has with
    /// a reset the peer accepts, and the peer reconnects at once instead of
    /// waiting out the idle timeout. Without it the key is random.
    pub fn endpoint(
        &self,
        addr: std::net::SocketAddr,
        server: Option<quinn::ServerConfig>,
        reset_secret: Option<&[u8]>,
    ) -> std::io::Result<quinn::Endpoint> {
        let socket = self.bind_socket(addr)?;
        let mut config = match reset_secret {
            Some(secret) => {
                let mut c = quinn::EndpointConfig::new(Arc::new(reset_key(secret)));
                // quinn's default ids are signed with a key of this process
                // alone, and a packet whose id another process made is
                // dropped without a reset.
                c.cid_generator(|| Box::new(RandomCids));
                c
            }
            None => quinn::EndpointConfig::default(),
        };
        config
            .max_udp_payload_size(self.max_udp_payload)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
    }

    pub fn transport(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(Duration::from_millis(self.keep_alive_ms)));
        t.max_idle_timeout(Duration::from_millis(self.idle_timeout_ms).try_into().ok());
        // One long-lived bidirectional stream per link; refuse the rest.
        t.max_concurrent_bidi_streams(1u32.into());
        t.max_concurrent_uni_streams(0u32.into());
        t.stream_receive_window((8u32 << 20).into());
        t.receive_window((16u32 << 20).into());
        t.send_window(16 << 20);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        Arc::new(t)
    }
}

/// Random 8-byte connection ids that any process accepts as possibly its
/// own (see [`QuicTuning::endpoint`]); resets stay rate-limited by quinn and
/// smaller than the packet that caused them.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use ring::rand::SecureRandom;
        use std::sync::atomic::{AtomicU64, Ordering};
        static FALLBACK: AtomicU64 = AtomicU64::new(1);
        let mut id = [0u8; 8];
        if ring::rand::SystemRandom::new().fill(&mut id).is_err() {
            // Never seen on the platforms iim runs on; unique ids still
            // route correctly, they are only guessable.
            id = FALLBACK.fetch_add(1, Ordering::Relaxed).to_le_bytes();
        }
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The stateless-reset key derived from `secret`: HMAC-SHA256 keyed with
/// SHA-256 of a label and the secret (the secret itself is never the key).
fn reset_key(secret: &[u8]) -> ring::hmac::Key {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"iim quic stateless reset v1\0");
    ctx.update(secret);
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ctx.finish().as_ref())
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
}

/// Reads frames off a receive stream, never buffering more than one
/// maximum-size frame.
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max_frame: usize,
    /// A codec error met after some good frames of a batch: returned by the
    /// next call, so the good frames are handled first.
    pending: Option<WireError>,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::with_capacity(64 * 1024),
            max_frame,
            pending: None,
        }
    }

    /// The next frame, or `None` when the peer finished the stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(f) = self.try_next()? {
                return Ok(Some(f));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// A frame already buffered, without reading.
    pub fn try_next(&mut self) -> Result<Option<Frame>, WireError> {
        wire::decode(&mut self.buf, self.max_frame)
    }

    /// Read more bytes; `false` at end of stream.
    pub async fn fill(&mut self) -> Result<bool, ReadError> {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        match self
            .recv
            .read_chunk(self.max_frame.max(64 * 1024), true)
            .await?
        {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Every complete frame now buffered, reading at least once if none is.
    /// Lets callers handle a burst as one batch (one ack, one write).
    /// A codec error after good frames is held back until the next call.
    pub async fn next_batch(&mut self, out: &mut Vec<Frame>) -> Result<bool, ReadError> {
        if let Some(e) = self.pending.take() {
            return Err(e.into());
        }
        loop {
            loop {
                match self.try_next() {
                    Ok(Some(f)) => out.push(f),
                    Ok(None) => break,
                    Err(e) if out.is_empty() => return Err(e.into()),
                    Err(e) => {
                        self.pending = Some(e);
                        return Ok(true);
                    }
                }
            }
            if !out.is_empty() {
                return Ok(true);
            }
            if !self.fill().await? {
                return Ok(false);
            }
        }
    }
}

/// Handle to a link's writer task. Dropping every handle finishes the stream.
pub type Writer = mpsc::Sender<Vec<Bytes>>;

/// Spawn the writer task of one link: each received batch (and whatever
/// else is already waiting) goes out in one write. The channel bound (in
/// batches) is the link's only buffering beyond QUIC's own windows.
pub fn spawn_writer(
    mut send: quinn::SendStream,
    batches: usize,
) -> (Writer, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(batches);
    let task = tokio::spawn(async move {
        while let Some(mut chunks) = rx.recv().await {
            // Gather whatever else is already waiting into the same write.
            while chunks.len() < 2048 {
                match rx.try_recv() {
                    Ok(more) => chunks.extend(more),
                    Err(_) => break,
                }
            }
            let mut out = coalesce(chunks);
            if let Err(e) = send.write_all_chunks(&mut out).await {
                tracing::debug!(error = %e, "link write failed");
                return;
            }
        }
        let _ = send.finish();
    });
    (tx, task)
}

/// Coalesce a writer's batch (see [`Coalescer`]): chunks that are large
/// already pass through uncopied.
fn coalesce(chunks: Vec<Bytes>) -> Vec<Bytes> {
    if chunks.iter().all(|c| c.len() >= PASS_THROUGH) {
        return chunks;
    }
    let mut c = Coalescer::default();
    for chunk in &chunks {
        c.add(chunk);
    }
    c.take()
}

/// Close `conn` with a protocol error code and a human-readable reason the
/// peer sees in its connection error.
pub fn close_with(conn: &quinn::Connection, code: ErrorCode, detail: &str) {
    let reason: Vec<u8> = detail.bytes().take(512).collect();
    conn.close(code.close_code().into(), &reason);
}

/// Wait for room in a link's writer; never resolves without a writer, so it
/// can sit in a `select!` whether or not a link is up. `None`: the writer
/// is gone (its connection died).
pub async fn reserve(w: Option<Writer>) -> Option<mpsc::OwnedPermit<Vec<Bytes>>> {
    match w {
        Some(w) => w.reserve_owned().await.ok(),
        None => std::future::pending().await,
    }
}

/// Sleep until `at`; never resolves for `None` (an unarmed timer in a
/// `select!`).
pub async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn coalescing_keeps_every_byte_in_order(sizes in vec(0..40_000usize, 0..200)) {
            let chunks: Vec<Bytes> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
                .collect();
            let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            let out = coalesce(chunks.clone());
            let joined: Vec<u8> = out.iter().flat_map(|c| c.iter().copied()).collect();
            prop_assert_eq!(joined, whole);
            prop_assert!(out.iter().all(|c| !c.is_empty()));
            // Copied buffers stay near the target size; only chunks that
            // were big already are bigger.
            for c in &out {
                prop_assert!(
                    c.len() <= COALESCED_CHUNK || chunks.iter().any(|o| o.len() == c.len())
                );
            }
            // Small chunks are merged: never more buffers than chunks.
            prop_assert!(out.len() <= chunks.len());
        }
    }
}
