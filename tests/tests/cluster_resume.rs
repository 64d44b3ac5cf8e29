//! End-to-end: a phone resumes on another cluster node from a cursor older than that
//! node's in-memory history (`retention.max_messages`), once per I/O backend. It must be
//! fed from the room's Redis stream, page by page (`cluster.fill_batch`), every message the
//! stream still holds in order and once, with a GAP for exactly what the stream's
//! retention (`cluster.stream_max_len`, trimmed approximately by Redis) dropped; and a
//! stream that nodes wrote in both entry forms (`cluster.stream_entry`: `fields` during a
//! rolling upgrade, `packed`) is read whole, in order, by a node that holds none of it.

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::{Duration, Instant};

use bytes::Bytes;
use pabal_codec::Event;
use pabal_relay::cluster::{ClusterConfig, StreamEntry, WindowOrder};
use pabal_relay::io::BackendKind;
use pabal_testkit::redis::RedisServer;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};

/// Messages a node keeps in memory per room: far fewer than the stream.
const MEMORY: usize = 50;
/// Messages the stream keeps (about: `XTRIM MAXLEN ~` trims whole nodes of entries).
const STREAM: u64 = 300;
/// Messages per stream page.
const PAGE: usize = 32;

fn node(backend: BackendKind, redis: &RedisServer, id: &str) -> TestRelay {
    node_writing(backend, redis, id, StreamEntry::Packed)
}

/// A node that writes its stream entries as `entry`.
fn node_writing(
    backend: BackendKind,
    redis: &RedisServer,
    id: &str,
    entry: StreamEntry,
) -> TestRelay {
    let cluster = ClusterConfig {
        redis: vec![redis.url()],
        node_id: Some(id.into()),
        stream_max_len: STREAM,
        stream_entry: entry,
        // The versions `fields` is for predate `window_order` too.
        window_order: match entry {
            StreamEntry::Fields => WindowOrder::Ascending,
            StreamEntry::Packed => WindowOrder::Descending,
        },
        fill_batch: PAGE,
        ..ClusterConfig::default()
    };
    TestRelay::cluster_node(backend, cluster, |c| c.retention.max_messages = MEMORY)
}

/// The first sequence `room`'s stream still holds.
fn stream_first(redis: &RedisServer, room: &str) -> u64 {
    let key = format!("pabal:{{r:{room}}}:s");
    let out = redis.cli(&["XRANGE", &key, "-", "+", "COUNT", "1"]);
    let id = out.lines().next().unwrap_or_default();
    id.strip_suffix("-0")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{key} holds no entry: {out:?}"))
}

/// Reads `alias` until `last`: the GAPs and the sequences delivered, in arrival order.
/// Panics on a duplicate, a reordering or after [`WAIT`].
fn read_to(client: &mut Client, alias: u32, last: u64) -> (Vec<(u64, u64)>, Vec<u64>) {
    let (mut gaps, mut seqs) = (Vec::new(), Vec::<u64>::new());
    let deadline = Instant::now() + WAIT * 2;
    while seqs.last().copied() != Some(last) {
        assert!(
            Instant::now() < deadline,
            "stuck at {:?} of {last}",
            seqs.last()
        );
        match client.next_event(Duration::from_millis(100)) {
            Some(Event::Message {
                alias: a,
                seq: Some(seq),
                payload,
                ..
            }) if a == alias => {
                assert!(seqs.last().is_none_or(|&l| l < seq), "{seq} after {seqs:?}");
                assert_eq!(payload, Bytes::from(format!("m-{seq}")));
                seqs.push(seq);
            }
            Some(Event::Gap {
                alias: a, from, to, ..
            }) if a == alias => gaps.push((from, to)),
            _ => {}
        }
    }
    (gaps, seqs)
}

per_backend! {
    fn a_phone_resumes_past_the_nodes_memory_from_the_stream(backend) {
        let Some(redis) = RedisServer::start("deep-resume") else { return };
        let (a, b) = (node(backend, &redis, "da"), node(backend, &redis, "db"));
        const ROOM: &str = "room:cluster-deep-resume";
        const COUNT: u64 = 1000;
        // Two phones joined on both nodes before anything is published (membership is per
        // node in this version), so their join points are the room's start everywhere.
        let mut old = Client::connect(a.addr, "old");
        let old_alias = old.join(ROOM);
        let mut near = Client::connect(a.addr, "near");
        let near_alias = near.join(ROOM);
        Client::connect(b.addr, "old").join(ROOM);
        Client::connect(b.addr, "near").join(ROOM);
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        let publish = |p: &mut Client, from: u64, to: u64| {
            for seq in from..=to {
                assert_eq!(p.publish_acked(pa, format!("m-{seq}").into_bytes()), seq);
            }
        };
        // "old" reads five messages and goes away: its cursor is 5.
        publish(&mut p, 1, 5);
        assert_eq!(old.messages(old_alias, 5).len(), 5);
        let old_session = old.drop_link();
        // The room runs on far past both the node's memory and the stream's retention.
        publish(&mut p, 6, COUNT);
        let first = stream_first(&redis, ROOM);
        assert!(first > 6, "retention has not trimmed the stream: it starts at {first}");
        assert!(first + 20 < COUNT - MEMORY as u64, "the stream reaches before node b's memory");
        // "near" reads up to a cursor the stream still holds, well before node b's memory.
        let near_cursor = first + 20;
        let got = near.messages(near_alias, near_cursor as usize);
        assert_eq!(got.last().map(|m| m.0), Some(near_cursor));
        let near_session = near.drop_link();

        // Both resume on node b, which holds only the last MEMORY messages in memory.
        let mut old = Client::connect_with(b.addr, "old", old_session);
        let (gaps, seqs) = read_to(&mut old, old_alias, COUNT);
        assert_eq!(gaps, vec![(6, first - 1)], "a GAP for exactly what retention dropped");
        assert_eq!(seqs, (first..=COUNT).collect::<Vec<_>>(), "every message the stream holds, in order, once");

        let mut near = Client::connect_with(b.addr, "near", near_session);
        let (gaps, seqs) = read_to(&mut near, near_alias, COUNT);
        assert_eq!(gaps, vec![], "nothing after its cursor was dropped");
        assert_eq!(seqs, (near_cursor + 1..=COUNT).collect::<Vec<_>>());
    }

    fn a_stream_written_in_both_entry_forms_is_read_whole_by_another_node(backend) {
        let Some(redis) = RedisServer::start("mixed-entries") else { return };
        // A rolling upgrade's middle: one node still writes four fields, one packs.
        let a = node_writing(backend, &redis, "ma", StreamEntry::Fields);
        let b = node_writing(backend, &redis, "mb", StreamEntry::Packed);
        let c = node(backend, &redis, "mc");
        const ROOM: &str = "room:cluster-mixed-entries";
        // Past a node's memory, inside the stream's retention.
        const COUNT: u64 = 2 * MEMORY as u64 + 20;
        let mut reader = Client::connect(a.addr, "reader");
        let alias = reader.join(ROOM);
        for n in [&b, &c] {
            Client::connect(n.addr, "reader").join(ROOM);
        }
        let session = reader.drop_link();
        let (mut pa, mut pb) = (Client::connect(a.addr, "alice"), Client::connect(b.addr, "bob"));
        let (aa, ab) = (pa.join(ROOM), pb.join(ROOM));
        for seq in 1..=COUNT {
            let (p, alias) = if seq % 2 == 1 { (&mut pa, aa) } else { (&mut pb, ab) };
            assert_eq!(p.publish_acked(alias, format!("m-{seq}").into_bytes()), seq);
        }
        // Both forms are in the stream, interleaved.
        let key = format!("pabal:{{r:{ROOM}}}:s");
        let entries = redis.cli(&["XRANGE", &key, "1-0", "2-0"]);
        let fields: Vec<&str> = entries.lines().map(str::trim).collect();
        assert!(fields.contains(&"t") && fields.contains(&"m"), "{entries}");
        // The reader resumes from its cursor (0) on a node that holds none of the room: every
        // message from the stream, in order, once.
        let mut reader = Client::connect_with(c.addr, "reader", session);
        let (gaps, seqs) = read_to(&mut reader, alias, COUNT);
        assert_eq!(gaps, vec![], "nothing was dropped");
        assert_eq!(seqs, (1..=COUNT).collect::<Vec<_>>());
    }
}
