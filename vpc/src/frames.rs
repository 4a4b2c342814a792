//! Builders of well-formed Ethernet frames (IPv4/IPv6 with TCP, UDP or ICMP, checksums complete), for tests,
//! fuzz seeds and the card's own tests. Not used on the forwarding path.
use crate::addr::MacAddr;
use crate::packet::{self, ETHERTYPE_IPV4, ETHERTYPE_IPV6, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use std::net::{Ipv4Addr, Ipv6Addr};

fn eth(dst: MacAddr, src: MacAddr, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An IPv4 packet with `l4` (whose checksum field, if any, is filled here) behind an Ethernet header.
pub fn ipv4(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = eth(dst_mac, src_mac, ETHERTYPE_IPV4);
    let total = (20 + l4.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    packet::set_ipv4_checksum(&mut f[14..34]);
    f.extend_from_slice(l4);
    let sum_at = match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_ICMP => Some(2),
        _ => None,
    };
    if let Some(at) = sum_at {
        let seg = &mut f[34..];
        if seg.len() >= at + 2 {
            seg[at] = 0;
            seg[at + 1] = 0;
            let pseudo = if proto == PROTO_ICMP {
                0
            } else {
                packet::pseudo_v4(src, dst, proto, seg.len())
            };
            let c = packet::fold(packet::sum16(seg, pseudo));
            seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    f
}

/// A TCP header (20 bytes, no options) followed by `payload`.
pub fn tcp_segment(sport: u16, dport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[0x50, flags]);
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

#[allow(clippy::too_many_arguments)]
pub fn tcp_v4(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    ipv4(
        dst_mac,
        src_mac,
        src,
        dst,
        PROTO_TCP,
        &tcp_segment(sport, dport, 1000, flags, payload),
    )
}

pub fn udp_v4(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    ipv4(dst_mac, src_mac, src, dst, PROTO_UDP, &u)
}

/// An ICMP echo request (`kind` 8) or reply (0) with identifier `ident`.
pub fn icmp_echo(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    ident: u16,
) -> Vec<u8> {
    let mut i = vec![kind, 0, 0, 0];
    i.extend_from_slice(&ident.to_be_bytes());
    i.extend_from_slice(&1u16.to_be_bytes());
    i.extend_from_slice(b"cardsim ping");
    ipv4(dst_mac, src_mac, src, dst, PROTO_ICMP, &i)
}

/// A TCP/IPv6 frame (checksum complete).
#[allow(clippy::too_many_arguments)]
pub fn tcp_v6(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(dst_mac, src_mac, ETHERTYPE_IPV6);
    let mut seg = tcp_segment(sport, dport, 1000, flags, payload);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    f.extend_from_slice(&[PROTO_TCP, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let c = packet::fold(packet::sum16(
        &seg,
        packet::pseudo_v6(src, dst, PROTO_TCP, seg.len()),
    ));
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&seg);
    f
}
