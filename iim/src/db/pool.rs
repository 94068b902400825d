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
    #[error("cannot create the database file")]
    File(#[source] std::io::Error),
}

impl Db {
    /// Connects and runs the dialect's migrations.
    ///
    /// `sqlite://path/to/file.db` (created if missing, WAL, 5 s busy
    /// timeout), `sqlite::memory:` (one connection kept for the life of the
    /// pool, so every user sees the same database) or
    /// `mysql://user:pass@host:port/db` (a host other than loopback needs
    /// `ssl-mode`, see [`mysql_transport`]; `ssl-mode=verify_identity&ssl-ca=FILE`
    /// checks the server's certificate against a CA and its name).
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
    let creates = !params.contains("mode=") || params.contains("mode=rwc");
    let url = if params.contains("mode=") {
        url.to_owned()
    } else if params.is_empty() {
        format!("{url}?mode=rwc")
    } else {
        format!("{url}&mode=rwc")
    };
    // The database holds every message: only its owner may read it. SQLite
    // would create it with 0644 less the umask, so create it first, 0600,
    // whatever the umask; its -wal and -shm files take the same mode.
    let path = std::path::Path::new(path);
    let created = creates && create_private(path).map_err(ConnectError::File)?;
    if !created {
        warn_if_shared(path);
    }
    // WAL is a property of the file; switching needs the only connection, so
    // do it once before the pool opens several. sqlx's default busy timeout
    // is 5 s.
    let mut conn = AnyConnection::connect(&url).await?;
    conn.execute("PRAGMA journal_mode = WAL").await?;
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    if created {
        // SQLite gives them the database's mode; make sure of it while
        // nothing has been written yet.
        for suffix in ["-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            restrict(std::path::Path::new(&name)).map_err(ConnectError::File)?;
        }
    }
    conn.close().await?;
    Ok(pool)
}

/// Creates `path` empty with mode 0600 if it does not exist; true if it
/// was created here.
fn create_private(path: &std::path::Path) -> std::io::Result<bool> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets mode 0600 on `path` if it exists.
fn restrict(path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// A database that existed already is left as it is, but one that others
/// may read is worth a warning.
fn warn_if_shared(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the SQLite database can be read by users other than its owner; chmod 600 it (and its -wal and -shm files)"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// How a `mysql://` url protects its connection, as far as iim is
/// concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    /// A unix socket or a loopback address: nothing crosses a network.
    Local,
    /// TLS with the server's certificate checked (`ssl-mode=verify_ca` or
    /// `verify_identity`).
    Verified,
    /// The url says `ssl-mode` to something that does not check the
    /// server (`disabled`, `preferred`, `required`): the operator's
    /// choice, warned about.
    Unverified,
}

/// Decides whether a `mysql://` url may be used: one that reaches another
/// host must say `ssl-mode` (sqlx's default, `preferred`, falls back to
/// plaintext and trusts any certificate, so the password and every message
/// could be read or changed on the way).
pub(crate) fn mysql_transport(url: &str) -> Result<Transport, &'static str> {
    let rest = url
        .strip_prefix("mysql://")
        .ok_or("expected a mysql:// url")?;
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, q),
        None => (rest, ""),
    };
    let mut ssl_mode = None;
    let mut socket = false;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "ssl-mode" | "sslmode" => ssl_mode = Some(value.to_ascii_lowercase()),
            "socket" => socket = true,
            _ => {}
        }
    }
    match ssl_mode.as_deref() {
        Some("verify_ca" | "verify-ca" | "verify_identity" | "verify-identity") => {
            return Ok(Transport::Verified);
        }
        Some(_) => return Ok(Transport::Unverified),
        None => {}
    }
    // host[:port] after any user:pass@, before any /db.
    let host_port = authority.split('/').next().unwrap_or_default();
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    let loopback = host.is_empty()
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if socket || loopback {
        Ok(Transport::Local)
    } else {
        Err(
            "a mysql:// url naming another host must say how to protect the connection: \
             add ssl-mode=verify_identity&ssl-ca=<CA file> (or ssl-mode=disabled to \
             send the password and messages in the clear)",
        )
    }
}

async fn connect_mysql(url: &str) -> Result<AnyPool, ConnectError> {
    if mysql_transport(url).map_err(ConnectError::BadUrl)? == Transport::Unverified {
        tracing::warn!(
            "the database connection does not verify the server's certificate \
             (ssl-mode is not verify_ca or verify_identity): anyone on the path \
             can read or change what iim stores"
        );
    }
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

#[cfg(test)]
mod tests {
    use super::{Transport, mysql_transport};

    #[test]
    fn mysql_urls_to_other_hosts_must_choose_tls() {
        for local in [
            "mysql://iim:pw@127.0.0.1:3306/iim",
            "mysql://iim:pw@localhost/iim",
            "mysql://iim:pw@[::1]:3306/iim",
            "mysql://iim:p%40ss@127.0.0.2/iim",
            "mysql://iim:pw@db.example/iim?socket=/run/mysqld/mysqld.sock",
        ] {
            assert_eq!(mysql_transport(local), Ok(Transport::Local), "{local}");
        }
        for verified in [
            "mysql://iim:pw@db.example/iim?ssl-mode=verify_identity&ssl-ca=/etc/iim/ca.pem",
            "mysql://iim:pw@10.0.0.5/iim?sslmode=VERIFY_CA",
            "mysql://iim:pw@127.0.0.1/iim?ssl-mode=verify_identity",
        ] {
            assert_eq!(
                mysql_transport(verified),
                Ok(Transport::Verified),
                "{verified}"
            );
        }
        for unverified in [
            "mysql://iim:pw@db.example/iim?ssl-mode=disabled",
            "mysql://iim:pw@db.example/iim?charset=utf8mb4&ssl-mode=required",
        ] {
            assert_eq!(
                mysql_transport(unverified),
                Ok(Transport::Unverified),
                "{unverified}"
            );
        }
        for refused in [
            "mysql://iim:pw@db.example/iim",
            "mysql://iim:pw@10.0.0.5:3306/iim?charset=utf8mb4",
            "mysql://iim:pw@[2001:db8::1]:3306/iim",
            // A password holding '@' does not make the host look local.
            "mysql://iim:a@127.0.0.1@db.example/iim",
        ] {
            assert!(mysql_transport(refused).is_err(), "{refused}");
        }
    }
}
