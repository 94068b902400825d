//! Exchange configuration: TOML with validated defaults.

use iim::quic::QuicTuning;
use iim::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This exchange's id; shares one id space with the app servers.
    pub id: u32,
    /// QUIC address app servers connect to.
    pub listen: SocketAddr,
    /// Address recorded in the registry for app servers to find this
    /// exchange; defaults to the bound `listen` address.
    pub advertise: Option<String>,
    /// `mysql://user:pass@host/db` or `sqlite://file.db`. A `mysql://`
    /// url to another host must say `ssl-mode` (best:
    /// `?ssl-mode=verify_identity&ssl-ca=/path/to/ca.pem`).
    pub database: String,
    /// A file holding the database url (one line; keep it mode 0600), so
    /// the password is in neither this config nor a command line. When
    /// set it replaces `database`.
    pub database_file: Option<PathBuf>,
    /// Prometheus `/metrics`; empty to disable.
    pub http_listen: Option<SocketAddr>,
    /// How long a server's link may be gone before it is marked down.
    pub lease_secs: u64,
    /// On SIGTERM: how long to keep delivering what is queued.
    pub shutdown_grace_secs: u64,
    /// Largest frame body accepted and sent.
    pub max_frame_bytes: usize,
    /// Time allowed from connection to a valid Register frame.
    pub handshake_timeout_ms: u64,
    /// Per target server: most 906s queued before new ones are refused
    /// (reported `overloaded`).
    pub queue_max_frames: usize,
    /// Per target server: most queued bytes.
    pub queue_max_bytes: usize,
    /// Most servers connected at once.
    pub max_links: usize,
    /// Most connections in their handshake (TLS, then the link's stream)
    /// at once; beyond, new ones are refused at once.
    pub max_handshakes: usize,
    /// With more handshakes than this in progress, a client whose address
    /// is not validated yet is first sent a QUIC Retry (it must echo a
    /// token, proving it receives at that address) before it costs a TLS
    /// handshake. 0: always.
    pub validate_addresses_above: usize,
    /// Runtime threads: 1 runs every task on one thread (no hand-offs
    /// between threads: the cheapest per delivery while one core keeps up);
    /// 0 starts one worker per core.
    pub worker_threads: usize,
    pub quic: QuicTuning,
    pub tls: TlsFiles,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: 100,
            listen: "127.0.0.1:7100".parse().expect("literal address"),
            advertise: None,
            database: "sqlite://iim-dev.db".into(),
            database_file: None,
            http_listen: Some("127.0.0.1:9100".parse().expect("literal address")),
            lease_secs: 2,
            shutdown_grace_secs: 5,
            max_frame_bytes: iim::wire::DEFAULT_MAX_FRAME,
            handshake_timeout_ms: 5_000,
            queue_max_frames: 65_536,
            queue_max_bytes: 64 << 20,
            max_links: 4_096,
            max_handshakes: 1_024,
            validate_addresses_above: 64,
            worker_threads: 1,
            quic: QuicTuning::default(),
            tls: TlsFiles {
                ca: PathBuf::from("certs/dev/ca.pem"),
                cert: PathBuf::from("certs/dev/exchange-100.pem"),
                key: PathBuf::from("certs/dev/exchange-100.key"),
            },
        }
    }
}

impl Config {
    /// The database url: read from `database_file` if set, else
    /// `database`.
    pub fn database_url(&self) -> Result<String, iim::registry::RegistryError> {
        match &self.database_file {
            Some(path) => iim::registry::read_url_file(path),
            None => Ok(self.database.clone()),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("id: 0 is reserved".into());
        }
        if self.database.trim().is_empty() {
            return Err("database: must not be empty".into());
        }
        if self.lease_secs == 0 || self.lease_secs > 3_600 {
            return Err(format!(
                "lease_secs: {} is outside 1..=3600",
                self.lease_secs
            ));
        }
        if !(4_096..=(64 << 20)).contains(&self.max_frame_bytes) {
            return Err(format!(
                "max_frame_bytes: {} is outside 4096..=67108864",
                self.max_frame_bytes
            ));
        }
        if self.queue_max_frames == 0 || self.queue_max_bytes < self.max_frame_bytes {
            return Err(
                "queue_max_frames must be > 0 and queue_max_bytes >= max_frame_bytes".into(),
            );
        }
        if self.worker_threads > 1_024 {
            return Err(format!(
                "worker_threads: {} is above 1024",
                self.worker_threads
            ));
        }
        if self.handshake_timeout_ms == 0 || self.max_links == 0 || self.max_handshakes == 0 {
            return Err("handshake_timeout_ms, max_links and max_handshakes must be > 0".into());
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
    fn database_file_replaces_database() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db-url");
        std::fs::write(&file, "mysql://iim:from-file@127.0.0.1/iim\n").unwrap();
        let c = Config {
            database_file: Some(file.clone()),
            ..Config::default()
        };
        c.validate().unwrap();
        assert_eq!(
            c.database_url().unwrap(),
            "mysql://iim:from-file@127.0.0.1/iim"
        );
        let text = toml::to_string_pretty(&c).unwrap();
        assert!(text.contains("database_file"), "{text}");
        let missing = Config {
            database_file: Some(dir.path().join("nope")),
            ..Config::default()
        };
        assert!(missing.database_url().is_err());
    }

    #[test]
    fn default_config_round_trips_and_validates() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), c);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(Config::from_toml("nonsense = 1").is_err());
        assert!(
            Config::from_toml("lease_secs = 0")
                .unwrap_err()
                .contains("lease_secs")
        );
        assert!(
            Config::from_toml("max_frame_bytes = 10")
                .unwrap_err()
                .contains("max_frame")
        );
        assert!(
            Config::from_toml("[quic]\nkeep_alive_ms = 5000\nidle_timeout_ms = 100")
                .unwrap_err()
                .contains("idle_timeout")
        );
        assert!(
            Config::from_toml("worker_threads = 5000")
                .unwrap_err()
                .contains("worker_threads")
        );
        assert!(
            Config::from_toml("[quic]\nmax_udp_payload = 1000")
                .unwrap_err()
                .contains("max_udp_payload")
        );
        let c = Config::from_toml("worker_threads = 0\n[quic]\nsocket_buffer_bytes = 0").unwrap();
        assert_eq!((c.worker_threads, c.quic.socket_buffer_bytes), (0, 0));
    }
}
