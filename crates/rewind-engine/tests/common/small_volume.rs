//! The small volume the model tests drive (model.rs, point_view.rs): its size, the sector
//! ranges they write, and the data they write there.

use proptest::prelude::*;

pub const SECTOR: u64 = 512;
pub const VOLUME_SECTORS: u64 = 128;
pub const VOLUME: u64 = VOLUME_SECTORS * SECTOR;

/// A range of 1 to 16 sectors inside the volume: (first sector, sectors).
pub fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..VOLUME_SECTORS).prop_flat_map(|sector| (Just(sector), 1..=(VOLUME_SECTORS - sector).min(16)))
}

/// `len` bytes of data that differ with `seed` and `salt` and are never zero, so a write is
/// never mistaken for a hole.
pub fn pattern(seed: u8, len: usize, salt: u64) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i as u64).wrapping_mul(31).wrapping_add(salt) as u8) | 1).collect()
}
