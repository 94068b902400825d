//! The admin API's JSON, as the app server reads and writes it and its
//! clients (iimctl, the test kit) send and read it.

use serde::{Deserialize, Serialize};

/// `POST` here sends a text message ([`SendRequest`] → [`SendResponse`]).
pub const SEND_PATH: &str = "/admin/send";
/// `GET` here answers `ok` while the daemon runs. Served beside
/// `/metrics`, without authentication (it says nothing but "alive").
pub const HEALTH_PATH: &str = "/health";
/// The shortest admin bearer token accepted.
pub const MIN_TOKEN_BYTES: usize = 32;
/// The sender of a [`SendRequest`] without `from`: the app server itself.
pub const SYSTEM_SENDER: u64 = 0;
/// Most recipients one [`SendRequest`] may name.
pub const MAX_RECIPIENTS: usize = 10_000;

/// A text message from user `from` (on the app server asked) to users
/// wherever they are connected. `from` is [`SYSTEM_SENDER`] (0, the
/// default) or one of the users the app server's `admin.senders` lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    #[serde(default)]
    pub from: u64,
    pub to: Vec<u64>,
    pub text: String,
}

/// One target server's outcome, as the wire names it (`delivered`,
/// `unknown_server`, `server_down`, `timed_out`, `overloaded`, `refused`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerOutcome {
    pub server: u32,
    pub status: String,
}

/// The delivery report of one send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResponse {
    /// The message id, `origin.epoch.seq`.
    pub id: String,
    /// Connections the recipients had when the message was sent.
    pub sessions: usize,
    /// Connections on the sending server: delivered in process, or gone.
    pub local_delivered: usize,
    pub local_missing: usize,
    /// One entry per other server the message went to.
    pub servers: Vec<ServerOutcome>,
}

impl SendResponse {
    /// Every targeted server acknowledged, no local session went missing,
    /// and at least one session was targeted at all.
    pub fn all_delivered(&self) -> bool {
        self.sessions > 0
            && self.local_missing == 0
            && self.servers.iter().all(|s| s.status == "delivered")
    }

    /// What server `server` reported, if it was a target.
    pub fn status_of(&self, server: u32) -> Option<&str> {
        self.servers
            .iter()
            .find(|s| s.server == server)
            .map(|s| s.status.as_str())
    }
}

/// The admin bearer token in `path`: the file's text without surrounding
/// white space, at least [`MIN_TOKEN_BYTES`] long.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "the admin token in {} has {} bytes; at least {MIN_TOKEN_BYTES} are required",
            path.display(),
            token.len()
        ));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let report = |json: &str| serde_json::from_str::<SendResponse>(json).unwrap();
        let ok = report(
            r#"{"id":"1.1.7","sessions":2,"local_delivered":1,"local_missing":0,
                "servers":[{"server":2,"status":"delivered"}]}"#,
        );
        assert!(ok.all_delivered());
        assert_eq!(
            (ok.status_of(2), ok.status_of(4)),
            (Some("delivered"), None)
        );
        let gone = report(
            r#"{"id":"1.1.8","sessions":1,"local_delivered":0,"local_missing":1,"servers":[]}"#,
        );
        assert!(!gone.all_delivered(), "a local connection went missing");
        let nobody = report(
            r#"{"id":"1.1.9","sessions":0,"local_delivered":0,"local_missing":0,"servers":[]}"#,
        );
        assert!(!nobody.all_delivered(), "nobody targeted is not a success");
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let ok: SendRequest =
            serde_json::from_str(r#"{"from":1001,"to":[2001],"text":"hi"}"#).unwrap();
        assert_eq!(ok.to, vec![2001]);
        assert!(
            serde_json::from_str::<SendRequest>(r#"{"from":1,"to":[],"text":"","x":1}"#).is_err()
        );
    }
}
