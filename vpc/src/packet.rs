//! Zero-copy views of the headers the switch reads (Ethernet, IPv4/IPv6, TCP/UDP/ICMP) and the Internet
//! checksum. Every offset is checked against the frame: these parse guest- and peer-controlled bytes.
use crate::addr::MacAddr;
use crate::switch::DropReason;
use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_CWR: u8 = 0x80;

pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The Ethernet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eth {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub ethertype: u16,
}

pub fn eth(frame: &[u8]) -> Result<Eth, DropReason> {
    if frame.len() < ETH_HLEN {
        return Err(DropReason::Truncated);
    }
    Ok(Eth {
        dst: MacAddr::from_slice(&frame[0..6]).ok_or(DropReason::Truncated)?,
        src: MacAddr::from_slice(&frame[6..12]).ok_or(DropReason::Truncated)?,
        ethertype: be16(frame, 12).ok_or(DropReason::Truncated)?,
    })
}

/// An IPv4 header at [`ETH_HLEN`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub header_len: usize,
    /// The IP total length (the frame may carry Ethernet padding after it).
    pub total_len: usize,
    pub id: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Fragment offset in bytes (non-zero: a later fragment, without an L4 header).
    pub frag_offset: usize,
    pub more_fragments: bool,
}

impl Ipv4 {
    pub fn l4_offset(&self) -> usize {
        ETH_HLEN + self.header_len
    }

    pub fn end(&self) -> usize {
        ETH_HLEN + self.total_len
    }

    pub fn is_fragment(&self) -> bool {
        self.frag_offset != 0 || self.more_fragments
    }
}

/// Parses and checks the IPv4 header at [`ETH_HLEN`]: version, header length, total length inside the frame.
pub fn ipv4(frame: &[u8]) -> Result<Ipv4, DropReason> {
    let ip = frame.get(ETH_HLEN..).ok_or(DropReason::Truncated)?;
    if ip.len() < 20 {
        return Err(DropReason::Truncated);
    }
    if ip[0] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(DropReason::Malformed);
    }
    let total_len = usize::from(be16(ip, 2).ok_or(DropReason::Truncated)?);
    if total_len < header_len {
        return Err(DropReason::Malformed);
    }
    if total_len > ip.len() {
        return Err(DropReason::Truncated);
    }
    let frag = be16(ip, 6).ok_or(DropReason::Truncated)?;
    Ok(Ipv4 {
        header_len,
        total_len,
        id: be16(ip, 4).ok_or(DropReason::Truncated)?,
        ttl: ip[8],
        proto: ip[9],
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        frag_offset: usize::from(frag & 0x1fff) * 8,
        more_fragments: frag & 0x2000 != 0,
    })
}

/// An IPv6 header at [`ETH_HLEN`] (fixed header only; the switch routes IPv4, segmentation handles IPv6
/// whose next header is TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    pub payload_len: usize,
    pub next_header: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
}

pub const IPV6_HLEN: usize = 40;

pub fn ipv6(frame: &[u8]) -> Result<Ipv6, DropReason> {
    let ip = frame.get(ETH_HLEN..).ok_or(DropReason::Truncated)?;
    if ip.len() < IPV6_HLEN {
        return Err(DropReason::Truncated);
    }
    if ip[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let payload_len = usize::from(be16(ip, 4).ok_or(DropReason::Truncated)?);
    if IPV6_HLEN + payload_len > ip.len() {
        return Err(DropReason::Truncated);
    }
    let addr = |at: usize| -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&ip[at..at + 16]);
        Ipv6Addr::from(a)
    };
    Ok(Ipv6 {
        payload_len,
        next_header: ip[6],
        src: addr(8),
        dst: addr(24),
    })
}

/// The transport fields the security groups and connection tracking read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
        header_len: usize,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    Icmp {
        kind: u8,
        code: u8,
        ident: u16,
    },
    /// Another protocol, or a later fragment (no transport header).
    Other {
        proto: u8,
    },
}

/// Parses the transport header of `frame`'s IPv4 packet `ip` (first fragments only carry one).
pub fn l4(frame: &[u8], ip: &Ipv4) -> Result<L4, DropReason> {
    if ip.frag_offset != 0 {
        return Ok(L4::Other { proto: ip.proto });
    }
    let seg = frame
        .get(ip.l4_offset()..ip.end())
        .ok_or(DropReason::Truncated)?;
    transport(seg, ip.proto)
}

/// Parses a transport header at the start of `seg`.
pub fn transport(seg: &[u8], proto: u8) -> Result<L4, DropReason> {
    match proto {
        PROTO_TCP => {
            if seg.len() < 20 {
                return Err(DropReason::Truncated);
            }
            let header_len = usize::from(seg[12] >> 4) * 4;
            if header_len < 20 {
                return Err(DropReason::Malformed);
            }
            if header_len > seg.len() {
                return Err(DropReason::Truncated);
            }
            Ok(L4::Tcp {
                src_port: be16(seg, 0).ok_or(DropReason::Truncated)?,
                dst_port: be16(seg, 2).ok_or(DropReason::Truncated)?,
                flags: seg[13],
                header_len,
            })
        }
        PROTO_UDP => {
            if seg.len() < 8 {
                return Err(DropReason::Truncated);
            }
            Ok(L4::Udp {
                src_port: be16(seg, 0).ok_or(DropReason::Truncated)?,
                dst_port: be16(seg, 2).ok_or(DropReason::Truncated)?,
            })
        }
        PROTO_ICMP => {
            if seg.len() < 8 {
                return Err(DropReason::Truncated);
            }
            Ok(L4::Icmp {
                kind: seg[0],
                code: seg[1],
                ident: be16(seg, 4).ok_or(DropReason::Truncated)?,
            })
        }
        proto => Ok(L4::Other { proto }),
    }
}

/// Adds `data` as big-endian 16-bit words to a one's-complement running sum (odd tail padded with zero).
pub fn sum16(data: &[u8], mut sum: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a running sum to 16 bits and complements it: the value stored in a checksum field.
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IPv4 pseudo-header sum for a transport segment of `len` bytes.
pub fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
    let mut s = sum16(&src.octets(), 0);
    s = sum16(&dst.octets(), s);
    s + u64::from(proto) + len as u64
}

/// The IPv6 pseudo-header sum for a transport segment of `len` bytes.
pub fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u64 {
    let mut s = sum16(&src.octets(), 0);
    s = sum16(&dst.octets(), s);
    s + u64::from(proto) + len as u64
}

/// Recomputes the IPv4 header checksum in place (`ip` is the header's bytes).
pub fn set_ipv4_checksum(ip: &mut [u8]) {
    if ip.len() < 20 {
        return;
    }
    ip[10] = 0;
    ip[11] = 0;
    let c = fold(sum16(ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_rfc_1071_example() {
        // RFC 1071 §3: 0001 f203 f4f5 f6f7 sums to ddf2 (before complement).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum16(&data, 0)), !0xddf2);
    }

    #[test]
    fn short_headers_are_truncated_not_panics() {
        assert_eq!(eth(&[0u8; 13]), Err(DropReason::Truncated));
        let mut f = vec![0u8; 14 + 19];
        f[12] = 8;
        assert_eq!(ipv4(&f), Err(DropReason::Truncated));
        f.push(0);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(
            ipv4(&f),
            Err(DropReason::Truncated),
            "total length beyond the frame"
        );
        f[16..18].copy_from_slice(&20u16.to_be_bytes());
        f[14] = 0x44;
        assert_eq!(ipv4(&f), Err(DropReason::Malformed), "IHL below 5");
        assert_eq!(transport(&[0u8; 19], PROTO_TCP), Err(DropReason::Truncated));
        assert_eq!(transport(&[0u8; 7], PROTO_UDP), Err(DropReason::Truncated));
    }
}
