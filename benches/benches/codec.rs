//! Codec throughput: decoding a client's stream, encoding deliveries, and fan-out encoding of
//! one message to 1,000 recipients (the relay's hot path).
//!
//! Run: `cargo bench -p pabal-benches --bench codec`. Each benchmark measures for 3 s after a
//! 1 s warm-up, so the suite finishes in well under a minute.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pabal_codec::{Ack, ClientFrame, Decoder, DeliverContext, Ping, Publish, Text};

/// The relay's deterministic generator, so every run benches the same stream.
use pabal_relay::rng::SplitMix64 as Rng;

/// Sender aliases per connection (the relay's default `connection.sender_aliases`).
const SENDER_ALIASES: usize = 64;

/// What a busy client sends: 90% PUBLISH of 10-200 bytes (chat lines; some with an ACK
/// riding along), 8% ACK of a few rooms, 2% PING. Returns the stream and its frame count.
fn client_stream(frames: usize) -> (Bytes, usize) {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut out = BytesMut::new();
    let mut msg_id = 0;
    for _ in 0..frames {
        let roll = rng.below(100);
        let frame = if roll < 90 {
            msg_id += 1;
            let len = 10 + rng.below(191) as usize;
            let ack = (rng.below(4) == 0).then(|| 1_000 + rng.below(5_000));
            ClientFrame::Publish(Publish {
                alias: rng.below(12) as u32,
                msg_id: Some(msg_id),
                ack,
                payload: Bytes::from(vec![b'x'; len]),
            })
        } else if roll < 98 {
            let pairs: Vec<(u32, u64)> = (0..1 + rng.below(4))
                .map(|a| (a as u32, 1_000 + rng.below(5_000)))
                .collect();
            ClientFrame::Ack(Ack::from_pairs(&pairs))
        } else {
            ClientFrame::Ping(Ping::default())
        };
        frame.encode(&mut out);
    }
    (out.freeze(), frames)
}

fn decode(c: &mut Criterion) {
    let (stream, frames) = client_stream(10_000);
    let decoder = Decoder::default();
    let run = |buf: BytesMut| {
        let mut buf = buf;
        let mut n = 0;
        while let Some(frame) = decoder.decode_client(&mut buf).expect("valid stream") {
            black_box(&frame);
            n += 1;
        }
        assert_eq!(n, frames);
    };
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(frames as u64));
    group.bench_function("client_stream_frames", |b| {
        b.iter_batched(|| BytesMut::from(&stream[..]), run, BatchSize::LargeInput)
    });
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("client_stream_bytes", |b| {
        b.iter_batched(|| BytesMut::from(&stream[..]), run, BatchSize::LargeInput)
    });
    group.finish();
}

/// DELIVERs to one connection: a group chat of 20 members, 20-200 byte messages arriving
/// 0.1-5 s apart, contiguous sequences (implicit on the wire).
fn encode_deliver(c: &mut Criterion) {
    const FRAMES: usize = 1_000;
    let mut rng = Rng::new(42);
    let senders: Vec<Text> = (0..20)
        .map(|i| Text::from(format!("user-{i:04}")))
        .collect();
    let msgs: Vec<(usize, u64, Bytes)> = (0..FRAMES)
        .map(|_| {
            let len = 20 + rng.below(181) as usize;
            (
                rng.below(20) as usize,
                100 + rng.below(4_900),
                Bytes::from(vec![b'm'; len]),
            )
        })
        .collect();
    let bytes: usize = {
        let mut ctx = DeliverContext::new(0);
        let mut out = BytesMut::new();
        for (i, (s, _, p)) in msgs.iter().enumerate() {
            let h = ctx.header(
                0,
                Some(i as u64 + 1),
                i as u64,
                &senders[*s],
                i as u64 * 1000,
                SENDER_ALIASES,
            );
            h.encode_prefix(p.len(), &mut out);
            out.extend_from_slice(p);
        }
        out.len()
    };
    let mut ctx = DeliverContext::new(0);
    let mut out = BytesMut::with_capacity(bytes * 2);
    let (mut seq, mut ts) = (0u64, 0u64);
    let mut run = || {
        out.clear();
        for (s, dt, payload) in &msgs {
            ts += dt;
            let header = ctx.header(0, Some(seq + 1), seq, &senders[*s], ts, SENDER_ALIASES);
            seq += 1;
            header.encode_prefix(payload.len(), &mut out);
            out.extend_from_slice(payload);
        }
        black_box(&out);
    };
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("deliver_frames", |b| b.iter(&mut run));
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("deliver_bytes", |b| b.iter(&mut run));
    group.finish();
}

const RECIPIENTS: usize = 1_000;

/// One connection of a fan-out: its own sender table and time base, its own buffers, and
/// its own alias and cursor for the room.
struct Recipient {
    ctx: DeliverContext,
    alias: u32,
    cursor: u64,
    out: BytesMut,
    queue: VecDeque<Bytes>,
}

fn recipients() -> Vec<Recipient> {
    (0..RECIPIENTS)
        .map(|i| Recipient {
            ctx: DeliverContext::new(1_767_225_600_000),
            alias: (i % 7) as u32,
            cursor: 0,
            out: BytesMut::with_capacity(4096),
            queue: VecDeque::with_capacity(64),
        })
        .collect()
}

/// Fan-out of one 32-byte message to 1,000 recipients: per recipient, a header from its own
/// `DeliverContext`, then `encode_prefix` and the payload copied into its own buffer (small
/// messages are cheaper to copy than to reference).
fn fanout_small(c: &mut Criterion) {
    let senders: Vec<Text> = (0..8).map(|i| Text::from(format!("user-{i}"))).collect();
    let payload = Bytes::from(vec![b'p'; 32]);
    let mut conns = recipients();
    let (mut seq, mut ts) = (0u64, 1_767_225_600_000u64);
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(RECIPIENTS as u64));
    group.bench_function("32B_x1000_copy", |b| {
        b.iter(|| {
            seq += 1;
            ts += 250;
            let sender = &senders[(seq % 8) as usize];
            for r in &mut conns {
                // The socket took last round's bytes.
                r.out.clear();
                let header = r
                    .ctx
                    .header(r.alias, Some(seq), r.cursor, sender, ts, SENDER_ALIASES);
                r.cursor = seq;
                header.encode_prefix(payload.len(), &mut r.out);
                r.out.extend_from_slice(&payload);
            }
            black_box(&conns);
        })
    });
    group.finish();
}

/// Fan-out of one 16 KiB message to 1,000 recipients without copying it: per recipient the
/// header goes into its own buffer, and the queue gets the header and a clone of the shared
/// payload (a reference-count increment).
fn fanout_large(c: &mut Criterion) {
    let senders: Vec<Text> = (0..8).map(|i| Text::from(format!("user-{i}"))).collect();
    let payload = Bytes::from(vec![b'P'; 16 * 1024]);
    let mut conns = recipients();
    let (mut seq, mut ts) = (0u64, 1_767_225_600_000u64);
    let mut round = |conns: &mut Vec<Recipient>| {
        seq += 1;
        ts += 250;
        let sender = &senders[(seq % 8) as usize];
        for r in conns.iter_mut() {
            // The socket took last round's frames.
            r.queue.clear();
            let header = r
                .ctx
                .header(r.alias, Some(seq), r.cursor, sender, ts, SENDER_ALIASES);
            r.cursor = seq;
            r.out.reserve(64);
            header.encode_prefix(payload.len(), &mut r.out);
            r.queue.push_back(r.out.split().freeze());
            r.queue.push_back(payload.clone());
        }
    };
    // The payload is never copied: every queue holds the one allocation.
    round(&mut conns);
    for r in &conns {
        assert_eq!(r.queue[1].as_ptr(), payload.as_ptr());
        assert_eq!(r.queue[1].len(), payload.len());
    }
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(RECIPIENTS as u64));
    group.bench_function("16KiB_x1000_shared", |b| {
        b.iter(|| {
            round(&mut conns);
            black_box(&conns);
        })
    });
    group.finish();
}

criterion_group! {
    name = codec;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = decode, encode_deliver, fanout_small, fanout_large
}
criterion_main!(codec);
