//! Sans-IO 905 handling: check a forward request against the link it came
//! from, then split it into one 906 per target server. No IO, no clock.
//!
//! The message bytes are shared (`Bytes` clones) by every 906 of one 905;
//! each 906 carries only its own server row's users.

use iim_proto::types::{Address, ServerId, UserId};
use iim_proto::wire::{Deliver906, Forward905};
use std::collections::HashSet;

/// Bounds on one 905 beyond the frame size limit.
#[derive(Clone, Copy, Debug)]
pub struct SplitLimits {
    pub max_rows: usize,
    pub max_users_per_row: usize,
}

impl Default for SplitLimits {
    fn default() -> Self {
        SplitLimits {
            max_rows: 4096,
            max_users_per_row: 65_536,
        }
    }
}

/// Up to this many rows, duplicates are found without a set.
const SMALL_ROWS: usize = 16;

/// Why a 905 is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// The 905 claims a source other than the certified link's server.
    #[error("905 source {claimed} does not match the link's server {link}")]
    ForgedSource { claimed: ServerId, link: ServerId },
    /// The message id names an incarnation other than the registered one.
    #[error("905 message epoch {claimed} is not the link's registered epoch {registered}")]
    ForgedEpoch { claimed: u64, registered: u64 },
    #[error("905 is addressed to {0}, not to this exchange")]
    WrongTarget(Address),
    #[error("malformed 905: {0}")]
    Malformed(&'static str),
}

impl Reject {
    /// A forgery closes the link; anything else is refused message by
    /// message (reported `refused` to the origin), so one bad 905 cannot make
    /// a link flap through retransmissions.
    pub fn is_forgery(&self) -> bool {
        matches!(
            self,
            Reject::ForgedSource { .. } | Reject::ForgedEpoch { .. }
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Reject::ForgedSource { .. } | Reject::ForgedEpoch { .. } => "forged_source",
            Reject::WrongTarget(_) => "wrong_target",
            Reject::Malformed(_) => "malformed_905",
        }
    }
}

/// Check a 905 from the link of `link_server` (registered with
/// `link_epoch`) arriving at `exchange`.
pub fn validate(
    fwd: &Forward905,
    link_server: ServerId,
    link_epoch: u64,
    exchange: ServerId,
    limits: &SplitLimits,
) -> Result<(), Reject> {
    if fwd.source.server != link_server {
        return Err(Reject::ForgedSource {
            claimed: fwd.source.server,
            link: link_server,
        });
    }
    if fwd.id.origin != link_server {
        return Err(Reject::ForgedSource {
            claimed: fwd.id.origin,
            link: link_server,
        });
    }
    if fwd.id.epoch != link_epoch {
        return Err(Reject::ForgedEpoch {
            claimed: fwd.id.epoch,
            registered: link_epoch,
        });
    }
    if fwd.target != Address::new(exchange, UserId::NONE) {
        return Err(Reject::WrongTarget(fwd.target));
    }
    if fwd.rows.is_empty() {
        return Err(Reject::Malformed("no server rows"));
    }
    if fwd.rows.len() > limits.max_rows {
        return Err(Reject::Malformed("too many server rows"));
    }
    // Duplicates: a linear scan for the usual handful of rows (no
    // allocation per 905), a set beyond that.
    let mut seen = (fwd.rows.len() > SMALL_ROWS).then(|| HashSet::with_capacity(fwd.rows.len()));
    for (i, row) in fwd.rows.iter().enumerate() {
        if row.server == link_server {
            return Err(Reject::Malformed("origin listed as a target"));
        }
        if row.server == ServerId::NONE || row.server == exchange {
            return Err(Reject::Malformed("target is not an app server"));
        }
        if row.users.is_empty() {
            return Err(Reject::Malformed("server row without users"));
        }
        if row.users.len() > limits.max_users_per_row {
            return Err(Reject::Malformed("too many users in a server row"));
        }
        let twice = match seen.as_mut() {
            Some(seen) => !seen.insert(row.server),
            None => fwd.rows[..i].iter().any(|r| r.server == row.server),
        };
        if twice {
            return Err(Reject::Malformed("server listed twice"));
        }
    }
    Ok(())
}

/// Check a 905 relayed by a peer exchange to `exchange`: addressed to it,
/// its source the origin the id names, and rows it can deliver.
pub fn validate_relay(
    fwd: &Forward905,
    exchange: ServerId,
    limits: &SplitLimits,
) -> Result<(), Reject> {
    if fwd.source.server != fwd.id.origin {
        return Err(Reject::Malformed(
            "relay source is not the message's origin",
        ));
    }
    if fwd.target != Address::new(exchange, UserId::NONE) {
        return Err(Reject::WrongTarget(fwd.target));
    }
    if fwd.rows.is_empty() || fwd.rows.len() > limits.max_rows {
        return Err(Reject::Malformed("relay rows"));
    }
    for (i, row) in fwd.rows.iter().enumerate() {
        if row.server == fwd.id.origin || row.server == ServerId::NONE || row.server == exchange {
            return Err(Reject::Malformed("relay target is not an app server"));
        }
        if row.users.is_empty() || row.users.len() > limits.max_users_per_row {
            return Err(Reject::Malformed("relay row users"));
        }
        if fwd.rows[..i].iter().any(|r| r.server == row.server) {
            return Err(Reject::Malformed("server listed twice"));
        }
    }
    Ok(())
}

/// Split a validated 905 into its 906s, in row order. Delivery numbers are
/// assigned later by each target's queue (`no` is 0 here).
pub fn split(fwd: Forward905) -> impl Iterator<Item = (ServerId, Deliver906)> {
    let Forward905 {
        id, rows, message, ..
    } = fwd;
    rows.into_iter().map(move |row| {
        (
            row.server,
            Deliver906 {
                no: 0,
                id,
                seq: row.seq,
                users: row.users,
                message: message.clone(),
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use iim_proto::types::{ChannelId, MessageId};
    use iim_proto::wire::{ServerRow, UserRow};

    const EX: ServerId = ServerId(100);

    fn row(server: u32, users: &[u64]) -> ServerRow {
        ServerRow {
            server: ServerId(server),
            via: EX,
            seq: 9,
            users: users
                .iter()
                .map(|u| UserRow {
                    user: UserId(*u),
                    channel: ChannelId(*u * 10),
                })
                .collect(),
        }
    }

    fn fwd(origin: u32, rows: Vec<ServerRow>) -> Forward905 {
        Forward905 {
            id: MessageId {
                origin: ServerId(origin),
                epoch: 1,
                seq: 5,
            },
            source: Address::new(ServerId(origin), UserId(1)),
            target: Address::new(EX, UserId::NONE),
            rows,
            message: Bytes::from_static(b"original"),
        }
    }

    #[test]
    fn one_906_per_row_sharing_the_message_bytes() {
        let f = fwd(1, vec![row(2, &[20, 21]), row(3, &[30])]);
        validate(&f, ServerId(1), 1, EX, &SplitLimits::default()).unwrap();
        let msg_ptr = f.message.as_ptr();
        let out: Vec<_> = split(f).collect();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, ServerId(2));
        assert_eq!(out[0].1.users.len(), 2);
        assert_eq!(out[1].0, ServerId(3));
        assert_eq!(out[1].1.users[0].channel, ChannelId(300));
        for (_, d) in &out {
            assert_eq!(d.message.as_ptr(), msg_ptr, "message bytes are shared");
            assert_eq!(d.seq, 9);
            assert_eq!(d.id.seq, 5);
        }
    }

    #[test]
    fn forged_source_and_forged_id_are_refused() {
        let f = fwd(2, vec![row(3, &[1])]);
        assert_eq!(
            validate(&f, ServerId(1), 1, EX, &SplitLimits::default()),
            Err(Reject::ForgedSource {
                claimed: ServerId(2),
                link: ServerId(1)
            })
        );
        let mut f = fwd(1, vec![row(3, &[1])]);
        f.id.epoch = 2;
        assert!(matches!(
            validate(&f, ServerId(1), 1, EX, &SplitLimits::default()),
            Err(Reject::ForgedEpoch {
                claimed: 2,
                registered: 1
            })
        ));
        let mut f = fwd(1, vec![row(3, &[1])]);
        f.id.origin = ServerId(4);
        assert!(matches!(
            validate(&f, ServerId(1), 1, EX, &SplitLimits::default()),
            Err(Reject::ForgedSource { .. })
        ));
    }

    #[test]
    fn structural_problems_are_refused() {
        let lim = SplitLimits {
            max_rows: 2,
            max_users_per_row: 2,
        };
        let cases = [
            fwd(1, vec![]),
            fwd(1, vec![row(2, &[1]), row(2, &[2])]),
            fwd(1, vec![row(1, &[1])]),
            fwd(1, vec![row(100, &[1])]),
            fwd(1, vec![row(0, &[1])]),
            fwd(1, vec![row(2, &[])]),
            fwd(1, vec![row(2, &[1, 2, 3])]),
            fwd(1, vec![row(2, &[1]), row(3, &[1]), row(4, &[1])]),
        ];
        for f in cases {
            assert!(
                matches!(
                    validate(&f, ServerId(1), 1, EX, &lim),
                    Err(Reject::Malformed(_))
                ),
                "{f:?}"
            );
        }
        // Duplicates beyond the linear-scan size, and none.
        let wide = SplitLimits::default();
        let mut rows: Vec<ServerRow> = (2..2 + SMALL_ROWS as u32 + 4)
            .map(|s| row(s, &[1]))
            .collect();
        assert_eq!(
            validate(&fwd(1, rows.clone()), ServerId(1), 1, EX, &wide),
            Ok(())
        );
        rows.push(row(7, &[1]));
        assert_eq!(
            validate(&fwd(1, rows), ServerId(1), 1, EX, &wide),
            Err(Reject::Malformed("server listed twice"))
        );
        let mut f = fwd(1, vec![row(2, &[1])]);
        f.target = Address::new(ServerId(99), UserId::NONE);
        assert!(matches!(
            validate(&f, ServerId(1), 1, EX, &lim),
            Err(Reject::WrongTarget(_))
        ));
    }
}
