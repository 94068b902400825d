//! The chat store and the user directory: users, friendships, groups and
//! their members; messages, per-user inboxes and large-group timelines.
//!
//! Owns the tables of `sql/*/0002_chat.sql` and `0004_receipts.sql` and
//! every statement on them, for SQLite and MySQL/MariaDB, on the shared
//! [`Db`] (the registry's). It stores and reads back; it does not push
//! messages, authenticate anyone or decide who may talk to whom (the chat
//! plugin does).
//!
//! Files by role: `directory` (users, friendships, colleagues), `groups`
//! (groups and their members), `messages` (storing a message and allocating
//! its sequences), `batch` (storing several in one transaction), `sync`
//! (reading inboxes and timelines back), `receipts` (read positions); the
//! types and the row mapping they share are here.
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
//! reports as a deadlock, lock timeout or busy database is retried (the
//! database layer's one retry, every write a whole transaction again).
//!
//! Idempotency: `(sender, req)` is unique. A resend finds the original and
//! returns its allocations; a racing twin fails on the unique key, and its
//! retry finds the original.
//!
//! Column mapping as in the registry: user ids are `u64` stored bit for bit
//! in `BIGINT`s, so they are ordered in Rust, never in SQL. Sequences and
//! generated ids are positive and may be ordered by the database.

mod batch;
mod directory;
mod groups;
mod messages;
mod receipts;
mod sync;

pub use batch::PreparedBatch;
pub use receipts::{OthersRead, READ_STATE_MAX, ReadPosition};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::AnyConnection;
use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

use crate::db::{
    Backend, Db, DbError, bad_row, bind_all, col, database_error, placeholders, sorted_user_params,
    user_col, user_param,
};
use crate::types::UserId;

/// Ids per `IN (...)` list. MariaDB turns lists of 1000 values or more into
/// a join with a temporary table; locking reads stay well below that.
const ID_CHUNK: usize = 500;
/// Rows per multi-row `INSERT` (at most four values each).
const ROW_CHUNK: usize = 250;

const OPE_USER: i64 = 0;
const OPE_GROUP: i64 = 1;

/// `ope + 0`: sqlx's `Any` driver cannot decode MySQL's `TINYINT`; the sum
/// is a wider integer on both backends.
const MESSAGE_COLUMNS: &str =
    "m.id, m.sender, m.req, m.ope + 0 AS ope, m.target, m.kind, m.body, m.ex, m.ts";

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

database_error!(StoreError);

/// Handle on the chat tables; cheap to clone (it wraps the shared
/// database's pool).
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    /// Batches stored message by message after their transaction failed
    /// (shared by the clones of one store).
    fallbacks: Arc<AtomicU64>,
}

impl Store {
    /// A store on the shared database, e.g. the
    /// [`Registry`](crate::registry::Registry)'s (which has run the
    /// migrations).
    pub fn new(db: &impl AsRef<Db>) -> Store {
        Store {
            db: db.as_ref().clone(),
            fallbacks: Arc::default(),
        }
    }

    /// How many batches ([`Store::store_messages`]) were stored message by
    /// message because their batch transaction or duplicate check failed:
    /// each costs a transaction per message.
    pub fn batch_fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    fn backend(&self) -> Backend {
        self.db.backend()
    }
}

/// The users of `users` that are not in the directory, in the given order.
async fn missing_users(
    conn: &mut AnyConnection,
    users: &[UserId],
) -> Result<Vec<UserId>, StoreError> {
    let ids = sorted_user_params(users);
    let mut found = HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(ID_CHUNK) {
        let sql = format!(
            "SELECT id FROM users WHERE id IN ({})",
            placeholders(chunk.len())
        );
        let query = bind_all(sqlx::query(AssertSqlSafe(sql)), chunk);
        for row in query.fetch_all(&mut *conn).await? {
            found.insert(col::<i64>(&row, "id")?);
        }
    }
    Ok(users
        .iter()
        .copied()
        .filter(|&u| !found.contains(&user_param(u)))
        .collect())
}

/// Group ids are generated (positive); any other value maps to one that
/// matches no row.
fn group_param(g: u64) -> i64 {
    g as i64
}

fn positive(v: i64, what: &str) -> Result<u64, DbError> {
    if v > 0 {
        Ok(v as u64)
    } else {
        Err(bad_row(format!("{what}: {v} is not positive")))
    }
}

fn seq_col(row: &AnyRow, name: &str) -> Result<u64, DbError> {
    positive(col(row, name)?, name)
}

/// The user ids of column `name`, sorted.
fn sorted_ids(rows: &[AnyRow], name: &str) -> Result<Vec<UserId>, DbError> {
    let mut out = rows
        .iter()
        .map(|r| user_col(r, name))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_unstable();
    Ok(out)
}

fn message_from_row(row: &AnyRow) -> Result<StoredMessage, DbError> {
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
