//! Building one write out of many frames, and encoding a frame for a
//! writer. Pure: shared by the sans-IO cores (which queue their output in
//! a [`Coalescer`]) and the QUIC writer task.

use crate::wire::{self, Frame};
use bytes::{Bytes, BytesMut};

/// Target size of the buffers a [`Coalescer`] builds.
pub const COALESCED_CHUNK: usize = 32 * 1024;
/// Chunks of at least this size are written as they are, not copied.
pub const PASS_THROUGH: usize = COALESCED_CHUNK / 2;

/// Builds one write out of many frames: small ones are copied into
/// buffers of about [`COALESCED_CHUNK`] bytes, chunks of [`PASS_THROUGH`]
/// bytes or more are kept by reference. quinn's send buffer finds the data
/// of each packet by walking its unacknowledged segments from the front,
/// so thousands of small segments in flight cost more CPU than one copy
/// (docs/benchmarks.md); buffers of this size stay in the allocator's cheap
/// size classes. Copying at the source also spares a reference count per
/// frame.
#[derive(Debug, Default)]
pub struct Coalescer {
    done: Vec<Bytes>,
    buf: BytesMut,
    len: usize,
}

impl Coalescer {
    /// Bytes added since the last [`Coalescer::take`].
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append a copy of `bytes`.
    pub fn copy(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.buf.capacity() - self.buf.len() < bytes.len() {
            if !self.buf.is_empty() {
                self.done.push(std::mem::take(&mut self.buf).freeze());
            }
            self.buf.reserve(COALESCED_CHUNK.max(bytes.len()));
        }
        self.buf.extend_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Append `bytes`: by reference if large, else copied.
    pub fn add(&mut self, bytes: &Bytes) {
        if bytes.len() < PASS_THROUGH {
            self.copy(bytes);
            return;
        }
        if !self.buf.is_empty() {
            self.done.push(std::mem::take(&mut self.buf).freeze());
        }
        self.done.push(bytes.clone());
        self.len += bytes.len();
    }

    /// Everything added, in order, as few chunks; leaves `self` empty.
    pub fn take(&mut self) -> Vec<Bytes> {
        if !self.buf.is_empty() {
            self.done.push(std::mem::take(&mut self.buf).freeze());
        }
        self.len = 0;
        std::mem::take(&mut self.done)
    }

    /// Forget everything added.
    pub fn clear(&mut self) {
        self.done.clear();
        self.buf.clear();
        self.len = 0;
    }
}

/// Encode one frame for a writer. Frames built from local state are small
/// and bounded; a failure here is a bug worth logging, not a panic.
pub fn frame_bytes(frame: &Frame, max_frame: usize) -> Option<Bytes> {
    logged(wire::encode_to_bytes(frame, max_frame), frame.kind())
}

/// The encoded frame, or `None` with the error logged.
fn logged(encoded: Result<Bytes, wire::WireError>, kind: &str) -> Option<Bytes> {
    match encoded {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, kind, "could not encode frame");
            None
        }
    }
}

/// A report frame of `entries` (the exchange's hot frame besides the
/// 906), written by hand; `None` (and an error logged) when it does not
/// fit `max_frame`.
pub fn report_bytes(entries: &[wire::ReportEntry], max_frame: usize) -> Option<Bytes> {
    logged(wire::encode_report(entries, max_frame), "report")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn coalescer_keeps_copies_and_references_in_order(
            ops in vec((any::<bool>(), 0..40_000usize), 0..100),
        ) {
            let mut c = Coalescer::default();
            let mut whole = Vec::new();
            let mut big = Vec::new();
            for (i, &(by_ref, n)) in ops.iter().enumerate() {
                let b = Bytes::from(vec![i as u8; n]);
                whole.extend_from_slice(&b);
                if by_ref {
                    c.add(&b);
                    if n >= PASS_THROUGH {
                        big.push(b);
                    }
                } else {
                    c.copy(&b);
                }
            }
            prop_assert_eq!(c.len(), whole.len());
            let out = c.take();
            prop_assert!(c.is_empty() && c.take().is_empty());
            let joined: Vec<u8> = out.iter().flat_map(|c| c.iter().copied()).collect();
            prop_assert_eq!(joined, whole);
            // Large chunks added by reference are the same memory.
            for b in &big {
                prop_assert!(out.iter().any(|o| o.as_ptr() == b.as_ptr() && o.len() == b.len()));
            }
        }
    }
}
