//! Running iim for tests, benchmarks and the demo.
//!
//! - [`proc`]: the real binaries as child processes (find, start with a
//!   log, check, SIGTERM or SIGKILL, wait until listening).
//! - [`deploy`]: a whole deployment of them (development CA, configs, one
//!   exchange and N app servers, kill and restart any of them).
//! - [`nodes`]: exchange and app server nodes inside the calling process,
//!   over real QUIC + mTLS on loopback, and a test CA.
//! - [`client`]: a WebSocket client of the client gateway typed on the
//!   gateway's own frame types, and a model of a correct device.
//! - [`db`]: a fresh registry database per test (MariaDB or SQLite).
//! - [`proxy`]: a UDP proxy that can cut a QUIC link.
//! - [`eventually!`] and [`poll_until`]: waiting for a condition.
//!
//! The process tests, the benchmark binaries and `iimctl demo` / `iimctl
//! chat` all use it: one launcher and one client. It owns no behaviour of
//! iim itself; the admin API client it uses is `iim_http`'s.

pub mod client;
pub mod db;
pub mod deploy;
pub mod nodes;
pub mod proc;
pub mod proxy;

pub use db::TestDb;
pub use nodes::{
    CrashableExchange, EXCHANGE, JWT_SECRET, TestCa, appserver_config, exchange_config, init_logs,
    spawn_appserver, spawn_exchange, test_quic, token, wait_linked,
};
pub use proxy::UdpProxy;

use std::time::Duration;
use tokio::time::Instant;

/// How often [`poll_until`] (and so [`eventually!`]) asks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Ask `check` every [`POLL`] until it answers true; an error once
/// `within` has passed without that (or as soon as `check` fails).
pub async fn poll_until(
    within: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("not within {:.1} s", within.as_secs_f32());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Poll `$cond` (a boolean expression, which may `.await`) until it holds,
/// failing the test with `$what` after `$secs` seconds.
#[macro_export]
macro_rules! eventually {
    ($secs:expr, $what:expr, $cond:expr) => {{
        let within = std::time::Duration::from_secs_f64($secs as f64);
        if $crate::poll_until(within, async || Ok($cond))
            .await
            .is_err()
        {
            panic!("timed out after {}s waiting for: {}", $secs, $what);
        }
    }};
}
