//! `iim-exchange`: parse flags, load config and TLS files, run until
//! SIGTERM/SIGINT, then drain.

use anyhow::Context;
use clap::Parser;
use iim_exchange::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: the relay allocates and frees
/// small buffers on several threads at once, where glibc's allocator spent
/// ~15–20 % of the CPU (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The iim exchange: relays 905 forward requests between app servers as
/// 906 deliveries over QUIC with mutual TLS.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML config file; missing keys take their defaults.
    #[arg(short, long, env = "IIM_EXCHANGE_CONFIG")]
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
    /// Override `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `advertise` (the address recorded in the registry).
    #[arg(long)]
    advertise: Option<String>,
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
    /// Override `lease_secs`.
    #[arg(long)]
    lease_secs: Option<u64>,
    /// Override `worker_threads` (1: one thread; 0: one per core).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Directory holding ca.pem and exchange-<id>.pem/.key (overrides `tls`).
    #[arg(long)]
    certs: Option<PathBuf>,
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
            eprintln!("iim-exchange: {e:#}");
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
    if let Some(v) = cli.listen {
        config.listen = v;
    }
    if let Some(v) = &cli.advertise {
        config.advertise = Some(v.clone());
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
    if let Some(v) = cli.lease_secs {
        config.lease_secs = v;
    }
    if let Some(v) = cli.worker_threads {
        config.worker_threads = v;
    }
    if let Some(dir) = &cli.certs {
        config.tls = iim::tls::dev::exchange_files(dir, iim::ServerId(config.id));
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    Ok(config)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load(&cli)?;
    let tls = iim::tls::TlsMaterial::load(&config.tls)?;
    let rt = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        0 => tokio::runtime::Runtime::new()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let handle = iim_exchange::start(config, tls, shutdown.clone()).await?;
        iim::telemetry::wait_for_signal().await;
        tracing::info!("signal received; draining");
        handle.shutdown();
        handle.stopped().await;
        Ok(())
    })
}
