//! The two-backend harness shared by the registry, store and presence
//! tests: every body runs against SQLite (a file in a temporary directory)
//! and against MySQL/MariaDB when `IIM_TEST_MYSQL_URL` names a server (no
//! database: each run creates `iim_t_<random>` and drops it, even when the
//! body fails). With `CI=true` a missing `IIM_TEST_MYSQL_URL` fails the
//! MySQL half.

use iim::registry::{Backend, Registry};
use sqlx::{AssertSqlSafe, Connection, Executor};
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;

/// Runs `body(registry, url)` once per available backend.
pub async fn each_backend<F, Fut>(body: F)
where
    F: Fn(Registry, String) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let reg = Registry::connect(&url).await.expect("connect to sqlite");
    assert_eq!(reg.backend(), Backend::Sqlite);
    finish("sqlite", tokio::spawn(body(reg, url)).await);

    let Some(server) = mysql_server_url() else {
        return;
    };
    let db = MySqlTestDb::create(&server).await;
    let reg = Registry::connect(&db.url).await.expect("connect to mysql");
    assert_eq!(reg.backend(), Backend::MySql);
    let outcome = tokio::spawn(body(reg, db.url.clone())).await;
    db.drop_database().await;
    finish("mysql", outcome);
}

fn finish(backend: &str, outcome: Result<anyhow::Result<()>, tokio::task::JoinError>) {
    match outcome {
        Ok(Ok(())) => eprintln!("{backend}: ok"),
        Ok(Err(e)) => panic!("{backend}: {e:?}"),
        Err(e) if e.is_panic() => {
            eprintln!("{backend}: panicked");
            std::panic::resume_unwind(e.into_panic())
        }
        Err(e) => panic!("{backend}: {e}"),
    }
}

fn mysql_server_url() -> Option<String> {
    match std::env::var("IIM_TEST_MYSQL_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "CI=true but IIM_TEST_MYSQL_URL is not set: the MySQL half of the registry tests \
             must run in CI (see scripts/mariadb-test-setup)"
        ),
        _ => {
            eprintln!("mysql: skipped, IIM_TEST_MYSQL_URL is not set");
            None
        }
    }
}

struct MySqlTestDb {
    server: String,
    name: String,
    url: String,
}

impl MySqlTestDb {
    async fn create(server: &str) -> MySqlTestDb {
        let (base, params) = match server.split_once('?') {
            Some((base, params)) => (base, format!("?{params}")),
            None => (server, String::new()),
        };
        let base = base.trim_end_matches('/');
        let name = format!(
            "iim_t_{:016x}",
            RandomState::new().hash_one(std::process::id())
        );
        let mut conn = sqlx::mysql::MySqlConnection::connect(server)
            .await
            .expect("connect to IIM_TEST_MYSQL_URL");
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
            .await
            .expect("create test database");
        conn.close().await.ok();
        MySqlTestDb {
            server: server.to_owned(),
            url: format!("{base}/{name}{params}"),
            name,
        }
    }

    async fn drop_database(&self) {
        let mut conn = sqlx::mysql::MySqlConnection::connect(&self.server)
            .await
            .expect("connect to IIM_TEST_MYSQL_URL");
        conn.execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS `{}`",
            self.name
        )))
        .await
        .expect("drop test database");
        conn.close().await.ok();
    }
}
