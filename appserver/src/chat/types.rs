//! What the client gateway and the chat service exchange: requests from a
//! client, what goes back to it, and the chat messages it receives. These
//! types are the JSON of `docs/client-protocol.md`; [`PushEnvelope`] is the
//! body of a chat push between app servers.
//!
//! A [`SendRequest`] is valid by construction: its `req` and `type` are
//! checked once, when they become a [`ClientReq`] and a [`MessageType`].

use crate::codes::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A client-chosen string of the wrong length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("must be 1..={max} characters")]
pub struct LengthError {
    pub max: usize,
}

/// `s` if it has 1 to `max` characters (Unicode scalar values, as the
/// database's `VARCHAR` columns count them; any characters). Every
/// client-chosen string is checked here.
pub fn check_chars(s: String, max: usize) -> Result<String, LengthError> {
    // Count no further than one past the limit: a huge string costs no more.
    let n = s.chars().take(max.saturating_add(1)).count();
    if n == 0 || n > max {
        return Err(LengthError { max });
    }
    Ok(s)
}

/// A client-chosen string of 1 to `MAX` characters, checked once: the
/// only way to make one is [`Chars::parse`] (which deserialising goes
/// through too).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Chars<const MAX: usize>(String);

impl<const MAX: usize> TryFrom<String> for Chars<MAX> {
    type Error = LengthError;
    fn try_from(s: String) -> Result<Self, LengthError> {
        Chars::parse(s)
    }
}

impl<const MAX: usize> From<Chars<MAX>> for String {
    fn from(c: Chars<MAX>) -> String {
        c.0
    }
}

impl<const MAX: usize> Chars<MAX> {
    /// The longest value, in characters.
    pub const MAX_CHARS: usize = MAX;

    pub fn parse(s: String) -> Result<Self, LengthError> {
        check_chars(s, MAX).map(Chars)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `req`: the client's own id for a message, 1 to 64 characters (the
/// `messages.req` column). A resend with the same `req` is acknowledged
/// again, never stored twice.
pub type ClientReq = Chars<64>;

/// `type`: what a chat message is (`"text"`, `"image"`, …), 1 to 32
/// characters (the `messages.kind` column), chosen by the client.
pub type MessageType = Chars<32>;

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
    /// The client's own id for the message.
    pub req: ClientReq,
    pub ope: Ope,
    /// A user id (`ope` 0) or a group id (`ope` 1).
    pub to: u64,
    /// `type` in the client JSON.
    pub kind: MessageType,
    /// Any JSON value, kept verbatim.
    pub body: Box<RawValue>,
    /// Extensions, any JSON value, kept verbatim.
    pub ex: Option<Box<RawValue>>,
}

/// The answer to a `send`: the message is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendAck {
    pub req: ClientReq,
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

/// What a chat push carries on the relay (kind `iim::kinds::CHAT`): the
/// message once, plus each recipient's sequence (write fan-out) or the
/// timeline sequence (large groups).
#[derive(Debug, Serialize, Deserialize)]
pub struct PushEnvelope {
    pub m: ChatMessage,
    /// `(user, that user's inbox sequence)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seqs: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gseq: Option<u64>,
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
    #[error("req {0:?} was used before for another message: a resend must repeat it exactly")]
    ReqReused(String),
}

impl ChatError {
    /// The error frame's `code`.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::BadRequest(_) => ErrorCode::BadRequest,
            ChatError::UnknownUser(_) => ErrorCode::UnknownUser,
            ChatError::UnknownGroup(_) => ErrorCode::UnknownGroup,
            ChatError::NotMember(_) => ErrorCode::NotMember,
            ChatError::Unavailable => ErrorCode::Unavailable,
            ChatError::ReqReused(_) => ErrorCode::ReqReused,
        }
    }
}
