//! The engine against Redis faults found in review (s16): a shard leaving the slot map with
//! answers held for their copies, a subscription refused, publishes of a room answered
//! unrun, a Redis that goes silent, a reply without end, more work than a dialing
//! connection holds. Each drives a real engine on the test's thread (inline driver), some
//! against a fake Redis on a thread of the test's own; none needs a redis-server. Waits are
//! bounded by [`WAIT`], and nothing asserts how fast.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::super::receipts::HandoffCheck;
use super::super::resp::{self, Value};
use super::super::shard::{Conn, DIAL_QUEUE_MAX, Shard, reply_max};
use super::super::slots::SlotMap;
use super::super::{
    ClusterConfig, ClusterStats, EngineCmd, EngineErrorKind, EngineEvent, PublishRequest,
    RedisAddr, RetryKind, Topology,
};
use super::{Driver, Engine, EngineHandle, SubState, channel_key};
use crate::handoff::detect::Noted;
use crate::ids::RoomName;

/// Every wait for an event is bounded by it: a missing event fails the test, a slow
/// machine does not.
const WAIT: Duration = Duration::from_secs(20);

fn engine_of(handle: &mut EngineHandle) -> &mut Engine {
    match &mut handle.driver {
        Driver::Inline { engine, .. } => engine,
        Driver::Thread { .. } => unreachable!("spawned on the test's thread"),
    }
}

/// The engines' `limits.max_payload` (its default).
const MAX_PAYLOAD: usize = 16 << 10;

fn spawn(config: &ClusterConfig) -> (EngineHandle, Arc<ClusterStats>) {
    let stats = Arc::new(ClusterStats::default());
    let handle = EngineHandle::spawn(0, config, MAX_PAYLOAD, "t", Box::new(|| {}), stats.clone())
        .expect("the engine starts");
    (handle, stats)
}

/// `[cluster]` with the one Redis on loopback at `port`, the rest as by default.
fn on_port(port: u16) -> ClusterConfig {
    ClusterConfig {
        redis: vec![format!("redis://127.0.0.1:{port}")],
        ..ClusterConfig::default()
    }
}

/// [`spawn`], turned until the engine is up (Redis answered both connections); with the
/// events handed over meanwhile.
fn spawn_up(config: &ClusterConfig) -> (EngineHandle, Arc<ClusterStats>, Vec<EngineEvent>) {
    let (mut handle, stats) = spawn(config);
    let mut events = Vec::new();
    assert!(turn_until(&mut handle, &mut events, |_| stats.healthy()));
    (handle, stats, events)
}

/// The open script's answer: epoch 1, sequence 0, no tail, no removals.
const OPENED: &[u8] = b"*4\r\n:1\r\n:0\r\n*0\r\n*0\r\n";

/// Turns the engine (as the worker's ticks do) until `done` holds for the events so far;
/// false after [`WAIT`].
fn turn_until(
    handle: &mut EngineHandle,
    events: &mut Vec<EngineEvent>,
    mut done: impl FnMut(&[EngineEvent]) -> bool,
) -> bool {
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        handle.turn(true);
        while let Some(ev) = handle.try_recv(Instant::now()) {
            events.push(ev);
        }
        if done(events) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// What a fake Redis received: (connection number, the command's arguments), in order.
type Log = Arc<Mutex<Vec<(usize, Vec<Vec<u8>>)>>>;

/// A fake Redis on loopback: logs every command each connection sends and writes what
/// `answer` makes of it (nothing for `None`); the test may write more itself on any
/// connection (`conns`). Returns its port.
fn fake_redis(
    answer: impl Fn(&[Vec<u8>]) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (u16, Log, Arc<Mutex<Vec<TcpStream>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Log = Arc::default();
    let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let (log2, conns2) = (log.clone(), conns.clone());
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for (n, mut s) in listener.incoming().flatten().enumerate() {
            conns2.lock().unwrap().push(s.try_clone().unwrap());
            let (log, answer) = (log2.clone(), answer.clone());
            std::thread::spawn(move || {
                let mut buf = bytes::BytesMut::new();
                let mut chunk = [0; 65536];
                while let Ok(k) = s.read(&mut chunk) {
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    while let Ok(Some(Value::Array(Some(items)))) = resp::decode(&mut buf) {
                        let args: Vec<Vec<u8>> = items
                            .iter()
                            .map(|v| v.bytes().map(|b| b.to_vec()).unwrap_or_default())
                            .collect();
                        let reply = answer(&args);
                        log.lock().unwrap().push((n, args));
                        if let Some(reply) = reply {
                            let _ = s.write_all(&reply);
                        }
                    }
                }
            });
        }
    });
    (port, log, conns)
}

/// Engine errors counted, of every kind.
fn errors(stats: &ClusterStats) -> u64 {
    EngineErrorKind::ALL
        .iter()
        .map(|&k| stats.errors_of(k))
        .sum()
}

/// The commands of `log` whose name is `verb`.
fn sent(log: &Log, verb: &[u8]) -> usize {
    let log = log.lock().unwrap();
    log.iter()
        .filter(|(_, a)| a.first().is_some_and(|v| v == verb))
        .count()
}

/// A `CLUSTER SLOTS` answer: each range served by 127.0.0.1 at its port.
fn slots_reply(ranges: &[(i64, i64, u16)]) -> Value {
    Value::Array(Some(
        ranges
            .iter()
            .map(|&(a, b, port)| {
                Value::Array(Some(vec![
                    Value::Int(a),
                    Value::Int(b),
                    Value::Array(Some(vec![
                        Value::Bulk(Some(Bytes::from_static(b"127.0.0.1"))),
                        Value::Int(i64::from(port)),
                    ])),
                ]))
            })
            .collect(),
    ))
}

/// A publish Redis answered whose copy had not been read when a new slot map dropped its
/// shard (a failover, a resharding) reaches the worker, unordered, as when the shard's
/// pub/sub connection is lost; before, it went with the shard and the worker never heard
/// of the publish.
#[test]
fn an_answer_waiting_for_its_copy_survives_its_shard_leaving_the_map() {
    let config = ClusterConfig {
        topology: Topology::Cluster,
        // Nothing listens there: no connection comes up, the maps are applied by hand.
        redis: vec!["redis://127.0.0.1:1".into()],
        ..ClusterConfig::default()
    };
    let (mut handle, _stats) = spawn(&config);
    let e = engine_of(&mut handle);
    let seed = RedisAddr {
        host: "127.0.0.1".into(),
        port: 1,
    };
    let two = SlotMap::from_cluster_slots(&slots_reply(&[(0, 8000, 1), (8001, 16383, 2)]), &seed)
        .unwrap();
    e.apply_map(two);
    assert_eq!(e.shards.len(), 2);
    // Shard 1 answered publish 7; its copy has not been read.
    let answer = EngineEvent::Published {
        ticket: 7,
        epoch: 1,
        seq: 1,
        repeated: false,
        ordered: true,
    };
    e.shards[1].copies.answered(7);
    e.shards[1].copies.ready(7, answer, e.woke, &mut e.out);
    assert!(e.out.is_empty(), "held for its copy: {:?}", e.out);
    // Its slots moved to the other shard.
    let one = SlotMap::from_cluster_slots(&slots_reply(&[(0, 16383, 1)]), &seed).unwrap();
    e.apply_map(one);
    assert!(
        matches!(
            e.out.as_slice(),
            [EngineEvent::Published {
                ticket: 7,
                seq: 1,
                ordered: false,
                ..
            }]
        ),
        "publish 7's answer, unordered: {:?}",
        e.out
    );
}

/// Redis's confirmation of a `SUBSCRIBE` to `ch` (one channel, the connection's first).
fn subscribed(ch: &[u8]) -> Vec<u8> {
    let mut out = format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n", ch.len()).into_bytes();
    out.extend_from_slice(ch);
    out.extend_from_slice(b"\r\n:1\r\n");
    out
}

/// Opens `room` on the engine; whether it was answered `Opened` within [`WAIT`].
fn open(handle: &mut EngineHandle, events: &mut Vec<EngineEvent>, room: &RoomName) -> bool {
    handle.send(
        Instant::now(),
        EngineCmd::Open {
            room: room.clone(),
            epoch_hint: 1,
            tail: 0,
        },
    );
    handle.wake();
    turn_until(handle, events, |evs| {
        evs.iter()
            .any(|ev| matches!(ev, EngineEvent::Opened { room: r, .. } if r == room))
    })
}

/// A subscription Redis refused with an error other than `MOVED` is sent again after a
/// backoff: the room's open then goes and is answered. Before, the channel stayed
/// `Subscribing` for good and the room never opened on this worker. Returns the engine's
/// counters.
fn a_subscription_refused_is_sent_again(refusal: &'static [u8]) -> Arc<ClusterStats> {
    let refused = Arc::new(Mutex::new(false));
    let (port, log, _conns) = fake_redis(move |args| match &args.first()?[..] {
        b"SUBSCRIBE" => {
            let ch = args.get(1)?;
            let mut first = refused.lock().unwrap();
            if !*first {
                *first = true;
                return Some(refusal.to_vec());
            }
            Some(subscribed(ch))
        }
        b"EVALSHA" | b"EVAL" => Some(OPENED.to_vec()),
        b"PING" => Some(b"+PONG\r\n".to_vec()),
        _ => None,
    });
    let config = on_port(port);
    let (mut handle, stats, mut events) = spawn_up(&config);
    let room = RoomName::new(false, pabal_codec::Text::from("busy"));
    let opened = open(&mut handle, &mut events, &room);
    let state = engine_of(&mut handle)
        .channels
        .get(&channel_key(&room))
        .map(|c| c.state == SubState::Subscribing);
    assert!(
        opened,
        "the room did not open; its channel Subscribing: {state:?}; events {events:?}"
    );
    assert_eq!(sent(&log, b"SUBSCRIBE"), 2, "refused once, then taken");
    stats
}

/// `-BUSY` (any client's script past `busy-reply-threshold`) is Redis busy for a while:
/// counted as a retry, not as an error reply (CI: the busy-read test counted one).
#[test]
fn a_subscription_refused_busy_is_sent_again_and_the_room_opens() {
    let stats = a_subscription_refused_is_sent_again(b"-BUSY Redis is busy running a script.\r\n");
    assert_eq!(stats.retries_of(RetryKind::Busy), 1);
    assert_eq!(stats.errors_of(EngineErrorKind::ErrorReply), 0);
}

/// A refusal that is no busy Redis (a permission) counts as an error reply.
#[test]
fn a_subscription_refused_for_good_reason_counts_an_error_reply() {
    let stats =
        a_subscription_refused_is_sent_again(b"-NOPERM no permissions to access a channel\r\n");
    assert_eq!(stats.errors_of(EngineErrorKind::ErrorReply), 1);
}

/// A pub/sub connection's idle `PING` answered `-BUSY` was heard: the engine stays up,
/// its subscription stays, nothing is subscribed again and nothing counts as an error.
/// Before, the answer counted as an error reply and as a lost shard.
#[test]
fn a_pubsub_ping_answered_busy_is_an_answer() {
    let busy = Arc::new(AtomicBool::new(false));
    let busy2 = busy.clone();
    let (port, log, _conns) = fake_redis(move |args| match &args.first()?[..] {
        b"SUBSCRIBE" => {
            let ch = args.get(1)?;
            Some(subscribed(ch))
        }
        b"EVALSHA" | b"EVAL" => Some(OPENED.to_vec()),
        b"PING" if busy2.load(Ordering::SeqCst) => {
            Some(b"-BUSY Redis is busy running a script.\r\n".to_vec())
        }
        b"PING" => Some(b"+PONG\r\n".to_vec()),
        _ => None,
    });
    let (mut handle, stats, mut events) = spawn_up(&silent_after(port));
    let room = RoomName::new(false, pabal_codec::Text::from("pinged"));
    assert!(open(&mut handle, &mut events, &room));
    busy.store(true, Ordering::SeqCst);
    let pings_before = sent(&log, b"PING");
    // Idle, each connection is pinged every 200 ms: wait for several answered BUSY.
    assert!(turn_until(&mut handle, &mut events, |_| {
        sent(&log, b"PING") >= pings_before + 6
    }));
    assert!(
        stats.retries_of(RetryKind::Busy) >= 1,
        "the pub/sub PING met BUSY"
    );
    assert!(stats.healthy());
    assert_eq!(errors(&stats), 0);
    assert_eq!(sent(&log, b"SUBSCRIBE"), 1, "subscribed once, kept");
    let state = engine_of(&mut handle)
        .channels
        .get(&channel_key(&room))
        .map(|c| c.state == SubState::Subscribed);
    assert_eq!(state, Some(true));
}

fn publish(room: &RoomName, ticket: u64) -> PublishRequest {
    PublishRequest {
        ticket,
        room: room.clone(),
        epoch_hint: 1,
        ts_ms: 1,
        sender: pabal_codec::Text::from("alice").into(),
        payload: Bytes::from(format!("body{ticket}")),
        repeat: None,
        window: 1,
        expire_ms: None,
        owner_head: None,
    }
}

/// Two pipelined publishes of a room answered `NOSCRIPT` in two reads, with a third
/// publish of the room handed over between them, reach Redis in ticket order: the third
/// is held behind the second (sent again as `EVAL`). Before, the first's `EVAL`, the
/// third's `EVALSHA` and then the second's `EVAL` went in that order, and Redis sequenced
/// the third before the second. The fake Redis runs scripts as Redis does (`EVALSHA`
/// refused `NOSCRIPT` until an `EVAL` loaded the script) and answers in order, each reply
/// held back until the test lets it go (a TCP segment at a time).
#[test]
fn noscript_resends_keep_a_rooms_publish_order() {
    // Replies computed as each command arrives, written when the test releases them.
    let queued: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let (loaded, seq, q) = (
        Arc::new(Mutex::new(false)),
        Arc::new(Mutex::new(0)),
        queued.clone(),
    );
    let (port, log, conns) = fake_redis(move |args| {
        let reply = match &args.first()?[..] {
            // Each connection's first command (no idle one comes: see reply_timeout).
            b"PING" => return Some(b"+PONG\r\n".to_vec()),
            b"EVALSHA" if !*loaded.lock().unwrap() => b"-NOSCRIPT No matching script.\r\n".to_vec(),
            verb @ (b"EVALSHA" | b"EVAL") => {
                if verb == b"EVAL" {
                    *loaded.lock().unwrap() = true;
                }
                let mut seq = seq.lock().unwrap();
                *seq += 1;
                format!("*2\r\n:1\r\n:{seq}\r\n").into_bytes()
            }
            _ => return None,
        };
        q.lock().unwrap().push(reply);
        None
    });
    let config = ClusterConfig {
        // No idle PING: the replies here are released in order by hand.
        reply_timeout: Duration::from_secs(300),
        ..on_port(port)
    };
    let (mut handle, _stats, mut events) = spawn_up(&config);
    // (verb, ticket) of each script call received, in order.
    let calls = || -> Vec<(String, u64)> {
        let log = log.lock().unwrap();
        log.iter()
            .filter(|(_, a)| a.first().is_some_and(|v| v.starts_with(b"EVAL")))
            .map(|(_, a)| {
                let tag = a.iter().find_map(|x| {
                    let text = String::from_utf8_lossy(x).into_owned();
                    let at = text.find("t/0/")? + 4;
                    text[at..].split(' ').next()?.parse::<u64>().ok()
                });
                (String::from_utf8_lossy(&a[0]).into_owned(), tag.unwrap())
            })
            .collect()
    };
    let cmd_conn = || {
        log.lock()
            .unwrap()
            .iter()
            .find(|(_, a)| a[0].starts_with(b"EVAL"))
            .unwrap()
            .0
    };
    // Writes the next `n` replies Redis has for the command connection.
    let release = |n: usize| {
        let replies: Vec<Vec<u8>> = queued.lock().unwrap().drain(..n).collect();
        let mut c = conns.lock().unwrap()[cmd_conn()].try_clone().unwrap();
        for r in replies {
            c.write_all(&r).unwrap();
        }
    };
    let room = RoomName::new(false, pabal_codec::Text::from("r"));
    handle.send(Instant::now(), EngineCmd::Publish(publish(&room, 1)));
    handle.send(Instant::now(), EngineCmd::Publish(publish(&room, 2)));
    handle.wake();
    assert!(turn_until(&mut handle, &mut events, |_| queued
        .lock()
        .unwrap()
        .len()
        == 2));
    // 1's NOSCRIPT alone: 1 goes again as EVAL.
    release(1);
    assert!(turn_until(&mut handle, &mut events, |_| calls().len() == 3));
    // The worker's next tick: publish 3 of the room (written now, if it is not held).
    handle.send(Instant::now(), EngineCmd::Publish(publish(&room, 3)));
    handle.wake();
    // 2's NOSCRIPT, then whatever Redis answers, until all three are answered.
    release(1);
    let answered = turn_until(&mut handle, &mut events, |evs| {
        let n = queued.lock().unwrap().len();
        if n > 0 {
            release(n);
        }
        (1..=3).all(|t| {
            evs.iter()
                .any(|ev| matches!(ev, EngineEvent::Published { ticket, .. } if *ticket == t))
        })
    });
    let calls = calls();
    assert!(answered, "calls {calls:?}; events {events:?}");
    // The first two were refused NOSCRIPT; Redis ran the others in the order they came.
    let ran: Vec<u64> = calls[2..].iter().map(|(_, t)| *t).collect();
    assert_eq!(
        ran,
        [1, 2, 3],
        "Redis sequenced them in this order: {calls:?}"
    );
}

/// A fake Redis that answers `PING` until it is sent a script, then never answers
/// anything again on any connection (hung, stopped, or gone without a RST).
fn redis_that_hangs_on_a_script() -> (u16, Log) {
    let hung = Arc::new(AtomicBool::new(false));
    let (port, log, _conns) = fake_redis(move |args| {
        if args.first().is_some_and(|v| v.starts_with(b"EVAL")) {
            hung.store(true, Ordering::SeqCst);
        }
        let ping = args.first().is_some_and(|v| v == b"PING");
        (ping && !hung.load(Ordering::SeqCst)).then(|| b"+PONG\r\n".to_vec())
    });
    (port, log)
}

fn silent_after(port: u16) -> ClusterConfig {
    ClusterConfig {
        reply_timeout: Duration::from_millis(200),
        ..on_port(port)
    }
}

/// A publish in flight to a Redis that stops answering is failed once
/// `cluster.reply_timeout` passed with no reply (counted as a timeout), and the engine
/// counts as down from then on (`/readyz` 503): it reconnects, but the peer that accepts
/// the new connections never answers their `PING`. Before, the publish waited for good
/// and the engine counted as up.
#[test]
fn a_publish_to_a_redis_that_stopped_answering_fails_and_the_engine_is_down() {
    let (port, _log) = redis_that_hangs_on_a_script();
    let (mut handle, stats, mut events) = spawn_up(&silent_after(port));
    let room = RoomName::new(false, pabal_codec::Text::from("r"));
    handle.send(Instant::now(), EngineCmd::Publish(publish(&room, 1)));
    handle.wake();
    let failed = turn_until(&mut handle, &mut events, |evs| {
        evs.iter()
            .any(|ev| matches!(ev, EngineEvent::PublishFailed { ticket: 1 }))
    });
    assert!(failed, "publish 1 still in flight: {events:?}");
    assert!(stats.errors_of(EngineErrorKind::Timeout) >= 1);
}

/// A peer that accepts the connections and never answers (a stopped Redis, a hung proxy)
/// is not an engine up (`/readyz` 503) though both connections are connected: each counts
/// only once Redis answered on it (its first `PING`). Before, connected was up.
#[test]
fn a_peer_that_accepts_and_never_answers_is_not_an_engine_up() {
    let (port, _log, _conns) = fake_redis(|_| None);
    let (mut handle, stats) = spawn(&silent_after(port));
    let end = Instant::now() + WAIT;
    let mut connected = false;
    while !connected && Instant::now() < end {
        handle.turn(true);
        while handle.try_recv(Instant::now()).is_some() {}
        let shard = engine_of(&mut handle).shards.first();
        let up = |c: Option<&super::super::shard::Conn>| c.is_some_and(|c| c.is_up());
        connected = shard.is_some_and(|s| up(s.cmd.as_ref()) && up(s.sub.as_ref()));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(connected, "both connections connected at once");
    assert!(!stats.healthy(), "connected, never answered: down");
}

/// An idle connection is sent a `PING` every `cluster.reply_timeout`; answered, the
/// engine stays up and counts no error. Before, an idle connection was never checked.
#[test]
fn idle_connections_are_pinged_and_stay_up_while_redis_answers() {
    let (port, log) = redis_that_hangs_on_a_script();
    let (mut handle, stats, mut events) = spawn_up(&silent_after(port));
    // Each connection's first PING (at connect), then at least two more each.
    let pinged = turn_until(&mut handle, &mut events, |_| {
        let log = log.lock().unwrap();
        let on = |n: usize| {
            log.iter()
                .filter(|(c, a)| *c == n && a[0] == b"PING")
                .count()
        };
        on(0) >= 3 && on(1) >= 3
    });
    assert!(pinged, "{:?}", log.lock().unwrap());
    assert!(stats.healthy());
    assert_eq!(errors(&stats), 0);
    assert!(events.is_empty(), "{events:?}");
}

/// A reply Redis never finishes (`*1048576` followed by 16 MiB bulk strings, more of them
/// than [`reply_max`] bytes) is refused once the connection holds that much of it: counted
/// as a protocol error, the connection reset and dialed again, and the engine up again
/// once Redis answers the new one. Before, the node buffered whatever Redis sent of it
/// (16 TiB, had Redis gone on).
#[test]
fn a_reply_longer_than_the_bound_resets_its_connection() {
    let bound = reply_max(ClusterConfig::default().fill_batch, MAX_PAYLOAD);
    let bulk = resp::MAX_BULK;
    let mut endless = b"*1048576\r\n".to_vec();
    while endless.len() <= bound {
        endless.extend_from_slice(format!("${bulk}\r\n").as_bytes());
        endless.resize(endless.len() + bulk, b'x');
        endless.extend_from_slice(b"\r\n");
    }
    let sent_once = AtomicBool::new(false);
    let (port, log, _conns) = fake_redis(move |args| match &args.first()?[..] {
        // The first connection's PING is answered with it, every later one with PONG.
        b"PING" if !sent_once.swap(true, Ordering::SeqCst) => Some(endless.clone()),
        b"PING" => Some(b"+PONG\r\n".to_vec()),
        _ => None,
    });
    let config = on_port(port);
    let (mut handle, stats) = spawn(&config);
    let mut events = Vec::new();
    let recovered = turn_until(&mut handle, &mut events, |_| {
        stats.errors_of(EngineErrorKind::Protocol) >= 1 && stats.healthy()
    });
    let connections = log.lock().unwrap().iter().map(|(n, _)| n + 1).max();
    assert!(
        recovered,
        "protocol errors {}, healthy {}, connections {connections:?}",
        stats.errors_of(EngineErrorKind::Protocol),
        stats.healthy()
    );
    assert_eq!(stats.errors_of(EngineErrorKind::Protocol), 1);
    assert!(
        connections >= Some(3),
        "the reset connection was dialed again"
    );
    let shard = &engine_of(&mut handle).shards[0];
    for conn in [&shard.cmd, &shard.sub] {
        assert!(conn.as_ref().is_some_and(|c| c.rbuf.len() <= bound));
    }
}

/// What a dialing command connection could not queue ([`DIAL_QUEUE_MAX`] commands wait on
/// it already) goes back to its waiting list: a stream read, a hand-off decision, the open
/// of a subscribed room. Each is sent once the connection is up. Before, they waited for
/// the next dial (none came: the offline pushes of the hand-off went missing, the read
/// and the open held the room's delivery).
#[test]
fn what_a_dialing_connection_could_not_queue_is_sent_once_it_connects() {
    let (port, log, _conns) = fake_redis(|args| {
        let names = |room: &[u8]| {
            args.iter()
                .any(|a| a.windows(room.len()).any(|w| w == room))
        };
        match &args.first()?[..] {
            b"PING" => Some(b"+PONG\r\n".to_vec()),
            b"SUBSCRIBE" => Some(subscribed(args.get(1)?)),
            // An empty page.
            b"XRANGE" => Some(b"*0\r\n".to_vec()),
            // The hand-off decision: no member read, none owed.
            b"EVALSHA" if names(b"{r:handed}") => Some(b"*3\r\n:0\r\n:0\r\n*0\r\n".to_vec()),
            b"EVALSHA" => Some(OPENED.to_vec()),
            _ => None,
        }
    });
    let config = on_port(port);
    let (mut handle, _stats, mut events) = spawn_up(&config);
    let opened = RoomName::new(false, pabal_codec::Text::from("opened"));
    assert!(open(&mut handle, &mut events, &opened));
    // The command connection is lost and dialing again, with as many commands waiting on
    // it as it may hold.
    let e = engine_of(&mut handle);
    e.fail_cmd(0, &std::io::Error::other("lost for the test"));
    let addr = e.shards[0].addr.clone();
    let token = Shard::tokens(0).0;
    e.shards[0].cmd = Some(Conn::dial(
        &addr,
        token,
        Instant::now(),
        config.connect_timeout,
    ));
    let page = |name: &str| RoomName::new(false, pabal_codec::Text::from(name.to_owned()));
    for reader in 0..DIAL_QUEUE_MAX as u64 {
        let room = page(&format!("read{reader}"));
        e.send_fill(room, (0, u64::MAX), Some(reader), None, 0, false);
    }
    assert!(e.shards[0].queue_full());
    // One more of each: each goes back to its waiting list.
    e.send_fill(page("late"), (0, u64::MAX), Some(u64::MAX), None, 0, false);
    let check = HandoffCheck {
        room: page("handed"),
        epoch: 1,
        last: Noted {
            seq: 1,
            ts_ms: 1,
            publisher: pabal_codec::Text::from("alice").into(),
        },
        other: None,
    };
    e.send_handoff(check, (false, None, 0));
    e.send_open(opened.clone(), 1, 0, false, None, 0);
    assert_eq!(e.fills_waiting.len(), 1);
    let waiting_opens = e.channels.get(&channel_key(&opened)).map(|c| c.opens.len());
    assert_eq!(waiting_opens, Some(1));
    // Commands `verb` naming `room`'s keys that Redis received.
    let received = |verb: &[u8], room: &[u8]| {
        let log = log.lock().unwrap();
        let names = |a: &Vec<u8>| a.windows(room.len()).any(|w| w == room);
        let of = |a: &[Vec<u8>]| a.first().is_some_and(|v| v == verb) && a.iter().any(names);
        log.iter().filter(|(_, a)| of(a)).count()
    };
    let (read, handed, opens) = (
        || received(b"XRANGE", b"{r:late}"),
        || received(b"EVALSHA", b"{r:handed}"),
        || received(b"EVALSHA", b"{r:opened}"),
    );
    let all_sent = turn_until(&mut handle, &mut events, |_| {
        read() == 1 && handed() == 1 && opens() == 2
    });
    assert!(
        all_sent,
        "received: the read {}, the hand-off {}, the opens {} (the first, then the one that waited)",
        read(),
        handed(),
        opens()
    );
}
