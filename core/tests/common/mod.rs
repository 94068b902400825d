//! What the core tests share.

use bytes::{Bytes, BytesMut};
use iim_core::origin::Origin;
use iim_proto::types::{Address, ChannelId, MessageId, ServerId, UserId};
use iim_proto::wire::{self, DEFAULT_MAX_FRAME, Frame, Message, Timing, UserRow};

/// One 905 from `origin`, addressed to `exchange`, to one user on each of
/// `targets`: its id and the frame as an exchange decodes it.
pub fn forward(origin: &mut Origin, exchange: ServerId, targets: &[u32]) -> (MessageId, Frame) {
    let mut msg = Message {
        id: origin.next_id(),
        source: Address::new(origin.server(), UserId(1)),
        target: Address::RECEIVER,
        kind: 9,
        timing: Timing::default(),
        body: Bytes::from_static(b"hello"),
        nested: vec![],
    };
    let rows = targets.iter().map(|t| {
        (
            ServerId(*t),
            UserRow {
                user: UserId(u64::from(*t) * 10),
                channel: ChannelId(1),
            },
        )
    });
    let fwd = origin
        .forward(&mut msg, rows, exchange, DEFAULT_MAX_FRAME)
        .unwrap();
    let mut buf = BytesMut::from(&fwd.frame[..]);
    (
        fwd.id,
        wire::decode(&mut buf, DEFAULT_MAX_FRAME).unwrap().unwrap(),
    )
}
