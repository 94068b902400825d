//! Presence storage: each connection's own status on its session row, and
//! per user the aggregate in `presence`, the row every server trusts
//! (`docs/presence.md`).
//!
//! Owns the `presence` table and the `status`, `text` and `status_at`
//! columns of `sessions` (`sql/*/0003_presence.sql`), for SQLite and
//! MySQL/MariaDB through sqlx's `Any` driver, on the [`Registry`]'s pool. It
//! stores and reads back; it sends no notifications and keeps no views (the
//! app server does).
//!
//! The aggregate: the most available status over the user's sessions
//! (`online` > `away` > `busy` > `offline`; no session: `offline`), and the
//! text of the session whose status changed last (largest `status_at`; ties
//! go to the greater text, so the result never depends on row order). An
//! `offline` aggregate always has the empty text.
//!
//! `set_status` and the registry's `mark_down` and `begin_epoch` run
//! `recompute_in` in the transaction of their session change, so the
//! committed `presence` row agrees with the committed sessions. After
//! `Registry::add_session` / `remove_session` (which do not touch presence)
//! the caller runs [`PresenceStore::recompute`]. `recompute_in` locks the
//! presence rows first (created if missing, then `SELECT ... FOR UPDATE` on
//! MySQL; on SQLite the writer lock of `BEGIN IMMEDIATE` covers
//! everything), then reads the sessions and writes only rows whose
//! `(status, text)` changed, with `version + 1`. Writers of one user
//! therefore serialise on its row, and each reads the sessions as committed
//! by all writers before it: no update is lost, no version given twice.
//!
//! MySQL needs `binlog_format` ROW or MIXED (the defaults) if binary
//! logging is on: InnoDB refuses statement-based logging at `READ
//! COMMITTED`.
//!
//! On MySQL these transactions run at `READ COMMITTED`: a plain read of
//! `sessions` after taking the row lock then sees every change committed
//! before the lock was granted (under `REPEATABLE READ` it could see an
//! older snapshot), without locking session rows — so a session row lock is
//! only ever taken before a presence row lock, never after, and presence
//! rows are locked in ascending (signed) id order.
//!
//! Column mapping as in the registry: user ids are `u64` stored bit for bit
//! in `BIGINT`s, ordered here in Rust, never in SQL.

use crate::db::{backoff, is_retryable};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, AnyPool, AssertSqlSafe, Row, Transaction};

use crate::registry::{Backend, ParseNameError, Registry, RegistryError};
use crate::types::{ChannelId, ServerId, UserId};

/// Ids per `IN (...)` list of a plain read.
const READ_CHUNK: usize = 1000;
/// Ids per locking statement: MariaDB turns `IN` lists of 1000 values or
/// more into a join with a temporary table.
const LOCK_CHUNK: usize = 500;
/// Attempts of one write when the database reports a conflict.
const ATTEMPTS: u32 = 10;

type Tx = Transaction<'static, Any>;

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

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence database error")]
    Database(#[from] sqlx::Error),
    #[error("bad presence row: {what}")]
    BadRow { what: String },
    #[error("no such session")]
    NoSuchSession,
}

/// For the registry, whose `mark_down` and `begin_epoch` recompute presence.
impl From<PresenceError> for RegistryError {
    fn from(e: PresenceError) -> Self {
        match e {
            PresenceError::Database(e) => RegistryError::Database(e),
            PresenceError::BadRow { what } => RegistryError::BadRow { what },
            PresenceError::NoSuchSession => RegistryError::BadRow {
                what: "no such session".to_owned(),
            },
        }
    }
}

/// Handle on the presence tables; cheap to clone (it wraps the registry's
/// pool).
#[derive(Clone, Debug)]
pub struct PresenceStore {
    pool: AnyPool,
    backend: Backend,
}

impl PresenceStore {
    /// A store on the registry's database and pool (the registry has run
    /// the migrations).
    pub fn new(registry: &Registry) -> Self {
        PresenceStore {
            pool: registry.pool().clone(),
            backend: registry.backend(),
        }
    }

    /// A connection changed its own status: updates its session row
    /// (status, text, `status_at = now_ms`) and recomputes the user's
    /// aggregate, in one transaction. Returns the new presence row if the
    /// aggregate changed (`server` recorded as the changer), `None`
    /// otherwise; `NoSuchSession` if `(server, channel)` has no session.
    /// Text longer than 140 characters is refused by the database.
    pub async fn set_status(
        &self,
        server: ServerId,
        channel: ChannelId,
        status: Status,
        text: &str,
        now_ms: i64,
    ) -> Result<Option<PresenceRow>, PresenceError> {
        self.retry("set_status", || {
            self.try_set_status(server, channel, status, text, now_ms)
        })
        .await
    }

    async fn try_set_status(
        &self,
        server: ServerId,
        channel: ChannelId,
        status: Status,
        text: &str,
        now_ms: i64,
    ) -> Result<Option<PresenceRow>, PresenceError> {
        let mut tx = begin_write(&self.pool, self.backend).await?;
        let result = async {
            // The session row first (the lock order: sessions, then
            // presence); the user it belongs to cannot change under the lock.
            let sql = format!(
                "SELECT user_id FROM sessions WHERE server_id = ? AND channel = ?{}",
                for_update(self.backend)
            );
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(server_param(server))
                .bind(u64_param(channel.0))
                .fetch_optional(&mut *tx)
                .await?;
            let Some(row) = row else {
                return Err(PresenceError::NoSuchSession);
            };
            let user = user_col(&row, "user_id")?;
            sqlx::query(
                "UPDATE sessions SET status = ?, text = ?, status_at = ? \
                 WHERE server_id = ? AND channel = ?",
            )
            .bind(status.as_str())
            .bind(text)
            .bind(now_ms)
            .bind(server_param(server))
            .bind(u64_param(channel.0))
            .execute(&mut *tx)
            .await?;
            let changed = recompute_in(&mut tx, self.backend, &[user], server, now_ms).await?;
            Ok(changed.into_iter().next())
        }
        .await;
        finish(tx, result).await
    }

    /// Recomputes a user's aggregate after one of its sessions was added or
    /// removed (by `changed_by`). Returns the new row if it changed.
    pub async fn recompute(
        &self,
        user: UserId,
        changed_by: ServerId,
        now_ms: i64,
    ) -> Result<Option<PresenceRow>, PresenceError> {
        self.retry("recompute", || async {
            let mut tx = begin_write(&self.pool, self.backend).await?;
            let result = recompute_in(&mut tx, self.backend, &[user], changed_by, now_ms)
                .await
                .map(|rows| rows.into_iter().next());
            finish(tx, result).await
        })
        .await
    }

    /// The presence rows of these users, ordered by user. Users without a
    /// row are absent (offline, empty text, version 0). One query per 1,000
    /// distinct users; none for an empty list.
    pub async fn rows(&self, users: &[UserId]) -> Result<Vec<PresenceRow>, PresenceError> {
        let ids = sorted_ids(users);
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(READ_CHUNK) {
            let sql = format!(
                "SELECT user_id, status, text, version, server_id, updated_at FROM presence \
                 WHERE user_id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &id in chunk {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.pool).await? {
                let row = presence_from_row(&row)?;
                // Version-0 rows live only inside `recompute_in`'s
                // transactions; never report one as a row.
                if row.version > 0 {
                    out.push(row);
                }
            }
        }
        out.sort_unstable_by_key(|r| r.user);
        Ok(out)
    }

    /// The contacts of `user`: friends, plus colleagues (the other users of
    /// the same org) when the org has at most `broadcast_org_max` users;
    /// friends only otherwise. Sorted, deduplicated; empty for an unknown
    /// user. Two queries; the org query reads at most `broadcast_org_max + 1`
    /// rows.
    pub async fn contacts(
        &self,
        user: UserId,
        broadcast_org_max: usize,
    ) -> Result<Vec<UserId>, PresenceError> {
        let rows = sqlx::query("SELECT friend_id FROM friendships WHERE user_id = ?")
            .bind(id_param(user))
            .fetch_all(&self.pool)
            .await?;
        let mut out = rows
            .iter()
            .map(|r| user_col(r, "friend_id"))
            .collect::<Result<Vec<_>, _>>()?;
        // One row more than the limit tells a large org; its whole member
        // list is never read. The user is one of the rows.
        let limit = i64::try_from(broadcast_org_max.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT c.id FROM users u JOIN users c ON c.org = u.org WHERE u.id = ? LIMIT ?",
        )
        .bind(id_param(user))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        if rows.len() <= broadcast_org_max {
            for row in &rows {
                let c = user_col(row, "id")?;
                if c != user {
                    out.push(c);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Per-bucket digest for anti-entropy: bucket = `user % buckets` (as
    /// `u64`), value = the sum of the versions of those users' rows (absent
    /// rows count 0), wrapping. Returns `buckets` values. Duplicate users
    /// count once. One aggregate query (`GROUP BY` in SQL) per 1,000
    /// distinct users, summed across chunks; none for an empty list or
    /// `buckets == 0` (an empty digest).
    pub async fn digest(&self, users: &[UserId], buckets: u32) -> Result<Vec<u64>, PresenceError> {
        let mut out = vec![0u64; buckets as usize];
        if buckets == 0 {
            return Ok(out);
        }
        let b = u64::from(buckets);
        // Ids from 2^63 up are stored negative: their u64 value is id + 2^64,
        // so their bucket is (id % b + 2^64 % b) mod b. The SQL `%` keeps the
        // dividend's sign on both backends; adding b makes the sum positive.
        let wrap = (u64::MAX % b + 1) % b;
        let bucket = format!(
            "CASE WHEN user_id >= 0 THEN user_id % {b} ELSE (user_id % {b} + {wrap} + {b}) % {b} END"
        );
        let ids = sorted_ids(users);
        for chunk in ids.chunks(READ_CHUNK) {
            let sql = format!(
                "SELECT {} AS bucket, {} AS total FROM presence WHERE user_id IN ({}) \
                 GROUP BY bucket",
                int_expr(self.backend, &bucket),
                int_expr(self.backend, "SUM(version)"),
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &id in chunk {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.pool).await? {
                let bucket: i64 = col(&row, "bucket")?;
                let slot = usize::try_from(bucket)
                    .ok()
                    .filter(|&s| s < out.len())
                    .ok_or_else(|| bad_row(format!("digest: bucket {bucket} out of range")))?;
                let total: i64 = col(&row, "total")?;
                let total = u64::try_from(total)
                    .map_err(|_| bad_row(format!("digest: negative sum {total}")))?;
                out[slot] = out[slot].wrapping_add(total);
            }
        }
        Ok(out)
    }

    /// Runs `attempt_fn` again, after a short pause, while it fails with a
    /// conflict worth retrying (see [`is_retryable`]).
    async fn retry<T, F, Fut>(
        &self,
        what: &'static str,
        mut attempt_fn: F,
    ) -> Result<T, PresenceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, PresenceError>>,
    {
        let mut attempt = 1;
        loop {
            match attempt_fn().await {
                Err(PresenceError::Database(e)) if attempt < ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(what, attempt, error = %e, "presence conflict, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// A transaction for writes that recompute presence: on SQLite it holds the
/// write lock from its start (`BEGIN IMMEDIATE`), so the busy timeout
/// applies instead of a failed lock upgrade later; on MySQL it runs at
/// `READ COMMITTED` (see the module documentation). The registry's
/// transactions use it too.
pub(crate) async fn begin_write(pool: &AnyPool, backend: Backend) -> Result<Tx, sqlx::Error> {
    match backend {
        Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
        // `SET TRANSACTION` without `SESSION` applies to the next
        // transaction only: the pooled connection keeps its default.
        Backend::MySql => {
            pool.begin_with("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION")
                .await
        }
    }
}

/// Recomputes the aggregates of `users` inside a transaction begun with
/// [`begin_write`], after the caller changed their sessions in it. Writes
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
) -> Result<Vec<PresenceRow>, PresenceError> {
    let ids = sorted_ids(users);
    let mut changed = Vec::new();
    for chunk in ids.chunks(LOCK_CHUNK) {
        let sql = format!(
            "INSERT INTO presence (user_id, status, text, version, server_id, updated_at) \
             VALUES {} {}",
            vec!["(?, 'offline', '', 0, 0, 0)"; chunk.len()].join(", "),
            do_nothing(backend, "user_id")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for &id in chunk {
            query = query.bind(id);
        }
        query.execute(&mut *conn).await?;

        let sql = format!(
            "SELECT user_id, status, text, version FROM presence{} WHERE user_id IN ({}){}",
            force_primary(backend),
            placeholders(chunk.len()),
            for_update(backend)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for &id in chunk {
            query = query.bind(id);
        }
        let mut old = HashMap::with_capacity(chunk.len());
        for row in query.fetch_all(&mut *conn).await? {
            let status: Status = parse_status(&row, "status")?;
            let text: String = col(&row, "text")?;
            let version = nonnegative_col(&row, "version")?;
            old.insert(col::<i64>(&row, "user_id")?, (status, text, version));
        }

        let sql = format!(
            "SELECT user_id, status, text, status_at FROM sessions WHERE user_id IN ({})",
            placeholders(chunk.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for &id in chunk {
            query = query.bind(id);
        }
        let mut sessions: HashMap<i64, Vec<(Status, String, i64)>> = HashMap::new();
        for row in query.fetch_all(&mut *conn).await? {
            sessions.entry(col(&row, "user_id")?).or_default().push((
                parse_status(&row, "status")?,
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
                upsert_columns(
                    backend,
                    "user_id",
                    &["status", "text", "version", "server_id", "updated_at"]
                )
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for w in &writes {
                query = query
                    .bind(id_param(w.user))
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
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &id in &unused {
                query = query.bind(id);
            }
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

/// Commits on success, rolls back on failure.
async fn finish<T>(tx: Tx, result: Result<T, PresenceError>) -> Result<T, PresenceError> {
    match result {
        Ok(v) => {
            tx.commit().await?;
            Ok(v)
        }
        Err(e) => {
            if let Err(re) = tx.rollback().await {
                tracing::debug!(error = %re, "presence rollback failed");
            }
            Err(e)
        }
    }
}

fn for_update(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        Backend::MySql => " FOR UPDATE",
    }
}

/// Keeps InnoDB on primary-key lookups for a locking `IN (...)` read.
fn force_primary(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        Backend::MySql => " FORCE INDEX (PRIMARY)",
    }
}

/// An integer expression the `Any` driver can decode: MySQL's `SUM` is a
/// `DECIMAL`.
fn int_expr(backend: Backend, expr: &str) -> String {
    match backend {
        Backend::Sqlite => expr.to_owned(),
        Backend::MySql => format!("CAST({expr} AS SIGNED)"),
    }
}

/// "Insert these rows, keep the existing ones" (on MySQL the no-op update
/// still takes the row's exclusive lock).
fn do_nothing(backend: Backend, key: &str) -> String {
    match backend {
        Backend::Sqlite => format!("ON CONFLICT ({key}) DO NOTHING"),
        Backend::MySql => format!("ON DUPLICATE KEY UPDATE {key} = {key}"),
    }
}

/// "Insert these rows, or on this key set `cols` from them".
fn upsert_columns(backend: Backend, key: &str, cols: &[&str]) -> String {
    let set = |f: &dyn Fn(&str) -> String| {
        cols.iter()
            .map(|c| format!("{c} = {}", f(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match backend {
        Backend::Sqlite => format!(
            "ON CONFLICT ({key}) DO UPDATE SET {}",
            set(&|c| format!("excluded.{c}"))
        ),
        Backend::MySql => format!(
            "ON DUPLICATE KEY UPDATE {}",
            set(&|c| format!("VALUES({c})"))
        ),
    }
}

/// `?, ?, ?`
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// Distinct ids as stored, ascending: the lock order of every writer here.
fn sorted_ids(users: &[UserId]) -> Vec<i64> {
    let mut ids: Vec<i64> = users.iter().map(|&u| id_param(u)).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// User and channel ids use the full `u64` range: stored bit for bit.
fn id_param(u: UserId) -> i64 {
    u.0 as i64
}

fn u64_param(v: u64) -> i64 {
    v as i64
}

fn server_param(s: ServerId) -> i64 {
    i64::from(s.0)
}

fn bad_row(what: impl Into<String>) -> PresenceError {
    PresenceError::BadRow { what: what.into() }
}

/// A column decoded as `T`; a type mismatch is a bad row, not a panic.
fn col<T>(row: &AnyRow, col: &str) -> Result<T, PresenceError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get::<T, _>(col)
        .map_err(|e| bad_row(format!("column {col}: {e}")))
}

fn nonnegative_col(row: &AnyRow, name: &str) -> Result<u64, PresenceError> {
    let v: i64 = col(row, name)?;
    u64::try_from(v).map_err(|_| bad_row(format!("column {name}: negative {v}")))
}

fn user_col(row: &AnyRow, name: &str) -> Result<UserId, PresenceError> {
    Ok(UserId(col::<i64>(row, name)? as u64))
}

fn parse_status(row: &AnyRow, name: &str) -> Result<Status, PresenceError> {
    col::<String>(row, name)?
        .parse()
        .map_err(|e: ParseNameError| bad_row(e.to_string()))
}

fn presence_from_row(row: &AnyRow) -> Result<PresenceRow, PresenceError> {
    let server: i64 = col(row, "server_id")?;
    Ok(PresenceRow {
        user: user_col(row, "user_id")?,
        status: parse_status(row, "status")?,
        text: col(row, "text")?,
        version: nonnegative_col(row, "version")?,
        server: u32::try_from(server)
            .map(ServerId)
            .map_err(|_| bad_row(format!("column server_id: {server} out of range")))?,
        updated_at_ms: col(row, "updated_at")?,
    })
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

    #[test]
    fn bucket_of_high_ids_matches_u64_modulo() {
        // The SQL expression of `digest`, evaluated with Rust's truncating
        // `%` (as both databases do) on the stored i64.
        for b in [1u64, 2, 3, 7, 64, 1000, u64::from(u32::MAX)] {
            let wrap = (u64::MAX % b + 1) % b;
            for id in [
                0u64,
                1,
                63,
                64,
                1 << 63,
                (1 << 63) + 5,
                u64::MAX,
                u64::MAX - 64,
            ] {
                let x = id as i64;
                let bi = b as i64;
                let wi = wrap as i64;
                let bucket = if x >= 0 {
                    x % bi
                } else {
                    (x % bi + wi + bi) % bi
                };
                assert_eq!(bucket as u64, id % b, "id {id} b {b}");
            }
        }
    }
}
