//! The registry over TLS to a MariaDB server of its own: this test starts a
//! `mariadbd` (temporary datadir, a loopback port, a certificate issued by
//! an iim development CA for 127.0.0.1 and localhost,
//! `--require-secure-transport=ON`) and shows that
//!
//! - the registry connects with `ssl-mode=verify_identity&ssl-ca=<the CA>`,
//!   runs its migrations and answers a query, over TLS;
//! - a CA that did not issue the server's certificate is refused;
//! - a connection without TLS is refused by the server.
//!
//! Needs `mariadbd` and `mariadb-install-db` (Debian's mariadb-server,
//! which `scripts/mariadb-test-setup` installs): skipped when they are
//! missing, failed instead under `CI=true`.

use iim::registry::{Registry, Role, ServerState};
use iim::tls::dev::DevCa;
use iim::types::ServerId;
use sqlx::{Connection, Row};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long mariadbd may take to say it is ready.
const READY: Duration = Duration::from_secs(30);

fn find(name: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A mariadbd of this test's own, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    socket: PathBuf,
    /// What it printed, for failure messages.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Initialises a datadir under `dir` and starts mariadbd on a free
    /// loopback port with the given TLS files, TLS required.
    fn start(dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Server {
        let mariadbd = find("mariadbd").expect("mariadbd");
        let install = find("mariadb-install-db").expect("mariadb-install-db");
        let datadir = dir.join("data");
        // mariadbd refuses to run as root unless told so; as anyone else it
        // runs as that user.
        let root = unsafe { libc::geteuid() } == 0;
        let user_arg = root.then_some("--user=root");
        let out = Command::new(&install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .args(user_arg)
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ])
            .output()
            .expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A port nobody listens on now (the kernel's pick, released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let socket = dir.join("mysqld.sock");
        let mut child = Command::new(&mariadbd)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .arg(format!("--port={port}"))
            .args(user_arg)
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
                "--require-secure-transport=ON",
            ])
            .arg(format!("--ssl-cert={}", cert.display()))
            .arg(format!("--ssl-key={}", key.display()))
            .arg(format!("--ssl-ca={}", ca.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mariadbd");
        // mariadbd logs to stderr; "ready for connections" is the event
        // waited for. The reader keeps draining so the pipe never fills.
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready for connections") {
                    let _ = ready_tx.try_send(());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let server = Server {
            child,
            port,
            socket,
            log,
        };
        if ready_rx.recv_timeout(READY).is_err() {
            panic!(
                "mariadbd did not get ready within {READY:?}:\n{}",
                server.log.lock().unwrap()
            );
        }
        server
    }

    /// Runs SQL as root over the unix socket (TLS is not needed there).
    fn sql(&self, statements: &str) {
        let out = Command::new(find("mariadb").expect("the mariadb client"))
            .arg("--no-defaults")
            .arg("--protocol=socket")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "-e", statements])
            .output()
            .expect("run mariadb");
        assert!(
            out.status.success(),
            "{statements}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self, params: &str) -> String {
        format!(
            "mysql://iim:tls-test-password@127.0.0.1:{}/iim_tls?{params}",
            self.port
        )
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[tokio::test]
async fn registry_connects_to_mariadb_only_over_verified_tls() {
    if find("mariadbd").is_none() || find("mariadb-install-db").is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true but mariadbd is not installed (scripts/mariadb-test-setup installs it)"
        );
        eprintln!("skipped: mariadbd is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let d = dir.path();
    // mariadbd runs as the test's own user (root in CI, with --user=root),
    // so it reads these files as they are written.
    let ca = DevCa::new("iim test deployment CA").unwrap();
    let leaf = ca
        .issue_for(&["127.0.0.1", "localhost"], Duration::from_secs(3_600))
        .unwrap();
    let (ca_file, cert, key) = (d.join("ca.pem"), d.join("db.pem"), d.join("db.key"));
    write(&ca_file, &ca.ca_pem());
    write(&cert, &leaf.cert_pem);
    write(&key, &leaf.key_pem);
    let other_ca = d.join("other-ca.pem");
    write(&other_ca, &DevCa::new("another CA").unwrap().ca_pem());

    let server = Server::start(d, &cert, &key, &ca_file);
    server.sql(
        "CREATE DATABASE iim_tls; \
         CREATE USER 'iim'@'127.0.0.1' IDENTIFIED BY 'tls-test-password'; \
         GRANT ALL ON iim_tls.* TO 'iim'@'127.0.0.1';",
    );

    // Verified TLS: migrations, a write and a read through the registry.
    let verified = server.url(&format!(
        "ssl-mode=verify_identity&ssl-ca={}",
        ca_file.display()
    ));
    let reg = Registry::connect(&verified)
        .await
        .unwrap_or_else(|e| panic!("verified TLS: {e:?}\n{}", server.log.lock().unwrap()));
    reg.begin_epoch(ServerId(7), Role::App, "10.0.0.7:1", ServerState::Up, 1)
        .await
        .expect("write over TLS");
    let servers = reg.servers().await.expect("read over TLS");
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].id, ServerId(7));
    // ... and the session really is encrypted.
    let mut conn = sqlx::mysql::MySqlConnection::connect(&verified)
        .await
        .expect("a plain sqlx connection with the same url");
    let version: String = sqlx::query("SHOW SESSION STATUS LIKE 'Ssl_version'")
        .fetch_one(&mut conn)
        .await
        .expect("Ssl_version")
        .get(1);
    assert!(version.starts_with("TLS"), "Ssl_version {version:?}");
    let required: i64 = sqlx::query("SELECT @@require_secure_transport")
        .fetch_one(&mut conn)
        .await
        .expect("require_secure_transport")
        .get(0);
    assert_eq!(required, 1);
    conn.close().await.ok();

    // A CA that did not issue the server's certificate: refused by us.
    let wrong_ca = server.url(&format!(
        "ssl-mode=verify_identity&ssl-ca={}",
        other_ca.display()
    ));
    let err = Registry::connect(&wrong_ca)
        .await
        .expect_err("a server certificate from another CA must be refused");
    let text = format!("{err:?}");
    assert!(
        text.contains("UnknownIssuer") || text.to_lowercase().contains("certificate"),
        "{text}"
    );

    // No TLS at all: refused by the server. MariaDB 10.11 answers an
    // insecure login with "access denied" (1045); the same account and
    // password just worked over TLS, so the transport is what it refused.
    let plain = server.url("ssl-mode=disabled");
    let err = Registry::connect(&plain)
        .await
        .expect_err("the server requires secure transport");
    let text = format!("{err:?}");
    assert!(
        text.contains("insecure transport") || text.contains("number: 1045"),
        "{text}"
    );
    // ... while the same url over TLS still works.
    Registry::connect(&verified)
        .await
        .expect("verified TLS, again");

    drop(reg);
    drop(server);
}
