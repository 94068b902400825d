//! mTLS over real quinn endpoints on loopback: who may connect, who is
//! named what, and the development certificate files.

use anyhow::{Context, Result, bail};
use iim::tls::{
    self, IdentityError, TlsMaterial, dev::DevCa, exchange_name, quic_client_config,
    quic_server_config, server_name, verify_peer_name,
};
use iim::types::ServerId;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);
const EXCHANGE: ServerId = ServerId(100);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(quinn::TransportConfig::default())
}

fn loopback() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

fn exchange_endpoint(m: &TlsMaterial) -> Result<quinn::Endpoint> {
    let config = quic_server_config(m, transport())?;
    Ok(quinn::Endpoint::server(config, loopback())?)
}

fn client_endpoint(m: &TlsMaterial) -> Result<quinn::Endpoint> {
    let mut endpoint = quinn::Endpoint::client(loopback())?;
    endpoint.set_default_client_config(quic_client_config(m, transport())?);
    Ok(endpoint)
}

/// Accepts one connection and one bi stream, reads the request to its end
/// and answers "pong". Returns the connection for identity checks.
async fn serve_one(exchange: quinn::Endpoint) -> Result<quinn::Connection> {
    let incoming = exchange.accept().await.context("endpoint closed")?;
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let request = recv.read_to_end(1024).await?;
    assert_eq!(request, b"ping");
    send.write_all(b"pong").await?;
    send.finish()?;
    Ok(conn)
}

/// Connects, sends "ping" and reads the answer: the operation that shows a
/// refused client certificate under TLS 1.3.
async fn ping(client: &quinn::Endpoint, server: SocketAddr) -> Result<quinn::Connection> {
    let conn = client.connect(server, &exchange_name(EXCHANGE))?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"ping").await?;
    send.finish()?;
    let answer = recv.read_to_end(1024).await?;
    assert_eq!(answer, b"pong");
    Ok(conn)
}

/// Runs a full exchange round trip and returns the exchange-side connection.
async fn round_trip(exchange_m: &TlsMaterial, server_m: &TlsMaterial) -> Result<quinn::Connection> {
    let exchange = exchange_endpoint(exchange_m)?;
    let addr = exchange.local_addr()?;
    let server_task = tokio::spawn(serve_one(exchange));
    let client = client_endpoint(server_m)?;
    let client_conn = tokio::time::timeout(TIMEOUT, ping(&client, addr)).await??;
    let conn = tokio::time::timeout(TIMEOUT, server_task).await???;
    client_conn.close(0u32.into(), b"done");
    Ok(conn)
}

#[test]
fn certified_server_connects_and_is_named() -> Result<()> {
    runtime().block_on(async {
        let ca = DevCa::new("test ca")?;
        let exchange_m = ca.issue(&exchange_name(EXCHANGE))?;
        let server_m = ca.issue(&server_name(ServerId(7)))?;
        let conn = round_trip(&exchange_m, &server_m).await?;
        verify_peer_name(&conn, &server_name(ServerId(7)))?;
        assert_eq!(
            conn.handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol),
            Some(tls::ALPN.to_vec())
        );
        Ok(())
    })
}

#[test]
fn server_claiming_another_id_is_refused() -> Result<()> {
    runtime().block_on(async {
        let ca = DevCa::new("test ca")?;
        let exchange_m = ca.issue(&exchange_name(EXCHANGE))?;
        let server_m = ca.issue(&server_name(ServerId(7)))?;
        let conn = round_trip(&exchange_m, &server_m).await?;
        match verify_peer_name(&conn, &server_name(ServerId(8))) {
            Err(IdentityError::NameMismatch { expected }) => {
                assert_eq!(expected, "server-8.iim")
            }
            other => bail!("expected NameMismatch, got {other:?}"),
        }
        // An exchange name is not an app server name either.
        assert!(matches!(
            verify_peer_name(&conn, &exchange_name(ServerId(7))),
            Err(IdentityError::NameMismatch { .. })
        ));
        Ok(())
    })
}

#[test]
fn client_certificate_from_another_ca_is_refused() -> Result<()> {
    runtime().block_on(async {
        let ca = DevCa::new("test ca")?;
        let rogue = DevCa::new("rogue ca")?;
        let exchange_m = ca.issue(&exchange_name(EXCHANGE))?;
        // Trusts the real CA (so it accepts the exchange) but its own
        // certificate comes from the rogue CA.
        let mut server_m = rogue.issue(&server_name(ServerId(7)))?;
        server_m.ca_pem = ca.ca_pem();

        let exchange = exchange_endpoint(&exchange_m)?;
        let addr = exchange.local_addr()?;
        let server_task = tokio::spawn(serve_one(exchange));
        let client = client_endpoint(&server_m)?;

        let outcome = tokio::time::timeout(TIMEOUT, ping(&client, addr))
            .await
            .context("client hung instead of seeing the refusal")?;
        let err = match outcome {
            Ok(_) => bail!("client with a rogue certificate completed a round trip"),
            Err(err) => err,
        };
        // Under TLS 1.3 connect() may well succeed; the refusal then arrives
        // as the connection closing under the stream operation.
        let text = format!("{err:#}");
        assert!(
            err.downcast_ref::<quinn::ConnectionError>().is_some()
                || err.downcast_ref::<quinn::ReadToEndError>().is_some()
                || err.downcast_ref::<quinn::WriteError>().is_some(),
            "unexpected error kind: {text}"
        );
        assert!(text.contains("UnknownIssuer"), "unexpected error: {text}");

        // The exchange never gets a usable connection.
        match tokio::time::timeout(TIMEOUT, server_task).await?? {
            Ok(_) => bail!("exchange served a client with a rogue certificate"),
            Err(err) => {
                let text = format!("{err:#}");
                assert!(
                    err.downcast_ref::<quinn::ConnectionError>().is_some(),
                    "unexpected error kind: {text}"
                );
                assert!(text.contains("UnknownIssuer"), "unexpected error: {text}");
            }
        }
        Ok(())
    })
}

#[test]
fn client_trusting_another_ca_refuses_the_exchange() -> Result<()> {
    runtime().block_on(async {
        let ca = DevCa::new("test ca")?;
        let other = DevCa::new("other ca")?;
        let exchange_m = ca.issue(&exchange_name(EXCHANGE))?;
        let mut server_m = ca.issue(&server_name(ServerId(7)))?;
        server_m.ca_pem = other.ca_pem();

        let exchange = exchange_endpoint(&exchange_m)?;
        let addr = exchange.local_addr()?;
        let server_task = tokio::spawn(serve_one(exchange));
        let client = client_endpoint(&server_m)?;

        let connecting = client.connect(addr, &exchange_name(EXCHANGE))?;
        match tokio::time::timeout(TIMEOUT, connecting).await? {
            Ok(_) => bail!("client accepted an exchange from another CA"),
            Err(err) => {
                let text = err.to_string();
                assert!(
                    matches!(err, quinn::ConnectionError::TransportError(_)),
                    "unexpected error: {text}"
                );
                assert!(text.contains("UnknownIssuer"), "unexpected error: {text}");
            }
        }
        assert!(tokio::time::timeout(TIMEOUT, server_task).await??.is_err());
        Ok(())
    })
}

#[test]
fn client_refuses_exchange_with_wrong_name() -> Result<()> {
    runtime().block_on(async {
        let ca = DevCa::new("test ca")?;
        let exchange_m = ca.issue(&exchange_name(ServerId(101)))?;
        let server_m = ca.issue(&server_name(ServerId(7)))?;
        let exchange = exchange_endpoint(&exchange_m)?;
        let addr = exchange.local_addr()?;
        let _server_task = tokio::spawn(serve_one(exchange));
        let client = client_endpoint(&server_m)?;
        let connecting = client.connect(addr, &exchange_name(EXCHANGE))?;
        let outcome = tokio::time::timeout(TIMEOUT, connecting).await?;
        let err = outcome
            .err()
            .context("client accepted exchange-101 as exchange-100")?;
        assert!(
            err.to_string().contains("not valid for name"),
            "unexpected error: {err}"
        );
        Ok(())
    })
}

#[test]
fn dev_certs_are_written_reused_and_loadable() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("dev");
    let first = tls::dev::write_dev_certs(&certs, &[EXCHANGE], &[ServerId(1)])?;
    for name in [
        "ca.pem",
        "ca.key",
        "exchange-100.pem",
        "exchange-100.key",
        "server-1.pem",
        "server-1.key",
    ] {
        assert!(first.contains(&certs.join(name)), "{name} not reported");
        assert!(certs.join(name).is_file(), "{name} not written");
    }
    #[cfg(unix)]
    for name in ["ca.key", "exchange-100.key", "server-1.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(certs.join(name))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{name} mode {mode:o}");
    }
    let ca_before = std::fs::read(certs.join("ca.pem"))?;
    let key_before = std::fs::read(certs.join("ca.key"))?;

    let second = tls::dev::write_dev_certs(&certs, &[EXCHANGE], &[ServerId(1), ServerId(2)])?;
    assert!(!second.contains(&certs.join("ca.pem")));
    assert!(second.contains(&certs.join("server-2.pem")));
    assert_eq!(std::fs::read(certs.join("ca.pem"))?, ca_before);
    assert_eq!(std::fs::read(certs.join("ca.key"))?, key_before);

    let exchange_m = TlsMaterial::load(&tls::dev::exchange_files(&certs, EXCHANGE))?;
    let old_server = TlsMaterial::load(&tls::dev::server_files(&certs, ServerId(1)))?;
    let new_server = TlsMaterial::load(&tls::dev::server_files(&certs, ServerId(2)))?;

    runtime().block_on(async {
        let conn = round_trip(&exchange_m, &new_server).await?;
        verify_peer_name(&conn, &server_name(ServerId(2)))?;
        let conn = round_trip(&exchange_m, &old_server).await?;
        verify_peer_name(&conn, &server_name(ServerId(1)))?;
        Ok::<_, anyhow::Error>(())
    })?;

    // A missing file and a file without a key are reported by path.
    let mut files = tls::dev::server_files(&certs, ServerId(3));
    let err = TlsMaterial::load(&files).unwrap_err();
    assert!(matches!(err, tls::TlsError::Io { ref path, .. } if path == &files.cert));
    files = tls::dev::server_files(&certs, ServerId(1));
    files.key = files.cert.clone();
    let err = TlsMaterial::load(&files).unwrap_err();
    assert!(matches!(err, tls::TlsError::NoKey { ref path } if path == &files.key));
    assert!(err.to_string().contains("server-1.pem"), "{err}");
    // A certificate file whose PEM body is not base64 is reported by path
    // as malformed (not as a missing certificate).
    files = tls::dev::server_files(&certs, ServerId(1));
    let broken = certs.join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
    )?;
    files.cert = broken.clone();
    let err = TlsMaterial::load(&files).unwrap_err();
    assert!(
        matches!(err, tls::TlsError::Pem { ref path, .. } if path == &broken),
        "{err}"
    );

    // A foreign ca.pem next to ca.key is refused instead of silently replaced.
    std::fs::write(certs.join("ca.pem"), DevCa::new("foreign")?.ca_pem())?;
    let err = tls::dev::write_dev_certs(&certs, &[], &[ServerId(4)]).unwrap_err();
    assert!(matches!(err, tls::TlsError::ExistingCa { .. }), "{err}");
    Ok(())
}

#[test]
fn tls_files_config_rejects_unknown_fields() {
    let ok: tls::TlsFiles =
        toml::from_str("ca = \"a.pem\"\ncert = \"b.pem\"\nkey = \"b.key\"\n").expect("parses");
    assert_eq!(ok.key, std::path::PathBuf::from("b.key"));
    assert!(
        toml::from_str::<tls::TlsFiles>("ca = \"a\"\ncert = \"b\"\nkey = \"c\"\nx = 1\n").is_err()
    );
}

const DAY: i64 = 86_400;

/// `not_after` is `expected` give or take a minute (the test's own run).
fn assert_near(what: &str, not_after: i64, expected: i64) {
    assert!(
        (not_after - expected).abs() < 60,
        "{what}: not_after {not_after}, expected about {expected} ({} s off)",
        not_after - expected
    );
}

#[test]
fn dev_leaves_expire_in_90_days_and_the_ca_in_10_years() -> Result<()> {
    let dir = tempfile::tempdir()?;
    tls::dev::write_dev_certs(dir.path(), &[EXCHANGE], &[ServerId(1)])?;
    let now = tls::now_unix();
    let ca = std::fs::read_to_string(dir.path().join("ca.pem"))?;
    assert_near(
        "ca",
        tls::not_after(&ca, "ca.pem".as_ref())?,
        now + 3_650 * DAY,
    );
    for files in [
        tls::dev::exchange_files(dir.path(), EXCHANGE),
        tls::dev::server_files(dir.path(), ServerId(1)),
    ] {
        let m = TlsMaterial::load(&files)?;
        assert_near("leaf", m.leaf_not_after()?, now + 90 * DAY);
        assert_eq!(m.log_expiry(now)?, m.leaf_not_after()?);
    }
    Ok(())
}

#[test]
fn configured_lifetimes_are_honoured_and_no_leaf_outlives_its_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let lifetimes = tls::dev::Lifetimes {
        ca: Duration::from_secs(30 * DAY as u64),
        leaf: Duration::from_secs(7 * DAY as u64),
    };
    tls::dev::write_dev_certs_with(dir.path(), &[], &[ServerId(1)], lifetimes)?;
    let now = tls::now_unix();
    let leaf = TlsMaterial::load(&tls::dev::server_files(dir.path(), ServerId(1)))?;
    assert_near("7-day leaf", leaf.leaf_not_after()?, now + 7 * DAY);
    let ca = std::fs::read_to_string(dir.path().join("ca.pem"))?;
    let ca_end = tls::not_after(&ca, "ca.pem".as_ref())?;
    assert_near("30-day ca", ca_end, now + 30 * DAY);

    // A leaf asked to last a year from the reused 30-day CA ends with it.
    let long = tls::dev::Lifetimes {
        leaf: Duration::from_secs(365 * DAY as u64),
        ..lifetimes
    };
    tls::dev::write_dev_certs_with(dir.path(), &[], &[ServerId(2)], long)?;
    let leaf = TlsMaterial::load(&tls::dev::server_files(dir.path(), ServerId(2)))?;
    assert_eq!(leaf.leaf_not_after()?, ca_end);

    // Several names, IP addresses among them; a zero lifetime is refused.
    let ca = DevCa::with_lifetime("test ca", Duration::from_secs(DAY as u64))?;
    let m = ca.issue_for(&["localhost", "127.0.0.1"], Duration::from_secs(3_600))?;
    assert_near("1-hour leaf", m.leaf_not_after()?, tls::now_unix() + 3_600);
    let err = ca.issue_for(&["localhost"], Duration::ZERO).unwrap_err();
    assert!(matches!(err, tls::TlsError::Lifetime(_)), "{err}");
    Ok(())
}
