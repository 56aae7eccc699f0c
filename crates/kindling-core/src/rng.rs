//! Counter-based randomness.
//!
//! `derive_seed(&[seed, epoch, index])` mixes a path of integers into one 64-bit seed with the
//! SplitMix64 finaliser (Steele et al., 2014); `rng(&[...])` turns that into a ChaCha8 stream.
//! Because a stream depends only on its path, work can be split across any number of threads,
//! or resumed after a crash, and every draw stays the same.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Domain tags keep streams for different purposes apart even when the other parts coincide.
pub mod domain {
    pub const DATA_ORDER: u64 = 0x006f_7264_6572; // "order"
    pub const MASK: u64 = 0x6d61_736b; // "mask"
    pub const INIT: u64 = 0x696e_6974; // "init"
    pub const DROPOUT: u64 = 0x6472_6f70; // "drop"
    pub const SPLIT: u64 = 0x0073_706c_6974; // "split"
    pub const AUGMENT: u64 = 0x0061_7567_6d6e; // "augmn"
}

/// The SplitMix64 output function: a bijective 64-bit mixer with full avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes a path of integers into one seed. Order matters: `[1, 2] != [2, 1]`.
pub fn derive_seed(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x243F_6A88_85A3_08D3, |acc, &p| mix64(acc ^ mix64(p)))
}

/// A ChaCha8 stream for a path of integers.
pub fn rng(parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive_seed(parts))
}

/// Hashes a string (a parameter name, say) into a path part; FNV-1a, stable across platforms.
pub fn hash_str(s: &str) -> u64 {
    let mut h = Fnv64::default();
    h.feed(s.as_bytes());
    h.finish()
}

/// Incremental 64-bit FNV-1a: a stable fingerprint (not a cryptographic one) of byte streams.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// A uniform draw in [0, 1) for element `i` of the stream `seed`: random access, so a mask over
/// millions of elements can be filled in parallel chunks with the same result on any thread count.
#[inline]
pub fn uniform_at(seed: u64, i: u64) -> f32 {
    // 24 high bits: every f32 in [0, 1) on a 2^-24 grid, as rand's f32 sampling does.
    (mix64(seed ^ mix64(i)) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn same_path_same_stream_and_different_paths_differ() {
        let a: Vec<u32> = rng(&[1, 2, 3]).random_iter().take(4).collect();
        let b: Vec<u32> = rng(&[1, 2, 3]).random_iter().take(4).collect();
        let c: Vec<u32> = rng(&[1, 3, 2]).random_iter().take(4).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn uniform_at_is_uniform_enough() {
        let n = 100_000;
        let mean: f64 = (0..n).map(|i| uniform_at(7, i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!((0..n).all(|i| (0.0..1.0).contains(&uniform_at(7, i))));
    }
}
