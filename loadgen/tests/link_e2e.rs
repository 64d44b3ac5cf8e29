//! The link model measured against itself end to end: a real relay, real sockets, and
//! phones whose links shape what the relay sends them.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::sync::Mutex;

use pabal_loadgen::link::LinkProfile;
use pabal_loadgen::plan::{PlanBuilder, SendPlan};
use pabal_loadgen::run::run;
use pabal_loadgen::scenario::Arrivals;
use pabal_relay::io::BackendKind;
use pabal_testkit::TestRelay;

/// The two tests measure time: they must not share the two cores with each other.
static SERIAL: Mutex<()> = Mutex::new(());

/// One phone on a 400 kbit/s link (no delay, loss or radio) receives ~100 KB that the relay
/// has for it as fast as it can: it gets them at 400 kbit/s = 50,000 B/s, within 15%.
#[test]
fn a_burst_arrives_at_the_links_rate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = TestRelay::start(BackendKind::Epoll, 1, |c| {
        c.limits.publish_rate = 1000.0;
        c.limits.publish_burst = 1000.0;
    });
    let mut b = PlanBuilder::new();
    let room = b.room("burst", false);
    let mut send = SendPlan::to_rooms(&[room], 6000.0, 1000);
    send.arrivals = Arrivals::Uniform;
    send.max_count = Some(100);
    let sender = b.phone(
        "sender",
        LinkProfile::unshaped("unshaped"),
        &[room],
        Some(send),
    );
    let slow = LinkProfile {
        down_kbps: Some(400),
        up_kbps: Some(400),
        ..LinkProfile::unshaped("400k")
    };
    let receiver = b.phone("receiver", slow, &[room], None);
    let report = run(common::config(b.build(), relay.local_addr(), 2.0, 10.0)).unwrap();
    assert!(report.passed(), "{}", pabal_loadgen::report::table(&report));
    let mut got: Vec<_> = report
        .metrics
        .trace
        .as_ref()
        .unwrap()
        .iter()
        .filter(|d| d.phone == receiver && d.sender == sender)
        .copied()
        .collect();
    got.sort_by_key(|d| d.seq);
    assert_eq!(got.len(), 100, "every message arrives");
    // From the 10th delivery to the last: the link is saturated by then.
    let bytes: u64 = got[10..].iter().map(|d| u64::from(d.frame_len)).sum();
    let span_ns = got[99].at_ns - got[9].at_ns;
    let rate = bytes as f64 / (span_ns as f64 / 1e9);
    eprintln!("burst: {rate:.0} B/s (link: 50,000 B/s)");
    assert!(
        (42_500.0..=57_500.0).contains(&rate),
        "{rate:.0} B/s over {bytes} B in {:.3} s, expected 50,000 B/s +-15%",
        span_ns as f64 / 1e9
    );
    relay.stop();
}

/// A 200 ms one-way delay on the receiver's link adds about 200 ms (within 20%) to each
/// message's delivery compared with an unshaped receiver of the same messages.
#[test]
fn a_one_way_delay_adds_itself_to_delivery() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = TestRelay::start(BackendKind::Epoll, 1, |_| {});
    let mut b = PlanBuilder::new();
    let room = b.room("delay", false);
    let mut send = SendPlan::to_rooms(&[room], 300.0, 64);
    send.arrivals = Arrivals::Uniform;
    send.max_count = Some(20);
    let sender = b.phone(
        "sender",
        LinkProfile::unshaped("unshaped"),
        &[room],
        Some(send),
    );
    let fast = b.phone("fast", LinkProfile::unshaped("unshaped"), &[room], None);
    let delayed = LinkProfile {
        delay_ms: 200,
        ..LinkProfile::unshaped("delay200")
    };
    let slow = b.phone("slow", delayed, &[room], None);
    let report = run(common::config(b.build(), relay.local_addr(), 5.0, 5.0)).unwrap();
    assert!(report.passed(), "{}", pabal_loadgen::report::table(&report));
    let trace = report.metrics.trace.as_ref().unwrap();
    let e2e = |phone| {
        trace
            .iter()
            .filter(|d| d.phone == phone && d.sender == sender)
            .map(|d| d.e2e_ns)
            .collect::<Vec<_>>()
    };
    let (f, s) = (e2e(fast), e2e(slow));
    assert_eq!((f.len(), s.len()), (20, 20));
    let added_ms = (common::median(s) as f64 - common::median(f) as f64) / 1e6;
    eprintln!("delay: the 200 ms link added {added_ms:.1} ms");
    assert!(
        (160.0..=240.0).contains(&added_ms),
        "the delayed link added {added_ms:.1} ms, expected 200 ms +-20%"
    );
    // The link baseline sees the same 200 ms.
    let link: Vec<u64> = trace
        .iter()
        .filter(|d| d.phone == slow)
        .filter_map(|d| d.link_ns)
        .collect();
    let link_ms = common::median(link) as f64 / 1e6;
    assert!(
        (195.0..=215.0).contains(&link_ms),
        "link baseline {link_ms:.1} ms"
    );
    relay.stop();
}
