//! Sends at the phone's shape: a stream of one-buffer batches (a phone's usual batch: one
//! DELIVER) with a few batches of several buffers among them, and one large one-buffer batch
//! that meets a full socket. On every backend every byte arrives, in order, with one `sent`
//! per batch; on epoll a one-buffer batch goes out with `send(2)`, never through `sendmsg`
//! and its iovec import ([`crate::io::SendStats::vectored_writes`]), and a short one-buffer
//! write waits for the writable edge like a vectored one.
//!
//! Owns only these tests; the harness ([`Server`], [`Rec`]) is the parent module's.

use super::*;

/// A DELIVER frame's size at the phone's shape (32-byte payload).
const FRAME: usize = 37;
/// One-buffer batches in the stream.
const SINGLES: usize = 200;
/// Every this many one-buffer batches, one batch of [`PARTS`] buffers.
const MULTI_EVERY: usize = 50;
const PARTS: usize = 3;

for_each_backend!(
    one_buffer_batches_go_out_without_an_iovec,
    a_large_one_buffer_batch_waits_for_room
);

/// Sends `batch`, then ticks until its `sent`; returns the bytes it held.
fn send_and_wait(srv: &mut Server, token: Token, mut batch: VecDeque<Bytes>) -> usize {
    let bytes = batch.iter().map(Bytes::len).sum();
    let before = srv.s.sent.len();
    srv.b.send(token, &mut batch);
    assert!(batch.is_empty(), "send must drain the batch");
    srv.until("the batch's sent", |s| s.s.sent.len() > before);
    assert_eq!(srv.s.sent[before..], [(token, bytes)], "one sent per batch");
    bytes
}

/// The epoll backend's `sendmsg` calls, or `None` on a backend that does not count them.
fn vectored(srv: &Server) -> Option<u64> {
    (srv.b.name() == "epoll").then(|| srv.b.send_stats().vectored_writes)
}

fn one_buffer_batches_go_out_without_an_iovec(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    let multis = SINGLES / MULTI_EVERY;
    let total = SINGLES * FRAME + multis * PARTS * FRAME;
    let whole = Bytes::from(pattern(23, total));
    let expect = whole.clone();
    let addr = srv.addr;
    let client = thread::spawn(move || read_and_check(&mut connect(addr), &expect));
    srv.until("the accept", |s| s.s.accepted.len() == 1);
    let token = srv.s.accepted[0];
    let before = vectored(&srv);
    let mut at = 0;
    for i in 0..SINGLES {
        at += send_and_wait(
            &mut srv,
            token,
            [whole.slice(at..at + FRAME)].into_iter().collect(),
        );
        if (i + 1) % MULTI_EVERY == 0 {
            let parts = (0..PARTS).map(|p| whole.slice(at + p * FRAME..at + (p + 1) * FRAME));
            at += send_and_wait(&mut srv, token, parts.collect());
        }
    }
    assert_eq!(at, total);
    srv.until("the reader", |_| client.is_finished());
    join(client);
    if let (Some(before), Some(after)) = (before, vectored(&srv)) {
        // Small batches go out whole: one sendmsg per batch of several buffers, none for
        // the 200 of one buffer.
        assert_eq!(
            after - before,
            multis as u64,
            "one-buffer batches went through sendmsg: {:?}",
            srv.b.send_stats()
        );
    }
    srv.assert_clean();
}

/// One 4 MiB buffer into a 64 KiB socket buffer whose reader waits: the short one-buffer
/// write waits for room (no blind retry), and every byte arrives with one `sent`, none of
/// it through `sendmsg`.
fn a_large_one_buffer_batch_waits_for_room(b: Box<dyn Backend>) {
    let (srv, stats) = send_into_a_full_socket(b, 29, |whole| [whole.clone()].into());
    if srv.b.name() == "epoll" {
        assert_eq!(
            stats.vectored_writes, 0,
            "a one-buffer batch went through sendmsg"
        );
    }
    srv.assert_clean();
}
