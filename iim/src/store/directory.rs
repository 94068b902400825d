//! The directory: users (with their `user_seq` row, so a first message
//! finds a row to lock), friendships, and colleagues (the users of one org).

use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

use super::{ROW_CHUNK, Store, StoreError, User, missing_users, sorted_ids};
use crate::db::{DbError, TRANSACTION, col, finish, retry, rows, user_col, user_param};
use crate::types::{UserId, now_ms};

impl Store {
    /// Inserts the user, or updates name and org of an existing one.
    pub async fn add_user(&self, u: &User) -> Result<(), StoreError> {
        self.add_users(std::slice::from_ref(u)).await
    }

    /// [`Store::add_user`] for many users in one transaction, a few hundred
    /// rows per statement.
    pub async fn add_users(&self, users: &[User]) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        // Ascending ids: the lock order of every writer here.
        let mut sorted: Vec<&User> = users.iter().collect();
        sorted.sort_by_key(|u| user_param(u.id));
        let now = now_ms();
        retry("add_users", TRANSACTION, || {
            self.try_add_users(&sorted, now)
        })
        .await
    }

    async fn try_add_users(&self, users: &[&User], now: i64) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        for chunk in users.chunks(ROW_CHUNK) {
            let sql = format!(
                "INSERT INTO users (id, name, org, created_at) VALUES {} {}",
                rows(chunk.len(), 4),
                self.backend().upsert_columns("id", &["name", "org"])
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                query = query
                    .bind(user_param(u.id))
                    .bind(u.name.as_str())
                    .bind(u.org.as_str())
                    .bind(now);
            }
            query.execute(&mut *tx).await?;
            // Sends then find the row to lock without a detour.
            let sql = format!(
                "INSERT INTO user_seq (user_id, last_seq) VALUES {} {}",
                rows(chunk.len(), 2),
                self.backend().do_nothing("user_id")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                query = query.bind(user_param(u.id)).bind(0_i64);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let row = sqlx::query("SELECT id, name, org FROM users WHERE id = ?")
            .bind(user_param(id))
            .fetch_optional(self.db.pool())
            .await?;
        Ok(row.as_ref().map(user_from_row).transpose()?)
    }

    /// Every user, ordered by id.
    pub async fn users(&self) -> Result<Vec<User>, StoreError> {
        let rows = sqlx::query("SELECT id, name, org FROM users")
            .fetch_all(self.db.pool())
            .await?;
        let mut out = rows
            .iter()
            .map(user_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_unstable_by_key(|u| u.id);
        Ok(out)
    }

    /// Records the friendship in both directions; idempotent.
    pub async fn add_friendship(&self, a: UserId, b: UserId) -> Result<(), StoreError> {
        retry("add_friendship", TRANSACTION, || {
            self.try_add_friendship(a, b)
        })
        .await
    }

    async fn try_add_friendship(&self, a: UserId, b: UserId) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        let result = async {
            if let Some(u) = missing_users(&mut tx, &[a, b]).await?.first() {
                return Err(StoreError::UnknownUser(u.0));
            }
            let mut pairs = vec![
                (user_param(a), user_param(b)),
                (user_param(b), user_param(a)),
            ];
            pairs.sort_unstable();
            pairs.dedup();
            let sql = format!(
                "INSERT INTO friendships (user_id, friend_id) VALUES {} {}",
                rows(pairs.len(), 2),
                self.backend().do_nothing("user_id, friend_id")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for (u, f) in pairs {
                query = query.bind(u).bind(f);
            }
            query.execute(&mut *tx).await?;
            Ok(())
        }
        .await;
        finish(tx, result).await
    }

    /// The user's friends, sorted; empty for an unknown user.
    pub async fn friends_of(&self, u: UserId) -> Result<Vec<UserId>, StoreError> {
        let rows = sqlx::query("SELECT friend_id FROM friendships WHERE user_id = ?")
            .bind(user_param(u))
            .fetch_all(self.db.pool())
            .await?;
        Ok(sorted_ids(&rows, "friend_id")?)
    }

    /// Everyone in the user's org except the user, sorted; empty for an
    /// unknown user.
    pub async fn colleagues_of(&self, u: UserId) -> Result<Vec<UserId>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.id FROM users u JOIN users c ON c.org = u.org WHERE u.id = ? AND c.id <> u.id",
        )
        .bind(user_param(u))
        .fetch_all(self.db.pool())
        .await?;
        Ok(sorted_ids(&rows, "id")?)
    }
}

fn user_from_row(row: &AnyRow) -> Result<User, DbError> {
    Ok(User {
        id: user_col(row, "id")?,
        name: col(row, "name")?,
        org: col(row, "org")?,
    })
}
