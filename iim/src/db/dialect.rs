//! The SQL that differs between SQLite and MySQL/MariaDB, one definition
//! each: the write transaction's opening, locking reads, index hints,
//! upserts, generated ids and integer casts. Everything else the registry,
//! the store and presence write is plain SQL both backends understand.

use sqlx::AnyConnection;

use super::row::{AnyQuery, DbError, bad_row, col};

/// Which SQL dialect a database speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    MySql,
}

impl Backend {
    /// How a write transaction starts (see the module documentation of
    /// `db`). On MySQL every pooled connection runs at `READ COMMITTED`
    /// (set when it connects), so a plain `START TRANSACTION` will do.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::MySql => "START TRANSACTION",
        }
    }

    /// Appended to a `SELECT` that must lock the rows it reads (MySQL;
    /// SQLite's write transaction already holds the whole database).
    pub(crate) fn for_update(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::MySql => " FOR UPDATE",
        }
    }

    /// After a table name: keeps InnoDB on primary-key lookups for a locking
    /// `IN (...)` read, where a table scan would lock every row it passes.
    pub(crate) fn force_primary(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::MySql => " FORCE INDEX (PRIMARY)",
        }
    }

    /// "Insert, or on this key update" up to the assignments, which follow
    /// with their values bound again rather than read back with
    /// `excluded.x` / `VALUES(x)` (for single-row upserts).
    pub(crate) fn upsert(self, key: &str) -> String {
        match self {
            Backend::Sqlite => format!("ON CONFLICT ({key}) DO UPDATE SET"),
            Backend::MySql => "ON DUPLICATE KEY UPDATE".to_owned(),
        }
    }

    /// "Insert these rows, or on this key set `cols` from them", for
    /// multi-row inserts, whose values cannot be bound twice.
    pub(crate) fn upsert_columns(self, key: &str, cols: &[&str]) -> String {
        let set = |value: &dyn Fn(&str) -> String| {
            cols.iter()
                .map(|c| format!("{c} = {}", value(c)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Backend::Sqlite => format!(
                "ON CONFLICT ({key}) DO UPDATE SET {}",
                set(&|c| format!("excluded.{c}"))
            ),
            Backend::MySql => format!(
                "ON DUPLICATE KEY UPDATE {}",
                set(&|c| format!("VALUES({c})"))
            ),
        }
    }

    /// "Insert these rows, keep the existing ones" for a key of one or more
    /// columns. On MySQL a no-op assignment of the key's first column:
    /// `INSERT IGNORE` would also turn real errors (over-long values) into
    /// warnings, and the no-op still takes the row's exclusive lock.
    pub(crate) fn do_nothing(self, key: &str) -> String {
        match self {
            Backend::Sqlite => format!("ON CONFLICT ({key}) DO NOTHING"),
            Backend::MySql => {
                let first = key.split(',').next().unwrap_or(key).trim();
                format!("ON DUPLICATE KEY UPDATE {first} = {first}")
            }
        }
    }

    /// Ends a one-row `INSERT` whose generated id [`Backend::inserted_id`]
    /// reads: sqlx's `Any` driver reports no last insert id for SQLite, and
    /// MySQL has no `RETURNING`.
    pub(crate) fn returning_id(self) -> &'static str {
        match self {
            Backend::Sqlite => " RETURNING id",
            Backend::MySql => "",
        }
    }

    /// Runs a one-row `INSERT` ending in [`Backend::returning_id`] and
    /// returns the id the database generated.
    pub(crate) async fn inserted_id(
        self,
        query: AnyQuery<'_>,
        conn: &mut AnyConnection,
    ) -> Result<i64, DbError> {
        match self {
            Backend::Sqlite => {
                let row = query.fetch_one(conn).await?;
                col(&row, "id")
            }
            Backend::MySql => query
                .execute(conn)
                .await?
                .last_insert_id()
                .ok_or_else(|| bad_row("no generated id after an insert")),
        }
    }

    /// An integer expression the `Any` driver can decode: MySQL's `SUM` is a
    /// `DECIMAL`.
    pub(crate) fn int_expr(self, expr: &str) -> String {
        match self {
            Backend::Sqlite => expr.to_owned(),
            Backend::MySql => format!("CAST({expr} AS SIGNED)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_several_columns_give_valid_no_op_updates() {
        assert_eq!(
            Backend::MySql.do_nothing("group_id, user_id"),
            "ON DUPLICATE KEY UPDATE group_id = group_id"
        );
        assert_eq!(
            Backend::Sqlite.do_nothing("group_id, user_id"),
            "ON CONFLICT (group_id, user_id) DO NOTHING"
        );
    }

    #[test]
    fn multi_row_upserts_read_the_new_values() {
        assert_eq!(
            Backend::Sqlite.upsert_columns("id", &["name", "org"]),
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, org = excluded.org"
        );
        assert_eq!(
            Backend::MySql.upsert_columns("id", &["name", "org"]),
            "ON DUPLICATE KEY UPDATE name = VALUES(name), org = VALUES(org)"
        );
    }
}
