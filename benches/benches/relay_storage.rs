//! Acknowledged publishes per second and publish-to-PUBACK latency through the relay, per
//! storage mode: memory, and disk with `fsync = "never"`, `"interval"` and `"always"`, for
//! 32 B and 1 KiB payloads, in one run so the ratios compare like with like.
//!
//! One worker, on each I/O backend, each in a process of its own (epoll: the log's jobs on a
//! sync thread; io_uring: written and synced through the worker's ring), 16
//! publisher connections, each in its own room and nobody else subscribed, so what is measured is sequencing, the log and the PUBACK path. Each case
//! runs twice: saturated (each publisher keeps 64 publishes unacknowledged) for the
//! acknowledged rate, then open-loop at half that rate for the latency percentiles,
//! measured from each publish's intended send time (no coordinated omission).
//!
//! `cargo bench -p pabal-benches --bench relay_storage` (`PABAL_BENCH_SECS` sets each
//! phase's length, default 3; `PABAL_STORAGE_PACED` paces the latency phase at that many
//! publishes/s instead of half the saturated rate, e.g. 25000 for half of the 50,000/s
//! target). The logs go to a temporary directory under `TMPDIR`: point it
//! at the disk you want to measure (a tmpfs makes every fsync free).

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use pabal_codec::{ClientFrame, Decoder, Publish, ServerFrame};
use pabal_relay::config::{FsyncPolicy, StorageMode};
use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

const PUBLISHERS: usize = 16;
const WINDOW: u64 = 64;

struct Outcome {
    acked: u64,
    secs: f64,
    latency: Histogram<u64>,
}

/// Runs every publisher for `secs`: saturated (`rate` None) or paced at `rate` publishes/s
/// over all of them. Users and rooms are new per `round`: a user's rooms are bound on each
/// of its connections, which would replay the last phase's messages into this one.
fn phase(addr: SocketAddr, payload: usize, secs: f64, rate: Option<f64>, round: usize) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + Duration::from_millis(100);
    let interval_ns = rate.map(|r| 1e9 * PUBLISHERS as f64 / r);
    let handles: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let stream = common::pabal_client(
                addr,
                &format!("p{round}-{p}"),
                &[(false, format!("bench:r{round}-{p}"))],
            );
            let mut writer = stream.try_clone().unwrap();
            let mut reader = stream;
            let acked = Arc::new(AtomicU64::new(0));
            let (acked_w, stop_w) = (acked.clone(), stop.clone());
            let body = Bytes::from(vec![7u8; payload]);
            let sender = std::thread::spawn(move || {
                let mut sent = 0u64;
                let mut out = BytesMut::new();
                while !stop_w.load(Ordering::Relaxed) {
                    match interval_ns {
                        None => {
                            if sent - acked_w.load(Ordering::Relaxed) >= WINDOW {
                                std::thread::yield_now();
                                continue;
                            }
                        }
                        Some(ns) => {
                            let due = start + Duration::from_nanos((sent as f64 * ns) as u64);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                        }
                    }
                    sent += 1;
                    out.clear();
                    ClientFrame::Publish(Publish {
                        alias: 0,
                        msg_id: Some(sent),
                        ack: None,
                        payload: body.clone(),
                    })
                    .encode(&mut out);
                    if writer.write_all(&out).is_err() {
                        break;
                    }
                }
            });
            let stop_r = stop.clone();
            let receiver = std::thread::spawn(move || {
                let decoder = Decoder::default();
                let mut buf = BytesMut::new();
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut counted = 0u64;
                reader
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                while !stop_r.load(Ordering::Relaxed) {
                    use std::io::Read;
                    let mut chunk = [0u8; 64 * 1024];
                    match reader.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        Err(_) => continue,
                    }
                    while let Some(frame) = decoder.decode_server(&mut buf).unwrap() {
                        if let ServerFrame::PubAck(ack) = frame {
                            acked.fetch_add(1, Ordering::Relaxed);
                            if let Some(ns) = interval_ns {
                                let intended = start
                                    + Duration::from_nanos(((ack.msg_id - 1) as f64 * ns) as u64);
                                let us = Instant::now()
                                    .saturating_duration_since(intended)
                                    .as_micros() as u64;
                                latency.record(us.max(1)).unwrap();
                            }
                            counted += 1;
                        }
                    }
                }
                (counted, latency)
            });
            (sender, receiver)
        })
        .collect();
    let now = Instant::now();
    if start > now {
        std::thread::sleep(start - now);
    }
    std::thread::sleep(Duration::from_secs_f64(secs));
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let mut out = Outcome {
        acked: 0,
        secs: elapsed,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
    };
    for (sender, receiver) in handles {
        sender.join().unwrap();
        let (n, h) = receiver.join().unwrap();
        out.acked += n;
        out.latency.add(h).unwrap();
    }
    out
}

fn main() {
    let secs: f64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let fixed_pace: Option<f64> = std::env::var("PABAL_STORAGE_PACED")
        .ok()
        .and_then(|s| s.parse().ok());
    let modes: [(&str, Option<FsyncPolicy>); 4] = [
        ("memory", None),
        ("never", Some(FsyncPolicy::Never)),
        ("interval", Some(FsyncPolicy::Interval)),
        ("always", Some(FsyncPolicy::Always)),
    ];
    let Some(backend) = common::child_backend() else {
        println!(
            "{:<8} {:<9} {:>7} {:>14} | {:>10} {:>9} {:>9} {:>9}",
            "backend", "mode", "payload", "acked/s (sat)", "paced/s", "p50 ms", "p99 ms", "max ms"
        );
        common::run_each_backend_in_its_own_process(&[]);
        return;
    };
    for payload in [32usize, 1024] {
        for (round, (name, fsync)) in modes.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let mut config = common::relay_config(backend);
            if let Some(fsync) = fsync {
                config.storage.mode = StorageMode::Disk;
                config.storage.dir = dir.path().to_path_buf();
                config.storage.fsync = *fsync;
            }
            let relay = RelayHandle::start(config).unwrap();
            let addr = relay.local_addr();
            let sat = phase(addr, payload, secs, None, round * 2);
            let rate = sat.acked as f64 / sat.secs;
            let paced = phase(
                addr,
                payload,
                secs,
                Some(fixed_pace.unwrap_or(rate / 2.0)),
                round * 2 + 1,
            );
            let ms = |q: f64| paced.latency.value_at_quantile(q) as f64 / 1000.0;
            let backend = match backend {
                BackendKind::IoUring => "io_uring",
                _ => "epoll",
            };
            println!(
                "{:<8} {:<9} {:>7} {:>14.0} | {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
                backend,
                name,
                payload,
                rate,
                paced.acked as f64 / paced.secs,
                ms(0.5),
                ms(0.99),
                paced.latency.max() as f64 / 1000.0,
            );
            relay.stop().unwrap();
        }
    }
}
