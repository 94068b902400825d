//! `iim-appserver`: parse flags, load config and TLS files, run until
//! SIGTERM/SIGINT, then drain.

use anyhow::Context;
use clap::Parser;
use iim_appserver::{Config, ExchangeTarget};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: the relay allocates and frees
/// small buffers on several threads at once, where glibc's allocator spent
/// ~15–20 % of the CPU (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The iim app server: plugin host and local connections, linked to the
/// exchange so `iim::send` reaches users on every server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML config file; missing keys take their defaults.
    #[arg(short, long, env = "IIM_APPSERVER_CONFIG")]
    config: Option<PathBuf>,
    /// Print the default config and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Log one JSON object per line instead of human-readable text.
    #[arg(long, env = "IIM_LOG_JSON")]
    log_json: bool,
    /// Override `id`.
    #[arg(long)]
    id: Option<u32>,
    /// Override `database` (prefer --database-file: a command line is
    /// visible to every user of the machine).
    #[arg(long, env = "IIM_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// Override `database_file`: read the database url from this file.
    #[arg(long, env = "IIM_DATABASE_FILE", conflicts_with = "database")]
    database_file: Option<PathBuf>,
    /// Override `http_listen`.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Override `admin.listen` (the admin API).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Override `admin.token_file` (the admin API's bearer token).
    #[arg(long, env = "IIM_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Override `admin.senders` (users the admin API may send as).
    #[arg(long, value_delimiter = ',')]
    admin_senders: Vec<u64>,
    /// Override `client_listen` (the WebSocket endpoint for clients).
    #[arg(long)]
    client_listen: Option<SocketAddr>,
    /// Connect to this exchange (`ID@HOST:PORT`) instead of looking it up.
    #[arg(long, value_parser = parse_exchange)]
    exchange: Option<ExchangeTarget>,
    /// With several exchanges: attach to this one while it is up.
    #[arg(long)]
    prefer_exchange: Option<u32>,
    /// Directory holding ca.pem and server-<id>.pem/.key (overrides `tls`).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Give these users a logging demo connection (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    demo_users: Vec<u64>,
}

fn parse_exchange(s: &str) -> Result<ExchangeTarget, String> {
    let (id, addr) = s
        .split_once('@')
        .ok_or_else(|| format!("expected ID@HOST:PORT, got {s:?}"))?;
    Ok(ExchangeTarget {
        id: id.parse().map_err(|_| format!("bad exchange id {id:?}"))?,
        address: addr.parse().map_err(|_| format!("bad address {addr:?}"))?,
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!(
            "{}",
            toml::to_string_pretty(&Config::default()).expect("default config serialises")
        );
        return std::process::ExitCode::SUCCESS;
    }
    iim::telemetry::init_tracing(cli.log_json, "info");
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iim-appserver: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            toml::from_str::<Config>(&text)
                .with_context(|| format!("invalid config {}", p.display()))?
        }
        None => Config::default(),
    };
    if let Some(v) = cli.id {
        config.id = v;
    }
    if let Some(v) = &cli.database {
        config.database = v.clone();
        config.database_file = None;
    }
    if let Some(v) = &cli.database_file {
        config.database_file = Some(v.clone());
    }
    if let Some(v) = cli.http_listen {
        config.http_listen = Some(v);
    }
    if let Some(v) = cli.admin_listen {
        config.admin.listen = Some(v);
    }
    if let Some(v) = &cli.admin_token_file {
        config.admin.token_file = Some(v.clone());
    }
    if !cli.admin_senders.is_empty() {
        config.admin.senders = cli.admin_senders.clone();
    }
    if let Some(v) = cli.client_listen {
        config.client_listen = Some(v);
    }
    if let Some(v) = &cli.exchange {
        config.exchange = Some(v.clone());
    }
    if let Some(v) = cli.prefer_exchange {
        config.prefer_exchange = Some(v);
    }
    if let Some(dir) = &cli.certs {
        config.tls = iim::tls::dev::server_files(dir, iim::ServerId(config.id));
    }
    if !cli.demo_users.is_empty() {
        config.demo_users = cli.demo_users.clone();
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    Ok(config)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load(&cli)?;
    let tls = iim::tls::TlsMaterial::load(&config.tls)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let handle = iim_appserver::start(config, tls, Vec::new(), shutdown.clone()).await?;
        tokio::select! {
            _ = iim::telemetry::wait_for_signal() => tracing::info!("signal received; draining"),
            _ = handle.stop_requested() => {}
        }
        let fatal = handle.link().fatal;
        handle.stopped().await;
        match fatal {
            Some(reason) => anyhow::bail!("stopped: {reason}"),
            None => Ok(()),
        }
    })
}
