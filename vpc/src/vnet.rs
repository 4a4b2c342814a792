//! The virtio-net header (virtio 1.x §5.1.6, `struct virtio_net_hdr_v1`): 12 bytes, little-endian, with
//! `num_buffers` (always present with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF, which the card requires).
use crate::switch::DropReason;

/// `flags`: the driver left a partial checksum: sum from csum_start, store at csum_start + csum_offset.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags` (device to driver only): the checksum was verified.
pub const F_DATA_VALID: u8 = 2;
/// `flags` (device to driver only, with VIRTIO_NET_F_RSC_EXT): coalescing info in csum fields.
pub const F_RSC_INFO: u8 = 4;

pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// Or'ed into gso_type: the TCP segments carry ECN (the first has CWR set).
pub const GSO_ECN: u8 = 0x80;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHeader {
    pub const LEN: usize = 12;

    /// Parses the first 12 bytes. Only the length is checked here (a driver-to-device header's fields are
    /// checked against its frame by [`VnetHeader::check_tx`]).
    pub fn parse(b: &[u8]) -> Result<Self, DropReason> {
        let b: &[u8; 12] = b
            .get(..Self::LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(DropReason::Truncated)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        })
    }

    pub fn to_bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// The GSO type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    pub fn is_gso(&self) -> bool {
        self.gso_kind() != GSO_NONE
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }

    /// The header for a frame that is complete (no GSO, checksums done), as delivered after software
    /// segmentation or from VXLAN.
    pub fn plain() -> VnetHeader {
        VnetHeader::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_little_endian() {
        let h = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(&b[2..4], &[0x02, 0x01]);
        assert_eq!(VnetHeader::parse(&b), Ok(h));
        assert_eq!(h.gso_kind(), GSO_TCPV4);
        assert!(h.is_gso() && h.needs_csum());
    }

    #[test]
    fn a_short_header_is_truncated() {
        assert_eq!(VnetHeader::parse(&[0u8; 11]), Err(DropReason::Truncated));
        assert_eq!(VnetHeader::parse(&[]), Err(DropReason::Truncated));
    }
}
