//! Reading back: a user's inbox or a group's timeline after a sequence, and
//! the last sequence allocated (what a client syncs against).

use sqlx::AssertSqlSafe;

use super::{
    MESSAGE_COLUMNS, Page, Store, StoreError, StoredMessage, group_param, message_from_row, seq_col,
};
use crate::db::{nonnegative_col, user_param};
use crate::types::UserId;

impl Store {
    /// The user's inbox after `since`: at most `limit` items, ascending, and
    /// the user's last sequence (0 for a user who never got a message).
    pub async fn inbox_since(&self, u: UserId, since: u64, limit: u32) -> Result<Page, StoreError> {
        let sql = format!(
            "SELECT i.seq, {MESSAGE_COLUMNS} FROM inbox i JOIN messages m ON m.id = i.message_id \
             WHERE i.user_id = ? AND i.seq > ? ORDER BY i.seq LIMIT ?"
        );
        let items = self.page(sql, user_param(u), since, limit).await?;
        // Read after the items, so `max` is never below the last of them.
        let max = self.inbox_max(u).await?;
        Ok(Page { items, max })
    }

    /// The group's timeline after `since`, as [`Store::inbox_since`];
    /// `UnknownGroup` for a group that does not exist. Only large-group
    /// messages are on a timeline.
    pub async fn timeline_since(&self, g: u64, since: u64, limit: u32) -> Result<Page, StoreError> {
        let sql = format!(
            "SELECT t.seq, {MESSAGE_COLUMNS} FROM group_timeline t \
             JOIN messages m ON m.id = t.message_id \
             WHERE t.group_id = ? AND t.seq > ? ORDER BY t.seq LIMIT ?"
        );
        let items = self.page(sql, group_param(g), since, limit).await?;
        let max = self.timeline_max(g).await?;
        Ok(Page { items, max })
    }

    async fn page(
        &self,
        sql: String,
        key: i64,
        since: u64,
        limit: u32,
    ) -> Result<Vec<(u64, StoredMessage)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Sequences are positive i64s: nothing lies beyond i64::MAX.
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .bind(since)
            .bind(i64::from(limit))
            .fetch_all(self.db.pool())
            .await?;
        rows.iter()
            .map(|row| Ok((seq_col(row, "seq")?, message_from_row(row)?)))
            .collect()
    }

    /// The user's last inbox sequence; 0 if none was allocated.
    pub async fn inbox_max(&self, u: UserId) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT last_seq FROM user_seq WHERE user_id = ?")
            .bind(user_param(u))
            .fetch_optional(self.db.pool())
            .await?;
        Ok(row.map_or(Ok(0), |row| nonnegative_col(&row, "last_seq"))?)
    }

    /// The group's last timeline sequence (0 for small groups, which write
    /// to inboxes); `UnknownGroup` for a group that does not exist.
    pub async fn timeline_max(&self, g: u64) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT timeline_seq FROM chat_groups WHERE id = ?")
            .bind(group_param(g))
            .fetch_optional(self.db.pool())
            .await?
            .ok_or(StoreError::UnknownGroup(g))?;
        Ok(nonnegative_col(&row, "timeline_seq")?)
    }
}
