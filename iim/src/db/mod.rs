//! The database layer under the registry, the chat store and presence: one
//! pool per process and the migrations it runs ([`Db`]), the SQL dialect of
//! each backend ([`Backend`]: SQLite, MySQL/MariaDB), the one kind of write
//! transaction (`Db::begin_write`), the one retry of a whole transaction
//! after a conflict (`retry`), and the mapping between Rust ids and the
//! `BIGINT` columns that hold them.
//!
//! It owns no table and no statement on one: the registry (`servers`,
//! `sessions`), the store (the chat tables), presence (`presence`, the
//! status columns of `sessions`) and the presence aggregate, which the
//! registry and presence both run, each write their own SQL through it.
//! Nothing here decides policy or knows the time.
//!
//! Write transactions: on SQLite `BEGIN IMMEDIATE` takes the writer lock at
//! once, so the busy timeout applies instead of a failed lock upgrade
//! later; on MySQL they run at `READ COMMITTED`, so a plain read after a
//! row lock sees every change committed before the lock was granted (the
//! presence rules need that; see `aggregate`), and no gap locks are taken.
//! With binary logging on, MySQL then needs `binlog_format` ROW or MIXED
//! (the defaults): InnoDB refuses statement-based logging at that level.
//! Their conflicts — InnoDB deadlocks and lock wait timeouts, Galera
//! certification failures (which arrive as deadlocks), a busy SQLite, a
//! duplicate key from a racing twin — are retried by running the whole
//! transaction again after a short, jittered pause, a bounded number of
//! times.

mod dialect;
mod pool;
mod retry;
mod row;

pub use dialect::Backend;
pub use pool::{Db, node_urls};
pub use row::ParseNameError;

pub(crate) use pool::{ConnectError, Tx, finish, rollback};
pub(crate) use retry::{Conflict, TRANSACTION, retry};
pub(crate) use row::database_error;
pub(crate) use row::{
    DbError, bad_row, bind_all, col, nonnegative_col, parse_col, placeholders, required_server_col,
    rows, server_col, server_param, sorted_user_params, u64_param, user_col, user_param,
};
