//! Identifiers and addresses shared by every part of iim.
//!
//! Owns the small value types that cross process boundaries (server, user and
//! channel ids, addresses, message ids, sessions). It owns no behaviour beyond
//! formatting and conversions.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A server in the deployment: an app server or an exchange. Ids share one
/// space so that an address `(server, user)` is unambiguous; `0` is reserved
/// for "the receiving side itself" (seed 002's `(0,0)` target).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct ServerId(pub u32);

/// An end user. `0` is reserved for "no particular user".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct UserId(pub u64);

/// One live client connection on one app server. Channel ids embed the
/// server's epoch in their high bits, so a channel of a previous incarnation
/// never names a connection of the current one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct ChannelId(pub u64);

impl ServerId {
    /// The "receiving side itself" server id of seed 002's `(0,0)`.
    pub const NONE: ServerId = ServerId(0);
}

impl UserId {
    pub const NONE: UserId = UserId(0);
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A `(server, user)` pair as in seed 002. A 905 is addressed to the
/// exchange `(exchange id, 0)`; the original message it carries is addressed
/// to `(0, 0)`: "the receiving client itself".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Address {
    pub server: ServerId,
    pub user: UserId,
}

impl Address {
    /// Seed 002's `(0,0)`: the client that receives the message.
    pub const RECEIVER: Address = Address {
        server: ServerId::NONE,
        user: UserId::NONE,
    };

    pub const fn new(server: ServerId, user: UserId) -> Self {
        Address { server, user }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({},{})", self.server, self.user)
    }
}

/// Globally unique message id: the origin app server, the origin's epoch
/// (bumped on every restart, so ids never repeat across restarts) and a
/// per-origin sequence that grows by one for every `send`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId {
    pub origin: ServerId,
    pub epoch: u64,
    pub seq: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.origin, self.epoch, self.seq)
    }
}

/// One authenticated client connection as recorded in the registry's
/// `sessions` table. A user list for `iim::send` is a slice of these.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Session {
    pub user: UserId,
    pub device: String,
    pub server: ServerId,
    pub channel: ChannelId,
}
