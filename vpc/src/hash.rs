//! A fast keyed hash for the switch's tables on the forwarding path (connection tracking, addresses).
//! std's SipHash took half of the switch's time per frame; this is a folded multiply (the construction of
//! foldhash/ahash's fallback) keyed per table from std's random keys, so guests can't aim collisions at a
//! table without knowing the keys. Only lookup cost depends on it: no behaviour depends on iteration order.
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

const PI: u64 = 0x243f_6a88_85a3_08d3;
const E: u64 = 0x2718_2818_2845_9045;

fn folded_mul(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

/// Builds [`FastHasher`]s with keys drawn once from std's `RandomState`.
#[derive(Clone, Debug)]
pub struct FastState {
    k0: u64,
    k1: u64,
}

impl Default for FastState {
    fn default() -> Self {
        let random = RandomState::new();
        FastState {
            k0: random.hash_one(0u64),
            k1: random.hash_one(1u64),
        }
    }
}

impl BuildHasher for FastState {
    type Hasher = FastHasher;

    fn build_hasher(&self) -> FastHasher {
        FastHasher {
            acc: self.k0,
            k1: self.k1,
        }
    }
}

pub struct FastHasher {
    acc: u64,
    k1: u64,
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b) ^ ((chunk.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, x: u8) {
        self.write_u64(u64::from(x));
    }

    fn write_u16(&mut self, x: u16) {
        self.write_u64(u64::from(x));
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    fn write_u64(&mut self, x: u64) {
        self.acc = folded_mul(self.acc ^ x, self.k1 ^ PI);
    }

    fn write_u128(&mut self, x: u128) {
        self.acc = folded_mul(self.acc ^ x as u64, self.k1 ^ (x >> 64) as u64 ^ E);
    }

    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }

    fn finish(&self) -> u64 {
        folded_mul(self.acc ^ E, self.k1.rotate_left(23) ^ PI)
    }
}

pub type FastMap<K, V> = std::collections::HashMap<K, V, FastState>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn distinct_small_keys_spread() {
        let s = FastState::default();
        let hashes: HashSet<u64> = (0u32..100_000)
            .map(|i| s.hash_one((10u8, i, 5201u16)))
            .collect();
        assert_eq!(hashes.len(), 100_000);
        // Low bits (what hashbrown indexes with) spread too.
        let buckets: HashSet<u64> = (0u32..4096).map(|i| s.hash_one(i) & 0xfff).collect();
        assert!(buckets.len() > 2400, "{}", buckets.len());
        assert_ne!(
            FastState::default().hash_one(1u32),
            s.hash_one(1u32),
            "keyed per table"
        );
    }
}
