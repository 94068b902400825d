//! Wire codec tests, layer 1 of STYLE.md's "Tests in layers":
//!
//! - golden bytes for every frame kind and for a message with nested
//!   messages, so an accidental field or variant reorder fails CI (postcard
//!   is not self-describing);
//! - proptest round trips of arbitrary frames, frame sequences (whole,
//!   chunked, byte at a time) and messages;
//! - "no input panics the decoder": arbitrary and mutated bytes fed to
//!   `wire::decode` and `Message::decode`. This is the fuzz check CI runs;
//!   `iim/fuzz` holds the same target for cargo-fuzz.
//!
//! Golden comments read the hex left to right; postcard writes integers as
//! LEB128 varints (i64 zigzagged first), enum variants as their index in a
//! varint, and byte strings, strings and sequences as a varint length
//! followed by the items.

use bytes::{BufMut, Bytes, BytesMut};
use iim::types::{Address, ChannelId, MessageId, ServerId, UserId};
use iim::wire::{
    self, Ack906, Attached, DEFAULT_MAX_FRAME, Deliver906, DeliveryStatus, ErrorCode, ErrorFrame,
    Forward905, Frame, HEADER_LEN, Heartbeat, MAX_NESTING, Message, PeerHello, Register,
    Registered, Report, ReportEntry, ServerRow, Timing, UserRow, VERSION, WireError,
};
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses hex written with spaces between fields.
fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {s:?}"
    );
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Encodes `frame`, compares with `expected` (hex, spaces ignored), and
/// decodes `expected` back into `frame`.
fn assert_golden(frame: &Frame, expected: &str) {
    let bytes = wire::encode_to_bytes(frame, DEFAULT_MAX_FRAME).expect("encode");
    let want = unhex(expected);
    assert_eq!(
        hex(&bytes),
        hex(&want),
        "encoding of {} changed; if that is intended, the protocol version must change too",
        frame.kind()
    );
    let body_len = u32::from_be_bytes(want[1..HEADER_LEN].try_into().unwrap()) as usize;
    assert_eq!(body_len, want.len() - HEADER_LEN, "golden's length prefix");
    let mut buf = BytesMut::from(&want[..]);
    assert_eq!(
        wire::decode(&mut buf, DEFAULT_MAX_FRAME),
        Ok(Some(frame.clone()))
    );
    assert!(buf.is_empty());
}

/// Decodes frames off `buf` until it is incomplete or broken. Checks on the
/// way that nothing larger than `max` came out.
fn drain(buf: &mut BytesMut, max: usize) -> (Vec<Frame>, Option<WireError>) {
    let mut frames = Vec::new();
    loop {
        match wire::decode(buf, max) {
            Ok(Some(frame)) => {
                let len = wire::encode_to_bytes(&frame, usize::MAX).unwrap().len() - HEADER_LEN;
                assert!(len <= max, "decoded a {len}-byte frame with max {max}");
                frames.push(frame);
            }
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

// ---------------------------------------------------------------------------
// Golden bytes
// ---------------------------------------------------------------------------

const SENT_AT_MS: i64 = 1_700_000_000_000;
/// A channel id with an epoch (3) in its high bits.
const CHANNEL: ChannelId = ChannelId((3 << 32) | 1);

fn message_id(seq: u64) -> MessageId {
    MessageId {
        origin: ServerId(1),
        epoch: 7,
        seq,
    }
}

fn leaf(seq: u64, body: &'static [u8]) -> Message {
    Message {
        id: message_id(seq),
        source: Address::new(ServerId(1), UserId(1001)),
        target: Address::RECEIVER,
        kind: 2,
        timing: Timing {
            sent_at_ms: SENT_AT_MS,
            ordering_key: 42,
        },
        body: Bytes::from_static(body),
        nested: vec![],
    }
}

/// `leaf(4, b"")`, 18 bytes: id = origin 01, epoch 07, seq 04; source =
/// server 01, user e907 (1001); target = 00 00; kind 02; timing =
/// 80a0abfef962 (zigzag of 1_700_000_000_000), ordering key 2a (42);
/// body 00 (empty); nested 00 (none).
const LEAF_4: &str = "010704 01e907 0000 02 80a0abfef962 2a 00 00";

#[test]
fn golden_leaf_message() {
    let m = leaf(4, b"");
    assert_eq!(hex(&m.encode()), hex(&unhex(LEAF_4)));
    assert_eq!(Message::decode(&unhex(LEAF_4)), Ok(m));
}

#[test]
fn golden_message_with_nested_messages() {
    let mut inner = leaf(2, b"");
    inner.nested = vec![leaf(3, b"")];
    let mut outer = leaf(1, b"hi");
    outer.kind = 300;
    outer.nested = vec![inner, leaf(4, b"")];
    // outer: id 01 07 01; source 01 e907; target 0000; kind ac02 (u16 300 as
    // a varint); timing; body 02 6869 ("hi"); nested 02 (two), each a byte
    // string: 25 (37 bytes) = inner, 12 (18 bytes) = leaf 4.
    // inner: ... nested 01, then 12 (18 bytes) = leaf 3.
    let golden = format!(
        "010701 01e907 0000 ac02 80a0abfef962 2a 026869 02
         25 010702 01e907 0000 02 80a0abfef962 2a 00 01
            12 010703 01e907 0000 02 80a0abfef962 2a 00 00
         12 {LEAF_4}"
    );
    assert_eq!(hex(&outer.encode()), hex(&unhex(&golden)));
    assert_eq!(Message::decode(&unhex(&golden)), Ok(outer));
}

#[test]
fn golden_register() {
    // 01 = version, 00000006 = length, 00 = Frame::Register, 07 = server,
    // 03 = epoch, 808040 = max_frame 1 MiB.
    assert_golden(
        &Frame::Register(Register {
            server: ServerId(7),
            epoch: 3,
            max_frame: 1 << 20,
        }),
        "01 00000006 00 07 03 808040",
    );
}

#[test]
fn golden_registered() {
    // 01 = version, 0000000a = length, 01 = Frame::Registered, 64 = exchange
    // 100, ac02 = epoch 300, b0ea01 = lease 30000 ms, 808004 = max 65536.
    assert_golden(
        &Frame::Registered(Registered {
            exchange: ServerId(100),
            exchange_epoch: 300,
            lease_ms: 30_000,
            max_frame: 65_536,
        }),
        "01 0000000a 01 64 ac02 b0ea01 808004",
    );
}

#[test]
fn golden_heartbeat() {
    // 01 = version, 00000007 = length, 02 = Frame::Heartbeat,
    // 80a0abfef962 = zigzag(1_700_000_000_000) = 3_400_000_000_000.
    assert_golden(
        &Frame::Heartbeat(Heartbeat {
            sent_at_ms: SENT_AT_MS,
        }),
        "01 00000007 02 80a0abfef962",
    );
    // A negative i64 is zigzagged: -1 -> 01.
    assert_golden(
        &Frame::Heartbeat(Heartbeat { sent_at_ms: -1 }),
        "01 00000002 02 01",
    );
}

#[test]
fn golden_forward_905() {
    // 01 = version, 0000002d = length 45, 03 = Frame::Forward; id 01 07 ac02;
    // source 01 e907; target 64 00 (the exchange); rows 02 (two):
    // [server 02, via 64, seq 01, users 01: user d10f (2001), channel
    // 8180808030 (3 << 32 | 1)], [server 03, via 00, seq 02, users 00];
    // message 12 (18 bytes) = leaf 4.
    let frame = Frame::Forward(Forward905 {
        id: message_id(300),
        source: Address::new(ServerId(1), UserId(1001)),
        target: Address::new(ServerId(100), UserId::NONE),
        rows: vec![
            ServerRow {
                server: ServerId(2),
                via: ServerId(100),
                seq: 1,
                users: vec![UserRow {
                    user: UserId(2001),
                    channel: CHANNEL,
                }],
            },
            ServerRow {
                server: ServerId(3),
                via: ServerId::NONE,
                seq: 2,
                users: vec![],
            },
        ],
        message: leaf(4, b"").encode(),
    });
    assert_golden(
        &frame,
        &format!(
            "01 0000002d 03 0107ac02 01e907 6400
             02 02 64 01 01 d10f 8180808030
                03 00 02 00
             12 {LEAF_4}"
        ),
    );
}

#[test]
fn golden_deliver_906() {
    // 01 = version, 00000025 = length 37, 04 = Frame::Deliver; no 05;
    // id 01 07 ac02; seq 01; users 02: [d10f (2001), 8180808030],
    // [d20f (2002), 02]; message 12 (18 bytes) = leaf 4.
    let frame = Frame::Deliver(Deliver906 {
        no: 5,
        id: message_id(300),
        seq: 1,
        users: vec![
            UserRow {
                user: UserId(2001),
                channel: CHANNEL,
            },
            UserRow {
                user: UserId(2002),
                channel: ChannelId(2),
            },
        ],
        message: leaf(4, b"").encode(),
    });
    assert_golden(
        &frame,
        &format!(
            "01 00000025 04 05 0107ac02 01
             02 d10f 8180808030 d20f 02
             12 {LEAF_4}"
        ),
    );
}

#[test]
fn golden_ack_906() {
    // 01 = version, 00000003 = length, 05 = Frame::Ack, ac02 = upto 300.
    assert_golden(&Frame::Ack(Ack906 { upto: 300 }), "01 00000003 05 ac02");
}

#[test]
fn golden_report_with_every_delivery_status() {
    // 01 = version, 00000026 = length 38, 06 = Frame::Report, 06 = entries;
    // each entry: id 01 07 ac02, server, status = variant index 00..05 in
    // declaration order (Delivered, UnknownServer, ServerDown, TimedOut,
    // Overloaded, Refused).
    let entries = DeliveryStatus::ALL
        .iter()
        .zip(2..)
        .map(|(&status, server)| ReportEntry {
            id: message_id(300),
            server: ServerId(server),
            status,
        })
        .collect();
    assert_golden(
        &Frame::Report(Report { entries }),
        "01 00000026 06 06
         0107ac02 02 00
         0107ac02 03 01
         0107ac02 04 02
         0107ac02 05 03
         0107ac02 06 04
         0107ac02 07 05",
    );
    assert_eq!(
        DeliveryStatus::ALL.map(DeliveryStatus::as_str),
        [
            "delivered",
            "unknown_server",
            "server_down",
            "timed_out",
            "overloaded",
            "refused",
        ],
        "ALL is in declaration (wire) order"
    );
}

#[test]
fn golden_error() {
    // 01 = version, 00000006 = length, 07 = Frame::Error, 00 =
    // ErrorCode::Malformed, 03 626164 = detail "bad".
    assert_golden(
        &Frame::Error(ErrorFrame {
            code: ErrorCode::Malformed,
            detail: "bad".into(),
        }),
        "01 00000006 07 00 03626164",
    );
    // 05 = ErrorCode::StaleEpoch, 05 7374616c65 = "stale".
    assert_golden(
        &Frame::Error(ErrorFrame {
            code: ErrorCode::StaleEpoch,
            detail: "stale".into(),
        }),
        "01 00000008 07 05 057374616c65",
    );
    // 0a = ErrorCode::Internal, the last variant; 00 = empty detail.
    assert_golden(
        &Frame::Error(ErrorFrame {
            code: ErrorCode::Internal,
            detail: String::new(),
        }),
        "01 00000003 07 0a 00",
    );
}

#[test]
fn golden_every_error_code_is_its_close_code_minus_one() {
    // Close codes are 1..=11 in declaration order, so they pin the variant
    // index of every ErrorCode too.
    for close in 1..=11u8 {
        let code = ErrorCode::from_close_code(close.into()).expect("close code");
        assert_golden(
            &Frame::Error(ErrorFrame {
                code,
                detail: String::new(),
            }),
            &format!("01 00000003 07 {:02x} 00", close - 1),
        );
    }
    assert_eq!(ErrorCode::from_close_code(12), None);
}

#[test]
fn golden_frame_variant_indices_match_kinds() {
    // The first body byte of each golden is the Frame variant index; KINDS
    // lists the kinds in the same (declaration) order.
    let frames = [
        Frame::Register(Register {
            server: ServerId(7),
            epoch: 3,
            max_frame: 1 << 20,
        }),
        Frame::Registered(Registered {
            exchange: ServerId(100),
            exchange_epoch: 300,
            lease_ms: 30_000,
            max_frame: 65_536,
        }),
        Frame::Heartbeat(Heartbeat { sent_at_ms: -1 }),
        Frame::Forward(Forward905 {
            id: message_id(1),
            source: Address::RECEIVER,
            target: Address::RECEIVER,
            rows: vec![],
            message: Bytes::new(),
        }),
        Frame::Deliver(Deliver906 {
            no: 0,
            id: message_id(1),
            seq: 0,
            users: vec![],
            message: Bytes::new(),
        }),
        Frame::Ack(Ack906 { upto: 0 }),
        Frame::Report(Report { entries: vec![] }),
        Frame::Error(ErrorFrame {
            code: ErrorCode::Protocol,
            detail: String::new(),
        }),
        Frame::PeerHello(PeerHello {
            exchange: ServerId(101),
            epoch: 2,
            max_frame: 1 << 20,
        }),
        Frame::Attached(Attached {
            server: ServerId(7),
            epoch: 3,
            exchange: ServerId(101),
            attach_epoch: 9,
        }),
    ];
    for (index, frame) in frames.iter().enumerate() {
        let bytes = wire::encode_to_bytes(frame, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(bytes[0], VERSION);
        assert_eq!(usize::from(bytes[HEADER_LEN]), index, "{}", frame.kind());
        assert_eq!(frame.kind(), Frame::KINDS[index]);
    }
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Integers that hit every varint width, not only the widest.
fn varint_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        0..128u64,
        128..(1u64 << 21),
        any::<u64>(),
        Just(u64::MAX)
    ]
}

fn varint_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), 0..128u32, any::<u32>(), Just(u32::MAX)]
}

fn varint_i64() -> impl Strategy<Value = i64> {
    prop_oneof![-64..64i64, any::<i64>(), Just(i64::MIN), Just(i64::MAX)]
}

fn server_id() -> impl Strategy<Value = ServerId> {
    varint_u32().prop_map(ServerId)
}

fn user_id() -> impl Strategy<Value = UserId> {
    varint_u64().prop_map(UserId)
}

fn address() -> impl Strategy<Value = Address> {
    (server_id(), user_id()).prop_map(|(server, user)| Address { server, user })
}

fn message_ids() -> impl Strategy<Value = MessageId> {
    (server_id(), varint_u64(), varint_u64()).prop_map(|(origin, epoch, seq)| MessageId {
        origin,
        epoch,
        seq,
    })
}

fn bytes_up_to(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn user_row() -> impl Strategy<Value = UserRow> {
    (user_id(), varint_u64().prop_map(ChannelId))
        .prop_map(|(user, channel)| UserRow { user, channel })
}

fn server_row() -> impl Strategy<Value = ServerRow> {
    (
        server_id(),
        server_id(),
        varint_u64(),
        vec(user_row(), 0..5),
    )
        .prop_map(|(server, via, seq, users)| ServerRow {
            server,
            via,
            seq,
            users,
        })
}

/// Messages nested up to 3 levels deep, up to 4 children per level.
fn message() -> impl Strategy<Value = Message> {
    let leaf = (
        message_ids(),
        address(),
        address(),
        any::<u16>(),
        varint_i64(),
        varint_u64(),
        bytes_up_to(300),
    )
        .prop_map(
            |(id, source, target, kind, sent_at_ms, ordering_key, body)| Message {
                id,
                source,
                target,
                kind,
                timing: Timing {
                    sent_at_ms,
                    ordering_key,
                },
                body,
                nested: vec![],
            },
        );
    leaf.prop_recursive(3, 24, 4, |inner| {
        (inner.clone(), vec(inner, 0..4)).prop_map(|(mut m, nested)| {
            m.nested = nested;
            m
        })
    })
}

/// What a 905/906 carries: usually a real message, sometimes opaque bytes
/// (the relay never decodes it).
fn report_entry() -> impl Strategy<Value = ReportEntry> {
    (message_ids(), server_id(), delivery_status()).prop_map(|(id, server, status)| ReportEntry {
        id,
        server,
        status,
    })
}

fn carried_message() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        3 => message().prop_map(|m| m.encode()),
        1 => bytes_up_to(64),
    ]
}

fn delivery_status() -> impl Strategy<Value = DeliveryStatus> {
    prop::sample::select(DeliveryStatus::ALL.to_vec())
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (1..=11u64).prop_map(|c| ErrorCode::from_close_code(c).unwrap())
}

fn frame() -> impl Strategy<Value = Frame> {
    let register =
        (server_id(), varint_u64(), varint_u32()).prop_map(|(server, epoch, max_frame)| {
            Frame::Register(Register {
                server,
                epoch,
                max_frame,
            })
        });
    let registered = (server_id(), varint_u64(), varint_u32(), varint_u32()).prop_map(
        |(exchange, exchange_epoch, lease_ms, max_frame)| {
            Frame::Registered(Registered {
                exchange,
                exchange_epoch,
                lease_ms,
                max_frame,
            })
        },
    );
    let heartbeat = varint_i64().prop_map(|sent_at_ms| Frame::Heartbeat(Heartbeat { sent_at_ms }));
    let forward = (
        message_ids(),
        address(),
        address(),
        vec(server_row(), 0..5),
        carried_message(),
    )
        .prop_map(|(id, source, target, rows, message)| {
            Frame::Forward(Forward905 {
                id,
                source,
                target,
                rows,
                message,
            })
        });
    let deliver = (
        varint_u64(),
        message_ids(),
        varint_u64(),
        vec(user_row(), 0..6),
        carried_message(),
    )
        .prop_map(|(no, id, seq, users, message)| {
            Frame::Deliver(Deliver906 {
                no,
                id,
                seq,
                users,
                message,
            })
        });
    let ack = varint_u64().prop_map(|upto| Frame::Ack(Ack906 { upto }));
    let report = vec(report_entry(), 0..8).prop_map(|entries| Frame::Report(Report { entries }));
    let error = (error_code(), "\\PC{0,40}")
        .prop_map(|(code, detail)| Frame::Error(ErrorFrame { code, detail }));
    let hello =
        (server_id(), varint_u64(), any::<u32>()).prop_map(|(exchange, epoch, max_frame)| {
            Frame::PeerHello(PeerHello {
                exchange,
                epoch,
                max_frame,
            })
        });
    let attached = (server_id(), varint_u64(), server_id(), varint_u64()).prop_map(
        |(server, epoch, exchange, attach_epoch)| {
            Frame::Attached(Attached {
                server,
                epoch,
                exchange,
                attach_epoch,
            })
        },
    );
    prop_oneof![
        register, registered, heartbeat, forward, deliver, ack, report, error, hello, attached
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Insert { at: usize, byte: u8 },
    Delete { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Positions are taken modulo the length when applied.
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        match *m {
            Mutation::Flip { at, mask } if !bytes.is_empty() => {
                let at = at % bytes.len();
                bytes[at] ^= mask;
            }
            Mutation::Insert { at, byte } => bytes.insert(at % (bytes.len() + 1), byte),
            Mutation::Delete { at } if !bytes.is_empty() => {
                bytes.remove(at % bytes.len());
            }
            _ => {}
        }
    }
}

/// A header claiming a plausible body length, followed by a body whose first
/// byte is usually a valid Frame variant: gets arbitrary bytes past the
/// version and length checks into the postcard decoder.
fn framed_garbage() -> impl Strategy<Value = Vec<u8>> {
    (
        0..10u8,
        vec(any::<u8>(), 0..2048),
        prop::option::of(0..4096u32),
    )
        .prop_map(|(variant, tail, claimed)| {
            let mut out = vec![VERSION];
            let len = claimed.unwrap_or(tail.len() as u32 + 1);
            out.put_u32(len);
            out.push(variant);
            out.extend_from_slice(&tail);
            out
        })
}

// ---------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frame_round_trips(frame in frame()) {
        let bytes = wire::encode_to_bytes(&frame, usize::MAX).unwrap();
        prop_assert_eq!(bytes[0], VERSION);
        let body_len = u32::from_be_bytes(bytes[1..HEADER_LEN].try_into().unwrap()) as usize;
        prop_assert_eq!(body_len, bytes.len() - HEADER_LEN);
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(wire::decode(&mut buf, body_len), Ok(Some(frame.clone())));
        prop_assert!(buf.is_empty());
        // One byte less than the frame needs is refused up front.
        if body_len > 0 {
            let mut buf = BytesMut::from(&bytes[..]);
            prop_assert_eq!(
                wire::decode(&mut buf, body_len - 1),
                Err(WireError::Oversized { len: body_len, max: body_len - 1 })
            );
            prop_assert_eq!(
                wire::encode_to_bytes(&frame, body_len - 1),
                Err(WireError::Oversized { len: body_len, max: body_len - 1 })
            );
        }
    }

    #[test]
    fn frame_sequences_round_trip(
        frames in vec(frame(), 1..6),
        chunk_sizes in vec(1..64usize, 1..16),
    ) {
        let mut all = BytesMut::new();
        for frame in &frames {
            wire::encode(frame, &mut all, DEFAULT_MAX_FRAME).unwrap();
        }
        let all = all.freeze();

        // All at once.
        let mut buf = BytesMut::from(&all[..]);
        prop_assert_eq!(drain(&mut buf, DEFAULT_MAX_FRAME), (frames.clone(), None));
        prop_assert!(buf.is_empty());

        // Byte at a time, draining after every byte.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in all.iter() {
            buf.put_u8(byte);
            let (decoded, err) = drain(&mut buf, DEFAULT_MAX_FRAME);
            prop_assert_eq!(err, None);
            got.extend(decoded);
        }
        prop_assert_eq!(&got, &frames);
        prop_assert!(buf.is_empty());

        // In chunks of assorted sizes.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &all[..];
        for &size in chunk_sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            rest = tail;
            buf.extend_from_slice(chunk);
            let (decoded, err) = drain(&mut buf, DEFAULT_MAX_FRAME);
            prop_assert_eq!(err, None);
            got.extend(decoded);
        }
        prop_assert_eq!(&got, &frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn message_round_trips(m in message()) {
        let bytes = m.encode();
        prop_assert_eq!(Message::decode_shared(&bytes), Ok(m.clone()));
        prop_assert_eq!(Message::decode_owned(bytes.clone()), Ok(m.clone()));
        // Taking the bytes, the body is a view of them, not a copy.
        let owned = Message::decode_owned(bytes.clone()).unwrap();
        let within = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
        prop_assert!(owned.body.is_empty() || within.contains(&(owned.body.as_ptr() as usize)));
        prop_assert_eq!(Message::decode(&bytes), Ok(m));
    }

    #[test]
    fn a_905_encoded_in_one_pass_is_the_generic_frame(
        id in message_ids(),
        source in address(),
        target in address(),
        rows in vec(server_row(), 0..6),
        message in message(),
    ) {
        let whole = wire::encode_to_bytes(
            &Frame::Forward(Forward905 { id, source, target, rows: rows.clone(), message: message.encode() }),
            usize::MAX,
        ).unwrap();
        let one_pass = wire::encode_forward(id, source, target, &rows, &message, usize::MAX).unwrap();
        prop_assert_eq!(hex(&one_pass), hex(&whole));
        let body_len = whole.len() - HEADER_LEN;
        prop_assert_eq!(
            wire::encode_forward(id, source, target, &rows, &message, body_len - 1),
            Err(WireError::Oversized { len: body_len, max: body_len - 1 })
        );
    }

    #[test]
    fn an_ack_written_by_hand_is_the_generic_frame(upto in varint_u64()) {
        let whole = wire::encode_to_bytes(&Frame::Ack(Ack906 { upto }), usize::MAX).unwrap();
        let mut buf = [0u8; wire::ACK_FRAME_MAX];
        let len = wire::write_ack(&mut buf, upto);
        prop_assert_eq!(hex(&buf[..len]), hex(&whole));
    }

    #[test]
    fn a_report_written_by_hand_is_the_generic_frame(entries in vec(report_entry(), 0..40)) {
        let whole = wire::encode_to_bytes(
            &Frame::Report(Report { entries: entries.clone() }),
            usize::MAX,
        ).unwrap();
        prop_assert_eq!(hex(&wire::encode_report(&entries, usize::MAX).unwrap()), hex(&whole));
        let body_len = whole.len() - HEADER_LEN;
        prop_assert_eq!(
            wire::encode_report(&entries, body_len - 1),
            Err(WireError::Oversized { len: body_len, max: body_len - 1 })
        );
    }

    #[test]
    fn a_relayed_905_head_and_its_message_are_the_whole_frame(
        id in message_ids(),
        source in address(),
        target in address(),
        rows in vec(server_row(), 0..6),
        message in carried_message(),
    ) {
        let whole = wire::encode_to_bytes(
            &Frame::Forward(Forward905 { id, source, target, rows: rows.clone(), message: message.clone() }),
            usize::MAX,
        ).unwrap();
        let refs = rows.iter().map(|r| wire::RowRef { server: r.server, via: r.via, seq: r.seq, users: &r.users });
        let mut head = BytesMut::from(&b"before"[..]);
        wire::write_forward_head(&mut head, id, source, target, refs.clone(), message.len(), usize::MAX).unwrap();
        prop_assert_eq!(hex(&[&head[6..], &message[..]].concat()), hex(&whole));
        // The same limit as for the whole frame, and nothing written then.
        let body_len = whole.len() - HEADER_LEN;
        let mut out = BytesMut::from(&b"before"[..]);
        prop_assert_eq!(
            wire::write_forward_head(&mut out, id, source, target, refs, message.len(), body_len - 1),
            Err(WireError::Oversized { len: body_len, max: body_len - 1 })
        );
        prop_assert_eq!(&out[..], &b"before"[..]);
    }

    #[test]
    fn a_906_head_and_its_shared_message_are_the_whole_frame(
        no in any::<u64>(),
        id in message_ids(),
        seq in any::<u64>(),
        users in vec(user_row(), 0..8),
        message in carried_message(),
    ) {
        let whole = wire::encode_to_bytes(
            &Frame::Deliver(Deliver906 { no, id, seq, users: users.clone(), message: message.clone() }),
            usize::MAX,
        ).unwrap();
        let head = wire::Head906::new(no, id, seq, &users, message.len(), usize::MAX).unwrap();
        prop_assert_eq!(hex(&[head.as_slice(), &message[..]].concat()), hex(&whole));
        // Inline while short, on the heap beyond.
        prop_assert_eq!(
            matches!(head, wire::Head906::Inline { .. }),
            head.len() <= wire::HEAD_INLINE
        );
        // The same limit applies to the parts as to the whole.
        let body_len = whole.len() - HEADER_LEN;
        prop_assert_eq!(
            wire::Head906::new(no, id, seq, &users, message.len(), body_len - 1).err(),
            Some(WireError::Oversized { len: body_len, max: body_len - 1 })
        );
    }
}

// ---------------------------------------------------------------------------
// No input panics the decoder
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(bytes in vec(any::<u8>(), 0..4096)) {
        for max in [1024, 1 << 20] {
            drain(&mut BytesMut::from(&bytes[..]), max);
        }
    }

    #[test]
    fn framed_garbage_never_panics_the_frame_decoder(bytes in framed_garbage()) {
        for max in [1024, 1 << 20] {
            drain(&mut BytesMut::from(&bytes[..]), max);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_message_decoder(bytes in vec(any::<u8>(), 0..4096)) {
        let copied = Message::decode(&bytes);
        prop_assert_eq!(Message::decode_shared(&Bytes::from(bytes.clone())), Message::decode(&bytes));
        prop_assert_eq!(Message::decode_owned(Bytes::from(bytes)), copied);
    }

    /// The hand-written message reader against postcard's derived decoder
    /// on noise: the same message, or the same error.
    #[test]
    fn noise_decodes_as_postcard_decodes_a_message(bytes in vec(any::<u8>(), 0..128)) {
        prop_assert_eq!(Message::decode(&bytes), wire::decode_message_with_postcard(&bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// The hand-written message writer is byte for byte postcard's
    /// serialiser, nested messages and extreme varints included.
    #[test]
    fn a_message_written_by_hand_is_what_postcard_writes(m in message()) {
        prop_assert_eq!(hex(&m.encode()), hex(&m.encode_with_postcard()));
    }

    /// The hand-written message reader takes what postcard takes and
    /// builds the same message; what it refuses, postcard refuses with the
    /// same error (valid messages, then the same damaged).
    #[test]
    fn a_damaged_message_decodes_as_postcard_decodes_it(
        m in message(),
        mutations in vec(mutation(), 0..4),
    ) {
        let mut bytes = m.encode_with_postcard().to_vec();
        if mutations.is_empty() {
            prop_assert_eq!(Message::decode(&bytes), Ok(m));
        }
        mutate(&mut bytes, &mutations);
        let postcard = wire::decode_message_with_postcard(&bytes);
        prop_assert_eq!(Message::decode(&bytes), postcard.clone());
        prop_assert_eq!(Message::decode_owned(Bytes::from(bytes)), postcard);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn mutated_frames_never_panic_the_decoder(
        frames in vec(frame(), 1..4),
        mutations in vec(mutation(), 1..8),
    ) {
        let mut bytes = BytesMut::new();
        for frame in &frames {
            wire::encode(frame, &mut bytes, DEFAULT_MAX_FRAME).unwrap();
        }
        let mut bytes = bytes.to_vec();
        mutate(&mut bytes, &mutations);
        for max in [1024, 1 << 20] {
            drain(&mut BytesMut::from(&bytes[..]), max);
        }
    }

    #[test]
    fn mutated_messages_never_panic_the_decoder(
        m in message(),
        mutations in vec(mutation(), 1..8),
    ) {
        let mut bytes = m.encode().to_vec();
        mutate(&mut bytes, &mutations);
        if let Ok(decoded) = Message::decode(&bytes) {
            // Whatever decodes re-encodes and decodes to itself.
            prop_assert_eq!(Message::decode(&decoded.encode()), Ok(decoded));
        }
    }
}

// ---------------------------------------------------------------------------
// Nesting
// ---------------------------------------------------------------------------

fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The postcard encoding of `levels` messages each nesting the next, built
/// directly as bytes (innermost first, in reverse) without the recursive
/// encoder. Every level is `leaf(0, b"")` with one nested message.
fn nested_chain_bytes(levels: usize) -> Vec<u8> {
    let leaf = leaf(0, b"").encode();
    // A leaf ends in 00: no nested messages. Every outer level replaces that
    // with 01 (one nested message) and the inner message as a byte string.
    let (&last, prefix) = leaf.split_last().unwrap();
    assert_eq!(last, 0);
    let mut reversed: Vec<u8> = leaf.iter().rev().copied().collect();
    let mut len_prefix = Vec::new();
    for _ in 1..levels {
        len_prefix.clear();
        varint(reversed.len(), &mut len_prefix);
        reversed.extend(len_prefix.iter().rev());
        reversed.push(1);
        reversed.extend(prefix.iter().rev());
    }
    reversed.reverse();
    reversed
}

fn nested_chain(levels: usize) -> Message {
    let mut m = leaf(0, b"");
    for _ in 1..levels {
        let mut outer = leaf(0, b"");
        outer.nested = vec![m];
        m = outer;
    }
    m
}

#[test]
fn hand_built_chain_matches_the_encoder() {
    for levels in [1, 2, 3, 20] {
        assert_eq!(
            nested_chain_bytes(levels),
            nested_chain(levels).encode().to_vec(),
            "{levels} levels"
        );
    }
}

#[test]
fn nesting_up_to_the_limit_is_accepted() {
    // The top message is depth 0, so MAX_NESTING + 1 messages in a chain.
    let bytes = nested_chain_bytes(MAX_NESTING + 1);
    assert_eq!(Message::decode(&bytes), Ok(nested_chain(MAX_NESTING + 1)));
    assert_eq!(
        Message::decode(&nested_chain_bytes(MAX_NESTING + 2)),
        Err(WireError::TooDeep)
    );
}

#[test]
fn very_deep_nesting_is_refused_without_exhausting_the_stack() {
    let bytes = nested_chain_bytes(10_000);
    // A small stack: a decoder that recursed per level would overflow it.
    let result = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || Message::decode(&bytes))
        .unwrap()
        .join()
        .expect("decoder thread panicked");
    assert!(
        matches!(
            result,
            Err(WireError::TooDeep | WireError::MalformedMessage(_))
        ),
        "{result:?}"
    );

    // The same bytes inside a 905 travel as opaque bytes.
    let frame = Frame::Forward(Forward905 {
        id: message_id(1),
        source: Address::new(ServerId(1), UserId(1001)),
        target: Address::new(ServerId(100), UserId::NONE),
        rows: vec![],
        message: Bytes::from(nested_chain_bytes(10_000)),
    });
    let mut buf = BytesMut::new();
    wire::encode(&frame, &mut buf, DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(wire::decode(&mut buf, DEFAULT_MAX_FRAME), Ok(Some(frame)));
}
