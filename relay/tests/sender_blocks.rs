//! The heap blocks of a publish through a worker and of a cluster node's markers batch,
//! counted by dhat's heap profiler in testing mode: a message's sender and a batch's members
//! are the connections' shared name records, never copies (a copy was one block per
//! message, and one per member per tick).
//!
//! One test function: dhat allows one profiler at a time in a process, and tests of one
//! binary run on several threads.

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use bytes::Bytes;
use pabal_codec::{ClientFrame, ClientSession, Event, ServerFrame, Subscribe, Text};
use pabal_relay::cluster::{ClusterConfig, EngineCmd};
use pabal_relay::config::Config;
use pabal_relay::ids::UserName;
use pabal_relay::test_hooks::{MarkerUpdates, OneWorker};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Blocks and bytes asked for while `run` runs.
fn counted(run: impl FnOnce()) -> (u64, u64) {
    let before = dhat::HeapStats::get();
    run();
    let after = dhat::HeapStats::get();
    (
        after.total_blocks - before.total_blocks,
        after.total_bytes - before.total_bytes,
    )
}

/// Publishes in one read (one tick of the worker): what is made once per tick (the
/// mesh's and the dirty connections' lists) is shared by them all.
const PER_TICK: usize = 100;

/// A phone on `worker` as `user`, joined to room "dm"; its session and the room's alias.
fn phone(worker: &mut OneWorker, user: &str) -> (u64, ClientSession, u32) {
    let token = worker.connect().unwrap();
    let mut session = ClientSession::new();
    let hello = session.hello(Bytes::copy_from_slice(user.as_bytes()), 0);
    worker.send(token, &hello);
    let join = ClientFrame::Subscribe(Subscribe {
        room: true,
        name: Text::from("dm"),
    });
    worker.send(token, &join);
    for frame in worker.received(token) {
        session.apply(frame).unwrap();
    }
    let alias = session.alias_of("dm").unwrap();
    (token, session, alias)
}

/// The senders of the messages in `frames`, as `session` resolves them.
fn senders(frames: Vec<ServerFrame>, session: &mut ClientSession) -> Vec<Text> {
    frames
        .into_iter()
        .filter_map(|f| match session.apply(f).unwrap() {
            Event::Message { sender, .. } => Some(sender),
            _ => None,
        })
        .collect()
}

fn a_publish_allocates_nothing_for_its_sender() {
    let mut config = Config::default();
    config.limits.publish_rate = 1e9;
    config.limits.publish_burst = 1e9;
    // History stops growing: a counted publish evicts one as it appends one.
    config.retention.max_messages = 16;
    let mut worker = OneWorker::new(config);
    let (ann, mut ann_session, alias) = phone(&mut worker, "ann");
    let (bob, mut bob_session, _) = phone(&mut worker, "bob");
    let tick = |session: &mut ClientSession| -> Vec<ClientFrame> {
        (0..PER_TICK)
            .map(|i| {
                let body = Bytes::from(format!("message {i:08}"));
                session.publish(alias, body, None).1
            })
            .collect()
    };
    // Two ticks of warm-up: every buffer, pool and window reaches its steady size.
    for _ in 0..2 {
        let frames = tick(&mut ann_session);
        worker.send_all(ann, &frames);
        assert_eq!(
            senders(worker.received(bob), &mut bob_session).len(),
            PER_TICK
        );
        for frame in worker.received(ann) {
            ann_session.apply(frame).unwrap();
        }
    }
    let frames = tick(&mut ann_session);
    let (blocks, _) = counted(|| worker.send_all(ann, &frames));
    // Every counted publish reached bob, from ann.
    let from = senders(worker.received(bob), &mut bob_session);
    assert_eq!(from.len(), PER_TICK);
    assert!(from.iter().all(|s| s.as_str() == "ann"));
    // Per publish: the message's record in history (`Stored`, shared with every
    // delivery) and its payload's own copy (a small payload is copied out of the read
    // buffer, so that history does not pin it); per tick, a few lists. No block for the
    // sender: a copy of the name was a third block per publish.
    assert!(
        blocks < 3 * PER_TICK as u64,
        "{blocks} blocks for {PER_TICK} publishes: a block per publish besides the record \
         and the payload"
    );
}

fn a_markers_batch_shares_its_members_names() {
    let mut worker = OneWorker::cluster(Config {
        cluster: Some(ClusterConfig::default()),
        ..Config::default()
    });
    const MEMBERS: usize = 64;
    let members: Vec<UserName> = (0..MEMBERS)
        .map(|i| UserName::from(format!("member-{i:04}").as_str()))
        .collect();
    let mut out = Vec::with_capacity(16);
    let tick = |worker: &mut OneWorker, out: &mut Vec<EngineCmd>, delivered: u64| {
        let updates: Vec<(UserName, u64, u64)> =
            members.iter().map(|m| (m.clone(), delivered, 0)).collect();
        let updates = MarkerUpdates::new("dm", 7, &updates);
        out.clear();
        let (blocks, _) = counted(|| {
            worker.handle_markers(updates);
            worker.drain_engine(out);
        });
        blocks
    };
    // The first tick sizes the worker's maps; a later one is what every tick costs.
    tick(&mut worker, &mut out, 1);
    let blocks = tick(&mut worker, &mut out, 2);
    let batch = out
        .iter()
        .find_map(|cmd| match cmd {
            EngineCmd::Markers { markers, .. } => Some(markers),
            _ => None,
        })
        .unwrap();
    assert_eq!(batch.len(), MEMBERS);
    // Each entry is the member's own record.
    for (user, marker) in batch {
        assert_eq!(marker.delivered, 2);
        let mine = members.iter().find(|m| *m == user).unwrap();
        assert!(user.same_record(mine), "{user}'s name was copied");
    }
    // The batch's list (doubling as it fills: a handful of blocks), none per member (a
    // copy of each name was one block each).
    assert!(
        blocks < (MEMBERS / 4) as u64,
        "{blocks} blocks for a batch of {MEMBERS} members"
    );
}

#[test]
fn the_sender_and_markers_travel_as_the_shared_name_record() {
    let _profiler = dhat::Profiler::builder().testing().build();
    a_publish_allocates_nothing_for_its_sender();
    a_markers_batch_shares_its_members_names();
}
