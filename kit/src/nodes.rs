//! Exchange and app server nodes inside the calling process, over real
//! QUIC + mTLS on loopback: a test CA, configs with fast timers, the nodes
//! themselves, and an exchange that can be crashed. The real binaries are [`crate::proc`]'s and [`crate::deploy`]'s.

use iim::tls::TlsMaterial;
use iim::tls::dev::DevCa;
use iim::types::ServerId;
use iim_appserver::{AppServerHandle, ExchangeTarget};
use iim_exchange::ExchangeHandle;
use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Exchange id used by the tests.
pub const EXCHANGE: ServerId = ServerId(100);

/// The client-token secret every test app server uses.
pub const JWT_SECRET: &str = "iim-test-secret-of-thirty-two-bytes!";

/// A client token for `user`, valid for an hour.
pub fn token(user: u64) -> String {
    iim::token::mint(
        JWT_SECRET.as_bytes(),
        iim::types::UserId(user),
        Duration::from_secs(3_600),
    )
}

/// Log to the test's output when `RUST_LOG` is set.
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

/// A deployment CA for one test.
pub struct TestCa(Arc<DevCa>);

impl TestCa {
    pub fn new() -> TestCa {
        TestCa(Arc::new(DevCa::new("iim test CA").expect("test CA")))
    }

    pub fn exchange(&self, id: ServerId) -> TlsMaterial {
        self.0
            .issue(&iim::tls::exchange_name(id))
            .expect("exchange cert")
    }

    pub fn server(&self, id: ServerId) -> TlsMaterial {
        self.0
            .issue(&iim::tls::server_name(id))
            .expect("server cert")
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// Fast timers for tests: links die after 1 s of silence.
pub fn test_quic() -> iim::quic::QuicTuning {
    iim::quic::QuicTuning {
        keep_alive_ms: 200,
        idle_timeout_ms: 1_000,
        ..Default::default()
    }
}

pub fn exchange_config(db: &str) -> iim_exchange::Config {
    iim_exchange::Config {
        id: EXCHANGE.0,
        listen: "127.0.0.1:0".parse().expect("addr"),
        database: db.to_string(),
        http_listen: None,
        lease_secs: 10,
        shutdown_grace_secs: 2,
        quic: test_quic(),
        ..Default::default()
    }
}

pub fn appserver_config(db: &str, id: u32, exchange: SocketAddr) -> iim_appserver::Config {
    iim_appserver::Config {
        id,
        database: db.to_string(),
        exchange: Some(ExchangeTarget {
            id: EXCHANGE.0,
            address: exchange,
        }),
        http_listen: None,
        client_listen: Some("127.0.0.1:0".parse().expect("addr")),
        auth: iim_appserver::config::AuthConfig {
            jwt_secret: JWT_SECRET.into(),
            ..Default::default()
        },
        limits: iim_appserver::config::ClientLimits {
            rate_per_sec: 100_000,
            rate_burst: 100_000,
            // Every test client connects from 127.0.0.1.
            max_connections_per_ip: 100_000,
            ..Default::default()
        },
        send_timeout_ms: 30_000,
        heartbeat_ms: 200,
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        connection_queue: 8_192,
        shutdown_grace_secs: 2,
        quic: test_quic(),
        ..Default::default()
    }
}

pub async fn spawn_exchange(
    ca: &TestCa,
    config: iim_exchange::Config,
) -> (ExchangeHandle, CancellationToken) {
    init_logs();
    let token = CancellationToken::new();
    let tls = ca.exchange(ServerId(config.id));
    let h = iim_exchange::start(config, tls, token.clone())
        .await
        .expect("exchange starts");
    (h, token)
}

pub async fn spawn_appserver(
    ca: &TestCa,
    config: iim_appserver::Config,
    plugins: Vec<Arc<dyn iim::Plugin>>,
) -> AppServerHandle {
    init_logs();
    let tls = ca.server(ServerId(config.id));
    iim_appserver::start(config, tls, plugins, CancellationToken::new())
        .await
        .expect("app server starts")
}

/// Wait until `server` is registered with the exchange.
pub async fn wait_linked(server: &AppServerHandle) {
    let mut w = server.link_watch();
    tokio::time::timeout(
        Duration::from_secs(20),
        w.wait_for(|s| s.exchange.is_some()),
    )
    .await
    .unwrap_or_else(|_| panic!("server {} never linked", server.id))
    .expect("link watch");
}

/// An exchange on a runtime of its own, so a test can crash it: dropping
/// the runtime stops every task mid-flight, with no drain and no goodbye on
/// the wire, and loses all of the exchange's in-memory state.
pub struct CrashableExchange {
    rt: Option<tokio::runtime::Runtime>,
    pub addr: SocketAddr,
    pub metrics: Arc<iim_exchange::ExchangeMetrics>,
    _handle: Option<ExchangeHandle>,
}

impl CrashableExchange {
    /// Start; retries the bind for a while (the port of a crashed
    /// predecessor is released asynchronously).
    pub fn start(ca: &TestCa, config: iim_exchange::Config) -> CrashableExchange {
        init_logs();
        let tls = ca.exchange(ServerId(config.id));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let handle = rt.block_on(async {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    match iim_exchange::start(config.clone(), tls.clone(), CancellationToken::new())
                        .await
                    {
                        Ok(h) => break h,
                        Err(e) if tokio::time::Instant::now() < deadline => {
                            tracing::debug!(error = %e, "exchange start retry");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("exchange starts: {e:#}"),
                    }
                }
            });
            CrashableExchange {
                addr: handle.addr,
                metrics: handle.metrics.clone(),
                _handle: Some(handle),
                rt: Some(rt),
            }
        })
        .join()
        .expect("exchange thread")
    }

    /// Kill it without warning.
    pub fn crash(mut self) {
        self._handle.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for CrashableExchange {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
