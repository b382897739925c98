//! Cheap, non-cryptographic random numbers: request ids, jitter, the
//! simulator's choices.

/// A uniform value in `[0, 1)` from `z`, mixed (jitter).
pub(crate) fn unit(z: u64) -> f64 {
    (splitmix(z) >> 11) as f64 / (1u64 << 53) as f64
}

/// SplitMix64's output function: a well-mixed 64-bit value for each input.
pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
