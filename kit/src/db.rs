//! A fresh registry database per test.
//!
//! With `IIM_TEST_MYSQL_URL` (a MariaDB server URL without a database, as
//! printed by `scripts/mariadb-test-setup`) each test gets its own database
//! `iim_it_<pid>_<n>`; otherwise a SQLite file in a temporary directory.
//! In CI (`CI=true`) MariaDB is required: its absence fails the test.

use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct TestDb {
    url: String,
    mysql: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new() -> TestDb {
        match std::env::var("IIM_TEST_MYSQL_URL") {
            Ok(server) if !server.is_empty() => Self::on(server).await,
            _ => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!(
                        "CI=true but IIM_TEST_MYSQL_URL is not set: run scripts/mariadb-test-setup"
                    );
                }
                Self::sqlite()
            }
        }
    }

    /// Always SQLite (the embedded default), whatever the environment.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("registry.db").display());
        TestDb {
            url,
            mysql: None,
            _dir: Some(dir),
        }
    }

    /// A fresh database on the MySQL server (or cluster: a url may list
    /// several nodes, see `iim::registry::node_urls`) at `server`, a url
    /// without a database.
    pub async fn on(server: String) -> TestDb {
        let server = server.trim_end_matches('/').to_string();
        let name = format!(
            "iim_it_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = admin(&server).await.expect("connect to IIM_TEST_MYSQL_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}"
        )))
        .execute(&mut c)
        .await
        .expect("drop old test database");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .expect("create test database");
        TestDb {
            url: format!("{server}/{name}"),
            mysql: Some((server, name)),
            _dir: None,
        }
    }

    /// A store on this database with `users` in its directory (named
    /// `user<id>`, all in one organisation, so all colleagues).
    pub async fn directory(&self, users: &[u64]) -> iim::store::Store {
        let reg = iim::registry::Registry::connect(self.url())
            .await
            .expect("registry");
        let store = iim::store::Store::new(&reg);
        for u in users {
            store
                .add_user(&iim::store::User {
                    id: iim::types::UserId(*u),
                    name: format!("user{u}"),
                    org: "acme".into(),
                })
                .await
                .expect("add user");
        }
        store
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The MySQL database's name and the server's url (no database), when
    /// this is MySQL.
    pub fn mysql_parts(&self) -> Option<(&str, &str)> {
        self.mysql
            .as_ref()
            .map(|(server, name)| (name.as_str(), server.as_str()))
    }

    pub fn is_mysql(&self) -> bool {
        self.mysql.is_some()
    }

    /// Drop the MariaDB database (SQLite files go with the temp dir).
    pub async fn cleanup(self) {
        if let Some((server, name)) = &self.mysql
            && let Ok(mut c) = admin(server).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name}"
            )))
            .execute(&mut c)
            .await;
        }
    }
}

/// A connection to the first node of `server` that answers.
async fn admin(server: &str) -> Result<sqlx::MySqlConnection, sqlx::Error> {
    use sqlx::Connection;
    let mut last = None;
    for url in iim::registry::node_urls(server) {
        match sqlx::MySqlConnection::connect(&url).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(sqlx::Error::PoolClosed))
}
