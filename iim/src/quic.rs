//! Thin IO shell shared by both daemons: QUIC transport tuning, a frame
//! reader over a receive stream, and a writer task that coalesces frames
//! into one write per batch.
//!
//! One long-lived bidirectional stream carries a link in each direction
//! (the app server opens it). Frames are written in batches: whatever is
//! queued when the writer becomes free goes out in one `write_all_chunks`,
//! which NOTES.md measured as the largest single saving over a write per
//! frame.

use crate::wire::{self, ErrorCode, Frame, WireError};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Close code of a clean, intended disconnect (an app server draining, an
/// exchange shutting down). Not 0: QUIC closes a connection whose handles
/// were all dropped with code 0, and that must not read as a goodbye.
pub const CLOSE_GOING_AWAY: u32 = 100;

/// QUIC settings both daemons share.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QuicTuning {
    /// Keep-alive ping interval.
    pub keep_alive_ms: u64,
    /// A link silent for this long is dead.
    pub idle_timeout_ms: u64,
}

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            keep_alive_ms: 1_000,
            idle_timeout_ms: 5_000,
        }
    }
}

impl QuicTuning {
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_alive_ms == 0 || self.idle_timeout_ms <= self.keep_alive_ms {
            return Err(format!(
                "quic: idle_timeout_ms ({}) must exceed keep_alive_ms ({}) > 0",
                self.idle_timeout_ms, self.keep_alive_ms
            ));
        }
        Ok(())
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
        Arc::new(t)
    }
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

/// Spawn the writer task of one link: each received batch goes out in one
/// vectored write. The channel bound (in batches) is the link's only
/// buffering beyond QUIC's own windows.
pub fn spawn_writer(
    mut send: quinn::SendStream,
    batches: usize,
) -> (Writer, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(batches);
    let task = tokio::spawn(async move {
        while let Some(mut chunks) = rx.recv().await {
            // Gather whatever else is already waiting into the same write.
            while chunks.len() < 1024 {
                match rx.try_recv() {
                    Ok(more) => chunks.extend(more),
                    Err(_) => break,
                }
            }
            if let Err(e) = send.write_all_chunks(&mut chunks).await {
                tracing::debug!(error = %e, "link write failed");
                return;
            }
        }
        let _ = send.finish();
    });
    (tx, task)
}

/// Encode one frame for a writer. Frames built from local state are small
/// and bounded; a failure here is a bug worth logging, not a panic.
pub fn frame_bytes(frame: &Frame, max_frame: usize) -> Option<Bytes> {
    match wire::encode_to_bytes(frame, max_frame) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, kind = frame.kind(), "could not encode frame");
            None
        }
    }
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
