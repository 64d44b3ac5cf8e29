//! Decoding copies nothing: payloads, names and tokens of decoded frames point into the read
//! buffer the bytes arrived in.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on the first surprise

mod util;

use bytes::{Bytes, BytesMut};
use pabal_codec::{
    ClientFrame, Decoder, Deliver, DeliverHeader, Hello, Publish, ResumeList, ServerFrame,
    Subscribe, Text,
};
use std::ops::Range;

/// The address range of a buffer's memory.
fn span(bytes: &[u8]) -> Range<usize> {
    let start = bytes.as_ptr() as usize;
    start..start + bytes.len()
}

/// Whether `inner` lies within `outer` (an empty slice anywhere inside counts).
fn within(inner: &[u8], outer: &Range<usize>) -> bool {
    let inner = span(inner);
    inner.start >= outer.start && inner.end <= outer.end
}

#[test]
fn publish_payload_is_a_slice_of_the_read_buffer() {
    let payload = Bytes::from(vec![0x5a; 1000]);
    let frame = ClientFrame::Publish(Publish {
        alias: 2,
        msg_id: Some(5),
        ack: Some(41),
        payload: payload.clone(),
    });
    // A read buffer holding a partial frame behind the whole one, as a socket read gives.
    let mut buf = BytesMut::with_capacity(4096);
    frame.encode(&mut buf);
    buf.extend_from_slice(&[0x05, 0x04]);
    let allocation = span(&buf);
    let Ok(Some(ClientFrame::Publish(p))) = Decoder::default().decode_client(&mut buf) else {
        panic!("no PUBLISH")
    };
    assert_eq!(p.payload, payload);
    assert!(
        within(&p.payload, &allocation),
        "payload at {:?} is outside the read buffer {allocation:?}",
        span(&p.payload)
    );
    // The payload is the end of the frame: it ends where the leftover bytes begin.
    assert_eq!(span(&p.payload).end, span(&buf).start);
}

#[test]
fn names_tokens_and_resume_lists_are_slices_too() {
    let mut buf = BytesMut::with_capacity(4096);
    ClientFrame::Subscribe(Subscribe {
        room: true,
        name: Text::from("général"),
    })
    .encode(&mut buf);
    ClientFrame::Hello(Hello {
        version: 1,
        heartbeat_secs: 240,
        token: Bytes::from(vec![b'j'; 150]),
        device_id: None,
        resume: ResumeList::from_entries(&[pabal_codec::ResumeEntry {
            room_id: 1,
            epoch: 2,
            last_seq: 3,
        }]),
    })
    .encode(&mut buf);
    let allocation = span(&buf);
    let d = Decoder::default();
    let Ok(Some(ClientFrame::Subscribe(s))) = d.decode_client(&mut buf) else {
        panic!()
    };
    assert!(within(s.name.as_bytes(), &allocation));
    let Ok(Some(ClientFrame::Hello(h))) = d.decode_client(&mut buf) else {
        panic!()
    };
    assert!(within(&h.token, &allocation));
    assert_eq!(h.resume.len(), 1);
}

#[test]
fn deliver_payload_and_sender_are_slices_of_the_read_buffer() {
    let mut buf = BytesMut::with_capacity(4096);
    ServerFrame::Deliver(Deliver {
        header: DeliverHeader {
            alias: 1,
            seq: None,
            ephemeral: false,
            sender_alias: 0,
            new_sender: Some(Text::from("ann")),
            ts_delta_ms: 1234,
        },
        payload: Bytes::from_static(b"see you at 7 tonight"),
    })
    .encode(&mut buf);
    let allocation = span(&buf);
    let Ok(Some(ServerFrame::Deliver(d))) = Decoder::default().decode_server(&mut buf) else {
        panic!()
    };
    assert!(within(&d.payload, &allocation));
    assert!(within(
        d.header.new_sender.as_ref().unwrap().as_bytes(),
        &allocation
    ));
}
