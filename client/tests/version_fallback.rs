//! pabal-client against relays that speak older protocol versions (fake ones on loopback):
//! the client offers version 3 with its device id; refused with `UnsupportedVersion`, it at
//! once connects again in version 2 (with the device id), then in version 1 (without).
//! Against a version-2 relay it stays in version 2.

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use bytes::BytesMut;
use pabal_client::{Client, ClientConfig};
use pabal_codec::{ClientFrame, Decoder, ErrorCode, ErrorFrame, ServerFrame, Text, Welcome};

/// What a HELLO offered: its version and device id.
type Hello = (u8, Option<u64>);

/// Reads one HELLO off `stream`: (version, device id), or the decoding error's code.
fn read_hello(stream: &mut TcpStream) -> Result<Hello, ErrorCode> {
    let decoder = Decoder::default();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        match decoder.decode_client(&mut buf) {
            Ok(Some(ClientFrame::Hello(h))) => return Ok((h.version, h.device_id)),
            Ok(Some(other)) => panic!("not a HELLO: {other:?}"),
            Ok(None) => {}
            Err(e) => return Err(e.code()),
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the client closed before its HELLO");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn answer(stream: &mut TcpStream, frame: ServerFrame) {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    stream.write_all(&out).unwrap();
}

/// A fake relay that speaks only `versions`: answers each of `connections` HELLOs with
/// WELCOME or a fatal ERROR `UnsupportedVersion`, and reports what each HELLO offered.
fn fake_relay(
    versions: &'static [u8],
    connections: usize,
) -> (std::net::SocketAddr, thread::JoinHandle<Vec<Hello>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let relay = thread::spawn(move || {
        let mut seen = Vec::new();
        let mut open = Vec::new();
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let (version, device) = read_hello(&mut stream).unwrap();
            seen.push((version, device));
            if versions.contains(&version) {
                answer(
                    &mut stream,
                    ServerFrame::Welcome(Welcome {
                        version,
                        conn_id: 1,
                        server_time_ms: 1_767_225_600_000,
                        heartbeat_secs: 600,
                        max_frame_len: 65_536,
                        user: Text::from("ann"),
                    }),
                );
                open.push(stream);
            } else {
                answer(
                    &mut stream,
                    ServerFrame::Error(ErrorFrame {
                        code: ErrorCode::UnsupportedVersion,
                        fatal: true,
                        reference: 0,
                        message: Text::from("this relay speaks version 1"),
                    }),
                );
            }
        }
        seen
    });
    (addr, relay)
}

#[test]
fn a_client_refused_versions_3_and_2_connects_again_in_version_1() {
    let (addr, relay) = fake_relay(&[1], 3);
    let mut config = ClientConfig::new(addr, "ann");
    config.device_id = Some(0xd0d0);
    let mut client = Client::new(config);
    client.connect().unwrap();
    assert!(client.is_connected());
    assert_eq!(client.session().version(), 1);
    assert_eq!(
        relay.join().unwrap(),
        vec![(3, Some(0xd0d0)), (2, Some(0xd0d0)), (1, None)]
    );
}

#[test]
fn a_client_of_a_version_2_relay_sends_its_device_id() {
    let (addr, relay) = fake_relay(&[1, 2], 2);
    let mut config = ClientConfig::new(addr, "ann");
    config.device_id = Some(0xd0d0);
    let mut client = Client::new(config);
    client.connect().unwrap();
    assert!(client.session().idempotent());
    assert_eq!(client.session().version(), 2);
    assert_eq!(
        relay.join().unwrap(),
        vec![(3, Some(0xd0d0)), (2, Some(0xd0d0))]
    );
}
