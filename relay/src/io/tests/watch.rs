//! A watched descriptor (`Backend::watch_readable`: a cluster engine's own poll, run on the
//! worker's thread) ends the backend's wait when it becomes readable, and
//! `Backend::watch_fired` says so once: true after it signalled, false again until it
//! signals anew. The descriptor here is what the engine's is: a mio poll, made readable by
//! its waker from another thread.
//!
//! Owns only these tests; the harness ([`Server`], [`Rec`]) is the parent module's.

use super::*;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use mio::{Events, Poll, Waker};

for_each_backend!(a_watched_poll_ends_the_wait_and_is_reported_once_per_signal);

fn a_watched_poll_ends_the_wait_and_is_reported_once_per_signal(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    let mut inner = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(inner.registry(), mio::Token(0)).unwrap());
    srv.b.watch_readable(inner.as_raw_fd()).unwrap();
    let mut events = Events::with_capacity(4);
    // Nothing ready yet: a wait ends by its timeout, and nothing is reported.
    srv.b.poll(Some(TICK), &mut srv.s).unwrap();
    assert!(!srv.b.watch_fired(), "reported before anything signalled");
    for round in 0..3 {
        // Woken from another thread while the backend waits (up to LIMIT).
        let w = waker.clone();
        let wake = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            w.wake().unwrap();
        });
        let mut fired = false;
        let deadline = Instant::now() + LIMIT;
        while !fired && Instant::now() < deadline {
            srv.b.poll(Some(LIMIT), &mut srv.s).unwrap();
            fired = srv.b.watch_fired();
        }
        join(wake);
        assert!(
            fired,
            "round {round}: the watched poll's signal never ended a wait"
        );
        assert!(
            !srv.b.watch_fired(),
            "round {round}: one signal reported twice"
        );
        // Its owner reads it (the engine's pass); nothing new after that.
        inner.poll(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.iter().count(), 1, "round {round}: the waker's event");
        srv.b.poll(Some(TICK), &mut srv.s).unwrap();
        assert!(
            !srv.b.watch_fired(),
            "round {round}: reported with nothing new"
        );
    }
}
