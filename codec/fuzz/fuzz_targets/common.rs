//! Shared by the fuzz targets: drive a decoder over an input fed in two chunks, and check
//! that the chunking changes nothing and that everything accepted is canonical.

#![allow(dead_code)] // reason: each target uses a part of this module

use bytes::BytesMut;
use pabal_codec::{ClientFrame, DecodeError, Decoder, Limits, ServerFrame};

/// A frame of either direction, so both targets share one driver.
pub trait Frame: Sized + PartialEq + std::fmt::Debug {
    fn decode(decoder: &Decoder, buf: &mut BytesMut) -> Result<Option<Self>, DecodeError>;
    fn encode_vec(&self) -> Vec<u8>;
    fn encoded_len(&self) -> usize;
}

impl Frame for ClientFrame {
    fn decode(decoder: &Decoder, buf: &mut BytesMut) -> Result<Option<Self>, DecodeError> {
        decoder.decode_client(buf)
    }
    fn encode_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
    fn encoded_len(&self) -> usize {
        ClientFrame::encoded_len(self)
    }
}

impl Frame for ServerFrame {
    fn decode(decoder: &Decoder, buf: &mut BytesMut) -> Result<Option<Self>, DecodeError> {
        decoder.decode_server(buf)
    }
    fn encode_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
    fn encoded_len(&self) -> usize {
        ServerFrame::encoded_len(self)
    }
}

/// Limits small enough for the fuzzer to reach every bound with short inputs.
pub fn tight_limits() -> Limits {
    Limits {
        max_frame_len: 96,
        max_name_len: 8,
        max_token_len: 16,
        max_resume_entries: 3,
        max_ack_entries: 3,
        max_text_len: 8,
    }
}

/// The first byte picks the cut: scaled over the rest of the input, so every position of
/// an input of any length can be chosen.
pub fn split(data: &[u8]) -> Option<(&[u8], usize)> {
    let (&first, input) = data.split_first()?;
    Some((input, input.len() * usize::from(first) / 255))
}

/// Every frame up to and including the first error, feeding `input` in chunks cut at `cuts`
/// and draining the buffer after each chunk.
pub fn run<F: Frame>(
    decoder: &Decoder,
    input: &[u8],
    cuts: &[usize],
) -> Vec<Result<F, DecodeError>> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        buf.extend_from_slice(&input[fed..cut]);
        fed = cut;
        loop {
            // Where the next frame starts in `input`, to check what it consumed.
            let start = fed - buf.len();
            match F::decode(decoder, &mut buf) {
                Ok(Some(frame)) => {
                    let used = fed - buf.len() - start;
                    // Canonical: the frame re-encodes to exactly the bytes it came from.
                    assert_eq!(frame.encoded_len(), used, "{frame:?}");
                    assert_eq!(frame.encode_vec(), &input[start..start + used], "{frame:?}");
                    out.push(Ok(frame));
                }
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

/// The decode target: the same result whole and in two chunks, under default and tight
/// limits.
pub fn decode_in_two<F: Frame>(data: &[u8]) {
    let Some((input, cut)) = split(data) else {
        return;
    };
    for decoder in [Decoder::default(), Decoder::new(tight_limits())] {
        let whole: Vec<Result<F, DecodeError>> = run(&decoder, input, &[]);
        let chunked: Vec<Result<F, DecodeError>> = run(&decoder, input, &[cut]);
        assert_eq!(whole, chunked, "cut at {cut}");
    }
}
