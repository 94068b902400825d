//! How iimctl shows things: registry tables (and their JSON), send reports,
//! UTC times and ages. Pure functions of their inputs; time is passed in.

use iim::registry::{ExchangeLink, Role, ServerRecord, ServerState};
use iim::types::{ServerId, Session};
use iim_http::admin::SendResponse;
use serde::Serialize;

/// A delivery report (the admin API's answer), one line per target
/// server.
pub fn render_report(r: &SendResponse) -> String {
    let mut out = format!(
        "message {}: {} session{} targeted\n",
        r.id,
        r.sessions,
        plural(r.sessions)
    );
    if r.sessions == 0 {
        out.push_str("  none of these users is connected anywhere: nothing was sent\n");
        return out;
    }
    if r.local_delivered + r.local_missing > 0 {
        out.push_str(&format!(
            "  local       delivered to {} connection{}, {} missing\n",
            r.local_delivered,
            plural(r.local_delivered),
            r.local_missing
        ));
    }
    for s in &r.servers {
        out.push_str(&format!(
            "  server {:<4} {}\n",
            s.server,
            explain_status(&s.status)
        ));
    }
    out
}

/// A status as the wire names it, with a hint for the ones that need one.
fn explain_status(status: &str) -> String {
    let hint = match status {
        "unknown_server" => " (the exchange does not know this server)",
        "server_down" => " (the server is down or its link is gone)",
        "timed_out" => " (no outcome before the send timeout)",
        "overloaded" => {
            " (the exchange's queue for this server is full, or the message is larger than it accepts)"
        }
        "refused" => " (the exchange refused the forward request as malformed)",
        _ => "",
    };
    format!("{status}{hint}")
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub fn servers_table(servers: &[ServerRecord], now_ms: i64) -> String {
    if servers.is_empty() {
        return "no servers registered\n".to_owned();
    }
    let rows = servers
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.role.to_string(),
                s.state.to_string(),
                s.epoch.to_string(),
                s.address.clone(),
                match s.exchange {
                    // The attachment and its fence: "100 #3" is the third
                    // registration an exchange recorded, by exchange 100.
                    Some(e) => format!("{e} #{}", s.attach_epoch),
                    None => "-".to_owned(),
                },
                utc(s.registered_at_ms),
                age(now_ms - s.last_seen_ms),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "ROLE",
            "STATE",
            "EPOCH",
            "ADDRESS",
            "EXCHANGE #ATTACH",
            "REGISTERED (UTC)",
            "LAST SEEN",
        ],
        rows,
    )
}

/// The links between exchanges, one line per pair of exchanges that are
/// up or that recorded a link: `up` when both record the other, `one-way`
/// when only one does (a link coming up or going down, or a recording
/// that failed), `down` when neither does, `stale` when an exchange of the
/// pair is not up (it recorded the link before it stopped or died).
/// Empty when there is at most one exchange and no link is recorded.
pub fn links_table(servers: &[ServerRecord], links: &[ExchangeLink]) -> String {
    let up: Vec<ServerId> = servers
        .iter()
        .filter(|s| s.role == Role::Exchange && s.state == ServerState::Up)
        .map(|s| s.id)
        .collect();
    let recorded = |a: ServerId, b: ServerId| {
        links
            .iter()
            .find(|l| l.exchange == a && l.peer == b)
            .map(|l| l.since_ms)
    };
    let mut pairs = std::collections::BTreeSet::new();
    for (i, a) in up.iter().enumerate() {
        for b in &up[i + 1..] {
            pairs.insert((*a, *b));
        }
    }
    for l in links {
        pairs.insert((l.exchange.min(l.peer), l.exchange.max(l.peer)));
    }
    if pairs.is_empty() {
        return String::new();
    }
    let rows = pairs
        .into_iter()
        .map(|(a, b)| {
            let (ab, ba) = (recorded(a, b), recorded(b, a));
            let not_up: Vec<String> = [a, b]
                .iter()
                .filter(|x| !up.contains(x))
                .map(|x| x.to_string())
                .collect();
            let state = if !not_up.is_empty() {
                format!("stale ({} not up)", not_up.join(", "))
            } else {
                match (ab, ba) {
                    (Some(_), Some(_)) => "up".to_owned(),
                    (Some(_), None) => format!("one-way (recorded by {a} only)"),
                    (None, Some(_)) => format!("one-way (recorded by {b} only)"),
                    (None, None) => "down".to_owned(),
                }
            };
            let since = match (ab, ba) {
                (Some(x), Some(y)) => utc(x.max(y)),
                (Some(x), None) | (None, Some(x)) => utc(x),
                (None, None) => "-".to_owned(),
            };
            vec![format!("{a} - {b}"), state, since]
        })
        .collect();
    table(&["EXCHANGE LINK", "STATE", "SINCE (UTC)"], rows)
}

/// A server row for `--json`, fields in table order.
#[derive(Debug, Serialize)]
pub struct ServerJson {
    pub id: u32,
    pub role: &'static str,
    pub state: &'static str,
    pub epoch: u64,
    pub address: String,
    pub exchange: Option<u32>,
    pub attach_epoch: u64,
    pub registered_at: String,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
    /// For an exchange: the peer exchanges it recorded a live link to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub links: Option<Vec<LinkJson>>,
}

/// A recorded link of an exchange, for `--json`.
#[derive(Debug, Serialize)]
pub struct LinkJson {
    pub peer: u32,
    pub since_ms: i64,
}

pub fn servers_json(servers: &[ServerRecord], links: &[ExchangeLink]) -> Vec<ServerJson> {
    servers
        .iter()
        .map(|s| ServerJson {
            links: (s.role == Role::Exchange).then(|| {
                links
                    .iter()
                    .filter(|l| l.exchange == s.id)
                    .map(|l| LinkJson {
                        peer: l.peer.0,
                        since_ms: l.since_ms,
                    })
                    .collect()
            }),
            id: s.id.0,
            role: s.role.as_str(),
            state: s.state.as_str(),
            epoch: s.epoch,
            address: s.address.clone(),
            exchange: s.exchange.map(|e| e.0),
            attach_epoch: s.attach_epoch,
            registered_at: utc(s.registered_at_ms),
            registered_at_ms: s.registered_at_ms,
            last_seen_ms: s.last_seen_ms,
        })
        .collect()
}

pub fn sessions_table(sessions: &[Session]) -> String {
    if sessions.is_empty() {
        return "nobody is online\n".to_owned();
    }
    let rows = sessions
        .iter()
        .map(|s| {
            vec![
                s.user.to_string(),
                s.device.clone(),
                s.server.to_string(),
                s.channel.to_string(),
            ]
        })
        .collect();
    table(&["USER", "DEVICE", "SERVER", "CHANNEL"], rows)
}

/// A session for `--json`. The channel is a hex string: channel ids use all
/// 64 bits (the epoch sits in the high ones), more than a JSON number keeps
/// exactly in most tools.
#[derive(Debug, Serialize)]
pub struct SessionJson {
    pub user: u64,
    pub device: String,
    pub server: u32,
    pub channel: String,
}

pub fn sessions_json(sessions: &[Session]) -> Vec<SessionJson> {
    sessions
        .iter()
        .map(|s| SessionJson {
            user: s.user.0,
            device: s.device.clone(),
            server: s.server.0,
            channel: s.channel.to_string(),
        })
        .collect()
}

/// Left-aligned columns separated by two spaces, header first.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = headers.iter().map(|h| h.to_string()).collect::<Vec<_>>();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(&format!("{cell:<w$}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Unix milliseconds as RFC 3339 UTC to the second.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (y, m, d).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An elapsed time in milliseconds as "3s ago", "4m ago", "2h ago", "5d ago".
/// Negative (the writer's clock is ahead of ours) reads "in 2s".
pub fn age(elapsed_ms: i64) -> String {
    let secs = elapsed_ms.unsigned_abs() / 1000;
    let text = match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if elapsed_ms < -999 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iim::types::{ChannelId, UserId};

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn ages() {
        assert_eq!(age(0), "0s ago");
        assert_eq!(age(3_400), "3s ago");
        assert_eq!(age(125_000), "2m ago");
        assert_eq!(age(7_300_000), "2h ago");
        assert_eq!(age(3 * 86_400_000), "3d ago");
        assert_eq!(age(-500), "0s ago");
        assert_eq!(age(-2_000), "in 2s");
    }

    #[test]
    fn servers_table_aligns_columns() {
        let rec = |id, role, state, exchange| ServerRecord {
            id: ServerId(id),
            role,
            address: format!("127.0.0.1:{}", 9000 + id),
            epoch: 1,
            state,
            exchange,
            attach_epoch: 1,
            registered_at_ms: 0,
            last_seen_ms: 1_000,
        };
        let text = servers_table(
            &[
                rec(1, Role::App, ServerState::Up, Some(ServerId(100))),
                rec(100, Role::Exchange, ServerState::Up, None),
            ],
            4_000,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID   ROLE      STATE"));
        assert!(lines[1].starts_with("1    app       up"));
        assert!(lines[1].contains("127.0.0.1:9001  100 #1"), "{}", lines[1]);
        assert!(lines[1].ends_with("1970-01-01T00:00:00Z  3s ago"));
        assert!(lines[2].contains("exchange  up     1      127.0.0.1:9100  -"));
    }

    #[test]
    fn links_table_reads_both_ends() {
        let ex = |id, state| ServerRecord {
            id: ServerId(id),
            role: Role::Exchange,
            address: String::new(),
            epoch: 1,
            state,
            exchange: None,
            attach_epoch: 0,
            registered_at_ms: 0,
            last_seen_ms: 0,
        };
        let link = |a, b| ExchangeLink {
            exchange: ServerId(a),
            peer: ServerId(b),
            since_ms: 1_000 * a as i64,
        };
        let servers = [
            ex(100, ServerState::Up),
            ex(101, ServerState::Up),
            ex(102, ServerState::Up),
            ex(103, ServerState::Down),
        ];
        let links = [
            link(100, 101),
            link(101, 100),
            link(100, 102),
            link(103, 100),
        ];
        let text = links_table(&servers, &links);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let cells = |i: usize| -> Vec<&str> {
            lines[i]
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        };
        assert_eq!(cells(1), ["100 - 101", "up", "1970-01-01T00:01:41Z"]);
        assert_eq!(
            cells(2),
            [
                "100 - 102",
                "one-way (recorded by 100 only)",
                "1970-01-01T00:01:40Z"
            ]
        );
        assert_eq!(
            cells(3),
            ["100 - 103", "stale (103 not up)", "1970-01-01T00:01:43Z"]
        );
        assert_eq!(cells(4), ["101 - 102", "down", "-"]);
        assert_eq!(links_table(&servers[..1], &[]), "");
        let json = serde_json::to_value(servers_json(&servers[..1], &links)).unwrap();
        assert_eq!(json[0]["links"][1]["peer"], 102);
    }

    #[test]
    fn send_report_verdicts() {
        use iim_http::admin::ServerOutcome;
        let mut r = SendResponse {
            id: "1.1.1".into(),
            sessions: 3,
            local_delivered: 1,
            local_missing: 0,
            servers: vec![
                ServerOutcome {
                    server: 2,
                    status: "delivered".into(),
                },
                ServerOutcome {
                    server: 3,
                    status: "delivered".into(),
                },
            ],
        };
        assert!(r.all_delivered());
        assert!(render_report(&r).contains("server 3    delivered"));
        r.servers[1].status = "server_down".into();
        assert!(!r.all_delivered());
        assert_eq!(r.status_of(3), Some("server_down"));
        r.sessions = 0;
        r.servers.clear();
        assert!(!r.all_delivered());
    }

    #[test]
    fn sessions_json_keeps_channels_exact() {
        let s = Session {
            user: UserId(7),
            device: "demo".into(),
            server: ServerId(1),
            channel: ChannelId(u64::MAX),
        };
        let text = serde_json::to_string(&sessions_json(&[s])).unwrap();
        assert_eq!(
            text,
            r#"[{"user":7,"device":"demo","server":1,"channel":"0xffffffffffffffff"}]"#
        );
    }
}
