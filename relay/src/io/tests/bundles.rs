//! io_uring receive bundles (`IORING_RECVSEND_BUNDLE`): a burst of small frames read in
//! fewer completions than frames, a bundle across the buffer ring's wrap, a ring that runs
//! dry mid-bundle, each with bundles on and with the plain multishot receive forced
//! (`BackendOptions::uring_recv_bundle = false`); the burst also on epoll, unchanged.
//!
//! Owns only these tests; the harness ([`Server`], [`Rec`]) is the parent module's.

use std::sync::mpsc;

use super::*;

/// An ACK-sized frame: a burst is many of them in one write.
const FRAME: usize = 16;

fn uring_server(count: u16, size: u32, bundle: bool) -> Option<Server<UringBackend>> {
    let opts = BackendOptions {
        buf_ring_count: count,
        buf_size: size,
        uring_recv_bundle: bundle,
        ..uring_opts(true)
    };
    if let Err(e) = probe::probe_uring(&opts) {
        pabal_testkit::skip(format_args!("the io_uring variant: {e}"));
        return None;
    }
    Some(Server::new(Box::new(
        UringBackend::new(&opts).expect("io_uring backend"),
    )))
}

/// Whether the backend runs bundles; where the test asked for them and the kernel has
/// none, says so (the count assertions then do not apply).
fn bundles_run(srv: &Server<UringBackend>, asked: bool) -> bool {
    let (running, _) = srv.b.receive_bundles();
    if asked && !running {
        pabal_testkit::skip(format_args!(
            "the kernel lacks receive bundles: only the data is checked"
        ));
    }
    running
}

/// One client sends `rounds` bursts of `burst` bytes, each in one write, the next only once
/// the server has received the last; asserts every byte arrived, in order.
fn send_bursts<B: Backend + ?Sized>(srv: &mut Server<B>, rounds: usize, burst: usize) {
    let addr = srv.addr;
    let data = pattern(5, rounds * burst);
    let expect = data.clone();
    let (go, wait) = mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let mut s = connect(addr);
        for chunk in data.chunks(burst) {
            wait.recv().unwrap();
            s.write_all(chunk).unwrap();
        }
        s
    });
    let received = |srv: &Server<B>| srv.s.rx.values().map(Vec::len).sum::<usize>();
    for round in 1..=rounds {
        go.send(()).unwrap();
        srv.until("a burst", |s| received(s) >= round * burst);
    }
    let _client = join(client);
    assert_eq!(srv.s.rx.len(), 1, "one connection");
    let got = srv.s.rx.values().next().unwrap();
    assert!(*got == expect, "bytes lost, duplicated or out of order");
    srv.assert_clean();
}

/// 20 bursts of 64 ACK-sized frames, buffers one frame long: the plain multishot receive
/// needs a completion per buffer (at least one per frame); a bundle takes the burst whole.
fn burst_of_frames(bundle: bool) {
    const ROUNDS: usize = 20;
    const FRAMES: usize = 64;
    let Some(mut srv) = uring_server(256, FRAME as u32, bundle) else {
        return;
    };
    let running = bundles_run(&srv, bundle);
    send_bursts(&mut srv, ROUNDS, FRAMES * FRAME);
    let (completions, _) = srv.b.receive_completions();
    let frames = (ROUNDS * FRAMES) as u64;
    if running {
        assert!(
            completions < frames,
            "{completions} receive completions for {frames} frames with bundles"
        );
    } else if !bundle {
        assert!(
            completions >= frames,
            "{completions} receive completions for {frames} frames without bundles"
        );
    }
}

#[test]
fn uring_bundle_reads_a_burst_of_frames_in_fewer_completions() {
    burst_of_frames(true);
}

#[test]
fn uring_plain_multishot_reads_a_burst_of_frames() {
    burst_of_frames(false);
}

#[test]
fn epoll_reads_a_burst_of_frames() {
    if let Some(b) = make_epoll() {
        let mut srv = Server::new(b);
        send_bursts(&mut srv, 20, 64 * FRAME);
    }
}

/// A ring of 8 buffers, bursts of 5 buffers' worth: the second burst's bundle takes slots
/// 5, 6, 7, 0, 1, and so on round the ring.
fn across_the_wrap(bundle: bool) {
    let Some(mut srv) = uring_server(8, FRAME as u32, bundle) else {
        return;
    };
    let running = bundles_run(&srv, bundle);
    send_bursts(&mut srv, 40, 5 * FRAME);
    let (_, wrapped) = srv.b.receive_bundles();
    if running {
        assert!(wrapped > 0, "no bundle ran across the ring's wrap");
    }
}

#[test]
fn uring_bundle_across_the_ring_wrap() {
    across_the_wrap(true);
}

#[test]
fn uring_plain_multishot_across_the_ring_wrap() {
    across_the_wrap(false);
}

/// Four connections whose data (4 KiB each, 256 buffers' worth) waits before the server
/// accepts them, a ring of 8 buffers: the first receive takes every buffer and the others
/// find none (ENOBUFS), again and again. Everything still arrives, in order.
fn ring_dry_mid_bundle(bundle: bool) {
    const CLIENTS: usize = 4;
    const BYTES: usize = 4096;
    let Some(mut srv) = uring_server(8, FRAME as u32, bundle) else {
        return;
    };
    bundles_run(&srv, bundle);
    let clients: Vec<(TcpStream, Vec<u8>)> = (0..CLIENTS)
        .map(|i| {
            let mut s = connect(srv.addr);
            let data = pattern(100 + i as u64, BYTES);
            s.write_all(&data).unwrap();
            (s, data)
        })
        .collect();
    srv.until("every byte", |s| {
        s.s.rx.len() == CLIENTS && s.s.rx.values().all(|v| v.len() >= BYTES)
    });
    let mut got: Vec<&Vec<u8>> = srv.s.rx.values().collect();
    got.sort_by_key(|v| v.first().copied());
    let mut expect: Vec<&Vec<u8>> = clients.iter().map(|(_, d)| d).collect();
    expect.sort_by_key(|v| v.first().copied());
    assert!(got == expect, "bytes lost, duplicated or out of order");
    let (_, dry) = srv.b.receive_completions();
    assert!(dry > 0, "the ring never ran dry");
    srv.assert_clean();
}

#[test]
fn uring_bundle_ring_dry_mid_bundle_loses_nothing() {
    ring_dry_mid_bundle(true);
}

#[test]
fn uring_plain_multishot_ring_dry_loses_nothing() {
    ring_dry_mid_bundle(false);
}
