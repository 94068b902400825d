//! Presence storage: each connection's own status on its session row, and
//! per user the aggregate in `presence`, the row every server trusts
//! (`docs/presence.md`).
//!
//! Owns the `presence` table and the `status`, `text` and `status_at`
//! columns of `sessions` (`sql/*/0003_presence.sql`), for SQLite and
//! MySQL/MariaDB, on the shared [`Db`] (the registry's). It stores and reads
//! back; it sends no notifications and keeps no views (the app server
//! does). The rule that makes a user's row from its sessions, and the one
//! writer of that row, live in `aggregate`, which the registry runs too.
//!
//! `set_status` and the registry's `mark_down` and `begin_epoch` recompute
//! the aggregate in the transaction of their session change, so the
//! committed `presence` row agrees with the committed sessions. After
//! `Registry::add_session` / `remove_session` (which do not touch presence)
//! the caller runs [`PresenceStore::recompute`].
//!
//! Column mapping as in the registry: user ids are `u64` stored bit for bit
//! in `BIGINT`s, ordered here in Rust, never in SQL.

use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

use crate::aggregate::recompute_in;
pub use crate::aggregate::{PresenceRow, Status};
use crate::db::{
    Db, DbError, TRANSACTION, bad_row, bind_all, col, database_error, finish, nonnegative_col,
    parse_col, placeholders, required_server_col, retry, server_param, sorted_user_params,
    u64_param, user_col, user_param,
};
use crate::types::{ChannelId, ServerId, UserId};

/// Ids per `IN (...)` list of a plain read.
const READ_CHUNK: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence database error")]
    Database(#[from] sqlx::Error),
    #[error("bad presence row: {what}")]
    BadRow { what: String },
    #[error("no such session")]
    NoSuchSession,
}

database_error!(PresenceError);

/// Handle on the presence tables; cheap to clone (it wraps the shared
/// database's pool).
#[derive(Clone, Debug)]
pub struct PresenceStore {
    db: Db,
}

impl PresenceStore {
    /// A store on the shared database, e.g. the
    /// [`Registry`](crate::registry::Registry)'s (which has run the
    /// migrations).
    pub fn new(db: &impl AsRef<Db>) -> Self {
        PresenceStore {
            db: db.as_ref().clone(),
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
        retry("set_status", TRANSACTION, || {
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
        let mut tx = self.db.begin_write().await?;
        let result = async {
            // The session row first (the lock order: sessions, then
            // presence); the user it belongs to cannot change under the lock.
            let sql = format!(
                "SELECT user_id FROM sessions WHERE server_id = ? AND channel = ?{}",
                self.db.backend().for_update()
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
            let changed = recompute_in(&mut tx, self.db.backend(), &[user], server, now_ms).await?;
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
        retry("recompute", TRANSACTION, || async {
            let mut tx = self.db.begin_write().await?;
            let result = recompute_in(&mut tx, self.db.backend(), &[user], changed_by, now_ms)
                .await
                .map(|rows| rows.into_iter().next());
            finish(tx, result).await.map_err(PresenceError::from)
        })
        .await
    }

    /// The presence rows of these users, ordered by user. Users without a
    /// row are absent (offline, empty text, version 0). One query per 1,000
    /// distinct users; none for an empty list.
    pub async fn rows(&self, users: &[UserId]) -> Result<Vec<PresenceRow>, PresenceError> {
        let ids = sorted_user_params(users);
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(READ_CHUNK) {
            let sql = format!(
                "SELECT user_id, status, text, version, server_id, updated_at FROM presence \
                 WHERE user_id IN ({})",
                placeholders(chunk.len())
            );
            let query = bind_all(sqlx::query(AssertSqlSafe(sql)), chunk);
            for row in query.fetch_all(self.db.pool()).await? {
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
            .bind(user_param(user))
            .fetch_all(self.db.pool())
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
        .bind(user_param(user))
        .bind(limit)
        .fetch_all(self.db.pool())
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

    /// Those of `candidates` whose presence `user` may watch: its friends
    /// and the members of its organisation (however large), never the user
    /// itself. Sorted, without duplicates. Two queries per 1,000 distinct
    /// candidates.
    pub async fn contacts_among(
        &self,
        user: UserId,
        candidates: &[UserId],
    ) -> Result<Vec<UserId>, PresenceError> {
        let ids = sorted_user_params(candidates);
        let mut out = Vec::new();
        for chunk in ids.chunks(READ_CHUNK) {
            let friends = format!(
                "SELECT friend_id AS id FROM friendships WHERE user_id = ? AND friend_id IN ({})",
                placeholders(chunk.len())
            );
            let colleagues = format!(
                "SELECT c.id AS id FROM users u JOIN users c ON c.org = u.org \
                 WHERE u.id = ? AND c.id IN ({})",
                placeholders(chunk.len())
            );
            for sql in [friends, colleagues] {
                let query = sqlx::query(AssertSqlSafe(sql)).bind(user_param(user));
                for row in bind_all(query, chunk).fetch_all(self.db.pool()).await? {
                    out.push(user_col(&row, "id")?);
                }
            }
        }
        out.retain(|c| *c != user);
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
        let ids = sorted_user_params(users);
        for chunk in ids.chunks(READ_CHUNK) {
            let sql = format!(
                "SELECT {} AS bucket, {} AS total FROM presence WHERE user_id IN ({}) \
                 GROUP BY bucket",
                self.db.backend().int_expr(&bucket),
                self.db.backend().int_expr("SUM(version)"),
                placeholders(chunk.len())
            );
            let query = bind_all(sqlx::query(AssertSqlSafe(sql)), chunk);
            for row in query.fetch_all(self.db.pool()).await? {
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
}

fn presence_from_row(row: &AnyRow) -> Result<PresenceRow, DbError> {
    Ok(PresenceRow {
        user: user_col(row, "user_id")?,
        status: parse_col(row, "status")?,
        text: col(row, "text")?,
        version: nonnegative_col(row, "version")?,
        server: required_server_col(row, "server_id")?,
        updated_at_ms: col(row, "updated_at")?,
    })
}

#[cfg(test)]
mod tests {
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
