//! Where a 905 begins: message ids and per-target sequence numbers of one
//! app server incarnation, and the one 905 that carries a message to every
//! remote server of a user list.
//!
//! [`Origin`] numbers every message this incarnation sends (the message
//! id's sequence) and, per target server, every 905 row naming it (the
//! *(origin, target)* sequence the target's duplicate filter checks).
//! Whoever calls [`Origin::forward`] must hand the 905 to the link in the
//! order the numbers were given (`iim::Iim::submit` does both under one
//! lock). No IO, no clock: the message's timing is filled in by the caller.

use bytes::Bytes;
use iim_proto::types::{Address, MessageId, ServerId, UserId};
use iim_proto::wire::{self, Message, ServerRow, UserRow, WireError};
use std::collections::BTreeMap;

/// One 905, encoded, with the servers it names (in row order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub id: MessageId,
    pub frame: Bytes,
    pub targets: Vec<ServerId>,
}

/// The numbering of one app server incarnation.
#[derive(Debug)]
pub struct Origin {
    server: ServerId,
    epoch: u64,
    next_seq: u64,
    /// Last sequence per target server (ordered: no hashing on the send
    /// path).
    next_pair: BTreeMap<ServerId, u64>,
}

impl Origin {
    pub fn new(server: ServerId, epoch: u64) -> Origin {
        Origin {
            server,
            epoch,
            next_seq: 1,
            next_pair: BTreeMap::new(),
        }
    }

    pub fn server(&self) -> ServerId {
        self.server
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The id of the next message (local recipients only, or before
    /// [`Origin::forward`] for the remote ones).
    pub fn next_id(&mut self) -> MessageId {
        let seq = self.next_seq;
        self.next_seq += 1;
        MessageId {
            origin: self.server,
            epoch: self.epoch,
            seq,
        }
    }

    /// Give `message` its id and build the one 905 for `remote` — rows of
    /// other servers' users, grouped by server (the caller sorts them by
    /// server; each server's users keep their order) — addressed to
    /// `exchange`, each row routed `via` it. A 905 whose encoding exceeds
    /// `max_frame` is refused (its numbers are spent: targets allow gaps).
    pub fn forward(
        &mut self,
        message: &mut Message,
        remote: impl IntoIterator<Item = (ServerId, UserRow)>,
        exchange: ServerId,
        max_frame: usize,
    ) -> Result<Forward, WireError> {
        message.id = self.next_id();
        let mut rows: Vec<ServerRow> = Vec::new();
        for (server, user) in remote {
            match rows.last_mut() {
                Some(r) if r.server == server => r.users.push(user),
                _ => {
                    let seq = self.next_pair.entry(server).or_insert(0);
                    *seq += 1;
                    rows.push(ServerRow {
                        server,
                        via: exchange,
                        seq: *seq,
                        users: vec![user],
                    });
                }
            }
        }
        let targets: Vec<ServerId> = rows.iter().map(|r| r.server).collect();
        let frame = wire::encode_forward(
            message.id,
            message.source,
            Address::new(exchange, UserId::NONE),
            &rows,
            message,
            max_frame,
        )?;
        Ok(Forward {
            id: message.id,
            frame,
            targets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iim_proto::types::ChannelId;
    use iim_proto::wire::{DEFAULT_MAX_FRAME, Frame, Timing};

    fn msg() -> Message {
        Message {
            id: MessageId {
                origin: ServerId(1),
                epoch: 0,
                seq: 0,
            },
            source: Address::new(ServerId(1), UserId(7)),
            target: Address::RECEIVER,
            kind: 9,
            timing: Timing::default(),
            body: Bytes::from_static(b"hi"),
            nested: vec![],
        }
    }

    fn row(user: u64) -> UserRow {
        UserRow {
            user: UserId(user),
            channel: ChannelId(user),
        }
    }

    #[test]
    fn one_905_numbers_each_target_pair_and_the_message() {
        let mut o = Origin::new(ServerId(1), 4);
        let local = o.next_id();
        assert_eq!((local.epoch, local.seq), (4, 1));
        let mut m = msg();
        let remote = vec![
            (ServerId(2), row(20)),
            (ServerId(2), row(21)),
            (ServerId(3), row(30)),
        ];
        let f = o
            .forward(&mut m, remote, ServerId(100), DEFAULT_MAX_FRAME)
            .unwrap();
        assert_eq!(f.id.seq, 2);
        assert_eq!(m.id, f.id);
        assert_eq!(f.targets, vec![ServerId(2), ServerId(3)]);
        let mut buf = bytes::BytesMut::from(&f.frame[..]);
        let Some(Frame::Forward(fwd)) = wire::decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() else {
            panic!("not a 905");
        };
        assert_eq!(fwd.rows.len(), 2);
        assert_eq!(fwd.rows[0].users.len(), 2);
        assert_eq!((fwd.rows[0].seq, fwd.rows[1].seq), (1, 1));
        assert_eq!(fwd.target, Address::new(ServerId(100), UserId::NONE));
        // The next 905 to server 3 only: its pair sequence moves, 2's not.
        let f2 = o
            .forward(
                &mut msg(),
                vec![(ServerId(3), row(30))],
                ServerId(100),
                DEFAULT_MAX_FRAME,
            )
            .unwrap();
        let mut buf = bytes::BytesMut::from(&f2.frame[..]);
        let Some(Frame::Forward(fwd)) = wire::decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() else {
            panic!("not a 905");
        };
        assert_eq!(fwd.rows[0].seq, 2);
        assert_eq!(f2.id.seq, 3);
    }

    #[test]
    fn too_large_is_refused() {
        let mut o = Origin::new(ServerId(1), 1);
        let mut m = msg();
        m.body = Bytes::from(vec![0u8; 5_000]);
        let e = o
            .forward(&mut m, vec![(ServerId(2), row(1))], ServerId(100), 1_024)
            .unwrap_err();
        assert!(matches!(e, WireError::Oversized { .. }));
    }
}
