//! What a local connection is handed: one [`Push`] per message, decoded
//! once by the host (not once per receiving connection), and the client
//! frame each push becomes (docs/client-protocol.md §4: `msg`, `presence`,
//! `notice`, `receipt`, `typing`).
//!
//! A chat push for a write-fan-out group carries every member's own inbox
//! sequence. Decoding it builds a lookup from user to sequence and renders
//! the part of the `msg` frame that every member shares, once; each
//! connection then finds its sequence in O(1) and puts it in front. A
//! message to n local members costs O(n) in all, not O(n²) as when every
//! connection parsed the whole envelope.
//!
//! This module owns decoding the bodies of the kinds reserved by iim for
//! connections, and the JSON of push frames. It does not route messages
//! (the host does), check presence hints (the presence service does) or
//! write to sockets (the gateway does).

use crate::chat::receipts::{ReceiptEnvelope, TYPING_EXPIRES_MS, TypingEnvelope};
use crate::chat::{ChatMessage, Ope, PushEnvelope};
use iim::kinds::Reserved;
use iim::presence::{PresenceRow, Status};
use iim::types::UserId;
use iim::wire::Message;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

/// What a connection's queue carries. Cheap to clone: one push is shared
/// by every connection it is for.
#[derive(Clone, Debug)]
pub enum Push {
    /// A stored chat message, with each recipient's sequence.
    Chat(Arc<ChatPush>),
    /// A contact's presence, as the database has it.
    Presence(Arc<PresencePush>),
    /// Operator text.
    Notice(Arc<Notice>),
    /// Chat pushes for this user were dropped at their sending server: the
    /// client is told to sync (`{"op":"sync_needed"}`).
    SyncNeeded(Arc<Message>),
    /// A read receipt, with each recipient's sequence.
    Receipt(Arc<ReceiptPush>),
    /// Someone is typing.
    Typing(Arc<TypingPush>),
    /// A message of a kind iim does not reserve: a plugin's. Clients of
    /// the gateway do not see these; other holders of a connection do.
    Plugin(Arc<Message>),
}

/// Why a message cannot become a push.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("chat push body is not a chat envelope")]
    Chat(#[source] serde_json::Error),
    #[error("receipt or typing body is not its envelope")]
    Receipt(#[source] serde_json::Error),
    #[error("presence hints go to the presence service, never to connections")]
    PresenceHint,
    /// A chat, receipt or typing envelope naming another user than the
    /// message's source user: the source server vouches for its own users
    /// only.
    #[error("envelope from user {claimed}, but the message's source is user {source_user}")]
    ForgedFrom { claimed: u64, source_user: u64 },
}

impl Push {
    /// Decode `msg` for the connections it is delivered to, once.
    pub fn decode(msg: &Arc<Message>) -> Result<Push, DecodeError> {
        match Reserved::of(msg.kind) {
            Some(Reserved::Chat) => Ok(Push::Chat(Arc::new(ChatPush::decode(msg)?))),
            Some(Reserved::Notice) => Ok(Push::Notice(Arc::new(Notice::decode(msg)))),
            Some(Reserved::Presence) => Err(DecodeError::PresenceHint),
            Some(Reserved::SyncNeeded) => Ok(Push::SyncNeeded(msg.clone())),
            Some(Reserved::Receipt) => Ok(Push::Receipt(Arc::new(ReceiptPush::decode(msg)?))),
            Some(Reserved::Typing) => Ok(Push::Typing(Arc::new(TypingPush::decode(msg)?))),
            None => Ok(Push::Plugin(msg.clone())),
        }
    }

    /// A contact's presence for its watchers.
    pub fn presence(update: Update) -> Push {
        let frame = presence_frame(std::slice::from_ref(&update));
        Push::Presence(Arc::new(PresencePush { update, frame }))
    }

    /// The text frame this push becomes for `user`'s client; `None` when
    /// there is nothing for that client (a plugin's message, a chat push
    /// without a sequence for `user`).
    pub fn frame_for(&self, user: UserId) -> Option<String> {
        match self {
            Push::Chat(c) => c.frame_for(user),
            Push::Presence(p) => Some(p.frame.clone()),
            Push::Notice(n) => Some(n.frame.clone()),
            Push::SyncNeeded(_) => Some(SYNC_NEEDED_FRAME.to_owned()),
            Push::Receipt(r) => r.frame_for(user),
            Push::Typing(t) => t.frame_for(user),
            Push::Plugin(_) => None,
        }
    }

    /// The relayed message this push was decoded from (`None` for presence,
    /// which the presence service takes from the database).
    pub fn message(&self) -> Option<&Arc<Message>> {
        match self {
            Push::Chat(c) => Some(&c.message),
            Push::Notice(n) => Some(&n.message),
            Push::Receipt(r) => Some(&r.message),
            Push::Typing(t) => Some(&t.message),
            Push::SyncNeeded(m) | Push::Plugin(m) => Some(m),
            Push::Presence(_) => None,
        }
    }

    /// [`Push::message`], owned.
    pub fn into_message(self) -> Option<Arc<Message>> {
        self.message().cloned()
    }

    /// A short name of the push's kind (logs).
    pub fn label(&self) -> &'static str {
        match self {
            Push::Chat(_) => Reserved::Chat.as_str(),
            Push::Presence(_) => Reserved::Presence.as_str(),
            Push::Notice(_) => Reserved::Notice.as_str(),
            Push::SyncNeeded(_) => Reserved::SyncNeeded.as_str(),
            Push::Receipt(_) => Reserved::Receipt.as_str(),
            Push::Typing(_) => Reserved::Typing.as_str(),
            Push::Plugin(_) => "plugin",
        }
    }
}

/// The frame of [`Push::SyncNeeded`].
pub const SYNC_NEEDED_FRAME: &str = r#"{"op":"sync_needed"}"#;

/// A chat push, decoded: the message, each recipient's sequence, and the
/// shared part of its `msg` frame.
#[derive(Debug)]
pub struct ChatPush {
    message: Arc<Message>,
    /// The message without `seq` or `gseq`.
    chat: ChatMessage,
    /// Each recipient's inbox sequence (write fan-out).
    seqs: HashMap<UserId, u64>,
    /// The timeline sequence, the same for every member (large groups).
    gseq: Option<u64>,
    /// The `msg` frame after its sequence field: `"id":…}`.
    tail: String,
}

impl ChatPush {
    fn decode(message: &Arc<Message>) -> Result<ChatPush, DecodeError> {
        let env: PushEnvelope = serde_json::from_slice(&message.body).map_err(DecodeError::Chat)?;
        if env.m.from != message.source.user.0 {
            return Err(DecodeError::ForgedFrom {
                claimed: env.m.from,
                source_user: message.source.user.0,
            });
        }
        let mut chat = env.m;
        chat.seq = None;
        chat.gseq = None;
        // `{"id":…}` → `"id":…}`: every field but the sequence, rendered once.
        let tail = serde_json::to_string(&chat)
            .map_err(DecodeError::Chat)?
            .split_off(1);
        let mut seqs = HashMap::with_capacity(if env.gseq.is_some() {
            0
        } else {
            env.seqs.len()
        });
        if env.gseq.is_none() {
            for (user, seq) in env.seqs {
                // The first entry for a user counts.
                seqs.entry(UserId(user)).or_insert(seq);
            }
        }
        Ok(ChatPush {
            message: message.clone(),
            chat,
            seqs,
            gseq: env.gseq,
            tail,
        })
    }

    /// The message, without a sequence.
    pub fn chat(&self) -> &ChatMessage {
        &self.chat
    }

    /// `user`'s sequence for this message: `(field, value)`, the field
    /// being `seq` (the user's inbox) or `gseq` (a large group's timeline).
    pub fn seq_for(&self, user: UserId) -> Option<(&'static str, u64)> {
        match self.gseq {
            Some(g) => Some(("gseq", g)),
            None => self.seqs.get(&user).map(|s| ("seq", *s)),
        }
    }

    /// `{"op":"msg","seq":N,` + the shared tail. The same bytes as the
    /// message rendered whole with `user`'s sequence.
    fn frame_for(&self, user: UserId) -> Option<String> {
        let (field, n) = self.seq_for(user)?;
        let mut f = String::with_capacity(self.tail.len() + 40);
        let _ = write!(f, "{{\"op\":\"msg\",\"{field}\":{n},");
        f.push_str(&self.tail);
        Some(f)
    }
}

/// `user`'s view of a conversation someone else names: a 1:1 conversation
/// is, for the other side, the one with that someone.
fn seen_by(user: UserId, someone: u64, ope: Ope, to: u64) -> u64 {
    match ope {
        Ope::Single if user.0 != someone => someone,
        _ => to,
    }
}

/// A read receipt (kind [`Reserved::Receipt`]): who read which
/// conversation up to which message, with each recipient's own sequence.
#[derive(Debug)]
pub struct ReceiptPush {
    message: Arc<Message>,
    pub envelope: ReceiptEnvelope,
    seqs: HashMap<UserId, u64>,
}

impl ReceiptPush {
    fn decode(message: &Arc<Message>) -> Result<ReceiptPush, DecodeError> {
        let envelope: ReceiptEnvelope =
            serde_json::from_slice(&message.body).map_err(DecodeError::Receipt)?;
        if envelope.reader != message.source.user.0 {
            return Err(DecodeError::ForgedFrom {
                claimed: envelope.reader,
                source_user: message.source.user.0,
            });
        }
        let mut seqs = HashMap::with_capacity(envelope.seqs.len());
        for (user, seq) in &envelope.seqs {
            seqs.entry(UserId(*user)).or_insert(*seq);
        }
        Ok(ReceiptPush {
            message: message.clone(),
            envelope,
            seqs,
        })
    }

    /// `{"op":"receipt","reader":…,"ope":…,"to":…,"seq":…,"id":…}` with
    /// `user`'s own sequence; a large group's receipt is for the reader's
    /// devices only.
    fn frame_for(&self, user: UserId) -> Option<String> {
        #[derive(Serialize)]
        struct Frame {
            reader: u64,
            ope: Ope,
            to: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            gseq: Option<u64>,
            id: u64,
        }
        let e = &self.envelope;
        let (seq, gseq) = match e.gseq {
            Some(g) if user.0 == e.reader => (None, Some(g)),
            Some(_) => return None,
            None => (Some(*self.seqs.get(&user)?), None),
        };
        Some(tagged(
            "receipt",
            &Frame {
                reader: e.reader,
                ope: e.ope,
                to: seen_by(user, e.reader, e.ope, e.to),
                seq,
                gseq,
                id: e.id,
            },
        ))
    }
}

/// A typing indicator (kind [`Reserved::Typing`]).
#[derive(Debug)]
pub struct TypingPush {
    message: Arc<Message>,
    pub envelope: TypingEnvelope,
}

impl TypingPush {
    fn decode(message: &Arc<Message>) -> Result<TypingPush, DecodeError> {
        let envelope: TypingEnvelope =
            serde_json::from_slice(&message.body).map_err(DecodeError::Receipt)?;
        if envelope.from != message.source.user.0 {
            return Err(DecodeError::ForgedFrom {
                claimed: envelope.from,
                source_user: message.source.user.0,
            });
        }
        Ok(TypingPush {
            message: message.clone(),
            envelope,
        })
    }

    /// `{"op":"typing","from":…,"ope":…,"to":…,"expires_in":…}`; nothing
    /// for the typist's own connections.
    fn frame_for(&self, user: UserId) -> Option<String> {
        #[derive(Serialize)]
        struct Frame {
            from: u64,
            ope: Ope,
            to: u64,
            expires_in: u64,
        }
        let e = &self.envelope;
        if user.0 == e.from {
            return None;
        }
        Some(tagged(
            "typing",
            &Frame {
                from: e.from,
                ope: e.ope,
                to: seen_by(user, e.from, e.ope, e.to),
                expires_in: TYPING_EXPIRES_MS,
            },
        ))
    }
}

/// Operator text (kind [`Reserved::Notice`]): the body as UTF-8 (invalid
/// bytes replaced), from the sending user.
#[derive(Debug)]
pub struct Notice {
    message: Arc<Message>,
    pub text: String,
    frame: String,
}

impl Notice {
    fn decode(message: &Arc<Message>) -> Notice {
        #[derive(Serialize)]
        struct Frame<'a> {
            from: u64,
            text: &'a str,
        }
        let text = String::from_utf8_lossy(&message.body).into_owned();
        let frame = tagged(
            "notice",
            &Frame {
                from: message.source.user.0,
                text: &text,
            },
        );
        Notice {
            message: message.clone(),
            text,
            frame,
        }
    }

    /// The message the notice came in.
    pub fn id(&self) -> iim::MessageId {
        self.message.id
    }

    pub fn from(&self) -> UserId {
        self.message.source.user
    }
}

/// A contact's presence for its local watchers, with its frame.
#[derive(Debug)]
pub struct PresencePush {
    pub update: Update,
    frame: String,
}

/// A user's presence: the body of a presence hint on the relay, and what a
/// client sees in a `presence` frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub user: u64,
    pub status: Status,
    pub text: String,
    pub version: u64,
}

impl From<&PresenceRow> for Update {
    fn from(r: &PresenceRow) -> Self {
        Update {
            user: r.user.0,
            status: r.status,
            text: r.text.clone(),
            version: r.version,
        }
    }
}

impl Update {
    /// A user without a row: offline, version 0.
    pub fn offline(user: UserId) -> Update {
        Update {
            user: user.0,
            status: Status::Offline,
            text: String::new(),
            version: 0,
        }
    }
}

/// `{"op":"presence","contacts":[…]}`: a snapshot, or one update.
pub(crate) fn presence_frame(contacts: &[Update]) -> String {
    #[derive(Serialize)]
    struct Frame<'a> {
        contacts: &'a [Update],
    }
    tagged("presence", &Frame { contacts })
}

/// The answer to `presence_subscribe`: a `presence` frame with the users
/// now watched (`subscribed`), which tells it from a presence push.
pub(crate) fn presence_answer(subscribed: &[UserId], contacts: &[Update]) -> String {
    #[derive(Serialize)]
    struct Frame<'a> {
        subscribed: Vec<u64>,
        contacts: &'a [Update],
    }
    let subscribed = subscribed.iter().map(|u| u.0).collect();
    tagged(
        "presence",
        &Frame {
            subscribed,
            contacts,
        },
    )
}

/// `value`'s JSON object with `"op"` put first: `{"op":"ack",...}`. Every
/// server frame is written this way.
pub(crate) fn tagged(op: &str, value: &impl Serialize) -> String {
    let inner = serde_json::to_string(value).unwrap_or_default();
    match inner.strip_prefix('{') {
        Some("}") => format!("{{\"op\":\"{op}\"}}"),
        Some(rest) => format!("{{\"op\":\"{op}\",{rest}"),
        None => format!("{{\"op\":\"{op}\"}}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iim::types::{Address, MessageId, ServerId};
    use iim::wire::Timing;

    fn message(kind: u16, from: u64, body: Vec<u8>) -> Arc<Message> {
        Arc::new(Message {
            id: MessageId {
                origin: ServerId(2),
                epoch: 1,
                seq: 1,
            },
            source: Address::new(ServerId(2), UserId(from)),
            target: Address::RECEIVER,
            kind,
            timing: Timing::default(),
            body: body.into(),
            nested: Vec::new(),
        })
    }

    fn chat(ex: bool) -> ChatMessage {
        let mut v = serde_json::json!({
            "id": 5001, "req": "c-9", "ope": 1, "from": 2001, "to": 77,
            "type": "text", "body": {"text": "yo \"quoted\" \u{e9}", "n": [1, 2]},
            "ts": 1_700_000_000_001_i64
        });
        if ex {
            v["ex"] = serde_json::json!({"k": "v"});
        }
        serde_json::from_value(v).unwrap()
    }

    fn chat_push(env: &PushEnvelope) -> Push {
        Push::decode(&message(
            Reserved::Chat.kind(),
            2001,
            serde_json::to_vec(env).unwrap(),
        ))
        .unwrap()
    }

    /// What a connection rendered before pushes were decoded once: the
    /// whole message with the user's sequence, `op` first.
    fn whole(mut m: ChatMessage, seq: Option<u64>, gseq: Option<u64>) -> String {
        m.seq = seq;
        m.gseq = gseq;
        tagged("msg", &m)
    }

    #[test]
    fn a_chat_frame_is_the_whole_message_with_the_users_own_sequence() {
        for ex in [false, true] {
            let env = PushEnvelope {
                m: chat(ex),
                seqs: vec![(2001, 9), (1001, 12), (3003, 4), (1001, 99)],
                gseq: None,
            };
            let push = chat_push(&env);
            for (user, seq) in [(2001, 9), (1001, 12), (3003, 4)] {
                assert_eq!(
                    push.frame_for(UserId(user)).unwrap(),
                    whole(chat(ex), Some(seq), None),
                    "byte for byte, first entry wins"
                );
            }
            assert_eq!(push.frame_for(UserId(4004)), None, "not a recipient");
            let Push::Chat(c) = &push else {
                panic!("not chat")
            };
            assert_eq!(c.chat(), &chat(ex));
            assert_eq!(c.seq_for(UserId(1001)), Some(("seq", 12)));
        }
        let large = chat_push(&PushEnvelope {
            m: chat(false),
            seqs: Vec::new(),
            gseq: Some(980),
        });
        assert_eq!(
            large.frame_for(UserId(4004)).unwrap(),
            whole(chat(false), None, Some(980)),
            "a large group's timeline sequence is everyone's"
        );
        let v: serde_json::Value =
            serde_json::from_str(&large.frame_for(UserId(1)).unwrap()).unwrap();
        assert_eq!(
            (v["op"].as_str(), v["gseq"].as_u64()),
            (Some("msg"), Some(980))
        );
    }

    #[test]
    fn a_malformed_chat_push_is_an_error_and_presence_hints_are_not_pushes() {
        let bad = message(Reserved::Chat.kind(), 1, b"{\"m\":".to_vec());
        assert!(matches!(Push::decode(&bad), Err(DecodeError::Chat(_))));
        let hint = message(Reserved::Presence.kind(), 1, b"{}".to_vec());
        assert!(matches!(
            Push::decode(&hint),
            Err(DecodeError::PresenceHint)
        ));
    }

    #[test]
    fn a_chat_envelope_from_another_user_than_the_source_is_refused() {
        let env = PushEnvelope {
            m: chat(false),
            seqs: vec![(77, 3)],
            gseq: None,
        };
        let body = serde_json::to_vec(&env).unwrap();
        let forged = message(Reserved::Chat.kind(), 2002, body.clone());
        assert!(matches!(
            Push::decode(&forged),
            Err(DecodeError::ForgedFrom {
                claimed: 2001,
                source_user: 2002
            })
        ));
        assert!(Push::decode(&message(Reserved::Chat.kind(), 2001, body)).is_ok());
    }

    #[test]
    fn notices_presence_and_plugin_messages() {
        let n = Push::decode(&message(
            Reserved::Notice.kind(),
            42,
            b"hello \xff".to_vec(),
        ))
        .unwrap();
        assert_eq!(
            n.frame_for(UserId(1)).unwrap(),
            "{\"op\":\"notice\",\"from\":42,\"text\":\"hello \u{fffd}\"}"
        );
        let u = Update {
            user: 7,
            status: Status::Away,
            text: "lunch".into(),
            version: 3,
        };
        let p = Push::presence(u.clone());
        assert_eq!(
            p.frame_for(UserId(1)).unwrap(),
            r#"{"op":"presence","contacts":[{"user":7,"status":"away","text":"lunch","version":3}]}"#
        );
        assert!(p.message().is_none());
        let m = message(9, 42, b"x".to_vec());
        let plugin = Push::decode(&m).unwrap();
        assert_eq!(
            plugin.frame_for(UserId(1)),
            None,
            "clients do not see plugin kinds"
        );
        assert!(Arc::ptr_eq(plugin.message().unwrap(), &m));
    }

    #[test]
    fn receipts_and_typing_are_rendered_in_each_recipients_own_terms() {
        let env = ReceiptEnvelope {
            reader: 2001,
            ope: Ope::Single,
            to: 1001,
            id: 5001,
            seqs: vec![(1001, 17), (2001, 42)],
            gseq: None,
        };
        let m = message(
            Reserved::Receipt.kind(),
            2001,
            serde_json::to_vec(&env).unwrap(),
        );
        let p = Push::decode(&m).unwrap();
        assert_eq!(
            p.frame_for(UserId(1001)).unwrap(),
            r#"{"op":"receipt","reader":2001,"ope":0,"to":2001,"seq":17,"id":5001}"#,
            "the other side sees its own sequence, in its conversation with the reader"
        );
        assert_eq!(
            p.frame_for(UserId(2001)).unwrap(),
            r#"{"op":"receipt","reader":2001,"ope":0,"to":1001,"seq":42,"id":5001}"#,
            "the reader's devices see their own"
        );
        assert_eq!(p.frame_for(UserId(3001)), None);
        let large = ReceiptEnvelope {
            ope: Ope::Group,
            to: 77,
            seqs: Vec::new(),
            gseq: Some(980),
            ..env.clone()
        };
        let m = message(
            Reserved::Receipt.kind(),
            2001,
            serde_json::to_vec(&large).unwrap(),
        );
        let p = Push::decode(&m).unwrap();
        assert_eq!(
            p.frame_for(UserId(2001)).unwrap(),
            r#"{"op":"receipt","reader":2001,"ope":1,"to":77,"gseq":980,"id":5001}"#
        );
        assert_eq!(
            p.frame_for(UserId(1001)),
            None,
            "large groups: own devices only"
        );
        let forged = message(
            Reserved::Receipt.kind(),
            2002,
            serde_json::to_vec(&env).unwrap(),
        );
        assert!(matches!(
            Push::decode(&forged),
            Err(DecodeError::ForgedFrom {
                claimed: 2001,
                source_user: 2002
            })
        ));
        let t = TypingEnvelope {
            from: 2001,
            ope: Ope::Group,
            to: 77,
        };
        let m = message(
            Reserved::Typing.kind(),
            2001,
            serde_json::to_vec(&t).unwrap(),
        );
        let p = Push::decode(&m).unwrap();
        assert_eq!(
            p.frame_for(UserId(1001)).unwrap(),
            format!(
                r#"{{"op":"typing","from":2001,"ope":1,"to":77,"expires_in":{TYPING_EXPIRES_MS}}}"#
            )
        );
        assert_eq!(p.frame_for(UserId(2001)), None, "not to the typist");
        let bad = message(Reserved::Typing.kind(), 2001, b"{}".to_vec());
        assert!(matches!(Push::decode(&bad), Err(DecodeError::Receipt(_))));
    }

    #[test]
    fn tagged_puts_op_first() {
        #[derive(Serialize)]
        struct A {
            x: u32,
        }
        #[derive(Serialize)]
        struct E {}
        assert_eq!(tagged("ack", &A { x: 1 }), r#"{"op":"ack","x":1}"#);
        assert_eq!(tagged("e", &E {}), r#"{"op":"e"}"#);
    }
}
