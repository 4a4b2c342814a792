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

/// The header to deliver a peer's frame with when its TCP or UDP checksum is still partial. Linux leaves
/// CHECKSUM_PARTIAL packets uncompleted when a vxlan device sends them over loopback or a veth: the field
/// then holds the folded pseudo-header sum. Marking such a frame NEEDS_CSUM lets a guest with GUEST_CSUM take
/// it as is, and [`complete_checksum`] finish it for one without. Safe for a frame whose checksum happens to
/// be complete and equal to that sum: completing it yields the same value (the sum over the segment is then
/// the pseudo-header sum's complement). `None`: deliver with a plain header.
pub fn partial_checksum_header(frame: &[u8]) -> Option<VnetHeader> {
    if packet::eth(frame).ok()?.ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = packet::ipv4(frame).ok()?;
    if ip.is_fragment() {
        return None;
    }
    let field = match ip.proto {
        PROTO_TCP => 16,
        packet::PROTO_UDP => 6,
        _ => return None,
    };
    let l4 = ip.l4_offset();
    let len = ip.end().checked_sub(l4)?;
    if len < field + 2 {
        return None;
    }
    let stored = packet::be16(frame, l4 + field)?;
    if stored == 0 {
        return None; // UDP without a checksum
    }
    let partial = !packet::fold(packet::pseudo_v4(ip.src, ip.dst, ip.proto, len));
    (stored == partial).then_some(VnetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: l4 as u16,
        csum_offset: field as u16,
        ..VnetHeader::default()
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::MacAddr;
    use crate::frames;
    use crate::packet::{TCP_ACK, TCP_CWR, TCP_FIN, TCP_PSH};
    use crate::vnet::{GSO_UDP, GSO_UDP_L4};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb]);
    const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
    const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);

    /// An Internet checksum written independently of `packet::sum16`/`fold`: 16-bit words added with
    /// end-around carry one at a time (RFC 1071 §4.1's loop). Returns the complemented sum.
    fn reference_checksum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let mut sum: u16 = 0;
        for pair in bytes.chunks(2) {
            let word = (u16::from(pair[0]) << 8) | u16::from(*pair.get(1).unwrap_or(&0));
            let (s, carry) = sum.overflowing_add(word);
            sum = s + u16::from(carry);
        }
        !sum
    }

    /// Whether the TCP checksum (and, for IPv4, the header checksum) of a frame verify, independently.
    fn checksums_ok(frame: &[u8]) -> bool {
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        if ethertype == 0x0800 {
            let ihl = usize::from(frame[14] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
            let ip_ok = reference_checksum(&[&frame[14..14 + ihl]]) == 0;
            let tcp = &frame[14 + ihl..14 + total];
            let len = (tcp.len() as u16).to_be_bytes();
            let pseudo = [&frame[26..34], &[0, 6], &len[..]].concat();
            ip_ok && reference_checksum(&[&pseudo, tcp]) == 0
        } else {
            let plen = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
            let tcp = &frame[54..54 + plen];
            let len = (tcp.len() as u32).to_be_bytes();
            let pseudo = [&frame[22..54], &len[..], &[0, 0, 0, 6]].concat();
            reference_checksum(&[&pseudo, tcp]) == 0
        }
    }

    fn gso_header(kind: u8, gso_size: u16, l4: u16) -> VnetHeader {
        VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: kind,
            hdr_len: l4 + 20,
            gso_size,
            csum_start: l4,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Breaks the TCP checksum the way a guest leaves it under GSO (the field holds only a partial sum).
    fn as_guest_sends(mut f: Vec<u8>, l4: usize) -> Vec<u8> {
        f[l4 + 16] = 0x12;
        f[l4 + 17] = 0x34;
        f
    }

    fn collect(h: &VnetHeader, f: &[u8], mtu: u16) -> Result<Vec<Vec<u8>>, DropReason> {
        let mut segs = Vec::new();
        segment(h, f, mtu, &mut |s: &[u8]| segs.push(s.to_vec()))?;
        Ok(segs)
    }

    #[test]
    fn segments_tcp_v4_with_ids_seqs_flags_and_checksums() {
        let data = payload(5000);
        let f = frames::tcp_v4(
            B,
            A,
            IP_A,
            IP_B,
            40000,
            5201,
            TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR,
            &data,
        );
        let f = as_guest_sends(f, 34);
        let h = gso_header(GSO_TCPV4 | crate::vnet::GSO_ECN, 1448, 34);
        check_tx(&h, &f, 1500).unwrap();
        let segs = collect(&h, &f, 1500).unwrap();
        assert_eq!(segs.len(), 4);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(s.len() - 14 <= 1500);
            assert!(checksums_ok(s), "segment {i}");
            let ip = packet::ipv4(s).unwrap();
            assert_eq!(ip.id, 0x1234 + i as u16);
            assert_eq!(packet::be32(s, 38).unwrap(), 1000 + (i * 1448) as u32);
            let flags = s[47];
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR on the first only");
            assert_eq!(
                flags & (TCP_FIN | TCP_PSH) != 0,
                i == 3,
                "FIN/PSH on the last only"
            );
            assert!(flags & TCP_ACK != 0);
            joined.extend_from_slice(&s[54..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn segments_tcp_v6_and_respects_a_smaller_mtu() {
        let data = payload(3000);
        let (s6, d6) = (
            "fd00::1".parse::<Ipv6Addr>().unwrap(),
            "fd00::2".parse::<Ipv6Addr>().unwrap(),
        );
        let f = as_guest_sends(frames::tcp_v6(B, A, s6, d6, 1, 2, TCP_ACK, &data), 54);
        let h = gso_header(GSO_TCPV6, 1440, 54);
        check_tx(&h, &f, 1500).unwrap();
        // A VXLAN path with a 1280-byte MTU: segments shrink to fit.
        let segs = collect(&h, &f, 1280).unwrap();
        assert!(segs.iter().all(|s| s.len() - 14 <= 1280 && checksums_ok(s)));
        let joined: Vec<u8> = segs.iter().flat_map(|s| s[74..].to_vec()).collect();
        assert_eq!(joined, data);
        assert_eq!(segs.len(), 3000usize.div_ceil(1280 - 60));
    }

    #[test]
    fn completes_a_partial_checksum() {
        let f = frames::udp_v4(B, A, IP_A, IP_B, 5000, 53, b"hello, checksum");
        let good = f.clone();
        // The driver leaves the pseudo-header sum (uncomplemented) in the field.
        let mut partial = f.clone();
        let len = partial.len() - 34;
        let pseudo = !packet::fold(packet::pseudo_v4(IP_A, IP_B, packet::PROTO_UDP, len));
        partial[40..42].copy_from_slice(&pseudo.to_be_bytes());
        let h = VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        complete_checksum(&h, &mut partial).unwrap();
        assert_eq!(partial, good);
        let mut short = partial[..38].to_vec();
        assert_eq!(
            complete_checksum(&h, &mut short),
            Err(DropReason::BadVnetHeader)
        );
    }

    #[test]
    fn bad_vnet_headers_are_refused() {
        let f = frames::tcp_v4(B, A, IP_A, IP_B, 1, 2, TCP_ACK, &payload(3000));
        let good = gso_header(GSO_TCPV4, 1448, 34);
        assert_eq!(check_tx(&good, &f, 1500), Ok(()));
        let cases: &[(VnetHeader, DropReason, &str)] = &[
            (
                VnetHeader { flags: 2, ..good },
                DropReason::BadVnetHeader,
                "DATA_VALID from a driver",
            ),
            (
                VnetHeader {
                    flags: 0x81,
                    ..good
                },
                DropReason::BadVnetHeader,
                "unknown flag",
            ),
            (
                VnetHeader {
                    gso_type: GSO_UDP,
                    ..good
                },
                DropReason::BadVnetHeader,
                "UFO not offered",
            ),
            (
                VnetHeader {
                    gso_type: GSO_UDP_L4,
                    ..good
                },
                DropReason::BadVnetHeader,
                "USO not offered",
            ),
            (
                VnetHeader {
                    gso_type: 9,
                    ..good
                },
                DropReason::BadVnetHeader,
                "unknown GSO type",
            ),
            (
                VnetHeader {
                    gso_type: GSO_TCPV6,
                    ..good
                },
                DropReason::GsoMismatch,
                "TCPv6 GSO on IPv4",
            ),
            (
                VnetHeader {
                    gso_size: 0,
                    ..good
                },
                DropReason::GsoMismatch,
                "gso_size 0",
            ),
            (
                VnetHeader {
                    gso_size: 1481,
                    ..good
                },
                DropReason::GsoMismatch,
                "gso_size above the MTU",
            ),
            (
                VnetHeader { flags: 0, ..good },
                DropReason::GsoMismatch,
                "GSO without NEEDS_CSUM",
            ),
            (
                VnetHeader {
                    csum_start: 30,
                    ..good
                },
                DropReason::GsoMismatch,
                "csum_start not at TCP",
            ),
            (
                VnetHeader {
                    csum_offset: 6,
                    ..good
                },
                DropReason::GsoMismatch,
                "csum_offset not TCP's",
            ),
            (
                VnetHeader {
                    csum_start: 4000,
                    ..good
                },
                DropReason::BadVnetHeader,
                "csum_start beyond the frame",
            ),
            (
                VnetHeader {
                    csum_start: 10,
                    ..good
                },
                DropReason::BadVnetHeader,
                "csum_start inside the Ethernet header",
            ),
            (
                VnetHeader {
                    csum_offset: 4000,
                    ..good
                },
                DropReason::BadVnetHeader,
                "csum_offset beyond the frame",
            ),
            (
                VnetHeader {
                    hdr_len: 5000,
                    ..good
                },
                DropReason::GsoMismatch,
                "hdr_len beyond the frame",
            ),
            (
                VnetHeader {
                    gso_type: crate::vnet::GSO_ECN,
                    flags: 0,
                    ..good
                },
                DropReason::BadVnetHeader,
                "ECN without GSO",
            ),
        ];
        for (h, want, what) in cases {
            assert_eq!(check_tx(h, &f, 1500), Err(*want), "{what}");
        }
        // GSO type vs protocol: a UDP packet claiming TCP GSO.
        let udp = frames::udp_v4(B, A, IP_A, IP_B, 1, 2, &payload(3000));
        let h = VnetHeader {
            csum_offset: 16,
            ..good
        };
        assert_eq!(check_tx(&h, &udp, 1500), Err(DropReason::GsoMismatch));
        // Oversized: a plain frame over the MTU, a GSO frame over 64 KiB.
        assert_eq!(
            check_tx(&VnetHeader::default(), &f, 1500),
            Err(DropReason::Oversized)
        );
        let huge = vec![0u8; MAX_GSO_FRAME + 1];
        assert_eq!(check_tx(&good, &huge, 1500), Err(DropReason::Oversized));
        // Truncated: shorter than an Ethernet header; a GSO frame cut inside the IP header.
        assert_eq!(
            check_tx(&VnetHeader::default(), &f[..13], 1500),
            Err(DropReason::Truncated)
        );
        assert_eq!(
            check_tx(
                &VnetHeader {
                    csum_start: 14,
                    csum_offset: 0,
                    ..good
                },
                &f[..30],
                1500
            ),
            Err(DropReason::Truncated)
        );
    }

    #[test]
    fn a_partial_checksum_from_a_peer_is_recognised_and_completed() {
        let good = frames::tcp_v4(B, A, IP_A, IP_B, 1, 2, TCP_ACK, &payload(700));
        assert_eq!(
            partial_checksum_header(&good),
            None,
            "a complete checksum is left alone"
        );
        let mut partial = good.clone();
        let p = !packet::fold(packet::pseudo_v4(IP_A, IP_B, PROTO_TCP, good.len() - 34));
        partial[50..52].copy_from_slice(&p.to_be_bytes());
        let h = partial_checksum_header(&partial).expect("recognised as partial");
        assert_eq!(
            (h.csum_start, h.csum_offset, h.flags),
            (34, 16, F_NEEDS_CSUM)
        );
        complete_checksum(&h, &mut partial).unwrap();
        assert!(checksums_ok(&partial));
        assert_eq!(partial, good);
    }

    proptest! {
        /// A complete checksum that happens to equal the pseudo-header sum is recognised as partial;
        /// completing it must leave the frame unchanged (so the recognition is safe whatever the payload).
        #[test]
        fn completing_a_checksum_that_only_looks_partial_changes_nothing(data in proptest::collection::vec(any::<u8>(), 2..300)) {
            let mut f = frames::tcp_v4(B, A, IP_A, IP_B, 1, 2, TCP_ACK, &data);
            let len = f.len() - 34;
            let p = !packet::fold(packet::pseudo_v4(IP_A, IP_B, PROTO_TCP, len));
            // Store P as the checksum and choose the first payload word so the checksum is valid.
            f[50..52].copy_from_slice(&p.to_be_bytes());
            f[54..56].copy_from_slice(&[0, 0]);
            let w = packet::fold(packet::sum16(&f[34..], packet::pseudo_v4(IP_A, IP_B, PROTO_TCP, len)));
            f[54..56].copy_from_slice(&w.to_be_bytes());
            prop_assert!(checksums_ok(&f));
            let h = partial_checksum_header(&f).expect("looks partial");
            let before = f.clone();
            complete_checksum(&h, &mut f).unwrap();
            prop_assert!(checksums_ok(&f));
            prop_assert_eq!(f, before);
        }
    }

    fn arb_gso() -> impl Strategy<Value = (bool, usize, u16, u16, u8)> {
        (
            any::<bool>(),
            0usize..20000,
            MIN_GSO_SIZE..1500u16,
            576u16..9001,
            any::<u8>(),
        )
    }

    proptest! {
        #[test]
        fn segment_fits_the_mtu_preserves_payload_and_checksums((v6, len, gso_size, mtu, flags) in arb_gso()) {
            let data = payload(len);
            let (f, l4, kind) = if v6 {
                let f = frames::tcp_v6(B, A, "fd00::1".parse().unwrap(), "fd00::2".parse().unwrap(), 1, 2, flags, &data);
                (f, 54usize, GSO_TCPV6)
            } else {
                (frames::tcp_v4(B, A, IP_A, IP_B, 1, 2, flags, &data), 34usize, GSO_TCPV4)
            };
            prop_assume!(f.len() <= MAX_GSO_FRAME);
            let h = gso_header(kind, gso_size, l4 as u16);
            let segs = collect(&h, &as_guest_sends(f, l4), mtu).unwrap();
            let mut joined = Vec::new();
            for s in &segs {
                prop_assert!(s.len() - 14 <= usize::from(mtu));
                prop_assert!(checksums_ok(s));
                joined.extend_from_slice(&s[l4 + 20..]);
            }
            prop_assert_eq!(joined, data);
        }

        #[test]
        fn check_tx_and_segment_never_panic(h in any::<[u8; 12]>(), f in proptest::collection::vec(any::<u8>(), 0..3000), mtu in 0u16..10000) {
            let h = VnetHeader::parse(&h).unwrap();
            let _ = check_tx(&h, &f, mtu);
            let _ = segment(&h, &f, mtu, &mut |_| {});
            let mut g = f.clone();
            let _ = complete_checksum(&h, &mut g);
        }
    }
}
