//! Calling a daemon's loopback HTTP: the admin API of an app server, and
//! any daemon's `/metrics`. Plain HTTP/1.1 over reqwest, no TLS: these
//! listeners stay on loopback.

use crate::METRICS_PATH;
use crate::admin::{HEALTH_PATH, SEND_PATH, SendRequest, SendResponse};
use std::time::Duration;

/// Largest answer read; the admin API and the metrics page answer in
/// kilobytes.
pub const MAX_BODY: usize = 16 << 20;

/// Why a call failed. `Status` is the server's own refusal (its body says
/// why); the others are about reaching it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: cannot connect: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: no answer within {secs} s")]
    Timeout { url: String, secs: f32 },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: answer larger than {MAX_BODY} bytes")]
    TooLarge { url: String },
    #[error("{url}: unexpected answer ({reason}): {body}")]
    Malformed {
        url: String,
        reason: String,
        body: String,
    },
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// A client of one daemon's HTTP listener.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Client {
    /// `addr` is the daemon's `http_listen` (`HOST:PORT`) or an `http://`
    /// URL; every call gives up after `timeout`.
    pub fn new(addr: &str, timeout: Duration) -> Result<Client, ClientError> {
        let base = if addr.contains("://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{addr}")
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("iim/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ClientError::Http {
                url: base.clone(),
                source,
            })?;
        Ok(Client {
            http,
            base,
            timeout,
            token: None,
        })
    }

    /// Send `token` as the bearer token of admin calls.
    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        self.token = Some(token.into());
        self
    }

    /// `http://HOST:PORT`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /admin/send`: the delivery report.
    pub async fn send(&self, req: &SendRequest) -> Result<SendResponse, ClientError> {
        let body = self.send_text(req).await?;
        serde_json::from_str(&body).map_err(|e| ClientError::Malformed {
            url: self.url(SEND_PATH),
            reason: e.to_string(),
            body,
        })
    }

    /// `POST /admin/send`: the report exactly as the server wrote it.
    pub async fn send_text(&self, req: &SendRequest) -> Result<String, ClientError> {
        let url = self.url(SEND_PATH);
        let mut call = self.http.post(&url).json(req);
        if let Some(t) = &self.token {
            call = call.bearer_auth(t);
        }
        let call = call.send();
        self.body(url, call).await
    }

    /// `GET /admin/health` answers with success.
    pub async fn health(&self) -> Result<(), ClientError> {
        let url = self.url(HEALTH_PATH);
        let call = self.http.get(&url).send();
        self.body(url, call).await.map(drop)
    }

    /// The Prometheus page.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = self.url(METRICS_PATH);
        let call = self.http.get(&url).send();
        self.body(url, call).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The body of a successful answer, read up to [`MAX_BODY`].
    async fn body(
        &self,
        url: String,
        call: impl Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> Result<String, ClientError> {
        let failed = |source: reqwest::Error, url: String| {
            if source.is_timeout() {
                ClientError::Timeout {
                    url,
                    secs: self.timeout.as_secs_f32(),
                }
            } else if source.is_connect() {
                ClientError::Unreachable { url, source }
            } else {
                ClientError::Http { url, source }
            }
        };
        let mut resp = call.await.map_err(|e| failed(e, url.clone()))?;
        let status = resp.status();
        let mut raw = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| failed(e, url.clone()))? {
            if raw.len() + chunk.len() > MAX_BODY {
                return Err(ClientError::TooLarge { url });
            }
            raw.extend_from_slice(&chunk);
        }
        let body = String::from_utf8_lossy(&raw).into_owned();
        if !status.is_success() {
            return Err(ClientError::Status {
                url,
                status: status.as_u16(),
                body: body.trim().to_owned(),
            });
        }
        Ok(body)
    }
}

/// The value of one series on a Prometheus page: `series` is the metric
/// name with its labels exactly as rendered (`name{label="v"}`), or a bare
/// name for an unlabelled metric.
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name.trim() == series).then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot server on loopback answering every connection with `raw`.
    async fn answering(raw: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(raw).await;
                let _ = s.shutdown().await;
            }
        });
        addr
    }

    fn client(addr: &str) -> Client {
        Client::new(addr, Duration::from_secs(5)).unwrap()
    }

    #[tokio::test]
    async fn content_length_body() {
        let addr = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        client(&addr).health().await.unwrap();
    }

    #[tokio::test]
    async fn a_chunked_refusal_keeps_its_body() {
        let addr = answering(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nregis\r\n4;x=y\r\ntry!\r\n0\r\n\r\n",
        )
        .await;
        match client(&addr).health().await {
            Err(ClientError::Status { status, body, .. }) => {
                assert_eq!((status, body.as_str()), (503, "registry!"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        for raw in [
            &b""[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab",
        ] {
            let addr = answering(raw).await;
            assert!(
                client(&addr).metrics().await.is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[tokio::test]
    async fn a_report_that_is_not_json_is_malformed() {
        let addr = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnope").await;
        let req = SendRequest {
            from: 1,
            to: vec![2],
            text: "hi".into(),
        };
        assert!(matches!(
            client(&addr).send(&req).await,
            Err(ClientError::Malformed { .. })
        ));
    }

    #[tokio::test]
    async fn nobody_listening_is_unreachable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        assert!(matches!(
            client(&addr).health().await,
            Err(ClientError::Unreachable { .. })
        ));
    }

    #[test]
    fn metric_values() {
        let page = "# HELP x\n# TYPE iim_a_total counter\niim_a_total 3\n\
                    iim_b_total{status=\"delivered\"} 7\niim_b_total{status=\"refused\"} 0\n";
        assert_eq!(metric_value(page, "iim_a_total"), Some(3.0));
        assert_eq!(
            metric_value(page, "iim_b_total{status=\"delivered\"}"),
            Some(7.0)
        );
        assert_eq!(metric_value(page, "iim_b_total"), None);
        assert_eq!(metric_value(page, "iim_c"), None);
    }
}
