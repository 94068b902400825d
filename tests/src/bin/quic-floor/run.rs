//! One measured run of the floor (saturation, then latency at fixed
//! offered loads) and NATS-with-TLS beside it.

use crate::ends::{
    Counters, Relay, connect, machine_busy_ticks, read_acks, receive_frames, send_frames,
    start_relay, wait_received,
};
use crate::{BenchArgs, HEADER, HELLO_RECEIVER, HELLO_SENDER, Mode};
use anyhow::{Context, Result, ensure};
use bytes::{BufMut, BytesMut};
use iim::quic::QuicTuning;
use iim_tests::load::{self, Arrivals};
use iim_tests::nats::{self, Nats};
use iim_tests::procfs::CpuMeter;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub struct Setup {
    pub certs: PathBuf,
    pub sender: quinn::ClientConfig,
    pub receiver: quinn::ClientConfig,
    pub tuning: QuicTuning,
    pub tck: f64,
}

pub struct Row {
    pub mode: Mode,
    pub size: usize,
    pub run: usize,
    pub frames: u64,
    pub secs: f64,
    pub relay_us: f64,
    pub bench_us: f64,
    /// Cores busy with anything else on the machine during the run.
    pub others_cores: f64,
    /// NATS in the same topology right after this run (`--nats`).
    pub nats: Option<NatsRow>,
}

impl Row {
    pub fn fps(&self) -> f64 {
        self.frames as f64 / self.secs
    }
}

pub async fn one_run(s: &Setup, a: &BenchArgs, mode: Mode, size: usize, run: usize) -> Result<Row> {
    let mut relay = start_relay(&s.certs, mode, &s.tuning).await?;
    let sender = connect(&s.tuning, &s.sender, relay.addr, HELLO_SENDER).await?;
    let receiver = connect(&s.tuning, &s.receiver, relay.addr, HELLO_RECEIVER).await?;
    let c = Arc::new(Counters::default());
    let per_batch = ((a.batch_bytes / (HEADER + size)).max(1) as u64).min(a.window / 2);
    let (cmd_tx, cmd_rx) = mpsc::channel(1);
    let mut send_task = tokio::spawn(send_frames(
        sender.send,
        cmd_rx,
        size,
        a.window,
        per_batch,
        c.clone(),
    ));
    let ack_task = tokio::spawn(read_acks(sender.recv, a.ack, c.clone()));
    let mut recv_task = tokio::spawn(receive_frames(
        receiver.recv,
        receiver.send,
        size,
        a.ack.then_some(a.ack_every),
        c.clone(),
        None,
    ));

    let warmup = a.warmup.unwrap_or(a.frames / 10);
    if warmup > 0 {
        cmd_tx.send(warmup).await.context("sender gone")?;
        wait_received(&c, warmup, &mut send_task, &mut recv_task)
            .await
            .context("warm-up")?;
    }
    let relay_cpu = CpuMeter::start(relay.pid, s.tck);
    let own_cpu = CpuMeter::start(std::process::id(), s.tck);
    let machine = machine_busy_ticks()?;
    let start = Instant::now();
    cmd_tx.send(a.frames).await.context("sender gone")?;
    wait_received(&c, warmup + a.frames, &mut send_task, &mut recv_task).await?;
    let secs = start.elapsed().as_secs_f64();
    let relay_us = relay_cpu.micros();
    let bench_us = own_cpu.micros();
    let machine_us = machine_busy_ticks()?.saturating_sub(machine) as f64 * 1e6 / s.tck;
    let others_cores = (machine_us - relay_us - bench_us).max(0.0) / secs / 1e6;

    // Tear down in order: finish the sender's stream, let the relay pass
    // the end on, then close.
    drop(cmd_tx);
    send_task.await.context("sender task")??;
    let got = recv_task.await.context("receiver task")??;
    ack_task.await.context("ack task")??;
    if a.stats {
        for (name, end) in [("sender", &sender.conn), ("receiver", &receiver.conn)] {
            let st = end.stats();
            eprintln!(
                "  {name}: rtt {:?}, cwnd {} B, mtu {} B, sent {} / received {} UDP datagrams ({} / {} B), lost {} packets, congestion events {}",
                st.path.rtt,
                st.path.cwnd,
                st.path.current_mtu,
                st.udp_tx.datagrams,
                st.udp_rx.datagrams,
                st.udp_tx.bytes,
                st.udp_rx.bytes,
                st.path.lost_packets,
                st.path.congestion_events
            );
        }
    }
    ensure!(
        got == warmup + a.frames,
        "receiver counted {got} frames, expected {}",
        warmup + a.frames
    );
    let ends = [(&sender.conn, &sender.ep), (&receiver.conn, &receiver.ep)];
    close(ends, &mut relay).await;
    Ok(Row {
        mode,
        size,
        run,
        frames: a.frames,
        secs,
        relay_us: relay_us / a.frames as f64,
        bench_us: bench_us / a.frames as f64,
        others_cores,
        nats: None,
    })
}

/// A fixed-rate (open-loop) run: latency from each frame's intended send
/// time to its arrival at the receiver.
pub struct Latency {
    pub system: &'static str,
    pub size: usize,
    /// "25 %" of the floor's saturation, or "fixed" (`--latency-rates`).
    pub load: String,
    pub rate: f64,
    pub hist: hdrhistogram::Histogram<u64>,
    /// How late the sending thread itself was, per frame.
    pub late: hdrhistogram::Histogram<u64>,
    pub missing: u64,
}

/// (latency, sender lateness, frames or deliveries missing) of one run.
pub type LatencyRun = (
    hdrhistogram::Histogram<u64>,
    hdrhistogram::Histogram<u64>,
    u64,
);

impl Latency {
    /// The run's row, its headline figures printed as it finishes.
    pub fn logged(
        system: &'static str,
        size: usize,
        load: &str,
        rate: f64,
        run: LatencyRun,
    ) -> Latency {
        let (hist, late, missing) = run;
        eprintln!(
            "{system} latency size={size} load={load} ({rate:.0}/s): p50 {} p99 {} µs, sender late p99 {} µs, missing {missing}",
            pct(&hist, 0.5),
            pct(&hist, 0.99),
            pct(&late, 0.99)
        );
        Latency {
            system,
            size,
            load: load.to_owned(),
            rate,
            hist,
            late,
            missing,
        }
    }
}

/// The floor at `rate` frames/s for `secs`: a plain thread paces the
/// frames (`load::pace`) and writes every frame already due in one
/// `write_chunk`, as iim's writer writes what is queued; frame i carries i.
pub async fn floor_latency(
    s: &Setup,
    mode: Mode,
    size: usize,
    rate: f64,
    secs: f64,
) -> Result<(
    hdrhistogram::Histogram<u64>,
    hdrhistogram::Histogram<u64>,
    u64,
)> {
    ensure!(size >= 8, "latency runs need frames of at least 8 bytes");
    let count = (rate * secs).max(1.0) as u64;
    let mut relay = start_relay(&s.certs, mode, &s.tuning).await?;
    let sender = connect(&s.tuning, &s.sender, relay.addr, HELLO_SENDER).await?;
    let receiver = connect(&s.tuning, &s.receiver, relay.addr, HELLO_RECEIVER).await?;
    let c = Arc::new(Counters::default());
    let arrivals = Arc::new(Arrivals::default());
    let recv_task = tokio::spawn(receive_frames(
        receiver.recv,
        receiver.send,
        size,
        None,
        c.clone(),
        Some(arrivals.clone()),
    ));
    let ack_task = tokio::spawn(read_acks(sender.recv, false, c.clone()));
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now();
    arrivals.begin(start, rate)?;
    let mut send = sender.send;
    let pacer = std::thread::spawn(move || -> Result<hdrhistogram::Histogram<u64>> {
        let late = load::pace(start, rate, count, |range| {
            let mut buf = BytesMut::with_capacity(range.clone().count() * (HEADER + size));
            for j in range {
                buf.put_u32(size as u32);
                buf.put_u64_le(j);
                buf.put_bytes(b'x', size - 8);
            }
            handle.block_on(send.write_chunk(buf.freeze()))?;
            Ok(())
        })?;
        send.finish()?;
        Ok(late)
    });
    let late = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("floor sender panicked"))??;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.received.load(Ordering::Acquire) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let missing = count.saturating_sub(c.received.load(Ordering::Acquire));
    let hist = arrivals.end().context("arrival histogram")?;
    // The sender finished its stream: the relay passes the end on.
    let got = tokio::time::timeout(Duration::from_secs(10), recv_task)
        .await
        .context("receiver did not finish")???;
    ensure!(
        got == count,
        "receiver counted {got} frames, expected {count}"
    );
    ack_task.await.context("ack task")??;
    let ends = [(&sender.conn, &sender.ep), (&receiver.conn, &receiver.ep)];
    close(ends, &mut relay).await;
    Ok((hist, late, missing))
}

/// NATS-with-TLS, k = 1, the same frames and window: (frames/s,
/// nats-server CPU µs per message, this process's CPU µs per message).
pub async fn nats_run(n: &Nats, a: &BenchArgs, size: usize, tck: f64) -> Result<NatsRow> {
    let warmup = a.warmup.unwrap_or(a.frames / 10);
    let window = usize::try_from(a.window)?;
    if warmup > 0 {
        nats::saturate(n, 1, usize::try_from(warmup)?, size, window, tck).await?;
    }
    let own = CpuMeter::start(std::process::id(), tck);
    let (got, secs, server_us) =
        nats::saturate(n, 1, usize::try_from(a.frames)?, size, window, tck).await?;
    let bench_us = own.micros();
    ensure!(
        got == a.frames,
        "NATS: {got} of {} messages received",
        a.frames
    );
    Ok(NatsRow {
        fps: got as f64 / secs,
        server_us: server_us / got as f64,
        bench_us: bench_us / got as f64,
    })
}

pub struct NatsRow {
    pub fps: f64,
    pub server_us: f64,
    pub bench_us: f64,
}

pub fn pct(h: &hdrhistogram::Histogram<u64>, q: f64) -> u64 {
    h.value_at_quantile(q)
}

/// Close both ends, give their endpoints a moment to go idle, and kill the
/// relay.
async fn close(ends: [(&quinn::Connection, &quinn::Endpoint); 2], relay: &mut Relay) {
    for (conn, _) in ends {
        conn.close(0u32.into(), b"done");
    }
    for (_, ep) in ends {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    let _ = relay.child.start_kill();
    let _ = relay.child.wait().await;
}
