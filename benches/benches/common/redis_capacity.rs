//! One Redis shard's capacity through the cluster's publish script, without a relay: many
//! connections, each a pipeline of `EVALSHA publish` over its own rooms, against a private
//! `redis-server`, with three connections subscribed to every room's channel (three nodes
//! holding every room). The script is `pabal_relay::cluster::script::PUBLISH` itself (the
//! stream entry packed), its forms for rolling upgrades (`PUBLISH_ASCENDING`,
//! `PUBLISH_FIELDS`, which scores ascending too), the script as an earlier commit ran it, and variants without its
//! `XADD` or its `PUBLISH`, to say what in it costs.
//!
//! Calls/s and CPU per call swing by a third from one minute to the next on a shared VM;
//! [`instructions`] counts Redis' own instructions per call instead (a `redis-server`
//! under callgrind), which the same script, inputs and binary repeat exactly, so that a
//! change of a few percent in the script can be told at all.
//!
//! Owns: the driver and the variants. Must not touch: the relay (nothing here runs one).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pabal_relay::cluster::resp::{self, Value};
use pabal_relay::cluster::script::{
    PUBLISH, PUBLISH_ASCENDING, PUBLISH_FIELDS, message_tail, node_publish_script,
};
use pabal_testkit::redis::RedisServer;

/// Rooms the load is spread over in [`measure`].
const ROOMS: usize = 1000;
/// Connections driving the script.
const CONNECTIONS: usize = 8;
/// Commands each connection keeps in flight.
const PIPELINE: usize = 64;
/// Nodes subscribed to every room's channel.
const SUBSCRIBERS: usize = 3;

/// A variant of the publish script.
#[derive(Clone)]
pub struct Variant {
    /// Its name in the table.
    pub name: &'static str,
    /// The script's text.
    pub script: String,
    /// Whether each publish carries a repeat key (a device's publish id: `ZADD` and a trim).
    pub publish_id: bool,
    /// Whether it takes [`PUBLISH`]'s arguments (the message's tail joined) or
    /// [`PUBLISH_FIELDS`]'s (ts, tag, sender, payload, sender length apart).
    pub packed: bool,
    /// Whether every call sets the room's history to expire (a node sets it only every
    /// quarter of a room's span: this is what doing it on every publish would cost).
    pub expire: bool,
    /// Whether every call names its owner's epoch and head (the room's sequence before
    /// it), as a node holding the room sends it: the script compares, raises nothing.
    pub owner_head: bool,
    /// Whether it takes the stream's length and the publish command as arguments, as
    /// `fdb14f3`'s script did (the relay's has them in its text).
    pub constants_as_arguments: bool,
}

/// The script without the statements that call one of `calls` (`redis.call(...)` and
/// its continuation lines; `local x = redis.pcall(...)` becomes `local x = nil`).
fn without(script: &str, calls: &[&str]) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in script.lines() {
        if calls
            .iter()
            .any(|c| line.starts_with(&format!("redis.call('{c}'")))
        {
            skipping = true;
            continue;
        }
        if let Some((bind, _)) = calls
            .iter()
            .find_map(|c| line.split_once(&format!("= redis.pcall('{c}'")))
        {
            // `local x = redis.pcall(...)`: `x` stays, nil (what follows tests it).
            out.push_str(bind);
            out.push_str("= nil\n");
            skipping = true;
            continue;
        }
        if skipping && line.starts_with("  ") {
            continue;
        }
        skipping = false;
        out.push_str(line);
        out.push('\n');
    }
    for c in calls {
        assert!(
            !out.contains(&format!("'{c}'")),
            "the variant still calls {c}: the script changed shape"
        );
    }
    out
}

/// A publish script as a node on a single Redis with the default stream length runs it.
fn single_redis_script(script: &str) -> String {
    node_publish_script(script, 10_000, false)
}

/// The publish script as `fdb14f3` ran it (packed, before the answer became a string, the
/// window's keys were scored negated and trimmed by sequence, and the increments and the
/// sequence's string stopped going through `printf("%.14g")`), as a single Redis runs it:
/// measured beside the script, under the same load, to say what the change saved.
const AS_IN_FDB14F3: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
end
local n = redis.call('HINCRBY', KEYS[1], 's', 1)
local s = tostring(n)
if ARGV[5] ~= '' and redis.call('ZADD', KEYS[3], 'NX', s, ARGV[5]) == 0 then
  redis.call('HINCRBY', KEYS[1], 's', -1)
  return {e, tonumber(redis.call('ZSCORE', KEYS[3], ARGV[5])), 1}
end
local added = redis.pcall('XADD', KEYS[2], s .. '-0', 'm', ARGV[2])
if type(added) == 'table' and added.err then
  if ARGV[5] ~= '' then redis.call('ZREM', KEYS[3], ARGV[5]) end
  redis.call('HINCRBY', KEYS[1], 's', -1)
  return added
end
redis.call('PUBLISH', ARGV[4], e .. ' ' .. s .. ' ' .. ARGV[2])
if n % 64 == 0 then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', ARGV[3])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[6]) + 1))
end
return {e, n}
";

/// The variants measured, the script as the relay runs it first.
pub fn variants() -> Vec<Variant> {
    let script = single_redis_script(PUBLISH);
    let variant = |name, script, publish_id, packed| Variant {
        name,
        script,
        publish_id,
        packed,
        expire: false,
        owner_head: true,
        constants_as_arguments: false,
    };
    vec![
        variant("script, publish id", script.clone(), true, true),
        Variant {
            name: "expiry set on every call, publish id",
            expire: true,
            ..variant("", script.clone(), true, true)
        },
        Variant {
            name: "without the owner's head, publish id",
            owner_head: false,
            ..variant("", script.clone(), true, true)
        },
        variant(
            "window ascending, publish id",
            single_redis_script(&PUBLISH_ASCENDING),
            true,
            true,
        ),
        Variant {
            owner_head: false,
            constants_as_arguments: true,
            ..variant(
                "as in fdb14f3, publish id",
                AS_IN_FDB14F3.to_string(),
                true,
                true,
            )
        },
        variant(
            "four fields, ascending, publish id",
            single_redis_script(PUBLISH_FIELDS),
            true,
            false,
        ),
        variant("script", script.clone(), false, true),
        Variant {
            owner_head: false,
            constants_as_arguments: true,
            ..variant("as in fdb14f3", AS_IN_FDB14F3.to_string(), false, true)
        },
        variant("without XADD", without(&script, &["XADD"]), false, true),
        variant(
            "without PUBLISH",
            without(&script, &["PUBLISH"]),
            false,
            true,
        ),
        variant(
            "without both",
            without(&script, &["XADD", "PUBLISH"]),
            false,
            true,
        ),
    ]
}

/// What one variant measured.
pub struct Capacity {
    /// Script calls answered per second.
    pub per_s: f64,
    /// Redis' CPU (user + sys) per call, µs.
    pub cpu_us: f64,
    /// The script's own time per call (`INFO commandstats`), µs.
    pub script_us: f64,
}

/// A field of an `INFO` answer (`name:value` lines), or of a `k=v,...` value.
pub fn info_field(info: &str, line: &str, key: Option<&str>) -> f64 {
    let Some(value) = info
        .lines()
        .find_map(|l| l.trim().strip_prefix(line)?.strip_prefix(':'))
    else {
        return 0.0;
    };
    match key {
        None => value.trim().parse().unwrap_or(0.0),
        Some(k) => value
            .split(',')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0),
    }
}

/// Redis' CPU seconds so far and the scripts' calls and microseconds (`EVALSHA` + `EVAL`).
pub fn redis_cpu(redis: &RedisServer) -> (f64, f64, f64) {
    let cpu = redis.cli(&["INFO", "cpu"]);
    let stats = redis.cli(&["INFO", "commandstats"]);
    let script = |k| {
        info_field(&stats, "cmdstat_evalsha", Some(k)) + info_field(&stats, "cmdstat_eval", Some(k))
    };
    (
        info_field(&cpu, "used_cpu_user", None) + info_field(&cpu, "used_cpu_sys", None),
        script("calls"),
        script("usec"),
    )
}

/// Reads replies from `s` into `buf` until `n` have been decoded; panics on an error reply.
fn read_replies(s: &mut TcpStream, buf: &mut BytesMut, mut n: usize) {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        while n > 0 {
            match resp::decode(buf).unwrap() {
                Some(Value::Error(e)) => panic!("redis: {}", String::from_utf8_lossy(&e)),
                Some(_) => n -= 1,
                None => break,
            }
        }
        if n == 0 {
            return;
        }
        let got = s.read(&mut chunk).unwrap();
        assert!(got > 0, "redis closed the connection");
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// One connection's share of the load: connection `c` of `of` publishes round robin over
/// its rooms (every `of`-th of `rooms`), [`PIPELINE`] calls a write, while `more(calls sent)`, with
/// `variant`'s arguments; returns the calls sent.
fn drive(
    port: u16,
    sha: &str,
    variant: &Variant,
    rooms: usize,
    (c, of): (usize, usize),
    more: impl Fn(u64) -> bool,
) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    let rooms: Vec<[String; 4]> = (c..rooms).step_by(of).map(keys).collect();
    let payload = [7u8; 32];
    let (sender, tag) = (&b"sender"[..], &b"bench/0/1"[..]);
    let sender_len = sender.len().to_string();
    let mut tail = Vec::new();
    let mut out = BytesMut::new();
    let mut buf = BytesMut::new();
    let (mut sent, mut next) = (0u64, 0usize);
    while more(sent) {
        out.clear();
        for _ in 0..PIPELINE {
            let [m, st, i, ch] = &rooms[next % rooms.len()];
            next += 1;
            sent += 1;
            let id = if variant.publish_id {
                format!("d{c}:{sent}")
            } else {
                String::new()
            };
            let call: [&[u8]; 7] = [
                b"EVALSHA",
                sha.as_bytes(),
                b"3",
                m.as_bytes(),
                st.as_bytes(),
                i.as_bytes(),
                b"1",
            ];
            // A node sets a room's expiry only every quarter of its span.
            let expire: &[u8] = if variant.expire { b"90000000" } else { b"" };
            // This connection alone publishes to its rooms: the room's sequence so far.
            let head = ((next - 1) / rooms.len()).to_string();
            let (owner_epoch, owner_head): (&[u8], &[u8]) = (b"1", head.as_bytes());
            let ts = sent.to_string();
            let mut args: Vec<&[u8]> = Vec::with_capacity(12);
            if variant.packed {
                message_tail(&mut tail, sent, tag, sender, &payload);
                args.push(&tail);
                // `fdb14f3`'s script takes the stream's length and the publish command as
                // arguments; the relay's now has them in its text.
                if variant.constants_as_arguments {
                    args.push(b"10000");
                }
                args.extend([ch.as_bytes(), id.as_bytes(), b"1000"]);
                if variant.constants_as_arguments {
                    args.push(b"PUBLISH");
                }
            } else {
                args.extend([ts.as_bytes(), tag, sender, &payload[..]]);
                args.extend([ch.as_bytes(), id.as_bytes(), b"1000", sender_len.as_bytes()]);
            }
            args.push(expire);
            // A node leaves the owner's two arguments out when it has none.
            if variant.owner_head {
                args.extend([owner_epoch, owner_head]);
            }
            let all: Vec<&[u8]> = call.into_iter().chain(args).collect();
            resp::encode(&mut out, all.into_iter());
        }
        s.write_all(&out).unwrap();
        read_replies(&mut s, &mut buf, PIPELINE);
    }
    sent
}

/// Calls per callgrind run: the two runs differ by `MANY - FEW` calls, and everything else
/// (start, script load, subscriptions, shutdown) cancels out.
const FEW: u64 = 64 * 80;
const MANY: u64 = 64 * 240;

/// Whether `valgrind` runs here.
pub fn valgrind_available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Redis' own (user-space) instructions per call of `variant` over `rooms` rooms: a private
/// `redis-server` (no persistence: its disk writes are the kernel's, not counted) under
/// `valgrind --tool=callgrind`, [`SUBSCRIBERS`] connections subscribed to every room's
/// channel, one connection driving [`FEW`] calls, then a fresh one [`MANY`]; the
/// difference over the difference in calls. The rooms set how large each room's window of
/// repeat keys is over those calls: `FEW / rooms` to `MANY / rooms` keys (Redis keeps a
/// window of up to 128 keys in a listpack, and a larger one in a skiplist). The same binary, script and inputs give the same count whatever
/// else the machine runs.
pub fn instructions(variant: &Variant, rooms: usize) -> f64 {
    let run = |calls: u64| -> u64 {
        let port = pabal_testkit::redis::free_port();
        let dir =
            std::env::temp_dir().join(format!("pabal-callgrind-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("callgrind.out");
        let mut child = Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .args([
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("valgrind starts");
        let cli = |args: &[&str]| -> String {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args)
                .output()
                .expect("redis-cli runs");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while cli(&["PING"]) != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server under callgrind never answered"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let sha = cli(&["SCRIPT", "LOAD", &variant.script]);
        assert_eq!(sha.len(), 40, "SCRIPT LOAD answered {sha:?}");
        let stop = Arc::new(AtomicBool::new(false));
        let subs = subscribers(port, rooms, &stop);
        let sent = drive(port, &sha, variant, rooms, (0, 1), |sent| sent < calls);
        assert_eq!(sent, calls);
        stop.store(true, Ordering::Relaxed);
        for s in subs {
            s.join().unwrap();
        }
        cli(&["SHUTDOWN", "NOSAVE"]);
        child.wait().unwrap();
        let text = std::fs::read_to_string(&out).expect("callgrind wrote its counts");
        let _ = std::fs::remove_dir_all(&dir);
        text.lines()
            .find_map(|l| {
                l.strip_prefix("summary:")
                    .or_else(|| l.strip_prefix("totals:"))
            })
            .and_then(|v| v.trim().parse().ok())
            .expect("callgrind's output holds a summary line")
    };
    let few = run(FEW);
    let many = run(MANY);
    (many.saturating_sub(few)) as f64 / (MANY - FEW) as f64
}

fn keys(room: usize) -> [String; 4] {
    let tag = format!("pabal:{{r:cap{room}}}");
    [
        format!("{tag}:m"),
        format!("{tag}:s"),
        format!("{tag}:i"),
        format!("{tag}:c"),
    ]
}

/// Connections subscribed to every channel of `rooms` rooms, drained until `stop`.
fn subscribers(
    port: u16,
    rooms: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..SUBSCRIBERS)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut out = BytesMut::new();
            let channels: Vec<String> = (0..rooms).map(|r| keys(r)[3].clone()).collect();
            resp::encode(
                &mut out,
                std::iter::once(&b"SUBSCRIBE"[..])
                    .chain(channels.iter().map(String::as_bytes))
                    .collect::<Vec<_>>()
                    .into_iter(),
            );
            s.write_all(&out).unwrap();
            let mut buf = BytesMut::new();
            read_replies(&mut s, &mut buf, rooms);
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut chunk = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let _ = s.read(&mut chunk);
                }
            })
        })
        .collect()
}

/// Drives `variant` for `secs` from [`CONNECTIONS`] pipelined connections.
pub fn measure(redis: &RedisServer, variant: &Variant, secs: f64) -> Capacity {
    redis.cli(&["FLUSHALL"]);
    let sha = redis
        .cli(&["SCRIPT", "LOAD", &variant.script])
        .trim()
        .to_string();
    assert_eq!(sha.len(), 40, "SCRIPT LOAD answered {sha:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let subs = subscribers(redis.port, ROOMS, &stop);
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let before = redis_cpu(redis);
    let start = Instant::now();
    let drivers: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let (sha, port, variant) = (sha.clone(), redis.port, variant.clone());
            std::thread::spawn(move || {
                drive(port, &sha, &variant, ROOMS, (c, CONNECTIONS), |_| {
                    start.elapsed().as_secs_f64() < secs
                })
            })
        })
        .collect();
    let calls: u64 = drivers.into_iter().map(|d| d.join().unwrap()).sum();
    let elapsed = start.elapsed().as_secs_f64();
    let after = redis_cpu(redis);
    stop.store(true, Ordering::Relaxed);
    for s in subs {
        s.join().unwrap();
    }
    let counted = (after.1 - before.1).max(1.0);
    Capacity {
        per_s: calls as f64 / elapsed,
        cpu_us: (after.0 - before.0) * 1e6 / counted,
        script_us: (after.2 - before.2) / counted,
    }
}
