//! Storing a message: the idempotency check on `(sender, req)`, the
//! transaction that allocates its sequences — in every member's inbox
//! (1:1 and small groups: write fan-out) or on the group timeline (large
//! groups: read fan-out) — and the retry around it.

use std::collections::HashMap;

use sqlx::AssertSqlSafe;

use super::{
    Delivery, ID_CHUNK, MESSAGE_COLUMNS, NewMessage, OPE_GROUP, OPE_USER, ROW_CHUNK, Store,
    StoreError, StoredMessage, Target, group_param, message_from_row, missing_users, positive,
    seq_col,
};
use crate::db::{
    DbError, TRANSACTION, Tx, bad_row, bind_all, col, placeholders, retry, rollback, rows,
    u64_param, user_col, user_param,
};
use crate::types::UserId;

/// What one attempt of a storing transaction came to ([`Store::store_message`]:
/// a [`Delivery`]; [`Store::store_messages`]: one result per message).
pub(super) enum Attempt<T> {
    Stored(T),
    /// These users have no `user_seq` row yet: create them outside the
    /// transaction and go again (inserting them inside, after the rows that
    /// exist were locked, would take locks out of ascending order, and on
    /// InnoDB race on the gap locks a locking read of a missing row takes).
    NeedSeqRows(Vec<i64>),
}

impl Store {
    /// Stores a message and allocates its sequences, in one transaction.
    ///
    /// 1:1: sender and recipient must exist; the message goes to both
    /// inboxes (once when they are the same user). Group: the sender must be
    /// a member. Groups of more than `large_group_threshold` members get the
    /// message on their timeline only (read fan-out); smaller ones in every
    /// member's inbox (write fan-out). A `(sender, req)` stored before is
    /// returned as it was, with `duplicate: true`, whatever the target.
    pub async fn store_message(
        &self,
        m: &NewMessage<'_>,
        large_group_threshold: usize,
    ) -> Result<Delivery, StoreError> {
        retry("store_message", TRANSACTION, || {
            self.try_store_message(m, large_group_threshold)
        })
        .await
    }

    /// One attempt: the original if `(sender, req)` was stored before, else
    /// the message stored in one transaction — run a second time when users
    /// lacked a `user_seq` row, after creating it outside (see [`Attempt`]).
    /// A racing twin of the same `(sender, req)` fails on the unique key, a
    /// conflict: the next attempt finds the original.
    async fn try_store_message(
        &self,
        m: &NewMessage<'_>,
        threshold: usize,
    ) -> Result<Delivery, StoreError> {
        if let Some(original) = self.find_original(m.sender, m.req).await? {
            return Ok(original);
        }
        let users = match self.try_store(m, threshold).await? {
            Attempt::Stored(delivery) => return Ok(delivery),
            Attempt::NeedSeqRows(users) => users,
        };
        self.create_seq_rows(&users).await?;
        match self.try_store(m, threshold).await? {
            Attempt::Stored(delivery) => Ok(delivery),
            // `user_seq` rows are never deleted: only a group member who
            // joined in between without one (a user written by another
            // tool) gets here; the client's resend stores the message.
            Attempt::NeedSeqRows(_) => Err(bad_row("user_seq rows missing after creating them"))?,
        }
    }

    async fn try_store(
        &self,
        m: &NewMessage<'_>,
        threshold: usize,
    ) -> Result<Attempt<Delivery>, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let attempt = self.store_in(&mut tx, m, threshold).await;
        settle(tx, attempt).await
    }

    async fn store_in(
        &self,
        tx: &mut Tx,
        m: &NewMessage<'_>,
        threshold: usize,
    ) -> Result<Attempt<Delivery>, StoreError> {
        let sender = user_param(m.sender);
        match m.target {
            Target::User(to) => {
                if let Some(u) = missing_users(tx, &[m.sender, to]).await?.first() {
                    return Err(StoreError::UnknownUser(u.0));
                }
                let mut users = vec![sender, user_param(to)];
                users.sort_unstable();
                users.dedup();
                self.fan_out(tx, m, &users).await
            }
            Target::Group(g) => {
                // Lock the group row before reading anything else: the
                // group's sends serialise here, so every member's inbox gets
                // them in one order, and the member list read next is
                // current (InnoDB's snapshot starts at the first plain read).
                let Some(timeline) = self.lock_group(tx, g).await? else {
                    return Err(StoreError::UnknownGroup(g));
                };
                // One more member than the threshold tells a large group;
                // its whole member list is never needed.
                let limit = i64::try_from(threshold.saturating_add(1)).unwrap_or(i64::MAX);
                let rows =
                    sqlx::query("SELECT user_id FROM group_members WHERE group_id = ? LIMIT ?")
                        .bind(group_param(g))
                        .bind(limit)
                        .fetch_all(&mut **tx)
                        .await?;
                let mut members = rows
                    .iter()
                    .map(|r| col::<i64>(r, "user_id"))
                    .collect::<Result<Vec<_>, _>>()?;
                members.sort_unstable();
                if members.len() <= threshold {
                    if members.binary_search(&sender).is_err() {
                        return Err(StoreError::NotMember(g));
                    }
                    return self.fan_out(tx, m, &members).await;
                }
                let member = sqlx::query(
                    "SELECT user_id FROM group_members WHERE group_id = ? AND user_id = ?",
                )
                .bind(group_param(g))
                .bind(sender)
                .fetch_optional(&mut **tx)
                .await?;
                if member.is_none() {
                    return Err(StoreError::NotMember(g));
                }
                let id = self.insert_message(tx, m).await?;
                let gseq = timeline
                    .checked_add(1)
                    .ok_or_else(|| bad_row(format!("group {g}: timeline sequence overflow")))?;
                sqlx::query(
                    "INSERT INTO group_timeline (group_id, seq, message_id) VALUES (?, ?, ?)",
                )
                .bind(group_param(g))
                .bind(gseq)
                .bind(id)
                .execute(&mut **tx)
                .await?;
                sqlx::query("UPDATE chat_groups SET timeline_seq = ? WHERE id = ?")
                    .bind(gseq)
                    .bind(group_param(g))
                    .execute(&mut **tx)
                    .await?;
                Ok(Attempt::Stored(Delivery {
                    message: stored(m, id)?,
                    sender_seq: None,
                    gseq: Some(positive(gseq, "group_timeline.seq")?),
                    inbox: Vec::new(),
                    duplicate: false,
                }))
            }
        }
    }

    /// Write fan-out: locks the `user_seq` rows of `users` (sorted, distinct)
    /// in ascending order, stores the message and appends it to every inbox.
    async fn fan_out(
        &self,
        tx: &mut Tx,
        m: &NewMessage<'_>,
        users: &[i64],
    ) -> Result<Attempt<Delivery>, StoreError> {
        let last = match self.lock_seq_rows(tx, users).await? {
            Ok(last) => last,
            Err(missing) => return Ok(Attempt::NeedSeqRows(missing)),
        };

        let id = self.insert_message(tx, m).await?;
        let mut next = Vec::with_capacity(users.len());
        for &u in users {
            let seq = last[&u]
                .checked_add(1)
                .ok_or_else(|| bad_row(format!("user {}: inbox sequence overflow", u as u64)))?;
            next.push((u, seq));
        }
        for chunk in next.chunks(ROW_CHUNK) {
            let sql = format!(
                "INSERT INTO inbox (user_id, seq, message_id) VALUES {}",
                rows(chunk.len(), 3)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &(u, seq) in chunk {
                query = query.bind(u).bind(seq).bind(id);
            }
            query.execute(&mut **tx).await?;
            // An upsert by primary key rather than `UPDATE ... IN (...)`,
            // which InnoDB may run as a scan that locks other users' rows.
            let sql = format!(
                "INSERT INTO user_seq (user_id, last_seq) VALUES {} {}",
                rows(chunk.len(), 2),
                self.backend().upsert_columns("user_id", &["last_seq"])
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &(u, seq) in chunk {
                query = query.bind(u).bind(seq);
            }
            query.execute(&mut **tx).await?;
        }

        let sender = user_param(m.sender);
        let mut inbox = Vec::with_capacity(next.len());
        let mut sender_seq = None;
        for (u, seq) in next {
            let seq = positive(seq, "inbox.seq")?;
            if u == sender {
                sender_seq = Some(seq);
            }
            inbox.push((UserId(u as u64), seq));
        }
        inbox.sort_unstable();
        Ok(Attempt::Stored(Delivery {
            message: stored(m, id)?,
            sender_seq,
            gseq: None,
            inbox,
            duplicate: false,
        }))
    }

    /// Locks the `user_seq` rows of `users` (sorted, distinct), ascending,
    /// and returns each one's last sequence — or the users that have no row
    /// yet (to be created outside the transaction, see [`Attempt`]).
    pub(super) async fn lock_seq_rows(
        &self,
        tx: &mut Tx,
        users: &[i64],
    ) -> Result<Result<HashMap<i64, i64>, Vec<i64>>, StoreError> {
        let mut last = HashMap::with_capacity(users.len());
        for chunk in users.chunks(ID_CHUNK) {
            let sql = format!(
                "SELECT user_id, last_seq FROM user_seq{} WHERE user_id IN ({}){}",
                self.backend().force_primary(),
                placeholders(chunk.len()),
                self.backend().for_update()
            );
            let query = bind_all(sqlx::query(AssertSqlSafe(sql)), chunk);
            for row in query.fetch_all(&mut **tx).await? {
                let seq: i64 = col(&row, "last_seq")?;
                if seq < 0 {
                    return Err(bad_row(format!("user_seq.last_seq: negative {seq}")).into());
                }
                last.insert(col::<i64>(&row, "user_id")?, seq);
            }
        }
        if last.len() < users.len() {
            let missing = users.iter().copied().filter(|u| !last.contains_key(u));
            return Ok(Err(missing.collect()));
        }
        Ok(Ok(last))
    }

    async fn insert_message(&self, tx: &mut Tx, m: &NewMessage<'_>) -> Result<i64, StoreError> {
        let (ope, target) = match m.target {
            Target::User(u) => (OPE_USER, user_param(u)),
            Target::Group(g) => (OPE_GROUP, group_param(g)),
        };
        let sql = format!(
            "INSERT INTO messages (sender, req, ope, target, kind, body, ex, ts) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?){}",
            self.backend().returning_id()
        );
        let query = sqlx::query(AssertSqlSafe(sql))
            .bind(user_param(m.sender))
            .bind(m.req)
            .bind(ope)
            .bind(target)
            .bind(m.kind)
            .bind(m.body)
            .bind(m.ex)
            .bind(m.ts_ms);
        Ok(self.backend().inserted_id(query, tx).await?)
    }

    /// Creates missing `user_seq` rows in their own (autocommit) statement.
    pub(super) async fn create_seq_rows(&self, users: &[i64]) -> Result<(), StoreError> {
        for chunk in users.chunks(ROW_CHUNK) {
            let sql = format!(
                "INSERT INTO user_seq (user_id, last_seq) VALUES {} {}",
                rows(chunk.len(), 2),
                self.backend().do_nothing("user_id")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &u in chunk {
                query = query.bind(u).bind(0_i64);
            }
            query.execute(self.db.pool()).await?;
        }
        Ok(())
    }

    /// The message stored under `(sender, req)` and its allocations.
    async fn find_original(
        &self,
        sender: UserId,
        req: &str,
    ) -> Result<Option<Delivery>, StoreError> {
        let sql =
            format!("SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.sender = ? AND m.req = ?");
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(user_param(sender))
            .bind(req)
            .fetch_optional(self.db.pool())
            .await?
        else {
            return Ok(None);
        };
        let message = message_from_row(&row)?;
        let id = u64_param(message.id);
        let rows = sqlx::query("SELECT user_id, seq FROM inbox WHERE message_id = ?")
            .bind(id)
            .fetch_all(self.db.pool())
            .await?;
        let mut inbox = Vec::with_capacity(rows.len());
        for row in &rows {
            inbox.push((user_col(row, "user_id")?, seq_col(row, "seq")?));
        }
        inbox.sort_unstable();
        let gseq = sqlx::query("SELECT seq FROM group_timeline WHERE message_id = ?")
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?
            .map(|row| seq_col(&row, "seq"))
            .transpose()?;
        let sender_seq = inbox
            .iter()
            .find(|(u, _)| *u == message.sender)
            .map(|&(_, seq)| seq);
        Ok(Some(Delivery {
            message,
            sender_seq,
            gseq,
            inbox,
            duplicate: true,
        }))
    }
}

/// Commits the transaction of an attempt that stored, rolls it back
/// otherwise.
pub(super) async fn settle<T>(
    tx: Tx,
    attempt: Result<Attempt<T>, StoreError>,
) -> Result<Attempt<T>, StoreError> {
    match attempt {
        Ok(Attempt::Stored(done)) => {
            tx.commit().await?;
            Ok(Attempt::Stored(done))
        }
        other => {
            rollback(tx).await;
            other
        }
    }
}

pub(super) fn stored(m: &NewMessage<'_>, id: i64) -> Result<StoredMessage, DbError> {
    Ok(StoredMessage {
        id: positive(id, "messages.id")?,
        sender: m.sender,
        req: m.req.to_owned(),
        target: m.target,
        kind: m.kind.to_owned(),
        body: m.body.to_owned(),
        ex: m.ex.map(str::to_owned),
        ts_ms: m.ts_ms,
    })
}
