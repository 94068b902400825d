//! The least-privilege accounts of sql/grants/ on the real MariaDB: an
//! exchange and two app servers run under their own accounts (chat and
//! presence work), and what each account must not do is refused — by the
//! grants (DDL, rewriting messages, granting) or by the row guards (another
//! server's registry row or sessions).
//!
//! Needs MySQL (`IIM_TEST_MYSQL_URL`) and root on its unix socket (the
//! `mariadb` client), as `scripts/test` sets up; it fails otherwise.

use iim::registry::Registry;
use iim::store::{Store, User};
use iim::types::UserId;
use iim_kit::client::{ChatClient, Ope};
use iim_kit::{
    TestCa, TestDb, appserver_config, eventually, exchange_config, spawn_appserver, spawn_exchange,
    token, wait_linked,
};
use sqlx::Connection;
use std::io::Write;
use std::time::Duration;

const ACCOUNTS: [&str; 3] = ["iim_app_1", "iim_app_2", "iim_exchange_100"];

/// Runs `sql` as root through the unix socket, on database `db`.
fn as_root(db: &str, sql: &str) {
    let mut child = std::process::Command::new("mariadb")
        .args(["--protocol=socket", "-uroot", db])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("the mariadb client (scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "mariadb as root failed on:\n{sql}");
}

fn grants(file: &str, db: &str, id: u32, password: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/grants/");
    std::fs::read_to_string(format!("{path}{file}"))
        .unwrap()
        .replace("${DB}", db)
        .replace("${ID}", &id.to_string())
        .replace("${PASSWORD}", password)
}

fn drop_accounts() -> String {
    ACCOUNTS
        .iter()
        .map(|a| format!("DROP USER IF EXISTS '{a}'@'%';\n"))
        .collect()
}

/// `mysql://iim:iim@host:port` with another account.
fn url_as(server: &str, db: &str, account: &str, password: &str) -> String {
    let host = server.rsplit_once('@').map_or(server, |(_, h)| h);
    format!("mysql://{account}:{password}@{host}/{db}")
}

async fn refused(url: &str, sql: &str) -> String {
    let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
    match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut c)
        .await
    {
        Ok(r) => panic!("{sql}: allowed ({} rows)", r.rows_affected()),
        Err(e) => e.to_string(),
    }
}

async fn allowed(url: &str, sql: &str) -> u64 {
    let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows_affected()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemons_run_under_least_privilege_accounts_that_cannot_touch_other_servers() {
    let db = TestDb::new().await;
    let (name, server) = db
        .mysql_parts()
        .expect("this test needs IIM_TEST_MYSQL_URL");
    let (name, server) = (name.to_owned(), server.to_owned());
    // Migrated by the administrator (the test account may do DDL).
    let admin = Registry::connect(db.url()).await.unwrap();
    let store = Store::new(&admin);
    for (u, org) in [(11u64, "acme"), (21, "acme")] {
        store
            .add_user(&User {
                id: UserId(u),
                name: format!("user{u}"),
                org: org.into(),
            })
            .await
            .unwrap();
    }
    let pw = format!("pw-{}", std::process::id());
    let mut setup = drop_accounts();
    setup.push_str(&grants("appserver.sql", &name, 1, &pw));
    setup.push_str(&grants("appserver.sql", &name, 2, &pw));
    setup.push_str(&grants("exchange.sql", &name, 100, &pw));
    as_root(&name, &setup);
    as_root(&name, &grants("guards.sql", &name, 0, &pw));
    let app = |id: u32| url_as(&server, &name, &format!("iim_app_{id}"), &pw);
    let exchange = url_as(&server, &name, "iim_exchange_100", &pw);

    // The daemons under their accounts: chat and presence across servers.
    let ca = TestCa::new();
    let (ex, _stop) = spawn_exchange(&ca, exchange_config(&exchange)).await;
    let s1 = spawn_appserver(&ca, appserver_config(&app(1), 1, ex.addr), vec![]).await;
    let s2 = spawn_appserver(&ca, appserver_config(&app(2), 2, ex.addr), vec![]).await;
    wait_linked(&s1).await;
    wait_linked(&s2).await;
    let mut c11 = ChatClient::connect(s1.client_addr.unwrap(), &token(11), "phone")
        .await
        .unwrap();
    let mut c21 = ChatClient::connect(s2.client_addr.unwrap(), &token(21), "phone")
        .await
        .unwrap();
    let ack = c11.send("g-1", Ope::Single, 21, "hello").await.unwrap();
    let push = c21
        .next_push(Duration::from_secs(10))
        .await
        .expect("a push");
    assert!(
        format!("{push:?}").contains(&ack.id.to_string()),
        "{push:?}"
    );
    let page = c21.sync_page(None, 0, 10).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    assert!(
        c21.await_presence(Duration::from_secs(10), |c| c.status_of(11).0 == "online")
            .await,
        "21 sees 11 online"
    );
    // Read receipts: a position stored, moved forward, and read back.
    let set = c21.read(Ope::Single, 11, 1).await.unwrap();
    assert!(set.moved, "{set:?}");
    assert!(!c21.read(Ope::Single, 11, 1).await.unwrap().moved);
    let state = c11.read_state().await.unwrap();
    assert_eq!(state.theirs.len(), 1, "{state:?}");

    // What app server 1's account must not do.
    let a1 = app(1);
    for (sql, why) in [
        (
            "UPDATE servers SET state = 'down' WHERE id = 2",
            "own server",
        ),
        (
            "UPDATE servers SET role = 'exchange' WHERE id = 1",
            "own server",
        ),
        ("DELETE FROM sessions WHERE server_id = 2", "own sessions"),
        (
            "INSERT INTO sessions (server_id, channel, user_id, device, epoch, created_at) \
             VALUES (2, 99, 11, 'x', 1, 0)",
            "own sessions",
        ),
        ("DELETE FROM servers WHERE id = 2", "denied"),
        ("UPDATE messages SET body = '\"x\"'", "denied"),
        ("DELETE FROM inbox", "denied"),
        (
            "INSERT INTO users (id, name, org, created_at) VALUES (77, 'x', 'acme', 0)",
            "denied",
        ),
        ("DROP TABLE messages", "denied"),
        ("CREATE TABLE evil (id INT)", "denied"),
        ("GRANT SELECT ON users TO 'iim_app_2'@'%'", "denied"),
    ] {
        let e = refused(&a1, sql).await;
        assert!(e.contains(why), "{sql}: {e}");
    }
    // Its own row it may write.
    assert_eq!(
        allowed(
            &a1,
            "UPDATE servers SET last_seen = last_seen + 1 WHERE id = 1"
        )
        .await,
        1
    );
    // The exchange's account: app servers' rows yes, another exchange's
    // row or deleting rows no.
    let e = refused(
        &exchange,
        "INSERT INTO servers (id, role, address, epoch, state, registered_at, last_seen) \
         VALUES (101, 'exchange', 'x', 1, 'up', 0, 0)",
    )
    .await;
    assert!(e.contains("own server"), "{e}");
    assert!(
        refused(&exchange, "DELETE FROM servers WHERE id = 1")
            .await
            .contains("denied")
    );
    assert!(
        refused(&exchange, "DROP TABLE sessions")
            .await
            .contains("denied")
    );
    // Its own links, not another exchange's; app servers write none.
    assert_eq!(
        allowed(
            &exchange,
            "INSERT INTO exchange_links (exchange_id, peer_id, since_ms) VALUES (100, 101, 0)"
        )
        .await,
        1
    );
    let e = refused(
        &exchange,
        "INSERT INTO exchange_links (exchange_id, peer_id, since_ms) VALUES (101, 100, 0)",
    )
    .await;
    assert!(e.contains("only its own links"), "{e}");
    assert!(
        refused(&app(1), "DELETE FROM exchange_links")
            .await
            .contains("denied")
    );

    // A clean stop under the account: its row goes down, its sessions away.
    drop((c11, c21));
    s2.stopped().await;
    eventually!(
        10,
        "server 2 down in the registry",
        admin
            .server(iim::types::ServerId(2))
            .await
            .unwrap()
            .is_some_and(|r| r.state == iim::registry::ServerState::Down)
    );

    as_root(&name, &drop_accounts());
    db.cleanup().await;
}
