//! What the client gateway and the chat service exchange: requests from a
//! client, what goes back to it, and the chat messages it receives. These
//! types are the JSON of `docs/client-protocol.md`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// `ope` of seed 004: 0 a single (1:1) message, 1 a group message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Ope {
    Single,
    Group,
}

impl TryFrom<u8> for Ope {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            0 => Ok(Ope::Single),
            1 => Ok(Ope::Group),
            other => Err(format!("ope must be 0 (single) or 1 (group), not {other}")),
        }
    }
}

impl From<Ope> for u8 {
    fn from(o: Ope) -> u8 {
        match o {
            Ope::Single => 0,
            Ope::Group => 1,
        }
    }
}

/// A client's `send`. `from` is not taken from the client: it is the
/// authenticated user (a client that names another `from` is refused).
#[derive(Clone, Debug)]
pub struct SendRequest {
    /// The client's own id for the message; a resend with the same `req`
    /// is acknowledged again, never stored twice.
    pub req: String,
    pub ope: Ope,
    /// A user id (`ope` 0) or a group id (`ope` 1).
    pub to: u64,
    /// `type` in the client JSON.
    pub kind: String,
    /// Any JSON value, kept verbatim.
    pub body: Box<RawValue>,
    /// Extensions, any JSON value, kept verbatim.
    pub ex: Option<Box<RawValue>>,
}

/// The answer to a `send`: the message is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendAck {
    pub req: String,
    /// Server-wide message id.
    pub id: u64,
    /// The message's sequence in the sender's own inbox (1:1 and small
    /// groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The message's sequence in the group timeline (large groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gseq: Option<u64>,
    pub ts: i64,
    /// True when this `req` had been stored before (a resend).
    pub duplicate: bool,
}

/// A client's `sync`: everything above `since`, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRequest {
    /// `None`: the user's inbox. `Some(g)`: the timeline of large group g.
    pub group: Option<u64>,
    pub since: u64,
    pub limit: u32,
}

/// One chat message as a client sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Sequence in the receiving user's inbox (absent for large groups).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seq: Option<u64>,
    /// Group timeline sequence (large groups only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gseq: Option<u64>,
    pub id: u64,
    pub req: String,
    pub ope: Ope,
    pub from: u64,
    pub to: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub body: Box<RawValue>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ex: Option<Box<RawValue>>,
    pub ts: i64,
}

impl PartialEq for ChatMessage {
    fn eq(&self, o: &Self) -> bool {
        self.seq == o.seq
            && self.gseq == o.gseq
            && self.id == o.id
            && self.req == o.req
            && self.ope == o.ope
            && self.from == o.from
            && self.to == o.to
            && self.kind == o.kind
            && self.body.get() == o.body.get()
            && self.ex.as_ref().map(|e| e.get()) == o.ex.as_ref().map(|e| e.get())
            && self.ts == o.ts
    }
}

/// The answer to a `sync`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncPage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    pub messages: Vec<ChatMessage>,
    /// The highest sequence that exists now (inbox or timeline).
    pub max: u64,
    /// More messages above the last one returned.
    pub more: bool,
}

/// A large group the user belongs to, with its timeline's highest sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LargeGroup {
    pub group: u64,
    pub max: u64,
}

/// Told to a client once authenticated: where its inbox and its large
/// groups' timelines stand, so it knows what to sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub user: u64,
    pub device: String,
    pub server: u32,
    pub inbox_max: u64,
    pub large_groups: Vec<LargeGroup>,
}

/// Why a chat request failed: `code` is a stable string for clients.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no such user {0}")]
    UnknownUser(u64),
    #[error("no such group {0}")]
    UnknownGroup(u64),
    #[error("not a member of group {0}")]
    NotMember(u64),
    #[error("message store unavailable, try again")]
    Unavailable,
}

impl ChatError {
    pub fn code(&self) -> &'static str {
        match self {
            ChatError::BadRequest(_) => "bad_request",
            ChatError::UnknownUser(_) => "unknown_user",
            ChatError::UnknownGroup(_) => "unknown_group",
            ChatError::NotMember(_) => "not_member",
            ChatError::Unavailable => "unavailable",
        }
    }
}
