//! The controller's PCI configuration space: an NVMe-class function
//! (class 01-08-02) with one 64-bit memory BAR and the PM, MSI-X and PCI
//! Express capabilities. QEMU's vfio code virtualises parts of it (BAR
//! addresses, the MSI-X table), but reads its layout from here.

use crate::admin::VENDOR_ID;

/// Instance-store NVMe device id.
pub const DEVICE_ID: u16 = 0xcd01;
/// BAR0: registers at 0, doorbells at 0x1000, MSI-X table and PBA above.
pub const BAR0_SIZE: u64 = 0x4000;
pub const MSIX_TABLE_OFFSET: u32 = 0x2000;
pub const MSIX_PBA_OFFSET: u32 = 0x3000;
/// Size of the config space region (PCIe extended space, all but the
/// header and capabilities read as zero).
pub const CONFIG_SIZE: u64 = 4096;

const PM_CAP: usize = 0x40;
const MSIX_CAP: usize = 0x50;
const PCIE_CAP: usize = 0x60;

#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    /// Bits of each byte the host may write.
    writable: [u8; 256],
}

impl ConfigSpace {
    /// A function with `vectors` MSI-X vectors.
    pub fn new(vectors: u16) -> Self {
        let mut c = Self {
            bytes: [0; 256],
            writable: [0; 256],
        };
        c.put16(0x00, VENDOR_ID);
        c.put16(0x02, DEVICE_ID);
        // Status: capabilities list.
        c.put16(0x06, 1 << 4);
        c.bytes[0x08] = 0; // revision
        c.bytes[0x09] = 0x02; // programming interface: NVM Express
        c.bytes[0x0a] = 0x08; // subclass: non-volatile memory
        c.bytes[0x0b] = 0x01; // class: mass storage
                              // BAR0: 64-bit memory, not prefetchable.
        c.put32(0x10, 0x4);
        c.put16(0x2c, VENDOR_ID);
        c.put16(0x2e, DEVICE_ID);
        c.bytes[0x34] = PM_CAP as u8;
        // No legacy interrupt pin: MSI-X only.
        c.bytes[0x3d] = 0;
        // Command: memory space, bus master, INTx disable.
        c.writable[0x04] = 0x06;
        c.writable[0x05] = 0x04;
        // BAR0 address bits above its size.
        let mask = !(BAR0_SIZE - 1);
        for i in 0..8 {
            c.writable[0x10 + i] = (mask >> (8 * i)) as u8;
        }
        c.writable[0x10] &= 0xf0;

        // Power management, version 3; PMCSR power state writable.
        c.bytes[PM_CAP] = 0x01;
        c.bytes[PM_CAP + 1] = MSIX_CAP as u8;
        c.put16(PM_CAP + 2, 0x0003);
        c.writable[PM_CAP + 4] = 0x03;

        // MSI-X: table and PBA in BAR0; enable and function mask writable.
        c.bytes[MSIX_CAP] = 0x11;
        c.bytes[MSIX_CAP + 1] = PCIE_CAP as u8;
        c.put16(MSIX_CAP + 2, vectors.saturating_sub(1) & 0x7ff);
        c.put32(MSIX_CAP + 4, MSIX_TABLE_OFFSET);
        c.put32(MSIX_CAP + 8, MSIX_PBA_OFFSET);
        c.writable[MSIX_CAP + 3] = 0xc0;

        // PCI Express, version 2, endpoint; 128-byte payload, x1 at 2.5 GT/s.
        c.bytes[PCIE_CAP] = 0x10;
        c.bytes[PCIE_CAP + 1] = 0;
        c.put16(PCIE_CAP + 2, 0x0002);
        c.put32(PCIE_CAP + 4, 0x0000_8000); // DevCap: role-based error reporting
        c.writable[PCIE_CAP + 8] = 0xff; // DevCtl
        c.writable[PCIE_CAP + 9] = 0x7f;
        c.put32(PCIE_CAP + 0x0c, 0x0000_0011); // LinkCap: x1, 2.5 GT/s
        c.put16(PCIE_CAP + 0x12, 0x0011); // LinkSta: x1, 2.5 GT/s
        c
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.bytes.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Applies a write through the writable-bit mask; read-only bits keep
    /// their value, and writes past the header are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64).map(|o| o as usize) else {
                return;
            };
            if at < self.bytes.len() {
                let mask = self.writable[at];
                self.bytes[at] = (self.bytes[at] & !mask) | (b & mask);
            }
        }
    }

    /// Whether the host enabled MSI-X.
    pub fn msix_enabled(&self) -> bool {
        self.bytes[MSIX_CAP + 3] & 0x80 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(c: &ConfigSpace, at: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn class_code_and_capability_chain() {
        let c = ConfigSpace::new(5);
        assert_eq!(read32(&c, 0x08) >> 8, 0x01_08_02);
        let mut at = read32(&c, 0x34) as u64 & 0xff;
        let mut ids = Vec::new();
        while at != 0 {
            let v = read32(&c, at);
            ids.push(v as u8);
            at = u64::from((v >> 8) as u8);
        }
        assert_eq!(ids, [0x01, 0x11, 0x10]);
        // MSI-X table size is N-1.
        assert_eq!((read32(&c, MSIX_CAP as u64) >> 16) & 0x7ff, 4);
    }

    #[test]
    fn bar_sizing_reports_the_size_and_read_only_bits_hold() {
        let mut c = ConfigSpace::new(2);
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(read32(&c, 0x10), !(BAR0_SIZE as u32 - 1) | 0x4);
        assert_eq!(read32(&c, 0x14), 0xffff_ffff);
        c.write(0x00, &[0; 4]);
        assert_eq!(read32(&c, 0x00) & 0xffff, u32::from(VENDOR_ID));
        c.write(MSIX_CAP as u64 + 2, &[0xff, 0xff]);
        assert!(c.msix_enabled());
        assert_eq!((read32(&c, MSIX_CAP as u64) >> 16) & 0x7ff, 1);
        // Past the header: zeros, writes ignored, no panic.
        c.write(0xfff, &[1, 2, 3]);
        assert_eq!(read32(&c, 0x400), 0);
        c.write(u64::MAX, &[1, 2]);
    }
}
