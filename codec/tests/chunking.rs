//! The decoder gives the same frames, and the same first error, however the stream is cut
//! into reads; and no input whatsoever makes it (or a parser) panic.
//!
//! NATS's `FuzzParser` splits each input in two; this is the general version: any number of
//! cuts anywhere, including one byte per read.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on the first surprise

mod util;

use bytes::{Bytes, BytesMut};
use pabal_codec::frame::kind;
use pabal_codec::{ClientFrame, Decoder, Limits, ServerFrame};
use proptest::prelude::*;
use util::*;

/// Valid frames with garbage spliced in at one point (possibly the end, possibly nowhere).
fn stream<F: std::fmt::Debug>(
    frames: impl Strategy<Value = F>,
    encode: fn(&F) -> Vec<u8>,
) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(frames, 0..8),
        prop::collection::vec(any::<u8>(), 0..48),
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(frames, garbage, at)| {
            let at = at.index(frames.len() + 1);
            let mut out = Vec::new();
            for (i, f) in frames.iter().enumerate() {
                if i == at {
                    out.extend_from_slice(&garbage);
                }
                out.extend(encode(f));
            }
            if at == frames.len() {
                out.extend_from_slice(&garbage);
            }
            out
        })
}

/// Cut points: a few random ones, or every byte.
fn cuts(len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        4 => prop::collection::vec(0..=len, 0..12).prop_map(|mut c| {
            c.sort_unstable();
            c
        }),
        1 => Just((1..len).collect()),
    ]
}

fn check_chunking(side: Side, input: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    let whole = feed_chunked(side, input, &[]);
    let chunked = feed_chunked(side, input, cuts);
    prop_assert_eq!(&chunked.0, &whole.0, "frames and first error");
    prop_assert_eq!(chunked.1, whole.1, "bytes left waiting for more");
    Ok(())
}

proptest! {
    #[test]
    fn client_stream_in_any_chunking(
        (input, cuts) in stream(client_frame(), enc_client)
            .prop_flat_map(|s| { let n = s.len(); (Just(s), cuts(n)) })
    ) {
        check_chunking(Side::Client, &input, &cuts)?;
    }

    #[test]
    fn server_stream_in_any_chunking(
        (input, cuts) in stream(server_frame(), enc_server)
            .prop_flat_map(|s| { let n = s.len(); (Just(s), cuts(n)) })
    ) {
        check_chunking(Side::Server, &input, &cuts)?;
    }

    /// Valid frames alone, in any chunking, come out complete and in order.
    #[test]
    fn valid_frames_come_out_in_order(
        frames in prop::collection::vec(server_frame(), 1..8),
        cut_seed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let input: Vec<u8> = frames.iter().flat_map(enc_server).collect();
        let mut cuts: Vec<usize> = cut_seed.iter().map(|i| i.index(input.len() + 1)).collect();
        cuts.sort_unstable();
        let (out, left) = feed_chunked(Side::Server, &input, &cuts);
        let expected: Vec<Out> = frames.into_iter().map(Out::Server).collect();
        prop_assert_eq!(out, expected);
        prop_assert_eq!(left, Some(0));
    }

    /// Arbitrary bytes: parsers and decoders return, never panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let limits = Limits::default();
        let _ = ClientFrame::parse(Bytes::from(bytes.clone()), &limits);
        let _ = ServerFrame::parse(Bytes::from(bytes.clone()), &limits);
        let _ = feed_chunked(Side::Client, &bytes, &[]);
        let _ = feed_chunked(Side::Server, &bytes, &[]);
    }

    /// Bodies that start with a real type byte (any flags) and continue with noise reach the
    /// field parsers, where arbitrary bytes mostly do not.
    #[test]
    fn noise_after_a_type_byte_never_panics(
        ty in prop::sample::select(vec![
            kind::HELLO, kind::SUBSCRIBE, kind::UNSUBSCRIBE, kind::PUBLISH, kind::ACK,
            kind::PING, kind::PONG, kind::BYE, kind::WELCOME, kind::ROOM, kind::LEFT,
            kind::PUBACK, kind::DELIVER, kind::GAP, kind::ERROR, kind::GOAWAY,
        ]),
        flags in 0u8..8,
        version_one in any::<bool>(),
        rest in prop::collection::vec(any::<u8>(), 0..96),
    ) {
        let mut body = vec![ty | (flags << 5)];
        if version_one {
            body.push(1);
        }
        body.extend_from_slice(&rest);
        let limits = Limits::default();
        let _ = ClientFrame::parse(Bytes::from(body.clone()), &limits);
        let _ = ServerFrame::parse(Bytes::from(body.clone()), &limits);
        // And through the decoder, whose accepted frames must re-encode to their bytes.
        let mut buf = framed(&body);
        if let Ok(Some(f)) = Decoder::default().decode_client(&mut buf) {
            prop_assert_eq!(enc_client(&f), &framed(&body)[..]);
        }
        let mut buf = framed(&body);
        if let Ok(Some(f)) = Decoder::default().decode_server(&mut buf) {
            prop_assert_eq!(enc_server(&f), &framed(&body)[..]);
        }
    }

    /// Tight limits are enforced the same way in any chunking.
    #[test]
    fn tight_limits_in_any_chunking(
        input in stream(client_frame(), enc_client),
        cut_seed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let limits = Limits {
            max_frame_len: 64,
            max_name_len: 8,
            max_token_len: 16,
            max_resume_entries: 2,
            max_ack_entries: 2,
            max_text_len: 8,
        };
        let decoder = Decoder::new(limits);
        let mut cuts: Vec<usize> = cut_seed.iter().map(|i| i.index(input.len() + 1)).collect();
        cuts.sort_unstable();
        let run = |cuts: &[usize]| {
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut start = 0;
            for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
                buf.extend_from_slice(&input[start..cut.max(start)]);
                start = cut.max(start);
                if !drain(Side::Client, &decoder, &mut buf, &mut out) {
                    break;
                }
            }
            out
        };
        prop_assert_eq!(run(&cuts), run(&[]));
    }
}
