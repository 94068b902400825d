//! A deployment of the real binaries: a development CA and certificates,
//! one or more `iim-exchange` and N `iim-appserver` processes on loopback
//! sharing one registry database, each with its metrics listener, and the app
//! servers with their WebSocket endpoint and their admin API (its bearer
//! token generated into the deployment's directory, 0600). Any node can be
//! stopped, killed and started again (on the same ports, its log appended
//! to).
//!
//! Nodes get their identity, addresses, database (`--database-file`, a
//! 0600 file holding the url) and certificates as flags (the command an
//! operator would type) and anything else from a TOML file
//! in the deployment's directory, when the [`Spec`] has some.
//! [`Deployment::new`] only prepares; starting and waiting are separate
//! steps so a caller (the demo) can show each one. [`TestDeployment`] is
//! the fault tests' ready-made one.

use crate::TestDb;
use crate::client::{ChatClient, ClientError};
use crate::proc::{APPSERVER_BIN, Binaries, EXCHANGE_BIN, Proc, Stopped, free_port, loopback};
use anyhow::{Context, bail};
use iim::registry::{Registry, Role, ServerState};
use iim::store::{Store, User};
use iim::types::{ServerId, UserId};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to deploy.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Certificates (`certs/`), configs and logs (`logs/`) go here.
    pub dir: PathBuf,
    /// The registry every node uses.
    pub database: String,
    pub bins: Binaries,
    /// The exchanges' ids; the first is the one [`Spec::name_exchange`]
    /// names to app servers that [`Spec::attach`] says nothing about.
    pub exchanges: Vec<u32>,
    pub servers: Vec<u32>,
    /// Every exchange's TOML beyond its flags (empty: its defaults).
    pub exchange_toml: String,
    /// Every app server's TOML beyond its flags.
    pub server_toml: String,
    /// The app servers' client-token secret (`[auth] jwt_secret`); `None`
    /// leaves their default, the development secret.
    pub jwt_secret: Option<String>,
    /// Users given a logging demo connection, per app server.
    pub demo_users: BTreeMap<u32, Vec<u64>>,
    /// Users the admin API may send as (`admin.senders`), on every app
    /// server.
    pub admin_senders: Vec<u64>,
    /// Tell the app servers where their exchange is (`--exchange`)
    /// instead of letting them look it up in the registry.
    pub name_exchange: bool,
    /// App server → its exchange: the one named to it (`--exchange`) with
    /// [`Spec::name_exchange`], else the one it prefers
    /// (`--prefer-exchange`) when it looks them up in the registry.
    pub attach: BTreeMap<u32, u32>,
    /// The daemons' `RUST_LOG` (`None`: their default, info).
    pub log_filter: Option<String>,
}

impl Spec {
    /// Exchange 100 and app servers 1, 2, 3 with their defaults, the
    /// exchange named to them.
    pub fn new(dir: &Path, database: &str, bins: Binaries) -> Spec {
        Spec {
            dir: dir.to_owned(),
            database: database.to_owned(),
            bins,
            exchanges: vec![crate::EXCHANGE.0],
            servers: vec![1, 2, 3],
            exchange_toml: String::new(),
            server_toml: String::new(),
            jwt_secret: None,
            demo_users: BTreeMap::new(),
            admin_senders: Vec::new(),
            name_exchange: true,
            attach: BTreeMap::new(),
            log_filter: None,
        }
    }
}

/// The addresses of one app server.
#[derive(Clone, Copy, Debug)]
pub struct ServerAddrs {
    /// The client (WebSocket) endpoint.
    pub ws: SocketAddr,
    /// Metrics and `/health`.
    pub http: SocketAddr,
    /// The admin API.
    pub admin: SocketAddr,
}

/// The addresses of one exchange.
#[derive(Clone, Copy, Debug)]
pub struct ExchangeAddrs {
    /// Where it listens for QUIC (app servers and peer exchanges).
    pub quic: SocketAddr,
    /// Metrics and `/health`.
    pub http: SocketAddr,
}

/// A running (or stopped) deployment. Its processes are killed when it is
/// dropped; [`Deployment::stop_all`] stops them gracefully.
pub struct Deployment {
    spec: Spec,
    certs: PathBuf,
    logs: PathBuf,
    certs_written: Vec<PathBuf>,
    admin_token: PathBuf,
    exchange_addrs: BTreeMap<u32, ExchangeAddrs>,
    /// What an exchange records in the registry instead of its own
    /// address (a proxy in front of it), by id.
    advertise: BTreeMap<u32, SocketAddr>,
    addrs: BTreeMap<u32, ServerAddrs>,
    exchange_procs: BTreeMap<u32, Proc>,
    server_procs: BTreeMap<u32, Proc>,
    /// Names started at least once: a restart appends to the log.
    started: BTreeSet<String>,
    registry: Option<Registry>,
}

/// A fresh random admin token in `path` (0600), unless one is there.
fn write_admin_token(path: &Path) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    if path.is_file() {
        return Ok(());
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("cannot read /dev/urandom")?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(token.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// How long a node may take to come up.
pub const START_WAIT: Duration = Duration::from_secs(30);
/// How long one look at a node that is coming up may take.
const PROBE_WAIT: Duration = Duration::from_secs(1);

impl Deployment {
    /// Certificates (a development CA in `dir/certs`, reused if one is
    /// there), ports, config files; nothing is started.
    pub fn new(spec: Spec) -> anyhow::Result<Deployment> {
        if spec.exchanges.is_empty() {
            bail!("a deployment needs at least one exchange");
        }
        for (server, exchange) in &spec.attach {
            if !spec.exchanges.contains(exchange) || !spec.servers.contains(server) {
                bail!("server {server} is to attach to exchange {exchange}: not both deployed");
            }
        }
        let certs = spec.dir.join("certs");
        let logs = spec.dir.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let ids = |v: &[u32]| v.iter().map(|&i| ServerId(i)).collect::<Vec<_>>();
        let certs_written =
            iim::tls::dev::write_dev_certs(&certs, &ids(&spec.exchanges), &ids(&spec.servers))
                .with_context(|| format!("cannot write certificates into {}", certs.display()))?;
        let admin_token = spec.dir.join("admin.token");
        write_admin_token(&admin_token)?;
        let addrs = spec
            .servers
            .iter()
            .map(|&id| {
                let ws = loopback(free_port(false));
                let http = loopback(free_port(false));
                let admin = loopback(free_port(false));
                (id, ServerAddrs { ws, http, admin })
            })
            .collect();
        let exchange_addrs = spec
            .exchanges
            .iter()
            .map(|&id| {
                let quic = loopback(free_port(true));
                let http = loopback(free_port(false));
                (id, ExchangeAddrs { quic, http })
            })
            .collect();
        let d = Deployment {
            exchange_addrs,
            advertise: BTreeMap::new(),
            addrs,
            certs,
            logs,
            certs_written,
            admin_token,
            exchange_procs: BTreeMap::new(),
            server_procs: BTreeMap::new(),
            started: BTreeSet::new(),
            registry: None,
            spec,
        };
        d.write_configs()?;
        Ok(d)
    }

    /// [`Deployment::new`], then every node started and up.
    pub async fn launch(spec: Spec) -> anyhow::Result<Deployment> {
        let mut d = Deployment::new(spec)?;
        for id in d.spec.exchanges.clone() {
            d.start_exchange(id)?;
        }
        d.wait_exchanges(&d.spec.exchanges.clone()).await?;
        for id in d.spec.servers.clone() {
            d.start_server(id)?;
        }
        d.wait_servers(&d.spec.servers.clone()).await?;
        Ok(d)
    }

    fn write_configs(&self) -> anyhow::Result<()> {
        let write = |name: &str, toml: &str| {
            let path = self.config_path(name);
            std::fs::write(&path, toml).with_context(|| format!("cannot write {}", path.display()))
        };
        // The url (a password, for MySQL) goes to the daemons in a file of
        // mode 0600, not on their command lines, where `ps` shows it.
        let url_file = self.database_file();
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options
                .open(&url_file)
                .and_then(|mut f| writeln!(f, "{}", self.spec.database))
                .with_context(|| format!("cannot write {}", url_file.display()))?;
        }
        if !self.spec.exchange_toml.is_empty() {
            for &id in &self.spec.exchanges {
                write(&exchange_name(id), &self.spec.exchange_toml)?;
            }
        }
        let mut server = self.spec.server_toml.clone();
        if let Some(secret) = &self.spec.jwt_secret {
            server.push_str(&format!("\n[auth]\njwt_secret = {secret:?}\n"));
        }
        if !server.is_empty() {
            for &id in &self.spec.servers {
                write(&server_name(id), &server)?;
            }
        }
        Ok(())
    }

    /// The file holding the database url.
    fn database_file(&self) -> PathBuf {
        self.spec.dir.join("database.url")
    }

    fn config_path(&self, name: &str) -> PathBuf {
        self.spec.dir.join(format!("{name}.toml"))
    }

    /// `--config FILE` when the node has one.
    fn config_args(&self, name: &str) -> Vec<String> {
        let path = self.config_path(name);
        if path.is_file() {
            vec!["--config".into(), path.display().to_string()]
        } else {
            Vec::new()
        }
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Files the development CA wrote (`ca.pem` among them if it is new).
    pub fn certs_written(&self) -> &[PathBuf] {
        &self.certs_written
    }

    pub fn certs_dir(&self) -> &Path {
        &self.certs
    }

    pub fn logs_dir(&self) -> &Path {
        &self.logs
    }

    /// The log of node `name` (`exchange-N`, `server-N`).
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// The first exchange's id (the only one, in most deployments).
    pub fn first_exchange(&self) -> u32 {
        self.spec.exchanges[0]
    }

    /// Exchange `id`'s addresses.
    pub fn exchange(&self, id: u32) -> ExchangeAddrs {
        self.exchange_addrs[&id]
    }

    /// Exchange `id`'s metrics listener.
    pub fn exchange_http(&self, id: u32) -> SocketAddr {
        self.exchange(id).http
    }

    /// Have exchange `id` record `addr` in the registry instead of its
    /// own address (a proxy in front of it) from its next start on.
    pub fn advertise(&mut self, id: u32, addr: SocketAddr) {
        self.advertise.insert(id, addr);
    }

    /// App server `id`'s addresses.
    pub fn server(&self, id: u32) -> ServerAddrs {
        self.addrs[&id]
    }

    pub fn ws(&self, id: u32) -> SocketAddr {
        self.server(id).ws
    }

    pub fn http(&self, id: u32) -> SocketAddr {
        self.server(id).http
    }

    /// The file holding the app servers' admin bearer token.
    pub fn admin_token_file(&self) -> &Path {
        &self.admin_token
    }

    /// A client of app server `id`'s admin API, with the token.
    pub fn admin(&self, id: u32, timeout: Duration) -> anyhow::Result<iim_http::client::Client> {
        let token =
            iim_http::admin::read_token_file(&self.admin_token).map_err(anyhow::Error::msg)?;
        Ok(
            iim_http::client::Client::new(&self.server(id).admin.to_string(), timeout)?
                .with_token(token),
        )
    }

    /// Exchange `id`'s flags.
    pub fn exchange_args(&self, id: u32) -> Vec<String> {
        let a = self.exchange(id);
        let mut args = self.config_args(&exchange_name(id));
        args.extend([
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            a.quic.to_string(),
            "--http-listen".into(),
            a.http.to_string(),
        ]);
        if let Some(addr) = self.advertise.get(&id) {
            args.extend(["--advertise".into(), addr.to_string()]);
        }
        args.extend(self.common_args());
        args
    }

    /// App server `id`'s flags.
    pub fn server_args(&self, id: u32) -> Vec<String> {
        let a = self.server(id);
        let mut args = self.config_args(&server_name(id));
        args.extend(["--id".into(), id.to_string()]);
        args.extend(self.common_args());
        args.extend([
            "--http-listen".into(),
            a.http.to_string(),
            "--admin-listen".into(),
            a.admin.to_string(),
            "--admin-token-file".into(),
            self.admin_token.display().to_string(),
            "--client-listen".into(),
            a.ws.to_string(),
        ]);
        if !self.spec.admin_senders.is_empty() {
            let list: Vec<String> = self.spec.admin_senders.iter().map(u64::to_string).collect();
            args.extend(["--admin-senders".into(), list.join(",")]);
        }
        let attach = self.spec.attach.get(&id).copied();
        if self.spec.name_exchange {
            let exchange = attach.unwrap_or(self.first_exchange());
            let quic = self.exchange(exchange).quic;
            args.extend(["--exchange".into(), format!("{exchange}@{quic}")]);
        } else if let Some(exchange) = attach {
            args.extend(["--prefer-exchange".into(), exchange.to_string()]);
        }
        if let Some(users) = self.spec.demo_users.get(&id) {
            let list: Vec<String> = users.iter().map(u64::to_string).collect();
            args.extend(["--demo-users".into(), list.join(",")]);
        }
        args
    }

    fn common_args(&self) -> Vec<String> {
        vec![
            "--database-file".into(),
            self.database_file().display().to_string(),
            "--certs".into(),
            self.certs.display().to_string(),
        ]
    }

    fn spawn(&mut self, bin: &str, name: &str, args: &[String]) -> anyhow::Result<Proc> {
        let cmd = self
            .spec
            .bins
            .daemon(bin, args, self.spec.log_filter.as_deref());
        let fresh = self.started.insert(name.to_owned());
        Proc::start(name, cmd, &self.log(name), fresh)
    }

    /// Start exchange `id`; its pid.
    pub fn start_exchange(&mut self, id: u32) -> anyhow::Result<u32> {
        if !self.exchange_addrs.contains_key(&id) {
            bail!("exchange {id} is not part of this deployment");
        }
        let args = self.exchange_args(id);
        let p = self.spawn(EXCHANGE_BIN, &exchange_name(id), &args)?;
        let pid = p.pid;
        self.exchange_procs.insert(id, p);
        Ok(pid)
    }

    /// Start app server `id`; its pid.
    pub fn start_server(&mut self, id: u32) -> anyhow::Result<u32> {
        if !self.addrs.contains_key(&id) {
            bail!("server {id} is not part of this deployment");
        }
        let args = self.server_args(id);
        let p = self.spawn(APPSERVER_BIN, &server_name(id), &args)?;
        let pid = p.pid;
        self.server_procs.insert(id, p);
        Ok(pid)
    }

    /// The registry, opened on first use.
    pub async fn registry(&mut self) -> anyhow::Result<Registry> {
        if self.registry.is_none() {
            let r = Registry::connect(&self.spec.database)
                .await
                .context("cannot open the deployment's registry")?;
            self.registry = Some(r);
        }
        Ok(self.registry.clone().expect("opened above"))
    }

    /// An error naming the first node that has exited, with its log's end.
    pub fn check(&mut self) -> anyhow::Result<()> {
        self.exchange_procs.values_mut().try_for_each(Proc::check)?;
        self.server_procs.values_mut().try_for_each(Proc::check)
    }

    /// Ask `ready` until it holds; an error if a node dies on the way or
    /// after [`START_WAIT`] (with `ready`'s last error, if any).
    async fn wait_until(
        &mut self,
        what: &str,
        mut ready: impl AsyncFnMut(&mut Deployment) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let mut last_error = None;
        let waited = crate::poll_until(START_WAIT, async || {
            self.check()?;
            match ready(self).await {
                Ok(done) => Ok(done),
                Err(e) => {
                    last_error = Some(format!("{e:#}"));
                    Ok(false)
                }
            }
        })
        .await;
        if let Err(e) = waited {
            if self.check().is_err() {
                return Err(e);
            }
            let cause = last_error
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            bail!(
                "timed out after {} s waiting for {what}{cause}; read the logs in {}",
                START_WAIT.as_secs(),
                self.logs.display()
            );
        }
        Ok(())
    }

    /// Until the registry shows exchanges `ids` up.
    pub async fn wait_exchanges(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        let what = format!("exchanges {ids:?} to register");
        self.wait_until(&what, async |d| {
            let servers = d.registry().await?.servers().await?;
            Ok(ids.iter().all(|id| {
                servers.iter().any(|s| {
                    s.id.0 == *id && s.role == Role::Exchange && s.state == ServerState::Up
                })
            }))
        })
        .await
    }

    /// Until app servers `ids` answer on their admin API and WebSocket
    /// endpoint and the registry shows them up (linked to the exchange).
    pub async fn wait_servers(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        let mut ends = Vec::new();
        for &id in ids {
            let a = self.server(id);
            let metrics = iim_http::client::Client::new(&a.http.to_string(), PROBE_WAIT)?;
            ends.push((metrics, a.ws));
        }
        let what = format!("app servers {ids:?} to answer and show up in the registry");
        self.wait_until(&what, async |d| {
            for (metrics, ws) in &ends {
                if metrics.health().await.is_err()
                    || tokio::net::TcpStream::connect(ws).await.is_err()
                {
                    return Ok(false);
                }
            }
            let servers = d.registry().await?.servers().await?;
            Ok(ids.iter().all(|id| {
                servers
                    .iter()
                    .any(|s| s.id.0 == *id && s.role == Role::App && s.state == ServerState::Up)
            }))
        })
        .await
    }

    /// SIGKILL app server `id`.
    pub async fn kill_server(&mut self, id: u32) {
        if let Some(mut p) = self.server_procs.remove(&id) {
            p.kill9().await;
        }
    }

    /// SIGKILL exchange `id`.
    pub async fn kill_exchange(&mut self, id: u32) {
        if let Some(mut p) = self.exchange_procs.remove(&id) {
            p.kill9().await;
        }
    }

    /// SIGTERM exchange `id` (it drains: its app servers move to another
    /// exchange), SIGKILL after `grace`.
    pub async fn stop_exchange(&mut self, id: u32, grace: Duration) -> Option<Stopped> {
        let mut p = self.exchange_procs.remove(&id)?;
        Some(p.terminate(grace).await)
    }

    /// SIGKILL every node.
    pub async fn kill_all(&mut self) {
        let exchanges = std::mem::take(&mut self.exchange_procs);
        let servers = std::mem::take(&mut self.server_procs);
        for (_, mut p) in exchanges.into_iter().chain(servers) {
            p.kill9().await;
        }
    }

    /// SIGTERM app server `id`, SIGKILL after `grace`.
    pub async fn stop_server(&mut self, id: u32, grace: Duration) -> Option<Stopped> {
        let mut p = self.server_procs.remove(&id)?;
        Some(p.terminate(grace).await)
    }

    /// SIGTERM to every node, the app servers first (so they drain against
    /// a live exchange), each given `grace` before SIGKILL.
    pub async fn stop_all(&mut self, grace: Duration) -> Vec<Stopped> {
        let apps = std::mem::take(&mut self.server_procs).into_values();
        let mut out = stop_together(apps, grace).await;
        let exchanges = std::mem::take(&mut self.exchange_procs).into_values();
        out.extend(stop_together(exchanges, grace).await);
        out
    }

    /// Process ids by node name, the exchanges first.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.exchange_procs
            .values()
            .chain(self.server_procs.values())
            .map(|p| (p.name.clone(), p.pid))
            .collect()
    }

    /// Whether any node is running.
    pub fn is_running(&self) -> bool {
        !self.exchange_procs.is_empty() || !self.server_procs.is_empty()
    }

    /// A client of app server `id` authenticated as `user`, with a token of
    /// the deployment's secret.
    pub async fn client(
        &self,
        id: u32,
        user: u64,
        device: &str,
    ) -> Result<ChatClient, ClientError> {
        let secret = self
            .spec
            .jwt_secret
            .as_deref()
            .unwrap_or(iim::token::DEV_SECRET);
        let token = iim::token::mint(secret.as_bytes(), UserId(user), Duration::from_secs(3_600));
        ChatClient::connect(self.ws(id), &token, device).await
    }
}

/// The name of exchange `id`'s process and log.
pub fn exchange_name(id: u32) -> String {
    format!("exchange-{id}")
}

/// The name of app server `id`'s process and log.
pub fn server_name(id: u32) -> String {
    format!("server-{id}")
}

async fn stop_together(procs: impl IntoIterator<Item = Proc>, grace: Duration) -> Vec<Stopped> {
    let mut set = tokio::task::JoinSet::new();
    for mut p in procs {
        set.spawn(async move { p.terminate(grace).await });
    }
    set.join_all().await
}

/// The fault tests' deployment: exchange 100 and app servers 1..=3 from a
/// fresh [`TestDb`] and a temporary directory, test timers, rate limits
/// lifted, the test secret, every node up. Dereferences to its
/// [`Deployment`].
pub struct TestDeployment {
    // Fields drop in order: the processes (which print their logs if the
    // test failed) before the directory holding those logs.
    dep: Deployment,
    pub db: TestDb,
    _dir: tempfile::TempDir,
}

impl TestDeployment {
    /// `users` (id, org) in the directory; the exchange's lease is
    /// `lease_secs`; `extra` is appended to every app server's TOML.
    pub async fn start(users: &[(u64, &str)], lease_secs: u64, extra: &str) -> TestDeployment {
        Self::start_on(TestDb::new().await, users, lease_secs, extra).await
    }

    /// [`TestDeployment::start`] on a given database.
    pub async fn start_on(
        db: TestDb,
        users: &[(u64, &str)],
        lease_secs: u64,
        extra: &str,
    ) -> TestDeployment {
        Self::start_shaped(db, users, lease_secs, extra, |_| {}).await
    }

    /// [`TestDeployment::start_on`] with the [`Spec`] reshaped by `shape`
    /// (more exchanges, other servers, who attaches where) before launch.
    pub async fn start_shaped(
        db: TestDb,
        users: &[(u64, &str)],
        lease_secs: u64,
        extra: &str,
        shape: impl FnOnce(&mut Spec),
    ) -> TestDeployment {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::new(&Registry::connect(db.url()).await.expect("registry"));
        for (u, org) in users {
            let user = User {
                id: UserId(*u),
                name: format!("user{u}"),
                org: org.to_string(),
            };
            store.add_user(&user).await.expect("add user");
        }
        let bins = Binaries::next_to_me("cargo build --workspace --bins").expect("binaries");
        let mut spec = Spec::new(dir.path(), db.url(), bins);
        let quic = "[quic]\nkeep_alive_ms = 200\nidle_timeout_ms = 1000\n";
        spec.exchange_toml = format!("lease_secs = {lease_secs}\nshutdown_grace_secs = 2\n{quic}");
        spec.server_toml = format!(
            "reconnect_min_ms = 50\nreconnect_max_ms = 300\n{extra}\n\
             [limits]\nrate_per_sec = 100000\nrate_burst = 100000\nmax_connections_per_ip = 100000\n{quic}"
        );
        spec.jwt_secret = Some(crate::JWT_SECRET.to_owned());
        spec.log_filter = std::env::var("RUST_LOG").ok();
        shape(&mut spec);
        let dep = Deployment::launch(spec).await.expect("deployment starts");
        TestDeployment { dep, db, _dir: dir }
    }
}

impl std::ops::Deref for TestDeployment {
    type Target = Deployment;
    fn deref(&self) -> &Deployment {
        &self.dep
    }
}

impl std::ops::DerefMut for TestDeployment {
    fn deref_mut(&mut self) -> &mut Deployment {
        &mut self.dep
    }
}
