//! Unsigned LEB128 varints with a fixed maximum length and canonical-form checking, and
//! zigzag mapping for signed values.
//!
//! Owns: the integer encodings of the wire protocol. Touches nothing else.

use bytes::BufMut;

use crate::error::DecodeError;

/// The longest varint the protocol accepts: enough for any `u64`.
pub const MAX_VARINT_LEN: usize = 10;

/// Bytes needed to encode `v`.
#[inline]
pub const fn len_u64(v: u64) -> usize {
    // 1 byte per started group of 7 bits; 0 still takes one byte.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends `v` as a varint.
#[inline]
pub fn put_u64(dst: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

/// Outcome of reading a varint from a buffer that may hold only part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partial {
    /// A complete value and the number of bytes it took.
    Done(u64, usize),
    /// The buffer ends inside the varint.
    NeedMore,
}

/// Reads a varint from the start of `src`, rejecting overlong (non-canonical) encodings and
/// values past `u64::MAX`.
#[inline]
pub fn get_u64(src: &[u8]) -> Result<Partial, DecodeError> {
    let mut value: u64 = 0;
    for (i, &byte) in src.iter().enumerate().take(MAX_VARINT_LEN) {
        let group = u64::from(byte & 0x7f);
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(DecodeError::VarintOverflow);
        }
        value |= group << (7 * i);
        if byte & 0x80 == 0 {
            // A final zero group after the first byte means a shorter encoding existed.
            if i > 0 && byte == 0 {
                return Err(DecodeError::NonCanonicalVarint);
            }
            return Ok(Partial::Done(value, i + 1));
        }
    }
    if src.len() >= MAX_VARINT_LEN {
        Err(DecodeError::VarintOverflow)
    } else {
        Ok(Partial::NeedMore)
    }
}

/// Maps a signed value onto an unsigned one so that small magnitudes stay short.
#[inline]
pub const fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[inline]
pub const fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for &(v, bytes) in cases {
            let mut out = Vec::new();
            put_u64(&mut out, v);
            assert_eq!(out, bytes, "encoding {v}");
            assert_eq!(len_u64(v), bytes.len());
            assert_eq!(get_u64(bytes), Ok(Partial::Done(v, bytes.len())));
        }
    }

    #[test]
    fn rejects_overlong_and_overflow() {
        assert_eq!(get_u64(&[0x80, 0x00]), Err(DecodeError::NonCanonicalVarint));
        assert_eq!(
            get_u64(&[0x81, 0x80, 0x00]),
            Err(DecodeError::NonCanonicalVarint)
        );
        let overflow = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(get_u64(&overflow), Err(DecodeError::VarintOverflow));
        let too_long = [0x80; 11];
        assert!(get_u64(&too_long).is_err());
        assert_eq!(get_u64(&[0x80, 0x80]), Ok(Partial::NeedMore));
        assert_eq!(get_u64(&[]), Ok(Partial::NeedMore));
    }

    proptest! {
        #[test]
        fn round_trip(v in any::<u64>()) {
            let mut out = Vec::new();
            put_u64(&mut out, v);
            prop_assert_eq!(out.len(), len_u64(v));
            prop_assert_eq!(get_u64(&out), Ok(Partial::Done(v, out.len())));
            // Every strict prefix asks for more bytes.
            for cut in 0..out.len() {
                prop_assert_eq!(get_u64(&out[..cut]), Ok(Partial::NeedMore));
            }
        }

        #[test]
        fn zigzag_round_trip(v in any::<i64>()) {
            prop_assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn zigzag_small_magnitudes_are_small() {
        assert_eq!(zigzag(0), 0);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(zigzag(-64), 127);
    }
}
