//! Half-closes on the io_uring backend stay on the worker's thread: `shutdown_write` with
//! nothing in flight, and one queued behind a batch, both reach the peer as EOF after every
//! byte, and neither starts a thread of the ring's io-wq. io_uring cannot run
//! `IORING_OP_SHUTDOWN` without blocking and hands every one to an `iou-wrk-<tid>` thread:
//! a thread woken per closing TLS connection, which made io_uring's handshakes slower than
//! epoll's (benches/RESULTS.md, "TLS handshakes: io_uring against epoll"). Every backend's
//! half-close contract is [`super::shutdown_write_delivers_then_eof`]'s.
//!
//! Owns only these tests; the harness ([`Server`], [`Rec`]) is the parent module's.

use super::*;

/// Threads of the io-wq that serves rings created on the calling thread: io_uring names
/// them `iou-wrk-<tid>` after the task whose requests they run.
fn io_wq_workers_of_this_thread() -> usize {
    // "<pid>/task/<tid>"
    let link = std::fs::read_link("/proc/thread-self").unwrap();
    let tid = link.file_name().unwrap().to_string_lossy().into_owned();
    let name = format!("iou-wrk-{tid}");
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

/// A client that reads to EOF, checks it got `expect`, then says `bye` and closes.
fn reader_until_eof(addr: SocketAddr, expect: &'static [u8]) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut s = connect(addr);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, expect, "bytes before the relay's FIN");
        s.write_all(b"bye").unwrap();
    })
}

#[test]
fn uring_half_closes_start_no_io_wq_thread() {
    // A thread of our own: the ring's io-wq (and its threads' names) belong to the task
    // that submits, so nothing another test ran on a shared thread can be counted here.
    join(thread::spawn(|| {
        let Some(b) = make_uring(true) else {
            return;
        };
        let mut srv = Server::new(b);
        assert_eq!(io_wq_workers_of_this_thread(), 0, "no io-wq thread yet");
        // Half-closed with nothing in flight: at once.
        let client = reader_until_eof(srv.addr, b"hello");
        srv.until("the first accept", |s| s.s.accepted.len() == 1);
        let first = srv.s.accepted[0];
        srv.b
            .send(first, &mut [Bytes::from_static(b"hello")].into());
        srv.until("the first batch's sent", |s| !s.s.sent.is_empty());
        srv.b.shutdown_write(first);
        srv.until("the first peer's close", |s| s.s.closed.len() == 1);
        join(client);
        // Half-closed with the batch in flight: after it.
        let client = reader_until_eof(srv.addr, b"world");
        srv.until("the second accept", |s| s.s.accepted.len() == 2);
        let second = srv.s.accepted[1];
        srv.b
            .send(second, &mut [Bytes::from_static(b"world")].into());
        srv.b.shutdown_write(second);
        srv.until("the second peer's close", |s| s.s.closed.len() == 2);
        join(client);
        assert_eq!(srv.s.sent, vec![(first, 5), (second, 5)]);
        for token in [first, second] {
            assert_eq!(srv.s.rx.get(&token).map(Vec::as_slice), Some(&b"bye"[..]));
        }
        assert!(
            srv.s.closed.iter().all(|(_, r)| r.is_ok()),
            "{:?}",
            srv.s.closed
        );
        srv.assert_clean();
        assert_eq!(
            io_wq_workers_of_this_thread(),
            0,
            "a half-close ran on an io-wq thread (IORING_OP_SHUTDOWN always does)"
        );
    }));
}
