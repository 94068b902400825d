//! Client frames as JSON. One step, [`parse_request`], turns a text frame
//! from an authenticated client into a validated [`Request`] (every refusal
//! names the field); [`parse_hello`] does the same for the first frame.
//! Answers and errors are rendered here too (pushes are rendered by
//! `crate::push`). Pure functions; the connection task does the IO.

use super::{DEFAULT_DEVICE, MAX_DEVICE_CHARS};
use crate::chat::{
    ChatError, ClientReq, LengthError, MessageType, Ope, SendRequest, SyncRequest, check_chars,
};
use crate::codes::{ErrorCode, Op};
use crate::config::ClientLimits;
use iim::presence::Status;
use iim::types::UserId;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;

/// Longest status text, in characters (the sessions table's column).
pub(super) const MAX_STATUS_TEXT_CHARS: usize = 140;
/// Most users in one `presence_subscribe`.
pub(super) const MAX_SUBSCRIBE: usize = 500;
/// How much of an unknown op an error message repeats, in characters.
const SHOWN_OP_CHARS: usize = 32;

/// An `error` frame.
#[derive(Debug, Serialize)]
struct ErrorFrame<'a> {
    op: &'static str,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    req: Option<&'a str>,
    message: &'a str,
}

pub(super) fn error_frame(code: ErrorCode, req: Option<&str>, message: &str) -> String {
    serde_json::to_string(&ErrorFrame {
        op: "error",
        code: code.as_str(),
        req,
        message,
    })
    .unwrap_or_default()
}

/// A failed request: the error frame to send back.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) code: ErrorCode,
    pub(super) message: String,
}

impl Refusal {
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<ChatError> for Refusal {
    fn from(e: ChatError) -> Refusal {
        Refusal::new(e.code(), e.to_string())
    }
}

pub(super) fn bad(field: &str, what: impl std::fmt::Display) -> Refusal {
    Refusal::new(ErrorCode::BadRequest, format!("{field}: {what}"))
}

/// A request from an authenticated client, validated.
#[derive(Debug)]
pub(super) enum Request {
    Send(SendRequest),
    Sync(SyncRequest),
    Ping,
    SetStatus {
        status: Status,
        text: String,
    },
    PresenceSubscribe(Vec<UserId>),
    /// Mark a conversation read up to `seq`.
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

/// A text frame from an authenticated client, parsed once.
#[derive(Debug)]
pub(super) struct Parsed {
    /// The `client_ops` label: the op, `other` for an op this server does
    /// not know, `None` when the frame has no string `op`.
    pub(super) op_label: Option<&'static str>,
    /// The frame's `req`, when it is a valid one (echoed on errors).
    pub(super) req: Option<ClientReq>,
    pub(super) request: Result<Request, Refusal>,
}

/// Parse and validate a text frame from `user`'s authenticated client.
pub(super) fn parse_request(text: &str, user: UserId, limits: &ClientLimits) -> Parsed {
    let f = match Fields::parse(text) {
        Ok(f) => f,
        Err(r) => {
            return Parsed {
                op_label: None,
                req: None,
                request: Err(r),
            };
        }
    };
    let req = f.client_req().ok().flatten();
    let op: String = match f.req("op", "a string") {
        Ok(op) => op,
        Err(r) => {
            return Parsed {
                op_label: None,
                req,
                request: Err(r),
            };
        }
    };
    let Some(op) = Op::parse(&op) else {
        let shown: String = op.chars().take(SHOWN_OP_CHARS).collect();
        return Parsed {
            op_label: Some("other"),
            req,
            request: Err(Refusal::new(
                ErrorCode::UnknownOp,
                format!("unknown op {shown:?}"),
            )),
        };
    };
    let request = match op {
        Op::Send => parse_send(&f, user, limits.max_body_depth).map(Request::Send),
        Op::Sync => parse_sync(&f, limits.sync_page_max).map(Request::Sync),
        Op::Ping => Ok(Request::Ping),
        Op::SetStatus => parse_status(&f).map(|(status, text)| Request::SetStatus { status, text }),
        Op::PresenceSubscribe => parse_subscribe(&f).map(Request::PresenceSubscribe),
        Op::Read => parse_read(&f),
        Op::ReadState => Ok(Request::ReadState),
        Op::Typing => parse_conversation(&f).map(|(ope, to)| Request::Typing { ope, to }),
        Op::Auth => Err(bad("op", "already authenticated")),
    };
    Parsed {
        op_label: Some(op.as_str()),
        req,
        request,
    }
}

/// The fields of a client frame, values left unparsed until an op asks.
struct Fields<'a>(HashMap<String, &'a RawValue>);

impl<'a> Fields<'a> {
    fn parse(text: &'a str) -> Result<Self, Refusal> {
        match serde_json::from_str::<HashMap<String, &'a RawValue>>(text) {
            Ok(m) => Ok(Fields(m)),
            Err(e) if e.is_data() => Err(Refusal::new(
                ErrorCode::BadRequest,
                "a frame must be a JSON object with an \"op\"",
            )),
            Err(e) => Err(Refusal::new(
                ErrorCode::InvalidJson,
                format!("not valid JSON: {e}"),
            )),
        }
    }

    /// The field, absent when missing or `null`.
    fn raw(&self, name: &str) -> Option<&'a RawValue> {
        self.0.get(name).copied().filter(|v| v.get() != "null")
    }

    fn opt<T: Deserialize<'a>>(&self, name: &str, what: &str) -> Result<Option<T>, Refusal> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => serde_json::from_str(v.get())
                .map(Some)
                .map_err(|_| bad(name, format!("must be {what}"))),
        }
    }

    fn req<T: Deserialize<'a>>(&self, name: &str, what: &str) -> Result<T, Refusal> {
        self.opt(name, what)?
            .ok_or_else(|| bad(name, format!("required ({what})")))
    }

    /// A string field, made into `T` by `check`.
    fn checked<T>(
        &self,
        name: &str,
        check: impl FnOnce(String) -> Result<T, LengthError>,
    ) -> Result<Option<T>, Refusal> {
        self.opt::<String>(name, "a string")?
            .map(check)
            .transpose()
            .map_err(|e| bad(name, e))
    }

    fn string(&self, name: &str, max_chars: usize) -> Result<Option<String>, Refusal> {
        self.checked(name, |s| check_chars(s, max_chars))
    }

    /// `req`, the one place a client's message id is read.
    fn client_req(&self) -> Result<Option<ClientReq>, Refusal> {
        self.checked("req", ClientReq::parse)
    }

    /// A non-negative integer.
    fn u64(&self, name: &str) -> Result<Option<u64>, Refusal> {
        match self.opt::<serde_json::Number>(name, "a non-negative integer")? {
            None => Ok(None),
            Some(n) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad(name, "must be a non-negative integer")),
        }
    }
}

/// The `req` of a frame we refuse without handling (too large, rate
/// limited), when it has a valid one, so the client knows what to retry.
pub(super) fn peek_req(text: &str) -> Option<ClientReq> {
    Fields::parse(text).ok()?.client_req().ok().flatten()
}

/// Translate a `send` frame into a [`SendRequest`].
fn parse_send(f: &Fields<'_>, user: UserId, max_depth: usize) -> Result<SendRequest, Refusal> {
    let req = f.client_req()?.ok_or_else(|| {
        bad(
            "req",
            format!("required (1..={} characters)", ClientReq::MAX_CHARS),
        )
    })?;
    if let Some(from) = f.raw("from") {
        match serde_json::from_str::<u64>(from.get()) {
            Ok(u) if u == user.0 => {}
            Ok(_) => {
                return Err(Refusal::new(
                    ErrorCode::ForgedFrom,
                    "from: must be the authenticated user (or absent)",
                ));
            }
            Err(_) => return Err(bad("from", "must be a user id")),
        }
    }
    let ope = match f.u64("ope")? {
        Some(0) => Ope::Single,
        Some(1) => Ope::Group,
        Some(_) => return Err(bad("ope", "must be 0 (single) or 1 (group)")),
        None => return Err(bad("ope", "required (0 single, 1 group)")),
    };
    let to = match f.u64("to")? {
        Some(0) => return Err(bad("to", "0 is not a user or group")),
        Some(t) => t,
        None => return Err(bad("to", "required (a user id, or a group id)")),
    };
    let kind = f.checked("type", MessageType::parse)?.ok_or_else(|| {
        bad(
            "type",
            format!("required (1..={} characters)", MessageType::MAX_CHARS),
        )
    })?;
    // `body` is required but may be any JSON, null included.
    let body =
        f.0.get("body")
            .map(|v| (*v).to_owned())
            .ok_or_else(|| bad("body", "required (any JSON value)"))?;
    let ex = f.raw("ex").map(|v| v.to_owned());
    // Stored as sent and handed to every client that syncs it: nesting
    // that would exhaust a client's parser is refused here.
    for (field, v) in [("body", Some(&body)), ("ex", ex.as_ref())] {
        if let Some(v) = v
            && json_depth(v.get()) > max_depth
        {
            return Err(bad(field, format!("nested deeper than {max_depth} levels")));
        }
    }
    Ok(SendRequest {
        req,
        ope,
        to,
        kind,
        body,
        ex,
    })
}

/// How deep `json` (valid JSON) nests arrays and objects, counted without
/// recursion.
pub(super) fn json_depth(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Translate a `sync` frame into a [`SyncRequest`].
fn parse_sync(f: &Fields<'_>, page_max: u32) -> Result<SyncRequest, Refusal> {
    let since = f.u64("since")?.ok_or_else(|| {
        bad(
            "since",
            "required (the highest sequence the client holds, 0 for none)",
        )
    })?;
    let group = match f.u64("group")? {
        Some(0) => return Err(bad("group", "0 is not a group")),
        g => g,
    };
    let limit = match f.opt::<serde_json::Number>("limit", "an integer")? {
        None => page_max,
        Some(n) => match (n.as_u64(), n.as_i64()) {
            (Some(v), _) => v.clamp(1, u64::from(page_max)) as u32,
            (None, Some(_)) => 1,
            (None, None) => return Err(bad("limit", "must be an integer")),
        },
    };
    Ok(SyncRequest {
        group,
        since,
        limit,
    })
}

/// `ope` and `to`: a conversation, as a `send` names it.
fn parse_conversation(f: &Fields<'_>) -> Result<(Ope, u64), Refusal> {
    let ope = match f.u64("ope")? {
        Some(0) => Ope::Single,
        Some(1) => Ope::Group,
        Some(_) => return Err(bad("ope", "must be 0 (single) or 1 (group)")),
        None => return Err(bad("ope", "required (0 single, 1 group)")),
    };
    let to = match f.u64("to")? {
        Some(0) => return Err(bad("to", "0 is not a user or group")),
        Some(t) => t,
        None => return Err(bad("to", "required (a user id, or a group id)")),
    };
    Ok((ope, to))
}

/// `read`: a conversation and the sequence it is read up to.
fn parse_read(f: &Fields<'_>) -> Result<Request, Refusal> {
    let (ope, to) = parse_conversation(f)?;
    let seq = match f.u64("seq")? {
        Some(0) => return Err(bad("seq", "must be at least 1 (the sequence read up to)")),
        Some(s) => s,
        None => {
            return Err(bad(
                "seq",
                "required (your inbox sequence, or a large group's timeline sequence, read up to)",
            ));
        }
    };
    Ok(Request::Read { ope, to, seq })
}

/// `set_status`: a status a client may choose, and an optional text.
fn parse_status(f: &Fields<'_>) -> Result<(Status, String), Refusal> {
    let status: Status = f.req("status", "one of online, away, busy")?;
    if status == Status::Offline {
        return Err(bad(
            "status",
            "one of online, away, busy (offline is not having a connection)",
        ));
    }
    let text = f.string("text", MAX_STATUS_TEXT_CHARS)?.unwrap_or_default();
    Ok((status, text))
}

/// `presence_subscribe`: the users to watch.
fn parse_subscribe(f: &Fields<'_>) -> Result<Vec<UserId>, Refusal> {
    let users: Vec<u64> = f.req("users", "an array of user ids")?;
    if users.len() > MAX_SUBSCRIBE {
        return Err(bad("users", format!("at most {MAX_SUBSCRIBE} per request")));
    }
    Ok(users.into_iter().map(UserId).collect())
}

/// What the client sent first.
#[derive(Debug)]
pub(super) enum Hello {
    Auth {
        token: Option<String>,
        device: String,
    },
    Other,
}

/// The first frame: an `auth` (its token and device checked for form), or
/// something else. An `auth` with a bad field is refused with the reason.
pub(super) fn parse_hello(text: &str) -> Result<Hello, Refusal> {
    let Ok(f) = Fields::parse(text) else {
        return Ok(Hello::Other);
    };
    if f.opt::<String>("op", "a string").ok().flatten().as_deref() != Some(Op::Auth.as_str()) {
        return Ok(Hello::Other);
    }
    let failed = |r: Refusal| Refusal::new(ErrorCode::AuthFailed, r.message);
    let token = f
        .opt::<String>("token", "a string")
        .map_err(failed)?
        .filter(|t| !t.is_empty());
    let device = f
        .string("device", MAX_DEVICE_CHARS)
        .map_err(failed)?
        .unwrap_or_else(|| DEFAULT_DEVICE.to_string());
    if device.chars().any(char::is_control) {
        return Err(Refusal::new(
            ErrorCode::AuthFailed,
            "device: must not contain control characters",
        ));
    }
    Ok(Hello::Auth { token, device })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Ope;

    const ME: UserId = UserId(5);

    fn parse(text: &str) -> Parsed {
        parse_request(text, ME, &ClientLimits::default())
    }

    fn send(text: &str) -> Result<SendRequest, Refusal> {
        match parse(text).request {
            Ok(Request::Send(s)) => Ok(s),
            Ok(other) => panic!("not a send: {other:?}"),
            Err(r) => Err(r),
        }
    }

    fn sync(text: &str) -> Result<SyncRequest, Refusal> {
        match parse(text).request {
            Ok(Request::Sync(s)) => Ok(s),
            Ok(other) => panic!("not a sync: {other:?}"),
            Err(r) => Err(r),
        }
    }

    #[test]
    fn send_frames_are_validated_field_by_field() {
        let ok = send(
            r#"{"op":"send","req":"c-1","ope":0,"to":7,"type":"text","body":{"b":1, "a":[2]},"ex":{"k":"v"}}"#,
        )
        .unwrap();
        assert_eq!((ok.req.as_str(), ok.ope, ok.to), ("c-1", Ope::Single, 7));
        assert_eq!(ok.body.get(), r#"{"b":1, "a":[2]}"#, "body kept verbatim");
        assert_eq!(ok.ex.unwrap().get(), r#"{"k":"v"}"#);
        let base = r#""op":"send","req":"c-1","ope":0,"to":7,"type":"text","body":1"#;
        assert!(send(&format!("{{{base},\"from\":5}}")).is_ok());
        assert_eq!(
            send(&format!("{{{base},\"from\":6}}")).unwrap_err().code,
            ErrorCode::ForgedFrom
        );
        for (frame, field) in [
            (r#"{"op":"send","ope":0,"to":7,"type":"t","body":1}"#, "req"),
            (
                r#"{"op":"send","req":"","ope":0,"to":7,"type":"t","body":1}"#,
                "req",
            ),
            (
                r#"{"op":"send","req":"c","ope":2,"to":7,"type":"t","body":1}"#,
                "ope",
            ),
            (
                r#"{"op":"send","req":"c","ope":0,"to":-7,"type":"t","body":1}"#,
                "to",
            ),
            (r#"{"op":"send","req":"c","ope":0,"to":7,"body":1}"#, "type"),
            (
                r#"{"op":"send","req":"c","ope":0,"to":7,"type":"t"}"#,
                "body",
            ),
            (
                r#"{"op":"send","req":"c","ope":0,"to":7,"type":"t","body":1,"from":"5"}"#,
                "from",
            ),
        ] {
            let r = send(frame).unwrap_err();
            assert_eq!(r.code, ErrorCode::BadRequest, "{frame}");
            assert!(r.message.starts_with(field), "{frame}: {}", r.message);
        }
        let long = format!(
            r#"{{"op":"send","req":"{}","ope":0,"to":7,"type":"t","body":1}}"#,
            "x".repeat(65)
        );
        assert!(send(&long).unwrap_err().message.starts_with("req"));
    }

    #[test]
    fn req_and_type_are_counted_in_characters_everywhere() {
        // 64 characters of 4 bytes each: a valid req (256 bytes); 32 such
        // characters: a valid type.
        let req = "\u{1f600}".repeat(64);
        let kind = "\u{e9}".repeat(32);
        let frame =
            format!(r#"{{"op":"send","req":"{req}","ope":0,"to":7,"type":"{kind}","body":1}}"#);
        let s = send(&frame).unwrap();
        assert_eq!(
            (s.req.as_str(), s.kind.as_str()),
            (req.as_str(), kind.as_str())
        );
        assert_eq!(peek_req(&frame).unwrap().as_str(), req);
        let over = format!(r#"{{"op":"ping","req":"{req}x"}}"#);
        let p = parse(&over);
        assert!(
            p.req.is_none() && peek_req(&over).is_none(),
            "65 characters"
        );
        assert!(
            matches!(p.request, Ok(Request::Ping)),
            "a bad req only goes unechoed"
        );
    }

    #[test]
    fn ops_are_labelled_and_a_bad_frame_keeps_its_req() {
        let p = parse(r#"{"op":"teleport","req":"r-1"}"#);
        assert_eq!(p.op_label, Some("other"));
        assert_eq!(p.req.unwrap().as_str(), "r-1");
        let r = p.request.unwrap_err();
        assert_eq!(r.code, ErrorCode::UnknownOp);
        assert!(r.message.contains("teleport"));
        let p = parse(r#"{"op":"auth","token":"t"}"#);
        assert_eq!(p.op_label, Some("auth"));
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadRequest);
        let p = parse(r#"{"nop":1,"req":"r-2"}"#);
        assert_eq!((p.op_label, p.req.unwrap().as_str()), (None, "r-2"));
        assert!(matches!(
            parse(r#"{"op":"ping"}"#).request,
            Ok(Request::Ping)
        ));
        match parse(r#"{"op":"set_status","status":"away","text":"lunch"}"#).request {
            Ok(Request::SetStatus { status, text }) => {
                assert_eq!((status, text.as_str()), (Status::Away, "lunch"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(r#"{"op":"set_status","status":"offline"}"#)
                .request
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        match parse(r#"{"op":"presence_subscribe","users":[2,3]}"#).request {
            Ok(Request::PresenceSubscribe(u)) => assert_eq!(u, [UserId(2), UserId(3)]),
            other => panic!("{other:?}"),
        }
        let many = format!(
            r#"{{"op":"presence_subscribe","users":{:?}}}"#,
            vec![1; 501]
        );
        assert!(parse(&many).request.is_err());
    }

    #[test]
    fn sync_frames_clamp_the_limit_and_refuse_negative_cursors() {
        let s = sync(r#"{"op":"sync","since":17,"limit":100}"#).unwrap();
        assert_eq!((s.group, s.since, s.limit), (None, 17, 100));
        assert_eq!(sync(r#"{"op":"sync","since":0}"#).unwrap().limit, 200);
        assert_eq!(
            sync(r#"{"op":"sync","since":0,"limit":9999}"#)
                .unwrap()
                .limit,
            200
        );
        assert_eq!(
            sync(r#"{"op":"sync","since":0,"limit":0}"#).unwrap().limit,
            1
        );
        assert_eq!(
            sync(r#"{"op":"sync","since":0,"limit":-3}"#).unwrap().limit,
            1
        );
        assert_eq!(
            sync(r#"{"op":"sync","group":77,"since":0}"#).unwrap().group,
            Some(77)
        );
        for (frame, field) in [
            (r#"{"op":"sync","since":-1}"#, "since"),
            (r#"{"op":"sync","since":1.5}"#, "since"),
            (r#"{"op":"sync"}"#, "since"),
            (r#"{"op":"sync","since":"3"}"#, "since"),
            (r#"{"op":"sync","since":0,"limit":2.5}"#, "limit"),
            (r#"{"op":"sync","since":0,"group":0}"#, "group"),
        ] {
            let r = sync(frame).unwrap_err();
            assert!(r.message.starts_with(field), "{frame}: {}", r.message);
        }
    }

    #[test]
    fn read_and_typing_frames_name_a_conversation() {
        match parse(r#"{"op":"read","ope":0,"to":7,"seq":42}"#).request {
            Ok(Request::Read { ope, to, seq }) => assert_eq!((ope, to, seq), (Ope::Single, 7, 42)),
            other => panic!("{other:?}"),
        }
        match parse(r#"{"op":"typing","ope":1,"to":77}"#).request {
            Ok(Request::Typing { ope, to }) => assert_eq!((ope, to), (Ope::Group, 77)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(r#"{"op":"read_state"}"#).request,
            Ok(Request::ReadState)
        ));
        for (frame, field) in [
            (r#"{"op":"read","ope":0,"to":7}"#, "seq"),
            (r#"{"op":"read","ope":0,"to":7,"seq":0}"#, "seq"),
            (r#"{"op":"read","ope":0,"to":7,"seq":-1}"#, "seq"),
            (r#"{"op":"read","ope":0,"to":7,"seq":"4"}"#, "seq"),
            (r#"{"op":"read","ope":2,"to":7,"seq":4}"#, "ope"),
            (r#"{"op":"read","ope":0,"seq":4}"#, "to"),
            (r#"{"op":"typing","ope":0,"to":0}"#, "to"),
            (r#"{"op":"typing","to":5}"#, "ope"),
        ] {
            let r = parse(frame).request.unwrap_err();
            assert_eq!(r.code, ErrorCode::BadRequest, "{frame}");
            assert!(r.message.starts_with(field), "{frame}: {}", r.message);
        }
    }

    #[test]
    fn garbage_is_invalid_json_and_non_objects_are_bad_requests() {
        let code = |t: &str| parse(t).request.unwrap_err().code;
        assert_eq!(code("{nope"), ErrorCode::InvalidJson);
        assert_eq!(code(""), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code("42"), ErrorCode::BadRequest);
    }

    #[test]
    fn hello_names_the_device() {
        match parse_hello(r#"{"op":"auth","token":"t","device":"phone"}"#) {
            Ok(Hello::Auth { token, device }) => {
                assert_eq!((token.as_deref(), device.as_str()), (Some("t"), "phone"))
            }
            _ => panic!("not auth"),
        }
        match parse_hello(r#"{"op":"auth","token":""}"#) {
            Ok(Hello::Auth { token, device }) => {
                assert_eq!((token, device.as_str()), (None, DEFAULT_DEVICE))
            }
            _ => panic!("not auth"),
        }
        assert!(matches!(parse_hello(r#"{"op":"ping"}"#), Ok(Hello::Other)));
        assert!(matches!(parse_hello("nonsense"), Ok(Hello::Other)));
        let e = parse_hello(r#"{"op":"auth","token":"t","device":"a\nb"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::AuthFailed);
        assert!(
            parse_hello(&format!(
                r#"{{"op":"auth","token":"t","device":"{}"}}"#,
                "d".repeat(65)
            ))
            .is_err()
        );
    }
}
