//! The io_uring connection record's bounds, over a socket: a receive's cancellation that
//! its count of cancellations in flight cannot hold is refused, and the connection is
//! closed with the typed error (`uring::record::CancelsExhausted`) instead of the count
//! wrapping; on the next pause of another connection the backend cancels as before.
//!
//! Owns only these tests; the harness ([`Server`], [`Rec`]) is the parent module's.

use super::*;
use crate::io::Transport;

#[test]
fn uring_a_cancellation_past_the_count_closes_the_connection_typed() {
    let opts = uring_opts(true);
    if let Err(e) = probe::probe_uring(&opts) {
        pabal_testkit::skip(format_args!("the io_uring variant: {e}"));
        return;
    }
    let mut srv = Server::new(Box::new(
        UringBackend::new(&opts).expect("io_uring backend"),
    ));
    let addr = srv.addr;
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let mut full = connect(addr);
        full.write_all(b"first").unwrap();
        let mut other = connect(addr);
        other.write_all(b"second").unwrap();
        let _ = wait.recv();
        other.write_all(b" and third").unwrap();
        (full, other)
    });
    srv.until("both connections' first bytes", |s| {
        s.s.rx.len() == 2 && s.s.rx.values().all(|v| !v.is_empty())
    });
    let (full, other) = (srv.s.accepted[0], srv.s.accepted[1]);
    srv.b.fill_cancels(full);
    srv.b.set_reading(full, false);
    srv.until("the refused connection's close", |s| !s.s.closed.is_empty());
    assert_eq!(srv.s.closed.len(), 1);
    let (token, reason) = &srv.s.closed[0];
    assert_eq!(*token, full);
    let error = reason.as_ref().expect_err("closed with an error");
    assert!(
        error.contains("cancellations already in flight"),
        "closed with {error:?}"
    );
    // The other connection pauses and resumes as always: its cancellation is counted and
    // completes, and no byte is lost across the pause.
    srv.b.set_reading(other, false);
    done.send(()).unwrap();
    srv.run_for(Duration::from_millis(100));
    assert_eq!(srv.s.rx[&other], b"second", "received while paused");
    srv.b.set_reading(other, true);
    srv.until("the rest after the resume", |s| {
        s.s.rx[&other].len() == b"second and third".len()
    });
    assert_eq!(srv.s.rx[&other], b"second and third");
    assert_eq!(srv.s.closed.len(), 1, "{:?}", srv.s.closed);
    drop(join(client));
    srv.assert_clean();
}
