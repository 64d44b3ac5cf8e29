//! End-to-end: presence through the server API (`GET /v1/users/{user}/presence`), once per
//! I/O backend: online while any of the user's connections is open, on any worker, and
//! offline once the last one closed.

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::{Duration, Instant};

use pabal_testkit::http::http;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};

fn online(relay: &TestRelay, user: &str) -> bool {
    let addr = relay.handle().control_addr().unwrap();
    let (status, body) = http(
        addr,
        "GET",
        &format!("/v1/users/{user}/presence"),
        None,
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], user, "{body}");
    body["online"].as_bool().unwrap()
}

/// A closed socket reaches the relay asynchronously: wait until presence says `want`.
fn until(relay: &TestRelay, user: &str, want: bool) {
    let deadline = Instant::now() + WAIT;
    while online(relay, user) != want {
        assert!(
            Instant::now() < deadline,
            "{user} never became online = {want}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

per_backend! {
    fn presence_follows_a_users_connections_across_devices(backend) {
        let relay = TestRelay::start(backend, 2, |_| {});
        assert!(!online(&relay, "ann"), "never connected");
        let phone = Client::connect(relay.addr, "ann");
        // WELCOME came: the connection is registered.
        assert!(online(&relay, "ann"));
        let laptop = Client::connect(relay.addr, "ann");
        assert!(!online(&relay, "bob"), "another user");
        drop(phone.drop_link());
        // One device left: still online.
        std::thread::sleep(Duration::from_millis(50));
        assert!(online(&relay, "ann"));
        drop(laptop.drop_link());
        until(&relay, "ann", false);
    }
}
