//! [`PackedJoin`]: a [`JoinPoint`] as the directory stores it, in 16 bytes where its three
//! 64-bit fields took 24 (one per user per room: every idle phone pays it twice).
//!
//! Owns: the packed representation and its exact round trip. Must not touch: what a join
//! point means (the owner assigns it; the directory hands back exactly what it was given).
//!
//! A membership serial is the owner's clock in microseconds (or just above the last one
//! given), and a room's epoch its clock in milliseconds when the room was made, so a
//! join's epoch lies a room's age below `serial / 1000`: that age, in milliseconds, and
//! the room's head at the join share one word beside the serial. A join restored from a
//! durable log has serial 0 (see `storage/state.rs`): then the epoch takes the first word
//! and the head the second. Whatever fits neither form (a room more than about two years
//! old at the join, a head past 2^26 beside a serial, an epoch or serial out of range)
//! is kept whole in a box: exact, never a silent wrap, 16 bytes more than it took
//! before (a 24-byte box beside the 16-byte slot, where the point took 24).

use std::num::NonZeroU64;

use super::JoinPoint;

/// Bits of the head beside a serial (heads up to 2^26 - 1, 67 million messages).
const SEQ_BITS: u32 = 26;
/// Bits of the room's age at the join beside a serial, two's complement (an epoch may run
/// a little ahead of the clock when many rooms are made in one millisecond): +-2^36 ms,
/// about 2.2 years.
const AGE_BITS: u32 = 37;
/// Set in the second word when the join has no serial (the first word is the epoch).
const NO_SERIAL: u64 = 1 << 63;

const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const AGE_MASK: u64 = (1 << AGE_BITS) - 1;
const AGE_MIN: i128 = -(1 << (AGE_BITS - 1));
const AGE_MAX: i128 = (1 << (AGE_BITS - 1)) - 1;

/// A join point in 16 bytes: two words inline (the serial's zero leaves a niche for the
/// box's tag), or the whole point boxed when it fits neither inline form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PackedJoin {
    /// With a serial: `first` the serial, `second` the age (`serial / 1000 - epoch`, ms,
    /// [`AGE_BITS`] two's complement) above the head ([`SEQ_BITS`]). Without one:
    /// `first` the epoch, `second` [`NO_SERIAL`] and the head.
    Inline { first: NonZeroU64, second: u64 },
    /// Exact, for what fits neither form.
    Boxed(Box<JoinPoint>),
}

impl PackedJoin {
    /// Packs `join`; [`PackedJoin::unpack`] gives back exactly `join`.
    pub(super) fn pack(join: JoinPoint) -> Self {
        Self::pack_inline(join).unwrap_or_else(|| PackedJoin::Boxed(Box::new(join)))
    }

    fn pack_inline(join: JoinPoint) -> Option<Self> {
        let JoinPoint { epoch, seq, serial } = join;
        if serial == 0 {
            let first = NonZeroU64::new(epoch)?;
            return (seq < NO_SERIAL).then_some(PackedJoin::Inline {
                first,
                second: NO_SERIAL | seq,
            });
        }
        let first = NonZeroU64::new(serial)?;
        let age = i128::from(serial / 1000) - i128::from(epoch);
        if seq > SEQ_MASK || !(AGE_MIN..=AGE_MAX).contains(&age) {
            return None;
        }
        // In range: the cast keeps the low AGE_BITS of the two's complement.
        let age_bits = (age as i64 as u64) & AGE_MASK;
        Some(PackedJoin::Inline {
            first,
            second: (age_bits << SEQ_BITS) | seq,
        })
    }

    /// The join point packed.
    pub(super) fn unpack(&self) -> JoinPoint {
        match self {
            PackedJoin::Boxed(join) => **join,
            PackedJoin::Inline { first, second } if second & NO_SERIAL != 0 => JoinPoint {
                epoch: first.get(),
                seq: second & !NO_SERIAL,
                serial: 0,
            },
            PackedJoin::Inline { first, second } => {
                let serial = first.get();
                // Sign-extend the age from its AGE_BITS.
                let shift = 64 - AGE_BITS;
                let age = ((((second >> SEQ_BITS) & AGE_MASK) << shift) as i64) >> shift;
                // Exact: packing checked that this epoch is what the join had.
                let epoch = (i128::from(serial / 1000) - i128::from(age)) as u64;
                JoinPoint {
                    epoch,
                    seq: second & SEQ_MASK,
                    serial,
                }
            }
        }
    }

    /// Whether it is kept in a box (for tests of the forms).
    #[cfg(test)]
    pub(super) fn is_boxed(&self) -> bool {
        matches!(self, PackedJoin::Boxed(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(join: JoinPoint) -> PackedJoin {
        let packed = PackedJoin::pack(join);
        assert_eq!(packed.unpack(), join, "{packed:?}");
        packed
    }

    #[test]
    fn a_packed_join_point_is_16_bytes_and_a_room_entry_24() {
        // Three u64 took 24 bytes, and a (room, join point) entry 32: a phone's two rooms
        // a 64-byte block in the directory, 48 now.
        assert_eq!(std::mem::size_of::<PackedJoin>(), 16);
        assert_eq!(
            std::mem::size_of::<(crate::ids::RoomName, PackedJoin)>(),
            24
        );
    }

    #[test]
    fn what_the_owner_gives_packs_inline_and_reads_back_exactly() {
        let now_ms: u64 = 1_795_000_000_000;
        // A fresh 1:1 room: made and joined in the same millisecond.
        let fresh = JoinPoint {
            epoch: now_ms,
            seq: 0,
            serial: now_ms * 1000 + 17,
        };
        assert!(!round_trip(fresh).is_boxed());
        // A channel made a year ago with 60 million messages.
        let channel = JoinPoint {
            epoch: now_ms - 365 * 86_400_000,
            seq: 60_000_000,
            serial: now_ms * 1000 + 999,
        };
        assert!(!round_trip(channel).is_boxed());
        // A burst of rooms: the epoch ran ahead of the clock the serial read.
        let ahead = JoinPoint {
            epoch: now_ms + 5_000,
            seq: 3,
            serial: now_ms * 1000,
        };
        assert!(!round_trip(ahead).is_boxed());
        // Restored from a durable log: no serial.
        let restored = JoinPoint {
            epoch: now_ms,
            seq: u64::MAX >> 1,
            serial: 0,
        };
        assert!(!round_trip(restored).is_boxed());
    }

    #[test]
    fn what_fits_no_inline_form_is_boxed_and_exact() {
        let serial = 1_795_000_000_000_000;
        let base = serial / 1000;
        let cases = [
            // The head one past what fits beside a serial.
            (base, SEQ_MASK + 1, serial, true),
            (base, SEQ_MASK, serial, false),
            // The age at each edge and one past it.
            (base - AGE_MAX as u64, 0, serial, false),
            (base - AGE_MAX as u64 - 1, 0, serial, true),
            (base + AGE_MIN.unsigned_abs() as u64, 0, serial, false),
            (base + AGE_MIN.unsigned_abs() as u64 + 1, 0, serial, true),
            // No serial and no epoch, or a head using the flag's bit.
            (0, 5, 0, true),
            (7, NO_SERIAL, 0, true),
            (7, NO_SERIAL - 1, 0, false),
            // Extremes.
            (u64::MAX, u64::MAX, u64::MAX, true),
            (0, 0, 1, false),
            (u64::MAX, 0, 1, true),
            (u64::MAX / 1000, 0, u64::MAX, false),
        ];
        for (epoch, seq, serial, boxed) in cases {
            let join = JoinPoint { epoch, seq, serial };
            assert_eq!(round_trip(join).is_boxed(), boxed, "{join:?}");
        }
    }

    #[test]
    fn random_join_points_read_back_exactly() {
        let mut rng = crate::rng::SplitMix64::new(17);
        for _ in 0..100_000 {
            let serial = match rng.next_u64() % 4 {
                0 => 0,
                1 => rng.next_u64(),
                _ => 1_700_000_000_000_000 + rng.next_u64() % (1 << 50),
            };
            let epoch = match rng.next_u64() % 3 {
                0 => rng.next_u64(),
                _ => (serial / 1000).wrapping_sub(rng.next_u64() % (1 << 38)),
            };
            let seq = rng.next_u64() >> (rng.next_u64() % 64);
            round_trip(JoinPoint { epoch, seq, serial });
        }
    }
}
