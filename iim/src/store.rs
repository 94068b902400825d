//! The chat store and the user directory: users, friendships, groups and
//! their members; messages, per-user inboxes and large-group timelines.
//!
//! Owns the tables of `sql/*/0002_chat.sql` and every statement on them, for
//! SQLite and MySQL/MariaDB through sqlx's `Any` driver, on the
//! [`Registry`]'s pool. It stores and reads back; it does not push messages,
//! authenticate anyone or decide who may talk to whom (the chat plugin does).
//!
//! Sequences: every user's inbox carries a gap-free sequence from 1, and
//! `user_seq.last_seq` is the last one allocated. A sequence is allocated in
//! the transaction that writes the inbox row, under the lock of the user's
//! `user_seq` row (MySQL: `SELECT ... FOR UPDATE`; SQLite: the writer lock
//! of `BEGIN IMMEDIATE`). Writers of one inbox — in this process or in
//! other app servers — therefore serialise and commit in sequence order, and
//! a transaction that rolls back leaves no gap. Large groups use the same
//! scheme on `chat_groups.timeline_seq`. Locks are always taken in one
//! order — the group row first, then `user_seq` rows by ascending (signed)
//! id — so writers do not deadlock each other; what InnoDB or SQLite still
//! reports as a deadlock, lock timeout or busy database is retried.
//!
//! Idempotency: `(sender, req)` is unique. A resend finds the original and
//! returns its allocations; a racing twin fails on the unique key, and its
//! retry finds the original.
//!
//! Column mapping as in the registry: user ids are `u64` stored bit for bit
//! in `BIGINT`s, so they are ordered in Rust, never in SQL. Sequences and
//! generated ids are positive and may be ordered by the database.

use crate::db::{backoff, is_retryable};
use std::collections::{HashMap, HashSet};
use std::future::Future;

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AnyPool, AssertSqlSafe, Row, Transaction};

use crate::registry::{Backend, Registry};
use crate::types::{UserId, now_ms};

/// Ids per `IN (...)` list. MariaDB turns lists of 1000 values or more into
/// a join with a temporary table; locking reads stay well below that.
const ID_CHUNK: usize = 500;
/// Rows per multi-row `INSERT` (at most four values each).
const ROW_CHUNK: usize = 250;
/// Attempts of one write when the database reports a conflict.
const ATTEMPTS: u32 = 10;

const OPE_USER: i64 = 0;
const OPE_GROUP: i64 = 1;

/// `ope + 0`: sqlx's `Any` driver cannot decode MySQL's `TINYINT`; the sum
/// is a wider integer on both backends.
const MESSAGE_COLUMNS: &str =
    "m.id, m.sender, m.req, m.ope + 0 AS ope, m.target, m.kind, m.body, m.ex, m.ts";

type Tx = Transaction<'static, Any>;

/// One row of the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub name: String,
    pub org: String,
}

/// A chat group and its members, sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub id: u64,
    pub name: String,
    pub members: Vec<UserId>,
}

/// A group as listed: member count and the last timeline sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSummary {
    pub id: u64,
    pub name: String,
    pub members: u64,
    pub timeline_max: u64,
}

/// Whom a message is for: seed 004's `ope` (0 single, 1 group) and `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    User(UserId),
    Group(u64),
}

/// A message to store. `req` is the client's message id: a second message
/// with the same `(sender, req)` is the first one resent.
#[derive(Clone, Copy, Debug)]
pub struct NewMessage<'a> {
    pub sender: UserId,
    pub req: &'a str,
    pub target: Target,
    pub kind: &'a str,
    /// JSON text, stored verbatim (not validated here).
    pub body: &'a str,
    pub ex: Option<&'a str>,
    pub ts_ms: i64,
}

/// A message as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: u64,
    pub sender: UserId,
    pub req: String,
    pub target: Target,
    pub kind: String,
    pub body: String,
    pub ex: Option<String>,
    pub ts_ms: i64,
}

/// Where [`Store::store_message`] put a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub message: StoredMessage,
    /// The message's sequence in the sender's inbox (1:1 and small groups).
    pub sender_seq: Option<u64>,
    /// Its sequence in the group timeline (large groups).
    pub gseq: Option<u64>,
    /// Every inbox it was written to (sender included), sorted by user.
    pub inbox: Vec<(UserId, u64)>,
    /// `(sender, req)` was stored before: everything above is the original
    /// allocation.
    pub duplicate: bool,
}

/// A slice of an inbox or a timeline: `(seq, message)` ascending, and the
/// last sequence allocated when it was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<(u64, StoredMessage)>,
    pub max: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database error")]
    Database(#[from] sqlx::Error),
    #[error("unknown user {0}")]
    UnknownUser(u64),
    #[error("unknown group {0}")]
    UnknownGroup(u64),
    #[error("not a member of group {0}")]
    NotMember(u64),
    #[error("bad store row: {what}")]
    BadRow { what: String },
}

/// Handle on the chat tables; cheap to clone (it wraps the registry's pool).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// What one attempt of [`Store::store_message`] came to.
enum Attempt {
    Stored(Delivery),
    /// These users have no `user_seq` row yet: create them outside the
    /// transaction and go again (creating them inside would race on the
    /// gap locks of the locking read).
    NeedSeqRows(Vec<i64>),
}

impl Store {
    /// A store on the registry's database and pool (the registry has run
    /// the migrations).
    pub fn new(registry: &Registry) -> Store {
        Store {
            pool: registry.pool().clone(),
            backend: registry.backend(),
        }
    }

    // ----- directory -------------------------------------------------------

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
        sorted.sort_by_key(|u| id_param(u.id));
        let now = now_ms();
        self.retry("add_users", || self.try_add_users(&sorted, now))
            .await
    }

    async fn try_add_users(&self, users: &[&User], now: i64) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        for chunk in users.chunks(ROW_CHUNK) {
            let sql = format!(
                "INSERT INTO users (id, name, org, created_at) VALUES {} {}",
                rows(chunk.len(), 4),
                self.upsert_columns("id", &["name", "org"])
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                query = query
                    .bind(id_param(u.id))
                    .bind(u.name.as_str())
                    .bind(u.org.as_str())
                    .bind(now);
            }
            query.execute(&mut *tx).await?;
            // Sends then find the row to lock without a detour.
            let sql = format!(
                "INSERT INTO user_seq (user_id, last_seq) VALUES {} {}",
                rows(chunk.len(), 2),
                self.do_nothing("user_id")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                query = query.bind(id_param(u.id)).bind(0_i64);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let row = sqlx::query("SELECT id, name, org FROM users WHERE id = ?")
            .bind(id_param(id))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Every user, ordered by id.
    pub async fn users(&self) -> Result<Vec<User>, StoreError> {
        let rows = sqlx::query("SELECT id, name, org FROM users")
            .fetch_all(&self.pool)
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
        self.retry("add_friendship", || self.try_add_friendship(a, b))
            .await
    }

    async fn try_add_friendship(&self, a: UserId, b: UserId) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let result = async {
            if let Some(u) = missing_users(&mut tx, &[a, b]).await?.first() {
                return Err(StoreError::UnknownUser(u.0));
            }
            let mut pairs = vec![(id_param(a), id_param(b)), (id_param(b), id_param(a))];
            pairs.sort_unstable();
            pairs.dedup();
            let sql = format!(
                "INSERT INTO friendships (user_id, friend_id) VALUES {} {}",
                rows(pairs.len(), 2),
                self.do_nothing("user_id, friend_id")
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
            .bind(id_param(u))
            .fetch_all(&self.pool)
            .await?;
        sorted_ids(&rows, "friend_id")
    }

    /// Everyone in the user's org except the user, sorted; empty for an
    /// unknown user.
    pub async fn colleagues_of(&self, u: UserId) -> Result<Vec<UserId>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.id FROM users u JOIN users c ON c.org = u.org WHERE u.id = ? AND c.id <> u.id",
        )
        .bind(id_param(u))
        .fetch_all(&self.pool)
        .await?;
        sorted_ids(&rows, "id")
    }

    /// Creates a group (names need not be unique) and returns its id. Every
    /// member must be a known user; duplicates are ignored.
    pub async fn create_group(&self, name: &str, members: &[UserId]) -> Result<u64, StoreError> {
        let now = now_ms();
        self.retry("create_group", || self.try_create_group(name, members, now))
            .await
    }

    async fn try_create_group(
        &self,
        name: &str,
        members: &[UserId],
        now: i64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let result = async {
            if let Some(u) = missing_users(&mut tx, members).await?.first() {
                return Err(StoreError::UnknownUser(u.0));
            }
            let sql = format!(
                "INSERT INTO chat_groups (name, timeline_seq, created_at) VALUES (?, 0, ?){}",
                self.returning_id()
            );
            let query = sqlx::query(AssertSqlSafe(sql)).bind(name).bind(now);
            let id = self.inserted_id(query, &mut tx).await?;
            let id = positive(id, "chat_groups.id")?;
            let mut ids = sorted_params(members);
            ids.dedup();
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
        self.retry("add_member", || self.try_add_member(g, u)).await
    }

    async fn try_add_member(&self, g: u64, u: UserId) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
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
                self.do_nothing("group_id, user_id")
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(group_param(g))
                .bind(id_param(u))
                .execute(&mut *tx)
                .await?;
            Ok(())
        }
        .await;
        finish(tx, result).await
    }

    /// Returns whether `u` was a member.
    pub async fn remove_member(&self, g: u64, u: UserId) -> Result<bool, StoreError> {
        self.retry("remove_member", || self.try_remove_member(g, u))
            .await
    }

    async fn try_remove_member(&self, g: u64, u: UserId) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let result = async {
            if self.lock_group(&mut tx, g).await?.is_none() {
                return Err(StoreError::UnknownGroup(g));
            }
            let done = sqlx::query("DELETE FROM group_members WHERE group_id = ? AND user_id = ?")
                .bind(group_param(g))
                .bind(id_param(u))
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
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let rows = sqlx::query("SELECT user_id FROM group_members WHERE group_id = ?")
            .bind(group_param(g))
            .fetch_all(&self.pool)
            .await?;
        Ok(Some(Group {
            id: positive(col(&row, "id")?, "chat_groups.id")?,
            name: col(&row, "name")?,
            members: sorted_ids(&rows, "user_id")?,
        }))
    }

    /// The groups `u` belongs to, ordered by id.
    pub async fn groups_of(&self, u: UserId) -> Result<Vec<GroupSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT g.id, g.name, g.timeline_seq, \
             (SELECT COUNT(*) FROM group_members c WHERE c.group_id = g.id) AS members \
             FROM group_members m JOIN chat_groups g ON g.id = m.group_id WHERE m.user_id = ?",
        )
        .bind(id_param(u))
        .fetch_all(&self.pool)
        .await?;
        summaries(&rows)
    }

    /// Every group, ordered by id.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT g.id, g.name, g.timeline_seq, \
             (SELECT COUNT(*) FROM group_members c WHERE c.group_id = g.id) AS members \
             FROM chat_groups g",
        )
        .fetch_all(&self.pool)
        .await?;
        summaries(&rows)
    }

    // ----- chat ------------------------------------------------------------

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
        let mut attempt = 1;
        loop {
            if let Some(original) = self.find_original(m.sender, m.req).await? {
                return Ok(original);
            }
            let outcome = match self.try_store(m, large_group_threshold).await {
                Ok(Attempt::Stored(delivery)) => return Ok(delivery),
                Ok(Attempt::NeedSeqRows(users)) => self.create_seq_rows(&users).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) if attempt < ATTEMPTS => {}
                Ok(()) => return Err(bad_row("user_seq rows missing after creating them")),
                Err(StoreError::Database(e)) if attempt < ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(attempt, error = %e, "store_message conflict, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(e),
            }
            attempt += 1;
        }
    }

    async fn try_store(&self, m: &NewMessage<'_>, threshold: usize) -> Result<Attempt, StoreError> {
        let mut tx = self.begin().await?;
        match self.store_in(&mut tx, m, threshold).await {
            Ok(Attempt::Stored(delivery)) => {
                tx.commit().await?;
                Ok(Attempt::Stored(delivery))
            }
            other => {
                rollback(tx).await;
                other
            }
        }
    }

    async fn store_in(
        &self,
        tx: &mut Tx,
        m: &NewMessage<'_>,
        threshold: usize,
    ) -> Result<Attempt, StoreError> {
        let sender = id_param(m.sender);
        match m.target {
            Target::User(to) => {
                if let Some(u) = missing_users(tx, &[m.sender, to]).await?.first() {
                    return Err(StoreError::UnknownUser(u.0));
                }
                let mut users = vec![sender, id_param(to)];
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
    ) -> Result<Attempt, StoreError> {
        let mut last = HashMap::with_capacity(users.len());
        for chunk in users.chunks(ID_CHUNK) {
            let sql = format!(
                "SELECT user_id, last_seq FROM user_seq{} WHERE user_id IN ({}){}",
                self.force_primary(),
                placeholders(chunk.len()),
                self.for_update()
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &u in chunk {
                query = query.bind(u);
            }
            for row in query.fetch_all(&mut **tx).await? {
                let seq: i64 = col(&row, "last_seq")?;
                if seq < 0 {
                    return Err(bad_row(format!("user_seq.last_seq: negative {seq}")));
                }
                last.insert(col::<i64>(&row, "user_id")?, seq);
            }
        }
        if last.len() < users.len() {
            let missing = users
                .iter()
                .copied()
                .filter(|u| !last.contains_key(u))
                .collect();
            return Ok(Attempt::NeedSeqRows(missing));
        }

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
                self.upsert_columns("user_id", &["last_seq"])
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &(u, seq) in chunk {
                query = query.bind(u).bind(seq);
            }
            query.execute(&mut **tx).await?;
        }

        let sender = id_param(m.sender);
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

    async fn insert_message(&self, tx: &mut Tx, m: &NewMessage<'_>) -> Result<i64, StoreError> {
        let (ope, target) = match m.target {
            Target::User(u) => (OPE_USER, id_param(u)),
            Target::Group(g) => (OPE_GROUP, group_param(g)),
        };
        let sql = format!(
            "INSERT INTO messages (sender, req, ope, target, kind, body, ex, ts) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?){}",
            self.returning_id()
        );
        let query = sqlx::query(AssertSqlSafe(sql))
            .bind(id_param(m.sender))
            .bind(m.req)
            .bind(ope)
            .bind(target)
            .bind(m.kind)
            .bind(m.body)
            .bind(m.ex)
            .bind(m.ts_ms);
        self.inserted_id(query, tx).await
    }

    /// Runs an `INSERT` of one row ending in [`Store::returning_id`] and
    /// returns the id the database generated.
    async fn inserted_id(
        &self,
        query: Query<'_, Any, AnyArguments>,
        tx: &mut Tx,
    ) -> Result<i64, StoreError> {
        match self.backend {
            Backend::Sqlite => {
                let row = query.fetch_one(&mut **tx).await?;
                col(&row, "id")
            }
            Backend::MySql => query
                .execute(&mut **tx)
                .await?
                .last_insert_id()
                .ok_or_else(|| bad_row("no generated id after an insert")),
        }
    }

    /// Creates missing `user_seq` rows in their own (autocommit) statement.
    async fn create_seq_rows(&self, users: &[i64]) -> Result<(), StoreError> {
        for chunk in users.chunks(ROW_CHUNK) {
            let sql = format!(
                "INSERT INTO user_seq (user_id, last_seq) VALUES {} {}",
                rows(chunk.len(), 2),
                self.do_nothing("user_id")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &u in chunk {
                query = query.bind(u).bind(0_i64);
            }
            query.execute(&self.pool).await?;
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
            .bind(id_param(sender))
            .bind(req)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let message = message_from_row(&row)?;
        let id = u64_param(message.id);
        let rows = sqlx::query("SELECT user_id, seq FROM inbox WHERE message_id = ?")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let mut inbox = Vec::with_capacity(rows.len());
        for row in &rows {
            inbox.push((user_col(row, "user_id")?, seq_col(row, "seq")?));
        }
        inbox.sort_unstable();
        let gseq = sqlx::query("SELECT seq FROM group_timeline WHERE message_id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
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

    /// The user's inbox after `since`: at most `limit` items, ascending, and
    /// the user's last sequence (0 for a user who never got a message).
    pub async fn inbox_since(&self, u: UserId, since: u64, limit: u32) -> Result<Page, StoreError> {
        let sql = format!(
            "SELECT i.seq, {MESSAGE_COLUMNS} FROM inbox i JOIN messages m ON m.id = i.message_id \
             WHERE i.user_id = ? AND i.seq > ? ORDER BY i.seq LIMIT ?"
        );
        let items = self.page(sql, id_param(u), since, limit).await?;
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
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((seq_col(row, "seq")?, message_from_row(row)?)))
            .collect()
    }

    /// The user's last inbox sequence; 0 if none was allocated.
    pub async fn inbox_max(&self, u: UserId) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT last_seq FROM user_seq WHERE user_id = ?")
            .bind(id_param(u))
            .fetch_optional(&self.pool)
            .await?;
        row.map_or(Ok(0), |row| nonnegative_col(&row, "last_seq"))
    }

    /// The group's last timeline sequence (0 for small groups, which write
    /// to inboxes); `UnknownGroup` for a group that does not exist.
    pub async fn timeline_max(&self, g: u64) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT timeline_seq FROM chat_groups WHERE id = ?")
            .bind(group_param(g))
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::UnknownGroup(g))?;
        nonnegative_col(&row, "timeline_seq")
    }

    // ----- helpers ---------------------------------------------------------

    /// Locks the group row (MySQL; SQLite's transaction holds the database)
    /// and returns its timeline sequence, or `None` for an unknown group.
    async fn lock_group(&self, tx: &mut Tx, g: u64) -> Result<Option<i64>, StoreError> {
        let sql = format!(
            "SELECT timeline_seq FROM chat_groups WHERE id = ?{}",
            self.for_update()
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
            return Err(bad_row(format!("chat_groups.timeline_seq: negative {seq}")));
        }
        Ok(Some(seq))
    }

    /// Runs `attempt_fn` again, after a short pause, while it fails with a
    /// conflict worth retrying (see [`is_retryable`]).
    async fn retry<T, F, Fut>(&self, what: &'static str, mut attempt_fn: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1;
        loop {
            match attempt_fn().await {
                Err(StoreError::Database(e)) if attempt < ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(what, attempt, error = %e, "store conflict, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// A transaction that holds the write lock from its start on SQLite, so
    /// the busy timeout applies instead of a failed lock upgrade later.
    async fn begin(&self) -> Result<Tx, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::MySql => self.pool.begin().await,
        }
    }

    /// sqlx's `Any` driver reports no last insert id for SQLite, and MySQL
    /// has no `RETURNING`.
    fn returning_id(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => " RETURNING id",
            Backend::MySql => "",
        }
    }

    fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::MySql => " FOR UPDATE",
        }
    }

    /// Keeps InnoDB on primary-key lookups for a locking `IN (...)` read: a
    /// table scan would lock every row it passes.
    fn force_primary(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::MySql => " FORCE INDEX (PRIMARY)",
        }
    }

    /// "Insert these rows, keep the existing ones": `INSERT IGNORE` would
    /// also turn real errors (over-long values) into warnings on MySQL.
    fn do_nothing(&self, key: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("ON CONFLICT ({key}) DO NOTHING"),
            Backend::MySql => {
                let first = key.split(',').next().unwrap_or(key).trim();
                format!("ON DUPLICATE KEY UPDATE {first} = {first}")
            }
        }
    }

    /// "Insert these rows, or on this key set `cols` from them" for
    /// multi-row inserts (so the values cannot be bound twice, as the
    /// registry does for single rows).
    fn upsert_columns(&self, key: &str, cols: &[&str]) -> String {
        match self.backend {
            Backend::Sqlite => format!(
                "ON CONFLICT ({key}) DO UPDATE SET {}",
                cols.iter()
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Backend::MySql => format!(
                "ON DUPLICATE KEY UPDATE {}",
                cols.iter()
                    .map(|c| format!("{c} = VALUES({c})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Commits on success, rolls back on failure.
async fn finish<T>(tx: Tx, result: Result<T, StoreError>) -> Result<T, StoreError> {
    match result {
        Ok(v) => {
            tx.commit().await?;
            Ok(v)
        }
        Err(e) => {
            rollback(tx).await;
            Err(e)
        }
    }
}

/// Rolls back now, releasing locks, rather than when the connection is next
/// used. A failure here is not the caller's error: the connection goes back
/// to the pool, which tests it.
async fn rollback(tx: Tx) {
    if let Err(e) = tx.rollback().await {
        tracing::debug!(error = %e, "store rollback failed");
    }
}

/// The users of `users` that are not in the directory, in the given order.
async fn missing_users(
    conn: &mut AnyConnection,
    users: &[UserId],
) -> Result<Vec<UserId>, StoreError> {
    let mut ids = sorted_params(users);
    ids.dedup();
    let mut found = HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(ID_CHUNK) {
        let sql = format!(
            "SELECT id FROM users WHERE id IN ({})",
            placeholders(chunk.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for &u in chunk {
            query = query.bind(u);
        }
        for row in query.fetch_all(&mut *conn).await? {
            found.insert(col::<i64>(&row, "id")?);
        }
    }
    Ok(users
        .iter()
        .copied()
        .filter(|&u| !found.contains(&id_param(u)))
        .collect())
}

/// `?, ?, ?`
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `(?, ?), (?, ?)`: `n` rows of `width` values.
fn rows(n: usize, width: usize) -> String {
    let row = format!("({})", placeholders(width));
    vec![row; n].join(", ")
}

/// User ids use the full `u64` range: stored bit for bit.
fn id_param(u: UserId) -> i64 {
    u.0 as i64
}

fn u64_param(v: u64) -> i64 {
    v as i64
}

/// Group ids are generated (positive); any other value maps to one that
/// matches no row.
fn group_param(g: u64) -> i64 {
    g as i64
}

fn sorted_params(users: &[UserId]) -> Vec<i64> {
    let mut ids: Vec<i64> = users.iter().map(|&u| id_param(u)).collect();
    ids.sort_unstable();
    ids
}

fn stored(m: &NewMessage<'_>, id: i64) -> Result<StoredMessage, StoreError> {
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

fn bad_row(what: impl Into<String>) -> StoreError {
    StoreError::BadRow { what: what.into() }
}

/// A column decoded as `T`; a type mismatch is a bad row, not a panic.
fn col<T>(row: &AnyRow, col: &str) -> Result<T, StoreError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get::<T, _>(col)
        .map_err(|e| bad_row(format!("column {col}: {e}")))
}

fn positive(v: i64, what: &str) -> Result<u64, StoreError> {
    if v > 0 {
        Ok(v as u64)
    } else {
        Err(bad_row(format!("{what}: {v} is not positive")))
    }
}

fn seq_col(row: &AnyRow, name: &str) -> Result<u64, StoreError> {
    positive(col(row, name)?, name)
}

fn nonnegative_col(row: &AnyRow, name: &str) -> Result<u64, StoreError> {
    let v: i64 = col(row, name)?;
    u64::try_from(v).map_err(|_| bad_row(format!("column {name}: negative {v}")))
}

fn user_col(row: &AnyRow, name: &str) -> Result<UserId, StoreError> {
    Ok(UserId(col::<i64>(row, name)? as u64))
}

fn sorted_ids(rows: &[AnyRow], name: &str) -> Result<Vec<UserId>, StoreError> {
    let mut out = rows
        .iter()
        .map(|r| user_col(r, name))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_unstable();
    Ok(out)
}

fn user_from_row(row: &AnyRow) -> Result<User, StoreError> {
    Ok(User {
        id: user_col(row, "id")?,
        name: col(row, "name")?,
        org: col(row, "org")?,
    })
}

fn summaries(rows: &[AnyRow]) -> Result<Vec<GroupSummary>, StoreError> {
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
        .collect::<Result<Vec<_>, StoreError>>()?;
    out.sort_unstable_by_key(|g| g.id);
    Ok(out)
}

fn message_from_row(row: &AnyRow) -> Result<StoredMessage, StoreError> {
    let target: i64 = col(row, "target")?;
    let target = match col::<i64>(row, "ope")? {
        OPE_USER => Target::User(UserId(target as u64)),
        OPE_GROUP => Target::Group(target as u64),
        other => return Err(bad_row(format!("column ope: unknown value {other}"))),
    };
    Ok(StoredMessage {
        id: positive(col(row, "id")?, "messages.id")?,
        sender: user_col(row, "sender")?,
        req: col(row, "req")?,
        target,
        kind: col(row, "kind")?,
        body: col(row, "body")?,
        ex: col(row, "ex")?,
        ts_ms: col(row, "ts")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_lists() {
        assert_eq!(placeholders(3), "?, ?, ?");
        assert_eq!(rows(2, 3), "(?, ?, ?), (?, ?, ?)");
    }

    #[test]
    fn ids_keep_their_bits() {
        assert_eq!(id_param(UserId(u64::MAX)), -1);
        assert_eq!(id_param(UserId(1 << 63)) as u64, 1 << 63);
    }
}
