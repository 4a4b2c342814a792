//! ARP (RFC 826) for Ethernet/IPv4: parsing requests and building replies and requests. The switch
//! answers for the addresses it knows and never floods.
use crate::addr::MacAddr;
use crate::packet::{be16, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_HLEN};
use crate::switch::DropReason;
use std::net::Ipv4Addr;

pub const OP_REQUEST: u16 = 1;
pub const OP_REPLY: u16 = 2;
/// Ethernet header + the 28-byte Ethernet/IPv4 ARP body (frames are padded to 60 bytes on the wire, but a
/// virtio driver may send them short).
pub const FRAME_LEN: usize = ETH_HLEN + 28;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    /// A gratuitous ARP announces the sender's own address (sender IP == target IP).
    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip
    }
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parses the ARP body of an Ethernet frame (ethertype already known to be ARP).
pub fn parse(frame: &[u8]) -> Result<Arp, DropReason> {
    let b = frame
        .get(ETH_HLEN..FRAME_LEN)
        .ok_or(DropReason::Truncated)?;
    let htype = be16(b, 0).ok_or(DropReason::Truncated)?;
    let ptype = be16(b, 2).ok_or(DropReason::Truncated)?;
    if htype != 1 || ptype != ETHERTYPE_IPV4 || b[4] != 6 || b[5] != 4 {
        return Err(DropReason::Malformed);
    }
    let op = be16(b, 6).ok_or(DropReason::Truncated)?;
    if op != OP_REQUEST && op != OP_REPLY {
        return Err(DropReason::Malformed);
    }
    Ok(Arp {
        op,
        sender_mac: MacAddr::from_slice(&b[8..14]).ok_or(DropReason::Truncated)?,
        sender_ip: ip_at(b, 14),
        target_mac: MacAddr::from_slice(&b[18..24]).ok_or(DropReason::Truncated)?,
        target_ip: ip_at(b, 24),
    })
}

/// Builds an ARP frame (padded to the 60-byte Ethernet minimum).
pub fn build(eth_dst: MacAddr, arp: &Arp) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&eth_dst.0);
    f.extend_from_slice(&arp.sender_mac.0);
    f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&arp.op.to_be_bytes());
    f.extend_from_slice(&arp.sender_mac.0);
    f.extend_from_slice(&arp.sender_ip.octets());
    f.extend_from_slice(&arp.target_mac.0);
    f.extend_from_slice(&arp.target_ip.octets());
    f.resize(60, 0);
    f
}

/// The reply to `request`: `mac` owns the asked-for address.
pub fn reply(request: &Arp, mac: MacAddr) -> Vec<u8> {
    build(
        request.sender_mac,
        &Arp {
            op: OP_REPLY,
            sender_mac: mac,
            sender_ip: request.target_ip,
            target_mac: request.sender_mac,
            target_ip: request.sender_ip,
        },
    )
}

/// A broadcast request from `sender` asking who has `target`.
pub fn request(sender_mac: MacAddr, sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    build(
        MacAddr::BROADCAST,
        &Arp {
            op: OP_REQUEST,
            sender_mac,
            sender_ip,
            target_mac: MacAddr::ZERO,
            target_ip: target,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_reply_round_trip() {
        let me = MacAddr([2, 0, 0, 0, 0, 1]);
        let req = request(me, Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(req.len(), 60);
        let parsed = parse(&req).unwrap();
        assert_eq!(parsed.op, OP_REQUEST);
        assert_eq!(parsed.target_ip, Ipv4Addr::new(10, 0, 1, 1));
        let gw = MacAddr([2, 0xca, 0x5d, 0, 0, 1]);
        let rep = parse(&reply(&parsed, gw)).unwrap();
        assert_eq!(rep.op, OP_REPLY);
        assert_eq!(rep.sender_mac, gw);
        assert_eq!(rep.sender_ip, Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(rep.target_mac, me);
        assert_eq!(&reply(&parsed, gw)[..6], &me.0);
    }

    #[test]
    fn bad_arp_is_refused() {
        let req = request(
            MacAddr([2, 0, 0, 0, 0, 1]),
            Ipv4Addr::new(10, 0, 1, 10),
            Ipv4Addr::new(10, 0, 1, 1),
        );
        assert_eq!(parse(&req[..41]), Err(DropReason::Truncated));
        let mut bad = req.clone();
        bad[ETH_HLEN + 4] = 8;
        assert_eq!(parse(&bad), Err(DropReason::Malformed));
        let mut op = req.clone();
        op[ETH_HLEN + 7] = 3;
        assert_eq!(parse(&op), Err(DropReason::Malformed));
    }
}
