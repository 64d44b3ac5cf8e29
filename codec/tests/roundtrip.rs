//! Every frame of both directions survives encode → decode unchanged, the decoder takes
//! exactly `encoded_len()` bytes, and `body_len()` is what the length prefix says.
//! Encoding is canonical: re-encoding anything the decoder accepts gives back its bytes.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on the first surprise

mod util;

use bytes::BytesMut;
use pabal_codec::varint::len_u64;
use pabal_codec::{ClientFrame, Decoder, Framing, ResumeList, ServerFrame};
use proptest::prelude::*;
use util::*;

proptest! {
    #[test]
    fn client_frames_round_trip(
        frame in client_frame(),
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let decoder = Decoder::default();
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        prop_assert_eq!(buf.len(), frame.encoded_len());
        prop_assert_eq!(
            decoder.framing(&buf),
            Ok(Framing::Ready { header: len_u64(frame.body_len() as u64), body: frame.body_len() })
        );
        // Whatever follows the frame stays in the buffer, untouched.
        buf.extend_from_slice(&tail);
        let decoded = decoder.decode_client(&mut buf);
        prop_assert_eq!(decoded, Ok(Some(frame.clone())));
        prop_assert_eq!(&buf[..], &tail[..]);
    }

    #[test]
    fn server_frames_round_trip(
        frame in server_frame(),
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let decoder = Decoder::default();
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        prop_assert_eq!(buf.len(), frame.encoded_len());
        prop_assert_eq!(
            decoder.framing(&buf),
            Ok(Framing::Ready { header: len_u64(frame.body_len() as u64), body: frame.body_len() })
        );
        buf.extend_from_slice(&tail);
        let decoded = decoder.decode_server(&mut buf);
        prop_assert_eq!(decoded, Ok(Some(frame.clone())));
        prop_assert_eq!(&buf[..], &tail[..]);
    }

    /// The resume list keeps its entries and their order through the wire, however the
    /// epochs group.
    #[test]
    fn resume_lists_keep_their_entries(entries in any_resume_entries()) {
        let list = ResumeList::from_entries(&entries);
        prop_assert_eq!(list.len(), entries.len());
        prop_assert_eq!(list.iter().collect::<Vec<_>>(), entries.clone());
        let hello = ClientFrame::Hello(pabal_codec::Hello {
            version: 1,
            heartbeat_secs: 0,
            token: bytes::Bytes::from_static(b"t"),
            device_id: None,
            resume: list,
        });
        let Ok(Some(ClientFrame::Hello(back))) = dec_client(&enc_client(&hello)) else {
            panic!("HELLO did not decode");
        };
        prop_assert_eq!(back.resume.iter().collect::<Vec<_>>(), entries);
    }

    #[test]
    fn ack_pairs_keep_their_order(pairs in any_ack_pairs()) {
        let ack = pabal_codec::Ack::from_pairs(&pairs);
        prop_assert_eq!(ack.len(), pairs.len());
        let Ok(Some(ClientFrame::Ack(back))) = dec_client(&enc_client(&ClientFrame::Ack(ack)))
        else {
            panic!("ACK did not decode");
        };
        prop_assert_eq!(back.iter().collect::<Vec<_>>(), pairs);
    }

    /// A DELIVER written as prefix + payload (the relay's fan-out path) is the same bytes as
    /// the whole frame, and `prefix_len` is exact.
    #[test]
    fn deliver_prefix_plus_payload_is_the_frame(
        header in any_deliver_header(),
        payload in any_payload(),
    ) {
        let mut split = Vec::new();
        header.encode_prefix(payload.len(), &mut split);
        prop_assert_eq!(split.len(), header.prefix_len(payload.len()));
        split.extend_from_slice(&payload);
        let whole = enc_server(&ServerFrame::Deliver(pabal_codec::Deliver { header, payload }));
        prop_assert_eq!(split, whole);
    }

    /// Canonical encoding: a valid frame with one byte changed either fails to decode or
    /// decodes to a frame whose encoding is exactly the bytes the decoder consumed. No two
    /// byte strings mean the same frame.
    #[test]
    fn accepted_bytes_are_canonical_client(
        frame in client_frame(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = enc_client(&frame);
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(f)) = Decoder::default().decode_client(&mut buf) {
            let used = bytes.len() - buf.len();
            prop_assert_eq!(enc_client(&f), &bytes[..used]);
        }
    }

    #[test]
    fn accepted_bytes_are_canonical_server(
        frame in server_frame(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = enc_server(&frame);
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(f)) = Decoder::default().decode_server(&mut buf) {
            let used = bytes.len() - buf.len();
            prop_assert_eq!(enc_server(&f), &bytes[..used]);
        }
    }
}

/// Every boundary value of every varint field decodes back (a deterministic sweep on top of
/// the random cases above).
#[test]
fn varint_boundaries_in_every_position() {
    for b in varint_boundaries() {
        let b32 = u32::try_from(b).unwrap_or(u32::MAX);
        let frames = [
            ServerFrame::PubAck(pabal_codec::PubAck { msg_id: b, seq: b }),
            ServerFrame::Gap(pabal_codec::Gap {
                alias: b32,
                from: b.max(1),
                to: b.max(1),
            }),
            ServerFrame::Ping(pabal_codec::Ping {
                interval_secs: Some(b32),
            }),
        ];
        for f in frames {
            assert_eq!(dec_server(&enc_server(&f)), Ok(Some(f.clone())), "{f:?}");
        }
        let p = ClientFrame::Publish(pabal_codec::Publish {
            alias: b32,
            msg_id: Some(b),
            ack: Some(b),
            payload: bytes::Bytes::new(),
        });
        assert_eq!(dec_client(&enc_client(&p)), Ok(Some(p.clone())));
    }
}
