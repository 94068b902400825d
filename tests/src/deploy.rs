//! A deployment of the real binaries for fault tests: an exchange and three
//! app servers started from config files, killable and restartable, with
//! WebSocket endpoints and a directory.

use crate::client::ChatClient;
use crate::proc::{Proc, free_port};
use crate::{JWT_SECRET, TestDb, token};
use iim::store::{Store, User};
use iim::types::{ServerId, UserId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Fields drop in order: the processes (which print their logs if the test
/// failed) before the directory holding those logs.
pub struct Deployment {
    exchange: Option<Proc>,
    servers: BTreeMap<u32, Option<Proc>>,
    pub ws: BTreeMap<u32, SocketAddr>,
    pub db: TestDb,
    dir: tempfile::TempDir,
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

impl Deployment {
    /// Exchange (lease `lease_secs`) + app servers 1..=3 from config files,
    /// the registry on a fresh test database with `users` (id, org) in the
    /// directory; `extra` is appended to every app server's TOML.
    pub async fn start(users: &[(u64, &str)], lease_secs: u64, extra: &str) -> Deployment {
        let db = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        iim::tls::dev::write_dev_certs(
            &d,
            &[ServerId(100)],
            &[ServerId(1), ServerId(2), ServerId(3)],
        )
        .unwrap();
        let reg = iim::registry::Registry::connect(db.url()).await.unwrap();
        let store = Store::new(&reg);
        for (u, org) in users {
            store
                .add_user(&User {
                    id: UserId(*u),
                    name: format!("user{u}"),
                    org: org.to_string(),
                })
                .await
                .unwrap();
        }
        let quic = addr(free_port(true));
        std::fs::write(
            d.join("exchange.toml"),
            format!(
                "id = 100\nlisten = \"{quic}\"\nhttp_listen = \"127.0.0.1:0\"\ndatabase = \"{db}\"\nlease_secs = {lease_secs}\nshutdown_grace_secs = 2\n\
                 [quic]\nkeep_alive_ms = 200\nidle_timeout_ms = 1000\n\
                 [tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/exchange-100.pem\"\nkey = \"{p}/exchange-100.key\"\n",
                db = db.url(),
                p = d.display()
            ),
        )
        .unwrap();
        let mut ws = BTreeMap::new();
        for id in 1..=3u32 {
            let port = free_port(false);
            ws.insert(id, addr(port));
            std::fs::write(
                d.join(format!("s{id}.toml")),
                format!(
                    "id = {id}\ndatabase = \"{db}\"\nclient_listen = \"127.0.0.1:{port}\"\n\
                     exchange = {{ id = 100, address = \"{quic}\" }}\n\
                     http_listen = \"127.0.0.1:0\"\nreconnect_min_ms = 50\nreconnect_max_ms = 300\n\
                     [auth]\njwt_secret = \"{JWT_SECRET}\"\n\
                     [limits]\nrate_per_sec = 100000\nrate_burst = 100000\n\
                     [quic]\nkeep_alive_ms = 200\nidle_timeout_ms = 1000\n\
                     [tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/server-{id}.pem\"\nkey = \"{p}/server-{id}.key\"\n{extra}",
                    db = db.url(),
                    p = d.display()
                ),
            )
            .unwrap();
        }
        let mut dep = Deployment {
            dir,
            db,
            exchange: None,
            servers: BTreeMap::new(),
            ws,
        };
        dep.start_exchange();
        for id in 1..=3 {
            dep.start_server(id);
        }
        for id in 1..=3 {
            dep.wait_ws(id).await;
        }
        dep.wait_linked(&reg).await;
        dep
    }

    /// Wait until the registry shows every app server up (linked to the
    /// exchange), so pushes flow from the first message on.
    pub async fn wait_linked(&self, reg: &iim::registry::Registry) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let servers = reg.servers().await.unwrap();
            let up = servers
                .iter()
                .filter(|s| {
                    s.role == iim::registry::Role::App && s.state == iim::registry::ServerState::Up
                })
                .count();
            if up == 3 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "app servers never linked: {servers:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn cfg(&self, name: &str) -> Vec<String> {
        vec![
            "--config".into(),
            self.path().join(name).display().to_string(),
        ]
    }

    pub fn start_exchange(&mut self) {
        let p = Proc::spawn(
            "iim-exchange",
            &self.cfg("exchange.toml"),
            &self.path(),
            "exchange",
        );
        self.exchange = Some(p);
    }

    pub fn start_server(&mut self, id: u32) {
        let p = Proc::spawn(
            "iim-appserver",
            &self.cfg(&format!("s{id}.toml")),
            &self.path(),
            &format!("s{id}"),
        );
        self.servers.insert(id, Some(p));
    }

    pub async fn kill_server(&mut self, id: u32) {
        if let Some(Some(mut p)) = self.servers.remove(&id) {
            p.kill9().await;
        }
        self.servers.insert(id, None);
    }

    pub async fn kill_exchange(&mut self) {
        if let Some(mut p) = self.exchange.take() {
            p.kill9().await;
        }
    }

    /// Wait until server `id` accepts WebSocket connections.
    pub async fn wait_ws(&self, id: u32) {
        let what = format!("server {id}");
        crate::proc::wait_listening(self.ws[&id], &what, Duration::from_secs(30), || Ok(()))
            .await
            .unwrap();
    }

    pub async fn client(&self, id: u32, user: u64, device: &str) -> ChatClient {
        ChatClient::connect(self.ws[&id], &token(user), device)
            .await
            .unwrap()
    }
}
