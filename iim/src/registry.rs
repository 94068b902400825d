//! The shared registry database: which servers exist, their epochs and
//! liveness, and which client sessions live on which app server.
//!
//! Owns the `servers` and `sessions` tables and every SQL statement that
//! touches them, for SQLite and MySQL/MariaDB with identical semantics, on
//! the shared [`Db`] it connects (which runs the migrations of `sql/`). It
//! does not decide policy: leases, timeouts and who may call what belong to
//! the exchange and app server; time is passed in as `now_ms`. Deleting
//! sessions recomputes their users' presence rows in the same transaction
//! through `aggregate`; everything else about presence belongs to
//! `presence`.
//!
//! Column mapping: ids, epochs and times are `BIGINT`. User and channel ids
//! are `u64` stored bit for bit as `i64` (channel ids carry the epoch in their
//! high bits), so ordering by them is done here in Rust, never in SQL.

use std::fmt;
use std::str::FromStr;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe};

use crate::aggregate::{PresenceRow, Status, recompute_in};
pub use crate::db::{Backend, Db, ParseNameError, node_urls};
use crate::db::{
    ConnectError, DbError, TRANSACTION, bad_row, bind_all, col, database_error, finish,
    nonnegative_col, parse_col, placeholders, required_server_col, retry, server_col, server_param,
    u64_param, user_col, user_param,
};
use crate::types::{ChannelId, ServerId, Session, UserId};

/// Values bound per statement stay well under SQLite's and MySQL's
/// placeholder limits.
const CHUNK: usize = 1000;
/// Sessions written back per transaction (9 values each).
const RESTORE_CHUNK: usize = 100;

const SERVER_COLUMNS: &str =
    "id, role, address, epoch, state, exchange_id, attach_epoch, registered_at, last_seen";

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

/// A live exchange and the number of app servers attached to it that are
/// `up` ([`Registry::exchange_loads`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeLoad {
    pub id: ServerId,
    pub address: String,
    pub epoch: u64,
    pub attached: u64,
}

/// The exchange an app server attaches to: `preferred` if it is among the
/// live ones, else the one with the fewest attached servers (ties: the
/// lowest id). `None` when no exchange is live.
pub fn choose_exchange(
    live: &[ExchangeLoad],
    preferred: Option<ServerId>,
) -> Option<&ExchangeLoad> {
    preferred
        .and_then(|p| live.iter().find(|e| e.id == p))
        .or_else(|| live.iter().min_by_key(|e| (e.attached, e.id)))
}

/// What else a mark-down requires of the row besides its epoch.
#[derive(Clone, Copy, Debug)]
enum Guard {
    None,
    Attach(u64),
    Exchange(ServerId),
}

/// One row of `exchange_links`: `exchange` has a live link to `peer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeLink {
    pub exchange: ServerId,
    pub peer: ServerId,
    /// When `exchange` first recorded the link up (ms since the epoch).
    pub since_ms: i64,
}

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
    /// For an app server: how many registrations exchanges have recorded
    /// for it; the fence of the attachment (see [`Registration::Accepted`]).
    pub attach_epoch: u64,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
}

/// Outcome of [`Registry::record_registration`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// Recorded: the server is `up` and attached to the recording exchange,
    /// under a new `attach_epoch` (the old one plus one). `previous` is the
    /// exchange it was attached to before (the same one after a reconnect;
    /// none for a server never attached). Writes about the server that name
    /// an older attach epoch ([`Registry::mark_down_attached`]) now change
    /// nothing.
    Accepted {
        attach_epoch: u64,
        previous: Option<ServerId>,
    },
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
    /// The database dropped the transaction under it: on a Galera node, a
    /// local transaction aborted for a conflicting replicated one can see
    /// a statement answer as if its own earlier writes were gone. Run
    /// again like a conflict.
    #[error("registry transaction aborted by the database")]
    Aborted,
    #[error("bad registry url: {0}")]
    BadUrl(String),
    #[error("cannot create the registry database file")]
    File(#[source] std::io::Error),
    #[error("cannot read the database url from {path}: {reason}")]
    UrlFile {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Reads a database url (`mysql://user:password@…`, `sqlite://…`) from a
/// file, so the password need not appear on a command line, in the
/// environment or in a config file others can read. Surrounding whitespace
/// (a trailing newline) is ignored; an empty file is an error. A file that
/// users other than its owner can read is warned about.
pub fn read_url_file(path: &std::path::Path) -> Result<String, RegistryError> {
    let fail = |reason: String| RegistryError::UrlFile {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let url = text.trim();
    if url.is_empty() {
        return Err(fail("the file is empty".to_owned()));
    }
    if url.lines().count() > 1 {
        return Err(fail("expected one line, the url".to_owned()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "the database url file can be read by users other than its owner; chmod 600 it"
            );
        }
    }
    Ok(url.to_owned())
}

impl From<ConnectError> for RegistryError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::BadUrl(why) => RegistryError::BadUrl(why.to_owned()),
            ConnectError::Database(e) => RegistryError::Database(e),
            ConnectError::Migrate(e) => RegistryError::Migrate(e),
            ConnectError::File(e) => RegistryError::File(e),
        }
    }
}

database_error!(RegistryError, Aborted);

/// Handle on the registry database; cheap to clone (it wraps the pool).
/// The chat store and presence open on the same database through it
/// (`AsRef<Db>`).
#[derive(Clone, Debug)]
pub struct Registry {
    db: Db,
}

impl AsRef<Db> for Registry {
    fn as_ref(&self) -> &Db {
        &self.db
    }
}

impl Registry {
    /// Connects and runs the dialect's migrations.
    ///
    /// `sqlite://path/to/file.db` (created if missing, WAL, 5 s busy
    /// timeout), `sqlite::memory:` (one connection kept for the life of the
    /// pool, so every user sees the same database) or
    /// `mysql://user:pass@host:port/db`.
    pub async fn connect(url: &str) -> Result<Registry, RegistryError> {
        Ok(Registry {
            db: Db::connect(url).await?,
        })
    }

    pub fn backend(&self) -> Backend {
        self.db.backend()
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
        retry("begin_epoch", TRANSACTION, || {
            self.try_begin_epoch(id, role, address, state, now_ms)
        })
        .await
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
            self.db.backend().upsert("id")
        );
        let mut tx = self.db.begin_write().await?;
        let result = async {
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
            // The row was just written by this transaction; not finding it
            // means the database aborted the transaction (a Galera node
            // does when a replicated write to the same row wins).
            let row = sqlx::query("SELECT epoch FROM servers WHERE id = ?")
                .bind(server_param(id))
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(RegistryError::Aborted)?;
            let epoch = nonnegative_col(&row, "epoch")?;
            self.delete_sessions_in(&mut tx, id, now_ms).await?;
            Ok(epoch)
        }
        .await;
        finish(tx, result).await
    }

    /// The exchange accepting an app server's registration. Only the epoch
    /// the registry issued last is accepted; any other claim is stale. An
    /// accepted one sets `state = up`, `exchange_id`, `registered_at`,
    /// `last_seen` and bumps `attach_epoch`, in one transaction with the
    /// row locked, so two exchanges recording the same server at once get
    /// distinct attach epochs and the later one wins.
    pub async fn record_registration(
        &self,
        id: ServerId,
        epoch: u64,
        exchange: ServerId,
        now_ms: i64,
    ) -> Result<Registration, RegistryError> {
        retry("record_registration", TRANSACTION, || {
            self.try_record_registration(id, epoch, exchange, now_ms)
        })
        .await
    }

    async fn try_record_registration(
        &self,
        id: ServerId,
        epoch: u64,
        exchange: ServerId,
        now_ms: i64,
    ) -> Result<Registration, RegistryError> {
        let sql = format!(
            "SELECT role, epoch, exchange_id, attach_epoch FROM servers WHERE id = ?{}",
            self.db.backend().for_update()
        );
        let mut tx = self.db.begin_write().await?;
        let result = async {
            let Some(row) = sqlx::query(AssertSqlSafe(sql))
                .bind(server_param(id))
                .fetch_optional(&mut *tx)
                .await?
            else {
                return Ok(Registration::Unknown);
            };
            if parse_col::<Role>(&row, "role")? != Role::App {
                return Ok(Registration::WrongRole);
            }
            let current = nonnegative_col(&row, "epoch")?;
            if current != epoch {
                return Ok(Registration::StaleEpoch { current });
            }
            let previous = server_col(&row, "exchange_id")?;
            let attach_epoch = nonnegative_col(&row, "attach_epoch")?
                .checked_add(1)
                .ok_or_else(|| bad_row("attach_epoch at its maximum"))?;
            sqlx::query(
                "UPDATE servers SET state = 'up', exchange_id = ?, attach_epoch = ?, \
                 registered_at = ?, last_seen = ? WHERE id = ? AND epoch = ?",
            )
            .bind(server_param(exchange))
            .bind(u64_param(attach_epoch))
            .bind(now_ms)
            .bind(now_ms)
            .bind(server_param(id))
            .bind(u64_param(epoch))
            .execute(&mut *tx)
            .await?;
            Ok(Registration::Accepted {
                attach_epoch,
                previous,
            })
        }
        .await;
        finish(tx, result).await
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
                .bind(u64_param(epoch))
                .execute(self.db.pool())
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
        retry("mark_down", TRANSACTION, || {
            self.try_mark_down(id, epoch, Guard::None, now_ms)
        })
        .await
    }

    /// [`Registry::mark_down`] by the exchange the server is attached to:
    /// only if the row still holds `attach_epoch` as well, so an exchange
    /// the server has since registered with elsewhere (a newer attach
    /// epoch) cannot mark it down or delete its sessions. Returns whether
    /// the row matched.
    pub async fn mark_down_attached(
        &self,
        id: ServerId,
        epoch: u64,
        attach_epoch: u64,
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        retry("mark_down", TRANSACTION, || {
            self.try_mark_down(id, epoch, Guard::Attach(attach_epoch), now_ms)
        })
        .await
    }

    /// [`Registry::mark_down`] by an exchange that knows the server is
    /// attached to it but not under which attach epoch (it read the row at
    /// start, and that read may be behind): only while the row names
    /// `exchange` as the server's exchange. Returns whether the row matched.
    pub async fn mark_down_from(
        &self,
        id: ServerId,
        epoch: u64,
        exchange: ServerId,
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        retry("mark_down", TRANSACTION, || {
            self.try_mark_down(id, epoch, Guard::Exchange(exchange), now_ms)
        })
        .await
    }

    async fn try_mark_down(
        &self,
        id: ServerId,
        epoch: u64,
        guard: Guard,
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        const SET: &str =
            "UPDATE servers SET state = 'down', last_seen = ? WHERE id = ? AND epoch = ?";
        let sql = match guard {
            Guard::None => SET.to_owned(),
            Guard::Attach(_) => format!("{SET} AND attach_epoch = ?"),
            Guard::Exchange(_) => format!("{SET} AND exchange_id = ?"),
        };
        let mut tx = self.db.begin_write().await?;
        let result = async {
            let mut query = sqlx::query(AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(server_param(id))
                .bind(u64_param(epoch));
            match guard {
                Guard::None => {}
                Guard::Attach(a) => query = query.bind(u64_param(a)),
                Guard::Exchange(x) => query = query.bind(server_param(x)),
            }
            let done = query.execute(&mut *tx).await?;
            if done.rows_affected() == 0 {
                return Ok(false);
            }
            self.delete_sessions_in(&mut tx, id, now_ms).await?;
            Ok(true)
        }
        .await;
        finish(tx, result).await
    }

    /// Deletes every session of `server` inside `conn`'s transaction (begun
    /// with `Db::begin_write`) and recomputes the presence of their users
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
            self.db.backend().for_update()
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
                users.push(user_col(row, "user_id")?);
            }
            for chunk in channels.chunks(CHUNK / 2) {
                let sql = format!(
                    "DELETE FROM sessions WHERE server_id = ? AND channel IN ({})",
                    placeholders(chunk.len())
                );
                let query = bind_all(
                    sqlx::query(AssertSqlSafe(sql)).bind(server_param(server)),
                    chunk,
                );
                query.execute(&mut *conn).await?;
            }
        }
        recompute_in(conn, self.db.backend(), &users, ServerId::NONE, now_ms).await?;
        Ok(())
    }

    /// Refreshes last_seen of every listed server whose epoch still matches,
    /// in one statement per 1,000 placeholders.
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
                query = query.bind(server_param(id)).bind(u64_param(epoch));
            }
            query.execute(self.db.pool()).await?;
        }
        Ok(())
    }

    pub async fn server(&self, id: ServerId) -> Result<Option<ServerRecord>, RegistryError> {
        let sql = format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(server_param(id))
            .fetch_optional(self.db.pool())
            .await?;
        Ok(row.as_ref().map(server_from_row).transpose()?)
    }

    /// Every exchange in state `up`, with how many app servers in state
    /// `up` are attached to it, ordered by id: what an app server chooses
    /// its exchange from ([`choose_exchange`]).
    pub async fn exchange_loads(&self) -> Result<Vec<ExchangeLoad>, RegistryError> {
        let rows = sqlx::query(
            "SELECT e.id, e.address, e.epoch, \
             (SELECT COUNT(*) FROM servers a WHERE a.role = 'app' AND a.state = 'up' \
              AND a.exchange_id = e.id) AS attached \
             FROM servers e WHERE e.role = 'exchange' AND e.state = 'up' ORDER BY e.id",
        )
        .fetch_all(self.db.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(ExchangeLoad {
                id: required_server_col(row, "id")?,
                address: col(row, "address")?,
                epoch: nonnegative_col(row, "epoch")?,
                attached: nonnegative_col(row, "attached")?,
            });
        }
        Ok(out)
    }

    /// Exchange `exchange`'s live links to other exchanges are now
    /// `peers`: rows of peers no longer linked go, new ones get `since_ms =
    /// now_ms`, standing ones keep theirs. One transaction, fenced by
    /// `version` (the exchange's epoch, a count of its recordings): it
    /// applies only above the version stored on the exchange's row, so a
    /// recording the exchange gave up on that commits late cannot undo a
    /// newer one. Returns whether it applied.
    pub async fn record_links(
        &self,
        exchange: ServerId,
        version: (u64, u64),
        peers: &[ServerId],
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        retry("record_links", TRANSACTION, || {
            self.try_record_links(exchange, version, peers, now_ms)
        })
        .await
    }

    async fn try_record_links(
        &self,
        exchange: ServerId,
        (epoch, seq): (u64, u64),
        peers: &[ServerId],
        now_ms: i64,
    ) -> Result<bool, RegistryError> {
        let mut tx = self.db.begin_write().await?;
        let result = async {
            let fenced = sqlx::query(
                "UPDATE servers SET links_epoch = ?, links_seq = ? \
                 WHERE id = ? AND role = 'exchange' \
                 AND (links_epoch < ? OR (links_epoch = ? AND links_seq < ?))",
            )
            .bind(u64_param(epoch))
            .bind(u64_param(seq))
            .bind(server_param(exchange))
            .bind(u64_param(epoch))
            .bind(u64_param(epoch))
            .bind(u64_param(seq))
            .execute(&mut *tx)
            .await?;
            if fenced.rows_affected() == 0 {
                return Ok(false);
            }
            let rows = sqlx::query("SELECT peer_id FROM exchange_links WHERE exchange_id = ?")
                .bind(server_param(exchange))
                .fetch_all(&mut *tx)
                .await?;
            let mut standing = Vec::with_capacity(rows.len());
            for row in &rows {
                standing.push(required_server_col(row, "peer_id")?);
            }
            for gone in standing.iter().filter(|p| !peers.contains(p)) {
                sqlx::query("DELETE FROM exchange_links WHERE exchange_id = ? AND peer_id = ?")
                    .bind(server_param(exchange))
                    .bind(server_param(*gone))
                    .execute(&mut *tx)
                    .await?;
            }
            for new in peers.iter().filter(|p| !standing.contains(p)) {
                sqlx::query(
                    "INSERT INTO exchange_links (exchange_id, peer_id, since_ms) VALUES (?, ?, ?)",
                )
                .bind(server_param(exchange))
                .bind(server_param(*new))
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
            Ok(true)
        }
        .await;
        finish(tx, result).await
    }

    /// Every recorded link between exchanges, ordered by (exchange, peer).
    /// A row says the exchange had a live link to the peer when it last
    /// recorded its links; read it with the exchange's own row (an exchange
    /// that died keeps its rows until it starts again).
    pub async fn exchange_links(&self) -> Result<Vec<ExchangeLink>, RegistryError> {
        let rows = sqlx::query(
            "SELECT exchange_id, peer_id, since_ms FROM exchange_links \
             ORDER BY exchange_id, peer_id",
        )
        .fetch_all(self.db.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(ExchangeLink {
                exchange: required_server_col(row, "exchange_id")?,
                peer: required_server_col(row, "peer_id")?,
                since_ms: col(row, "since_ms")?,
            });
        }
        Ok(out)
    }

    /// Every server, ordered by id.
    pub async fn servers(&self) -> Result<Vec<ServerRecord>, RegistryError> {
        let sql = format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY id");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(self.db.pool())
            .await?;
        Ok(rows.iter().map(server_from_row).collect::<Result<_, _>>()?)
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
            self.db.backend().upsert("server_id, channel")
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(server_param(session.server))
            .bind(u64_param(session.channel.0))
            .bind(user_param(session.user))
            .bind(session.device.as_str())
            .bind(u64_param(epoch))
            .bind(now_ms)
            .bind(user_param(session.user))
            .bind(session.device.as_str())
            .bind(u64_param(epoch))
            .bind(now_ms)
            .execute(self.db.pool())
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
            .execute(self.db.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The channel and user of every session row of `server` (the
    /// app server's audit of its own rows).
    pub async fn session_rows(
        &self,
        server: ServerId,
    ) -> Result<Vec<(ChannelId, UserId)>, RegistryError> {
        let rows = sqlx::query("SELECT channel, user_id FROM sessions WHERE server_id = ?")
            .bind(server_param(server))
            .fetch_all(self.db.pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push((
                ChannelId(col::<i64>(row, "channel")? as u64),
                user_col(row, "user_id")?,
            ));
        }
        Ok(out)
    }

    /// Writes back the rows of live connections that the registry lost
    /// (deleted by a `mark_down` while the server was in fact alive), each
    /// with the status its connection set, and recomputes their users'
    /// presence with `server` as the changer: one transaction per 500
    /// sessions. A row that exists already is left as it is. Returns the
    /// presence rows that changed.
    pub async fn restore_sessions(
        &self,
        sessions: &[LiveSession],
        epoch: u64,
        now_ms: i64,
    ) -> Result<Vec<PresenceRow>, RegistryError> {
        let mut changed = Vec::new();
        for chunk in sessions.chunks(RESTORE_CHUNK) {
            let rows = retry("restore_sessions", TRANSACTION, || {
                self.try_restore_sessions(chunk, epoch, now_ms)
            })
            .await?;
            changed.extend(rows);
        }
        Ok(changed)
    }

    async fn try_restore_sessions(
        &self,
        sessions: &[LiveSession],
        epoch: u64,
        now_ms: i64,
    ) -> Result<Vec<PresenceRow>, RegistryError> {
        let server = match sessions.first() {
            Some(s) => s.session.server,
            None => return Ok(Vec::new()),
        };
        let sql = format!(
            "INSERT INTO sessions (server_id, channel, user_id, device, epoch, created_at, \
             status, text, status_at) VALUES {} {} created_at = created_at",
            vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; sessions.len()].join(", "),
            self.db.backend().upsert("server_id, channel")
        );
        let mut tx = self.db.begin_write().await?;
        let result = async {
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for s in sessions {
                debug_assert_eq!(s.session.server, server);
                query = query
                    .bind(server_param(s.session.server))
                    .bind(u64_param(s.session.channel.0))
                    .bind(user_param(s.session.user))
                    .bind(s.session.device.as_str())
                    .bind(u64_param(epoch))
                    .bind(now_ms)
                    .bind(s.status.as_str())
                    .bind(s.text.as_str())
                    .bind(s.status_at_ms);
            }
            query.execute(&mut *tx).await?;
            let users: Vec<UserId> = sessions.iter().map(|s| s.session.user).collect();
            Ok(recompute_in(&mut tx, self.db.backend(), &users, server, now_ms).await?)
        }
        .await;
        finish(tx, result).await
    }

    /// Deletes every session of `server`; returns how many there were.
    pub async fn clear_sessions(&self, server: ServerId) -> Result<u64, RegistryError> {
        let done = sqlx::query("DELETE FROM sessions WHERE server_id = ?")
            .bind(server_param(server))
            .execute(self.db.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// All sessions of these users, ordered by (server, user, channel). One
    /// query per 1,000 distinct users; none for an empty list.
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
            for row in query.fetch_all(self.db.pool()).await? {
                out.push(session_from_row(&row)?);
            }
        }
        sort_sessions(&mut out);
        Ok(out)
    }

    /// Every session (admin listing), ordered by (server, user, channel).
    pub async fn sessions(&self) -> Result<Vec<Session>, RegistryError> {
        let rows = sqlx::query("SELECT server_id, channel, user_id, device FROM sessions")
            .fetch_all(self.db.pool())
            .await?;
        let mut out = rows
            .iter()
            .map(session_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        sort_sessions(&mut out);
        Ok(out)
    }
}

/// A live connection's session as its app server knows it: what
/// [`Registry::restore_sessions`] writes back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSession {
    pub session: Session,
    /// The status the connection set last (`online` until it sets one).
    pub status: Status,
    pub text: String,
    /// When it was set (unix ms; 0 = never).
    pub status_at_ms: i64,
}

pub(crate) fn sort_sessions(sessions: &mut [Session]) {
    sessions.sort_unstable_by_key(|s| (s.server, s.user, s.channel));
}

fn server_from_row(row: &AnyRow) -> Result<ServerRecord, DbError> {
    Ok(ServerRecord {
        id: required_server_col(row, "id")?,
        role: parse_col(row, "role")?,
        address: col(row, "address")?,
        epoch: nonnegative_col(row, "epoch")?,
        state: parse_col(row, "state")?,
        exchange: server_col(row, "exchange_id")?,
        attach_epoch: nonnegative_col(row, "attach_epoch")?,
        registered_at_ms: col(row, "registered_at")?,
        last_seen_ms: col(row, "last_seen")?,
    })
}

pub(crate) fn session_from_row(row: &AnyRow) -> Result<Session, DbError> {
    Ok(Session {
        user: user_col(row, "user_id")?,
        device: col(row, "device")?,
        server: required_server_col(row, "server_id")?,
        channel: ChannelId(col::<i64>(row, "channel")? as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::RegistryError;
    use crate::db::Conflict;

    /// A transaction the database aborted under it is run again, like a
    /// deadlock; a bad row is not.
    #[test]
    fn an_aborted_transaction_is_worth_another_attempt() {
        assert!(RegistryError::Aborted.is_conflict());
        assert!(
            !RegistryError::BadRow {
                what: "x".to_string()
            }
            .is_conflict()
        );
    }
}
