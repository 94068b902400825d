//! The link protocol between app servers and the exchange: frames, their
//! encoding, and the message encoding they carry. Pure: no IO, no clocks.
//!
//! A frame on the wire is
//!
//! ```text
//! +---------+----------------+------------------------------+
//! | version | length (u32 BE)| postcard body (length bytes) |
//! +---------+----------------+------------------------------+
//! ```
//!
//! The length is checked against the receiver's maximum before anything is
//! allocated. postcard is not self-describing, so variants and fields are
//! append-only; golden-bytes tests pin the encoding of every frame kind.
//!
//! Messages travel inside 905 and 906 frames as their own postcard encoding
//! (`message: Bytes`), so the exchange relays them without decoding and all
//! 906s of one 905 share the same bytes. Nested messages are encoded as
//! length-delimited byte strings and decoded with an explicit depth limit,
//! so every nested message knows its size (seed 002's serialisation bug) and
//! no input can exhaust the decoder's stack.

use crate::types::{Address, ChannelId, MessageId, ServerId, UserId};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

mod fast;

/// The only frame version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes before a frame's body: version + length.
pub const HEADER_LEN: usize = 5;
/// Default maximum frame body size (1 MiB). Configurable per daemon.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
/// Deepest nesting of messages inside messages that is accepted.
pub const MAX_NESTING: usize = 8;

/// Errors of the codec. Every one of them ends the link that produced it:
/// after a bad frame the byte stream can no longer be trusted.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unsupported frame version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("malformed message: {0}")]
    MalformedMessage(String),
    #[error("message nesting deeper than {MAX_NESTING}")]
    TooDeep,
}

impl WireError {
    /// Short stable label for metrics and error frames.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::UnsupportedVersion(_) => "bad_version",
            WireError::Oversized { .. } => "oversized_frame",
            WireError::Malformed(_) => "malformed_frame",
            WireError::MalformedMessage(_) | WireError::TooDeep => "malformed_message",
        }
    }
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// Ordering ("timing control") attributes of a message. They are set once by
/// the origin and survive forwarding unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Timing {
    /// Origin wall clock when `send` was called, unix milliseconds.
    pub sent_at_ms: i64,
    /// Application-chosen key under which order matters (a conversation,
    /// a presence subject); 0 when unused.
    pub ordering_key: u64,
}

/// A message as plugins and client connections see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    /// The sending `(server, user)`.
    pub source: Address,
    /// Where the message is going. A message carried by a 905/906 has
    /// target [`Address::RECEIVER`]: "the receiving client itself".
    pub target: Address,
    /// Which plugin the message belongs to (chat, presence, …).
    pub kind: u16,
    pub timing: Timing,
    /// Opaque to the relay.
    pub body: Bytes,
    /// Messages carried inside this one (a quoted or forwarded message).
    pub nested: Vec<Message>,
}

/// The encoded shape of a [`Message`]: nested messages are byte strings.
/// Borrows the body: encoding touches no reference count.
#[derive(Serialize)]
struct MessageWire<'a> {
    id: MessageId,
    source: Address,
    target: Address,
    kind: u16,
    timing: &'a Timing,
    body: &'a Bytes,
    nested: Vec<Bytes>,
}

impl Message {
    /// Encode into a fresh buffer.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.put(&mut out);
        out.freeze()
    }

    /// Bytes of the encoding (postcard's layout of [`MessageWire`]: the
    /// fields in order as varints, `timing.sent_at_ms` zigzagged, the body
    /// and each nested message as a length-prefixed byte string).
    fn encoded_len(&self) -> usize {
        let address = |a: Address| varint_len(u64::from(a.server.0)) + varint_len(a.user.0);
        varint_len(u64::from(self.id.origin.0))
            + varint_len(self.id.epoch)
            + varint_len(self.id.seq)
            + address(self.source)
            + address(self.target)
            + varint_len(u64::from(self.kind))
            + varint_len(zigzag(self.timing.sent_at_ms))
            + varint_len(self.timing.ordering_key)
            + varint_len(self.body.len() as u64)
            + self.body.len()
            + varint_len(self.nested.len() as u64)
            + self
                .nested
                .iter()
                .map(|n| {
                    let len = n.encoded_len();
                    varint_len(len as u64) + len
                })
                .sum::<usize>()
    }

    /// Write the encoding by hand, byte for byte what postcard writes for
    /// [`MessageWire`] (proptested against it).
    fn put(&self, out: &mut BytesMut) {
        put_varint(out, u64::from(self.id.origin.0));
        put_varint(out, self.id.epoch);
        put_varint(out, self.id.seq);
        for a in [self.source, self.target] {
            put_varint(out, u64::from(a.server.0));
            put_varint(out, a.user.0);
        }
        put_varint(out, u64::from(self.kind));
        put_varint(out, zigzag(self.timing.sent_at_ms));
        put_varint(out, self.timing.ordering_key);
        put_varint(out, self.body.len() as u64);
        out.extend_from_slice(&self.body);
        put_varint(out, self.nested.len() as u64);
        for n in &self.nested {
            put_varint(out, n.encoded_len() as u64);
            n.put(out);
        }
    }

    /// The encoding as postcard's derived serialiser writes it: what the
    /// hand-written [`Message::put`] is tested against.
    #[doc(hidden)]
    pub fn encode_with_postcard(&self) -> Bytes {
        let mut out = BytesMut::new();
        let _ = postcard::serialize_with_flavor(&self.wire(), BytesMutFlavor(&mut out));
        out.freeze()
    }

    fn wire(&self) -> MessageWire<'_> {
        MessageWire {
            id: self.id,
            source: self.source,
            target: self.target,
            kind: self.kind,
            timing: &self.timing,
            body: &self.body,
            nested: self
                .nested
                .iter()
                .map(Message::encode_with_postcard)
                .collect(),
        }
    }

    /// Decode one message (and, recursively, the messages nested in it).
    /// The bodies are copied out of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        Self::decode_at(bytes, 0, &|body| Bytes::copy_from_slice(body))
    }

    /// Like [`Message::decode`], but every body is a slice of `bytes`
    /// (no copy; the bodies keep `bytes` alive).
    pub fn decode_shared(bytes: &Bytes) -> Result<Message, WireError> {
        Self::decode_at(bytes, 0, &|body| bytes.slice_ref(body))
    }

    /// Like [`Message::decode_shared`], taking the bytes: a message without
    /// nested ones gets them, narrowed to its body, with no new reference
    /// (a slice of a fresh buffer would allocate a shared header).
    pub fn decode_owned(bytes: Bytes) -> Result<Message, WireError> {
        let base = bytes.as_ptr() as usize;
        let body_at = std::cell::Cell::new((0, 0));
        let mut m = Self::decode_at(&bytes, 0, &|body| {
            body_at.set((body.as_ptr() as usize - base, body.len()));
            Bytes::new()
        })?;
        if !m.nested.is_empty() {
            return Self::decode_shared(&bytes);
        }
        // Without nested messages the one body seen is this message's.
        let (start, len) = body_at.get();
        let mut body = bytes;
        body.advance(start);
        body.truncate(len);
        m.body = body;
        Ok(m)
    }

    fn decode_at(
        bytes: &[u8],
        depth: usize,
        body_of: &dyn Fn(&[u8]) -> Bytes,
    ) -> Result<Message, WireError> {
        // The hand-written reader takes exactly what postcard takes; what
        // it does not take, postcard decodes again and names the error.
        Self::decode_with(bytes, depth, body_of, fast::message)
    }

    fn decode_with(
        bytes: &[u8],
        depth: usize,
        body_of: &dyn Fn(&[u8]) -> Bytes,
        read: fn(&[u8]) -> Option<MessageWireRef<'_>>,
    ) -> Result<Message, WireError> {
        if depth > MAX_NESTING {
            return Err(WireError::TooDeep);
        }
        let wire = match read(bytes) {
            Some(wire) => wire,
            None => {
                let (wire, rest): (MessageWireRef<'_>, _) = postcard::take_from_bytes(bytes)
                    .map_err(|e| WireError::MalformedMessage(e.to_string()))?;
                if !rest.is_empty() {
                    return Err(WireError::MalformedMessage(format!(
                        "{} trailing bytes",
                        rest.len()
                    )));
                }
                wire
            }
        };
        let nested = wire
            .nested
            .iter()
            .map(|b| Self::decode_with(b, depth + 1, body_of, read))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Message {
            id: wire.id,
            source: wire.source,
            target: wire.target,
            kind: wire.kind,
            timing: wire.timing,
            body: body_of(wire.body),
            nested,
        })
    }
}

/// [`MessageWire`] as the decoder reads it: byte strings borrowed from the
/// input, so the caller decides whether bodies are copied or shared.
#[derive(Deserialize)]
struct MessageWireRef<'a> {
    id: MessageId,
    source: Address,
    target: Address,
    kind: u16,
    timing: Timing,
    #[serde(borrow)]
    body: &'a [u8],
    #[serde(borrow)]
    nested: Vec<&'a [u8]>,
}

/// Decode one message with postcard's derived decoder only: what the
/// hand-written reader is tested against.
#[doc(hidden)]
pub fn decode_message_with_postcard(bytes: &[u8]) -> Result<Message, WireError> {
    Message::decode_with(bytes, 0, &|body| Bytes::copy_from_slice(body), |_| None)
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// App server → exchange, first frame on a link: "I am `server`, incarnation
/// `epoch`". The claim is checked against the peer's certificate and the
/// registry before anything else is accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub server: ServerId,
    pub epoch: u64,
    /// Largest frame body the app server accepts.
    pub max_frame: u32,
}

/// Exchange → app server: the registration is accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub exchange: ServerId,
    pub exchange_epoch: u64,
    /// How long the exchange keeps the server's deliveries after the link is
    /// lost before it marks the server down.
    pub lease_ms: u32,
    /// Largest frame body the exchange accepts.
    pub max_frame: u32,
}

/// Liveness, both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub sent_at_ms: i64,
}

/// One target user connection on a target server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserRow {
    pub user: UserId,
    /// The connection on the target server.
    pub channel: ChannelId,
}

/// One target server of a 905.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRow {
    pub server: ServerId,
    /// The server's channel: the exchange it is reached through. Today the
    /// origin's own exchange (one per deployment); the seam for several
    /// exchanges, where it will come from the registry's `exchange_id`.
    pub via: ServerId,
    /// Per (origin, target) sequence, assigned by the origin in send order;
    /// the target drops anything not above the last one it delivered.
    pub seq: u64,
    pub users: Vec<UserRow>,
}

impl ServerRow {
    /// An upper estimate of the encoded size.
    fn size_hint(&self) -> usize {
        40 + 20 * self.users.len()
    }
}

/// 905: forward request, app server → exchange. Carries the message once
/// plus the target rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward905 {
    pub id: MessageId,
    /// The sending `(server, user)`; must match the link's certificate.
    pub source: Address,
    /// The exchange: `(exchange id, 0)`.
    pub target: Address,
    pub rows: Vec<ServerRow>,
    /// The original message, encoded, with target `(0,0)`.
    pub message: Bytes,
}

/// 906: one delivery per target server, exchange → app server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliver906 {
    /// Delivery number on this exchange → target queue; acknowledged by
    /// [`Ack906`].
    pub no: u64,
    pub id: MessageId,
    /// The origin's per (origin, target) sequence from the server row.
    pub seq: u64,
    pub users: Vec<UserRow>,
    pub message: Bytes,
}

/// App server → exchange: every 906 with `no <= upto` has been handled
/// (delivered to local connections, or recognised as a duplicate).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack906 {
    pub upto: u64,
}

/// The outcome of one message at one target server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryStatus {
    /// The target server acknowledged the 906.
    Delivered,
    /// No such server in the registry.
    UnknownServer,
    /// The target is down (lease expired, shut down, or restarted).
    ServerDown,
    /// Outcome not known: no certain outcome within the sender's deadline
    /// (a copy may have been, or may still be, delivered).
    TimedOut,
    /// The exchange's queue for the target is full, or the 906 is larger
    /// than the target accepts.
    Overloaded,
    /// The exchange refused the 905 itself (malformed or misaddressed). Not
    /// retried.
    Refused,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::UnknownServer => "unknown_server",
            DeliveryStatus::ServerDown => "server_down",
            DeliveryStatus::TimedOut => "timed_out",
            DeliveryStatus::Overloaded => "overloaded",
            DeliveryStatus::Refused => "refused",
        }
    }

    /// Every label `as_str` returns, in variant order (for metrics).
    pub const LABELS: [&'static str; 6] = [
        "delivered",
        "unknown_server",
        "server_down",
        "timed_out",
        "overloaded",
        "refused",
    ];

    /// Position in [`DeliveryStatus::ALL`] and [`DeliveryStatus::LABELS`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// How many of `statuses` are of each kind, in [`DeliveryStatus::ALL`]
    /// order (for counting a batch with one update per kind).
    pub fn tally(statuses: impl IntoIterator<Item = DeliveryStatus>) -> [u64; 6] {
        let mut counts = [0u64; 6];
        for s in statuses {
            counts[s.index()] += 1;
        }
        counts
    }

    pub const ALL: [DeliveryStatus; 6] = [
        DeliveryStatus::Delivered,
        DeliveryStatus::UnknownServer,
        DeliveryStatus::ServerDown,
        DeliveryStatus::TimedOut,
        DeliveryStatus::Overloaded,
        DeliveryStatus::Refused,
    ];
}

/// One line of a delivery report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportEntry {
    pub id: MessageId,
    pub server: ServerId,
    pub status: DeliveryStatus,
}

/// Exchange → origin app server: outcomes per (message, target server),
/// batched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub entries: Vec<ReportEntry>,
}

/// Close code of a clean, intended disconnect (an app server draining, an
/// exchange shutting down). Not 0: QUIC closes a connection whose handles
/// were all dropped with code 0, and that must not read as a goodbye.
pub const CLOSE_GOING_AWAY: u32 = 100;

/// Why a peer is being told off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    Malformed,
    Oversized,
    UnsupportedVersion,
    NotRegistered,
    IdentityMismatch,
    StaleEpoch,
    UnknownServer,
    ForgedSource,
    Protocol,
    ShuttingDown,
    Internal,
}

impl ErrorCode {
    /// The QUIC application close code for this error (0 is a clean close).
    pub fn close_code(self) -> u32 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::Oversized => 2,
            ErrorCode::UnsupportedVersion => 3,
            ErrorCode::NotRegistered => 4,
            ErrorCode::IdentityMismatch => 5,
            ErrorCode::StaleEpoch => 6,
            ErrorCode::UnknownServer => 7,
            ErrorCode::ForgedSource => 8,
            ErrorCode::Protocol => 9,
            ErrorCode::ShuttingDown => 10,
            ErrorCode::Internal => 11,
        }
    }

    pub fn from_close_code(code: u64) -> Option<ErrorCode> {
        use ErrorCode::*;
        [
            Malformed,
            Oversized,
            UnsupportedVersion,
            NotRegistered,
            IdentityMismatch,
            StaleEpoch,
            UnknownServer,
            ForgedSource,
            Protocol,
            ShuttingDown,
            Internal,
        ]
        .into_iter()
        .find(|c| u64::from(c.close_code()) == code)
    }

    pub fn for_wire_error(e: &WireError) -> ErrorCode {
        match e {
            WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            WireError::Oversized { .. } => ErrorCode::Oversized,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Either direction: a protocol error. A fatal one is followed by closing
/// the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub detail: String,
}

/// Exchange → exchange, the first frame each way on a peer link: "I am
/// exchange `exchange`, incarnation `epoch`". Checked against the peer's
/// certificate (`exchange-N.iim`) like `Register`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    pub exchange: ServerId,
    pub epoch: u64,
    /// Largest frame body the sender accepts.
    pub max_frame: u32,
}

/// Exchange → exchange: app server `server` (incarnation `epoch`) is
/// attached to `exchange` under `attach_epoch`. Sent by the exchange that
/// recorded the registration to every peer at once, and as the answer to a
/// relayed 905 row for a server that is no longer attached to the receiver
/// (*not here*). A higher `attach_epoch` always wins; the registry is the
/// truth when peers disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub server: ServerId,
    pub epoch: u64,
    pub exchange: ServerId,
    pub attach_epoch: u64,
}

/// Everything that travels on a link. Append new variants at the end only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Register(Register),
    Registered(Registered),
    Heartbeat(Heartbeat),
    Forward(Forward905),
    Deliver(Deliver906),
    Ack(Ack906),
    Report(Report),
    Error(ErrorFrame),
    PeerHello(PeerHello),
    Attached(Attached),
}

impl Frame {
    /// Stable label for logs and metrics; 905 and 906 keep their codes.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Register(_) => "register",
            Frame::Registered(_) => "registered",
            Frame::Heartbeat(_) => "heartbeat",
            Frame::Forward(_) => "905",
            Frame::Deliver(_) => "906",
            Frame::Ack(_) => "ack906",
            Frame::Report(_) => "report",
            Frame::Error(_) => "error",
            Frame::PeerHello(_) => "peer_hello",
            Frame::Attached(_) => "attached",
        }
    }

    /// All labels `kind` can return, for pre-registering metrics.
    pub const KINDS: [&'static str; 10] = [
        "register",
        "registered",
        "heartbeat",
        "905",
        "906",
        "ack906",
        "report",
        "error",
        "peer_hello",
        "attached",
    ];
}

/// A postcard output flavor appending straight into a `BytesMut`.
struct BytesMutFlavor<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for BytesMutFlavor<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Append one frame (header + body) to `out`. A body larger than `max` is
/// refused here, so an oversized frame is the sender's error, not a
/// surprise for the receiver; `out` is left as it was.
pub fn encode(frame: &Frame, out: &mut BytesMut, max: usize) -> Result<(), WireError> {
    let start = out.len();
    out.put_u8(VERSION);
    out.put_u32(0);
    let _ = postcard::serialize_with_flavor(frame, BytesMutFlavor(out));
    let len = out.len() - start - HEADER_LEN;
    if len > max || len > u32::MAX as usize {
        out.truncate(start);
        return Err(WireError::Oversized { len, max });
    }
    out[start + 1..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Encode one frame into its own buffer.
pub fn encode_to_bytes(frame: &Frame, max: usize) -> Result<Bytes, WireError> {
    let hint = match frame {
        Frame::Forward(f) => {
            f.message.len() + f.rows.iter().map(ServerRow::size_hint).sum::<usize>()
        }
        Frame::Deliver(d) => d.message.len() + 20 * d.users.len(),
        Frame::Report(r) => 32 * r.entries.len(),
        _ => 0,
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + 64 + hint);
    encode(frame, &mut out, max)?;
    Ok(out.freeze())
}

/// postcard's indexes of the hot frame kinds (variants are append-only;
/// tests pin them against the generic encoding).
const FORWARD_VARIANT: u8 = 3;
const DELIVER_VARIANT: u8 = 4;
const ACK_VARIANT: u8 = 5;
const REPORT_VARIANT: u8 = 6;

/// A whole 905 with `message` encoded in place: byte for byte
/// `encode(&Frame::Forward(..))` with `message: message.encode()`, without
/// encoding the message into a buffer of its own first.
pub fn encode_forward(
    id: MessageId,
    source: Address,
    target: Address,
    rows: &[ServerRow],
    message: &Message,
    max: usize,
) -> Result<Bytes, WireError> {
    let message_len = message.encoded_len();
    let rows_hint = rows.iter().map(ServerRow::size_hint).sum::<usize>();
    let mut out = BytesMut::with_capacity(HEADER_LEN + 64 + rows_hint + message_len);
    let refs = rows.iter().map(|r| RowRef {
        server: r.server,
        via: r.via,
        seq: r.seq,
        users: &r.users,
    });
    write_forward_head(&mut out, id, source, target, refs, message_len, max)?;
    let head = out.len();
    message.put(&mut out);
    debug_assert_eq!(out.len(), head + message_len);
    Ok(out.freeze())
}

/// A whole report frame of `entries`, written by hand: byte for byte
/// `encode(&Frame::Report(..))` (proptested), without building the frame
/// value (a copy of the entries) first.
pub fn encode_report(entries: &[ReportEntry], max: usize) -> Result<Bytes, WireError> {
    let entry_len = |e: &ReportEntry| {
        varint_len(u64::from(e.id.origin.0))
            + varint_len(e.id.epoch)
            + varint_len(e.id.seq)
            + varint_len(u64::from(e.server.0))
            + varint_len(e.status as u64)
    };
    let body = 1 + varint_len(entries.len() as u64) + entries.iter().map(entry_len).sum::<usize>();
    if body > max || body > u32::MAX as usize {
        return Err(WireError::Oversized { len: body, max });
    }
    let mut out = BytesMut::with_capacity(HEADER_LEN + body);
    out.put_u8(VERSION);
    out.put_u32(body as u32);
    out.put_u8(REPORT_VARIANT);
    put_varint(&mut out, entries.len() as u64);
    for e in entries {
        put_varint(&mut out, u64::from(e.id.origin.0));
        put_varint(&mut out, e.id.epoch);
        put_varint(&mut out, e.id.seq);
        put_varint(&mut out, u64::from(e.server.0));
        put_varint(&mut out, e.status as u64);
    }
    Ok(out.freeze())
}

/// The longest ack frame: the header, the variant and a ten-byte varint.
pub const ACK_FRAME_MAX: usize = HEADER_LEN + 1 + 10;

/// An ack frame written by hand into `buf`: byte for byte
/// `encode(&Frame::Ack(Ack906 { upto }))` (proptested), with no allocation.
/// Returns its length. (Its body, at most 11 bytes, fits every frame
/// limit a link accepts.)
pub fn write_ack(buf: &mut [u8; ACK_FRAME_MAX], upto: u64) -> usize {
    let body = 1 + varint_len(upto);
    let mut w = &mut buf[..];
    w.put_u8(VERSION);
    w.put_u32(body as u32);
    w.put_u8(ACK_VARIANT);
    put_varint(&mut w, upto);
    HEADER_LEN + body
}

/// postcard's zigzag form of a signed integer, as its varint carries it.
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Longest 906 head a [`Head906`] holds without a heap allocation (one or
/// two user rows with typical ids).
pub const HEAD_INLINE: usize = 56;

/// The head of a 906 whose message bytes are sent separately: the frame
/// header, the delivery fields and the message's length prefix.
/// `head ++ message` is byte for byte `encode(&Frame::Deliver(..))`, so
/// every 906 of one 905 can share one copy of the message all the way into
/// the transport. Kept inline when short: the exchange queues one per 906.
#[derive(Clone, Debug)]
pub enum Head906 {
    Inline { len: u8, buf: [u8; HEAD_INLINE] },
    Heap(Bytes),
}

impl Head906 {
    pub fn new(
        no: u64,
        id: MessageId,
        seq: u64,
        users: &[UserRow],
        message_len: usize,
        max: usize,
    ) -> Result<Head906, WireError> {
        let (head_len, body_len) = deliver_head_len(no, id, seq, users, message_len, max)?;
        if head_len > HEAD_INLINE {
            let mut out = BytesMut::with_capacity(head_len);
            write_deliver_head(&mut out, body_len, no, id, seq, users, message_len);
            return Ok(Head906::Heap(out.freeze()));
        }
        let mut buf = [0u8; HEAD_INLINE];
        let mut w = &mut buf[..head_len];
        write_deliver_head(&mut w, body_len, no, id, seq, users, message_len);
        Ok(Head906::Inline {
            len: head_len as u8,
            buf,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Head906::Inline { len, buf } => &buf[..usize::from(*len)],
            Head906::Heap(b) => b,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One row of a relayed 905, borrowed from where the exchange keeps it.
#[derive(Clone, Copy, Debug)]
pub struct RowRef<'a> {
    pub server: ServerId,
    pub via: ServerId,
    pub seq: u64,
    pub users: &'a [UserRow],
}

/// Append the head of a 905 whose message bytes are written separately
/// (an exchange relaying to a peer): the frame header, the fields before
/// the message and the message's length prefix. `head ++ message` is byte
/// for byte `encode(&Frame::Forward(..))`, without building the frame or
/// copying its rows. `rows` is walked twice (measure, then write). On an
/// oversized frame `out` is left as it was.
pub fn write_forward_head<'a, I>(
    out: &mut BytesMut,
    id: MessageId,
    source: Address,
    target: Address,
    rows: I,
    message_len: usize,
    max: usize,
) -> Result<(), WireError>
where
    I: Iterator<Item = RowRef<'a>> + Clone,
{
    let users_len = |users: &[UserRow]| {
        varint_len(users.len() as u64)
            + users
                .iter()
                .map(|u| varint_len(u.user.0) + varint_len(u.channel.0))
                .sum::<usize>()
    };
    let (n_rows, rows_len) = rows.clone().fold((0usize, 0usize), |(n, len), r| {
        let row = varint_len(u64::from(r.server.0))
            + varint_len(u64::from(r.via.0))
            + varint_len(r.seq)
            + users_len(r.users);
        (n + 1, len + row)
    });
    let address_len = |a: Address| varint_len(u64::from(a.server.0)) + varint_len(a.user.0);
    let body = 1
        + varint_len(u64::from(id.origin.0))
        + varint_len(id.epoch)
        + varint_len(id.seq)
        + address_len(source)
        + address_len(target)
        + varint_len(n_rows as u64)
        + rows_len
        + varint_len(message_len as u64)
        + message_len;
    if body > max || body > u32::MAX as usize {
        return Err(WireError::Oversized { len: body, max });
    }
    out.reserve(HEADER_LEN + body - message_len);
    out.put_u8(VERSION);
    out.put_u32(body as u32);
    out.put_u8(FORWARD_VARIANT);
    put_varint(out, u64::from(id.origin.0));
    put_varint(out, id.epoch);
    put_varint(out, id.seq);
    for a in [source, target] {
        put_varint(out, u64::from(a.server.0));
        put_varint(out, a.user.0);
    }
    put_varint(out, n_rows as u64);
    for r in rows {
        put_varint(out, u64::from(r.server.0));
        put_varint(out, u64::from(r.via.0));
        put_varint(out, r.seq);
        put_varint(out, r.users.len() as u64);
        for u in r.users {
            put_varint(out, u.user.0);
            put_varint(out, u.channel.0);
        }
    }
    put_varint(out, message_len as u64);
    Ok(())
}

/// Bytes of postcard's varint of `v`.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// (head bytes, frame body length) of a 906 head, checked against `max`.
fn deliver_head_len(
    no: u64,
    id: MessageId,
    seq: u64,
    users: &[UserRow],
    message_len: usize,
    max: usize,
) -> Result<(usize, u32), WireError> {
    let head = HEADER_LEN
        + 1
        + varint_len(no)
        + varint_len(u64::from(id.origin.0))
        + varint_len(id.epoch)
        + varint_len(id.seq)
        + varint_len(seq)
        + varint_len(users.len() as u64)
        + users
            .iter()
            .map(|u| varint_len(u.user.0) + varint_len(u.channel.0))
            .sum::<usize>()
        + varint_len(message_len as u64);
    let len = head - HEADER_LEN + message_len;
    if len > max || len > u32::MAX as usize {
        return Err(WireError::Oversized { len, max });
    }
    Ok((head, len as u32))
}

/// Write a 906 head (postcard's varints, fields in declaration order) into
/// `out`, which has room for exactly [`deliver_head_len`] bytes or more.
fn write_deliver_head<B: BufMut>(
    out: &mut B,
    body_len: u32,
    no: u64,
    id: MessageId,
    seq: u64,
    users: &[UserRow],
    message_len: usize,
) {
    out.put_u8(VERSION);
    out.put_u32(body_len);
    out.put_u8(DELIVER_VARIANT);
    put_varint(out, no);
    put_varint(out, u64::from(id.origin.0));
    put_varint(out, id.epoch);
    put_varint(out, id.seq);
    put_varint(out, seq);
    put_varint(out, users.len() as u64);
    for u in users {
        put_varint(out, u.user.0);
        put_varint(out, u.channel.0);
    }
    put_varint(out, message_len as u64);
}

/// postcard's unsigned varint.
fn put_varint<B: BufMut>(out: &mut B, mut v: u64) {
    while v >= 0x80 {
        out.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Take one frame off the front of `buf`. `Ok(None)`: not complete yet (the
/// caller reads more). The length prefix is checked against `max` before the
/// body is waited for, so an oversized claim never allocates.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, WireError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != VERSION {
        return Err(WireError::UnsupportedVersion(buf[0]));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > max {
        return Err(WireError::Oversized { len, max });
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    // Decoded in place, then skipped: no split of the buffer (which would
    // make it a shared, reference-counted one) per frame.
    let body = &buf[HEADER_LEN..HEADER_LEN + len];
    let (frame, rest) = match fast::decode(body) {
        Some(done) => done,
        None => postcard::take_from_bytes::<Frame>(body)
            .map_err(|e| WireError::Malformed(e.to_string()))?,
    };
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes in frame body",
            rest.len()
        )));
    }
    buf.advance(HEADER_LEN + len);
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Message {
        Message {
            id: MessageId {
                origin: ServerId(1),
                epoch: 7,
                seq,
            },
            source: Address::new(ServerId(1), UserId(1001)),
            target: Address::RECEIVER,
            kind: 2,
            timing: Timing {
                sent_at_ms: 1_700_000_000_000,
                ordering_key: 42,
            },
            body: Bytes::from_static(b"hi"),
            nested: vec![],
        }
    }

    #[test]
    fn partial_input_waits_for_more() {
        let frame = Frame::Ack(Ack906 { upto: 300 });
        let bytes = encode_to_bytes(&frame, DEFAULT_MAX_FRAME).unwrap();
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(
                decode(&mut buf, DEFAULT_MAX_FRAME),
                Ok(None),
                "cut at {cut}"
            );
        }
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut buf, DEFAULT_MAX_FRAME), Ok(Some(frame)));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u8(VERSION);
        buf.put_u32(10_000_000);
        assert_eq!(
            decode(&mut buf, 1024),
            Err(WireError::Oversized {
                len: 10_000_000,
                max: 1024
            })
        );
        // Nothing was reserved for the claimed body.
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn encoder_refuses_oversized_and_leaves_buffer_intact() {
        let mut out = BytesMut::new();
        encode(&Frame::Ack(Ack906 { upto: 1 }), &mut out, 64).unwrap();
        let before = out.clone();
        let big = Frame::Heartbeat(Heartbeat { sent_at_ms: 0 });
        let mut m = msg(1);
        m.body = Bytes::from(vec![0u8; 100]);
        let fwd = Frame::Forward(Forward905 {
            id: m.id,
            source: m.source,
            target: Address::new(ServerId(100), UserId(0)),
            rows: vec![],
            message: m.encode(),
        });
        assert!(matches!(
            encode(&fwd, &mut out, 64),
            Err(WireError::Oversized { .. })
        ));
        assert_eq!(out, before);
        encode(&big, &mut out, 64).unwrap();
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut buf = BytesMut::from(&[2u8, 0, 0, 0, 0][..]);
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Err(WireError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn trailing_bytes_in_body_are_malformed() {
        let mut buf = BytesMut::new();
        buf.put_u8(VERSION);
        // Ack(upto = 1) is [5, 1]; claim 3 bytes with one extra.
        buf.put_u32(3);
        buf.put_slice(&[5, 1, 0]);
        assert!(matches!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn status_labels_match_variants() {
        for (i, (s, label)) in DeliveryStatus::ALL
            .iter()
            .zip(DeliveryStatus::LABELS)
            .enumerate()
        {
            assert_eq!(s.as_str(), label);
            assert_eq!(s.index(), i);
        }
        let t = DeliveryStatus::tally([
            DeliveryStatus::Refused,
            DeliveryStatus::Delivered,
            DeliveryStatus::Refused,
        ]);
        assert_eq!(t, [1, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn nested_messages_round_trip() {
        let mut inner = msg(2);
        inner.nested = vec![msg(3), msg(4)];
        let mut outer = msg(1);
        outer.nested = vec![inner, msg(5)];
        let bytes = outer.encode();
        assert_eq!(Message::decode(&bytes).unwrap(), outer);
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused_without_recursion_blowup() {
        let mut m = msg(0);
        for i in 1..=(MAX_NESTING as u64 + 1) {
            let mut outer = msg(i);
            outer.nested = vec![m];
            m = outer;
        }
        assert_eq!(Message::decode(&m.encode()), Err(WireError::TooDeep));
    }
}
