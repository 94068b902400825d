//! The message kinds reserved by iim: the one table of them.
//!
//! A message's `kind` (a `u16` on the wire) says which service it belongs
//! to. The kinds below belong to the app server's built-in services; a
//! receiving app server interprets them (a chat push is decoded once and
//! rendered per client, a presence hint is checked against the database
//! before anyone sees it). Plugins use any other kind: an [`Iim`] handle
//! given to a plugin refuses to send a reserved one
//! ([`SendError::ReservedKind`]), so a plugin cannot forge chat messages,
//! presence or notices. Only append to this table; never reuse a number.
//!
//! This module owns the numbers and their names; what each kind's body
//! holds is owned by the service that sends it (`iim-appserver`'s `chat`,
//! `presence` and `admin`).
//!
//! [`Iim`]: crate::Iim
//! [`SendError::ReservedKind`]: crate::SendError::ReservedKind

/// A kind reserved by iim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Reserved {
    /// Plain text from an operator (`POST /admin/send`, `iimctl send`):
    /// the body is UTF-8; clients see `{"op":"notice",...}`.
    Notice = 1,
    /// A stored chat message pushed to its recipients: a JSON envelope with
    /// the message once and each recipient's inbox sequence (or the large
    /// group's timeline sequence); clients see `{"op":"msg",...}`.
    Chat = 2,
    /// A presence hint between app servers: JSON `{user, status, text,
    /// version}`, checked against the database before it reaches anyone.
    Presence = 3,
    /// Chat pushes for the recipient users were dropped (the sending
    /// server's push queue was full, or its sessions look-up failed): body
    /// empty; their clients see `{"op":"sync_needed"}` and sync.
    SyncNeeded = 4,
    /// A read receipt: JSON `{reader, ope, to, id, seqs}` (or `gseq` for
    /// a large group, to the reader's own devices only), rendered per
    /// recipient with its own inbox sequence; clients see
    /// `{"op":"receipt",...}`. Only the reader's server sends it.
    Receipt = 5,
    /// Someone is typing: JSON `{from, ope, to}`, never stored; clients see
    /// `{"op":"typing",...}` and let it expire on their own.
    Typing = 6,
}

/// [`Reserved::Notice`] as a number.
pub const NOTICE: u16 = Reserved::Notice as u16;
/// [`Reserved::Chat`] as a number.
pub const CHAT: u16 = Reserved::Chat as u16;
/// [`Reserved::Presence`] as a number.
pub const PRESENCE: u16 = Reserved::Presence as u16;
/// [`Reserved::SyncNeeded`] as a number.
pub const SYNC_NEEDED: u16 = Reserved::SyncNeeded as u16;
/// [`Reserved::Receipt`] as a number.
pub const RECEIPT: u16 = Reserved::Receipt as u16;
/// [`Reserved::Typing`] as a number.
pub const TYPING: u16 = Reserved::Typing as u16;

impl Reserved {
    /// Every reserved kind, in number order.
    pub const ALL: [Reserved; 6] = [
        Reserved::Notice,
        Reserved::Chat,
        Reserved::Presence,
        Reserved::SyncNeeded,
        Reserved::Receipt,
        Reserved::Typing,
    ];

    /// The kind's number on the wire.
    pub const fn kind(self) -> u16 {
        self as u16
    }

    /// The reserved kind `kind` is, if it is one.
    pub fn of(kind: u16) -> Option<Reserved> {
        Reserved::ALL.into_iter().find(|r| r.kind() == kind)
    }

    /// A short lowercase name (logs, metric labels, errors).
    pub fn as_str(self) -> &'static str {
        match self {
            Reserved::Notice => "notice",
            Reserved::Chat => "chat",
            Reserved::Presence => "presence",
            Reserved::SyncNeeded => "sync_needed",
            Reserved::Receipt => "receipt",
            Reserved::Typing => "typing",
        }
    }
}

impl std::fmt::Display for Reserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.kind(), self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_round_trips_and_leaves_other_kinds_to_plugins() {
        for r in Reserved::ALL {
            assert_eq!(Reserved::of(r.kind()), Some(r));
        }
        assert_eq!(
            [NOTICE, CHAT, PRESENCE, SYNC_NEEDED, RECEIPT, TYPING],
            Reserved::ALL.map(Reserved::kind),
            "the constants are the table's numbers"
        );
        for plugin_kind in [0, 7, 9, 1_000, u16::MAX] {
            assert_eq!(Reserved::of(plugin_kind), None);
        }
        assert_eq!(Reserved::Chat.to_string(), "2 (chat)");
    }
}
