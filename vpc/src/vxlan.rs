//! VXLAN (RFC 7348 §5): an 8-byte header before the inner Ethernet frame, in a UDP datagram.
//! `flags(8) = 0x08 (I: VNI valid) | reserved(24) | VNI(24) | reserved(8)`.
use crate::switch::DropReason;

pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI is valid. RFC 7348: other flag bits "MUST be set to zero on transmission and
/// ignored on receipt"; the I flag must be set.
pub const FLAG_VNI: u8 = 0x08;
/// IANA's VXLAN port.
pub const PORT: u16 = 4789;

/// The header for `vni` (< 2^24).
pub fn header(vni: u32) -> [u8; HEADER_LEN] {
    let v = (vni & 0x00ff_ffff).to_be_bytes();
    [FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// Checks the header of a received datagram and returns the inner frame. The I flag must be set and the
/// VNI must be ours; reserved bits are ignored as the RFC asks.
pub fn decap(datagram: &[u8], vni: u32) -> Result<&[u8], DropReason> {
    let (head, inner) = datagram
        .split_at_checked(HEADER_LEN)
        .ok_or(DropReason::Truncated)?;
    if head[0] & FLAG_VNI == 0 {
        return Err(DropReason::BadVxlanHeader);
    }
    let got = u32::from_be_bytes([0, head[4], head[5], head[6]]);
    if got != vni {
        return Err(DropReason::UnknownVni);
    }
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_rfc_7348() {
        assert_eq!(header(100), [0x08, 0, 0, 0, 0, 0, 100, 0]);
        assert_eq!(header(0x00ab_cdef), [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]);
    }

    #[test]
    fn decap_checks_flags_vni_and_length() {
        let mut d = header(100).to_vec();
        d.extend_from_slice(b"frame");
        assert_eq!(decap(&d, 100), Ok(&b"frame"[..]));
        assert_eq!(decap(&d, 101), Err(DropReason::UnknownVni));
        assert_eq!(decap(&d[..7], 100), Err(DropReason::Truncated));
        let mut no_i = d.clone();
        no_i[0] = 0;
        assert_eq!(decap(&no_i, 100), Err(DropReason::BadVxlanHeader));
        let mut reserved = d.clone();
        reserved[0] |= 0x80;
        reserved[7] = 0xff;
        assert_eq!(decap(&reserved, 100), Ok(&b"frame"[..]));
    }
}
