//! RESP2, the Redis wire protocol: commands encoded into a reused buffer, replies decoded
//! incrementally from a buffer, both sans-IO.
//!
//! Owns: the byte format and its bounds (one bulk string's size, one array's length,
//! nesting; a whole reply's size is bounded by the connection reading it, `shard.rs`), so
//! a broken or hostile server cannot make a node allocate without limit, and what an
//! incomplete reply still lacks ([`Decoder`]). Must not touch: sockets, commands' meaning.

use bytes::{Buf, Bytes, BytesMut};

/// The largest bulk string accepted from the server (a message is far smaller).
pub const MAX_BULK: usize = 16 << 20;
/// The most elements of one array accepted from the server.
pub const MAX_ARRAY: usize = 1 << 20;
/// The deepest nesting of arrays accepted (a stream read is three deep).
pub const MAX_DEPTH: usize = 8;

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`.
    Simple(Bytes),
    /// `-ERR ...`: the server refused the command.
    Error(Bytes),
    /// `:42`.
    Int(i64),
    /// `$n` and n bytes; `None` for the null bulk string.
    Bulk(Option<Bytes>),
    /// `*n` and n values; `None` for the null array.
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The bytes of a simple or bulk string.
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Simple(b) | Value::Bulk(Some(b)) => Some(b),
            _ => None,
        }
    }

    /// An integer, or a string holding one.
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            other => std::str::from_utf8(other.bytes()?).ok()?.parse().ok(),
        }
    }

    /// The elements of an array.
    pub fn array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(Some(items)) => Some(items),
            _ => None,
        }
    }
}

/// What the server sent that is not RESP2 within the bounds above.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RespError {
    /// A type byte RESP2 does not have.
    #[error("unknown reply type byte {0:#04x}")]
    UnknownType(u8),
    /// A length or integer line that is not a number.
    #[error("malformed length or integer")]
    BadNumber,
    /// Larger or deeper than this client accepts.
    #[error("reply too large ({0})")]
    TooLarge(&'static str),
    /// A bulk string not followed by CRLF.
    #[error("bulk string without its CRLF")]
    BadTerminator,
}

/// Appends one command (an array of bulk strings) to `out`.
pub fn encode<'a>(out: &mut BytesMut, args: impl ExactSizeIterator<Item = &'a [u8]>) {
    push_array_len(out, args.len());
    for arg in args {
        push_bulk(out, arg);
    }
}

/// Appends the header of a command of `len` arguments (each then [`push_bulk`]).
pub fn push_array_len(out: &mut BytesMut, len: usize) {
    out.extend_from_slice(b"*");
    push_decimal(out, len as u64);
    out.extend_from_slice(b"\r\n");
}

/// Appends one argument of a command (a bulk string).
pub fn push_bulk(out: &mut BytesMut, arg: &[u8]) {
    out.extend_from_slice(b"$");
    push_decimal(out, arg.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// Appends one argument of a command, a bulk string made of `parts` one after another
/// (each copied once, straight into `out`).
pub fn push_bulk_parts(out: &mut BytesMut, parts: &[&[u8]]) {
    out.extend_from_slice(b"$");
    push_decimal(out, parts.iter().map(|p| p.len() as u64).sum());
    out.extend_from_slice(b"\r\n");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `n` in decimal without allocating.
pub fn push_decimal(out: &mut BytesMut, n: u64) {
    let mut digits = [0u8; 20];
    out.extend_from_slice(decimal(n, &mut digits));
}

/// The decimal digits of `n` in a small stack buffer (for command arguments).
pub fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// Takes one complete reply off the front of `buf`: `Ok(None)` until it is all there.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Value>, RespError> {
    Decoder::default().decode(buf)
}

/// Decodes the replies at the front of one connection's buffer, remembering what the
/// incomplete reply at its front lacks: while the buffer holds fewer bytes than it needs
/// it is not looked at again, and once found incomplete it is measured (its lines read,
/// nothing copied) before it is built. A large reply arriving in many reads is then
/// walked once per read instead of copied once per read.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The reply at the front of the buffer is incomplete and needs at least this many
    /// bytes from the buffer's start; 0 while none is known to be.
    need: usize,
}

impl Decoder {
    /// Takes one complete reply off the front of `buf` (the buffer this decoder has been
    /// reading, only ever appended to meanwhile): `Ok(None)` until it is all there.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Value>, RespError> {
        if self.need > 0 {
            if buf.len() < self.need {
                return Ok(None);
            }
            if let Parsed::Short(need) = parse(buf, 0, 0, false)? {
                self.need = need;
                return Ok(None);
            }
        }
        match parse(buf, 0, 0, true)? {
            Parsed::Whole(value, used) => {
                self.need = 0;
                buf.advance(used);
                Ok(value)
            }
            Parsed::Short(need) => {
                self.need = need;
                Ok(None)
            }
        }
    }
}

/// What [`parse`] found at an offset.
enum Parsed {
    /// A whole reply (built, or `None` when only measured) and where the next starts.
    Whole(Option<Value>, usize),
    /// Incomplete: the buffer needs at least this many bytes before it can be whole.
    Short(usize),
}

/// The line starting at `at` (without CRLF) and where the next one starts.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], at + end + 2))
}

fn number(text: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(RespError::BadNumber)
}

/// The reply starting at `at`, `depth` arrays deep; `build` false only measures it (no
/// value, nothing copied).
fn parse(buf: &[u8], at: usize, depth: usize, build: bool) -> Result<Parsed, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::TooLarge("nesting"));
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(Parsed::Short(at + 1));
    };
    let Some((text, next)) = line(buf, at + 1) else {
        if buf.len() - at > MAX_BULK {
            return Err(RespError::TooLarge("line"));
        }
        return Ok(Parsed::Short(buf.len() + 1));
    };
    let slice = |from: usize, to: usize| build.then(|| Bytes::copy_from_slice(&buf[from..to]));
    let parsed = match kind {
        b'+' => Parsed::Whole(slice(at + 1, at + 1 + text.len()).map(Value::Simple), next),
        b'-' => Parsed::Whole(slice(at + 1, at + 1 + text.len()).map(Value::Error), next),
        b':' => Parsed::Whole(Some(Value::Int(number(text)?)), next),
        b'$' => {
            let len = number(text)?;
            if len < 0 {
                return Ok(Parsed::Whole(Some(Value::Bulk(None)), next));
            }
            let len = len as usize;
            if len > MAX_BULK {
                return Err(RespError::TooLarge("bulk string"));
            }
            if buf.len() < next + len + 2 {
                return Ok(Parsed::Short(next + len + 2));
            }
            if &buf[next + len..next + len + 2] != b"\r\n" {
                return Err(RespError::BadTerminator);
            }
            let bulk = slice(next, next + len).map(|b| Value::Bulk(Some(b)));
            Parsed::Whole(bulk, next + len + 2)
        }
        b'*' => {
            let len = number(text)?;
            if len < 0 {
                return Ok(Parsed::Whole(Some(Value::Array(None)), next));
            }
            let len = len as usize;
            if len > MAX_ARRAY {
                return Err(RespError::TooLarge("array"));
            }
            let mut items = Vec::with_capacity(if build { len.min(64) } else { 0 });
            let mut at = next;
            for _ in 0..len {
                match parse(buf, at, depth + 1, build)? {
                    Parsed::Whole(item, end) => {
                        items.extend(item);
                        at = end;
                    }
                    short @ Parsed::Short(_) => return Ok(short),
                }
            }
            Parsed::Whole(build.then_some(Value::Array(Some(items))), at)
        }
        other => return Err(RespError::UnknownType(other)),
    };
    Ok(parsed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    #[test]
    fn a_bulk_of_parts_is_the_bulk_of_their_join() {
        for parts in [
            &[][..],
            &[&b""[..]],
            &[&b"12 n/0/1 3 bob"[..], b"hello"],
            &[b"a", b"", b"bc"],
        ] {
            let (mut joined, mut split) = (BytesMut::new(), BytesMut::new());
            push_bulk(&mut joined, &parts.concat());
            push_bulk_parts(&mut split, parts);
            assert_eq!(joined, split);
        }
    }

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        encode(&mut out, [&b"GET"[..], b"k"].into_iter());
        assert_eq!(&out[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        let mut buf = [0; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(
            decimal(18_446_744_073_709_551_615, &mut buf),
            b"18446744073709551615"
        );
    }

    #[test]
    fn replies_decode_whole_or_wait_for_more() {
        let full = b"*3\r\n$3\r\nabc\r\n:-7\r\n*2\r\n+OK\r\n$-1\r\n-ERR x\r\n";
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            if cut < full.len() - 8 {
                assert_eq!(decode(&mut buf).unwrap(), None, "cut at {cut}");
            }
        }
        let mut buf = BytesMut::from(&full[..]);
        let v = decode(&mut buf).unwrap().unwrap();
        let items = v.array().unwrap();
        assert_eq!(items[0].bytes().unwrap(), &b"abc"[..]);
        assert_eq!(items[1].int(), Some(-7));
        assert_eq!(items[2].array().unwrap()[1], Value::Bulk(None));
        assert_eq!(
            decode(&mut buf).unwrap(),
            Some(Value::Error(Bytes::from_static(b"ERR x")))
        );
        assert!(buf.is_empty());
    }

    /// Fed in pieces of any size, a decoder takes the same replies as fed all at once.
    #[test]
    fn replies_fed_in_pieces_decode_as_fed_whole() {
        let full = b"*3\r\n$3\r\nabc\r\n:-7\r\n*2\r\n+OK\r\n$-1\r\n-ERR x\r\n$0\r\n\r\n";
        let mut whole = Vec::new();
        let mut buf = BytesMut::from(&full[..]);
        while let Some(v) = decode(&mut buf).unwrap() {
            whole.push(v);
        }
        assert_eq!(whole.len(), 3);
        for size in 1..full.len() {
            let (mut decoder, mut buf, mut got) = (Decoder::default(), BytesMut::new(), Vec::new());
            for piece in full.chunks(size) {
                buf.extend_from_slice(piece);
                while let Some(v) = decoder.decode(&mut buf).unwrap() {
                    got.push(v);
                }
            }
            assert_eq!(got, whole, "in pieces of {size}");
            assert!(buf.is_empty());
        }
    }

    /// A reply found incomplete remembers what it lacks: a bulk's bytes (the whole of it
    /// and its CRLF), or one more byte of a line. Before, every read parsed it again from
    /// its start, copying every bulk that was complete.
    #[test]
    fn an_incomplete_reply_waits_for_what_it_lacks() {
        let mut decoder = Decoder::default();
        let mut buf = BytesMut::from(&b"*2\r\n$10\r\nab"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(decoder.need, 4 + 5 + 10 + 2);
        buf.extend_from_slice(b"cdefghij\r\n:4");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(
            decoder.need,
            buf.len() + 1,
            "the integer's line is not ended"
        );
        buf.extend_from_slice(b"2\r\n");
        let v = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(v.array().unwrap()[1], Value::Int(42));
        assert_eq!(decoder.need, 0);
    }

    #[test]
    fn hostile_replies_are_refused_not_allocated() {
        let mut huge = BytesMut::from(&b"$999999999999\r\n"[..]);
        assert_eq!(decode(&mut huge), Err(RespError::TooLarge("bulk string")));
        let mut wide = BytesMut::from(&b"*99999999\r\n"[..]);
        assert_eq!(decode(&mut wide), Err(RespError::TooLarge("array")));
        let mut deep = BytesMut::from("*1\r\n".repeat(20).as_bytes());
        assert_eq!(decode(&mut deep), Err(RespError::TooLarge("nesting")));
        let mut junk = BytesMut::from(&b"?x\r\n"[..]);
        assert_eq!(decode(&mut junk), Err(RespError::UnknownType(b'?')));
    }
}
