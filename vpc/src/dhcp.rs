//! A DHCP server (RFC 2131, options RFC 2132) for one ENI at a time: every ENI has exactly one address, so
//! the server is stateless — DISCOVER gets an OFFER of the ENI's address, REQUEST for it an ACK, REQUEST for
//! another address a NAK. Replies carry subnet mask (1), router (3), DNS (6, if configured), MTU (26),
//! broadcast address (28), lease time (51), server id (54), T1 (58) and T2 (59); busybox `udhcpc` accepts them.
use crate::addr::MacAddr;
use crate::packet::{self, be16, ETHERTYPE_IPV4, PROTO_UDP};
use crate::switch::DropReason;
use std::net::Ipv4Addr;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

pub const DISCOVER: u8 = 1;
pub const OFFER: u8 = 2;
pub const REQUEST: u8 = 3;
pub const DECLINE: u8 = 4;
pub const ACK: u8 = 5;
pub const NAK: u8 = 6;
pub const RELEASE: u8 = 7;
pub const INFORM: u8 = 8;

const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// op .. file, before the magic cookie.
const BOOTP_FIXED: usize = 236;
const FLAG_BROADCAST: u16 = 0x8000;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_MTU: u8 = 26;
const OPT_BROADCAST: u8 = 28;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_RENEWAL: u8 = 58;
const OPT_REBINDING: u8 = 59;
const OPT_END: u8 = 255;

/// What the server hands one ENI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub client_mac: MacAddr,
    pub yiaddr: Ipv4Addr,
    /// Server identifier and source address of replies: the subnet's gateway.
    pub server: Ipv4Addr,
    pub server_mac: MacAddr,
    pub netmask: Ipv4Addr,
    pub router: Ipv4Addr,
    pub dns: Option<Ipv4Addr>,
    pub lease_secs: u32,
    pub mtu: u16,
}

/// The parts of a client message the server reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub chaddr: MacAddr,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
}

fn ip4(b: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

/// Parses a BOOTREQUEST (the UDP payload).
pub fn parse(p: &[u8]) -> Result<Message, DropReason> {
    if p.len() < BOOTP_FIXED + 4 {
        return Err(DropReason::Truncated);
    }
    if p[0] != 1 || p[1] != 1 || p[2] != 6 || p[BOOTP_FIXED..BOOTP_FIXED + 4] != MAGIC {
        return Err(DropReason::Malformed);
    }
    let mut m = Message {
        kind: 0,
        xid: packet::be32(p, 4).ok_or(DropReason::Truncated)?,
        flags: be16(p, 10).ok_or(DropReason::Truncated)?,
        ciaddr: ip4(&p[12..]).ok_or(DropReason::Truncated)?,
        chaddr: MacAddr::from_slice(&p[28..]).ok_or(DropReason::Truncated)?,
        requested_ip: None,
        server_id: None,
    };
    let mut opts = &p[BOOTP_FIXED + 4..];
    loop {
        match opts {
            [] | [OPT_END, ..] => break,
            [OPT_PAD, rest @ ..] => opts = rest,
            [code, len, rest @ ..] => {
                let len = usize::from(*len);
                let value = rest.get(..len).ok_or(DropReason::Malformed)?;
                match *code {
                    OPT_MESSAGE_TYPE if len == 1 => m.kind = value[0],
                    OPT_REQUESTED_IP if len == 4 => m.requested_ip = ip4(value),
                    OPT_SERVER_ID if len == 4 => m.server_id = ip4(value),
                    _ => {}
                }
                opts = &rest[len..];
            }
            [_] => return Err(DropReason::Malformed),
        }
    }
    if m.kind == 0 {
        return Err(DropReason::Malformed);
    }
    Ok(m)
}

/// Answers a client message (the UDP payload) with a whole Ethernet frame; returns the reply's type
/// (OFFER, ACK or NAK).
pub fn respond(lease: &Lease, payload: &[u8]) -> Result<(u8, Vec<u8>), DropReason> {
    let m = parse(payload)?;
    if m.chaddr != lease.client_mac {
        return Err(DropReason::DhcpIgnored);
    }
    let kind = match m.kind {
        DISCOVER => OFFER,
        REQUEST => {
            if m.server_id.is_some_and(|s| s != lease.server) {
                // The client chose another server's offer.
                return Err(DropReason::DhcpIgnored);
            }
            let wanted = m
                .requested_ip
                .or((!m.ciaddr.is_unspecified()).then_some(m.ciaddr));
            if wanted == Some(lease.yiaddr) {
                ACK
            } else {
                NAK
            }
        }
        _ => return Err(DropReason::DhcpIgnored),
    };
    Ok((kind, build_reply(lease, &m, kind)))
}

fn build_reply(lease: &Lease, m: &Message, kind: u8) -> Vec<u8> {
    let mut bootp = vec![0u8; BOOTP_FIXED];
    bootp[0] = 2; // BOOTREPLY
    bootp[1] = 1;
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&m.xid.to_be_bytes());
    bootp[10..12].copy_from_slice(&m.flags.to_be_bytes());
    if kind != NAK {
        if kind == ACK {
            bootp[12..16].copy_from_slice(&m.ciaddr.octets());
        }
        bootp[16..20].copy_from_slice(&lease.yiaddr.octets());
    }
    bootp[28..34].copy_from_slice(&m.chaddr.0);
    bootp.extend_from_slice(&MAGIC);
    let mut opt = |code: u8, value: &[u8]| {
        bootp.push(code);
        bootp.push(value.len() as u8);
        bootp.extend_from_slice(value);
    };
    opt(OPT_MESSAGE_TYPE, &[kind]);
    opt(OPT_SERVER_ID, &lease.server.octets());
    if kind != NAK {
        opt(OPT_LEASE_TIME, &lease.lease_secs.to_be_bytes());
        opt(OPT_RENEWAL, &(lease.lease_secs / 2).to_be_bytes());
        opt(OPT_REBINDING, &(lease.lease_secs / 8 * 7).to_be_bytes());
        opt(OPT_SUBNET_MASK, &lease.netmask.octets());
        opt(OPT_ROUTER, &lease.router.octets());
        let bcast = u32::from(lease.yiaddr) | !u32::from(lease.netmask);
        opt(OPT_BROADCAST, &bcast.to_be_bytes());
        if let Some(dns) = lease.dns {
            opt(OPT_DNS, &dns.octets());
        }
        opt(OPT_MTU, &lease.mtu.to_be_bytes());
    }
    bootp.push(OPT_END);
    // BOOTP's minimum message (RFC 1542 §2.1: some clients drop shorter ones).
    if bootp.len() < 300 {
        bootp.resize(300, 0);
    }

    // RFC 2131 §4.1: NAKs and replies to clients that asked (broadcast flag) or have no address yet go to
    // the broadcast address unless the client can take unicast; a renewing client (ciaddr set) gets unicast.
    let broadcast = kind == NAK || (m.ciaddr.is_unspecified() && m.flags & FLAG_BROADCAST != 0);
    let (dst_mac, dst_ip) = if broadcast {
        (MacAddr::BROADCAST, Ipv4Addr::BROADCAST)
    } else if !m.ciaddr.is_unspecified() {
        (m.chaddr, m.ciaddr)
    } else {
        (m.chaddr, lease.yiaddr)
    };
    udp_frame(
        lease.server_mac,
        dst_mac,
        lease.server,
        dst_ip,
        SERVER_PORT,
        CLIENT_PORT,
        &bootp,
    )
}

/// An Ethernet/IPv4/UDP frame with valid checksums.
pub fn udp_frame(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst_mac.0);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    packet::set_ipv4_checksum(&mut f[14..34]);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let mut c = packet::fold(packet::sum16(
        &f[34..],
        packet::pseudo_v4(src, dst, PROTO_UDP, udp_len),
    ));
    if c == 0 {
        c = 0xffff;
    }
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

/// Reads the options of a reply (for tests and tools): (code, value) pairs up to END.
pub fn reply_options(payload: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut opts = payload.get(BOOTP_FIXED + 4..).unwrap_or(&[]);
    while let [code, len, rest @ ..] = opts {
        if *code == OPT_END {
            break;
        }
        let Some(v) = rest.get(..usize::from(*len)) else {
            break;
        };
        out.push((*code, v.to_vec()));
        opts = &rest[usize::from(*len)..];
    }
    out
}

/// Builds a client message (for tests and the fuzz corpus): `kind` from `mac`, with optional requested IP.
pub fn client_message(
    kind: u8,
    mac: MacAddr,
    xid: u32,
    flags: u16,
    ciaddr: Ipv4Addr,
    requested: Option<Ipv4Addr>,
) -> Vec<u8> {
    let mut p = vec![0u8; BOOTP_FIXED];
    p[0] = 1;
    p[1] = 1;
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10..12].copy_from_slice(&flags.to_be_bytes());
    p[12..16].copy_from_slice(&ciaddr.octets());
    p[28..34].copy_from_slice(&mac.0);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, kind]);
    if let Some(r) = requested {
        p.extend_from_slice(&[OPT_REQUESTED_IP, 4]);
        p.extend_from_slice(&r.octets());
    }
    p.push(OPT_END);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            client_mac: MacAddr([2, 0, 10, 0, 1, 10]),
            yiaddr: Ipv4Addr::new(10, 0, 1, 10),
            server: Ipv4Addr::new(10, 0, 1, 1),
            server_mac: MacAddr([2, 0xca, 0x5d, 0, 0, 1]),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: Ipv4Addr::new(10, 0, 1, 1),
            dns: Some(Ipv4Addr::new(10, 0, 0, 2)),
            lease_secs: 3600,
            mtu: 1500,
        }
    }

    fn payload_of(frame: &[u8]) -> &[u8] {
        &frame[42..]
    }

    #[test]
    fn discover_gets_an_offer_with_the_options() {
        let l = lease();
        let d = client_message(
            DISCOVER,
            l.client_mac,
            0x1234,
            FLAG_BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            None,
        );
        let (kind, frame) = respond(&l, &d).unwrap();
        assert_eq!(kind, OFFER);
        assert_eq!(&frame[..6], &[0xff; 6], "broadcast flag honoured");
        let p = payload_of(&frame);
        assert_eq!(p[0], 2);
        assert_eq!(&p[4..8], &0x1234u32.to_be_bytes());
        assert_eq!(&p[16..20], &[10, 0, 1, 10]);
        let opts = reply_options(p);
        let get = |c: u8| opts.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone());
        assert_eq!(get(OPT_MESSAGE_TYPE), Some(vec![OFFER]));
        assert_eq!(get(OPT_SUBNET_MASK), Some(vec![255, 255, 255, 0]));
        assert_eq!(get(OPT_ROUTER), Some(vec![10, 0, 1, 1]));
        assert_eq!(get(OPT_DNS), Some(vec![10, 0, 0, 2]));
        assert_eq!(get(OPT_LEASE_TIME), Some(3600u32.to_be_bytes().to_vec()));
        assert_eq!(get(OPT_SERVER_ID), Some(vec![10, 0, 1, 1]));
        assert_eq!(get(OPT_MTU), Some(1500u16.to_be_bytes().to_vec()));
        // Valid UDP checksum over the pseudo header.
        let ip = packet::ipv4(&frame).unwrap();
        let udp = &frame[34..ip.end()];
        assert_eq!(
            packet::fold(packet::sum16(
                udp,
                packet::pseudo_v4(ip.src, ip.dst, PROTO_UDP, udp.len())
            )),
            0
        );
        assert_eq!(packet::fold(packet::sum16(&frame[14..34], 0)), 0);
    }

    #[test]
    fn unicast_without_broadcast_flag() {
        let l = lease();
        let d = client_message(DISCOVER, l.client_mac, 1, 0, Ipv4Addr::UNSPECIFIED, None);
        let (_, frame) = respond(&l, &d).unwrap();
        assert_eq!(&frame[..6], &l.client_mac.0);
        assert_eq!(&frame[30..34], &[10, 0, 1, 10]);
    }

    #[test]
    fn request_for_our_address_is_acked_and_another_is_naked() {
        let l = lease();
        let r = client_message(
            REQUEST,
            l.client_mac,
            2,
            0,
            Ipv4Addr::UNSPECIFIED,
            Some(l.yiaddr),
        );
        assert_eq!(respond(&l, &r).unwrap().0, ACK);
        let wrong = client_message(
            REQUEST,
            l.client_mac,
            3,
            0,
            Ipv4Addr::UNSPECIFIED,
            Some(Ipv4Addr::new(10, 0, 1, 99)),
        );
        let (kind, frame) = respond(&l, &wrong).unwrap();
        assert_eq!(kind, NAK);
        assert_eq!(&frame[..6], &[0xff; 6], "NAKs are broadcast");
        assert_eq!(&payload_of(&frame)[16..20], &[0, 0, 0, 0]);
        let renew = client_message(REQUEST, l.client_mac, 4, 0, l.yiaddr, None);
        let (kind, frame) = respond(&l, &renew).unwrap();
        assert_eq!(kind, ACK);
        assert_eq!(
            &frame[30..34],
            &[10, 0, 1, 10],
            "renewal answered by unicast to ciaddr"
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        let l = lease();
        let d = client_message(DISCOVER, l.client_mac, 1, 0, Ipv4Addr::UNSPECIFIED, None);
        assert_eq!(respond(&l, &d[..200]), Err(DropReason::Truncated));
        let mut bad_magic = d.clone();
        bad_magic[BOOTP_FIXED] = 0;
        assert_eq!(respond(&l, &bad_magic), Err(DropReason::Malformed));
        let mut bad_len = d.clone();
        bad_len.truncate(BOOTP_FIXED + 4);
        bad_len.extend_from_slice(&[OPT_MESSAGE_TYPE, 9, 1]);
        assert_eq!(respond(&l, &bad_len), Err(DropReason::Malformed));
        let other = client_message(
            DISCOVER,
            MacAddr([2, 0, 0, 0, 0, 9]),
            1,
            0,
            Ipv4Addr::UNSPECIFIED,
            None,
        );
        assert_eq!(respond(&l, &other), Err(DropReason::DhcpIgnored));
        let release = client_message(RELEASE, l.client_mac, 1, 0, l.yiaddr, None);
        assert_eq!(respond(&l, &release), Err(DropReason::DhcpIgnored));
    }
}
