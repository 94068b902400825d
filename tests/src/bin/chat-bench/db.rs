//! The bench's database (created for the run, dropped at its end),
//! MariaDB's global counters, and the app servers' chat counters.

use anyhow::{Context, Result, bail};
use iim_http::client::{Client, metric_value};
use std::net::SocketAddr;
use std::time::Duration;

/// A database created for this run, dropped by [`BenchDb::drop_db`].
pub struct BenchDb {
    pub server: String,
    pub name: String,
}

impl BenchDb {
    pub async fn create(server: &str) -> Result<BenchDb> {
        use sqlx::Connection;
        let server = server.trim_end_matches('/').to_string();
        if !server.starts_with("mysql://") {
            bail!("--mysql-url / IIM_TEST_MYSQL_URL must be a mysql:// URL, got {server:?}");
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!("chat_bench_{}_{stamp}", std::process::id());
        let mut c = sqlx::MySqlConnection::connect(&server)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to MariaDB at {} (start it / create the account with `scripts/mariadb-test-setup`)",
                    redact(&server)
                )
            })?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        let _ = c.close().await;
        Ok(BenchDb { server, name })
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    pub async fn drop_db(&self) -> Result<()> {
        use sqlx::Connection;
        let mut c = sqlx::MySqlConnection::connect(&self.server).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {}",
            self.name
        )))
        .execute(&mut c)
        .await?;
        let _ = c.close().await;
        Ok(())
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Global status counters of the MariaDB server.
#[derive(Clone, Copy, Default)]
pub struct DbStatus {
    pub commits: u64,
    pub fsyncs: u64,
    pub lock_waits: u64,
    pub lock_time_ms: u64,
}

pub async fn db_status(c: &mut sqlx::MySqlConnection) -> DbStatus {
    use sqlx::Row;
    let rows = sqlx::query(
        "SHOW GLOBAL STATUS WHERE Variable_name IN \
         ('Com_commit', 'Innodb_data_fsyncs', 'Innodb_row_lock_waits', 'Innodb_row_lock_time')",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap_or_default();
    let mut s = DbStatus::default();
    for r in rows {
        let name: String = r.try_get(0).unwrap_or_default();
        let value: u64 = r
            .try_get::<String, _>(1)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match name.as_str() {
            "Com_commit" => s.commits = value,
            "Innodb_data_fsyncs" => s.fsyncs = value,
            "Innodb_row_lock_waits" => s.lock_waits = value,
            "Innodb_row_lock_time" => s.lock_time_ms = value,
            _ => {}
        }
    }
    s
}

pub async fn db_version(c: &mut sqlx::MySqlConnection) -> String {
    use sqlx::Row;
    sqlx::query("SELECT VERSION()")
        .fetch_one(&mut *c)
        .await
        .ok()
        .and_then(|r| r.try_get::<String, _>(0).ok())
        .unwrap_or_else(|| "?".into())
}

/// The app servers' counters read around each window.
pub const COUNTERS: [&str; 4] = [
    "iim_chat_messages_stored_total",
    "iim_chat_pushes_total",
    "iim_chat_pushes_dropped_total",
    "iim_appserver_connection_overflow_total",
];

/// The chat counters of one app server (zeros if unreachable).
pub async fn server_counters(http: SocketAddr) -> [u64; 4] {
    let page = match Client::new(&http.to_string(), Duration::from_secs(5)) {
        Ok(c) => c.metrics().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    COUNTERS.map(|name| metric_value(&page, name).map_or(0, |v| v as u64))
}

/// The local MariaDB server process, if there is one.
pub fn mariadbd_pid() -> Option<u32> {
    let dir = std::fs::read_dir("/proc").ok()?;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "mariadbd" | "mysqld") {
            return Some(pid);
        }
    }
    None
}
