//! The fuzz targets' logic, one function per target ([`decode_client`], [`decode_server`],
//! [`session`]), shared by the cargo-fuzz binaries next to this file and by the stable replay
//! of the committed corpus (`codec/tests/fuzz_corpus.rs` includes this file), so every CI run
//! exercises the corpus whether or not a nightly toolchain is there.
//!
//! Every target feeds its input whole and cut into reads at several points derived from the
//! input itself ([`cuts`]), and checks that the cutting changes nothing and that everything
//! accepted is canonical.
//!
//! Owns: the targets' input format and checks. Must not touch: anything but the codec's
//! public API (this file is compiled outside the codec crate, by two different crates).

#![allow(dead_code)] // reason: each includer uses a part of this module

use bytes::{Bytes, BytesMut};
use pabal_codec::{
    ClientFrame, ClientSession, DecodeError, Decoder, Event, Limits, Room, ServerFrame, Text,
    Welcome, room_id,
};

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

/// The header byte that asks for one read per byte.
pub const EVERY_BYTE: u8 = 0xff;
/// The most cut bytes a header may announce.
pub const MAX_CUTS: u8 = 15;

/// Splits `data` into the stream and the positions where it is cut into reads.
///
/// Byte 0 is the header: [`EVERY_BYTE`] cuts after every byte; otherwise its low four bits
/// say how many cut bytes follow (0 to [`MAX_CUTS`]), each scaled over the stream's length so
/// that every position of a stream of any length can be chosen. The stream is the rest.
/// Returns the cuts sorted (equal cuts make empty reads, which must change nothing either).
pub fn cuts(data: &[u8]) -> Option<(&[u8], Vec<usize>)> {
    let (&header, rest) = data.split_first()?;
    if header == EVERY_BYTE {
        return Some((rest, (1..rest.len()).collect()));
    }
    let n = usize::from(header & MAX_CUTS);
    if rest.len() < n {
        return None;
    }
    let (cut_bytes, input) = rest.split_at(n);
    let mut cuts: Vec<usize> = cut_bytes
        .iter()
        .map(|&b| input.len() * usize::from(b) / 255)
        .collect();
    cuts.sort_unstable();
    Some((input, cuts))
}

/// Feeds `input` to `decoder` in reads cut at `cuts` (sorted), decoding everything complete
/// after each read, and hands every frame, up to and including the first error, to `each`.
/// Checks that every frame re-encodes to exactly the bytes it came from.
pub fn feed<F: Frame>(
    decoder: &Decoder,
    input: &[u8],
    cuts: &[usize],
    mut each: impl FnMut(Result<F, DecodeError>),
) {
    let mut buf = BytesMut::new();
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
                    each(Ok(frame));
                }
                Ok(None) => break,
                Err(e) => {
                    each(Err(e));
                    return;
                }
            }
        }
    }
}

/// Every frame up to and including the first error, fed as [`feed`] does.
pub fn run<F: Frame>(
    decoder: &Decoder,
    input: &[u8],
    cuts: &[usize],
) -> Vec<Result<F, DecodeError>> {
    let mut out = Vec::new();
    feed(decoder, input, cuts, |f| out.push(f));
    out
}

/// A decode target: the same frames and the same first error whole and cut at [`cuts`],
/// under the default and the tight limits.
fn decode_in_chunks<F: Frame>(data: &[u8]) {
    let Some((input, cuts)) = cuts(data) else {
        return;
    };
    for decoder in [Decoder::default(), Decoder::new(tight_limits())] {
        let whole: Vec<Result<F, DecodeError>> = run(&decoder, input, &[]);
        let chunked: Vec<Result<F, DecodeError>> = run(&decoder, input, &cuts);
        assert_eq!(whole, chunked, "cuts at {cuts:?}");
    }
}

/// The `decode_client` target: frames a client sends, as the relay decodes them.
pub fn decode_client(data: &[u8]) {
    decode_in_chunks::<ClientFrame>(data);
}

/// The `decode_server` target: frames the relay sends, as a client decodes them.
pub fn decode_server(data: &[u8]) {
    decode_in_chunks::<ServerFrame>(data);
}

/// A session welcomed with three rooms bound (a channel among them), cursors 0, 10, 127.
fn primed() -> ClientSession {
    let mut s = ClientSession::new();
    let _ = s.apply(ServerFrame::Welcome(Welcome {
        version: 1,
        conn_id: 1,
        server_time_ms: 1_767_225_600_000,
        heartbeat_secs: 240,
        max_frame_len: 65536,
        user: Text::from_static("bob"),
    }));
    for (alias, name, cursor) in [(0u32, "a", 0u64), (1, "b", 10), (2, "c", 127)] {
        let _ = s.apply(ServerFrame::Room(Room {
            alias,
            channel: alias == 2,
            room_id: room_id(alias == 2, name),
            epoch: 7,
            cursor,
            head: cursor + 5,
            name: Text::from(name),
        }));
    }
    s
}

/// A new connection: HELLO must be a valid, decodable frame whatever the session went
/// through.
fn reconnect(s: &mut ClientSession) {
    let hello = s.hello(Bytes::from_static(b"bob"), 0);
    let mut buf = BytesMut::new();
    hello.encode(&mut buf);
    let back = Decoder::new(Limits {
        max_resume_entries: usize::MAX,
        ..Default::default()
    })
    .decode_client(&mut buf);
    assert_eq!(back, Ok(Some(hello)));
}

/// What one session made of a stream: every event or error in order, and the rooms it
/// knows at the end (sorted).
type SessionLog = (Vec<String>, Vec<String>);

/// Runs a session over `input` read in chunks cut at `cuts`, applying each frame as soon as
/// it is complete (as a client does), and checks the cursors against every event.
fn drive_session(options: u8, input: &[u8], cuts: &[usize]) -> SessionLog {
    let mut session = if options & 1 != 0 {
        primed()
    } else {
        ClientSession::new()
    };
    let publish_each = options & 2 != 0;
    let mut log = Vec::new();
    let mut i = 0u32;
    feed(
        &Decoder::default(),
        input,
        cuts,
        |frame: Result<ServerFrame, _>| {
            let Ok(frame) = frame else {
                log.push(format!("{frame:?}"));
                return;
            };
            if publish_each {
                let _ = session.publish(i % 4, Bytes::from_static(b"x"), None);
            }
            i += 1;
            let outcome = session.apply(frame);
            match &outcome {
                Ok(Event::Message {
                    alias,
                    seq: Some(seq),
                    ..
                }) => {
                    assert_eq!(session.room(*alias).map(|r| r.cursor), Some(*seq));
                }
                Ok(Event::Gap { alias, to, .. }) => {
                    assert_eq!(session.room(*alias).map(|r| r.cursor), Some(*to));
                }
                Ok(Event::Bound { alias, room, .. }) => {
                    assert_eq!(session.room(*alias), Some(room));
                }
                Ok(Event::Left { alias, .. }) => assert!(session.room(*alias).is_none()),
                Ok(Event::GoAway(_)) | Err(_) => reconnect(&mut session),
                Ok(_) => {}
            }
            log.push(format!("{outcome:?}"));
        },
    );
    // By alias: the session keeps its rooms in a map of no particular order.
    let mut rooms: Vec<String> = session.rooms().map(|r| format!("{r:?}")).collect();
    rooms.sort_unstable();
    (log, rooms)
}

/// The `session` target: decoded server frames fed into `ClientSession::apply`. Whatever a
/// relay sends, the session returns an event or an error, never panics, keeps its cursors
/// where the events say, and ends the same whether the stream came whole or cut.
///
/// Input: byte 0 picks options (bit 0: start already welcomed with three rooms bound; bit 1:
/// publish before every frame, so PUBACKs find messages in flight); then a [`cuts`] header
/// and the relay's byte stream.
pub fn session(data: &[u8]) {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    let Some((input, cuts)) = cuts(rest) else {
        return;
    };
    let whole = drive_session(options, input, &[]);
    let chunked = drive_session(options, input, &cuts);
    assert_eq!(whole, chunked, "cuts at {cuts:?}");
}
