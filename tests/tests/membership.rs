//! End-to-end: who may read what. A member reads a room from the moment they joined, never
//! before and never while removed, whatever a resume entry claims; and the last frame of a
//! connection the relay ends is that GOAWAY or fatal ERROR, after the PUBACKs it owes.
//! Once per I/O backend.

#![allow(clippy::unwrap_used)] // reason: tests

use bytes::{Bytes, BytesMut};
use pabal_codec::{Event, ResumeEntry, ServerFrame, room_id};
use pabal_testkit::{Client, TestRelay, forged_resume, per_backend};

fn delivered(frames: &[ServerFrame]) -> usize {
    frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::Deliver(_)))
        .count()
}

fn room_cursor(frames: &[ServerFrame]) -> Option<u64> {
    frames.iter().find_map(|f| match f {
        ServerFrame::Room(r) => Some(r.cursor),
        _ => None,
    })
}

per_backend! {
    fn a_forged_resume_reads_nothing_from_before_the_join(backend) {
        let relay = TestRelay::start(backend, 1, |_| {});
        let mut ann = Client::connect(relay.addr, "ann");
        let a = ann.join("club");
        for i in 1..=5 {
            ann.publish_acked(a, format!("before-{i}").into_bytes());
        }
        let mut mallory = Client::connect(relay.addr, "mallory");
        let m = mallory.join("club");
        let epoch = mallory.session.room(m).unwrap().epoch;
        drop(mallory);
        for forged_epoch in [epoch, 0, epoch + 1] {
            let entry = ResumeEntry { room_id: room_id(false, "club"), epoch: forged_epoch, last_seq: 0 };
            let frames = forged_resume(relay.addr, "mallory", &[entry]);
            assert_eq!(delivered(&frames), 0, "epoch {forged_epoch}: {frames:?}");
            assert_eq!(room_cursor(&frames), Some(5), "epoch {forged_epoch}: {frames:?}");
        }
    }

    fn a_fatal_error_comes_after_the_puback_it_follows(backend) {
        let relay = TestRelay::start(backend, 2, |_| {});
        let mut ann = Client::connect(relay.addr, "ann");
        // A room owned by the other worker, so the PUBACK comes back through the mesh.
        let other = 1 - ann.worker() as usize;
        let name = (0..)
            .map(|i| format!("room-{i}"))
            .find(|n| {
                pabal_relay::ids::RoomName::new(false, pabal_codec::Text::from(n.as_str())).owner(2) == other
            })
            .unwrap();
        let a = ann.join(&name);
        let (_, publish) = ann.session.publish(a, Bytes::from_static(b"hello"), None);
        let mut bytes = BytesMut::new();
        publish.encode(&mut bytes);
        bytes.extend_from_slice(&[0x01, 0x1f]); // a frame of an unknown type
        ann.send_raw(&bytes).unwrap();
        let events = ann.until_closed();
        assert!(
            matches!(&events[..], [.., Event::PubAck { seq: 1, .. }, Event::Error(e)] if e.fatal),
            "{events:?}"
        );
    }
}
