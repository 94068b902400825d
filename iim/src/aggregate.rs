//! The presence aggregate: the rule that turns a user's sessions into its
//! `presence` row, and the one writer of that row, [`recompute_in`], run
//! inside the transaction of whoever changed the sessions — the registry's
//! `begin_epoch` and `mark_down`, presence's `set_status` and `recompute` —
//! so the committed row always agrees with the committed sessions
//! (`docs/presence.md`). It opens no transaction and reads no row for a
//! caller; those belong to the registry and to presence.
//!
//! The rule: the most available status over the user's sessions
//! (`online` > `away` > `busy` > `offline`; no session: `offline`), and the
//! text of the session whose status changed last (largest `status_at`; ties
//! go to the greater text, so the result never depends on row order). An
//! `offline` aggregate always has the empty text.
//!
//! Locking: `recompute_in` locks the presence rows first (created if
//! missing, then `SELECT ... FOR UPDATE` on MySQL; on SQLite the writer
//! lock of `BEGIN IMMEDIATE` covers everything), then reads the sessions and
//! writes only rows whose `(status, text)` changed, with `version + 1`.
//! Writers of one user therefore serialise on its row, and each reads the
//! sessions as committed by all writers before it: no update is lost, no
//! version given twice. That needs `READ COMMITTED` on MySQL (the database
//! layer's write transaction): a plain read of `sessions` after taking the
//! row lock then sees every change committed before the lock was granted
//! (under `REPEATABLE READ` it could see an older snapshot), without locking
//! session rows — so a session row lock is only ever taken before a
//! presence row lock, never after, and presence rows are locked in
//! ascending (signed) id order.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, AssertSqlSafe};

use crate::db::{
    Backend, DbError, ParseNameError, bad_row, bind_all, col, nonnegative_col, parse_col,
    placeholders, server_param, sorted_user_params, user_param,
};
use crate::types::{ServerId, UserId};

/// Ids per locking statement: MariaDB turns `IN` lists of 1000 values or
/// more into a join with a temporary table.
const LOCK_CHUNK: usize = 500;

/// A user's (or one connection's) availability. `Ord` is availability:
/// `Offline < Busy < Away < Online`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Offline,
    Busy,
    Away,
    Online,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Offline, Status::Busy, Status::Away, Status::Online];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Offline => "offline",
            Status::Busy => "busy",
            Status::Away => "away",
            Status::Online => "online",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseNameError {
                kind: "status",
                value: s.to_owned(),
            })
    }
}

/// One row of `presence`. A user without a row is offline, with empty text,
/// at version 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRow {
    pub user: UserId,
    pub status: Status,
    pub text: String,
    /// Grows by one per change of `(status, text)`.
    pub version: u64,
    /// The server that made the change; 0 for the registry or the exchange.
    pub server: ServerId,
    pub updated_at_ms: i64,
}

/// Recomputes the aggregates of `users` inside a transaction begun with
/// `Db::begin_write`, after the caller changed their sessions in it. Writes
/// every row whose `(status, text)` changed with `version + 1`, `changed_by`
/// and `now_ms`, and returns those rows ordered by user. The one
/// implementation of the rule: `set_status`, `recompute`, and the
/// registry's `mark_down` and `begin_epoch` all run it.
///
/// Rows are locked in ascending (signed) id order, 500 per statement: a
/// missing row is first inserted (offline, version 0), so there is always a
/// row to lock, and deleted again if it stays at version 0.
pub(crate) async fn recompute_in(
    conn: &mut AnyConnection,
    backend: Backend,
    users: &[UserId],
    changed_by: ServerId,
    now_ms: i64,
) -> Result<Vec<PresenceRow>, DbError> {
    let ids = sorted_user_params(users);
    let mut changed = Vec::new();
    for chunk in ids.chunks(LOCK_CHUNK) {
        let sql = format!(
            "INSERT INTO presence (user_id, status, text, version, server_id, updated_at) \
             VALUES {} {}",
            vec!["(?, 'offline', '', 0, 0, 0)"; chunk.len()].join(", "),
            backend.do_nothing("user_id")
        );
        let query = bind_all(sqlx::query(AssertSqlSafe(sql)), chunk);
        query.execute(&mut *conn).await?;

        let sql = format!(
            "SELECT user_id, status, text, version FROM presence{} WHERE user_id IN ({}){}",
            backend.force_primary(),
            placeholders(chunk.len()),
            backend.for_update()
        );
        let query = bind_all(sqlx::query(AssertSqlSafe(sql)), chunk);
        let mut old = HashMap::with_capacity(chunk.len());
        for row in query.fetch_all(&mut *conn).await? {
            let status: Status = parse_col(&row, "status")?;
            let text: String = col(&row, "text")?;
            let version = nonnegative_col(&row, "version")?;
            old.insert(col::<i64>(&row, "user_id")?, (status, text, version));
        }

        let sql = format!(
            "SELECT user_id, status, text, status_at FROM sessions WHERE user_id IN ({})",
            placeholders(chunk.len())
        );
        let query = bind_all(sqlx::query(AssertSqlSafe(sql)), chunk);
        let mut sessions: HashMap<i64, Vec<(Status, String, i64)>> = HashMap::new();
        for row in query.fetch_all(&mut *conn).await? {
            sessions.entry(col(&row, "user_id")?).or_default().push((
                parse_col(&row, "status")?,
                col(&row, "text")?,
                col(&row, "status_at")?,
            ));
        }

        let mut writes = Vec::new();
        let mut unused = Vec::new();
        for &id in chunk {
            let (old_status, old_text, old_version) = old
                .get(&id)
                .ok_or_else(|| bad_row(format!("presence row of user {} missing", id as u64)))?;
            let (status, text) = aggregate(
                sessions
                    .get(&id)
                    .into_iter()
                    .flatten()
                    .map(|(s, t, at)| (*s, t.as_str(), *at)),
            );
            if status == *old_status && text == old_text.as_str() {
                if *old_version == 0 {
                    unused.push(id);
                }
                continue;
            }
            let version = old_version
                .checked_add(1)
                .filter(|&v| i64::try_from(v).is_ok())
                .ok_or_else(|| bad_row(format!("user {}: version overflow", id as u64)))?;
            writes.push(PresenceRow {
                user: UserId(id as u64),
                status,
                text: text.to_owned(),
                version,
                server: changed_by,
                updated_at_ms: now_ms,
            });
        }

        if !writes.is_empty() {
            let sql = format!(
                "INSERT INTO presence (user_id, status, text, version, server_id, updated_at) \
                 VALUES {} {}",
                vec!["(?, ?, ?, ?, ?, ?)"; writes.len()].join(", "),
                backend.upsert_columns(
                    "user_id",
                    &["status", "text", "version", "server_id", "updated_at"]
                )
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for w in &writes {
                query = query
                    .bind(user_param(w.user))
                    .bind(w.status.as_str())
                    .bind(w.text.as_str())
                    .bind(w.version as i64)
                    .bind(server_param(w.server))
                    .bind(w.updated_at_ms);
            }
            query.execute(&mut *conn).await?;
        }
        if !unused.is_empty() {
            let sql = format!(
                "DELETE FROM presence WHERE version = 0 AND user_id IN ({})",
                placeholders(unused.len())
            );
            let query = bind_all(sqlx::query(AssertSqlSafe(sql)), &unused);
            query.execute(&mut *conn).await?;
        }
        changed.extend(writes);
    }
    changed.sort_unstable_by_key(|r| r.user);
    Ok(changed)
}

/// The aggregate of one user's sessions `(status, text, status_at)`: the
/// most available status, and the text of the session whose status changed
/// last (ties: the greater text). Offline, and then always with empty text,
/// when there is no session or none is more than offline.
fn aggregate<'a>(sessions: impl IntoIterator<Item = (Status, &'a str, i64)>) -> (Status, &'a str) {
    let mut status = Status::Offline;
    let mut latest: Option<(i64, &'a str)> = None;
    for (s, text, at) in sessions {
        status = status.max(s);
        if latest.is_none_or(|l| (at, text) > l) {
            latest = Some((at, text));
        }
    }
    match (status, latest) {
        (Status::Offline, _) | (_, None) => (Status::Offline, ""),
        (status, Some((_, text))) => (status, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_order_names_and_serde() {
        assert!(Status::Online > Status::Away);
        assert!(Status::Away > Status::Busy);
        assert!(Status::Busy > Status::Offline);
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("Online".parse::<Status>().is_err());
    }

    #[test]
    fn aggregate_rules() {
        assert_eq!(aggregate([]), (Status::Offline, ""));
        assert_eq!(
            aggregate([(Status::Busy, "b", 5), (Status::Away, "a", 3)]),
            (Status::Away, "b")
        );
        assert_eq!(
            aggregate([(Status::Online, "", 0), (Status::Busy, "meeting", 7)]),
            (Status::Online, "meeting")
        );
        // Ties on status_at: the greater text, whatever the order.
        assert_eq!(
            aggregate([(Status::Away, "x", 5), (Status::Away, "y", 5)]),
            aggregate([(Status::Away, "y", 5), (Status::Away, "x", 5)])
        );
        // Invisible connections only: offline, no text.
        assert_eq!(
            aggregate([(Status::Offline, "gone", 9)]),
            (Status::Offline, "")
        );
    }
}
