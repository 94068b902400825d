//! Chat groups and their members. Membership changes lock the group row
//! first, as a group's sends do, so they serialise with them.

use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

use super::{
    Group, GroupSummary, ROW_CHUNK, Store, StoreError, group_param, missing_users, positive,
    sorted_ids,
};
use crate::db::{
    DbError, TRANSACTION, Tx, bad_row, col, finish, nonnegative_col, retry, rows,
    sorted_user_params, user_param,
};
use crate::types::{Session, UserId, now_ms};

impl Store {
    /// Creates a group (names need not be unique) and returns its id. Every
    /// member must be a known user; duplicates are ignored.
    pub async fn create_group(&self, name: &str, members: &[UserId]) -> Result<u64, StoreError> {
        let now = now_ms();
        retry("create_group", TRANSACTION, || {
            self.try_create_group(name, members, now)
        })
        .await
    }

    async fn try_create_group(
        &self,
        name: &str,
        members: &[UserId],
        now: i64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let result = async {
            if let Some(u) = missing_users(&mut tx, members).await?.first() {
                return Err(StoreError::UnknownUser(u.0));
            }
            let sql = format!(
                "INSERT INTO chat_groups (name, timeline_seq, created_at) VALUES (?, 0, ?){}",
                self.backend().returning_id()
            );
            let query = sqlx::query(AssertSqlSafe(sql)).bind(name).bind(now);
            let id = self.backend().inserted_id(query, &mut tx).await?;
            let id = positive(id, "chat_groups.id")?;
            let ids = sorted_user_params(members);
            for chunk in ids.chunks(ROW_CHUNK) {
                let sql = format!(
                    "INSERT INTO group_members (group_id, user_id) VALUES {}",
                    rows(chunk.len(), 2)
                );
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for &u in chunk {
                    query = query.bind(group_param(id)).bind(u);
                }
                query.execute(&mut *tx).await?;
            }
            Ok(id)
        }
        .await;
        finish(tx, result).await
    }

    /// Adds a member; idempotent.
    pub async fn add_member(&self, g: u64, u: UserId) -> Result<(), StoreError> {
        retry("add_member", TRANSACTION, || self.try_add_member(g, u)).await
    }

    async fn try_add_member(&self, g: u64, u: UserId) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        let result = async {
            // The group row first: membership changes serialise with the
            // group's sends, which hold it.
            if self.lock_group(&mut tx, g).await?.is_none() {
                return Err(StoreError::UnknownGroup(g));
            }
            if !missing_users(&mut tx, &[u]).await?.is_empty() {
                return Err(StoreError::UnknownUser(u.0));
            }
            let sql = format!(
                "INSERT INTO group_members (group_id, user_id) VALUES (?, ?) {}",
                self.backend().do_nothing("group_id, user_id")
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(group_param(g))
                .bind(user_param(u))
                .execute(&mut *tx)
                .await?;
            Ok(())
        }
        .await;
        finish(tx, result).await
    }

    /// Returns whether `u` was a member.
    pub async fn remove_member(&self, g: u64, u: UserId) -> Result<bool, StoreError> {
        retry("remove_member", TRANSACTION, || {
            self.try_remove_member(g, u)
        })
        .await
    }

    async fn try_remove_member(&self, g: u64, u: UserId) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let result = async {
            if self.lock_group(&mut tx, g).await?.is_none() {
                return Err(StoreError::UnknownGroup(g));
            }
            let done = sqlx::query("DELETE FROM group_members WHERE group_id = ? AND user_id = ?")
                .bind(group_param(g))
                .bind(user_param(u))
                .execute(&mut *tx)
                .await?;
            Ok(done.rows_affected() > 0)
        }
        .await;
        finish(tx, result).await
    }

    pub async fn group(&self, g: u64) -> Result<Option<Group>, StoreError> {
        let Some(row) = sqlx::query("SELECT id, name FROM chat_groups WHERE id = ?")
            .bind(group_param(g))
            .fetch_optional(self.db.pool())
            .await?
        else {
            return Ok(None);
        };
        let rows = sqlx::query("SELECT user_id FROM group_members WHERE group_id = ?")
            .bind(group_param(g))
            .fetch_all(self.db.pool())
            .await?;
        Ok(Some(Group {
            id: positive(col(&row, "id")?, "chat_groups.id")?,
            name: col(&row, "name")?,
            members: sorted_ids(&rows, "user_id")?,
        }))
    }

    /// Every live session of the members of group `g`, in the registry's
    /// order (what [`crate::Iim::user_list`] answers for its members): one
    /// join in the database, whose cost follows the members online rather
    /// than the group's size. A large group's push needs only these.
    pub async fn group_sessions(&self, g: u64) -> Result<Vec<Session>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.server_id, s.channel, s.user_id, s.device \
             FROM group_members m JOIN sessions s ON s.user_id = m.user_id \
             WHERE m.group_id = ?",
        )
        .bind(group_param(g))
        .fetch_all(self.db.pool())
        .await?;
        let mut out = rows
            .iter()
            .map(crate::registry::session_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        crate::registry::sort_sessions(&mut out);
        Ok(out)
    }

    /// The groups `u` belongs to, ordered by id.
    pub async fn groups_of(&self, u: UserId) -> Result<Vec<GroupSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT g.id, g.name, g.timeline_seq, \
             (SELECT COUNT(*) FROM group_members c WHERE c.group_id = g.id) AS members \
             FROM group_members m JOIN chat_groups g ON g.id = m.group_id WHERE m.user_id = ?",
        )
        .bind(user_param(u))
        .fetch_all(self.db.pool())
        .await?;
        Ok(summaries(&rows)?)
    }

    /// Every group, ordered by id.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT g.id, g.name, g.timeline_seq, \
             (SELECT COUNT(*) FROM group_members c WHERE c.group_id = g.id) AS members \
             FROM chat_groups g",
        )
        .fetch_all(self.db.pool())
        .await?;
        Ok(summaries(&rows)?)
    }

    /// Locks the group row (MySQL; SQLite's transaction holds the database)
    /// and returns its timeline sequence, or `None` for an unknown group.
    pub(super) async fn lock_group(&self, tx: &mut Tx, g: u64) -> Result<Option<i64>, StoreError> {
        let sql = format!(
            "SELECT timeline_seq FROM chat_groups WHERE id = ?{}",
            self.backend().for_update()
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(group_param(g))
            .fetch_optional(&mut **tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let seq: i64 = col(&row, "timeline_seq")?;
        if seq < 0 {
            return Err(bad_row(format!("chat_groups.timeline_seq: negative {seq}")).into());
        }
        Ok(Some(seq))
    }
}

fn summaries(rows: &[AnyRow]) -> Result<Vec<GroupSummary>, DbError> {
    let mut out = rows
        .iter()
        .map(|row| {
            Ok(GroupSummary {
                id: positive(col(row, "id")?, "chat_groups.id")?,
                name: col(row, "name")?,
                members: nonnegative_col(row, "members")?,
                timeline_max: nonnegative_col(row, "timeline_seq")?,
            })
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    out.sort_unstable_by_key(|g| g.id);
    Ok(out)
}
