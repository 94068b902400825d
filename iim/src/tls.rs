//! TLS identities and QUIC crypto configuration for iim.
//!
//! Owns the identity model: one deployment CA signs every certificate; app
//! server N holds the single DNS SAN `server-N.iim`, exchange N holds
//! `exchange-N.iim`. This module loads PEM material, builds the quinn
//! server (exchange, mutual TLS) and client (app server) configs with the
//! ring provider passed explicitly (never a process-wide default), checks a
//! peer's certificate against the server id it claims, and makes development
//! certificates ([`dev`]). It does not decide *when* a claim is checked: the
//! exchange calls [`verify_peer_name`] when a Register frame names an id.

use crate::types::ServerId;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// ALPN protocol id spoken by exchanges and app servers.
pub const ALPN: &[u8] = b"iim/1";

/// DNS name in app server `id`'s certificate: `server-{id}.iim`.
pub fn server_name(id: ServerId) -> String {
    format!("server-{id}.iim")
}

/// DNS name in exchange `id`'s certificate (and the SNI app servers send).
pub fn exchange_name(id: ServerId) -> String {
    format!("exchange-{id}.iim")
}

/// Where a node finds its PEM files; part of the TOML configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The deployment CA certificate, the only trust anchor.
    pub ca: PathBuf,
    /// This node's certificate (chain), leaf first.
    pub cert: PathBuf,
    /// This node's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// PEM material in memory (tests build nodes without touching disk).
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(thiserror::Error, Debug)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no certificate found in {path}")]
    NoCertificate { path: PathBuf },
    #[error("no private key found in {path}")]
    NoKey { path: PathBuf },
    #[error("malformed PEM in {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("invalid ca certificate in {path}")]
    InvalidCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("invalid tls configuration")]
    Rustls(#[source] rustls::Error),
    #[error("cannot build certificate verifier: {0}")]
    Verifier(String),
    #[error("cannot build quic crypto config: {0}")]
    Quic(String),
    #[error("cannot generate certificate")]
    Gen(#[source] rcgen::Error),
    #[error("bad certificate lifetime: {0}")]
    Lifetime(String),
    #[error("cannot reuse the ca in {dir}: {reason}")]
    ExistingCa { dir: PathBuf, reason: String },
}

impl TlsMaterial {
    /// Reads the three files and checks that each holds what it should, so a
    /// bad path is reported at startup naming the file.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Io {
                path: path.to_owned(),
                source,
            })
        };
        let m = TlsMaterial {
            ca_pem: read(&files.ca)?,
            cert_pem: read(&files.cert)?,
            key_pem: read(&files.key)?,
        };
        m.parse([&files.ca, &files.cert, &files.key])?;
        Ok(m)
    }

    /// Parses into (trust roots, own chain, own key); `names` label errors.
    fn parse(&self, names: [&Path; 3]) -> Result<Parsed, TlsError> {
        let [ca_name, cert_name, key_name] = names;
        let mut roots = RootCertStore::empty();
        for ca in certs(&self.ca_pem, ca_name)? {
            roots.add(ca).map_err(|source| TlsError::InvalidCa {
                path: ca_name.to_owned(),
                source,
            })?;
        }
        let chain = certs(&self.cert_pem, cert_name)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsError::NoKey {
                path: key_name.to_owned(),
            },
            e => TlsError::Pem {
                path: key_name.to_owned(),
                reason: e.to_string(),
            },
        })?;
        Ok(Parsed {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    fn parse_in_memory(&self) -> Result<Parsed, TlsError> {
        self.parse(["ca_pem", "cert_pem", "key_pem"].map(Path::new))
    }
}

struct Parsed {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn certs(pem: &str, name: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: name.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: name.to_owned(),
        });
    }
    Ok(certs)
}

/// How long before its end a certificate's expiry is warned about (at
/// start, in the log) by the daemons.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// When the first certificate in `pem` stops being valid, in Unix seconds.
/// `name` labels errors.
pub fn not_after(pem: &str, name: &Path) -> Result<i64, TlsError> {
    let first = certs(pem, name)?.swap_remove(0);
    let (_, cert) =
        x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| TlsError::Pem {
            path: name.to_owned(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
    Ok(cert.validity().not_after.timestamp())
}

impl TlsMaterial {
    /// When this node's own certificate (the leaf) expires, Unix seconds.
    pub fn leaf_not_after(&self) -> Result<i64, TlsError> {
        not_after(&self.cert_pem, Path::new("cert_pem"))
    }

    /// Logs when this node's certificate expires (a warning within
    /// [`EXPIRY_WARNING`], an error once past) and returns that time in
    /// Unix seconds, for the `*_certificate_expiry_seconds` gauge.
    pub fn log_expiry(&self, now_unix: i64) -> Result<i64, TlsError> {
        let not_after = self.leaf_not_after()?;
        let left = not_after - now_unix;
        let days = left.div_euclid(86_400);
        if left <= 0 {
            tracing::error!(
                not_after,
                "this node's certificate has expired; peers will refuse it: issue a new one"
            );
        } else if left < EXPIRY_WARNING.as_secs() as i64 {
            tracing::warn!(
                not_after,
                days_left = days,
                "this node's certificate expires soon: issue a new one and restart"
            );
        } else {
            tracing::info!(not_after, days_left = days, "certificate valid");
        }
        Ok(not_after)
    }
}

/// The current time in Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Exchange side: requires a client certificate chained to the CA.
pub fn quic_server_config(
    m: &TlsMaterial,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let p = m.parse_in_memory()?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(p.roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(p.chain, p.key)
        .map_err(TlsError::Rustls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// App server side: presents its certificate and trusts only the CA.
/// Connect with `exchange_name(id)` as the server name.
pub fn quic_client_config(
    m: &TlsMaterial,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let p = m.parse_in_memory()?;
    let provider = provider();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(p.roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(p.chain, p.key)
        .map_err(TlsError::Rustls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

#[derive(thiserror::Error, Debug)]
pub enum IdentityError {
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate is unusable: {0}")]
    BadCertificate(String),
    #[error("peer certificate is not valid for {expected}")]
    NameMismatch { expected: String },
}

/// Checks that the peer's end-entity certificate is valid for
/// `expected_dns_name`. The chain itself was verified during the handshake.
pub fn verify_peer_name(
    conn: &quinn::Connection,
    expected_dns_name: &str,
) -> Result<(), IdentityError> {
    let chain = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(IdentityError::NoPeerCertificate)?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let name =
        ServerName::try_from(expected_dns_name).map_err(|_| IdentityError::NameMismatch {
            expected: expected_dns_name.to_owned(),
        })?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| IdentityError::NameMismatch {
            expected: expected_dns_name.to_owned(),
        })
}

/// Development PKI: a throw-away CA and leaves made with rcgen.
pub mod dev {
    use super::{TlsError, TlsFiles, TlsMaterial, exchange_name, server_name};
    use crate::types::ServerId;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use std::path::{Path, PathBuf};
    use std::time::Duration;
    use time::OffsetDateTime;

    /// Common name of the CA that [`write_dev_certs`] creates.
    const DEV_CA_NAME: &str = "iim development CA";

    /// How long a leaf (exchange, app server) certificate is valid unless
    /// told otherwise: 90 days, so a leaked key stops working by itself.
    pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
    /// How long a new CA is valid unless told otherwise: 10 years.
    pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(3_650 * 86_400);
    /// Certificates start being valid this long before they are made, so a
    /// peer whose clock is a little behind accepts them.
    const BACKDATE: Duration = Duration::from_secs(3_600);

    /// How long what [`write_dev_certs_with`] issues stays valid.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Lifetimes {
        /// A new CA (a CA already in the directory keeps its own).
        pub ca: Duration,
        /// Each leaf; never past the CA's own end.
        pub leaf: Duration,
    }

    impl Default for Lifetimes {
        fn default() -> Self {
            Lifetimes {
                ca: DEFAULT_CA_LIFETIME,
                leaf: DEFAULT_LEAF_LIFETIME,
            }
        }
    }

    /// A development CA: its key and certificate.
    pub struct DevCa {
        issuer: Issuer<'static, KeyPair>,
        cert_pem: String,
        /// The CA's own end, Unix seconds: no leaf outlives it.
        not_after: i64,
    }

    /// `[now - BACKDATE, now + lifetime]`, the second capped at `cap` (Unix
    /// seconds).
    fn validity(
        lifetime: Duration,
        cap: Option<i64>,
    ) -> Result<(OffsetDateTime, OffsetDateTime), TlsError> {
        let bad = |what: &str| TlsError::Lifetime(what.to_owned());
        if lifetime.is_zero() {
            return Err(bad("a certificate lifetime must be > 0"));
        }
        let now = OffsetDateTime::now_utc();
        let mut end = time::Duration::try_from(lifetime)
            .ok()
            .and_then(|d| now.checked_add(d))
            .filter(|t| t.year() < 9999)
            .ok_or_else(|| bad("a certificate lifetime must end before the year 9999"))?;
        if let Some(cap) = cap
            && end.unix_timestamp() > cap
        {
            end = OffsetDateTime::from_unix_timestamp(cap)
                .map_err(|_| bad("the CA's end is out of range"))?;
        }
        let start = now - BACKDATE;
        if end <= now {
            return Err(bad(
                "the CA has expired: move ca.pem and ca.key away to start a new one",
            ));
        }
        Ok((start, end))
    }

    fn ca_params(common_name: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
    }

    impl DevCa {
        /// A new CA valid for [`DEFAULT_CA_LIFETIME`].
        pub fn new(common_name: &str) -> Result<DevCa, TlsError> {
            DevCa::with_lifetime(common_name, DEFAULT_CA_LIFETIME)
        }

        /// A new CA valid for `lifetime` from now.
        pub fn with_lifetime(common_name: &str, lifetime: Duration) -> Result<DevCa, TlsError> {
            let key = KeyPair::generate().map_err(TlsError::Gen)?;
            let mut params = ca_params(common_name);
            (params.not_before, params.not_after) = validity(lifetime, None)?;
            let not_after = params.not_after.unix_timestamp();
            let cert_pem = params.self_signed(&key).map_err(TlsError::Gen)?.pem();
            Ok(DevCa {
                issuer: Issuer::new(params, key),
                cert_pem,
                not_after,
            })
        }

        /// When this CA expires, Unix seconds.
        pub fn not_after(&self) -> i64 {
            self.not_after
        }

        /// Rebuilds a CA made by [`DevCa::new`] from its files. rcgen cannot
        /// parse certificates here, so the parameters are re-derived and the
        /// result is checked against `ca.pem` (same subject and public key).
        fn reuse(dir: &Path, cert_pem: String, key_pem: &str) -> Result<DevCa, TlsError> {
            let refuse = |reason: &str| TlsError::ExistingCa {
                dir: dir.to_owned(),
                reason: reason.to_owned(),
            };
            let key = KeyPair::from_pem(key_pem).map_err(|_| refuse("ca.key is not a key"))?;
            let params = ca_params(DEV_CA_NAME);
            let fresh = params.self_signed(&key).map_err(TlsError::Gen)?;
            let existing = super::certs(&cert_pem, &dir.join("ca.pem"))?;
            let same = match (
                webpki::anchor_from_trusted_cert(&existing[0]),
                webpki::anchor_from_trusted_cert(fresh.der()),
            ) {
                (Ok(a), Ok(b)) => {
                    a.subject == b.subject && a.subject_public_key_info == b.subject_public_key_info
                }
                _ => false,
            };
            if !same {
                return Err(refuse(
                    "ca.pem does not match ca.key or was not made by iim",
                ));
            }
            let not_after = super::not_after(&cert_pem, &dir.join("ca.pem"))?;
            Ok(DevCa {
                issuer: Issuer::new(params, key),
                cert_pem,
                not_after,
            })
        }

        pub fn ca_pem(&self) -> String {
            self.cert_pem.clone()
        }

        fn key_pem(&self) -> String {
            self.issuer.key().serialize_pem()
        }

        /// Issue a leaf for one DNS name (valid for client and server auth)
        /// for [`DEFAULT_LEAF_LIFETIME`], returning TlsMaterial (ca_pem =
        /// this CA).
        pub fn issue(&self, dns_name: &str) -> Result<TlsMaterial, TlsError> {
            self.issue_for(&[dns_name], DEFAULT_LEAF_LIFETIME)
        }

        /// Issue a leaf naming each of `names` (DNS names or IP addresses;
        /// the first is also its common name), valid for `lifetime` from now
        /// but never past this CA's own end.
        pub fn issue_for(
            &self,
            names: &[&str],
            lifetime: Duration,
        ) -> Result<TlsMaterial, TlsError> {
            let first = *names
                .first()
                .ok_or_else(|| TlsError::Lifetime("a certificate needs a name".to_owned()))?;
            let key = KeyPair::generate().map_err(TlsError::Gen)?;
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .map_err(TlsError::Gen)?;
            (params.not_before, params.not_after) = validity(lifetime, Some(self.not_after))?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, first);
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.use_authority_key_identifier_extension = true;
            let cert = params
                .signed_by(&key, &self.issuer)
                .map_err(TlsError::Gen)?;
            Ok(TlsMaterial {
                ca_pem: self.ca_pem(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        }
    }

    /// Writes ca.pem, ca.key, `exchange-{id}.pem/.key` and
    /// `server-{id}.pem/.key` into `dir`, reusing the CA already there if
    /// any. Leaves are (re)issued every time, valid for the default
    /// lifetimes ([`Lifetimes::default`]). Returns the written paths.
    pub fn write_dev_certs(
        dir: &Path,
        exchanges: &[ServerId],
        servers: &[ServerId],
    ) -> Result<Vec<PathBuf>, TlsError> {
        write_dev_certs_with(dir, exchanges, servers, Lifetimes::default())
    }

    /// [`write_dev_certs`] with the lifetimes given: `lifetimes.ca` for a
    /// new CA, `lifetimes.leaf` for each leaf.
    pub fn write_dev_certs_with(
        dir: &Path,
        exchanges: &[ServerId],
        servers: &[ServerId],
        lifetimes: Lifetimes,
    ) -> Result<Vec<PathBuf>, TlsError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (ca_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let mut written = Vec::new();
        let ca = match (ca_path.exists(), ca_key_path.exists()) {
            (true, true) => {
                let cert = std::fs::read_to_string(&ca_path).map_err(io(&ca_path))?;
                let key = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
                DevCa::reuse(dir, cert, &key)?
            }
            (false, false) => {
                let ca = DevCa::with_lifetime(DEV_CA_NAME, lifetimes.ca)?;
                write_file(&ca_key_path, &ca.key_pem(), true)?;
                write_file(&ca_path, &ca.ca_pem(), false)?;
                written.extend([ca_path, ca_key_path]);
                ca
            }
            _ => {
                return Err(TlsError::ExistingCa {
                    dir: dir.to_owned(),
                    reason: "only one of ca.pem and ca.key exists".to_owned(),
                });
            }
        };
        let leaves = exchanges
            .iter()
            .map(|&id| (exchange_name(id), exchange_files(dir, id)))
            .chain(
                servers
                    .iter()
                    .map(|&id| (server_name(id), server_files(dir, id))),
            );
        for (name, files) in leaves {
            let m = ca.issue_for(&[&name], lifetimes.leaf)?;
            write_file(&files.key, &m.key_pem, true)?;
            write_file(&files.cert, &m.cert_pem, false)?;
            written.extend([files.cert, files.key]);
        }
        Ok(written)
    }

    /// Writes through a temporary file and a rename so that a reader never
    /// sees half a file; private files are created with mode 0600.
    fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
        use std::io::Write;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let err = |source| TlsError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        // A stale temporary file would keep its old mode: start afresh.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        let mut file = options.open(&tmp).map_err(err)?;
        file.write_all(contents.as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Paths of exchange `id`'s files inside a [`write_dev_certs`] directory.
    pub fn exchange_files(dir: &Path, id: ServerId) -> TlsFiles {
        files(dir, &format!("exchange-{id}"))
    }

    /// Paths of app server `id`'s files inside a [`write_dev_certs`] directory.
    pub fn server_files(dir: &Path, id: ServerId) -> TlsFiles {
        files(dir, &format!("server-{id}"))
    }

    fn files(dir: &Path, stem: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}
