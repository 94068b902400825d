//! A UDP relay between one QUIC client and a server, on loopback, that can
//! cut the link (drop every datagram both ways) and restore it. This is a
//! real network partition as QUIC sees it: nothing is closed, packets just
//! stop arriving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub struct UdpProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl UdpProxy {
    /// Relay datagrams arriving at the returned address to `upstream`.
    pub async fn start(upstream: SocketAddr) -> UdpProxy {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind proxy"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind proxy"));
        back.connect(upstream).await.expect("connect upstream");
        let addr = front.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        {
            let (front, back, cut, stop, client) = (
                front.clone(),
                back.clone(),
                cut.clone(),
                stop.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let (n, from) = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = front.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                    };
                    *client.lock().unwrap() = Some(from);
                    if !cut.load(Ordering::Relaxed) {
                        let _ = back.send(&buf[..n]).await;
                    }
                }
            });
        }
        {
            let (front, back, cut, stop, client) = (front, back, cut.clone(), stop.clone(), client);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let n = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = back.recv(&mut buf) => match r { Ok(n) => n, Err(_) => continue },
                    };
                    let to = *client.lock().unwrap();
                    if let Some(to) = to
                        && !cut.load(Ordering::Relaxed)
                    {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            });
        }
        UdpProxy { addr, cut, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drop every datagram from now on, both ways.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
