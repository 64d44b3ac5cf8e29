//! Each script called on a `redis-server` alone, its answers and the keys it leaves read back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use pabal_relay::cluster::membership::{ROOM_JOIN, ROOM_LEAVE, ROOM_UNDO};
use pabal_relay::cluster::receipts::{HANDOFF, HandoffPage, MARKERS, parse_handoff};
use pabal_relay::cluster::resp::{self, Value};
use pabal_relay::cluster::script::{
    FILL, OPEN, PUBLISH, PUBLISH_ASCENDING, PUBLISH_FIELDS, RAISE, StreamSpan, TRIM_EVERY,
    message_tail, node_publish_script, parse_channel_message, parse_channel_removal, parse_entries,
    parse_fill, parse_published, publish_script,
};
use pabal_relay::cluster::{StreamEntry, WindowOrder};
use pabal_testkit::redis::RedisServer;

/// A plain connection to a Redis.
struct Redis {
    s: TcpStream,
    buf: BytesMut,
}

impl Redis {
    fn connect(port: u16) -> Redis {
        Redis {
            s: TcpStream::connect(("127.0.0.1", port)).unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// Sends `cmds` pipelined; their replies (an error reply fails the test).
    fn pipeline(&mut self, cmds: &[Vec<Vec<u8>>]) -> Vec<Value> {
        let mut out = BytesMut::new();
        for c in cmds {
            resp::encode(&mut out, c.iter().map(Vec::as_slice));
        }
        self.s.write_all(&out).unwrap();
        let mut replies = Vec::with_capacity(cmds.len());
        let mut chunk = vec![0u8; 64 * 1024];
        while replies.len() < cmds.len() {
            match resp::decode(&mut self.buf).unwrap() {
                Some(Value::Error(e)) => panic!("redis: {}", String::from_utf8_lossy(&e)),
                Some(v) => replies.push(v),
                None => {
                    let got = self.s.read(&mut chunk).unwrap();
                    assert!(got > 0, "redis closed the connection");
                    self.buf.extend_from_slice(&chunk[..got]);
                }
            }
        }
        replies
    }

    /// The next value Redis sends unasked (a subscription's message).
    fn next_pushed(&mut self) -> Value {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(v) = resp::decode(&mut self.buf).unwrap() {
                return v;
            }
            let got = self.s.read(&mut chunk).unwrap();
            assert!(got > 0, "redis closed the connection");
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }

    fn call(&mut self, cmd: &[&str]) -> Value {
        let cmd: Vec<Vec<u8>> = cmd.iter().map(|a| a.as_bytes().to_vec()).collect();
        self.pipeline(&[cmd]).pop().unwrap()
    }
}

/// Room `big`'s key `suffix`.
fn key(suffix: &str) -> String {
    format!("pabal:{{r:big}}:{suffix}")
}

/// `EVAL <text>` on room `big`'s keys `suffixes`, with `args`.
fn eval(text: &str, suffixes: &[&str], args: &[String]) -> Vec<Vec<u8>> {
    let mut c = vec![
        b"EVAL".to_vec(),
        text.as_bytes().to_vec(),
        suffixes.len().to_string().into_bytes(),
    ];
    c.extend(suffixes.iter().map(|s| key(s).into_bytes()));
    c.extend(args.iter().map(|a| a.as_bytes().to_vec()));
    c
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// `user` joins room `big` (epoch 7 if it is new), as the engine's join call does.
fn join(user: &str) -> Vec<Vec<u8>> {
    eval(ROOM_JOIN.text, &["m", "u", "d"], &[s(7), s(user), s(1)])
}

/// `user` leaves room `big` (removed: the removal placed in the room's order).
fn leave(user: &str) -> Vec<Vec<u8>> {
    leave_trimming(user, 1000)
}

/// [`leave`], the room's stream kept to `max_len` entries.
fn leave_trimming(user: &str, max_len: u64) -> Vec<Vec<u8>> {
    let args = [s(user), s("r"), key("c"), s("PUBLISH"), s(max_len)];
    eval(ROOM_LEAVE.text, &["u", "k", "d", "m", "s", "x"], &args)
}

/// A message by `sender` in room `big`.
fn publish(sender: &str) -> Vec<Vec<u8>> {
    publish_in(7, sender)
}

/// A message by `sender` in room `big`, epoch `epoch` if the room is new.
fn publish_in(epoch: u64, sender: &str) -> Vec<Vec<u8>> {
    let mut tail = Vec::new();
    message_tail(&mut tail, 1, b"n/0/1", sender.as_bytes(), b"hi");
    let tail = String::from_utf8(tail).unwrap();
    let args = [s(epoch), tail, key("c"), s(""), s(16)];
    eval(
        &node_publish_script(PUBLISH, 1000, false),
        &["m", "s", "i"],
        &args,
    )
}

/// [`publish_in`] (epoch 7) with the stream entry in four fields, as a node with
/// `cluster.stream_entry = "fields"` sends it (`PUBLISH_FIELDS`), by `sender`, with repeat
/// key `repeat` (empty: none) and a window of `window` sequences.
fn publish_fields_keyed(sender: &str, repeat: &str, window: u64) -> Vec<Vec<u8>> {
    let args = [
        s(7),
        s(1),
        s("n/0/1"),
        s(sender),
        s("hi"),
        key("c"),
        s(repeat),
        s(window),
        s(sender.len()),
    ];
    let script = node_publish_script(PUBLISH_FIELDS, 1000, false);
    eval(&script, &["m", "s", "i"], &args)
}

/// A message in room `big` (epoch 7) by `script` (a form of `PUBLISH`), with repeat key
/// `repeat` (empty: none) and a window of `window` sequences.
fn publish_keyed(script: &str, repeat: &str, window: u64) -> Vec<Vec<u8>> {
    let mut tail = Vec::new();
    message_tail(&mut tail, 1, b"n/0/1", b"a", b"hi");
    let tail = String::from_utf8(tail).unwrap();
    let args = [s(7), tail, key("c"), s(repeat), s(window)];
    eval(
        &node_publish_script(script, 1000, false),
        &["m", "s", "i"],
        &args,
    )
}

/// The owner's stream read (`FILL`) of room `big` after `after`, 16 entries at most:
/// the room's epoch, its sequence and the page.
fn fill(r: &mut Redis, after: (u64, u64)) -> (u64, u64, StreamSpan) {
    let args = [
        format!("({}-{}", after.0, after.1),
        s(16),
        s(after.0),
        s(after.1),
    ];
    let reply = r
        .pipeline(&[eval(FILL, &["s", "x", "m"], &args)])
        .pop()
        .unwrap();
    parse_fill(&reply, b"", after).unwrap()
}

/// The sequences of `span`'s messages.
fn seqs_of(span: &StreamSpan) -> Vec<u64> {
    span.msgs.iter().map(|m| m.seq).collect()
}

/// Markers calls moving each of `users` to delivered `seq` in epoch `epoch`.
fn delivered(users: &[&str], seq: u64, epoch: u64) -> Vec<Vec<Vec<u8>>> {
    users
        .chunks(1000)
        .map(|chunk| {
            let mut args = vec![s(epoch), key("c"), s("PUBLISH")];
            for u in chunk {
                args.extend([s(u), s(seq), s(0)]);
            }
            eval(MARKERS.text, &["m", "u", "k", "d"], &args)
        })
        .collect()
}

/// Hand-off calls for one window until the last says no `more`, as the engine makes
/// them; each reads about a page at most (`HSCAN`'s `COUNT` is a hint: a few more).
fn handoff_all(
    r: &mut Redis,
    epoch: u64,
    last: u64,
    publisher: &str,
    other: u64,
    page: usize,
) -> Vec<HandoffPage> {
    let mut pages = Vec::new();
    loop {
        let p = handoff(r, epoch, last, publisher, other, page);
        assert!(
            p.read < 2 * page as u64,
            "call {} read {} members, page {page}",
            pages.len(),
            p.read
        );
        let more = p.more;
        pages.push(p);
        assert!(pages.len() <= 100, "the calls did not end");
        if !more {
            return pages;
        }
    }
}

/// One hand-off call: window ending at `last`, by `publisher`, `other` the last by
/// someone else.
fn handoff(
    r: &mut Redis,
    epoch: u64,
    last: u64,
    publisher: &str,
    other: u64,
    page: usize,
) -> HandoffPage {
    let args = [s(epoch), s(last), s(publisher), s(other), s(page)];
    let reply = r.pipeline(&[eval(HANDOFF.text, &["m", "u", "k", "h", "d"], &args)]);
    parse_handoff(&reply[0]).expect("a hand-off answer")
}

/// The owed `(user, first, last)` as a map by user (each once).
fn owed_by_user(pages: &[HandoffPage]) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for p in pages {
        for (user, first, last) in &p.owed {
            assert!(
                out.insert(user.to_string(), (*first, *last)).is_none(),
                "{user} owed twice"
            );
        }
    }
    out
}

fn score(r: &mut Redis, user: &str) -> Option<u64> {
    r.call(&["ZSCORE", &key("d"), user])
        .bytes()
        .map(|b| std::str::from_utf8(b).unwrap().parse().unwrap())
}

/// A private Redis (`name`) and a connection subscribed to room `big`'s channel.
fn subscribed(name: &str) -> Option<(RedisServer, Redis)> {
    let redis = RedisServer::start_with(name, &["--appendonly", "no"])?;
    let mut sub = Redis::connect(redis.port);
    sub.s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sub.call(&["SUBSCRIBE", &key("c")]);
    Some((redis, sub))
}

#[test]
fn the_publish_scripts_channel_message_carries_the_sender_whole_whatever_its_bytes() {
    let Some((redis, mut sub)) = subscribed("scripts-publish") else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    // The caller passes the sender's length in bytes (the scripts do not count it): a
    // multibyte name must come out whole, the payload after it untouched, from either
    // script, on the channel and from the stream.
    let cases = [
        ("bob", 1),
        ("짱구", 2),
        ("", 3),
        ("bob", 4),
        ("짱구", 5),
        ("", 6),
    ];
    for (sender, seq) in cases {
        let call = if seq <= 3 {
            publish(sender)
        } else {
            publish_fields_keyed(sender, "", 16)
        };
        let reply = r.pipeline(&[call]).pop().unwrap();
        assert_eq!(
            reply.bytes().map(|b| &b[..]),
            Some(format!("7 {seq}").as_bytes()),
            "\"<epoch> <seq>\" for {sender:?}"
        );
        assert_eq!(parse_published(&reply), Some((7, seq as u64, false)));
        let pushed = sub.next_pushed();
        let parts = pushed.array().unwrap();
        let body = bytes::Bytes::copy_from_slice(parts[2].bytes().unwrap());
        let (epoch, m) = parse_channel_message(&body, b"n/0/").expect("the channel message parses");
        assert_eq!(
            (epoch, m.seq, m.ts_ms, m.ticket),
            (7, seq as u64, 1, Some(1))
        );
        assert_eq!(m.sender.as_str(), sender);
        assert_eq!(&m.payload[..], b"hi");
    }
    // The stream holds both forms (three packed, three in fields); read back, each entry
    // is the message its channel carried.
    let entries = r.call(&["XRANGE", &key("s"), "-", "+"]);
    let got = parse_entries(&entries, b"n/0/")
        .expect("both forms parse")
        .msgs;
    assert_eq!(got.len(), cases.len());
    for (m, (sender, seq)) in got.iter().zip(cases) {
        assert_eq!((m.seq, m.ts_ms, m.ticket), (seq as u64, 1, Some(1)));
        assert_eq!((m.sender.as_str(), &m.payload[..]), (sender, &b"hi"[..]));
    }
    let raw = redis.cli(&["XRANGE", &key("s"), "-", "+"]);
    let names: Vec<&str> = raw.lines().map(str::trim).collect();
    let count = |f: &str| names.iter().filter(|n| **n == f).count();
    assert_eq!(
        (count("m"), count("t")),
        (3, 3),
        "three of each form: {raw}"
    );
}

#[test]
fn a_removal_is_placed_in_the_rooms_stream_and_channel_between_two_messages() {
    use pabal_codec::LeftReason;
    use pabal_relay::cluster::membership::parse_join_point;
    let Some((redis, mut sub)) = subscribed("scripts-removal") else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    let join_point = |r: &mut Redis, user: &str| {
        let jp = r.call(&["HGET", &key("u"), user]);
        parse_join_point(jp.bytes().unwrap()).unwrap()
    };
    // bob's removal after message 1; removing him again is no change (no second mark),
    // and his join after message 2 is a new membership with a later serial.
    r.pipeline(&[join("ann"), join("bob"), publish("ann")]);
    let was = join_point(&mut r, "bob");
    r.pipeline(&[leave("bob"), leave("bob"), publish("ann"), join("bob")]);
    let now = join_point(&mut r, "bob");
    assert_eq!((was.seq, now.seq), (0, 2));
    assert!(now.serial > was.serial, "{was:?} then {now:?}");
    assert!(join_point(&mut r, "ann").serial > 0);
    let span = parse_entries(&r.call(&["XRANGE", &key("s"), "-", "+"]), b"").unwrap();
    let seqs: Vec<u64> = span.msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(span.marks.len(), 1, "{:?}", span.marks);
    let mark = &span.marks[0];
    assert_eq!(
        (mark.place(), mark.user.as_str(), mark.join, mark.reason),
        ((1, 1), "bob", was, LeftReason::Removed)
    );
    // The channel carries the same, in the same order.
    let body = |v: Value| bytes::Bytes::copy_from_slice(v.array().unwrap()[2].bytes().unwrap());
    let first = body(sub.next_pushed());
    assert_eq!(parse_channel_message(&first, b"").unwrap().1.seq, 1);
    let (epoch, heard) = parse_channel_removal(&body(sub.next_pushed())).unwrap();
    assert_eq!((epoch, &heard), (7, mark));
    let second = body(sub.next_pushed());
    assert!(
        parse_channel_removal(&second).is_none(),
        "a message is not a removal"
    );
    assert_eq!(parse_channel_message(&second, b"").unwrap().1.seq, 2);
}

/// 1,100 removals after one message, and nobody publishes: the stream stays near its
/// length (it grew by one entry a removal before, to 1,101 entries), and the room's set of
/// removals keeps the last 1,024 (before, `1-10` sorted before `1-2` and went first).
/// Found by review.
#[test]
fn removals_keep_the_stream_to_its_length_and_the_set_keeps_the_last_ones() {
    use pabal_relay::cluster::membership::REMOVALS_KEPT;
    let Some(redis) = RedisServer::start_with("scripts-removals", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    const REMOVALS: usize = 1100;
    r.pipeline(&[publish("ann")]);
    let calls: Vec<_> = (0..REMOVALS)
        .flat_map(|i| {
            let user = format!("u{i}");
            [join(&user), leave_trimming(&user, 100)]
        })
        .collect();
    r.pipeline(&calls);
    let len = r.call(&["XLEN", &key("s")]).int().unwrap();
    assert!(len <= 100 + 64 + 100, "the stream's length: {len}");
    let kept = r.call(&["ZRANGE", &key("x"), "0", "-1"]);
    let subs: Vec<u64> = kept
        .array()
        .unwrap()
        .iter()
        .map(|v| {
            let body = bytes::Bytes::copy_from_slice(v.bytes().unwrap());
            parse_channel_removal(&body).unwrap().1.sub
        })
        .collect();
    let first = (REMOVALS - REMOVALS_KEPT + 1) as u64;
    let expected: Vec<u64> = (first..=REMOVALS as u64).collect();
    assert_eq!(subs, expected, "the last removals, in their order");
}

/// The owner's stream read (`FILL`) answers the room's epoch, and the removals
/// retention dropped from the stream after where it reads from (from the room's set of
/// last removals): bob's, after message 1, trimmed with messages 1 to 3. Found by the
/// cluster simulation (seed 451676): a node whose channel lagged jumped past the trimmed
/// messages and never applied the removal among them.
#[test]
fn a_stream_read_past_what_retention_dropped_brings_the_removals_among_it() {
    let Some(redis) = RedisServer::start_with("scripts-fill", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    r.pipeline(&[join("ann"), join("bob"), publish("ann"), leave("bob")]);
    r.pipeline(&[
        publish("ann"),
        publish("ann"),
        publish("ann"),
        publish("ann"),
    ]);
    let (epoch, seq, span) = fill(&mut r, (1, 0));
    assert_eq!(
        (epoch, seq, span.marks.len(), span.msgs.len()),
        (7, 5, 1, 4)
    );
    r.call(&["XTRIM", &key("s"), "MAXLEN", "2"]);
    let (epoch, _, span) = fill(&mut r, (1, 0));
    let seqs: Vec<u64> = span.msgs.iter().map(|m| m.seq).collect();
    assert_eq!((epoch, seqs), (7, vec![4, 5]));
    let marks: Vec<(u64, u64, &str)> = span
        .marks
        .iter()
        .map(|m| (m.seq, m.sub, m.user.as_str()))
        .collect();
    assert_eq!(
        marks,
        vec![(1, 1, "bob")],
        "from the set, the stream trimmed"
    );
    // Read from where the stream still holds: nothing from the set.
    let (_, _, span) = fill(&mut r, (4, 0));
    assert!(span.marks.is_empty() && span.msgs.len() == 1, "{span:?}");
    // The room lost in Redis: epoch 0.
    r.call(&["DEL", &key("m")]);
    assert_eq!(fill(&mut r, (5, 0)).0, 0);
}

/// A room's meta hash lost (evicted, say) while its stream was kept: the room starts
/// again (a join makes its meta hash under a new epoch, as a node's join does), its open
/// and its stream reads do not take the earlier epoch's entries for this one's, and its
/// first publish empties the old stream. Before, every `XADD` of the new epoch was
/// refused (its sequences at or below the old stream's top), so the room took no
/// message again, and its open answered the old messages as its tail.
#[test]
fn a_room_whose_meta_hash_was_lost_starts_again_past_its_old_stream() {
    let Some(redis) = RedisServer::start_with("scripts-meta-lost", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    r.pipeline(&[join("ann"), publish("ann"), publish("ann"), publish("ann")]);
    r.call(&["DEL", &key("m")]);
    r.pipeline(&[eval(
        ROOM_JOIN.text,
        &["m", "u", "d"],
        &[s(9), s("bob"), s(1)],
    )]);
    let open = r
        .pipeline(&[eval(OPEN, &["m", "s", "x"], &[s(9), s(100)])])
        .pop()
        .unwrap();
    let open = open.array().unwrap();
    assert_eq!((open[0].int(), open[1].int()), (Some(9), Some(0)));
    assert_eq!(
        open[2].array().map(<[Value]>::len),
        Some(0),
        "no tail: {open:?}"
    );
    let (epoch, seq, span) = fill(&mut r, (0, 0));
    assert_eq!((epoch, seq, seqs_of(&span)), (9, 0, vec![]));
    let reply = r.pipeline(&[publish_in(9, "bob")]).pop().unwrap();
    assert_eq!(parse_published(&reply), Some((9, 1, false)));
    assert_eq!(
        r.call(&["XLEN", &key("s")]).int(),
        Some(1),
        "the old stream gone"
    );
    assert_eq!(seqs_of(&fill(&mut r, (0, 0)).2), vec![1]);
}

/// A publish that carries an expiry (the last argument) sets the room's stream and window
/// of repeat keys to expire that long after it, in each form of the script; one without
/// leaves them as they are; a removal sets its stream's and the room's last removals'.
#[test]
fn a_publish_or_a_removal_with_an_expiry_sets_the_rooms_history_to_expire() {
    let Some(redis) = RedisServer::start_with("scripts-expiry", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    let expiring = |mut call: Vec<Vec<u8>>, ms: u64| {
        call.push(ms.to_string().into_bytes());
        call
    };
    let pttl = |r: &mut Redis, suffix: &str| r.call(&["PTTL", &key(suffix)]).int().unwrap();
    r.pipeline(&[join("ann"), join("bob"), publish("ann")]);
    assert_eq!(pttl(&mut r, "s"), -1, "no expiry asked");
    let forms = [
        publish_keyed(PUBLISH, "k1", 16),
        publish_keyed(PUBLISH_ASCENDING.as_str(), "k2", 16),
        publish_fields_keyed("ann", "k3", 16),
    ];
    let mut ms = 100_000;
    for form in forms {
        ms += 100_000;
        r.pipeline(&[expiring(form, ms)]);
        for suffix in ["s", "i"] {
            let left = pttl(&mut r, suffix);
            assert!(
                left > ms as i64 - 100_000 && left <= ms as i64,
                "{suffix}: {left}"
            );
        }
    }
    // Without one: left as it is.
    r.pipeline(&[publish_keyed(PUBLISH, "k4", 16)]);
    assert!(pttl(&mut r, "s") > 300_000);
    assert_eq!(pttl(&mut r, "x"), -2, "no removal yet");
    r.pipeline(&[expiring(leave("bob"), 900_000)]);
    for suffix in ["s", "x"] {
        let left = pttl(&mut r, suffix);
        assert!(left > 800_000 && left <= 900_000, "{suffix}: {left}");
    }
}

/// `RAISE` moves a room's sequence up to an owner's head, in the room's epoch only: the
/// next publish takes the one after; a head at or below it, or another epoch, changes
/// nothing.
#[test]
fn raise_moves_a_rooms_sequence_up_in_its_epoch_only() {
    let Some(redis) = RedisServer::start_with("scripts-raise", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    r.pipeline(&[publish("ann"), publish("ann")]);
    let answers: Vec<Option<i64>> = r
        .pipeline(&[
            raise(8, 9),
            raise(7, 2),
            raise(7, 1),
            raise(7, 5),
            raise(7, 5),
        ])
        .iter()
        .map(Value::int)
        .collect();
    assert_eq!(answers, vec![Some(0), Some(0), Some(0), Some(1), Some(0)]);
    let reply = r.pipeline(&[publish("ann")]).pop().unwrap();
    assert_eq!(parse_published(&reply), Some((7, 6, false)));
}

/// `RAISE` of room `big` to `head` in `epoch`.
fn raise(epoch: u64, head: u64) -> Vec<Vec<u8>> {
    eval(RAISE.text, &["m", "s", "i"], &[s(epoch), s(head)])
}

/// A room holding no sequence of its epoch (its meta hash recreated, every publish of the
/// new epoch lost) still holds an earlier epoch's stream and window: whatever raises it, a
/// publish naming its owner's head or `RAISE`, empties them as the epoch's first publish
/// would, or every `XADD` below the old stream's top would be refused.
#[test]
fn a_raise_of_a_room_without_a_sequence_empties_what_an_earlier_epoch_left() {
    let Some(redis) = RedisServer::start_with("scripts-raise-first", &["--appendonly", "no"])
    else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    let leftovers = |r: &mut Redis| {
        r.call(&["FLUSHALL"]);
        r.call(&["HSET", &key("m"), "e", "9"]);
        for seq in 1..=10 {
            let id = format!("{seq}-0");
            r.call(&["XADD", &key("s"), &id, "m", "old"]);
        }
        r.call(&["ZADD", &key("i"), "-3", "dold"]);
    };
    let seqs = |r: &mut Redis| -> Vec<u64> {
        let span = parse_entries(&r.call(&["XRANGE", &key("s"), "-", "+"]), b"").unwrap();
        span.msgs.iter().map(|m| m.seq).collect()
    };
    leftovers(&mut r);
    let call = with_owner_head(publish_keyed(PUBLISH, "dold", 16), (9, 5));
    let reply = r.pipeline(&[call]).pop().unwrap();
    assert_eq!(parse_published(&reply), Some((9, 6, false)));
    assert_eq!(seqs(&mut r), vec![6]);
    leftovers(&mut r);
    let answers: Vec<_> = r.pipeline(&[raise(9, 5)]).iter().map(Value::int).collect();
    assert_eq!(answers, vec![Some(1)]);
    assert_eq!(r.call(&["EXISTS", &key("s"), &key("i")]).int(), Some(0));
    let reply = r
        .pipeline(&[publish_keyed(PUBLISH, "dold", 16)])
        .pop()
        .unwrap();
    assert_eq!(parse_published(&reply), Some((9, 6, false)));
    assert_eq!(seqs(&mut r), vec![6]);
}

/// `call` (a form of the publish script, sent without an expiry) carrying its owner's
/// epoch and head, as an owner that holds the room sends it.
fn with_owner_head(mut call: Vec<Vec<u8>>, (epoch, head): (u64, u64)) -> Vec<Vec<u8>> {
    call.extend([Vec::new(), s(epoch).into_bytes(), s(head).into_bytes()]);
    call
}

/// Every form of the publish script, given its owner's head in the room's epoch, answers
/// a sequence past it (Redis lost the writes between): a head of another epoch, or below
/// the sequence, changes nothing. A repeat keeps the raise and answers its first sequence.
#[test]
fn a_publish_takes_a_sequence_past_its_owners_head_in_its_epoch_only() {
    let Some(redis) = RedisServer::start_with("scripts-owner-head", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    r.pipeline(&[publish("ann"), publish("ann")]);
    let call = |form: usize, repeat: &str, owner: (u64, u64)| {
        let call = match form % 3 {
            0 => publish_keyed(PUBLISH, repeat, 16),
            1 => publish_keyed(&PUBLISH_ASCENDING, repeat, 16),
            _ => publish_fields_keyed("a", repeat, 16),
        };
        with_owner_head(call, owner)
    };
    let calls = [
        call(0, "", (8, 9)),
        call(1, "", (7, 2)),
        call(2, "", (7, 10)),
        call(0, "", (7, 11)),
        call(1, "k1", (7, 20)),
        call(2, "k2", (7, 30)),
        call(0, "k3", (7, 40)),
        call(1, "k1", (7, 50)),
        publish("ann"),
    ];
    let answers: Vec<_> = r.pipeline(&calls).iter().map(parse_published).collect();
    let new = |seq| Some((7, seq, false));
    let expected = [new(3), new(4), new(11), new(12), new(21), new(31), new(41)];
    assert_eq!(answers[..7], expected);
    assert_eq!(
        answers[7],
        Some((7, 21, true)),
        "a repeat answers its first sequence"
    );
    assert_eq!(answers[8], new(51), "the raise a repeat made stays");
    // The stream holds exactly the sequences given: the lost ones are a gap.
    let span = parse_entries(&r.call(&["XRANGE", &key("s"), "-", "+"]), b"").unwrap();
    let seqs: Vec<u64> = span.msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 11, 12, 21, 31, 41, 51]);
}

#[test]
fn the_publish_window_answers_repeats_whichever_order_wrote_them_and_trims_by_sequence() {
    let Some(redis) = RedisServer::start_with("scripts-window", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    const WINDOW: u64 = 100;
    const LAST: u64 = 150;
    // The three forms a rolling upgrade can mix, each writing every third sequence; every
    // fifth sequence has no repeat key, and neither has any multiple of TRIM_EVERY (the
    // publishes that trim): a trim by a publish without a key keeps the window too.
    let forms = [
        (StreamEntry::Packed, WindowOrder::Descending),
        (StreamEntry::Packed, WindowOrder::Ascending),
        (StreamEntry::Fields, WindowOrder::Ascending),
    ];
    let call = |n: u64, repeat: &str| match forms[n as usize % forms.len()] {
        (StreamEntry::Packed, order) => {
            publish_keyed(publish_script(StreamEntry::Packed, order), repeat, WINDOW)
        }
        (StreamEntry::Fields, _) => publish_fields_keyed("a", repeat, WINDOW),
    };
    let keyed = |n: u64| !n.is_multiple_of(5) && !n.is_multiple_of(TRIM_EVERY);
    let calls: Vec<_> = (1..=LAST)
        .map(|n| {
            call(
                n,
                &if keyed(n) {
                    format!("k{n}")
                } else {
                    String::new()
                },
            )
        })
        .collect();
    for (n, reply) in (1..=LAST).zip(r.pipeline(&calls)) {
        assert_eq!(parse_published(&reply), Some((7, n, false)), "{reply:?}");
    }
    // Trimmed at 128: the keys of sequences 29 ..= 150 are kept, every one of them, in
    // both signs (positive from the ascending forms, negative from the other).
    let forgotten = 128 - WINDOW;
    let kept: Vec<u64> = (forgotten + 1..=LAST).filter(|&n| keyed(n)).collect();
    let card = r.call(&["ZCARD", &key("i")]).int().unwrap();
    assert_eq!(
        card as usize,
        kept.len(),
        "the window after its trim at 128"
    );
    let signs = r.call(&["ZRANGE", &key("i"), "0", "-1", "WITHSCORES"]);
    let scores: Vec<i64> = signs.array().unwrap()[1..]
        .iter()
        .step_by(2)
        .map(|v| v.int().unwrap())
        .collect();
    assert!(scores.iter().any(|&s| s < 0) && scores.iter().any(|&s| s > 0));
    // Each kept key, repeated through another form than the one that wrote it, answers
    // its first sequence and takes none.
    let repeats: Vec<_> = kept
        .iter()
        .map(|&n| call(n + 1, &format!("k{n}")))
        .collect();
    for (&n, reply) in kept.iter().zip(r.pipeline(&repeats)) {
        assert_eq!(
            parse_published(&reply),
            Some((7, n, true)),
            "key k{n}: {reply:?}"
        );
    }
    assert_eq!(r.call(&["HGET", &key("m"), "s"]).int(), Some(LAST as i64));
    // A key of a forgotten sequence is a new message.
    let reply = r.pipeline(&[call(1, "k1")]).pop().unwrap();
    assert_eq!(parse_published(&reply), Some((7, LAST + 1, false)));
    // The room's meta hash and stream lost, its window kept: the new epoch's first
    // sequence empties the window, so a key from before is a new message, not a repeat
    // answered with a sequence that names another message now.
    r.call(&["DEL", &key("m"), &key("s")]);
    let replies = r.pipeline(&[call(2, ""), call(3, "k149")]);
    assert_eq!(parse_published(&replies[0]), Some((7, 1, false)));
    assert_eq!(
        parse_published(&replies[1]),
        Some((7, 2, false)),
        "k149 of the epoch before"
    );
}

#[test]
fn a_large_rooms_handoff_reads_only_the_members_behind_a_page_at_a_time() {
    let Some(redis) = RedisServer::start_with("scripts-handoff", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    let users: Vec<String> = (0..5000).map(|i| format!("u{i:04}")).collect();
    let joins: Vec<_> = users.iter().map(|u| join(u)).collect();
    r.pipeline(&joins);
    r.pipeline(&[publish("u0000"), publish("u0000"), publish("u0000")]);
    // Every member but 50 received 1..=3 (the publisher among them).
    let behind: Vec<&str> = users
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 100 == 99)
        .map(|(_, u)| u.as_str())
        .collect();
    let acked: Vec<&str> = users
        .iter()
        .map(String::as_str)
        .filter(|u| !behind.contains(u))
        .collect();
    r.pipeline(&delivered(&acked, 3, 7));

    // The first window builds the index (a walk of the member hash, a page a call) and
    // hands off exactly the 50 behind.
    let first = handoff_all(&mut r, 7, 3, "u0000", 0, 1000);
    let want: BTreeMap<String, (u64, u64)> =
        behind.iter().map(|u| (u.to_string(), (1, 3))).collect();
    assert_eq!(owed_by_user(&first), want);
    assert_eq!(first.iter().map(|p| p.read).sum::<u64>(), 5000 + 50);
    // Handed off once: the same window again owes nothing and reads nothing.
    let again = handoff(&mut r, 7, 3, "u0000", 0, 1000);
    assert_eq!((again.read, again.owed.len()), (0, 0));

    // The next window reads only the members behind it: the 50 handed off up to 3 and
    // 20 who did not receive 4..=5; not the room's 5,000.
    r.pipeline(&[publish("u0000"), publish("u0000")]);
    let stalled: Vec<&str> = acked
        .iter()
        .copied()
        .filter(|u| u.ends_with("49"))
        .take(20)
        .collect();
    assert_eq!(stalled.len(), 20);
    let moving: Vec<&str> = acked
        .iter()
        .copied()
        .filter(|u| !stalled.contains(u))
        .collect();
    r.pipeline(&delivered(&moving, 5, 7));
    let second = handoff(&mut r, 7, 5, "u0000", 0, 1000);
    let behind_now: BTreeSet<&str> = behind.iter().chain(&stalled).copied().collect();
    assert_eq!(
        second.read, 70,
        "the call read more members than are behind"
    );
    let want: BTreeMap<String, (u64, u64)> =
        behind_now.iter().map(|u| (u.to_string(), (4, 5))).collect();
    assert_eq!(owed_by_user(std::slice::from_ref(&second)), want);

    // A window with 70 behind, a page of 30: three calls, each reading at most its page;
    // the publisher (behind, but owed only up to the last message by someone else, which
    // it was handed off already) is owed nothing and does not stop the paging.
    r.pipeline(&[publish("u0099")]);
    r.pipeline(&delivered(&moving, 6, 7));
    let mut pages = Vec::new();
    loop {
        let page = handoff(&mut r, 7, 6, "u0099", 5, 30);
        assert!(page.read <= 30, "a page read {} members", page.read);
        let more = page.more;
        pages.push(page);
        assert!(pages.len() <= 4, "paging did not end");
        if !more {
            break;
        }
    }
    let want: BTreeMap<String, (u64, u64)> = behind_now
        .iter()
        .filter(|u| **u != "u0099")
        .map(|u| (u.to_string(), (6, 6)))
        .collect();
    assert_eq!(owed_by_user(&pages), want);
    assert_eq!(score(&mut r, "u0099"), Some(5));
}

#[test]
fn a_large_room_from_before_the_index_is_indexed_a_page_a_call_and_kept_in_step_meanwhile() {
    let Some(redis) = RedisServer::start_with("scripts-build", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    // 5,000 members as the scripts before the index left them: join points, markers,
    // old hand-off marks, no index. Every 100th received nothing; the rest 1..=3 (half
    // by marker, half by an old mark).
    let users: Vec<String> = (0..5000).map(|i| format!("o{i:04}")).collect();
    r.call(&["HSET", &key("m"), "e", "7", "s", "3"]);
    for (n, chunk) in users.chunks(500).enumerate() {
        let mut members = vec!["HSET".to_string(), key("u")];
        let (mut markers, mut marks) = (members.clone(), vec!["HSET".to_string(), key("h")]);
        markers[1] = key("k");
        for (i, u) in chunk.iter().enumerate() {
            members.extend([u.clone(), "7:0:1".into()]);
            match (n * 500 + i) % 100 {
                99 => {}
                j if j % 2 == 0 => markers.extend([u.clone(), "7:3:0".into()]),
                _ => marks.extend([u.clone(), "7:3".into()]),
            }
        }
        for cmd in [&members, &markers, &marks] {
            r.call(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
    // The first call reads a page of the members, not 5,000.
    let first = handoff(&mut r, 7, 3, "o0000", 0, 1000);
    assert!(first.more, "the build is not through");
    assert!(
        first.read < 2000,
        "the first call read {} members",
        first.read
    );
    // Meanwhile a new member joins and one of those behind receives everything: the
    // index keeps both in step although it is still being built.
    r.pipeline(&[join("late")]);
    r.pipeline(&delivered(&["o4999"], 3, 7));
    let mut pages = vec![first];
    pages.extend(handoff_all(&mut r, 7, 3, "o0000", 0, 1000));
    let want: BTreeMap<String, (u64, u64)> = users
        .iter()
        .enumerate()
        .filter(|(i, u)| i % 100 == 99 && u.as_str() != "o4999")
        .map(|(_, u)| (u.clone(), (1, 3)))
        .collect();
    assert_eq!(owed_by_user(&pages), want);
    assert_eq!(score(&mut r, "late"), Some(3), "joined at the head");
    assert_eq!(r.call(&["ZCARD", &key("d")]).int(), Some(5001));
    assert_eq!(
        r.call(&["EXISTS", &key("h")]).int(),
        Some(0),
        "the old marks went"
    );
    // Built once: the same window again reads nothing.
    assert_eq!(handoff(&mut r, 7, 3, "o0000", 0, 1000).read, 0);
}

#[test]
fn a_room_from_before_the_index_is_indexed_once_on_first_use_and_kept_in_step() {
    let Some(redis) = RedisServer::start_with("scripts-migrate", &["--appendonly", "no"]) else {
        return;
    };
    let mut r = Redis::connect(redis.port);
    // A room as the scripts before the index left it: members, markers, old hand-off
    // marks (one of a member who left since), no index.
    for cmd in [
        vec!["HSET", &key("m"), "e", "7", "s", "5"],
        vec![
            "HSET",
            &key("u"),
            "a",
            "7:0:1",
            "b",
            "7:2:2",
            "c",
            "7:0:3",
            "d",
            "6:9:4",
            "e",
            "7:0:5",
        ],
        vec!["HSET", &key("k"), "a", "7:5:5", "c", "7:1:0"],
        vec!["HSET", &key("h"), "b", "7:4", "e", "7:5", "zed", "7:1"],
    ] {
        r.call(&cmd);
    }
    let page = handoff(&mut r, 7, 5, "a", 0, 1000);
    // a received everything, e was handed off everything; b from its old mark, c from
    // its marker, d's join point of another epoch counts as 0.
    let want: BTreeMap<String, (u64, u64)> = [("b", (5, 5)), ("c", (2, 5)), ("d", (1, 5))]
        .into_iter()
        .map(|(u, p)| (u.to_string(), p))
        .collect();
    assert_eq!(owed_by_user(std::slice::from_ref(&page)), want);
    assert_eq!(page.read, 5 + 3);
    assert_eq!(
        r.call(&["EXISTS", &key("h")]).int(),
        Some(0),
        "the old marks went into the index"
    );
    assert_eq!(r.call(&["ZCARD", &key("d")]).int(), Some(5), "members only");
    assert_eq!(
        r.call(&["HGET", &key("m"), "d"])
            .bytes()
            .map(|b| b.to_vec()),
        Some(b"7".to_vec())
    );
    // Built once: the next window reads only who is behind it.
    assert_eq!(handoff(&mut r, 7, 5, "a", 0, 1000).read, 0);

    // Kept in step: a join enters at its join point, a marker moves its member, a leave
    // and an undone join take their member out.
    r.pipeline(&[join("f"), publish("a")]);
    assert_eq!(score(&mut r, "f"), Some(5));
    r.pipeline(&delivered(&["b"], 6, 7));
    assert_eq!(score(&mut r, "b"), Some(6));
    r.pipeline(&[leave("c")]);
    assert_eq!(score(&mut r, "c"), None);
    let jp = r
        .call(&["HGET", &key("u"), "f"])
        .bytes()
        .map(|b| String::from_utf8(b.to_vec()).unwrap())
        .unwrap();
    r.pipeline(&[eval(ROOM_UNDO.text, &["u", "d"], &[s("f"), jp])]);
    assert_eq!(score(&mut r, "f"), None);
    let page = handoff(&mut r, 7, 6, "a", 0, 1000);
    let owed: BTreeSet<String> = page.owed.iter().map(|o| o.0.to_string()).collect();
    assert_eq!(
        owed,
        ["d", "e"].map(String::from).into_iter().collect(),
        "{page:?}"
    );
    assert_eq!(page.read, 3, "a (the publisher), d and e are behind 6");

    // A new epoch (the room's meta lost and created again): the index is built again,
    // nothing of the old epoch counts.
    r.call(&["DEL", &key("m"), &key("s")]);
    r.pipeline(&[publish_in(8, "x")]);
    let page = handoff(&mut r, 8, 1, "x", 0, 1000);
    let owed: BTreeSet<String> = page.owed.iter().map(|o| o.0.to_string()).collect();
    assert_eq!(
        owed,
        ["a", "b", "d", "e"].map(String::from).into_iter().collect(),
        "{page:?}"
    );
}
