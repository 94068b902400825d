//! Read positions: how far each user has read each conversation
//! (`sql/*/0004_receipts.sql`). A position only moves forward. It is kept
//! in the reader's own sequence space, with the last message of the
//! conversation at or below it: that message's inbox rows say where the
//! reader stands in every other member's inbox, so a receipt can be shown
//! by each member against its own sequences.

use sqlx::AssertSqlSafe;

use super::{ID_CHUNK, OPE_GROUP, OPE_USER, Store, StoreError, Target, group_param, seq_col};
use crate::db::{
    TRANSACTION, bind_all, col, finish, nonnegative_col, placeholders, retry, user_col, user_param,
};
use crate::types::{UserId, now_ms};

/// Most positions [`Store::read_positions`] and [`Store::others_reads`]
/// return: a client asks once per connection; a user with more
/// conversations than this gets the most recently moved ones.
pub const READ_STATE_MAX: usize = 2_000;

/// One reader's position in one conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPosition {
    /// The conversation, as the reader sends to it.
    pub conversation: Target,
    /// In the reader's inbox, or the large group's timeline.
    pub seq: u64,
    /// The last message of the conversation at or below `seq`; 0 if none.
    pub message_id: u64,
}

/// Another member's position in one of a user's conversations, in that
/// user's own inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OthersRead {
    pub reader: UserId,
    /// As the reader sends to it (for 1:1, the user asked about).
    pub conversation: Target,
    /// The user's own inbox sequence of the last message the reader read.
    pub seq: u64,
}

fn split(t: Target) -> (i64, i64) {
    match t {
        Target::User(u) => (OPE_USER, user_param(u)),
        Target::Group(g) => (OPE_GROUP, group_param(g)),
    }
}

fn target(ope: i64, peer: i64) -> Result<Target, StoreError> {
    match ope {
        OPE_USER => Ok(Target::User(UserId(peer as u64))),
        OPE_GROUP => Ok(Target::Group(peer as u64)),
        other => Err(StoreError::BadRow {
            what: format!("read_positions.ope: unknown value {other}"),
        }),
    }
}

impl Store {
    /// The last message of `conversation` in `reader`'s inbox at or below
    /// `upto`: `(seq, message id)`. Scans the inbox backwards from `upto`,
    /// so its cost is the number of other conversations' messages since
    /// that one.
    pub async fn last_in_conversation(
        &self,
        reader: UserId,
        conversation: Target,
        upto: u64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let upto = i64::try_from(upto).unwrap_or(i64::MAX);
        let me = user_param(reader);
        let query = match conversation {
            Target::User(peer) => sqlx::query(
                "SELECT i.seq, i.message_id FROM inbox i JOIN messages m ON m.id = i.message_id \
                 WHERE i.user_id = ? AND i.seq <= ? AND m.ope = 0 \
                 AND ((m.sender = ? AND m.target = ?) OR (m.sender = ? AND m.target = ?)) \
                 ORDER BY i.seq DESC LIMIT 1",
            )
            .bind(me)
            .bind(upto)
            .bind(me)
            .bind(user_param(peer))
            .bind(user_param(peer))
            .bind(me),
            Target::Group(g) => sqlx::query(
                "SELECT i.seq, i.message_id FROM inbox i JOIN messages m ON m.id = i.message_id \
                 WHERE i.user_id = ? AND i.seq <= ? AND m.ope = 1 AND m.target = ? \
                 ORDER BY i.seq DESC LIMIT 1",
            )
            .bind(me)
            .bind(upto)
            .bind(group_param(g)),
        };
        let Some(row) = query.fetch_optional(self.db.pool()).await? else {
            return Ok(None);
        };
        Ok(Some((seq_col(&row, "seq")?, seq_col(&row, "message_id")?)))
    }

    /// The message at `gseq` of large group `g`'s timeline, if any.
    pub async fn timeline_message(&self, g: u64, gseq: u64) -> Result<Option<u64>, StoreError> {
        let gseq = i64::try_from(gseq).unwrap_or(i64::MAX);
        let row =
            sqlx::query("SELECT message_id FROM group_timeline WHERE group_id = ? AND seq = ?")
                .bind(group_param(g))
                .bind(gseq)
                .fetch_optional(self.db.pool())
                .await?;
        Ok(row.map(|r| seq_col(&r, "message_id")).transpose()?)
    }

    /// Every inbox `message_id` was written to: `(user, seq)`, by user.
    pub async fn inbox_rows_of(&self, message_id: u64) -> Result<Vec<(UserId, u64)>, StoreError> {
        let rows = sqlx::query("SELECT user_id, seq FROM inbox WHERE message_id = ?")
            .bind(i64::try_from(message_id).unwrap_or(i64::MAX))
            .fetch_all(self.db.pool())
            .await?;
        let mut out = rows
            .iter()
            .map(|r| Ok((user_col(r, "user_id")?, seq_col(r, "seq")?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_unstable();
        Ok(out)
    }

    /// Move `reader`'s position in `conversation` to `seq` (with the
    /// conversation's last message at or below it), unless it is there or
    /// beyond already. Returns the position now stored and whether this
    /// call moved it.
    pub async fn mark_read(
        &self,
        reader: UserId,
        conversation: Target,
        seq: u64,
        message_id: u64,
    ) -> Result<(ReadPosition, bool), StoreError> {
        let now = now_ms();
        retry("mark_read", TRANSACTION, || {
            self.try_mark_read(reader, conversation, seq, message_id, now)
        })
        .await
    }

    async fn try_mark_read(
        &self,
        reader: UserId,
        conversation: Target,
        seq: u64,
        message_id: u64,
        now: i64,
    ) -> Result<(ReadPosition, bool), StoreError> {
        let (ope, peer) = split(conversation);
        let me = user_param(reader);
        let seq_p = i64::try_from(seq).unwrap_or(i64::MAX);
        let mid_p = i64::try_from(message_id).unwrap_or(i64::MAX);
        let mut tx = self.db.begin_write().await?;
        let result = async {
            let sql = format!(
                "SELECT seq, message_id FROM read_positions \
                 WHERE user_id = ? AND ope = ? AND peer = ?{}",
                self.backend().for_update()
            );
            let pre = sqlx::query(AssertSqlSafe(sql))
                .bind(me)
                .bind(ope)
                .bind(peer)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = pre {
                let held = ReadPosition {
                    conversation,
                    seq: nonnegative_col(&row, "seq")?,
                    message_id: nonnegative_col(&row, "message_id")?,
                };
                if held.seq >= seq {
                    return Ok((held, false));
                }
                // Forward only, even against a writer that got in between.
                sqlx::query(
                    "UPDATE read_positions SET seq = ?, message_id = ?, updated_at = ? \
                     WHERE user_id = ? AND ope = ? AND peer = ? AND seq < ?",
                )
                .bind(seq_p)
                .bind(mid_p)
                .bind(now)
                .bind(me)
                .bind(ope)
                .bind(peer)
                .bind(seq_p)
                .execute(&mut *tx)
                .await?;
            } else {
                sqlx::query(
                    "INSERT INTO read_positions (user_id, ope, peer, seq, message_id, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(me)
                .bind(ope)
                .bind(peer)
                .bind(seq_p)
                .bind(mid_p)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            Ok::<_, StoreError>((
                ReadPosition {
                    conversation,
                    seq,
                    message_id,
                },
                true,
            ))
        }
        .await;
        finish(tx, result).await
    }

    /// `reader`'s own positions, most recently moved first (at most
    /// [`READ_STATE_MAX`]).
    pub async fn read_positions(&self, reader: UserId) -> Result<Vec<ReadPosition>, StoreError> {
        let rows = sqlx::query(
            "SELECT ope + 0 AS ope, peer, seq, message_id FROM read_positions \
             WHERE user_id = ? ORDER BY updated_at DESC LIMIT ?",
        )
        .bind(user_param(reader))
        .bind(READ_STATE_MAX as i64)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReadPosition {
                    conversation: target(col(r, "ope")?, col(r, "peer")?)?,
                    seq: nonnegative_col(r, "seq")?,
                    message_id: nonnegative_col(r, "message_id")?,
                })
            })
            .collect()
    }

    /// How far the others have read `user`'s 1:1 conversations and the
    /// groups of `groups` (the small groups `user` is in), each in
    /// `user`'s own inbox sequences. Positions whose last message is not in
    /// `user`'s inbox (none yet, or a group joined later) are left out.
    pub async fn others_reads(
        &self,
        user: UserId,
        groups: &[u64],
    ) -> Result<Vec<OthersRead>, StoreError> {
        let me = user_param(user);
        let mut found: Vec<(UserId, Target, i64)> = Vec::new();
        let rows = sqlx::query(
            "SELECT user_id, message_id FROM read_positions \
             WHERE ope = 0 AND peer = ? AND user_id <> ? AND message_id > 0 \
             ORDER BY updated_at DESC LIMIT ?",
        )
        .bind(me)
        .bind(me)
        .bind(READ_STATE_MAX as i64)
        .fetch_all(self.db.pool())
        .await?;
        for r in &rows {
            let reader = user_col(r, "user_id")?;
            // Seen from the reader: the conversation is with `user`.
            found.push((reader, Target::User(user), col(r, "message_id")?));
        }
        let ids: Vec<i64> = groups.iter().map(|g| group_param(*g)).collect();
        for chunk in ids.chunks(ID_CHUNK) {
            if found.len() >= READ_STATE_MAX {
                break;
            }
            let sql = format!(
                "SELECT user_id, peer, message_id FROM read_positions \
                 WHERE ope = 1 AND peer IN ({}) AND user_id <> ? AND message_id > 0 LIMIT ?",
                placeholders(chunk.len())
            );
            let query = bind_all(sqlx::query(AssertSqlSafe(sql)), chunk)
                .bind(me)
                .bind(READ_STATE_MAX as i64);
            for r in query.fetch_all(self.db.pool()).await? {
                found.push((
                    user_col(&r, "user_id")?,
                    Target::Group(col::<i64>(&r, "peer")? as u64),
                    col(&r, "message_id")?,
                ));
            }
        }
        found.truncate(READ_STATE_MAX);
        // The user's own sequence of each message, in one query per chunk.
        let mut message_ids: Vec<i64> = found.iter().map(|f| f.2).collect();
        message_ids.sort_unstable();
        message_ids.dedup();
        let mut seq_of = std::collections::HashMap::with_capacity(message_ids.len());
        for chunk in message_ids.chunks(ID_CHUNK) {
            let sql = format!(
                "SELECT message_id, seq FROM inbox WHERE user_id = ? AND message_id IN ({})",
                placeholders(chunk.len())
            );
            let query = bind_all(sqlx::query(AssertSqlSafe(sql)).bind(me), chunk);
            for r in query.fetch_all(self.db.pool()).await? {
                seq_of.insert(col::<i64>(&r, "message_id")?, seq_col(&r, "seq")?);
            }
        }
        Ok(found
            .into_iter()
            .filter_map(|(reader, conversation, mid)| {
                seq_of.get(&mid).map(|&seq| OthersRead {
                    reader,
                    conversation,
                    seq,
                })
            })
            .collect())
    }
}
