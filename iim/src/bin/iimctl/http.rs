//! A minimal HTTP/1.1 client for an app server's loopback admin API.
//!
//! One request per connection (`Connection: close`), the response read to
//! EOF and parsed: status line, `Content-Length` or chunked body. Nothing
//! else: no TLS, no redirects, no keep-alive. It is not a general client and
//! only ever talks to `/admin/*` on loopback.

use anyhow::{Context, anyhow, bail};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response accepted; the admin API answers in bytes, not megabytes.
const MAX_RESPONSE: u64 = 16 << 20;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

pub async fn get(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    request(addr, "GET", path, None, timeout).await
}

pub async fn post_json(
    addr: &str,
    path: &str,
    json: &str,
    timeout: Duration,
) -> anyhow::Result<Response> {
    request(addr, "POST", path, Some(json), timeout).await
}

async fn request(
    addr: &str,
    method: &str,
    path: &str,
    json: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    tokio::time::timeout(timeout, round_trip(addr, method, path, json))
        .await
        .map_err(|_| {
            anyhow!(
                "{method} http://{addr}{path}: no answer within {} s",
                timeout.as_secs_f32()
            )
        })?
        .with_context(|| format!("{method} http://{addr}{path}"))
}

async fn round_trip(
    addr: &str,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: iimctl\r\n"
    );
    if let Some(body) = json {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(json.unwrap_or_default().as_bytes());
    stream.write_all(&out).await.context("cannot send")?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut raw)
        .await
        .context("cannot read the response")?;
    if raw.len() as u64 > MAX_RESPONSE {
        bail!("response larger than {MAX_RESPONSE} bytes");
    }
    parse(&raw)
}

/// Parses a whole response as read up to the server's close.
fn parse(raw: &[u8]) -> anyhow::Result<Response> {
    let end = find(raw, b"\r\n\r\n").context("truncated response (no end of header)")?;
    let head = std::str::from_utf8(&raw[..end]).context("response header is not utf-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .with_context(|| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .with_context(|| format!("truncated body: {} of {n} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").context("truncated chunked body")?;
        let line = std::str::from_utf8(&data[..line_end]).context("bad chunk size")?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(hex, 16).with_context(|| format!("bad chunk size {hex:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).context("truncated chunked body")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).context("truncated chunked body")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_body() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        assert!(r.is_success());
    }

    #[test]
    fn chunked_body() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5\r\nregis\r\n4;x=y\r\ntry!\r\n0\r\n\r\n";
        let r = parse(raw).unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "registry!"));
        assert!(!r.is_success());
    }

    #[test]
    fn body_to_eof_without_length() {
        let r = parse(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "nope"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"").is_err());
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab").is_err());
    }
}
