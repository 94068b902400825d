//! Hand-written decoders for the frames of the hot path (905, 906, ack,
//! report) and for the message a 906 carries. They accept exactly what
//! postcard's derived decoders accept and build the same values
//! (proptests compare them on valid input and on garbage); anything they
//! do not take — other frame kinds, or input they reject — goes to
//! postcard, which then also names the error. The derived decoder walks
//! serde's visitor machinery per field; these read the varints in place.

use super::{ACK_VARIANT, DELIVER_VARIANT, FORWARD_VARIANT, REPORT_VARIANT, ServerRow, UserRow};
use super::{Ack906, Deliver906, DeliveryStatus, Forward905, Frame, Report, ReportEntry};
use super::{MessageWireRef, Timing};
use crate::types::{Address, ChannelId, MessageId, ServerId, UserId};
use bytes::Bytes;

/// Input ended early or broke a rule: the caller falls back to postcard.
struct Reject;

/// The fewest bytes an element takes on the wire (every varint at least
/// one byte): a user row is two varints; a server row three and its users'
/// count; a report entry a message id (three varints), a server and a
/// status.
const MIN_USER_ROW: usize = 2;
const MIN_SERVER_ROW: usize = 4;
const MIN_REPORT_ENTRY: usize = 5;

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, Reject> {
        let (&b, rest) = self.buf.split_first().ok_or(Reject)?;
        self.buf = rest;
        Ok(b)
    }

    /// postcard's unsigned varint of a `bits`-bit integer: at most
    /// `ceil(bits / 7)` bytes, and the last of that many may only carry the
    /// bits that are left.
    fn varint(&mut self, bits: u32) -> Result<u64, Reject> {
        let max_bytes = bits.div_ceil(7);
        let last_max = (1u8 << (bits % 7)) - 1;
        let mut out = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            out |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i == max_bytes - 1 && b > last_max {
                    return Err(Reject);
                }
                return Ok(out);
            }
        }
        Err(Reject)
    }

    fn u64(&mut self) -> Result<u64, Reject> {
        self.varint(64)
    }

    fn u32(&mut self) -> Result<u32, Reject> {
        self.varint(32).map(|v| v as u32)
    }

    fn len(&mut self) -> Result<usize, Reject> {
        usize::try_from(self.u64()?).map_err(|_| Reject)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Reject> {
        if n > self.buf.len() {
            return Err(Reject);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> Result<Bytes, Reject> {
        let n = self.len()?;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }

    fn server(&mut self) -> Result<ServerId, Reject> {
        self.u32().map(ServerId)
    }

    fn id(&mut self) -> Result<MessageId, Reject> {
        Ok(MessageId {
            origin: self.server()?,
            epoch: self.u64()?,
            seq: self.u64()?,
        })
    }

    fn address(&mut self) -> Result<Address, Reject> {
        Ok(Address {
            server: self.server()?,
            user: UserId(self.u64()?),
        })
    }

    /// A sequence: its length, then `item` that many times. Each element
    /// takes at least `min_size` bytes on the wire, so more of them than
    /// fit in the bytes left cannot be valid: the length is checked against
    /// that before it sizes an allocation, which therefore stays within a
    /// small multiple of the frame (an element's size in memory over its
    /// least size on the wire) however the count is forged.
    fn vec_of<T>(
        &mut self,
        min_size: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, Reject>,
    ) -> Result<Vec<T>, Reject> {
        let n = self.len()?;
        if n.checked_mul(min_size)
            .is_none_or(|need| need > self.buf.len())
        {
            return Err(Reject);
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(item(self)?);
        }
        Ok(v)
    }

    fn users(&mut self) -> Result<Vec<UserRow>, Reject> {
        self.vec_of(MIN_USER_ROW, |c| {
            Ok(UserRow {
                user: UserId(c.u64()?),
                channel: ChannelId(c.u64()?),
            })
        })
    }
}

/// One encoded message (the whole of `bytes`), its byte strings borrowed.
/// `None`: decode with postcard (invalid, or bytes left over).
pub(super) fn message(bytes: &[u8]) -> Option<MessageWireRef<'_>> {
    let mut c = Cursor { buf: bytes };
    let m = message_fields(&mut c).ok()?;
    c.buf.is_empty().then_some(m)
}

fn message_fields<'a>(c: &mut Cursor<'a>) -> Result<MessageWireRef<'a>, Reject> {
    let id = c.id()?;
    let source = c.address()?;
    let target = c.address()?;
    let kind = c.varint(16)? as u16;
    let zigzag = c.u64()?;
    let timing = Timing {
        sent_at_ms: ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64),
        ordering_key: c.u64()?,
    };
    let n = c.len()?;
    let body = c.take(n)?;
    // Each nested message is at least its length prefix.
    let nested = c.vec_of(1, |c| {
        let n = c.len()?;
        c.take(n)
    })?;
    Ok(MessageWireRef {
        id,
        source,
        target,
        kind,
        timing,
        body,
        nested,
    })
}

/// The frame in `body` (without the 5-byte header), if it is one of the
/// hot kinds and valid, with what is left after it. `None`: decode with
/// postcard.
pub(super) fn decode(body: &[u8]) -> Option<(Frame, &[u8])> {
    let mut c = Cursor { buf: body };
    let frame = frame(&mut c).ok()?;
    Some((frame, c.buf))
}

fn frame(c: &mut Cursor<'_>) -> Result<Frame, Reject> {
    let variant = c.u32()?;
    Ok(if variant == u32::from(FORWARD_VARIANT) {
        Frame::Forward(Forward905 {
            id: c.id()?,
            source: c.address()?,
            target: c.address()?,
            rows: c.vec_of(MIN_SERVER_ROW, |c| {
                Ok(ServerRow {
                    server: c.server()?,
                    via: c.server()?,
                    seq: c.u64()?,
                    users: c.users()?,
                })
            })?,
            message: c.bytes()?,
        })
    } else if variant == u32::from(DELIVER_VARIANT) {
        Frame::Deliver(Deliver906 {
            no: c.u64()?,
            id: c.id()?,
            seq: c.u64()?,
            users: c.users()?,
            message: c.bytes()?,
        })
    } else if variant == u32::from(ACK_VARIANT) {
        Frame::Ack(Ack906 { upto: c.u64()? })
    } else if variant == u32::from(REPORT_VARIANT) {
        Frame::Report(Report {
            entries: c.vec_of(MIN_REPORT_ENTRY, |c| {
                Ok(ReportEntry {
                    id: c.id()?,
                    server: c.server()?,
                    status: *DeliveryStatus::ALL
                        .get(usize::try_from(c.u32()?).map_err(|_| Reject)?)
                        .ok_or(Reject)?,
                })
            })?,
        })
    } else {
        return Err(Reject);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{DEFAULT_MAX_FRAME, HEADER_LEN, encode_to_bytes};
    use proptest::collection::vec;
    use proptest::prelude::*;

    #[test]
    fn a_forged_count_is_refused_before_it_sizes_an_allocation() {
        // 1,000 bytes hold at most 250 server rows (4 bytes each at the
        // least): a count above that is refused without reading an element
        // or allocating for them.
        for (n, fits) in [
            (250u64, true),
            (251, false),
            (1_000, false),
            (u64::MAX, false),
        ] {
            let mut buf = postcard::to_allocvec(&n).unwrap();
            buf.extend_from_slice(&[0u8; 1_000]);
            let mut c = Cursor { buf: &buf };
            let mut read = 0;
            let got = c.vec_of(MIN_SERVER_ROW, |c| {
                read += 1;
                c.take(MIN_SERVER_ROW)
            });
            assert_eq!(got.is_ok(), fits, "{n} rows");
            assert_eq!(read, if fits { n } else { 0 }, "{n} rows");
        }
    }

    fn id() -> impl Strategy<Value = MessageId> {
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(o, epoch, seq)| MessageId {
            origin: ServerId(o),
            epoch,
            seq,
        })
    }

    fn users() -> impl Strategy<Value = Vec<UserRow>> {
        vec(
            (any::<u64>(), any::<u64>()).prop_map(|(u, c)| UserRow {
                user: UserId(u),
                channel: ChannelId(c),
            }),
            0..4,
        )
    }

    fn body() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..40).prop_map(Bytes::from)
    }

    fn hot_frame() -> impl Strategy<Value = Frame> {
        let address = (any::<u32>(), any::<u64>()).prop_map(|(s, u)| Address {
            server: ServerId(s),
            user: UserId(u),
        });
        let row = (any::<u32>(), any::<u32>(), any::<u64>(), users()).prop_map(
            |(server, via, seq, users)| ServerRow {
                server: ServerId(server),
                via: ServerId(via),
                seq,
                users,
            },
        );
        let entry = (id(), any::<u32>(), 0..6usize).prop_map(|(id, s, st)| ReportEntry {
            id,
            server: ServerId(s),
            status: DeliveryStatus::ALL[st],
        });
        prop_oneof![
            (id(), address.clone(), address, vec(row, 0..4), body()).prop_map(
                |(id, source, target, rows, message)| Frame::Forward(Forward905 {
                    id,
                    source,
                    target,
                    rows,
                    message,
                })
            ),
            (any::<u64>(), id(), any::<u64>(), users(), body()).prop_map(
                |(no, id, seq, users, message)| Frame::Deliver(Deliver906 {
                    no,
                    id,
                    seq,
                    users,
                    message,
                })
            ),
            any::<u64>().prop_map(|upto| Frame::Ack(Ack906 { upto })),
            vec(entry, 0..5).prop_map(|entries| Frame::Report(Report { entries })),
        ]
    }

    /// A valid frame body, then damaged: bytes overwritten, cut short or
    /// extended, so both decoders see near-misses, not only noise.
    fn damaged() -> impl Strategy<Value = Vec<u8>> {
        (
            hot_frame(),
            vec((any::<usize>(), any::<u8>()), 0..4),
            any::<usize>(),
            vec(any::<u8>(), 0..8),
        )
            .prop_map(|(f, flips, cut, tail)| {
                let whole = encode_to_bytes(&f, DEFAULT_MAX_FRAME).expect("small frame");
                let mut b = whole[HEADER_LEN..].to_vec();
                for (at, v) in flips {
                    if !b.is_empty() {
                        let i = at % b.len();
                        b[i] = v;
                    }
                }
                b.truncate(cut % (b.len() + 1) + (cut % 3) * b.len());
                b.extend(tail);
                b
            })
    }

    fn agrees_with_postcard(b: &[u8]) -> Result<(), TestCaseError> {
        let generic = postcard::take_from_bytes::<Frame>(b);
        match decode(b) {
            Some((f, rest)) => {
                let (g, grest) = generic.map_err(|e| {
                    TestCaseError::fail(format!("fast decoder took what postcard refuses: {e}"))
                })?;
                prop_assert_eq!(f, g);
                prop_assert_eq!(rest, grest);
            }
            // Not taken: the caller asks postcard, so the outcome is its own;
            // but a valid hot frame must not be left to it.
            None => {
                if let Ok((g, _)) = generic {
                    prop_assert!(
                        !matches!(
                            g,
                            Frame::Forward(_)
                                | Frame::Deliver(_)
                                | Frame::Ack(_)
                                | Frame::Report(_)
                        ),
                        "valid {} frame not taken",
                        g.kind()
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn status_indices_are_the_declaration_order() {
        for (i, s) in DeliveryStatus::ALL.iter().enumerate() {
            let b = postcard::to_extend(s, Vec::new()).expect("encodes");
            assert_eq!(b, vec![i as u8]);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn valid_hot_frames_decode_as_postcard_does(f in hot_frame()) {
            let whole = encode_to_bytes(&f, DEFAULT_MAX_FRAME).expect("small frame");
            let (got, rest) = decode(&whole[HEADER_LEN..]).expect("taken");
            prop_assert_eq!(got, f);
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn damaged_frames_decode_as_postcard_does(b in damaged()) {
            agrees_with_postcard(&b)?;
        }

        #[test]
        fn noise_decodes_as_postcard_does(tag in 0..9u8, rest in vec(any::<u8>(), 0..64)) {
            let mut b = vec![tag];
            b.extend(rest);
            agrees_with_postcard(&b)?;
        }
    }
}
