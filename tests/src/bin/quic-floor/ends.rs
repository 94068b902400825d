//! The benchmark's side of the wire: starting the relay child, the two
//! ends and their streams, writing frames, counting them at the receiver,
//! and the machine's busy time.

use crate::{HEADER, Mode, PHASE_TIMEOUT, RELAY_ID};
use anyhow::{Context, Result, bail, ensure};
use bytes::{BufMut, Bytes, BytesMut};
use iim::quic::QuicTuning;
use iim::tls;
use iim::types::ServerId;
use iim_tests::load::Arrivals;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// Busy clock ticks of the whole machine (all CPUs: everything but idle
/// and iowait), from /proc/stat.
pub fn machine_busy_ticks() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
    let line = s.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().context("malformed /proc/stat"))
        .collect::<Result<_>>()?;
    ensure!(f.len() >= 5, "malformed /proc/stat");
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user.
    let total: u64 = f.iter().take(8).sum();
    Ok(total - f[3] - f[4])
}

pub struct Relay {
    pub child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
}

pub async fn start_relay(certs: &Path, mode: Mode, tuning: &QuicTuning) -> Result<Relay> {
    let exe = std::env::current_exe().context("current exe")?;
    let mut child = Command::new(&exe)
        .args(["relay", "--listen", "127.0.0.1:0", "--mode", &mode.name()])
        .arg(format!("--max-udp-payload={}", tuning.max_udp_payload))
        .arg("--certs")
        .arg(certs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} relay", exe.display()))?;
    let pid = child.id().context("relay pid")?;
    let out = child.stdout.take().context("relay stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(out).lines().next_line(),
    )
    .await
    .context("relay did not print its port")??
    .context("relay exited before printing its port")?;
    let port: u16 = line
        .trim()
        .parse()
        .with_context(|| format!("relay printed {line:?}, not a port"))?;
    Ok(Relay {
        child,
        pid,
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    })
}

/// One end: its own endpoint (as each app server has), a connection to the
/// relay and one bidirectional stream, announced with `hello`.
pub struct End {
    pub ep: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

pub async fn connect(
    tuning: &QuicTuning,
    cfg: &quinn::ClientConfig,
    relay: SocketAddr,
    hello: u8,
) -> Result<End> {
    let ep = tuning.endpoint(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), None, None)?;
    let conn = ep
        .connect_with(cfg.clone(), relay, &tls::exchange_name(ServerId(RELAY_ID)))?
        .await
        .context("connect to relay")?;
    let (mut send, recv) = conn.open_bi().await.context("open_bi")?;
    send.write_all(&[hello]).await.context("hello")?;
    Ok(End {
        ep,
        conn,
        send,
        recv,
    })
}

/// Progress shared by the sender, the receiver and the driver.
#[derive(Default)]
pub struct Counters {
    /// Frames counted by the receiver (cumulative).
    pub received: AtomicU64,
    /// Frames the sender knows were received (cumulative).
    pub acked: AtomicU64,
    /// The sender waits here for room in its window.
    pub room: Notify,
    /// The driver waits here for `received` to reach `target`.
    pub target: AtomicU64,
    pub done: Notify,
}

/// Frame counter over a byte stream of `[u32 len][len bytes]` frames;
/// for latency runs it also reads the number each frame carries in its
/// first 8 body bytes.
pub struct FrameCounter {
    pub size: usize,
    pub hdr: [u8; HEADER],
    pub hdr_len: usize,
    pub body_left: usize,
    /// The first bytes of the current frame's body (its number).
    pub num: [u8; 8],
    pub num_len: usize,
}

impl FrameCounter {
    pub fn new(size: usize) -> FrameCounter {
        FrameCounter {
            size,
            hdr: [0; HEADER],
            hdr_len: 0,
            body_left: 0,
            num: [0; 8],
            num_len: 0,
        }
    }

    /// Frames completed by `b`; each completed frame's number goes to
    /// `arrivals`, when given (frames of at least 8 bytes).
    pub fn feed(&mut self, mut b: &[u8], arrivals: Option<&Arrivals>) -> Result<u64> {
        let mut frames = 0;
        while !b.is_empty() {
            if self.body_left > 0 {
                let t = self.body_left.min(b.len());
                if arrivals.is_some() && self.num_len < 8 {
                    let n = (8 - self.num_len).min(t);
                    self.num[self.num_len..self.num_len + n].copy_from_slice(&b[..n]);
                    self.num_len += n;
                }
                self.body_left -= t;
                b = &b[t..];
                if self.body_left == 0 {
                    frames += 1;
                    if let Some(a) = arrivals
                        && self.num_len == 8
                    {
                        a.record(u64::from_le_bytes(self.num));
                    }
                    self.num_len = 0;
                }
            } else {
                let t = (HEADER - self.hdr_len).min(b.len());
                self.hdr[self.hdr_len..self.hdr_len + t].copy_from_slice(&b[..t]);
                self.hdr_len += t;
                b = &b[t..];
                if self.hdr_len == HEADER {
                    self.hdr_len = 0;
                    let len = u32::from_be_bytes(self.hdr) as usize;
                    ensure!(
                        len == self.size,
                        "receiver: frame of {len} bytes, expected {}",
                        self.size
                    );
                    self.body_left = len;
                }
            }
        }
        Ok(frames)
    }
}

/// The sender: for each command (a number of frames), write them in
/// batches of up to `per_batch` frames per `write_chunk`, never more than
/// `window` unacknowledged. Finishes the stream when the commands end.
pub async fn send_frames(
    mut send: quinn::SendStream,
    mut cmds: mpsc::Receiver<u64>,
    size: usize,
    window: u64,
    per_batch: u64,
    c: Arc<Counters>,
) -> Result<()> {
    let mut frame = BytesMut::with_capacity(HEADER + size);
    frame.put_u32(u32::try_from(size).context("frame size")?);
    frame.put_bytes(b'x', size);
    let mut sent = 0u64;
    while let Some(n) = cmds.recv().await {
        let end = sent + n;
        while sent < end {
            let need = per_batch.min(end - sent);
            let room = loop {
                let room = window.saturating_sub(sent - c.acked.load(Ordering::Acquire));
                if room >= need {
                    break room;
                }
                c.room.notified().await;
            };
            let k = room.min(per_batch).min(end - sent);
            let mut buf = BytesMut::with_capacity(k as usize * frame.len());
            for _ in 0..k {
                buf.extend_from_slice(&frame);
            }
            send.write_chunk(buf.freeze()).await?;
            sent += k;
        }
    }
    send.finish()?;
    Ok(())
}

/// The receiver: count frames; report the count in process (`ack_every`
/// None) or as 8-byte cumulative counts on its own stream. Returns the
/// frames counted when the relay finishes the stream.
pub async fn receive_frames(
    mut recv: quinn::RecvStream,
    mut send: quinn::SendStream,
    size: usize,
    ack_every: Option<u64>,
    c: Arc<Counters>,
    arrivals: Option<Arc<Arrivals>>,
) -> Result<u64> {
    let mut bufs = vec![Bytes::new(); 32];
    let mut counter = FrameCounter::new(size);
    let mut frames = 0u64;
    let mut reported = 0u64;
    while let Some(n) = recv.read_chunks(&mut bufs).await? {
        for b in &mut bufs[..n] {
            frames += counter.feed(b, arrivals.as_deref())?;
            *b = Bytes::new();
        }
        c.received.store(frames, Ordering::Release);
        match ack_every {
            None => {
                c.acked.store(frames, Ordering::Release);
                c.room.notify_one();
            }
            Some(every) => {
                if frames - reported >= every {
                    send.write_all(&frames.to_be_bytes()).await?;
                    reported = frames;
                }
            }
        }
        if frames >= c.target.load(Ordering::Acquire) {
            c.done.notify_one();
        }
    }
    send.finish()?;
    Ok(frames)
}

/// The sender's side of the return path: 8-byte cumulative counts (with
/// `--ack`; without, nothing arrives until the stream finishes).
pub async fn read_acks(mut recv: quinn::RecvStream, ack: bool, c: Arc<Counters>) -> Result<()> {
    let mut pending = BytesMut::new();
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        ensure!(ack, "sender: unexpected bytes on the return path");
        pending.extend_from_slice(&chunk.bytes);
        let whole = pending.len() / 8 * 8;
        if whole > 0 {
            let last = pending.split_to(whole);
            let count = u64::from_be_bytes(last[whole - 8..].try_into()?);
            c.acked.fetch_max(count, Ordering::AcqRel);
            c.room.notify_one();
        }
    }
    Ok(())
}

/// Wait until the receiver has counted `target` frames. The sender and
/// receiver tasks end only after the last phase, so either ending earlier
/// is a failure, reported with its error.
pub async fn wait_received(
    c: &Counters,
    target: u64,
    send_task: &mut JoinHandle<Result<()>>,
    recv_task: &mut JoinHandle<Result<u64>>,
) -> Result<()> {
    c.target.store(target, Ordering::Release);
    let deadline = tokio::time::sleep(PHASE_TIMEOUT);
    tokio::pin!(deadline);
    while c.received.load(Ordering::Acquire) < target {
        tokio::select! {
            _ = c.done.notified() => {}
            r = &mut *send_task => {
                r.context("sender task")??;
                bail!("sender stopped early");
            }
            r = &mut *recv_task => {
                let got = r.context("receiver task")??;
                bail!("receiver stopped early, after {got} of {target} frames");
            }
            _ = &mut deadline => bail!(
                "timed out: {} of {target} frames received",
                c.received.load(Ordering::Acquire)
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn frame(i: u64, size: usize) -> Vec<u8> {
        let mut f = (size as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&i.to_le_bytes());
        f.resize(HEADER + size, b'x');
        f
    }

    /// Frames split at every possible point still count once each, and
    /// each one's number reaches the arrivals (a latency run's histogram).
    #[test]
    fn counter_reads_numbers_across_chunk_boundaries() {
        let size = 20;
        let stream: Vec<u8> = (0..5).flat_map(|i| frame(i, size)).collect();
        for cut in 1..stream.len() {
            let arrivals = Arrivals::default();
            // One frame a second from 10 s ago: frame i is 10 - i s late.
            arrivals
                .begin(Instant::now() - Duration::from_secs(10), 1.0)
                .expect("histogram");
            let mut c = FrameCounter::new(size);
            let mut frames = 0;
            for part in stream.chunks(cut) {
                frames += c.feed(part, Some(&arrivals)).expect("valid frames");
            }
            assert_eq!(frames, 5, "cut every {cut} bytes");
            let h = arrivals.end().expect("run begun");
            assert_eq!(h.len(), 5, "cut every {cut} bytes");
            let secs = |v: u64| (v as f64 / 1e6).round() as u64;
            assert_eq!((secs(h.min()), secs(h.max())), (6, 10), "cut every {cut}");
        }
    }

    #[test]
    fn counter_refuses_a_frame_of_the_wrong_size() {
        let mut c = FrameCounter::new(20);
        assert!(c.feed(&frame(0, 21), None).is_err());
    }
}
