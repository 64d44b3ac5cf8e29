//! The verifier catches what it is there to catch. Fabricated streams with holes go in;
//! violations must come out (a verifier that cannot fail would pass a lossy relay).

#![allow(clippy::unwrap_used, reason = "tests")]

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use mio::{Poll, Token};
use pabal_codec::{Deliver, DeliverHeader, Room, ServerFrame, Text, Welcome, room_id};
use pabal_loadgen::api::Tokens;
use pabal_loadgen::ledger::{Claim, Conflict, Ledger, Msg};
use pabal_loadgen::link::LinkProfile;
use pabal_loadgen::metrics::{Metrics, histogram};
use pabal_loadgen::payload::Header;
use pabal_loadgen::phone::{Ctx, Phone, PhoneSettings, Shared, UplinkTimes};
use pabal_loadgen::plan::{PlanBuilder, SendPlan};
use pabal_loadgen::targets::Targets;
use pabal_loadgen::verify::{
    EndState, Kind, PhoneEnd, RoomEnd, Thresholds, Violations, final_check,
};

fn msg(sender: u32, counter: u32) -> Msg {
    Msg { sender, counter }
}

/// The relay acknowledged 1..=5; a phone that is connected and quiet holds only 1 and 2.
/// Nothing announced the rest: silent loss, with the phone, room and range named.
#[test]
fn a_hole_at_the_end_is_reported_as_silent_loss() {
    let ledger = Ledger::new(1, 2);
    let mut out = Vec::new();
    for seq in 1..=5 {
        ledger.ack(0, seq, msg(0, seq as u32), 0, &mut out);
    }
    for seq in 1..=2 {
        let claim = Claim {
            room: 0,
            seq,
            phone: 1,
            msg: msg(0, seq as u32),
        };
        ledger.claim(claim, 0, &mut out);
    }
    assert!(out.is_empty());
    let phone = PhoneEnd::new(
        "1 (u1)",
        EndState::Quiet,
        vec![RoomEnd { room: 0, cursor: 2 }],
    );
    let mut violations = Violations::default();
    let summary = final_check(
        |r| ledger.last_acked(r),
        &[phone],
        |_| "dm-0".into(),
        &Thresholds::default(),
        &mut violations,
    );
    assert_eq!(summary.silent_loss_pairs, 1);
    assert_eq!(summary.silent_loss_messages, 3);
    assert_eq!(violations.count(Kind::SilentLoss), 1);
    let example = violations.examples[0].to_string();
    assert!(
        example.contains("1 (u1)") && example.contains("dm-0") && example.contains("3..=5"),
        "{example}"
    );
}

/// A second message acknowledged under a sequence, or one message under two sequences.
#[test]
fn swapped_and_duplicated_messages_are_caught() {
    let ledger = Ledger::new(1, 2);
    let mut out = Vec::new();
    ledger.ack(0, 1, msg(0, 1), 0, &mut out);
    ledger.ack(0, 2, msg(1, 1), 0, &mut out);
    assert!(out.is_empty());
    ledger.ack(0, 1, msg(1, 2), 0, &mut out);
    assert!(
        matches!(out.as_slice(), [Conflict::AckedTwice { .. }]),
        "{out:?}"
    );
    out.clear();
    ledger.ack(0, 3, msg(0, 1), 0, &mut out);
    assert!(
        matches!(out.as_slice(), [Conflict::Duplicate { .. }]),
        "{out:?}"
    );
}

fn deliver(alias: u32, seq: Option<u64>, new_sender: Option<&str>, payload: Bytes) -> ServerFrame {
    ServerFrame::Deliver(Deliver {
        header: DeliverHeader {
            alias,
            seq,
            ephemeral: false,
            sender_alias: 0,
            new_sender: new_sender.map(Text::from),
            ts_delta_ms: 0,
        },
        payload,
    })
}

/// A phone receives sequence 1, then 3: the relay skipped 2 without a GAP. The phone's
/// session refuses it and the verifier records a violation naming the phone and the room.
#[test]
fn a_hole_in_a_live_stream_is_a_violation() {
    let mut b = PlanBuilder::new();
    let room = b.room("hole", false);
    b.phone(
        "u0",
        LinkProfile::unshaped("u"),
        &[room],
        Some(SendPlan::to_rooms(&[room], 1.0, 20)),
    );
    b.phone("u1", LinkProfile::unshaped("u"), &[room], None);
    let plan = b.build();
    let now = Instant::now();
    let shared = Shared {
        ledger: Ledger::new(plan.rooms.len(), plan.phones.len()),
        uplink: UplinkTimes::new(&plan),
        plan,
        start: now,
        steady_start: now,
        publish_end: now + Duration::from_secs(60),
        targets: Targets::one(SocketAddr::from(([127, 0, 0, 1], 9))),
        tokens: Tokens::UserId,
        settings: PhoneSettings::default(),
        source_ips: Vec::new(),
        stop: AtomicBool::new(false),
    };
    let poll = Poll::new().unwrap();
    let mut metrics = Metrics::new(1, false);
    let mut violations = Violations::default();
    let mut second: Histogram<u64> = histogram();
    let mut second_relay: Histogram<u64> = histogram();
    let mut scratch = vec![0u8; 1024];
    let mut connected = 0;
    let mut gaps = Vec::new();
    let mut ctx = Ctx {
        shared: &shared,
        registry: poll.registry(),
        metrics: &mut metrics,
        violations: &mut violations,
        second: &mut second,
        second_relay: &mut second_relay,
        scratch: &mut scratch,
        connected: &mut connected,
        gaps: &mut gaps,
        now,
    };
    let mut phone = Phone::new(&shared, 1, Token(0), now);
    let payload = |counter| {
        Header {
            intended_ns: 0,
            sender: 0,
            counter,
            flags: 0,
        }
        .payload(24)
    };
    phone.feed_frame(
        ServerFrame::Welcome(Welcome {
            version: 1,
            conn_id: 1,
            server_time_ms: 0,
            heartbeat_secs: 30,
            max_frame_len: 65536,
            user: Text::from("u1"),
        }),
        &mut ctx,
    );
    phone.feed_frame(
        ServerFrame::Room(Room {
            alias: 0,
            channel: false,
            room_id: room_id(false, "hole"),
            epoch: 5,
            cursor: 0,
            head: 3,
            name: Text::from("hole"),
        }),
        &mut ctx,
    );
    phone.feed_frame(deliver(0, None, Some("u0"), payload(1)), &mut ctx);
    assert_eq!(ctx.violations.total(), 0, "sequence 1 is fine");
    phone.feed_frame(deliver(0, Some(3), None, payload(3)), &mut ctx);
    assert_eq!(
        ctx.violations.count(Kind::Session),
        1,
        "{:?}",
        ctx.violations
    );
    let example = ctx.violations.examples[0].to_string();
    assert!(
        example.contains("(u1)") && example.contains("hole"),
        "{example}"
    );
    assert_eq!(ctx.metrics.counters.delivered, 1);
}
