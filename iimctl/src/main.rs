//! `iimctl`: the operator's command line for an iim deployment.
//!
//! Reads the shared registry (servers, sessions), writes development
//! certificates, sends test messages through an app server's loopback admin
//! API, and runs the local demo. It never talks QUIC and never changes a
//! registry row: the daemons own them.

mod chat;
mod demo;
mod directory;
mod view;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use iim::registry::Registry;
use iim::tls::{TlsError, dev};
use iim::types::{ServerId, UserId, now_ms};
use iim_http::admin::{SendRequest, SendResponse};
use iim_http::client::{Client, ClientError};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Operate an iim deployment: inspect the registry, issue development
/// certificates, send test messages, run the local demo.
#[derive(Parser, Debug)]
#[command(name = "iimctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a development CA and server certificates into a directory.
    ///
    /// A CA already in the directory is reused, so certificates issued
    /// earlier stay valid; leaf certificates are (re)issued every time.
    Certs(CertsArgs),
    /// Create or migrate the registry's schema (an account allowed DDL:
    /// the daemons' least-privilege accounts of sql/grants/ cannot).
    Migrate(MigrateArgs),
    /// List every server in the registry with its state and liveness.
    Servers(ServersArgs),
    /// List who is online: one row per client connection.
    Sessions(SessionsArgs),
    /// Send a text message through an app server's admin API and print the
    /// delivery report.
    ///
    /// Exits 0 when every targeted server reported `delivered` (and no local
    /// connection was missing), 1 otherwise, including when none of the
    /// users is connected anywhere.
    Send(SendArgs),
    /// Run the local demo: two exchanges and three app servers on this machine.
    ///
    /// Uses the binaries built next to iimctl, a fresh SQLite registry with
    /// the demo directory and generated development certificates; sends a
    /// message across the three servers and the two exchanges, kills one
    /// exchange and sends through the other, stops and restarts a server, shows users
    /// on different servers chatting with `iimctl chat`, then stops
    /// everything (unless --keep-running).
    Demo(DemoArgs),
    /// Manage the user directory: add and list users.
    Users(directory::UsersArgs),
    /// Manage friendships: add and list a user's friends.
    Friends(directory::FriendsArgs),
    /// Manage chat groups: create, add members, list.
    Groups(directory::GroupsArgs),
    /// Load the demo directory (users, friendships, a small and a large
    /// group); idempotent.
    DemoData(directory::DemoDataArgs),
    /// Chat from the terminal as a user: connect to an app server's client
    /// endpoint, print history and incoming messages, send what you type.
    ///
    /// `/to USER` or `/group GROUP` picks who you talk to; a plain line sends
    /// it; `/sync` fetches what you missed; `/quit` or the end of input
    /// leaves. Reconnects by itself and resends what was not acknowledged.
    Chat(chat::ChatArgs),
    /// Print a client token (HS256 JWT) for a user, to authenticate a
    /// WebSocket client against an app server's gateway.
    Token {
        /// The user id the token names.
        #[arg(value_name = "USER")]
        user: u64,
        /// The app servers' `auth.jwt_secret`.
        #[arg(
            long,
            env = "IIM_JWT_SECRET",
            hide_env_values = true,
            default_value = iim::token::DEV_SECRET
        )]
        secret: String,
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 86_400, value_name = "N")]
        ttl_secs: u64,
    },
}

#[derive(Args, Debug)]
struct CertsArgs {
    /// Directory for ca.pem, ca.key, exchange-<id>.pem/.key and
    /// server-<id>.pem/.key.
    #[arg(long, default_value = "certs/dev")]
    dir: PathBuf,
    /// Exchange ids to issue certificates for (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    exchange: Vec<u32>,
    /// App server ids to issue certificates for (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    servers: Vec<u32>,
    /// How many days each exchange and app server certificate is valid
    /// (never past the CA's own end).
    #[arg(long, default_value_t = 90, value_name = "DAYS")]
    leaf_days: u64,
    /// How many days a new CA is valid (a CA already in --dir keeps its own).
    #[arg(long, default_value_t = 3650, value_name = "DAYS")]
    ca_days: u64,
}

#[derive(Args, Debug)]
struct DatabaseArg {
    /// Registry database: `sqlite://FILE` or `mysql://USER:PASS@HOST:PORT/DB`
    /// (prefer --database-file or IIM_DATABASE for one with a password: a
    /// command line is visible to every user of the machine).
    #[arg(
        long,
        env = "IIM_DATABASE",
        hide_env_values = true,
        default_value = "sqlite://iim-dev.db",
        value_name = "URL"
    )]
    database: String,
    /// Read the database url from this file (one line, keep it mode 0600).
    #[arg(
        long,
        env = "IIM_DATABASE_FILE",
        conflicts_with = "database",
        value_name = "FILE"
    )]
    database_file: Option<PathBuf>,
}

impl DatabaseArg {
    /// A url given directly.
    pub(crate) fn url(url: &str) -> DatabaseArg {
        DatabaseArg {
            database: url.to_owned(),
            database_file: None,
        }
    }

    /// The database url: from --database-file if given, else --database.
    pub(crate) fn resolve(&self) -> anyhow::Result<String> {
        match &self.database_file {
            Some(path) => Ok(iim::registry::read_url_file(path)?),
            None => Ok(self.database.clone()),
        }
    }
}

#[derive(Args, Debug)]
struct MigrateArgs {
    #[command(flatten)]
    db: DatabaseArg,
}

#[derive(Args, Debug)]
struct ServersArgs {
    #[command(flatten)]
    db: DatabaseArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SessionsArgs {
    #[command(flatten)]
    db: DatabaseArg,
    /// Only this user's sessions.
    #[arg(long, value_name = "ID")]
    user: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// The app server's admin API (its `admin.listen`), HOST:PORT.
    #[arg(
        long,
        alias = "server-http",
        default_value = "127.0.0.1:9301",
        value_name = "ADDR"
    )]
    admin: String,
    /// The file holding the admin API's bearer token (`admin.token_file`).
    #[arg(long, env = "IIM_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: PathBuf,
    /// Sending user, one of the app server's `admin.senders`; without it
    /// the message comes from the app server itself (user 0).
    #[arg(long, value_name = "ID", default_value_t = 0)]
    from: u64,
    /// Recipients (comma-separated user ids), on any server.
    #[arg(long, value_delimiter = ',', required = true, value_name = "IDS")]
    to: Vec<u64>,
    /// Message text.
    #[arg(long)]
    text: String,
    /// Give up waiting for the report after this many seconds (the app
    /// server itself reports `timed_out` after its `send_timeout_ms`).
    #[arg(long, default_value_t = 40, value_name = "SECS")]
    timeout: u64,
    /// Print the app server's JSON answer instead of a report.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Working directory: certs/, registry.db and logs/ go here.
    #[arg(long, default_value = ".local/demo")]
    dir: PathBuf,
    /// Leave the servers running at the end (until Ctrl-C) to chat from two
    /// terminals with `iimctl chat`, or try `iimctl send`.
    #[arg(long)]
    keep_running: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Quiet unless asked: iimctl's output is its report, not a log.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("iimctl: {e:#}");
            if let Some(hint) = hint(&e) {
                eprintln!("  hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Certs(a) => certs(a).map(|()| ExitCode::SUCCESS),
        Command::Migrate(a) => migrate(a).await.map(|()| ExitCode::SUCCESS),
        Command::Servers(a) => servers(a).await.map(|()| ExitCode::SUCCESS),
        Command::Sessions(a) => sessions(a).await.map(|()| ExitCode::SUCCESS),
        Command::Send(a) => send(a).await,
        Command::Chat(a) => chat::run(a).await,
        Command::Token {
            user,
            secret,
            ttl_secs,
        } => token(user, &secret, ttl_secs).map(|()| ExitCode::SUCCESS),
        Command::Users(a) => directory::users(a).await.map(|()| ExitCode::SUCCESS),
        Command::Friends(a) => directory::friends(a).await.map(|()| ExitCode::SUCCESS),
        Command::Groups(a) => directory::groups(a).await.map(|()| ExitCode::SUCCESS),
        Command::DemoData(a) => directory::demo_data(a).await.map(|()| ExitCode::SUCCESS),
        Command::Demo(a) => {
            demo::run(demo::Options {
                dir: a.dir,
                keep_running: a.keep_running,
            })
            .await
        }
    }
}

fn token(user: u64, secret: &str, ttl_secs: u64) -> anyhow::Result<()> {
    if user == 0 {
        bail!("user 0 is reserved");
    }
    if secret.is_empty() {
        bail!("the secret must not be empty");
    }
    if ttl_secs == 0 {
        bail!("--ttl-secs must be > 0");
    }
    let ttl = Duration::from_secs(ttl_secs);
    println!("{}", iim::token::mint(secret.as_bytes(), UserId(user), ttl));
    Ok(())
}

fn hint(e: &anyhow::Error) -> Option<String> {
    match e.downcast_ref::<TlsError>()? {
        TlsError::ExistingCa { dir, .. } => Some(format!(
            "move {0}/ca.pem and {0}/ca.key away to start a new CA \
             (certificates issued by the old one will no longer be trusted)",
            dir.display()
        )),
        _ => None,
    }
}

fn certs(a: CertsArgs) -> anyhow::Result<()> {
    if a.exchange.is_empty() && a.servers.is_empty() {
        bail!("nothing to issue: give --exchange IDS and/or --servers IDS");
    }
    if let Some(id) = a.exchange.iter().chain(&a.servers).find(|&&id| id == 0) {
        bail!("server id {id} is reserved");
    }
    if a.leaf_days == 0 || a.ca_days == 0 {
        bail!("--leaf-days and --ca-days must be > 0");
    }
    let days = |n: u64| Duration::from_secs(n.saturating_mul(86_400));
    let lifetimes = dev::Lifetimes {
        ca: days(a.ca_days),
        leaf: days(a.leaf_days),
    };
    let (ca, written) = write_certs(&a.dir, &a.exchange, &a.servers, lifetimes)?;
    println!("{ca}");
    for path in &written {
        println!("  wrote {}", path.display());
    }
    // When each certificate (and a reused CA) stops being valid.
    let ca_path = a.dir.join("ca.pem");
    let mut pems: Vec<&Path> = written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        .map(PathBuf::as_path)
        .collect();
    if !written.contains(&ca_path) {
        pems.insert(0, &ca_path);
    }
    let now = iim::tls::now_unix();
    for path in pems {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let end = iim::tls::not_after(&pem, path)?;
        println!("{}", expiry_line(path, end, now));
    }
    Ok(())
}

/// "  <file> expires <UTC time> (in N days)".
fn expiry_line(path: &Path, not_after: i64, now: i64) -> String {
    let left = not_after - now;
    let when = if left <= 0 {
        "EXPIRED".to_owned()
    } else {
        format!("in {} days", left / 86_400)
    };
    format!(
        "  {} expires {} ({when})",
        path.display(),
        view::utc(not_after.saturating_mul(1000))
    )
}

/// Writes development certificates. Returns a line saying whether the CA
/// is new or reused, and the files written.
fn write_certs(
    dir: &Path,
    exchanges: &[u32],
    servers: &[u32],
    lifetimes: dev::Lifetimes,
) -> anyhow::Result<(String, Vec<PathBuf>)> {
    let ids = |v: &[u32]| v.iter().map(|&i| ServerId(i)).collect::<Vec<_>>();
    let written = dev::write_dev_certs_with(dir, &ids(exchanges), &ids(servers), lifetimes)?;
    Ok((ca_line(dir, &written), written))
}

/// Whether the development CA in `dir` is new (among `written`) or reused.
pub(crate) fn ca_line(dir: &Path, written: &[PathBuf]) -> String {
    let ca = dir.join("ca.pem");
    if written.contains(&ca) {
        format!("created a new development CA: {}", ca.display())
    } else {
        format!("reusing the development CA in {}", ca.display())
    }
}

async fn servers(a: ServersArgs) -> anyhow::Result<()> {
    let registry = open_registry(&a.db.resolve()?).await?;
    let servers = registry.servers().await.context("cannot list servers")?;
    let links = registry
        .exchange_links()
        .await
        .context("cannot list the links between exchanges")?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view::servers_json(&servers, &links))?
        );
    } else {
        print!("{}", view::servers_table(&servers, now_ms()));
        let links = view::links_table(&servers, &links);
        if !links.is_empty() {
            print!("\n{links}");
        }
    }
    Ok(())
}

async fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    Registry::connect(&a.db.database)
        .await
        .with_context(|| format!("cannot migrate the registry {}", redact(&a.db.database)))?;
    println!("registry {}: schema up to date", redact(&a.db.database));
    Ok(())
}

async fn sessions(a: SessionsArgs) -> anyhow::Result<()> {
    let registry = open_registry(&a.db.resolve()?).await?;
    let sessions = match a.user {
        Some(u) => registry.sessions_of(&[UserId(u)]).await,
        None => registry.sessions().await,
    }
    .context("cannot list sessions")?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view::sessions_json(&sessions))?
        );
    } else {
        print!("{}", view::sessions_table(&sessions));
    }
    Ok(())
}

async fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(a.timeout.max(1));
    let req = SendRequest {
        from: a.from,
        to: a.to,
        text: a.text,
    };
    let token =
        iim_http::admin::read_token_file(&a.admin_token_file).map_err(anyhow::Error::msg)?;
    let client = Client::new(&a.admin, timeout)?.with_token(token);
    let report = if a.json {
        let raw = client.send_text(&req).await.map_err(refused)?;
        println!("{raw}");
        serde_json::from_str::<SendResponse>(&raw)?
    } else {
        let report = client.send(&req).await.map_err(refused)?;
        print!("{}", view::render_report(&report));
        report
    };
    Ok(exit_code(report.all_delivered()))
}

/// A refusal says so; other failures (unreachable, no answer) speak for
/// themselves.
pub(crate) fn refused(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Status { .. } => {
            anyhow::Error::new(e).context("the app server refused the send")
        }
        e => e.into(),
    }
}

fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Opens the registry for reading. A SQLite file that does not exist is an
/// error here (connecting would create an empty one and list nothing).
pub(crate) async fn open_registry(url: &str) -> anyhow::Result<Registry> {
    if let Some(path) = sqlite_file(url)
        && !path.exists()
    {
        bail!(
            "registry {} does not exist; pass --database URL or set IIM_DATABASE",
            path.display()
        );
    }
    Registry::connect(url)
        .await
        .with_context(|| format!("cannot open the registry {}", redact(url)))
}

/// The file a `sqlite:` url names, unless it is an in-memory database.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?.trim_start_matches("//");
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || params.contains("mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// The url without its password, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_files() {
        assert_eq!(
            sqlite_file("sqlite://iim-dev.db"),
            Some("iim-dev.db".into())
        );
        assert_eq!(
            sqlite_file("sqlite:///tmp/x/registry.db?mode=rwc"),
            Some("/tmp/x/registry.db".into())
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("mysql://u:p@h/db"), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("mysql://iim:secret@127.0.0.1:3306/iim"),
            "mysql://iim:***@127.0.0.1:3306/iim"
        );
        assert_eq!(redact("sqlite://a.db"), "sqlite://a.db");
    }

    #[test]
    fn expiry_lines_name_the_time_and_the_days_left() {
        let now = 1_700_000_000;
        assert_eq!(
            expiry_line(Path::new("d/server-1.pem"), now + 90 * 86_400 + 5, now),
            "  d/server-1.pem expires 2024-02-12T22:13:25Z (in 90 days)"
        );
        assert!(expiry_line(Path::new("x.pem"), now, now).ends_with("(EXPIRED)"));
    }

    #[test]
    fn certs_honour_leaf_days() {
        let dir = tempfile::tempdir().unwrap();
        let cli = Cli::try_parse_from([
            "iimctl",
            "certs",
            "--dir",
            dir.path().to_str().unwrap(),
            "--servers",
            "1",
            "--leaf-days",
            "10",
        ])
        .unwrap();
        let Command::Certs(a) = cli.command else {
            panic!("not certs")
        };
        certs(a).unwrap();
        let pem = std::fs::read_to_string(dir.path().join("server-1.pem")).unwrap();
        let end = iim::tls::not_after(&pem, Path::new("server-1.pem")).unwrap();
        let expected = iim::tls::now_unix() + 10 * 86_400;
        assert!((end - expected).abs() < 60, "{end} vs {expected}");
    }

    #[tokio::test]
    async fn servers_reads_the_database_url_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("registry.db");
        let url = format!("sqlite://{}", db.display());
        Registry::connect(&url).await.unwrap();
        let file = dir.path().join("db-url");
        std::fs::write(&file, format!("{url}\n")).unwrap();
        let file = file.to_str().unwrap();
        let cli = Cli::try_parse_from(["iimctl", "servers", "--database-file", file]).unwrap();
        let Command::Servers(a) = cli.command else {
            panic!("not servers")
        };
        assert_eq!(a.db.resolve().unwrap(), url);
        servers(a).await.unwrap();
        // Both at once is refused rather than one silently ignored.
        let both = [
            "iimctl",
            "servers",
            "--database",
            &url,
            "--database-file",
            file,
        ];
        assert!(Cli::try_parse_from(both).is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "iimctl",
            "send",
            "--admin-token-file",
            "/etc/iim/admin.token",
            "--from",
            "1001",
            "--to",
            "2001,3001",
            "--text",
            "hi",
        ])
        .unwrap();
        let Command::Send(a) = cli.command else {
            panic!("not send")
        };
        assert_eq!(
            (a.admin.as_str(), a.to, a.from),
            ("127.0.0.1:9301", vec![2001, 3001], 1001)
        );
        assert_eq!(a.admin_token_file, Path::new("/etc/iim/admin.token"));
    }
}
