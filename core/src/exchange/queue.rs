//! Sans-IO delivery queue for one target server: the 906s the exchange owes
//! it, in order, until the target acknowledges them.
//!
//! Bounded in frames and bytes, and shared fairly between origins: an
//! origin may hold at most `1 / (k + 1)` of either bound, `k` being the
//! origins with 906s in the queue, itself included. There is always room
//! for one more origin, so one flooding a target cannot make everybody
//! else's 906s to it `overloaded`: its own are refused first.
//!
//! The queue outlives connections. On a reconnect of the same incarnation
//! everything not yet acknowledged is transmitted again, in the original
//! order; the target drops what it already delivered (per-origin sequence),
//! so the effect is exactly once and per-origin order holds across the cut.
//! Each 906 is queued as its own small head (frame header, delivery fields;
//! inline, not on the heap, when short) plus the message bytes it shares
//! with every other 906 of the same 905: a message is stored once however
//! many targets it has. 906s are handed
//! out in batches, already coalesced for one write ([`quic::Coalescer`]:
//! small frames copied into a few large buffers, large messages by
//! reference), so no queued frame is reference-counted per transmission.

use crate::Map;
use bytes::{Bytes, BytesMut};
use iim_proto::coalesce as quic;
use iim_proto::types::{MessageId, ServerId};
use iim_proto::wire::{self, Deliver906};
use std::collections::VecDeque;

#[derive(Debug)]
struct Entry {
    no: u64,
    id: MessageId,
    /// The (origin, target) sequence the 906 carries.
    seq: u64,
    /// `head ++ message` is the encoded 906; the head is inline when short.
    head: wire::Head906,
    message: Bytes,
    sent: bool,
}

impl Entry {
    fn len(&self) -> usize {
        self.head.len() + self.message.len()
    }
}

/// A queued 906 taken out undelivered: its message and its (origin,
/// target) sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub id: MessageId,
    pub seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("delivery queue full")]
    Full,
    #[error("the origin holds its share of the delivery queue")]
    OverShare,
    #[error("906 larger than the target's frame limit")]
    Oversized,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ack for delivery {upto} which was never sent (highest sent {sent})")]
pub struct AckError {
    pub upto: u64,
    pub sent: u64,
}

/// What one call to [`DeliveryQueue::poll_transmit`] hands out.
#[derive(Debug, Default)]
pub struct Transmit {
    /// The 906s' bytes, to be written in this order (see
    /// [`quic::Coalescer`]).
    pub chunks: Vec<Bytes>,
    /// How many 906s the chunks hold.
    pub frames: usize,
    pub bytes: usize,
    /// How many of the frames are retransmissions.
    pub retransmits: usize,
}

#[derive(Debug)]
pub struct DeliveryQueue {
    entries: VecDeque<Entry>,
    /// Index in `entries` of the first frame not yet transmitted on the
    /// current connection.
    unsent: usize,
    next_no: u64,
    highest_sent: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    max_frame: usize,
    /// What each origin holds in the queue (origins holding nothing are
    /// not listed).
    shares: Map<ServerId, Share>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Share {
    frames: usize,
    bytes: usize,
}

impl DeliveryQueue {
    pub fn new(max_entries: usize, max_bytes: usize, max_frame: usize) -> Self {
        DeliveryQueue {
            entries: VecDeque::new(),
            unsent: 0,
            next_no: 1,
            highest_sent: 0,
            bytes: 0,
            max_entries,
            max_bytes,
            max_frame,
            shares: Map::default(),
        }
    }

    /// What `origin` holds in the queue: (frames, bytes).
    pub fn share_of(&self, origin: ServerId) -> (usize, usize) {
        self.shares
            .get(&origin)
            .map_or((0, 0), |s| (s.frames, s.bytes))
    }

    /// `origin` may queue another 906 of `len` bytes within its share.
    fn within_share(&self, origin: ServerId, len: usize) -> bool {
        let held = self.shares.get(&origin).copied().unwrap_or_default();
        let k = self.shares.len() + usize::from(held.frames == 0);
        let frames = (self.max_entries / (k + 1)).max(1);
        let bytes = self.max_bytes / (k + 1);
        held.frames < frames && (held.frames == 0 || held.bytes + len <= bytes)
    }

    fn add_share(&mut self, origin: ServerId, len: usize) {
        let s = self.shares.entry(origin).or_default();
        s.frames += 1;
        s.bytes += len;
    }

    fn remove_share(&mut self, origin: ServerId, len: usize) {
        if let Some(s) = self.shares.get_mut(&origin) {
            s.frames -= 1;
            s.bytes -= len;
            if s.frames == 0 {
                self.shares.remove(&origin);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The target's frame limit in force.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn has_unsent(&self) -> bool {
        self.unsent < self.entries.len()
    }

    /// The target's own frame limit (announced when it registers). Queued
    /// 906s above it could never be delivered: they are removed and their
    /// ids returned.
    pub fn set_max_frame(&mut self, max_frame: usize) -> Vec<Dropped> {
        self.max_frame = max_frame;
        let limit = max_frame + wire::HEADER_LEN;
        let mut dropped = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for e in std::mem::take(&mut self.entries) {
            if e.len() > limit {
                self.bytes -= e.len();
                self.remove_share(e.id.origin, e.len());
                dropped.push(Dropped {
                    id: e.id,
                    seq: e.seq,
                });
            } else {
                kept.push_back(e);
            }
        }
        self.entries = kept;
        self.unsent = 0;
        dropped
    }

    /// Queue a 906; assigns its delivery number.
    pub fn push(&mut self, d: Deliver906) -> Result<u64, PushError> {
        self.push_inner(d, false)
    }

    /// Queue a 906 that moved here with its target from another exchange's
    /// keeping, whatever the room: moving never adds to what the exchange
    /// holds, and refusing it would leave its outcome unknown. A queue thus
    /// holds at most its bounds of new 906s plus what moved in (each
    /// peer's relay outbox is bounded the same way).
    pub fn push_moved(&mut self, d: Deliver906) -> Result<u64, PushError> {
        self.push_inner(d, true)
    }

    fn push_inner(&mut self, d: Deliver906, moved: bool) -> Result<u64, PushError> {
        if self.entries.len() >= self.max_entries && !moved {
            return Err(PushError::Full);
        }
        let no = self.next_no;
        let head = wire::Head906::new(no, d.id, d.seq, &d.users, d.message.len(), self.max_frame)
            .map_err(|_| PushError::Oversized)?;
        let len = head.len() + d.message.len();
        if self.bytes + len > self.max_bytes && !self.entries.is_empty() && !moved {
            return Err(PushError::Full);
        }
        if !moved && !self.within_share(d.id.origin, len) {
            return Err(PushError::OverShare);
        }
        self.add_share(d.id.origin, len);
        self.bytes += len;
        self.next_no += 1;
        self.entries.push_back(Entry {
            no,
            id: d.id,
            seq: d.seq,
            head,
            message: d.message,
            sent: false,
        });
        Ok(no)
    }

    /// Frames to write now, in order: at least one if any is unsent, then
    /// more while the batch stays within `max_bytes`.
    pub fn poll_transmit(&mut self, max_bytes: usize) -> Transmit {
        let mut t = Transmit::default();
        let mut out = quic::Coalescer::default();
        while let Some(e) = self.entries.get_mut(self.unsent) {
            if t.frames > 0 && t.bytes + e.len() > max_bytes {
                break;
            }
            out.copy(e.head.as_slice());
            out.add(&e.message);
            t.bytes += e.len();
            t.frames += 1;
            if e.sent {
                t.retransmits += 1;
            }
            e.sent = true;
            self.highest_sent = self.highest_sent.max(e.no);
            self.unsent += 1;
        }
        t.chunks = out.take();
        t
    }

    /// The target acknowledged every delivery up to `upto`: forget them and
    /// return their message ids (for the origins' reports).
    pub fn handle_ack(&mut self, upto: u64) -> Result<Vec<MessageId>, AckError> {
        if upto > self.highest_sent {
            return Err(AckError {
                upto,
                sent: self.highest_sent,
            });
        }
        let mut done = Vec::new();
        while let Some(front) = self.entries.front() {
            if front.no > upto {
                break;
            }
            let e = self.entries.pop_front().expect("front exists");
            self.bytes -= e.len();
            self.remove_share(e.id.origin, e.len());
            self.unsent = self.unsent.saturating_sub(1);
            done.push(e.id);
        }
        Ok(done)
    }

    /// The connection is gone: everything unacknowledged goes out again on
    /// the next one.
    pub fn on_disconnect(&mut self) {
        self.unsent = 0;
    }

    /// The target is gone for good (down, or replaced by a new incarnation):
    /// drop everything and return what was dropped, to report.
    pub fn drain(&mut self) -> Vec<Dropped> {
        self.unsent = 0;
        self.bytes = 0;
        self.shares.clear();
        self.entries
            .drain(..)
            .map(|e| Dropped {
                id: e.id,
                seq: e.seq,
            })
            .collect()
    }

    /// Take every queued 906 out, in order, whole again (their target is
    /// attached to another exchange now).
    pub fn take_all(&mut self) -> Vec<Deliver906> {
        self.unsent = 0;
        self.bytes = 0;
        self.shares.clear();
        let limit = self.max_frame;
        self.entries
            .drain(..)
            .filter_map(|e| {
                let mut buf = BytesMut::with_capacity(e.len());
                buf.extend_from_slice(e.head.as_slice());
                buf.extend_from_slice(&e.message);
                match wire::decode(&mut buf, limit) {
                    Ok(Some(wire::Frame::Deliver(d))) => Some(d),
                    // Encoded here a moment ago: cannot happen.
                    _ => None,
                }
            })
            .collect()
    }

    /// Concatenate a transmit into one buffer (for writers that take one).
    pub fn concat(t: &Transmit) -> Bytes {
        let mut b = BytesMut::with_capacity(t.bytes);
        for c in &t.chunks {
            b.extend_from_slice(c);
        }
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iim_proto::types::ServerId;
    use iim_proto::wire::DEFAULT_MAX_FRAME;
    use iim_proto::wire::Frame;

    fn d(seq: u64) -> Deliver906 {
        from(1, seq)
    }

    /// A 906 of origin `origin`'s message `seq`.
    fn from(origin: u32, seq: u64) -> Deliver906 {
        Deliver906 {
            no: 0,
            id: MessageId {
                origin: ServerId(origin),
                epoch: 1,
                seq,
            },
            seq,
            users: vec![],
            message: Bytes::from_static(b"m"),
        }
    }

    fn decode_all(t: &Transmit) -> Vec<Deliver906> {
        let mut buf = BytesMut::from(&DeliveryQueue::concat(t)[..]);
        let mut out = vec![];
        while let Some(f) = wire::decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            match f {
                Frame::Deliver(d) => out.push(d),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    #[test]
    fn numbers_in_order_and_batches_respect_the_byte_budget() {
        let mut q = DeliveryQueue::new(100, 1 << 20, DEFAULT_MAX_FRAME);
        for s in 1..=10 {
            assert_eq!(q.push(d(s)).unwrap(), s);
        }
        let frame_len = q.entries[0].len();
        let t = q.poll_transmit(frame_len * 4);
        assert_eq!(t.frames, 4);
        assert_eq!(t.bytes, frame_len * 4);
        // Small 906s are copied into one buffer.
        assert_eq!(t.chunks.len(), 1);
        let t2 = q.poll_transmit(usize::MAX);
        assert_eq!(t2.frames, 6);
        let nos: Vec<u64> = decode_all(&t)
            .iter()
            .chain(&decode_all(&t2))
            .map(|d| d.no)
            .collect();
        assert_eq!(nos, (1..=10).collect::<Vec<_>>());
        assert!(!q.has_unsent());
        // A single frame larger than the budget still goes out.
        q.push(d(11)).unwrap();
        assert_eq!(q.poll_transmit(1).frames, 1);
    }

    #[test]
    fn reconnect_retransmits_exactly_the_unacked_in_order() {
        let mut q = DeliveryQueue::new(100, 1 << 20, DEFAULT_MAX_FRAME);
        for s in 1..=6 {
            q.push(d(s)).unwrap();
        }
        q.poll_transmit(usize::MAX);
        let acked = q.handle_ack(3).unwrap();
        assert_eq!(
            acked.iter().map(|i| i.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        q.push(d(7)).unwrap();
        q.on_disconnect();
        let t = q.poll_transmit(usize::MAX);
        assert_eq!(t.retransmits, 3);
        let nos: Vec<u64> = decode_all(&t).iter().map(|d| d.no).collect();
        assert_eq!(nos, vec![4, 5, 6, 7]);
        // A stale ack is harmless; an ack beyond what was sent is an error.
        assert!(q.handle_ack(2).unwrap().is_empty());
        assert_eq!(q.handle_ack(8), Err(AckError { upto: 8, sent: 7 }));
        assert_eq!(q.handle_ack(7).unwrap().len(), 4);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn ack_in_the_middle_of_a_partial_transmit_keeps_the_cursor_right() {
        let mut q = DeliveryQueue::new(100, 1 << 20, DEFAULT_MAX_FRAME);
        for s in 1..=5 {
            q.push(d(s)).unwrap();
        }
        let one = q.entries[0].len();
        q.poll_transmit(one * 2);
        q.handle_ack(2).unwrap();
        let t = q.poll_transmit(usize::MAX);
        assert_eq!(
            decode_all(&t).iter().map(|d| d.no).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(t.retransmits, 0);
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        // Three origins, so that no share limits them before the bound.
        let mut q = DeliveryQueue::new(2, 1 << 20, DEFAULT_MAX_FRAME);
        q.push(from(1, 1)).unwrap();
        q.push(from(2, 1)).unwrap();
        assert_eq!(q.push(from(3, 1)), Err(PushError::Full));
        let mut q = DeliveryQueue::new(100, 1, DEFAULT_MAX_FRAME);
        q.push(d(1)).unwrap(); // the first always fits
        assert_eq!(q.push(d(2)), Err(PushError::Full));
        let mut q = DeliveryQueue::new(100, 1 << 20, 8);
        assert_eq!(q.push(d(1)), Err(PushError::Oversized));
    }

    #[test]
    fn a_flooding_origin_keeps_to_its_share_and_others_find_room() {
        let mut q = DeliveryQueue::new(100, 1 << 20, DEFAULT_MAX_FRAME);
        // Alone, an origin may hold half the queue.
        for s in 1..=50 {
            q.push(from(1, s)).unwrap();
        }
        assert_eq!(q.push(from(1, 51)), Err(PushError::OverShare));
        // Another is not starved: it gets a third (two origins hold 906s).
        for s in 1..=33 {
            q.push(from(2, s)).unwrap();
        }
        assert_eq!(q.push(from(2, 34)), Err(PushError::OverShare));
        // And a third still finds room.
        q.push(from(3, 1)).unwrap();
        assert_eq!(q.share_of(ServerId(1)), (50, q.share_of(ServerId(1)).1));
        // As the target acknowledges, the flooder may add again only once
        // below its share of now three origins (a quarter: 25).
        q.poll_transmit(usize::MAX);
        q.handle_ack(25).unwrap();
        assert_eq!(q.share_of(ServerId(1)).0, 25);
        assert_eq!(q.push(from(1, 51)), Err(PushError::OverShare));
        q.handle_ack(26).unwrap();
        q.push(from(1, 51)).unwrap();
        // Bytes are shared the same way.
        let big = |origin: u32, seq: u64| {
            let mut x = from(origin, seq);
            x.message = Bytes::from(vec![0u8; 1_000]);
            x
        };
        let mut q = DeliveryQueue::new(100, 10_000, DEFAULT_MAX_FRAME);
        for s in 1..=4 {
            q.push(big(1, s)).unwrap();
        }
        assert_eq!(q.push(big(1, 5)), Err(PushError::OverShare));
        q.push(big(2, 1)).unwrap();
        // Acknowledged or dropped, nothing is held any more.
        q.poll_transmit(usize::MAX);
        let last = q.entries.back().map(|e| e.no).unwrap();
        q.handle_ack(last).unwrap();
        assert_eq!(q.share_of(ServerId(1)), (0, 0));
        assert!(q.shares.is_empty());
    }

    #[test]
    fn a_smaller_target_limit_removes_what_cannot_be_delivered() {
        let mut q = DeliveryQueue::new(100, 1 << 20, DEFAULT_MAX_FRAME);
        q.push(d(1)).unwrap();
        let mut big = d(2);
        big.message = Bytes::from(vec![0u8; 5_000]);
        q.push(big).unwrap();
        q.push(d(3)).unwrap();
        let dropped = q.set_max_frame(4_096);
        assert_eq!(
            dropped.iter().map(|i| i.id.seq).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(q.len(), 2);
        let mut big = d(4);
        big.message = Bytes::from(vec![0u8; 5_000]);
        assert_eq!(q.push(big), Err(PushError::Oversized));
    }

    #[test]
    fn large_messages_pass_by_reference_and_buffers_stay_bounded() {
        let mut q = DeliveryQueue::new(1_000, 64 << 20, 1 << 20);
        let big = Bytes::from(vec![7u8; quic::PASS_THROUGH]);
        for s in 1..=200 {
            let mut x = d(s);
            x.message = if s.is_multiple_of(50) {
                big.clone()
            } else {
                Bytes::from(vec![s as u8; 1_000])
            };
            q.push(x).unwrap();
        }
        let t = q.poll_transmit(usize::MAX);
        assert_eq!(t.frames, 200);
        assert_eq!(t.bytes, t.chunks.iter().map(|c| c.len()).sum::<usize>());
        // The large messages are the queued bytes themselves, not copies.
        let shared = t
            .chunks
            .iter()
            .filter(|c| c.as_ptr() == big.as_ptr() && c.len() == big.len())
            .count();
        assert_eq!(shared, 4);
        assert!(
            t.chunks
                .iter()
                .all(|c| c.len() <= quic::COALESCED_CHUNK || c.len() == big.len())
        );
        let got = decode_all(&t);
        assert_eq!(got.len(), 200);
        for (i, x) in got.iter().enumerate() {
            let s = i as u64 + 1;
            assert_eq!(x.no, s);
            if s.is_multiple_of(50) {
                assert_eq!(x.message, big);
            } else {
                assert_eq!(&x.message[..], &vec![s as u8; 1_000][..]);
            }
        }
    }

    #[test]
    fn drain_returns_everything() {
        let mut q = DeliveryQueue::new(100, 1 << 20, DEFAULT_MAX_FRAME);
        for s in 1..=3 {
            q.push(d(s)).unwrap();
        }
        q.poll_transmit(usize::MAX);
        assert_eq!(q.drain().len(), 3);
        assert!(q.is_empty() && !q.has_unsent());
    }
}
