//! What the demo reads back from the app servers' logs: the `received`
//! lines their demo connections write for a message.

use iim_kit::deploy::{Deployment, server_name};
use iim_kit::proc::strip_ansi;
use std::time::Duration;

/// How long the lines of a delivered message may take to reach the logs.
const LOG_WAIT: Duration = Duration::from_secs(2);

/// The `received` lines for message `id` in the servers' logs, as
/// (server, user, line), waiting up to [`LOG_WAIT`] for all of `expected`
/// to appear.
pub(super) async fn received_lines(
    dep: &Deployment,
    id: &str,
    expected: &[(u32, u64)],
) -> Vec<(u32, u64, String)> {
    let mut found = Vec::new();
    let _all_there = iim_kit::poll_until(LOG_WAIT, async || {
        found = scan(dep, id, expected);
        Ok(expected
            .iter()
            .all(|&(s, u)| found.iter().any(|(fs, fu, _)| (*fs, *fu) == (s, u))))
    })
    .await;
    found
}

fn scan(dep: &Deployment, id: &str, expected: &[(u32, u64)]) -> Vec<(u32, u64, String)> {
    let mut found = Vec::new();
    for &(server, _) in expected {
        let text = std::fs::read_to_string(dep.log(&server_name(server))).unwrap_or_default();
        for line in text.lines().map(strip_ansi) {
            if line.contains("received") && mentions(&line, "id=", id) {
                let user = user_of(&line).unwrap_or(0);
                found.push((server, user, without_timestamp(&line)));
            }
        }
    }
    found
}

/// Whether `line` holds `key` immediately followed by exactly `value`.
fn mentions(line: &str, key: &str, value: &str) -> bool {
    line.match_indices(key).any(|(i, _)| {
        let rest = &line[i + key.len()..];
        rest.strip_prefix(value)
            .is_some_and(|after| after.is_empty() || after.starts_with([' ', '}', ',']))
    })
}

/// The `user=N` of the demo connection's span.
fn user_of(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once("user=")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn without_timestamp(line: &str) -> String {
    match line.split_once(' ') {
        Some((first, rest)) if first.ends_with('Z') && first.contains('T') => {
            rest.trim().to_owned()
        }
        _ => line.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_received_lines_for_one_message() {
        let line = "2025-01-01T00:00:00.123456Z  INFO demo{server=2 user=2001}: received \
                    id=1.1.1 from=(1,1001) target=(0,0) text=hi";
        assert!(mentions(line, "id=", "1.1.1"));
        assert!(!mentions(line, "id=", "1.1.10"));
        assert!(!mentions(line, "id=", "1.1"));
        assert_eq!(user_of(line), Some(2001));
        assert!(without_timestamp(line).starts_with("INFO demo{server=2"));
    }
}
