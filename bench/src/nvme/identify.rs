//! Identify Controller and Identify Namespace pages, parsed into the fields
//! the driver and its tests use. Every field is read with bounds checks, so a
//! short or garbled page from a misbehaving controller parses as zeros.

use super::spec::{self, PAGE};

/// Identify Controller fields the driver and tests use (figure 247).
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    pub vid: u16,
    pub ssvid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum data transfer size, 2^mdts pages; 0 = no limit.
    pub mdts: u8,
    pub cntlid: u16,
    pub version: u32,
    pub oacs: u16,
    pub sqes: u8,
    pub cqes: u8,
    pub nn: u32,
    pub oncs: u16,
    pub vwc: u8,
    pub sgls: u32,
    pub raw: Vec<u8>,
}

impl ControllerInfo {
    pub fn parse(p: &[u8]) -> Self {
        Self {
            vid: spec::le(p, 0, 2) as u16,
            ssvid: spec::le(p, 2, 2) as u16,
            serial: spec::ascii(p, 4, 20),
            model: spec::ascii(p, 24, 40),
            firmware: spec::ascii(p, 64, 8),
            mdts: spec::le(p, 77, 1) as u8,
            cntlid: spec::le(p, 78, 2) as u16,
            version: spec::le(p, 80, 4) as u32,
            oacs: spec::le(p, 256, 2) as u16,
            sqes: spec::le(p, 512, 1) as u8,
            cqes: spec::le(p, 513, 1) as u8,
            nn: spec::le(p, 516, 4) as u32,
            oncs: spec::le(p, 520, 2) as u16,
            vwc: spec::le(p, 525, 1) as u8,
            sgls: spec::le(p, 536, 4) as u32,
            raw: p.to_vec(),
        }
    }

    /// Largest transfer in bytes (None: unlimited).
    pub fn max_transfer(&self) -> Option<u64> {
        (self.mdts != 0).then(|| PAGE << self.mdts.min(20))
    }

    pub fn supports_doorbell_buffer(&self) -> bool {
        self.oacs & 1 << 8 != 0
    }

    pub fn supports_sgl(&self) -> bool {
        self.sgls & 3 != 0
    }
}

/// Identify Namespace fields (figure 245).
#[derive(Clone, Debug)]
pub struct NamespaceInfo {
    pub nsid: u32,
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    pub nlbaf: u8,
    pub flbas: u8,
    /// Bytes per logical block of the formatted LBA format.
    pub lba_size: u64,
    pub raw: Vec<u8>,
}

impl NamespaceInfo {
    pub fn parse(nsid: u32, p: &[u8]) -> Self {
        let flbas = spec::le(p, 26, 1) as u8;
        let lbaf = spec::le(p, 128 + 4 * usize::from(flbas & 0xf), 4);
        let lbads = (lbaf >> 16 & 0xff) as u32;
        Self {
            nsid,
            nsze: spec::le(p, 0, 8),
            ncap: spec::le(p, 8, 8),
            nuse: spec::le(p, 16, 8),
            nlbaf: spec::le(p, 25, 1) as u8,
            flbas,
            lba_size: if (9..=16).contains(&lbads) {
                1 << lbads
            } else {
                0
            },
            raw: p.to_vec(),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.nsze.saturating_mul(self.lba_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_page() {
        let mut p = vec![0u8; 4096];
        p[4..8].copy_from_slice(b"SN42");
        p[24..53].copy_from_slice(b"cardsim NVMe Instance Storage");
        p[77] = 5;
        p[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
        p[256..258].copy_from_slice(&(1u16 << 8).to_le_bytes());
        p[512] = 0x66;
        p[513] = 0x44;
        p[536] = 1;
        let c = ControllerInfo::parse(&p);
        assert_eq!(c.serial, "SN42");
        assert_eq!(c.model, "cardsim NVMe Instance Storage");
        assert_eq!(c.max_transfer(), Some(128 << 10));
        assert_eq!(c.version, 0x0001_0400);
        assert!(c.supports_doorbell_buffer() && c.supports_sgl());
        let empty = ControllerInfo::parse(&[]);
        assert_eq!(empty.max_transfer(), None);
        assert!(!empty.supports_doorbell_buffer());
    }

    #[test]
    fn namespace_page() {
        let mut p = vec![0u8; 4096];
        p[0..8].copy_from_slice(&2048u64.to_le_bytes());
        p[25] = 1;
        p[26] = 1; // format 1
                   // Format 0: 512-byte blocks; format 1 (the one in use): 4 KiB.
        p[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        p[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let n = NamespaceInfo::parse(1, &p);
        assert_eq!(n.lba_size, 4096);
        assert_eq!(n.size_bytes(), 2048 * 4096);
        // An LBA data size outside 2^9..2^16 is no size at all.
        p[134] = 40;
        assert_eq!(NamespaceInfo::parse(1, &p).lba_size, 0);
    }
}
