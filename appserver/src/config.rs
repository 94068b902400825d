//! App server configuration: TOML with validated defaults.

use iim::quic::QuicTuning;
use iim::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A fixed exchange to connect to, instead of finding one in the registry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExchangeTarget {
    pub id: u32,
    pub address: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This server's id; its certificate must name `server-<id>.iim`.
    pub id: u32,
    /// Address recorded in the registry; defaults to the HTTP address.
    pub advertise: Option<String>,
    /// `mysql://user:pass@host/db` or `sqlite://file.db`.
    pub database: String,
    /// The exchange to use. When absent, the lowest-id exchange that the
    /// registry shows up is used (looked up again on every reconnect).
    pub exchange: Option<ExchangeTarget>,
    /// `/metrics` and the loopback admin API; empty to disable.
    pub http_listen: Option<SocketAddr>,
    /// Largest frame body sent or accepted.
    pub max_frame_bytes: usize,
    /// A remote target without an outcome after this long reads `timed_out`.
    pub send_timeout_ms: u64,
    /// Most 905s awaiting their reports; `send` waits beyond this.
    pub max_outstanding: usize,
    pub heartbeat_ms: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Messages buffered per local connection before it is cut as too slow.
    pub connection_queue: usize,
    /// On SIGTERM: how long to wait for outstanding reports.
    pub shutdown_grace_secs: u64,
    /// Users given an in-process connection that logs what it receives
    /// (for the local demo; real clients arrive with the gateway).
    pub demo_users: Vec<u64>,
    pub quic: QuicTuning,
    pub tls: TlsFiles,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: 1,
            advertise: None,
            database: "sqlite://iim-dev.db".into(),
            exchange: None,
            http_listen: Some("127.0.0.1:9201".parse().expect("literal address")),
            max_frame_bytes: iim::wire::DEFAULT_MAX_FRAME,
            send_timeout_ms: 30_000,
            max_outstanding: 65_536,
            heartbeat_ms: 1_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 2_000,
            connection_queue: 1_024,
            shutdown_grace_secs: 5,
            demo_users: Vec::new(),
            quic: QuicTuning::default(),
            tls: TlsFiles {
                ca: PathBuf::from("certs/dev/ca.pem"),
                cert: PathBuf::from("certs/dev/server-1.pem"),
                key: PathBuf::from("certs/dev/server-1.key"),
            },
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("id: 0 is reserved".into());
        }
        if self.database.trim().is_empty() {
            return Err("database: must not be empty".into());
        }
        if !(4_096..=(64 << 20)).contains(&self.max_frame_bytes) {
            return Err(format!(
                "max_frame_bytes: {} is outside 4096..=67108864",
                self.max_frame_bytes
            ));
        }
        if self.send_timeout_ms == 0 || self.max_outstanding == 0 || self.connection_queue == 0 {
            return Err("send_timeout_ms, max_outstanding and connection_queue must be > 0".into());
        }
        if self.heartbeat_ms == 0 {
            return Err("heartbeat_ms must be > 0".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err("reconnect_min_ms must be > 0 and <= reconnect_max_ms".into());
        }
        if self
            .exchange
            .as_ref()
            .is_some_and(|e| e.id == self.id || e.id == 0)
        {
            return Err("exchange.id must differ from id and from 0".into());
        }
        self.quic.validate()
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_round_trips_and_validates() {
        let c = Config {
            exchange: Some(ExchangeTarget {
                id: 100,
                address: "127.0.0.1:7100".parse().unwrap(),
            }),
            demo_users: vec![1001],
            ..Default::default()
        };
        c.validate().unwrap();
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), c);
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        assert!(Config::from_toml("bogus = true").is_err());
        assert!(Config::from_toml("id = 0").unwrap_err().contains("id"));
        assert!(Config::from_toml("reconnect_min_ms = 10\nreconnect_max_ms = 5").is_err());
        assert!(
            Config::from_toml("[exchange]\nid = 1\naddress = \"127.0.0.1:1\"")
                .unwrap_err()
                .contains("exchange.id")
        );
    }
}
