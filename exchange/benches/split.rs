//! Micro-benchmarks of the exchange's sans-IO cores: validate + split of a
//! 905 into k = 1, 4, 16 906s (with and without decoding the frame first),
//! and a `DeliveryQueue` push + poll_transmit (+ the ack that empties it).
//!
//! `cargo bench -p iim-exchange --bench split` (short measurement times).

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use iim::types::{Address, ChannelId, MessageId, ServerId, UserId};
use iim::wire::{
    self, DEFAULT_MAX_FRAME, Deliver906, Forward905, Frame, Message, ServerRow, Timing, UserRow,
};
use iim_exchange::queue::DeliveryQueue;
use iim_exchange::split::{self, SplitLimits};
use std::hint::black_box;
use std::time::Duration;

const EXCHANGE: ServerId = ServerId(100);
const ORIGIN: ServerId = ServerId(1);
const EPOCH: u64 = 3;

fn message(body: usize) -> Bytes {
    Message {
        id: MessageId {
            origin: ORIGIN,
            epoch: EPOCH,
            seq: 1,
        },
        source: Address::new(ORIGIN, UserId(1001)),
        target: Address::RECEIVER,
        kind: 1,
        timing: Timing {
            sent_at_ms: 1_700_000_000_000,
            ordering_key: 0,
        },
        body: Bytes::from(vec![b'x'; body]),
        nested: Vec::new(),
    }
    .encode()
}

fn forward(k: u32, body: usize) -> Forward905 {
    Forward905 {
        id: MessageId {
            origin: ORIGIN,
            epoch: EPOCH,
            seq: 1,
        },
        source: Address::new(ORIGIN, UserId(1001)),
        target: Address::new(EXCHANGE, UserId::NONE),
        rows: (0..k)
            .map(|i| ServerRow {
                server: ServerId(2 + i),
                via: EXCHANGE,
                seq: 1,
                users: vec![UserRow {
                    user: UserId(2000 + u64::from(i)),
                    channel: ChannelId(u64::from(i)),
                }],
            })
            .collect(),
        message: message(body),
    }
}

fn bench_split(c: &mut Criterion) {
    let limits = SplitLimits::default();
    let mut g = c.benchmark_group("split");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    for k in [1u32, 4, 16] {
        g.throughput(Throughput::Elements(u64::from(k)));
        // validate + split of an already decoded 905 (the 906s collected).
        g.bench_with_input(BenchmarkId::new("validate+split", k), &k, |b, &k| {
            let fwd = forward(k, 1024);
            b.iter(|| {
                let fwd = black_box(&fwd).clone();
                split::validate(&fwd, ORIGIN, EPOCH, EXCHANGE, &limits).unwrap();
                split::split(fwd).collect::<Vec<_>>()
            })
        });
        // What the exchange reader does per 905: decode the frame, then
        // validate + split.
        g.bench_with_input(BenchmarkId::new("decode+validate+split", k), &k, |b, &k| {
            let bytes = wire::encode_to_bytes(&Frame::Forward(forward(k, 1024)), DEFAULT_MAX_FRAME)
                .unwrap();
            b.iter(|| {
                let mut buf = BytesMut::from(&bytes[..]);
                let Some(Frame::Forward(fwd)) =
                    wire::decode(black_box(&mut buf), DEFAULT_MAX_FRAME).unwrap()
                else {
                    unreachable!("a 905")
                };
                split::validate(&fwd, ORIGIN, EPOCH, EXCHANGE, &limits).unwrap();
                split::split(fwd).collect::<Vec<_>>()
            })
        });
    }
    g.finish();
}

/// A 906 of message `id` for one user, as a target task queues it.
fn delivery(id: MessageId, msg: &Bytes) -> Deliver906 {
    Deliver906 {
        no: 0,
        id,
        seq: id.seq,
        users: vec![UserRow {
            user: UserId(2001),
            channel: ChannelId(7),
        }],
        message: msg.clone(),
    }
}

fn bench_queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    for body in [100usize, 1024] {
        // One 906 pushed (encoded once, as the target task does), handed
        // out by poll_transmit, then acknowledged.
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("push+poll+ack", body),
            &body,
            |b, &body| {
                let msg = message(body);
                let mut q = DeliveryQueue::new(65_536, 64 << 20, DEFAULT_MAX_FRAME);
                let mut id = MessageId {
                    origin: ORIGIN,
                    epoch: EPOCH,
                    seq: 0,
                };
                b.iter(|| {
                    id.seq += 1;
                    let no = q.push(delivery(id, &msg)).unwrap();
                    let t = q.poll_transmit(256 * 1024);
                    black_box(&t);
                    q.handle_ack(no).unwrap()
                })
            },
        );
        // A batch of 64 906s pushed, handed out in one poll_transmit (one
        // coalesced write), then acknowledged with one ack.
        g.throughput(Throughput::Elements(64));
        g.bench_with_input(
            BenchmarkId::new("push64+poll+ack", body),
            &body,
            |b, &body| {
                let msg = message(body);
                let mut q = DeliveryQueue::new(65_536, 64 << 20, DEFAULT_MAX_FRAME);
                let mut id = MessageId {
                    origin: ORIGIN,
                    epoch: EPOCH,
                    seq: 0,
                };
                b.iter(|| {
                    let mut last = 0;
                    for _ in 0..64 {
                        id.seq += 1;
                        last = q.push(delivery(id, &msg)).unwrap();
                    }
                    let t = q.poll_transmit(256 * 1024);
                    black_box(&t);
                    q.handle_ack(last).unwrap()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_split, bench_queue);
criterion_main!(benches);
