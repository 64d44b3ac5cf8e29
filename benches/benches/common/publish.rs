//! Acknowledged publishes through a relay: publisher connections, each in its own room
//! with nobody else subscribed, saturated (a window of unacknowledged publishes each) or
//! paced (publish-to-PUBACK latency from each publish's intended send time, so no
//! coordinated omission). Shared by `relay_storage` and `relay_cluster`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use pabal_codec::{ClientFrame, Decoder, Publish, ServerFrame};

/// Publisher connections, each in its own room.
pub const PUBLISHERS: usize = 16;
const WINDOW: u64 = 64;

/// What one phase measured.
pub struct Outcome {
    /// PUBACKs received.
    pub acked: u64,
    /// The phase's length.
    pub secs: f64,
    /// Publish-to-PUBACK latency (paced phases), µs, from each publish's intended send time.
    pub latency: Histogram<u64>,
}

impl Outcome {
    /// PUBACKs per second.
    pub fn rate(&self) -> f64 {
        self.acked as f64 / self.secs
    }

    /// The latency at quantile `q`, ms.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// The longest latency, ms.
    pub fn max_ms(&self) -> f64 {
        self.latency.max() as f64 / 1000.0
    }
}

/// The name a bench prints for a backend.
pub fn backend_name(backend: pabal_relay::io::BackendKind) -> &'static str {
    match backend {
        pabal_relay::io::BackendKind::IoUring => "io_uring",
        _ => "epoll",
    }
}

/// Runs every publisher for `secs`: saturated (`rate` None) or paced at `rate` publishes/s
/// over all of them; publisher `p` connects to `addrs[p % addrs.len()]`. Users and rooms are
/// new per `round`: a user's rooms are bound on each of its connections, which would replay
/// the last phase's messages into this one.
pub fn phase(
    addrs: &[SocketAddr],
    payload: usize,
    secs: f64,
    rate: Option<f64>,
    round: usize,
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + Duration::from_millis(100);
    let interval_ns = rate.map(|r| 1e9 * PUBLISHERS as f64 / r);
    let handles: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let stream = super::pabal_client(
                addrs[p % addrs.len()],
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
