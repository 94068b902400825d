//! Who may hold a client connection: at most `limits.max_connections` at
//! once, `limits.max_connections_per_ip` from one address and
//! `limits.max_connections_per_user` of one user (an address is an IPv4
//! address or an IPv6 /64), and a connection must
//! finish its WebSocket upgrade within `limits.handshake_timeout_ms`.
//!
//! [`Gate`] wraps the TCP listener. A connection over the total or per-IP
//! cap is answered `503` and closed before HTTP is read; an admitted one
//! holds a [`Ticket`] inside its IO, so however it ends — upgrade refused,
//! client gone, server closing — its counts are given back when hyper drops
//! it. Until the handler marks it upgraded, reading from it fails once the
//! handshake deadline passes, which ends a connection that never sends (or
//! never finishes) its request. Per user, [`Admission::admit_user`] is
//! asked after `auth`.

use crate::codes::ConnLimit;
use crate::metrics::AppMetrics;
use iim::types::UserId;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// The answer to a connection over the total or per-IP cap.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
    content-type: text/plain\r\ncontent-length: 21\r\nretry-after: 5\r\n\r\ntoo many connections\n";

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_user: HashMap<UserId, usize>,
}

/// The gateway's connection counts and caps.
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    max_per_user: usize,
    counts: Mutex<Counts>,
    metrics: Arc<AppMetrics>,
}

impl Admission {
    pub fn new(
        max_total: usize,
        max_per_ip: usize,
        max_per_user: usize,
        metrics: Arc<AppMetrics>,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_ip,
            max_per_user,
            counts: Mutex::new(Counts::default()),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection from `ip`, or why not (counted).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, ConnLimit> {
        let ip = address_key(ip);
        let mut c = self.lock();
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        let refused = if c.total >= self.max_total {
            Some(ConnLimit::Total)
        } else if from_ip >= self.max_per_ip {
            Some(ConnLimit::PerIp)
        } else {
            None
        };
        if let Some(why) = refused {
            drop(c);
            self.metrics.conn_limits.inc(why.as_str());
            return Err(why);
        }
        c.total += 1;
        c.per_ip.insert(ip, from_ip + 1);
        Ok(Ticket {
            admission: self.clone(),
            ip,
        })
    }

    /// An authenticated connection of `user`, or why not (counted).
    pub fn admit_user(self: &Arc<Self>, user: UserId) -> Result<UserTicket, ConnLimit> {
        let mut c = self.lock();
        let n = c.per_user.entry(user).or_insert(0);
        if *n >= self.max_per_user {
            drop(c);
            self.metrics.conn_limits.inc(ConnLimit::PerUser.as_str());
            return Err(ConnLimit::PerUser);
        }
        *n += 1;
        Ok(UserTicket {
            admission: self.clone(),
            user,
        })
    }

    /// Connections held now: in total, and from `ip`.
    pub fn held(&self, ip: IpAddr) -> (usize, usize) {
        let ip = address_key(ip);
        let c = self.lock();
        (c.total, c.per_ip.get(&ip).copied().unwrap_or(0))
    }
}

/// What the per-address cap counts by: an IPv4 address (an IPv4-mapped
/// IPv6 one as IPv4), or an IPv6 /64 — one subscriber's network, which
/// holds more addresses than any cap could count.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(std::net::Ipv6Addr::from(o))
            }
        },
    }
}

/// One admitted connection; gives its counts back when dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// One authenticated connection of a user; given back when dropped.
pub struct UserTicket {
    admission: Arc<Admission>,
    user: UserId,
}

impl Drop for UserTicket {
    fn drop(&mut self) {
        let mut c = self.admission.lock();
        if let Some(n) = c.per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                c.per_user.remove(&self.user);
            }
        }
    }
}

/// The TCP listener of the gateway, with admission and the handshake
/// deadline.
pub struct Gate {
    listener: TcpListener,
    admission: Arc<Admission>,
    handshake: Duration,
}

impl Gate {
    pub fn new(listener: TcpListener, admission: Arc<Admission>, handshake: Duration) -> Gate {
        Gate {
            listener,
            admission,
            handshake,
        }
    }
}

impl axum::serve::Listener for Gate {
    type Io = GatedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GatedIo, SocketAddr) {
        loop {
            let (tcp, peer) = axum::serve::Listener::accept(&mut self.listener).await;
            match self.admission.admit(peer.ip()) {
                Ok(ticket) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        debug!(error = %e, "cannot set TCP_NODELAY on a client connection");
                    }
                    let io = GatedIo {
                        tcp,
                        upgraded: Arc::new(AtomicBool::new(false)),
                        deadline: Box::pin(tokio::time::sleep(self.handshake)),
                        metrics: self.admission.metrics.clone(),
                        _ticket: ticket,
                    };
                    return (io, peer);
                }
                Err(why) => {
                    debug!(%peer, reason = %why, "client connection refused");
                    // Best effort, never waiting: the socket is new, its
                    // send buffer empty.
                    let _ = tcp.try_write(BUSY);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An admitted client connection's socket: its [`Ticket`], and the
/// handshake deadline until it is upgraded.
pub struct GatedIo {
    tcp: TcpStream,
    upgraded: Arc<AtomicBool>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    metrics: Arc<AppMetrics>,
    _ticket: Ticket,
}

impl GatedIo {
    /// Set once the WebSocket upgrade is accepted: the deadline is off.
    pub fn upgraded_flag(&self) -> Arc<AtomicBool> {
        self.upgraded.clone()
    }
}

impl AsyncRead for GatedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.upgraded.load(Ordering::Relaxed) && self.deadline.as_mut().poll(cx).is_ready() {
            self.metrics
                .conn_limits
                .inc(ConnLimit::HandshakeTimeout.as_str());
            // Once only: the connection ends with this error.
            self.upgraded.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "WebSocket handshake not finished in time",
            )));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for GatedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// What the upgrade handler learns of its connection: the peer, and the
/// flag that turns the handshake deadline off.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub upgraded: Arc<AtomicBool>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Gate>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Gate>) -> Peer {
        Peer {
            addr: *stream.remote_addr(),
            upgraded: stream.io().upgraded_flag(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_counts_come_back_on_drop() {
        let a = Admission::new(3, 2, 1, Arc::new(AppMetrics::default()));
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = a.admit(ip1).unwrap();
        let t2 = a.admit(ip1).unwrap();
        assert_eq!(a.admit(ip1).err(), Some(ConnLimit::PerIp));
        let t3 = a.admit(ip2).unwrap();
        assert_eq!(a.admit(ip2).err(), Some(ConnLimit::Total));
        assert_eq!(a.held(ip1), (3, 2));
        drop(t1);
        assert_eq!(a.held(ip1), (2, 1));
        let _t4 = a.admit(ip1).unwrap();
        drop((t2, t3));
        assert_eq!(a.held(ip2), (1, 0));

        let u1 = a.admit_user(UserId(7)).unwrap();
        assert_eq!(a.admit_user(UserId(7)).err(), Some(ConnLimit::PerUser));
        let _u2 = a.admit_user(UserId(8)).unwrap();
        drop(u1);
        assert!(a.admit_user(UserId(7)).is_ok());
        assert_eq!(a.metrics.conn_limits.get("per_ip"), 1);
        assert_eq!(a.metrics.conn_limits.get("total"), 1);
        assert_eq!(a.metrics.conn_limits.get("per_user"), 1);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a = Admission::new(10, 1, 1, Arc::new(AppMetrics::default()));
        let _t = a.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let other_host_same_64 = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(a.admit(other_host_same_64).err(), Some(ConnLimit::PerIp));
        assert!(a.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
        let _v4 = a.admit("192.0.2.7".parse().unwrap()).unwrap();
        let mapped = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(a.admit(mapped).err(), Some(ConnLimit::PerIp));
    }
}
