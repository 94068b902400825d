//! The relay child (`quic-floor relay`): accepts the sender and the
//! receiver and copies bytes between their streams, no framing, no
//! decoding.

use crate::{
    HELLO_RECEIVER, HELLO_SENDER, Mode, RECEIVER_ID, RELAY_ID, RelayArgs, SENDER_ID, tuning,
};
use anyhow::{Context, Result, bail, ensure};
use bytes::{Bytes, BytesMut};
use iim::tls::{self, TlsMaterial};
use iim::types::ServerId;
use std::io::Write;

pub struct Side {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

pub async fn relay(a: RelayArgs) -> Result<()> {
    ensure!(
        a.listen.ip().is_loopback(),
        "relay: loopback only, not {}",
        a.listen
    );
    // Leave when the benchmark goes away (it holds our stdin open).
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let m = TlsMaterial::load(&tls::dev::exchange_files(&a.certs, ServerId(RELAY_ID)))?;
    let tuning = tuning(a.max_udp_payload)?;
    let server = tls::quic_server_config(&m, tuning.transport())?;
    let ep = tuning.endpoint(a.listen, Some(server), None)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", ep.local_addr()?.port())?;
        out.flush()?;
    }
    loop {
        let (role_a, side_a) = accept_side(&ep).await?;
        let (role_b, side_b) = accept_side(&ep).await?;
        let (sender, receiver) = match (role_a, role_b) {
            (HELLO_SENDER, HELLO_RECEIVER) => (side_a, side_b),
            (HELLO_RECEIVER, HELLO_SENDER) => (side_b, side_a),
            _ => bail!("relay: need one sender and one receiver"),
        };
        let mode = a.mode;
        tokio::spawn(async move {
            if let Err(e) = relay_pair(sender, receiver, mode).await {
                eprintln!("quic-floor relay: {e:#}");
            }
        });
    }
}

/// Accept one connection and its stream; the hello byte says which end it
/// is, and the certificate must match (`server-1.iim` / `server-2.iim`).
pub async fn accept_side(ep: &quinn::Endpoint) -> Result<(u8, Side)> {
    let incoming = ep.accept().await.context("relay endpoint closed")?;
    let conn = incoming.await.context("relay handshake")?;
    let (send, mut recv) = conn.accept_bi().await.context("relay accept_bi")?;
    let mut hello = [0u8; 1];
    recv.read_exact(&mut hello).await.context("relay hello")?;
    let id = match hello[0] {
        HELLO_SENDER => SENDER_ID,
        HELLO_RECEIVER => RECEIVER_ID,
        b => bail!("relay: unknown hello {b}"),
    };
    tls::verify_peer_name(&conn, &tls::server_name(ServerId(id)))?;
    Ok((hello[0], Side { conn, send, recv }))
}

pub async fn relay_pair(sender: Side, receiver: Side, mode: Mode) -> Result<()> {
    let Side {
        conn: s_conn,
        send: s_send,
        recv: s_recv,
    } = sender;
    let Side {
        conn: r_conn,
        send: r_send,
        recv: r_recv,
    } = receiver;
    let forward = tokio::spawn(pipe(s_recv, r_send, mode));
    let back = tokio::spawn(pipe(r_recv, s_send, Mode::Chunk));
    let forward = forward.await.context("forward pipe")?;
    let back = back.await.context("back pipe")?;
    forward.context("sender → receiver")?;
    back.context("receiver → sender")?;
    // The benchmark closes both connections once everything arrived.
    s_conn.closed().await;
    r_conn.closed().await;
    Ok(())
}

/// Copy `from` to `to` until `from` finishes, then finish `to`.
pub async fn pipe(
    mut from: quinn::RecvStream,
    mut to: quinn::SendStream,
    mode: Mode,
) -> Result<()> {
    let mut bufs = vec![Bytes::new(); 64];
    loop {
        match mode {
            Mode::Chunk => match from.read_chunk(usize::MAX, true).await? {
                Some(c) => to.write_chunk(c.bytes).await?,
                None => break,
            },
            Mode::Chunks => match from.read_chunks(&mut bufs).await? {
                Some(n) => to.write_all_chunks(&mut bufs[..n]).await?,
                None => break,
            },
            Mode::Coalesce => match from.read_chunks(&mut bufs).await? {
                Some(1) => to.write_chunk(std::mem::take(&mut bufs[0])).await?,
                Some(n) => {
                    let len = bufs[..n].iter().map(Bytes::len).sum();
                    let mut buf = BytesMut::with_capacity(len);
                    for c in &mut bufs[..n] {
                        buf.extend_from_slice(c);
                        *c = Bytes::new();
                    }
                    to.write_chunk(buf.freeze()).await?;
                }
                None => break,
            },
        }
    }
    to.finish()?;
    Ok(())
}
