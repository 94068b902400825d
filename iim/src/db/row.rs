//! Ids and columns between Rust and the database: ids, epochs and times are
//! `BIGINT`s; user and channel ids use the whole `u64` range and are stored
//! bit for bit as `i64` (so they are ordered in Rust, never in SQL); server
//! ids are `u32`. A column that does not decode, or holds a value out of
//! range, is a bad row — an error, never a panic.

use std::str::FromStr;

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Row};

use crate::types::{ServerId, UserId};

/// What the shared helpers fail with; the registry's, the store's and
/// presence's errors each convert from it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("bad row: {0}")]
    BadRow(String),
}

/// A string that names no value of a stored enum (role, server state,
/// status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct ParseNameError {
    pub kind: &'static str,
    pub value: String,
}

/// `From<DbError>` and `Conflict` for a public error enum with the variants
/// `Database(sqlx::Error)` and `BadRow { what: String }`: a database error
/// is a conflict when [`is_retryable`](super::retry::is_retryable) says so.
macro_rules! database_error {
    // `$aborted`: a variant of `$error` that is also worth another attempt.
    ($error:ident $(, $aborted:ident)?) => {
        impl From<$crate::db::DbError> for $error {
            fn from(e: $crate::db::DbError) -> Self {
                match e {
                    $crate::db::DbError::Database(e) => $error::Database(e),
                    $crate::db::DbError::BadRow(what) => $error::BadRow { what },
                }
            }
        }

        impl $crate::db::Conflict for $error {
            fn is_conflict(&self) -> bool {
                match self {
                    $error::Database(e) => $crate::db::Conflict::is_conflict(e),
                    $($error::$aborted => true,)?
                    _ => false,
                }
            }
        }
    };
}
pub(crate) use database_error;

pub(crate) fn bad_row(what: impl Into<String>) -> DbError {
    DbError::BadRow(what.into())
}

/// A column decoded as `T`; a type mismatch is a bad row, not a panic.
pub(crate) fn col<T>(row: &AnyRow, name: &str) -> Result<T, DbError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get::<T, _>(name)
        .map_err(|e| bad_row(format!("column {name}: {e}")))
}

pub(crate) fn nonnegative_col(row: &AnyRow, name: &str) -> Result<u64, DbError> {
    let v: i64 = col(row, name)?;
    u64::try_from(v).map_err(|_| bad_row(format!("column {name}: negative {v}")))
}

pub(crate) fn user_col(row: &AnyRow, name: &str) -> Result<UserId, DbError> {
    Ok(UserId(col::<i64>(row, name)? as u64))
}

pub(crate) fn server_col(row: &AnyRow, name: &str) -> Result<Option<ServerId>, DbError> {
    col::<Option<i64>>(row, name)?
        .map(|v| {
            u32::try_from(v)
                .map(ServerId)
                .map_err(|_| bad_row(format!("column {name}: server id {v} out of range")))
        })
        .transpose()
}

pub(crate) fn required_server_col(row: &AnyRow, name: &str) -> Result<ServerId, DbError> {
    server_col(row, name)?.ok_or_else(|| bad_row(format!("column {name}: null")))
}

/// A column holding the name of a stored enum value.
pub(crate) fn parse_col<T>(row: &AnyRow, name: &str) -> Result<T, DbError>
where
    T: FromStr<Err = ParseNameError>,
{
    col::<String>(row, name)?
        .parse()
        .map_err(|e: ParseNameError| bad_row(e.to_string()))
}

/// User ids use the full `u64` range: stored bit for bit.
pub(crate) fn user_param(u: UserId) -> i64 {
    u.0 as i64
}

/// Channel ids, epochs, group ids: stored bit for bit. Epochs and generated
/// ids are positive; a claim beyond `i64::MAX` maps to a negative value that
/// matches no row.
pub(crate) fn u64_param(v: u64) -> i64 {
    v as i64
}

pub(crate) fn server_param(id: ServerId) -> i64 {
    i64::from(id.0)
}

/// Distinct user ids as stored, ascending (signed): the lock order of every
/// writer.
pub(crate) fn sorted_user_params(users: &[UserId]) -> Vec<i64> {
    let mut ids: Vec<i64> = users.iter().map(|&u| user_param(u)).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A query on the `Any` driver, values not bound yet.
pub(crate) type AnyQuery<'q> = Query<'q, Any, AnyArguments>;

/// `query` with each of `values` bound in turn (the ids of an `IN (...)`
/// list).
pub(crate) fn bind_all<'q>(query: AnyQuery<'q>, values: &[i64]) -> AnyQuery<'q> {
    values.iter().fold(query, |query, &v| query.bind(v))
}

/// `?, ?, ?`
pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `(?, ?), (?, ?)`: `n` rows of `width` values.
pub(crate) fn rows(n: usize, width: usize) -> String {
    let row = format!("({})", placeholders(width));
    vec![row; n].join(", ")
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
        assert_eq!(user_param(UserId(u64::MAX)), -1);
        assert_eq!(user_param(UserId(1 << 63)) as u64, 1 << 63);
        assert_eq!(
            sorted_user_params(&[UserId(u64::MAX), UserId(3), UserId(3)]),
            [-1, 3]
        );
    }
}
