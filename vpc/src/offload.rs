//! The vnet header on the transmit path, and the offloads the card does in software when a destination
//! can't: checking a driver's header against its frame, TCP segmentation (GSO) over IPv4 and IPv6, and
//! checksum completion (VIRTIO_NET_HDR_F_NEEDS_CSUM).
use crate::packet::{
    self, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HLEN, IPV6_HLEN, L4, PROTO_TCP, TCP_CWR, TCP_FIN,
    TCP_PSH,
};
use crate::switch::DropReason;
use crate::vnet::{VnetHeader, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6};

/// Largest GSO frame: an IP packet of 64 KiB behind its Ethernet header.
pub const MAX_GSO_FRAME: usize = ETH_HLEN + 65535;
/// Smallest accepted gso_size. Linux never sends TCP segments with less payload than this (TCP_MIN_MSS 88
/// less 40 bytes of options); a smaller one would only make software segmentation expensive.
pub const MIN_GSO_SIZE: u16 = 32;

/// Where the TCP header of a GSO frame is and how large the headers are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLayout {
    pub ipv6: bool,
    pub l3_len: usize,
    pub l4_offset: usize,
    pub tcp_len: usize,
    /// End of the IP packet in the frame.
    pub end: usize,
}

impl TcpLayout {
    pub fn headers_len(&self) -> usize {
        self.l4_offset + self.tcp_len
    }
}

/// The layout of a TCP/IPv4 or TCP/IPv6 (no extension headers) frame, as GSO requires.
pub fn tcp_layout(frame: &[u8]) -> Result<TcpLayout, DropReason> {
    let eth = packet::eth(frame)?;
    let (ipv6, l3_len, end) = match eth.ethertype {
        ETHERTYPE_IPV4 => {
            let ip = packet::ipv4(frame)?;
            if ip.proto != PROTO_TCP || ip.is_fragment() {
                return Err(DropReason::GsoMismatch);
            }
            (false, ip.header_len, ip.end())
        }
        ETHERTYPE_IPV6 => {
            let ip = packet::ipv6(frame)?;
            if ip.next_header != PROTO_TCP {
                return Err(DropReason::GsoMismatch);
            }
            (true, IPV6_HLEN, ETH_HLEN + IPV6_HLEN + ip.payload_len)
        }
        _ => return Err(DropReason::GsoMismatch),
    };
    let l4_offset = ETH_HLEN + l3_len;
    let seg = frame.get(l4_offset..end).ok_or(DropReason::Truncated)?;
    let L4::Tcp { header_len, .. } = packet::transport(seg, PROTO_TCP)? else {
        return Err(DropReason::GsoMismatch);
    };
    Ok(TcpLayout {
        ipv6,
        l3_len,
        l4_offset,
        tcp_len: header_len,
        end,
    })
}

/// Checks a driver's (or the uplink's) vnet header against its frame, for an ENI with this MTU.
/// Virtio 1.x §5.1.6.2: the driver sets only NEEDS_CSUM in flags; a GSO type needs the matching feature
/// (the card offers HOST_TSO4/6, not UFO/USO); csum_start/offset must lie inside the frame.
pub fn check_tx(h: &VnetHeader, frame: &[u8], mtu: u16) -> Result<(), DropReason> {
    if frame.len() < ETH_HLEN {
        return Err(DropReason::Truncated);
    }
    if h.flags & !F_NEEDS_CSUM != 0 {
        return Err(DropReason::BadVnetHeader);
    }
    let kind = h.gso_kind();
    if !matches!(kind, GSO_NONE | GSO_TCPV4 | GSO_TCPV6) {
        return Err(DropReason::BadVnetHeader);
    }
    if kind == GSO_NONE && h.gso_type & GSO_ECN != 0 {
        return Err(DropReason::BadVnetHeader);
    }
    if h.needs_csum() {
        let start = usize::from(h.csum_start);
        let at = start + usize::from(h.csum_offset);
        if start < ETH_HLEN || at + 2 > frame.len() {
            return Err(DropReason::BadVnetHeader);
        }
    }
    if kind == GSO_NONE {
        if frame.len() > usize::from(mtu) + ETH_HLEN {
            return Err(DropReason::Oversized);
        }
        return Ok(());
    }
    if frame.len() > MAX_GSO_FRAME {
        return Err(DropReason::Oversized);
    }
    if !h.needs_csum() || h.gso_size < MIN_GSO_SIZE {
        return Err(DropReason::GsoMismatch);
    }
    let layout = tcp_layout(frame)?;
    if layout.ipv6 != (kind == GSO_TCPV6) {
        return Err(DropReason::GsoMismatch);
    }
    if usize::from(h.csum_start) != layout.l4_offset || h.csum_offset != 16 {
        return Err(DropReason::GsoMismatch);
    }
    // hdr_len is a hint (Linux sets it to the linear part's length), but never beyond the frame.
    if usize::from(h.hdr_len) > frame.len() {
        return Err(DropReason::GsoMismatch);
    }
    if layout.l3_len + layout.tcp_len + usize::from(h.gso_size) > usize::from(mtu) {
        return Err(DropReason::GsoMismatch);
    }
    Ok(())
}

/// Completes a partial checksum: sums from csum_start to the end of the IP packet (the pseudo-header sum is
/// already in the field, as virtio specifies) and stores the result at csum_start + csum_offset.
/// A header without NEEDS_CSUM leaves the frame as it is. The frame then goes out with a plain header.
pub fn complete_checksum(h: &VnetHeader, frame: &mut [u8]) -> Result<(), DropReason> {
    if !h.needs_csum() {
        return Ok(());
    }
    let start = usize::from(h.csum_start);
    let at = start + usize::from(h.csum_offset);
    if start < ETH_HLEN || at + 2 > frame.len() {
        return Err(DropReason::BadVnetHeader);
    }
    let end = packet_end(frame)
        .unwrap_or(frame.len())
        .clamp(at + 2, frame.len());
    let c = packet::fold(packet::sum16(&frame[start..end], 0));
    // UDP transmits 0 as 0xffff (0 means "no checksum"); TCP's fold of a valid sum never needs it.
    let c = if c == 0 && is_udp_at(frame, start) {
        0xffff
    } else {
        c
    };
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

fn packet_end(frame: &[u8]) -> Option<usize> {
    match packet::eth(frame).ok()?.ethertype {
        ETHERTYPE_IPV4 => packet::ipv4(frame).ok().map(|ip| ip.end()),
        ETHERTYPE_IPV6 => packet::ipv6(frame)
            .ok()
            .map(|ip| ETH_HLEN + IPV6_HLEN + ip.payload_len),
        _ => None,
    }
}

fn is_udp_at(frame: &[u8], l4: usize) -> bool {
    match packet::eth(frame).map(|e| e.ethertype) {
        Ok(ETHERTYPE_IPV4) => packet::ipv4(frame)
            .is_ok_and(|ip| ip.proto == packet::PROTO_UDP && ip.l4_offset() == l4),
        Ok(ETHERTYPE_IPV6) => packet::ipv6(frame)
            .is_ok_and(|ip| ip.next_header == packet::PROTO_UDP && l4 == ETH_HLEN + IPV6_HLEN),
        _ => false,
    }
}

/// Splits a GSO frame into frames whose IP packets fit `mtu`, each with complete checksums, and passes each
/// to `out` (one buffer, reused). Segments carry `min(gso_size, mtu - headers)` payload bytes; IPv4 ids
/// count up from the original, TCP sequence numbers advance by the payload, FIN and PSH stay on the last
/// segment and CWR on the first. A frame without GSO is passed through, its checksum completed if partial.
pub fn segment(
    h: &VnetHeader,
    frame: &[u8],
    mtu: u16,
    out: &mut impl FnMut(&[u8]),
) -> Result<(), DropReason> {
    if !h.is_gso() {
        if h.needs_csum() {
            let mut copy = frame.to_vec();
            complete_checksum(h, &mut copy)?;
            out(&copy);
        } else {
            out(frame);
        }
        return Ok(());
    }
    let l = tcp_layout(frame)?;
    if l.ipv6 != (h.gso_kind() == GSO_TCPV6) {
        return Err(DropReason::GsoMismatch);
    }
    let l3_and_tcp = l.l3_len + l.tcp_len;
    let room = usize::from(mtu)
        .checked_sub(l3_and_tcp)
        .filter(|r| *r > 0)
        .ok_or(DropReason::Oversized)?;
    let mss = usize::from(h.gso_size).min(room);
    if mss == 0 {
        return Err(DropReason::GsoMismatch);
    }
    let headers = frame.get(..l.headers_len()).ok_or(DropReason::Truncated)?;
    let payload = frame
        .get(l.headers_len()..l.end)
        .ok_or(DropReason::Truncated)?;
    let seq0 = packet::be32(frame, l.l4_offset + 4).ok_or(DropReason::Truncated)?;
    let id0 = packet::be16(frame, ETH_HLEN + 4).ok_or(DropReason::Truncated)?;
    let flags0 = frame[l.l4_offset + 13];
    let count = payload.len().div_ceil(mss).max(1);
    let mut buf = Vec::with_capacity(l.headers_len() + mss);
    for i in 0..count {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        buf.clear();
        buf.extend_from_slice(headers);
        buf.extend_from_slice(chunk);
        let tcp_seg_len = l.tcp_len + chunk.len();
        if l.ipv6 {
            buf[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&(tcp_seg_len as u16).to_be_bytes());
        } else {
            let total = (l.l3_len + tcp_seg_len) as u16;
            buf[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
            buf[ETH_HLEN + 4..ETH_HLEN + 6]
                .copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            packet::set_ipv4_checksum(&mut buf[ETH_HLEN..ETH_HLEN + l.l3_len]);
        }
        let t = l.l4_offset;
        let seq = seq0.wrapping_add((i * mss) as u32);
        buf[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 != count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            flags &= !TCP_CWR;
        }
        buf[t + 13] = flags;
        buf[t + 16] = 0;
        buf[t + 17] = 0;
        let pseudo = if l.ipv6 {
            let ip = packet::ipv6(&buf)?;
            packet::pseudo_v6(ip.src, ip.dst, PROTO_TCP, tcp_seg_len)
        } else {
            let ip = packet::ipv4(&buf)?;
            packet::pseudo_v4(ip.src, ip.dst, PROTO_TCP, tcp_seg_len)
        };
        let c = packet::fold(packet::sum16(&buf[t..], pseudo));
        buf[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        out(&buf);
    }
    Ok(())
}
