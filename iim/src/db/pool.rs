//! The pool: connecting to SQLite or MySQL/MariaDB through sqlx's `Any`
//! driver, the migrations of `sql/` run at connect, and the write
//! transaction every writer opens.
//!
//! A `mysql://` url may name several nodes of one replicated cluster
//! (MariaDB Galera: every node takes writes), `mysql://u:p@h1:3306,h2:3306,
//! h3:3306/db`. One pool per node; every statement goes to the active one.
//! A watcher checks the active node every half second and moves to the
//! next node that answers when it does not, so a killed node costs the
//! statements in flight and those of the next half second or so (which
//! fail, and whose callers retry as after any database error) — never a
//! committed write, which the cluster holds on every node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

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
    nodes: Arc<Nodes>,
    backend: Backend,
    /// The server answers `INSERT … RETURNING` (SQLite, MariaDB 10.5 and
    /// later; not MySQL).
    returning: bool,
}

/// One pool per database node; statements go to `active`.
#[derive(Debug)]
struct Nodes {
    pools: Vec<AnyPool>,
    /// `host:port` of each, for logs.
    names: Vec<String>,
    active: AtomicUsize,
    /// How many times the watcher moved to another node.
    switches: AtomicU64,
}

impl Nodes {
    /// Statements go to node `to` from now on (logged with `why`, counted).
    fn switch(&self, from: usize, to: usize, why: &str) {
        self.active.store(to, Ordering::Relaxed);
        self.switches.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(from = %self.names[from], to = %self.names[to], "{why}");
    }
}

/// How often the watcher checks the active node of a cluster.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// How long a statement waits for a connection to a node of a cluster: a
/// little longer than the watcher needs to move to another node, so a
/// statement caught on a dead node fails (and is retried by its caller)
/// rather than waiting out sqlx's 30 s.
const CLUSTER_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// A node that does not answer the check within this is taken as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// The url of each node a url names: `mysql://u:p@h1:3306,h2:3306/db?x=y`
/// names `mysql://u:p@h1:3306/db?x=y` and `mysql://u:p@h2:3306/db?x=y`;
/// any other url names itself alone.
pub fn node_urls(url: &str) -> Vec<String> {
    let Some(rest) = url.strip_prefix("mysql://") else {
        return vec![url.to_owned()];
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| match userinfo {
            Some(u) => format!("mysql://{u}@{h}{tail}"),
            None => format!("mysql://{h}{tail}"),
        })
        .collect()
}

/// `host:port` of a single-node url, for logs (never the password);
/// `sqlite` for a SQLite database.
fn node_name(url: &str) -> String {
    if url.starts_with("sqlite:") {
        return "sqlite".to_owned();
    }
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, h)| h)
        .to_owned()
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
        let (backend, pools, active) = if let Some(rest) = url.strip_prefix("sqlite:") {
            (Backend::Sqlite, vec![connect_sqlite(url, rest).await?], 0)
        } else if url.starts_with("mysql://") {
            let (pools, active) = connect_mysql_nodes(url).await?;
            (Backend::MySql, pools, active)
        } else {
            return Err(ConnectError::BadUrl("expected a sqlite: or mysql:// url"));
        };
        let pool = pools[active].clone();
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
        let names = node_urls(url).iter().map(|u| node_name(u)).collect();
        let nodes = Arc::new(Nodes {
            pools,
            names,
            active: AtomicUsize::new(active),
            switches: AtomicU64::new(0),
        });
        let returning = match backend {
            Backend::Sqlite => true,
            Backend::MySql => returns_inserted_rows(&pool).await,
        };
        if nodes.pools.len() > 1 {
            tokio::spawn(watch_nodes(Arc::downgrade(&nodes)));
        }
        Ok(Db {
            nodes,
            backend,
            returning,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `INSERT … RETURNING` may be used: one round trip instead of an
    /// insert and a read of what it generated.
    pub(crate) fn returning(&self) -> bool {
        self.returning
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.nodes.pools[self.nodes.active.load(Ordering::Relaxed)]
    }

    /// `host:port` of the node statements go to now (of several, when the
    /// url names a cluster).
    pub fn active_node(&self) -> &str {
        &self.nodes.names[self.nodes.active.load(Ordering::Relaxed)]
    }

    /// The database lines of a daemon's `/metrics` page, named
    /// `<prefix>_database_…`: the node statements go to now (an info gauge,
    /// `node="host:port"`, `node="sqlite"` for SQLite) and how many times the
    /// watcher has moved to another node of a cluster.
    pub fn render_metrics(&self, prefix: &str) -> String {
        let switches = iim_proto::metrics::Counter::default();
        switches.add(self.nodes.switches.load(Ordering::Relaxed));
        let mut p = iim_proto::metrics::Page::default();
        p.info(
            &format!("{prefix}_database_active_node"),
            "The database node this daemon's statements go to.",
            "node",
            self.active_node(),
        )
        .counter(
            &format!("{prefix}_database_node_switches_total"),
            "Times this daemon moved to another node of its database cluster.",
            &switches,
        );
        p.finish()
    }

    /// A write transaction in the dialect's way ([`Backend::begin_write`]).
    pub(crate) async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        self.pool().begin_with(self.backend.begin_write()).await
    }
}

/// Whether the MySQL-protocol server behind `pool` is MariaDB 10.5 or
/// later, the first with `INSERT … RETURNING`. `false` when the version
/// cannot be read: the statements without it work everywhere.
async fn returns_inserted_rows(pool: &AnyPool) -> bool {
    let version: Option<String> = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(pool)
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "cannot read the database server's version"))
        .ok();
    version.is_some_and(|v| mariadb_with_returning(&v))
}

/// `version` (as `SELECT VERSION()` gives it) names MariaDB 10.5 or later.
fn mariadb_with_returning(version: &str) -> bool {
    if !version.contains("MariaDB") {
        return false;
    }
    // The handshake's form puts a MySQL-compatible version first.
    let version = version.strip_prefix("5.5.5-").unwrap_or(version);
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (10, 5),
        _ => false,
    }
}

/// Connects to the first node of `url` that answers (one pool per node, the
/// others connected lazily); returns the pools and the index of that node.
async fn connect_mysql_nodes(url: &str) -> Result<(Vec<AnyPool>, usize), ConnectError> {
    let urls = node_urls(url);
    if urls.is_empty() {
        return Err(ConnectError::BadUrl("the mysql:// url names no host"));
    }
    let several = urls.len() > 1;
    let mut pools = Vec::with_capacity(urls.len());
    let mut active = None;
    let mut first_error = None;
    for u in &urls {
        if active.is_none() {
            match connect_mysql(u, several, false).await {
                Ok(p) => {
                    active = Some(pools.len());
                    pools.push(p);
                    continue;
                }
                Err(e @ ConnectError::BadUrl(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(node = %node_name(u), error = %e, "database node unavailable");
                    first_error.get_or_insert(e);
                }
            }
        }
        pools.push(connect_mysql(u, several, true).await?);
    }
    match active {
        Some(a) => Ok((pools, a)),
        None => Err(first_error.unwrap_or(ConnectError::BadUrl("no database node"))),
    }
}

/// Every `WATCH_EVERY` while a [`Db`] on a cluster exists: if the active
/// node does not answer, the next one (in url order) that does becomes
/// active; and while the active node is not the first of the url, an
/// earlier node that has answered `RETURN_AFTER` checks in a row becomes
/// active again. Every daemon is given the same list, so they all converge
/// on the first node that answers: two nodes writing the same row at once
/// is what Galera may get wrong (a lost update, see docs/operations.md),
/// and that then happens only in the seconds around a fail-over. Ends when
/// the last `Db` is dropped.
async fn watch_nodes(nodes: std::sync::Weak<Nodes>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut all_down = false;
    let mut back = Return::default();
    loop {
        tick.tick().await;
        let Some(n) = nodes.upgrade() else { return };
        let active = n.active.load(Ordering::Relaxed);
        if answers(&n.pools[active]).await {
            all_down = false;
            let mut earliest = None;
            for i in 0..active {
                if answers(&n.pools[i]).await {
                    earliest = Some(i);
                    break;
                }
            }
            if let Some(i) = back.observe(earliest) {
                n.switch(
                    active,
                    i,
                    "an earlier database node of the list answers again; using it",
                );
            }
            continue;
        }
        back = Return::default();
        let len = n.pools.len();
        let mut moved = false;
        for i in (1..len).map(|k| (active + k) % len) {
            if answers(&n.pools[i]).await {
                n.switch(
                    active,
                    i,
                    "database node does not answer; using another node of the cluster",
                );
                moved = true;
                break;
            }
        }
        if !moved && !all_down {
            tracing::error!("no database node answers; retrying");
        }
        all_down = !moved;
    }
}

/// How many checks in a row an earlier node of the list must answer before
/// the watcher moves back to it: a node that has just rejoined is given a
/// few seconds, so a node that flaps does not drag every daemon with it.
const RETURN_AFTER: u32 = 6;

/// The watcher's count of an earlier node answering in a row.
#[derive(Debug, Default)]
struct Return {
    node: Option<usize>,
    streak: u32,
}

impl Return {
    /// One check's result: the earliest node before the active one that
    /// answered, if any. Returns the node to move to once it has answered
    /// `RETURN_AFTER` checks in a row.
    fn observe(&mut self, earliest: Option<usize>) -> Option<usize> {
        if earliest.is_none() || earliest != self.node {
            self.node = earliest;
            self.streak = u32::from(earliest.is_some());
        } else {
            self.streak += 1;
        }
        if self.streak >= RETURN_AFTER {
            *self = Return::default();
            return earliest;
        }
        None
    }
}

/// The node takes statements: a cluster node that lost its quorum refuses
/// them (MariaDB Galera error 1047) although it still accepts connections.
async fn answers(pool: &AnyPool) -> bool {
    let check = sqlx::query("SELECT 1 FROM _sqlx_migrations LIMIT 1").fetch_optional(pool);
    matches!(tokio::time::timeout(CHECK_TIMEOUT, check).await, Ok(Ok(_)))
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

/// A pool on one MySQL/MariaDB node. `several`: one node of a cluster, so a
/// connection is waited for [`CLUSTER_ACQUIRE_TIMEOUT`] at most (the
/// watcher moves to another node meanwhile); `lazy`: no connection until
/// one is needed.
async fn connect_mysql(url: &str, several: bool, lazy: bool) -> Result<AnyPool, ConnectError> {
    if mysql_transport(url).map_err(ConnectError::BadUrl)? == Transport::Unverified {
        tracing::warn!(
            "the database connection does not verify the server's certificate \
             (ssl-mode is not verify_ca or verify_identity): anyone on the path \
             can read or change what iim stores"
        );
    }
    let mut options = AnyPoolOptions::new();
    if several {
        options = options.acquire_timeout(CLUSTER_ACQUIRE_TIMEOUT);
    }
    let options = options.max_connections(10).after_connect(|conn, _meta| {
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
    });
    let pool = if lazy {
        options.connect_lazy(url)?
    } else {
        options.connect(url).await?
    };
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::{
        RETURN_AFTER, Return, Transport, mariadb_with_returning, mysql_transport, node_name,
        node_urls,
    };

    #[test]
    fn returning_is_used_on_mariadb_10_5_and_later_only() {
        assert!(mariadb_with_returning("10.11.19-MariaDB-0+deb12u1"));
        assert!(mariadb_with_returning("10.5.0-MariaDB"));
        assert!(mariadb_with_returning("11.4.2-MariaDB-log"));
        assert!(mariadb_with_returning("5.5.5-10.6.12-MariaDB"));
        assert!(!mariadb_with_returning("10.4.31-MariaDB"));
        assert!(!mariadb_with_returning("8.0.36"));
        assert!(!mariadb_with_returning("8.4.0-TiDB-v8.1.0"));
        assert!(!mariadb_with_returning("MariaDB"));
    }

    /// The watcher moves back only after the same earlier node answered
    /// `RETURN_AFTER` checks in a row; a miss or another node starts over.
    #[test]
    fn an_earlier_node_is_used_again_after_answering_in_a_row() {
        let mut back = Return::default();
        for _ in 1..RETURN_AFTER {
            assert_eq!(back.observe(Some(0)), None);
        }
        assert_eq!(back.observe(None), None);
        for _ in 1..RETURN_AFTER {
            assert_eq!(back.observe(Some(0)), None);
        }
        assert_eq!(back.observe(Some(1)), None);
        for _ in 1..RETURN_AFTER {
            assert_eq!(back.observe(Some(0)), None);
        }
        assert_eq!(back.observe(Some(0)), Some(0));
        // And counts afresh after a move.
        assert_eq!(back.observe(Some(0)), None);
    }

    #[test]
    fn a_url_may_name_every_node_of_a_cluster() {
        assert_eq!(
            node_urls("mysql://iim:p%40ss@127.0.0.1:3311,127.0.0.1:3312/iim?ssl-mode=disabled"),
            vec![
                "mysql://iim:p%40ss@127.0.0.1:3311/iim?ssl-mode=disabled",
                "mysql://iim:p%40ss@127.0.0.1:3312/iim?ssl-mode=disabled",
            ]
        );
        assert_eq!(
            node_urls("mysql://a,b:3307"),
            vec!["mysql://a", "mysql://b:3307"]
        );
        for single in [
            "mysql://iim:pw@127.0.0.1:3306/iim",
            "sqlite://x.db",
            "sqlite::memory:",
        ] {
            assert_eq!(node_urls(single), vec![single]);
        }
        assert_eq!(node_name("mysql://iim:secret@db1:3306/iim?x=1"), "db1:3306");
        assert_eq!(node_name("sqlite:///var/lib/iim/registry.db"), "sqlite");
    }

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
