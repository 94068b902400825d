//! Client frames as JSON: parsing and validating requests field by field
//! (every refusal names the field), and rendering answers and errors
//! (pushes are rendered by `crate::push`). Pure functions; the connection
//! task in `gateway.rs` does the IO.

use super::{DEFAULT_DEVICE, MAX_DEVICE_CHARS, MAX_REQ_CHARS, MAX_TYPE_CHARS, code};
use crate::chat::{ChatError, Ope, SendRequest, SyncRequest};
use iim::presence::Status;
use iim::types::UserId;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;

/// An `error` frame.
#[derive(Debug, Serialize)]
struct ErrorFrame<'a> {
    op: &'static str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    req: Option<&'a str>,
    message: &'a str,
}

pub(super) fn error_frame(code: &str, req: Option<&str>, message: &str) -> String {
    serde_json::to_string(&ErrorFrame {
        op: "error",
        code,
        req,
        message,
    })
    .unwrap_or_default()
}

/// A failed request: the error frame to send back.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) code: &'static str,
    pub(super) message: String,
}

pub(super) fn bad(field: &str, what: impl std::fmt::Display) -> Refusal {
    Refusal {
        code: code::BAD_REQUEST,
        message: format!("{field}: {what}"),
    }
}

/// The fields of a client frame, values left unparsed until an op asks.
pub(super) struct Fields<'a>(HashMap<String, &'a RawValue>);

impl<'a> Fields<'a> {
    pub(super) fn parse(text: &'a str) -> Result<Self, Refusal> {
        match serde_json::from_str::<HashMap<String, &'a RawValue>>(text) {
            Ok(m) => Ok(Fields(m)),
            Err(e) if e.is_data() => Err(Refusal {
                code: code::BAD_REQUEST,
                message: "a frame must be a JSON object with an \"op\"".into(),
            }),
            Err(e) => Err(Refusal {
                code: code::INVALID_JSON,
                message: format!("not valid JSON: {e}"),
            }),
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

    pub(super) fn req<T: Deserialize<'a>>(&self, name: &str, what: &str) -> Result<T, Refusal> {
        self.opt(name, what)?
            .ok_or_else(|| bad(name, format!("required ({what})")))
    }

    pub(super) fn string(&self, name: &str, max_chars: usize) -> Result<Option<String>, Refusal> {
        let Some(s) = self.opt::<String>(name, "a string")? else {
            return Ok(None);
        };
        let n = s.chars().count();
        if n == 0 || n > max_chars {
            return Err(bad(name, format!("must be 1..={max_chars} characters")));
        }
        Ok(Some(s))
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
/// limited), when it is cheap to find, so the client knows what to retry.
pub(super) fn peek_req(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        req: Option<serde_json::Value>,
    }
    match serde_json::from_str::<Peek>(text).ok()?.req? {
        serde_json::Value::String(s) if (1..=MAX_REQ_CHARS).contains(&s.chars().count()) => Some(s),
        _ => None,
    }
}

/// Translate a `send` frame into a [`SendRequest`].
pub(super) fn parse_send(f: &Fields<'_>, user: UserId) -> Result<SendRequest, Refusal> {
    let req = f
        .string("req", MAX_REQ_CHARS)?
        .ok_or_else(|| bad("req", format!("required (1..={MAX_REQ_CHARS} characters)")))?;
    if let Some(from) = f.raw("from") {
        match serde_json::from_str::<u64>(from.get()) {
            Ok(u) if u == user.0 => {}
            Ok(_) => {
                return Err(Refusal {
                    code: code::FORGED_FROM,
                    message: "from: must be the authenticated user (or absent)".into(),
                });
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
    let kind = f.string("type", MAX_TYPE_CHARS)?.ok_or_else(|| {
        bad(
            "type",
            format!("required (1..={MAX_TYPE_CHARS} characters)"),
        )
    })?;
    // `body` is required but may be any JSON, null included.
    let body =
        f.0.get("body")
            .map(|v| (*v).to_owned())
            .ok_or_else(|| bad("body", "required (any JSON value)"))?;
    let ex = f.raw("ex").map(|v| v.to_owned());
    Ok(SendRequest {
        req,
        ope,
        to,
        kind,
        body,
        ex,
    })
}

/// Translate a `sync` frame into a [`SyncRequest`].
pub(super) fn parse_sync(f: &Fields<'_>, page_max: u32) -> Result<SyncRequest, Refusal> {
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

/// What the client sent first.
pub(super) enum Hello {
    Auth {
        token: Option<String>,
        device: String,
    },
    Other,
}

pub(super) fn parse_hello(text: &str) -> Result<Hello, String> {
    let Ok(f) = Fields::parse(text) else {
        return Ok(Hello::Other);
    };
    if f.opt::<String>("op", "a string").ok().flatten().as_deref() != Some("auth") {
        return Ok(Hello::Other);
    }
    let token = f
        .opt::<String>("token", "a string")
        .map_err(|r| r.message)?
        .filter(|t| !t.is_empty());
    let device = f
        .string("device", MAX_DEVICE_CHARS)
        .map_err(|r| r.message)?
        .unwrap_or_else(|| DEFAULT_DEVICE.to_string());
    if device.chars().any(char::is_control) {
        return Err("device: must not contain control characters".into());
    }
    Ok(Hello::Auth { token, device })
}

pub(super) fn chat_refusal(e: ChatError) -> Refusal {
    Refusal {
        code: e.code(),
        message: e.to_string(),
    }
}

/// `set_status`: a status a client may choose, and an optional text.
pub(super) fn parse_status(f: &Fields<'_>) -> Result<(Status, String), Refusal> {
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
pub(super) fn parse_subscribe(f: &Fields<'_>) -> Result<Vec<UserId>, Refusal> {
    let users: Vec<u64> = f.req("users", "an array of user ids")?;
    if users.len() > MAX_SUBSCRIBE {
        return Err(bad("users", format!("at most {MAX_SUBSCRIBE} per request")));
    }
    Ok(users.into_iter().map(UserId).collect())
}

/// Longest status text, in characters (the sessions table's column).
pub(super) const MAX_STATUS_TEXT_CHARS: usize = 140;
/// Most users in one `presence_subscribe`.
pub(super) const MAX_SUBSCRIBE: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Ope;

    #[test]
    fn send_frames_are_validated_field_by_field() {
        let me = UserId(5);
        let parse = |t: &str| {
            let f = Fields::parse(t).unwrap();
            parse_send(&f, me)
        };
        let ok = parse(
            r#"{"op":"send","req":"c-1","ope":0,"to":7,"type":"text","body":{"b":1, "a":[2]},"ex":{"k":"v"}}"#,
        )
        .unwrap();
        assert_eq!((ok.req.as_str(), ok.ope, ok.to), ("c-1", Ope::Single, 7));
        assert_eq!(ok.body.get(), r#"{"b":1, "a":[2]}"#, "body kept verbatim");
        assert_eq!(ok.ex.unwrap().get(), r#"{"k":"v"}"#);
        let base = r#""op":"send","req":"c-1","ope":0,"to":7,"type":"text","body":1"#;
        assert!(parse(&format!("{{{base},\"from\":5}}")).is_ok());
        assert_eq!(
            parse(&format!("{{{base},\"from\":6}}")).unwrap_err().code,
            code::FORGED_FROM
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
            let r = parse(frame).unwrap_err();
            assert_eq!(r.code, code::BAD_REQUEST, "{frame}");
            assert!(r.message.starts_with(field), "{frame}: {}", r.message);
        }
        let long = format!(
            r#"{{"op":"send","req":"{}","ope":0,"to":7,"type":"t","body":1}}"#,
            "x".repeat(65)
        );
        assert!(parse(&long).unwrap_err().message.starts_with("req"));
    }

    #[test]
    fn sync_frames_clamp_the_limit_and_refuse_negative_cursors() {
        let parse = |t: &str| parse_sync(&Fields::parse(t).unwrap(), 200);
        let s = parse(r#"{"op":"sync","since":17,"limit":100}"#).unwrap();
        assert_eq!((s.group, s.since, s.limit), (None, 17, 100));
        assert_eq!(parse(r#"{"op":"sync","since":0}"#).unwrap().limit, 200);
        assert_eq!(
            parse(r#"{"op":"sync","since":0,"limit":9999}"#)
                .unwrap()
                .limit,
            200
        );
        assert_eq!(
            parse(r#"{"op":"sync","since":0,"limit":0}"#).unwrap().limit,
            1
        );
        assert_eq!(
            parse(r#"{"op":"sync","since":0,"limit":-3}"#)
                .unwrap()
                .limit,
            1
        );
        assert_eq!(
            parse(r#"{"op":"sync","group":77,"since":0}"#)
                .unwrap()
                .group,
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
            let r = parse(frame).unwrap_err();
            assert!(r.message.starts_with(field), "{frame}: {}", r.message);
        }
    }

    #[test]
    fn garbage_is_invalid_json_and_non_objects_are_bad_requests() {
        assert_eq!(
            Fields::parse("{nope").err().unwrap().code,
            code::INVALID_JSON
        );
        assert_eq!(Fields::parse("").err().unwrap().code, code::INVALID_JSON);
        assert_eq!(
            Fields::parse("[1,2]").err().unwrap().code,
            code::BAD_REQUEST
        );
        assert_eq!(Fields::parse("42").err().unwrap().code, code::BAD_REQUEST);
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
        assert!(parse_hello(r#"{"op":"auth","token":"t","device":"a\nb"}"#).is_err());
        assert!(
            parse_hello(&format!(
                r#"{{"op":"auth","token":"t","device":"{}"}}"#,
                "d".repeat(65)
            ))
            .is_err()
        );
    }
}
