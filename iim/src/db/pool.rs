//! The pool: connecting to SQLite or MySQL/MariaDB through sqlx's `Any`
//! driver, the migrations of `sql/` run at connect, and the write
//! transaction every writer opens.

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, Transaction};

use super::dialect::Backend;
use super::retry::{MIGRATION, retry};

static MYSQL_MIGRATIONS: Migrator = sqlx::migrate!("../sql/mysql");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../sql/sqlite");

pub(crate) type Tx = Transaction<'static, Any>;

/// The shared database: its pool and the dialect it speaks. The registry,
/// the chat store and presence each hold one; cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// Why [`Db::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("bad database url: {0}")]
    BadUrl(&'static str),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] MigrateError),
}

impl Db {
    /// Connects and runs the dialect's migrations.
    ///
    /// `sqlite://path/to/file.db` (created if missing, WAL, 5 s busy
    /// timeout), `sqlite::memory:` (one connection kept for the life of the
    /// pool, so every user sees the same database) or
    /// `mysql://user:pass@host:port/db`.
    pub(crate) async fn connect(url: &str) -> Result<Db, ConnectError> {
        sqlx::any::install_default_drivers();
        let (backend, pool) = if let Some(rest) = url.strip_prefix("sqlite:") {
            (Backend::Sqlite, connect_sqlite(url, rest).await?)
        } else if url.starts_with("mysql://") {
            (Backend::MySql, connect_mysql(url).await?)
        } else {
            return Err(ConnectError::BadUrl("expected a sqlite: or mysql:// url"));
        };
        let migrations = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::MySql => &MYSQL_MIGRATIONS,
        };
        // A database already at the latest version is used as it is, so a
        // least-privilege account (no DDL: sql/grants/) can connect once an
        // administrator has migrated it.
        if !up_to_date(&pool, migrations).await {
            retry("migrate", MIGRATION, || migrations.run(&pool)).await?;
        }
        Ok(Db { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A write transaction in the dialect's way ([`Backend::begin_write`]).
    pub(crate) async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        self.pool.begin_with(self.backend.begin_write()).await
    }
}

/// Every migration of `migrations` is recorded as applied, with its
/// checksum. Anything else — no table yet, one missing, a failed or changed
/// one, an error reading — is "no": the migrator then runs and decides.
async fn up_to_date(pool: &AnyPool, migrations: &Migrator) -> bool {
    let Ok(rows) = sqlx::query("SELECT version, checksum FROM _sqlx_migrations WHERE success = 1")
        .fetch_all(pool)
        .await
    else {
        return false;
    };
    let applied: std::collections::HashMap<i64, Vec<u8>> = rows
        .iter()
        .filter_map(|r| {
            use sqlx::Row;
            Some((r.try_get("version").ok()?, r.try_get("checksum").ok()?))
        })
        .collect();
    migrations
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .all(|m| {
            applied
                .get(&m.version)
                .is_some_and(|c| c[..] == m.checksum[..])
        })
}

/// Commits on success, rolls back on failure — now, releasing the locks,
/// rather than when the connection is next used. A failed rollback is not
/// the caller's error: the connection goes back to the pool, which tests
/// it.
pub(crate) async fn finish<T, E>(tx: Tx, result: Result<T, E>) -> Result<T, E>
where
    E: From<sqlx::Error>,
{
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

/// Rolls back now, releasing the locks (see [`finish`]).
pub(crate) async fn rollback(tx: Tx) {
    if let Err(e) = tx.rollback().await {
        tracing::debug!(error = %e, "rollback failed");
    }
}

async fn connect_sqlite(url: &str, rest: &str) -> Result<AnyPool, ConnectError> {
    let rest = rest.trim_start_matches("//");
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() && !params.contains("mode=memory") {
        return Err(ConnectError::BadUrl("sqlite url names no file"));
    }
    if path == ":memory:" || params.contains("mode=memory") {
        // Every connection to `:memory:` is a database of its own, and it
        // vanishes when its connection closes: keep exactly one, forever.
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect(url)
            .await?;
        return Ok(pool);
    }
    // Create the file if missing unless the url says otherwise.
    let url = if params.contains("mode=") {
        url.to_owned()
    } else if params.is_empty() {
        format!("{url}?mode=rwc")
    } else {
        format!("{url}&mode=rwc")
    };
    // WAL is a property of the file; switching needs the only connection, so
    // do it once before the pool opens several. sqlx's default busy timeout
    // is 5 s.
    let mut conn = AnyConnection::connect(&url).await?;
    conn.execute("PRAGMA journal_mode = WAL").await?;
    conn.close().await?;
    Ok(AnyPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?)
}

async fn connect_mysql(url: &str) -> Result<AnyPool, ConnectError> {
    let pool = AnyPoolOptions::new()
        .max_connections(10)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // Reject over-long values as SQLite's CHECKs do, whatever the
                // server's default sql_mode.
                conn.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES')")
                    .await?;
                // Every transaction at READ COMMITTED (see the module
                // documentation of `db`), set once per connection rather
                // than before each transaction.
                conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    Ok(pool)
}
