//! Verification data: every 512-byte sector carries a header (magic, its
//! own sector number, the write's generation) and a pseudo-random body
//! derived from both, so stale, misplaced and corrupted data all differ.

pub const MAGIC: u64 = u64::from_le_bytes(*b"CARDBNCH");
const SECTOR: usize = 512;

pub fn fill(buf: &mut [u8], first_sector: u64, generation: u64) {
    for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let lba = first_sector + i as u64;
        sector[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        sector[8..16].copy_from_slice(&lba.to_le_bytes());
        sector[16..24].copy_from_slice(&generation.to_le_bytes());
        let mut x = (lba.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ generation.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            | 1;
        for word in sector[24..].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Describes the first bad sector of `found` against the expected data.
pub fn describe_mismatch(
    found: &[u8],
    expected: &[u8],
    first_sector: u64,
    generation: u64,
) -> String {
    for (i, (f, e)) in found
        .chunks_exact(SECTOR)
        .zip(expected.chunks_exact(SECTOR))
        .enumerate()
    {
        if f == e {
            continue;
        }
        let word = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().expect("8 bytes"));
        let lba = first_sector + i as u64;
        return if word(0) != MAGIC {
            format!("sector {lba}: no stamp (expected generation {generation}; data corrupt or never written)")
        } else if word(8) != lba {
            format!(
                "sector {lba}: holds sector {}'s data (misplaced write)",
                word(8)
            )
        } else if word(16) != generation {
            format!(
                "sector {lba}: generation {} instead of {generation} (stale or lost write)",
                word(16)
            )
        } else {
            format!("sector {lba}: stamp right, body corrupt")
        };
    }
    "no mismatch".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_differs_by_sector_and_generation() {
        let mut a = vec![0u8; 1024];
        let mut b = vec![0u8; 1024];
        fill(&mut a, 8, 1);
        fill(&mut b, 8, 2);
        assert_ne!(a, b);
        assert!(describe_mismatch(&b, &a, 8, 1).contains("generation 2 instead of 1"));
        fill(&mut b, 9, 1);
        assert!(describe_mismatch(&b, &a, 8, 1).contains("misplaced"));
    }
}
