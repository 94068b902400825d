//! The client protocol's frames (docs/client-protocol.md) as this client
//! sends and reads them. What the server sends is decoded into the
//! gateway's own types (`iim_appserver::chat`, `iim_appserver::presence`),
//! so a change there shows here at compile time; the few frames the gateway
//! renders by hand (`notice`, `status_set`, `error`, `receipt`, `typing`)
//! are mirrored.

use iim::presence::Status;
use iim_appserver::chat::receipts::{ReadSet, ReadState};
use iim_appserver::chat::{ChatMessage, Ope, SendAck, SyncPage, Welcome};
use iim_appserver::presence::Update;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request, as the client writes it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request<'a> {
    Auth {
        token: &'a str,
        device: &'a str,
    },
    Send {
        req: &'a str,
        ope: Ope,
        to: u64,
        #[serde(rename = "type")]
        kind: &'a str,
        body: &'a Value,
    },
    Sync {
        since: u64,
        limit: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<u64>,
    },
    Ping,
    SetStatus {
        status: Status,
        text: &'a str,
    },
    PresenceSubscribe {
        users: &'a [u64],
    },
    Read {
        ope: Ope,
        to: u64,
        seq: u64,
    },
    ReadState,
    Typing {
        ope: Ope,
        to: u64,
    },
}

impl Request<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Welcome(Welcome),
    /// The answer to a `send`: stored.
    Ack(SendAck),
    /// The answer to a `sync`: one page.
    Sync(SyncPage),
    /// A chat message pushed live.
    Msg(ChatMessage),
    /// Text sent through the admin API, pushed live.
    Notice(Notice),
    /// Contacts' presence: a snapshot or an update.
    Presence(Vec<Update>),
    /// The answer to a `presence_subscribe`: the users now watched and
    /// their presence.
    Subscribed {
        users: Vec<u64>,
        contacts: Vec<Update>,
    },
    /// The answer to a `set_status`.
    StatusSet(StatusSet),
    /// Chat pushes for this user were dropped: sync.
    SyncNeeded,
    /// The answer to a `read`.
    ReadSet(ReadSet),
    /// The answer to a `read_state`.
    ReadState(ReadState),
    /// The answer to a `typing`.
    TypingSent,
    /// Someone read a conversation, pushed.
    Receipt(Receipt),
    /// Someone is typing, pushed.
    Typing(Typing),
    /// A refused request (or a refused connection, before it closes).
    Error(ErrorFrame),
    Pong,
    /// An op this client does not know (the protocol says to ignore it).
    Other(Value),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Notice {
    pub from: u64,
    pub text: String,
}

/// `{"op":"receipt",...}`: `reader` has read the conversation `ope`/`to`
/// (as this user sends to it) up to this user's `seq` (or `gseq`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Receipt {
    pub reader: u64,
    pub ope: Ope,
    pub to: u64,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub gseq: Option<u64>,
    pub id: u64,
}

/// `{"op":"typing",...}`: `from` is typing in `ope`/`to`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Typing {
    pub from: u64,
    pub ope: Ope,
    pub to: u64,
    pub expires_in: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusSet {
    pub status: Status,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorFrame {
    /// A stable code (`iim_appserver::gateway::code`).
    pub code: String,
    /// The refused request's `req`, when it had a valid one.
    #[serde(default)]
    pub req: Option<String>,
    pub message: String,
}

impl Frame {
    /// Decode one text frame.
    pub fn decode(text: &str) -> Result<Frame, serde_json::Error> {
        #[derive(Deserialize)]
        struct Op {
            op: String,
        }
        #[derive(Deserialize)]
        struct Contacts {
            contacts: Vec<Update>,
            subscribed: Option<Vec<u64>>,
        }
        // Two passes: the gateway's types hold raw JSON (`body`), which
        // serde's tagged enums cannot buffer.
        let op = serde_json::from_str::<Op>(text)?.op;
        Ok(match op.as_str() {
            "welcome" => Frame::Welcome(serde_json::from_str(text)?),
            "ack" => Frame::Ack(serde_json::from_str(text)?),
            "sync" => Frame::Sync(serde_json::from_str(text)?),
            "msg" => Frame::Msg(serde_json::from_str(text)?),
            "notice" => Frame::Notice(serde_json::from_str(text)?),
            "presence" => match serde_json::from_str::<Contacts>(text)? {
                Contacts {
                    contacts,
                    subscribed: Some(users),
                } => Frame::Subscribed { users, contacts },
                Contacts { contacts, .. } => Frame::Presence(contacts),
            },
            "status_set" => Frame::StatusSet(serde_json::from_str(text)?),
            "error" => Frame::Error(serde_json::from_str(text)?),
            "pong" => Frame::Pong,
            "sync_needed" => Frame::SyncNeeded,
            "read_set" => Frame::ReadSet(serde_json::from_str(text)?),
            "read_state" => Frame::ReadState(serde_json::from_str(text)?),
            "typing_sent" => Frame::TypingSent,
            "receipt" => Frame::Receipt(serde_json::from_str(text)?),
            "typing" => Frame::Typing(serde_json::from_str(text)?),
            _ => Frame::Other(serde_json::from_str(text)?),
        })
    }

    /// The frame's `op`.
    pub fn op(&self) -> &str {
        match self {
            Frame::Welcome(_) => "welcome",
            Frame::Ack(_) => "ack",
            Frame::Sync(_) => "sync",
            Frame::Msg(_) => "msg",
            Frame::Notice(_) => "notice",
            Frame::Presence(_) | Frame::Subscribed { .. } => "presence",
            Frame::StatusSet(_) => "status_set",
            Frame::Error(_) => "error",
            Frame::Pong => "pong",
            Frame::SyncNeeded => "sync_needed",
            Frame::ReadSet(_) => "read_set",
            Frame::ReadState(_) => "read_state",
            Frame::TypingSent => "typing_sent",
            Frame::Receipt(_) => "receipt",
            Frame::Typing(_) => "typing",
            Frame::Other(v) => v["op"].as_str().unwrap_or(""),
        }
    }

    /// Pushed by the server on its own, not an answer to a request.
    pub fn is_push(&self) -> bool {
        matches!(
            self,
            Frame::Msg(_)
                | Frame::Notice(_)
                | Frame::Presence(_)
                | Frame::SyncNeeded
                | Frame::Receipt(_)
                | Frame::Typing(_)
        )
    }
}

/// The `text` of a chat message whose body is `{"text": ...}`.
pub fn body_text(m: &ChatMessage) -> Option<String> {
    #[derive(Deserialize)]
    struct Text {
        text: String,
    }
    serde_json::from_str::<Text>(m.body.get())
        .ok()
        .map(|t| t.text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_decode_into_the_gateways_types() {
        let f = Frame::decode(
            r#"{"op":"welcome","user":7,"device":"phone","server":2,"inbox_max":5,"large_groups":[{"group":9,"max":3}]}"#,
        )
        .unwrap();
        let Frame::Welcome(w) = f else {
            panic!("{f:?}")
        };
        assert_eq!((w.user, w.inbox_max, w.large_groups[0].max), (7, 5, 3));
        let f = Frame::decode(
            r#"{"op":"msg","seq":4,"id":11,"req":"r","ope":1,"from":3,"to":9,"type":"text","body":{"text":"hi"},"ts":1}"#,
        )
        .unwrap();
        let Frame::Msg(m) = &f else { panic!("{f:?}") };
        assert_eq!(
            (m.seq, m.ope, body_text(m).as_deref()),
            (Some(4), Ope::Group, Some("hi"))
        );
        assert!(f.is_push());
        let f = Frame::decode(r#"{"op":"ack","req":"r","id":11,"seq":4,"ts":1,"duplicate":false}"#)
            .unwrap();
        assert!(matches!(
            f,
            Frame::Ack(SendAck {
                seq: Some(4),
                gseq: None,
                ..
            })
        ));
        let f = Frame::decode(r#"{"op":"error","code":"bad_request","message":"x"}"#).unwrap();
        assert_eq!(f.op(), "error");
        let f = Frame::decode(
            r#"{"op":"presence","contacts":[{"user":2,"status":"away","text":"","version":3}]}"#,
        )
        .unwrap();
        assert!(matches!(&f, Frame::Presence(c) if c[0].status == Status::Away));
        let f = Frame::decode(r#"{"op":"future","x":1}"#).unwrap();
        assert_eq!(f.op(), "future");
        assert!(Frame::decode("{nope").is_err());
        assert!(Frame::decode(r#"{"op":"ack","req":5}"#).is_err());
    }

    #[test]
    fn requests_are_the_protocols_json() {
        let body = serde_json::json!({"text": "hi"});
        let send = Request::Send {
            req: "r1",
            ope: Ope::Single,
            to: 21,
            kind: "text",
            body: &body,
        };
        assert_eq!(
            send.to_json(),
            r#"{"op":"send","req":"r1","ope":0,"to":21,"type":"text","body":{"text":"hi"}}"#
        );
        let sync = Request::Sync {
            since: 3,
            limit: 200,
            group: None,
        };
        assert_eq!(sync.to_json(), r#"{"op":"sync","since":3,"limit":200}"#);
        assert_eq!(Request::Ping.to_json(), r#"{"op":"ping"}"#);
        let st = Request::SetStatus {
            status: Status::Away,
            text: "lunch",
        };
        assert_eq!(
            st.to_json(),
            r#"{"op":"set_status","status":"away","text":"lunch"}"#
        );
    }
}
