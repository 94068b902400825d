//! The shared registry database: which servers exist, their epochs and
//! liveness, and which client sessions live on which app server.
//!
//! Owns the `servers` and `sessions` tables, their migrations (`sql/mysql`,
//! `sql/sqlite`) and every SQL statement that touches them, for SQLite and
//! MySQL/MariaDB through sqlx's `Any` driver with identical semantics. It does
//! not decide policy: leases, timeouts and who may call what belong to the
//! exchange and app server; time is passed in as `now_ms`.
//!
//! Column mapping: ids, epochs and times are `BIGINT`. User and channel ids
//! are `u64` stored bit for bit as `i64` (channel ids carry the epoch in their
//! high bits), so ordering by them is done here in Rust, never in SQL.

use crate::db::is_retryable;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Connection, Executor, Row};

use crate::presence;
use crate::types::{ChannelId, ServerId, Session, UserId};

static MYSQL_MIGRATIONS: Migrator = sqlx::migrate!("../sql/mysql");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../sql/sqlite");

/// Values bound per statement stay well under SQLite's and MySQL's
/// placeholder limits.
const CHUNK: usize = 1000;
/// Attempts of `begin_epoch` when the database reports a conflict.
const EPOCH_ATTEMPTS: u32 = 8;

const SERVER_COLUMNS: &str =
    "id, role, address, epoch, state, exchange_id, registered_at, last_seen";

/// Which SQL dialect a [`Registry`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    MySql,
}

/// A string that names no [`Role`] or [`ServerState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct ParseNameError {
    pub kind: &'static str,
    pub value: String,
}

/// A fieldless enum stored as a short lowercase name: `as_str`, `Display`
/// and `FromStr` from one table.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseNameError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ParseNameError { kind: $kind, value: s.to_owned() }),
                }
            }
        }
    };
}

named_enum!(
    /// What kind of server a `servers` row describes.
    Role, "role", { App => "app", Exchange => "exchange" }
);

named_enum!(
    /// Lifecycle state of a server incarnation.
    ServerState, "server state", { Up => "up", Draining => "draining", Down => "down" }
);

/// One row of `servers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerRecord {
    pub id: ServerId,
    pub role: Role,
    pub address: String,
    pub epoch: u64,
    pub state: ServerState,
    /// For an app server: the exchange it is attached to.
    pub exchange: Option<ServerId>,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
}

/// Outcome of [`Registry::record_registration`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    Accepted,
    /// The claimed epoch is not the one the registry holds for this server.
    StaleEpoch {
        current: u64,
    },
    Unknown,
    WrongRole,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database error")]
    Database(#[from] sqlx::Error),
    #[error("registry migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("bad registry row: {what}")]
    BadRow { what: String },
    #[error("bad registry url: {0}")]
    BadUrl(String),
}

/// Handle on the registry database; cheap to clone (it wraps a pool).
#[derive(Clone, Debug)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
}

impl Registry {
    /// Connects and runs the dialect's migrations.
    ///
    /// `sqlite://path/to/file.db` (created if missing, WAL, 5 s busy
    /// timeout), `sqlite::memory:` (one connection kept for the life of the
    /// pool, so every user sees the same database) or
    /// `mysql://user:pass@host:port/db`.
    pub async fn connect(url: &str) -> Result<Registry, RegistryError> {
        sqlx::any::install_default_drivers();
        let (backend, pool) = if let Some(rest) = url.strip_prefix("sqlite:") {
            (Backend::Sqlite, connect_sqlite(url, rest).await?)
        } else if url.starts_with("mysql://") {
            (Backend::MySql, connect_mysql(url).await?)
        } else {
            return Err(RegistryError::BadUrl(
                "expected a sqlite: or mysql:// url".to_owned(),
            ));
        };
        let migrations = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::MySql => &MYSQL_MIGRATIONS,
        };
        // Several processes may start on a fresh database at once (the demo
        // starts four). MySQL migrations take a lock; SQLite's do not, so a
        // loser of that race sees "table already exists" — and on a second
        // run finds the migration applied.
        let mut attempt = 0;
        loop {
            match migrations.run(&pool).await {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "migration raced; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Registry { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for the other stores on this database (`store.rs`).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A server process starting: inserts its row with epoch 1 or bumps the
    /// epoch by one, sets role, address, `state`, registered_at and last_seen,
    /// and deletes the sessions earlier incarnations left behind, recomputing
    /// the presence of their users (see [`Registry::mark_down`]), all in one
    /// transaction. Returns the new epoch.
    pub async fn begin_epoch(
        &self,
        id: ServerId,
        role: Role,
        address: &str,
        state: ServerState,
        now_ms: i64,
    ) -> Result<u64, RegistryError> {
        let mut attempt = 1;
        loop {
            match self.try_begin_epoch(id, role, address, state, now_ms).await {
                Err(RegistryError::Database(e)) if attempt < EPOCH_ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(server = id.0, attempt, error = %e, "begin_epoch conflict, retrying");
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn try_begin_epoch(
        &self,
        id: ServerId,
        role: Role,
        address: &str,
        state: ServerState,
        now_ms: i64,
    ) -> Result<u64, RegistryError> {
        // The upsert is the transaction's first statement, so it takes the
        // write lock (SQLite) or the row lock (InnoDB) before anything is read
        // and concurrent callers serialise on it: no increment is lost.
        let sql = format!(
            "INSERT INTO servers (id, role, address, epoch, state, exchange_id, registered_at, \
             last_seen) VALUES (?, ?, ?, 1, ?, NULL, ?, ?) {} epoch = epoch + 1, role = ?, \
             address = ?, state = ?, registered_at = ?, last_seen = ?",
            self.upsert("id")
        );
        let mut tx = self.begin().await?;
        sqlx::query(AssertSqlSafe(sql))
            .bind(server_param(id))
            .bind(role.as_str())
            .bind(address)
            .bind(state.as_str())
            .bind(now_ms)
            .bind(now_ms)
            .bind(role.as_str())
            .bind(address)
            .bind(state.as_str())
            .bind(now_ms)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT epoch FROM servers WHERE id = ?")
            .bind(server_param(id))
            .fetch_one(&mut *tx)
            .await?;
        let epoch = epoch_col(&row, "epoch")?;
        self.delete_sessions_in(&mut tx, id, now_ms).await?;
        tx.commit().await?;
        Ok(epoch)
    }

    /// The exchange accepting an app server's registration. Only the epoch
    /// the registry issued last is accepted; any other claim is stale.
    pub async fn record_registration(
        &self,
        id: ServerId,
        epoch: u64,
        exchange: ServerId,
        now_ms: i64,
    ) -> Result<Registration, RegistryError> {
        let mut current = epoch;
        // A second pass only happens when the row appeared or changed between
        // the guarded update and the read that classifies its failure.
        for _ in 0..3 {
            let done = sqlx::query(
                "UPDATE servers SET state = 'up', exchange_id = ?, registered_at = ?, last_seen = ? \
                 WHERE id = ? AND epoch = ? AND role = 'app'",
            )
            .bind(server_param(exchange))
            .bind(now_ms)
            .bind(now_ms)
            .bind(server_param(id))
            .bind(epoch_param(epoch))
            .execute(&self.pool)
            .await?;
            if done.rows_affected() > 0 {
                return Ok(Registration::Accepted);
            }
            let Some(row) = sqlx::query("SELECT role, epoch FROM servers WHERE id = ?")
                .bind(server_param(id))
                .fetch_optional(&self.pool)
                .await?
            else {
                return Ok(Registration::Unknown);
            };
            if parse_col::<Role>(&row, "role")? != Role::App {
                return Ok(Registration::WrongRole);
            }
            current = epoch_col(&row, "epoch")?;
            if current != epoch {
                return Ok(Registration::StaleEpoch { current });
            }
        }
        Ok(Registration::StaleEpoch { current })
    }

    /// Sets the state (and last_seen) only if the row's epoch is still
    /// `epoch`. Returns whether a row matched.
    pub async fn set_state(
        &self,
        id: ServerId,
        epoch: u64,
        state: ServerState,
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        let done =
            sqlx::query("UPDATE servers SET state = ?, last_seen = ? WHERE id = ? AND epoch = ?")
                .bind(state.as_str())
                .bind(now_ms)
                .bind(server_param(id))
                .bind(epoch_param(epoch))
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Lease expired or clean shutdown: if the epoch matches, state = down and
    /// the server's sessions are deleted, in one transaction. Returns whether
    /// the row matched.
    ///
    /// In the same transaction every user who had a session there gets its
    /// presence recomputed with server 0 as the changer: offline (empty text,
    /// version + 1) when it has no session left anywhere and was not offline
    /// already, else the aggregate of its remaining sessions.
    pub async fn mark_down(
        &self,
        id: ServerId,
        epoch: u64,
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        let mut attempt = 1;
        loop {
            match self.try_mark_down(id, epoch, now_ms).await {
                Err(RegistryError::Database(e)) if attempt < EPOCH_ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(server = id.0, attempt, error = %e, "mark_down conflict, retrying");
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn try_mark_down(
        &self,
        id: ServerId,
        epoch: u64,
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE servers SET state = 'down', last_seen = ? WHERE id = ? AND epoch = ?",
        )
        .bind(now_ms)
        .bind(server_param(id))
        .bind(epoch_param(epoch))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        self.delete_sessions_in(&mut tx, id, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes every session of `server` inside `conn`'s transaction (begun
    /// with [`Registry::begin`]) and recomputes the presence of their users
    /// there, with server 0 as the changer.
    ///
    /// Rows are locked (MySQL), then deleted by key, until none is left: at
    /// `READ COMMITTED` a session inserted between the read and a blanket
    /// `DELETE` would go without its user being recomputed.
    async fn delete_sessions_in(
        &self,
        conn: &mut AnyConnection,
        server: ServerId,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        let sql = format!(
            "SELECT channel, user_id FROM sessions WHERE server_id = ?{}",
            match self.backend {
                Backend::Sqlite => "",
                Backend::MySql => " FOR UPDATE",
            }
        );
        let mut users = Vec::new();
        loop {
            let rows = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(server_param(server))
                .fetch_all(&mut *conn)
                .await?;
            if rows.is_empty() {
                break;
            }
            let mut channels = Vec::with_capacity(rows.len());
            for row in &rows {
                channels.push(col::<i64>(row, "channel")?);
                users.push(UserId(col::<i64>(row, "user_id")? as u64));
            }
            for chunk in channels.chunks(CHUNK / 2) {
                let sql = format!(
                    "DELETE FROM sessions WHERE server_id = ? AND channel IN ({})",
                    vec!["?"; chunk.len()].join(", ")
                );
                let mut query = sqlx::query(AssertSqlSafe(sql)).bind(server_param(server));
                for &channel in chunk {
                    query = query.bind(channel);
                }
                query.execute(&mut *conn).await?;
            }
        }
        presence::recompute_in(conn, self.backend, &users, ServerId::NONE, now_ms).await?;
        Ok(())
    }

    /// Refreshes last_seen of every listed server whose epoch still matches,
    /// in one statement per [`CHUNK`] placeholders.
    pub async fn touch(
        &self,
        servers: &[(ServerId, u64)],
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        for chunk in servers.chunks(CHUNK / 2) {
            let sql = format!(
                "UPDATE servers SET last_seen = ? WHERE {}",
                vec!["(id = ? AND epoch = ?)"; chunk.len()].join(" OR ")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now_ms);
            for &(id, epoch) in chunk {
                query = query.bind(server_param(id)).bind(epoch_param(epoch));
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    pub async fn server(&self, id: ServerId) -> Result<Option<ServerRecord>, RegistryError> {
        let sql = format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(server_param(id))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(server_from_row).transpose()
    }

    /// Every server, ordered by id.
    pub async fn servers(&self) -> Result<Vec<ServerRecord>, RegistryError> {
        let sql = format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY id");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(server_from_row).collect()
    }

    /// Records a live client connection, replacing any row with the same
    /// `(server, channel)`.
    pub async fn add_session(
        &self,
        session: &Session,
        epoch: u64,
        now_ms: i64,
    ) -> Result<(), RegistryError> {
        let sql = format!(
            "INSERT INTO sessions (server_id, channel, user_id, device, epoch, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) {} user_id = ?, device = ?, epoch = ?, created_at = ?",
            self.upsert("server_id, channel")
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(server_param(session.server))
            .bind(u64_param(session.channel.0))
            .bind(u64_param(session.user.0))
            .bind(session.device.as_str())
            .bind(epoch_param(epoch))
            .bind(now_ms)
            .bind(u64_param(session.user.0))
            .bind(session.device.as_str())
            .bind(epoch_param(epoch))
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Returns whether a session was removed.
    pub async fn remove_session(
        &self,
        server: ServerId,
        channel: ChannelId,
    ) -> Result<bool, RegistryError> {
        let done = sqlx::query("DELETE FROM sessions WHERE server_id = ? AND channel = ?")
            .bind(server_param(server))
            .bind(u64_param(channel.0))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes every session of `server`; returns how many there were.
    pub async fn clear_sessions(&self, server: ServerId) -> Result<u64, RegistryError> {
        let done = sqlx::query("DELETE FROM sessions WHERE server_id = ?")
            .bind(server_param(server))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// All sessions of these users, ordered by (server, user, channel). One
    /// query per [`CHUNK`] distinct users; none for an empty list.
    pub async fn sessions_of(&self, users: &[UserId]) -> Result<Vec<Session>, RegistryError> {
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        let mut out = Vec::new();
        for chunk in users.chunks(CHUNK) {
            let sql = format!(
                "SELECT server_id, channel, user_id, device FROM sessions WHERE user_id IN ({})",
                vec!["?"; chunk.len()].join(", ")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for user in chunk {
                query = query.bind(u64_param(user.0));
            }
            for row in query.fetch_all(&self.pool).await? {
                out.push(session_from_row(&row)?);
            }
        }
        sort_sessions(&mut out);
        Ok(out)
    }

    /// Every session (admin listing), ordered by (server, user, channel).
    pub async fn sessions(&self) -> Result<Vec<Session>, RegistryError> {
        let rows = sqlx::query("SELECT server_id, channel, user_id, device FROM sessions")
            .fetch_all(&self.pool)
            .await?;
        let mut out = rows
            .iter()
            .map(session_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        sort_sessions(&mut out);
        Ok(out)
    }

    /// The dialect's "insert, or on this key update" clause, up to the
    /// assignments. Values are bound again rather than read back with
    /// `excluded.x` / `VALUES(x)`, which only one dialect each understands.
    fn upsert(&self, key: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("ON CONFLICT ({key}) DO UPDATE SET"),
            Backend::MySql => "ON DUPLICATE KEY UPDATE".to_owned(),
        }
    }

    /// A transaction that holds the write lock from its start on SQLite, so
    /// the busy timeout applies instead of a failed lock upgrade later, and
    /// runs at `READ COMMITTED` on MySQL, as presence recomputation needs
    /// ([`presence::begin_write`]).
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        presence::begin_write(&self.pool, self.backend).await
    }
}

async fn connect_sqlite(url: &str, rest: &str) -> Result<AnyPool, RegistryError> {
    let rest = rest.trim_start_matches("//");
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() && !params.contains("mode=memory") {
        return Err(RegistryError::BadUrl("sqlite url names no file".to_owned()));
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

async fn connect_mysql(url: &str) -> Result<AnyPool, RegistryError> {
    let pool = AnyPoolOptions::new()
        .max_connections(10)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // Reject over-long values as SQLite's CHECKs do, whatever the
                // server's default sql_mode.
                conn.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES')")
                    .await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    Ok(pool)
}

fn sort_sessions(sessions: &mut [Session]) {
    sessions.sort_unstable_by_key(|s| (s.server, s.user, s.channel));
}

fn server_param(id: ServerId) -> i64 {
    i64::from(id.0)
}

/// Epochs issued here are small and positive; a claim beyond `i64::MAX` maps
/// to a negative value that matches no row.
fn epoch_param(epoch: u64) -> i64 {
    epoch as i64
}

/// User and channel ids use the full `u64` range: stored bit for bit.
fn u64_param(v: u64) -> i64 {
    v as i64
}

fn bad_row(what: impl Into<String>) -> RegistryError {
    RegistryError::BadRow { what: what.into() }
}

/// A column decoded as `T`; a type mismatch is a bad row, not a panic.
fn col<T>(row: &AnyRow, col: &str) -> Result<T, RegistryError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get::<T, _>(col)
        .map_err(|e| bad_row(format!("column {col}: {e}")))
}

fn epoch_col(row: &AnyRow, name: &str) -> Result<u64, RegistryError> {
    let v: i64 = col(row, name)?;
    u64::try_from(v).map_err(|_| bad_row(format!("column {name}: negative epoch {v}")))
}

fn server_col(row: &AnyRow, name: &str) -> Result<Option<ServerId>, RegistryError> {
    col::<Option<i64>>(row, name)?
        .map(|v| {
            u32::try_from(v)
                .map(ServerId)
                .map_err(|_| bad_row(format!("column {name}: server id {v} out of range")))
        })
        .transpose()
}

fn required_server_col(row: &AnyRow, name: &str) -> Result<ServerId, RegistryError> {
    server_col(row, name)?.ok_or_else(|| bad_row(format!("column {name}: null")))
}

fn parse_col<T>(row: &AnyRow, name: &str) -> Result<T, RegistryError>
where
    T: FromStr<Err = ParseNameError>,
{
    col::<String>(row, name)?
        .parse()
        .map_err(|e: ParseNameError| bad_row(e.to_string()))
}

fn server_from_row(row: &AnyRow) -> Result<ServerRecord, RegistryError> {
    Ok(ServerRecord {
        id: required_server_col(row, "id")?,
        role: parse_col(row, "role")?,
        address: col(row, "address")?,
        epoch: epoch_col(row, "epoch")?,
        state: parse_col(row, "state")?,
        exchange: server_col(row, "exchange_id")?,
        registered_at_ms: col(row, "registered_at")?,
        last_seen_ms: col(row, "last_seen")?,
    })
}

fn session_from_row(row: &AnyRow) -> Result<Session, RegistryError> {
    Ok(Session {
        user: UserId(col::<i64>(row, "user_id")? as u64),
        device: col(row, "device")?,
        server: required_server_col(row, "server_id")?,
        channel: ChannelId(col::<i64>(row, "channel")? as u64),
    })
}
