//! Codec micro-benchmarks: encode and decode of a 905 with 1 and 16 server
//! rows and 100 B / 1 KiB bodies (the message encoded inside, as
//! `Iim::submit` does), decode of a 906, and a report frame of 1 and 16
//! entries through the generic encoder and by hand.
//!
//! `cargo bench -p iim --bench codec` (short measurement times: a quick
//! look, not a lab measurement).

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use iim::types::{Address, ChannelId, MessageId, ServerId, UserId};
use iim::wire::{
    self, DEFAULT_MAX_FRAME, Deliver906, DeliveryStatus, Forward905, Frame, Message, Report,
    ReportEntry, ServerRow, Timing, UserRow,
};
use std::hint::black_box;
use std::time::Duration;

fn message(body: usize) -> Message {
    Message {
        id: MessageId {
            origin: ServerId(1),
            epoch: 3,
            seq: 123_456,
        },
        source: Address::new(ServerId(1), UserId(1001)),
        target: Address::RECEIVER,
        kind: 1,
        timing: Timing {
            sent_at_ms: 1_700_000_000_000,
            ordering_key: 42,
        },
        body: Bytes::from(vec![b'x'; body]),
        nested: Vec::new(),
    }
}

fn forward(rows: u32, body: usize) -> Frame {
    let m = message(body);
    Frame::Forward(Forward905 {
        id: m.id,
        source: m.source,
        target: Address::new(ServerId(100), UserId::NONE),
        rows: (0..rows)
            .map(|i| ServerRow {
                server: ServerId(2 + i),
                via: ServerId(100),
                seq: 99_000 + u64::from(i),
                users: vec![UserRow {
                    user: UserId(2000 + u64::from(i)),
                    channel: ChannelId((3 << 40) | u64::from(i)),
                }],
            })
            .collect(),
        message: m.encode(),
    })
}

fn deliver(body: usize) -> Frame {
    let m = message(body);
    Frame::Deliver(Deliver906 {
        no: 77_777,
        id: m.id,
        seq: 99_001,
        users: vec![UserRow {
            user: UserId(2001),
            channel: ChannelId(3 << 40),
        }],
        message: m.encode(),
    })
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("905");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    for rows in [1u32, 16] {
        for body in [100usize, 1024] {
            let param = format!("rows={rows}/body={body}");
            g.throughput(Throughput::Elements(1));
            // What `Iim::submit` does: the message serialised straight into
            // the frame.
            g.bench_with_input(
                BenchmarkId::new("encode", &param),
                &(rows, body),
                |b, &(rows, body)| {
                    let Frame::Forward(f) = forward(rows, body) else {
                        unreachable!("forward() builds a 905")
                    };
                    let m = message(body);
                    b.iter(|| {
                        wire::encode_forward(
                            f.id,
                            f.source,
                            f.target,
                            black_box(&f.rows),
                            black_box(&m),
                            DEFAULT_MAX_FRAME,
                        )
                        .unwrap()
                    })
                },
            );
            // What the exchange's reader does per 905 (it never decodes the
            // message inside).
            g.bench_with_input(
                BenchmarkId::new("decode", &param),
                &(rows, body),
                |b, &(rows, body)| {
                    let bytes =
                        wire::encode_to_bytes(&forward(rows, body), DEFAULT_MAX_FRAME).unwrap();
                    b.iter(|| {
                        let mut buf = BytesMut::from(&bytes[..]);
                        wire::decode(black_box(&mut buf), DEFAULT_MAX_FRAME)
                            .unwrap()
                            .unwrap()
                    })
                },
            );
        }
    }
    g.finish();

    let mut g = c.benchmark_group("906");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    for body in [100usize, 1024] {
        g.throughput(Throughput::Elements(1));
        // What the target app server does per 906: the frame, then the
        // message inside it.
        g.bench_with_input(BenchmarkId::new("decode", body), &body, |b, &body| {
            let bytes = wire::encode_to_bytes(&deliver(body), DEFAULT_MAX_FRAME).unwrap();
            b.iter(|| {
                let mut buf = BytesMut::from(&bytes[..]);
                let f = wire::decode(black_box(&mut buf), DEFAULT_MAX_FRAME)
                    .unwrap()
                    .unwrap();
                match f {
                    Frame::Deliver(d) => Message::decode(&d.message).unwrap(),
                    _ => unreachable!("a 906"),
                }
            })
        });
    }
    g.finish();

    // What the exchange does per batch of outcomes for one origin: a report
    // frame, through the generic encoder (with the copy of the entries a
    // frame value needs) and written by hand.
    let mut g = c.benchmark_group("report");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    for n in [1usize, 16] {
        let entries: Vec<ReportEntry> = (0..n as u64)
            .map(|i| ReportEntry {
                id: MessageId {
                    origin: ServerId(1),
                    epoch: 1_733_400_000_000,
                    seq: 5_000_000 + i,
                },
                server: ServerId(2),
                status: DeliveryStatus::Delivered,
            })
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("generic", n), &entries, |b, entries| {
            b.iter(|| {
                let f = Frame::Report(Report {
                    entries: black_box(entries).to_vec(),
                });
                wire::encode_to_bytes(&f, DEFAULT_MAX_FRAME).unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("by_hand", n), &entries, |b, entries| {
            b.iter(|| wire::encode_report(black_box(entries), DEFAULT_MAX_FRAME).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
