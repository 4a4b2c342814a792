//! Tests of the switch: ARP, DHCP, routing, security groups through the switch, VXLAN, and every kind of
//! bad input (dropped with its reason and counted, never delivered).
use super::*;
use crate::frames;
use crate::packet::{TCP_ACK, TCP_SYN};
use crate::vnet::{F_NEEDS_CSUM, GSO_TCPV4};
use proptest::prelude::*;
use std::time::Duration;

const CONFIG: &str = crate::fuzzing::CONFIG;

const A: PortId = 0;
const B: PortId = 1;
const C: PortId = 2;
const MAC_A: MacAddr = MacAddr([2, 0, 10, 0, 1, 10]);
const MAC_B: MacAddr = MacAddr([2, 0, 10, 0, 1, 11]);
const MAC_C: MacAddr = MacAddr([2, 0, 10, 0, 3, 12]);
const ROUTER: MacAddr = crate::config::DEFAULT_ROUTER_MAC;
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);
const IP_C: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 12);
const REMOTE_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 5);
const REMOTE_MAC: MacAddr = MacAddr([0x4e, 0x11, 0x22, 0x33, 0x44, 0x55]);

fn switch() -> Switch {
    Switch::new(&VpcConfig::parse(CONFIG).unwrap())
}

fn plain() -> VnetHeader {
    VnetHeader::plain()
}

fn vtep() -> SocketAddr {
    "127.0.0.1:4790".parse().unwrap()
}

/// A datagram as a remote vxlan device sends it (from an ephemeral source port).
fn from_remote(sw: &mut Switch, inner: &[u8], now: Instant) -> Verdict {
    let mut d = vxlan::header(100).to_vec();
    d.extend_from_slice(inner);
    sw.from_vxlan(&d, "127.0.0.1:53211".parse().unwrap(), now)
}

fn drops(sw: &Switch, port: PortId, r: DropReason) -> u64 {
    sw.port_counters(port).unwrap().drops(r)
}

fn expect_drop(sw: &mut Switch, port: PortId, h: &VnetHeader, f: &[u8], want: DropReason) {
    let before = drops(sw, port, want);
    let v = sw.from_port(port, h, f, Instant::now());
    assert_eq!(v, Verdict::Drop(want));
    assert_eq!(drops(sw, port, want), before + 1, "{want} counted");
}

// ---- ARP -------------------------------------------------------------------------------------------------------

#[test]
fn arp_for_gateway_peer_and_remote_is_answered() {
    let mut sw = switch();
    let now = Instant::now();
    let ask = |sw: &mut Switch, target: Ipv4Addr| {
        sw.from_port(A, &plain(), &arp::request(MAC_A, IP_A, target), now)
    };
    let answer = |v: Verdict| -> MacAddr {
        let Verdict::Reply {
            to: Egress::Port(A),
            frame,
        } = v
        else {
            panic!("{v:?}")
        };
        let a = arp::parse(&frame).unwrap();
        assert_eq!(a.op, arp::OP_REPLY);
        assert_eq!(a.target_mac, MAC_A);
        assert_eq!(&frame[..6], &MAC_A.0);
        a.sender_mac
    };
    assert_eq!(
        answer(ask(&mut sw, Ipv4Addr::new(10, 0, 1, 1))),
        ROUTER,
        "gateway"
    );
    assert_eq!(
        answer(ask(&mut sw, IP_B)),
        MAC_B,
        "peer in the subnet: its own MAC"
    );
    assert_eq!(
        answer(ask(&mut sw, IP_C)),
        ROUTER,
        "ENI of another subnet: via the router"
    );
    assert_eq!(
        answer(ask(&mut sw, REMOTE_HOST)),
        ROUTER,
        "remote host: via the router"
    );
    assert_eq!(sw.port_counters(A).unwrap().arp_replies, 4);
}

#[test]
fn unknown_and_gratuitous_arp_is_dropped_never_flooded() {
    let mut sw = switch();
    expect_drop(
        &mut sw,
        A,
        &plain(),
        &arp::request(MAC_A, IP_A, Ipv4Addr::new(10, 0, 1, 99)),
        DropReason::ArpIgnored,
    );
    expect_drop(
        &mut sw,
        A,
        &plain(),
        &arp::request(MAC_A, IP_A, IP_A),
        DropReason::ArpIgnored,
    );
    // An ARP probe (sender 0.0.0.0) for the ENI's own address must not be answered (it would signal a conflict).
    expect_drop(
        &mut sw,
        A,
        &plain(),
        &arp::request(MAC_A, Ipv4Addr::UNSPECIFIED, IP_A),
        DropReason::ArpIgnored,
    );
    let reply = arp::reply(
        &arp::parse(&arp::request(MAC_B, IP_B, IP_A)).unwrap(),
        MAC_A,
    );
    expect_drop(&mut sw, A, &plain(), &reply, DropReason::ArpIgnored);
}

#[test]
fn spoofed_arp_is_dropped() {
    let mut sw = switch();
    expect_drop(
        &mut sw,
        A,
        &plain(),
        &arp::request(MAC_A, IP_B, Ipv4Addr::new(10, 0, 1, 1)),
        DropReason::SpoofedIp,
    );
    let mut f = arp::request(MAC_A, IP_A, Ipv4Addr::new(10, 0, 1, 1));
    f[22..28].copy_from_slice(&MAC_B.0); // ARP sender MAC differs from the Ethernet source
    expect_drop(&mut sw, A, &plain(), &f, DropReason::SpoofedMac);
}

// ---- DHCP ------------------------------------------------------------------------------------------------------

fn dhcp_frame(mac: MacAddr, kind: u8, requested: Option<Ipv4Addr>) -> Vec<u8> {
    let msg = dhcp::client_message(kind, mac, 7, 0x8000, Ipv4Addr::UNSPECIFIED, requested);
    frames::udp_v4(
        MacAddr::BROADCAST,
        mac,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        68,
        67,
        &msg,
    )
}

#[test]
fn dhcp_offers_and_acks_the_enis_address_with_mtu_and_dns() {
    let mut sw = switch();
    let now = Instant::now();
    let v = sw.from_port(C, &plain(), &dhcp_frame(MAC_C, dhcp::DISCOVER, None), now);
    let Verdict::Reply {
        to: Egress::Port(C),
        frame,
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!(&frame[6..12], &ROUTER.0);
    assert_eq!(
        &frame[26..30],
        &[10, 0, 3, 1],
        "from subnet-b's default gateway"
    );
    let opts = dhcp::reply_options(&frame[42..]);
    assert!(opts.contains(&(53, vec![dhcp::OFFER])));
    assert!(opts.contains(&(1, vec![255, 255, 255, 0])));
    assert!(opts.contains(&(3, vec![10, 0, 3, 1])));
    assert!(opts.contains(&(6, vec![10, 0, 0, 2])));
    assert!(opts.contains(&(26, 1500u16.to_be_bytes().to_vec())));
    assert_eq!(&frame[58..62], &[10, 0, 3, 12], "yiaddr");
    let v = sw.from_port(
        C,
        &plain(),
        &dhcp_frame(MAC_C, dhcp::REQUEST, Some(IP_C)),
        now,
    );
    assert!(matches!(v, Verdict::Reply { .. }));
    let v = sw.from_port(
        C,
        &plain(),
        &dhcp_frame(MAC_C, dhcp::REQUEST, Some(IP_A)),
        now,
    );
    let Verdict::Reply { frame, .. } = v else {
        panic!()
    };
    assert!(dhcp::reply_options(&frame[42..]).contains(&(53, vec![dhcp::NAK])));
    let c = sw.port_counters(C).unwrap();
    assert_eq!((c.dhcp_offers, c.dhcp_acks, c.dhcp_naks), (1, 1, 1));
}

#[test]
fn dhcp_with_another_clients_hardware_address_is_ignored() {
    let mut sw = switch();
    let msg = dhcp::client_message(dhcp::DISCOVER, MAC_B, 7, 0, Ipv4Addr::UNSPECIFIED, None);
    let f = frames::udp_v4(
        MacAddr::BROADCAST,
        MAC_A,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        68,
        67,
        &msg,
    );
    expect_drop(&mut sw, A, &plain(), &f, DropReason::DhcpIgnored);
}

// ---- routing ---------------------------------------------------------------------------------------------------

#[test]
fn same_subnet_is_delivered_unchanged_and_return_traffic_passes() {
    let mut sw = switch();
    let now = Instant::now();
    let syn = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 40000, 5201, TCP_SYN, b"");
    let v = sw.from_port(A, &plain(), &syn, now);
    assert_eq!(
        v,
        Verdict::ToPort {
            port: B,
            header: plain(),
            frame_offset: 0,
            rewrite: None
        }
    );
    let synack = frames::tcp_v4(
        MAC_A,
        MAC_B,
        IP_B,
        IP_A,
        5201,
        40000,
        TCP_SYN | TCP_ACK,
        b"",
    );
    assert!(matches!(
        sw.from_port(B, &plain(), &synack, now),
        Verdict::ToPort { port: A, .. }
    ));
    assert_eq!(sw.port_counters(A).unwrap().forwarded, 1);
    assert_eq!(sw.port_counters(A).unwrap().delivered, 1);
}

#[test]
fn across_subnets_goes_through_the_router_mac_and_keeps_gso() {
    let mut sw = switch();
    let now = Instant::now();
    // C's group (sg-quiet) allows no inbound traffic: A→C is denied at C...
    let f = frames::tcp_v4(ROUTER, MAC_A, IP_A, IP_C, 40000, 443, TCP_SYN, b"");
    assert_eq!(
        sw.from_port(A, &plain(), &f, now),
        Verdict::Drop(DropReason::SecurityGroup)
    );
    assert_eq!(
        drops(&sw, C, DropReason::SecurityGroup),
        1,
        "counted where the rule denied it"
    );
    // ...and C's egress allows tcp 443 only, so C→A:5201 is denied on the way out even though A allows it in.
    let f = frames::tcp_v4(ROUTER, MAC_C, IP_C, IP_A, 40000, 5201, TCP_SYN, b"");
    assert_eq!(
        sw.from_port(C, &plain(), &f, now),
        Verdict::Drop(DropReason::SecurityGroup)
    );
    assert_eq!(
        drops(&sw, C, DropReason::SecurityGroup),
        2,
        "denied by C's egress"
    );
    // A GSO frame A→B via the router MAC: rewritten, the header passed on unchanged.
    let big = frames::tcp_v4(
        ROUTER,
        MAC_A,
        IP_A,
        IP_B,
        40001,
        5201,
        TCP_ACK,
        &[7u8; 4000],
    );
    let h = VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let v = sw.from_port(A, &h, &big, now);
    assert_eq!(
        v,
        Verdict::ToPort {
            port: B,
            header: h,
            frame_offset: 0,
            rewrite: Some(EthRewrite {
                dst: MAC_B,
                src: ROUTER
            })
        }
    );
}

#[test]
fn ping_to_the_gateway_is_answered() {
    let mut sw = switch();
    let f = frames::icmp_echo(ROUTER, MAC_A, IP_A, Ipv4Addr::new(10, 0, 1, 1), 8, 99);
    let v = sw.from_port(A, &plain(), &f, Instant::now());
    let Verdict::Reply {
        to: Egress::Port(A),
        frame,
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!(&frame[..6], &MAC_A.0);
    assert_eq!(&frame[30..34], &IP_A.octets());
    assert_eq!(frame[34], 0, "echo reply");
    assert_eq!(
        packet::fold(packet::sum16(&frame[34..], 0)),
        0,
        "ICMP checksum"
    );
    assert_eq!(
        packet::fold(packet::sum16(&frame[14..34], 0)),
        0,
        "IP checksum"
    );
}

#[test]
fn unknown_destinations_have_no_route() {
    let mut sw = switch();
    let f = frames::tcp_v4(
        ROUTER,
        MAC_A,
        IP_A,
        Ipv4Addr::new(10, 0, 1, 99),
        1,
        5201,
        TCP_SYN,
        b"",
    );
    expect_drop(&mut sw, A, &plain(), &f, DropReason::NoRoute);
    let f = frames::tcp_v4(
        ROUTER,
        MAC_A,
        IP_A,
        Ipv4Addr::new(8, 8, 8, 8),
        1,
        53,
        TCP_SYN,
        b"",
    );
    expect_drop(&mut sw, A, &plain(), &f, DropReason::NoRoute);
    // To B's IP but addressed to C's MAC: not delivered.
    let f = frames::tcp_v4(MAC_C, MAC_A, IP_A, IP_B, 1, 5201, TCP_SYN, b"");
    expect_drop(&mut sw, A, &plain(), &f, DropReason::NoRoute);
}

#[test]
fn broadcasts_other_than_arp_and_dhcp_are_not_flooded() {
    let mut sw = switch();
    let f = frames::udp_v4(
        MacAddr::BROADCAST,
        MAC_A,
        IP_A,
        Ipv4Addr::new(10, 0, 1, 255),
        9,
        9,
        b"hello all",
    );
    expect_drop(&mut sw, A, &plain(), &f, DropReason::Broadcast);
}

#[test]
fn ipv6_and_other_ethertypes_are_unsupported() {
    let mut sw = switch();
    let f = frames::tcp_v6(
        MAC_B,
        MAC_A,
        "fd00::1".parse().unwrap(),
        "fd00::2".parse().unwrap(),
        1,
        2,
        TCP_SYN,
        b"",
    );
    expect_drop(&mut sw, A, &plain(), &f, DropReason::Unsupported);
}

// ---- security groups and connection tracking -------------------------------------------------------------------

#[test]
fn inbound_denied_unless_allowed_and_return_traffic_tracked() {
    let mut sw = switch();
    let now = Instant::now();
    let ssh = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 40000, 22, TCP_SYN, b"");
    assert_eq!(
        sw.from_port(A, &plain(), &ssh, now),
        Verdict::Drop(DropReason::SecurityGroup)
    );
    assert_eq!(drops(&sw, B, DropReason::SecurityGroup), 1);
    // A reply from B to A's port 40000 that no flow explains is inbound traffic A's group does not allow.
    let stray = frames::tcp_v4(MAC_A, MAC_B, IP_B, IP_A, 22, 40000, TCP_SYN | TCP_ACK, b"");
    assert_eq!(
        sw.from_port(B, &plain(), &stray, now),
        Verdict::Drop(DropReason::SecurityGroup)
    );
    // source_group: udp 7000-7010 from members of sg-web.
    let udp = frames::udp_v4(MAC_B, MAC_A, IP_A, IP_B, 5000, 7005, b"x");
    assert!(matches!(
        sw.from_port(A, &plain(), &udp, now),
        Verdict::ToPort { port: B, .. }
    ));
}

#[test]
fn conntrack_full_drops_new_flows_and_counts_the_allowance() {
    let mut sw = switch();
    let now = Instant::now();
    for sport in [1000, 1001] {
        let f = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, sport, 5201, TCP_SYN, b"");
        assert!(matches!(
            sw.from_port(A, &plain(), &f, now),
            Verdict::ToPort { .. }
        ));
    }
    let f = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 1002, 5201, TCP_SYN, b"");
    assert_eq!(
        sw.from_port(A, &plain(), &f, now),
        Verdict::Drop(DropReason::ConntrackFull)
    );
    assert_eq!(sw.port_counters(B).unwrap().conntrack_allowance_exceeded, 1);
    assert_eq!(
        sw.conntrack_len(A),
        2,
        "A's outbound entry for the refused flow is not committed"
    );
    // Existing flows still work; after expiry the new flow gets in.
    let old = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 1000, 5201, TCP_ACK, b"");
    assert!(matches!(
        sw.from_port(A, &plain(), &old, now),
        Verdict::ToPort { .. }
    ));
    let later = now + Duration::from_secs(200);
    assert!(matches!(
        sw.from_port(A, &plain(), &f, later),
        Verdict::ToPort { .. }
    ));
}

#[test]
fn live_security_group_change() {
    let mut sw = switch();
    let now = Instant::now();
    let f = frames::tcp_v4(ROUTER, MAC_A, IP_A, IP_C, 40000, 5201, TCP_SYN, b"");
    assert_eq!(
        sw.from_port(A, &plain(), &f, now),
        Verdict::Drop(DropReason::SecurityGroup)
    );
    sw.set_security_groups(C, &["sg-web".to_string()]).unwrap();
    assert!(matches!(
        sw.from_port(A, &plain(), &f, now),
        Verdict::ToPort { port: C, .. }
    ));
    assert!(sw
        .set_security_groups(C, &["sg-nope".to_string()])
        .unwrap_err()
        .to_string()
        .contains("sg-nope"));
    assert!(sw.set_security_groups(9, &[]).is_err());
}

// ---- VXLAN -----------------------------------------------------------------------------------------------------

#[test]
fn remote_traffic_asks_by_arp_then_encapsulates_to_the_learned_mac() {
    let mut sw = switch();
    let now = Instant::now();
    let ping = frames::icmp_echo(ROUTER, MAC_A, IP_A, REMOTE_HOST, 8, 1);
    // Unknown neighbour: an ARP request goes to the VTEP, the packet is dropped and counted.
    let v = sw.from_port(A, &plain(), &ping, now);
    let Verdict::Reply {
        to: Egress::Vtep(to),
        frame,
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!(to, vtep());
    assert_eq!(&frame[..8], &vxlan::header(100));
    let req = arp::parse(&frame[8..]).unwrap();
    assert_eq!(
        (req.op, req.target_ip, req.sender_ip, req.sender_mac),
        (arp::OP_REQUEST, REMOTE_HOST, IP_A, ROUTER)
    );
    assert_eq!(drops(&sw, A, DropReason::NeighborUnknown), 1);
    // Asked once per second at most: a second packet right away is only dropped.
    assert_eq!(
        sw.from_port(A, &plain(), &ping, now),
        Verdict::Drop(DropReason::NeighborUnknown)
    );
    assert_eq!(drops(&sw, A, DropReason::NeighborUnknown), 2);
    assert_eq!(sw.counters().arp_requests_sent, 1);
    let v = sw.from_port(A, &plain(), &ping, now + Duration::from_secs(1));
    assert!(
        matches!(
            v,
            Verdict::Reply {
                to: Egress::Vtep(_),
                ..
            }
        ),
        "asked again after a second"
    );
    // The remote answers over VXLAN: learned.
    let answer = arp::reply(&req, REMOTE_MAC);
    assert_eq!(
        from_remote(&mut sw, &answer, now),
        Verdict::Drop(DropReason::ArpIgnored)
    );
    assert_eq!(sw.neighbor(REMOTE_HOST), Some(REMOTE_MAC));
    let v = sw.from_port(A, &plain(), &ping, now);
    assert_eq!(
        v,
        Verdict::ToVtep {
            vtep: vtep(),
            vxlan_header: vxlan::header(100),
            header: plain(),
            frame_offset: 0,
            rewrite: Some(EthRewrite {
                dst: REMOTE_MAC,
                src: ROUTER
            })
        }
    );
    // The echo reply comes back and is delivered to A with the router as source.
    let pong = frames::icmp_echo(ROUTER, REMOTE_MAC, REMOTE_HOST, IP_A, 0, 1);
    let v = from_remote(&mut sw, &pong, now);
    assert_eq!(
        v,
        Verdict::ToPort {
            port: A,
            header: plain(),
            frame_offset: 8,
            rewrite: Some(EthRewrite {
                dst: MAC_A,
                src: ROUTER
            })
        }
    );
}

#[test]
fn a_remote_hosts_arp_for_a_local_eni_is_answered_over_vxlan() {
    let mut sw = switch();
    let req = arp::request(REMOTE_MAC, REMOTE_HOST, IP_B);
    let v = from_remote(&mut sw, &req, Instant::now());
    let Verdict::Reply {
        to: Egress::Vtep(to),
        frame,
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!(
        to,
        vtep(),
        "to the configured VTEP, not the datagram's ephemeral source port"
    );
    assert_eq!(&frame[..8], &vxlan::header(100));
    let a = arp::parse(&frame[8..]).unwrap();
    assert_eq!(
        (a.op, a.sender_ip, a.sender_mac, a.target_mac),
        (arp::OP_REPLY, IP_B, ROUTER, REMOTE_MAC)
    );
    assert_eq!(
        sw.neighbor(REMOTE_HOST),
        Some(REMOTE_MAC),
        "learned from the request"
    );
}

#[test]
fn vxlan_from_the_remote_is_filtered_by_the_enis_security_groups() {
    let mut sw = switch();
    let now = Instant::now();
    let allowed = frames::tcp_v4(
        ROUTER,
        REMOTE_MAC,
        REMOTE_HOST,
        IP_A,
        3333,
        5201,
        TCP_SYN,
        b"",
    );
    assert!(matches!(
        from_remote(&mut sw, &allowed, now),
        Verdict::ToPort { port: A, .. }
    ));
    let denied = frames::tcp_v4(
        ROUTER,
        REMOTE_MAC,
        REMOTE_HOST,
        IP_A,
        3333,
        5202,
        TCP_SYN,
        b"",
    );
    assert_eq!(
        from_remote(&mut sw, &denied, now),
        Verdict::Drop(DropReason::SecurityGroup)
    );
    assert_eq!(drops(&sw, A, DropReason::SecurityGroup), 1);
}

#[test]
fn bad_vxlan_is_dropped_and_counted() {
    let mut sw = switch();
    let now = Instant::now();
    let inner = frames::tcp_v4(
        ROUTER,
        REMOTE_MAC,
        REMOTE_HOST,
        IP_A,
        3333,
        5201,
        TCP_SYN,
        b"",
    );
    let mut other_vni = vxlan::header(101).to_vec();
    other_vni.extend_from_slice(&inner);
    assert_eq!(
        sw.from_vxlan(&other_vni, vtep(), now),
        Verdict::Drop(DropReason::UnknownVni)
    );
    let mut no_flag = vxlan::header(100).to_vec();
    no_flag[0] = 0;
    no_flag.extend_from_slice(&inner);
    assert_eq!(
        sw.from_vxlan(&no_flag, vtep(), now),
        Verdict::Drop(DropReason::BadVxlanHeader)
    );
    let mut ok = vxlan::header(100).to_vec();
    ok.extend_from_slice(&inner);
    assert_eq!(
        sw.from_vxlan(&ok, "192.0.2.1:4789".parse().unwrap(), now),
        Verdict::Drop(DropReason::UnknownVtep)
    );
    assert_eq!(
        sw.from_vxlan(&ok[..5], vtep(), now),
        Verdict::Drop(DropReason::Truncated)
    );
    assert_eq!(
        sw.from_vxlan(&ok[..8 + 20], vtep(), now),
        Verdict::Drop(DropReason::Truncated)
    );
    // A remote claiming a local address (or one outside its CIDR) is spoofing.
    let spoof = frames::tcp_v4(ROUTER, REMOTE_MAC, IP_B, IP_A, 3333, 5201, TCP_SYN, b"");
    assert_eq!(
        from_remote(&mut sw, &spoof, now),
        Verdict::Drop(DropReason::SpoofedIp)
    );
    let big = frames::udp_v4(ROUTER, REMOTE_MAC, REMOTE_HOST, IP_A, 1, 2, &[0u8; 1600]);
    assert_eq!(
        from_remote(&mut sw, &big, now),
        Verdict::Drop(DropReason::Oversized),
        "only TCP is taken as GSO"
    );
    let v6 = frames::tcp_v6(
        ROUTER,
        REMOTE_MAC,
        "fd00::1".parse().unwrap(),
        "fd00::2".parse().unwrap(),
        1,
        2,
        TCP_ACK,
        &[0u8; 1600],
    );
    assert_eq!(
        from_remote(&mut sw, &v6, now),
        Verdict::Drop(DropReason::Oversized)
    );
    let d = &sw.counters().vxlan_drops;
    for r in [
        DropReason::UnknownVni,
        DropReason::BadVxlanHeader,
        DropReason::UnknownVtep,
        DropReason::Truncated,
        DropReason::SpoofedIp,
        DropReason::Oversized,
    ] {
        assert!(d.drops(r) >= 1, "{r} counted");
    }
}

// ---- bad input from a guest (issue 4 item 6): one test each ---------------------------------------------------

#[test]
fn truncated_frames_are_dropped() {
    let mut sw = switch();
    let f = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 1, 5201, TCP_SYN, b"");
    expect_drop(&mut sw, A, &plain(), &f[..10], DropReason::Truncated);
    expect_drop(&mut sw, A, &plain(), &f[..30], DropReason::Truncated);
    expect_drop(&mut sw, A, &plain(), &f[..40], DropReason::Truncated);
    expect_drop(
        &mut sw,
        A,
        &plain(),
        &arp::request(MAC_A, IP_A, IP_B)[..30],
        DropReason::Truncated,
    );
}

#[test]
fn bad_vnet_headers_are_dropped() {
    let mut sw = switch();
    let f = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 1, 5201, TCP_SYN, b"");
    expect_drop(
        &mut sw,
        A,
        &VnetHeader {
            flags: 0x02,
            ..plain()
        },
        &f,
        DropReason::BadVnetHeader,
    );
    expect_drop(
        &mut sw,
        A,
        &VnetHeader {
            gso_type: 3,
            ..plain()
        },
        &f,
        DropReason::BadVnetHeader,
    );
    expect_drop(
        &mut sw,
        A,
        &VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 200,
            ..plain()
        },
        &f,
        DropReason::BadVnetHeader,
    );
}

#[test]
fn gso_fields_that_dont_match_the_packet_are_dropped() {
    let mut sw = switch();
    let f = frames::udp_v4(MAC_B, MAC_A, IP_A, IP_B, 1, 7001, &[1u8; 3000]);
    let h = VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 42,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    expect_drop(&mut sw, A, &h, &f, DropReason::GsoMismatch);
    let t = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 1, 5201, TCP_ACK, &[1u8; 3000]);
    expect_drop(
        &mut sw,
        A,
        &VnetHeader { gso_size: 0, ..h },
        &t,
        DropReason::GsoMismatch,
    );
    expect_drop(
        &mut sw,
        A,
        &VnetHeader { gso_type: 4, ..h },
        &t,
        DropReason::GsoMismatch,
    );
}

#[test]
fn oversized_frames_are_dropped() {
    let mut sw = switch();
    let f = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 1, 5201, TCP_ACK, &[1u8; 1461]);
    assert_eq!(f.len(), 1515);
    expect_drop(&mut sw, A, &plain(), &f, DropReason::Oversized);
    let ok = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 1, 5201, TCP_SYN, &[1u8; 1460]);
    assert!(matches!(
        sw.from_port(A, &plain(), &ok, Instant::now()),
        Verdict::ToPort { .. }
    ));
}

#[test]
fn spoofed_source_mac_is_dropped() {
    let mut sw = switch();
    let f = frames::tcp_v4(MAC_B, MAC_C, IP_A, IP_B, 1, 5201, TCP_SYN, b"");
    expect_drop(&mut sw, A, &plain(), &f, DropReason::SpoofedMac);
}

#[test]
fn spoofed_source_ip_is_dropped() {
    let mut sw = switch();
    let f = frames::tcp_v4(MAC_B, MAC_A, IP_C, IP_B, 1, 5201, TCP_SYN, b"");
    expect_drop(&mut sw, A, &plain(), &f, DropReason::SpoofedIp);
    // DHCP is the one exception (from 0.0.0.0), and only as DHCP.
    let f = frames::tcp_v4(
        MAC_B,
        MAC_A,
        Ipv4Addr::UNSPECIFIED,
        IP_B,
        68,
        67,
        TCP_SYN,
        b"",
    );
    expect_drop(&mut sw, A, &plain(), &f, DropReason::SpoofedIp);
}

#[test]
fn a_port_the_switch_does_not_have_is_refused() {
    let mut sw = switch();
    assert_eq!(
        sw.from_port(7, &plain(), &[0u8; 60], Instant::now()),
        Verdict::Drop(DropReason::NoSuchPort)
    );
    assert!(sw.port_counters(7).is_none());
}

proptest! {
    #[test]
    fn from_port_never_panics(h in any::<[u8; 12]>(), f in proptest::collection::vec(any::<u8>(), 0..2000), port in 0usize..4) {
        let mut sw = switch();
        let h = VnetHeader::parse(&h).unwrap();
        let _ = sw.from_port(port, &h, &f, Instant::now());
    }

    /// Mutations of valid frames reach deeper than random bytes.
    #[test]
    fn from_port_never_panics_on_mutated_frames(at in 0usize..200, byte in any::<u8>(), cut in 0usize..200, which in 0usize..4) {
        let mut sw = switch();
        let mut f = match which {
            0 => frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 1, 5201, TCP_SYN, b"payload"),
            1 => dhcp_frame(MAC_A, dhcp::DISCOVER, None),
            2 => arp::request(MAC_A, IP_A, IP_B),
            _ => frames::icmp_echo(ROUTER, MAC_A, IP_A, REMOTE_HOST, 8, 1),
        };
        if at < f.len() { f[at] = byte; }
        let len = f.len().saturating_sub(cut % 60);
        let _ = sw.from_port(A, &plain(), &f[..len], Instant::now());
    }

    #[test]
    fn from_uplink_never_panics(h in any::<[u8; 12]>(), f in proptest::collection::vec(any::<u8>(), 0..2000), arp in any::<bool>()) {
        let mut sw = uplink_switch();
        let h = VnetHeader::parse(&h).unwrap();
        let mut f = f;
        if arp && f.len() >= 14 { f[12] = 0x08; f[13] = 0x06; }
        let _ = sw.from_uplink(&h, &f, Instant::now());
    }

    #[test]
    fn from_vxlan_never_panics(d in proptest::collection::vec(any::<u8>(), 0..2000), valid_head in any::<bool>()) {
        let mut sw = switch();
        let mut d = d;
        if valid_head && d.len() >= 8 { d[..8].copy_from_slice(&vxlan::header(100)); }
        let _ = sw.from_vxlan(&d, vtep(), Instant::now());
    }
}

// ---- fragments, uplink, peers' partial checksums ---------------------------------------------------------------

/// Splits an IPv4 frame's payload at `at` (a multiple of 8) into two fragments.
fn fragments(f: &[u8], at: usize) -> (Vec<u8>, Vec<u8>) {
    let ip = packet::ipv4(f).unwrap();
    let payload = &f[ip.l4_offset()..ip.end()];
    let head = &f[..ip.l4_offset()];
    let mk = |part: &[u8], offset: usize, more: bool| {
        let mut g = head.to_vec();
        g.extend_from_slice(part);
        let total = (20 + part.len()) as u16;
        g[16..18].copy_from_slice(&total.to_be_bytes());
        let frag = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
        g[20..22].copy_from_slice(&frag.to_be_bytes());
        packet::set_ipv4_checksum(&mut g[14..34]);
        g
    };
    (mk(&payload[..at], 0, true), mk(&payload[at..], at, false))
}

#[test]
fn later_fragments_follow_an_allowed_first_fragment_only() {
    let mut sw = switch();
    let now = Instant::now();
    let big = frames::udp_v4(MAC_B, MAC_A, IP_A, IP_B, 5000, 7001, &[3u8; 1000]);
    let (first, second) = fragments(&big, 512);
    assert!(matches!(
        sw.from_port(A, &plain(), &first, now),
        Verdict::ToPort { port: B, .. }
    ));
    assert!(matches!(
        sw.from_port(A, &plain(), &second, now),
        Verdict::ToPort { port: B, .. }
    ));
    // A later fragment of a datagram whose first fragment was refused (port 9 is closed) does not pass.
    let closed = frames::udp_v4(MAC_B, MAC_A, IP_A, IP_B, 5000, 9, &[3u8; 1000]);
    let (first, mut second) = fragments(&closed, 512);
    second[18..20].copy_from_slice(&0x4321u16.to_be_bytes());
    packet::set_ipv4_checksum(&mut second[14..34]);
    assert_eq!(
        sw.from_port(A, &plain(), &first, now),
        Verdict::Drop(DropReason::SecurityGroup)
    );
    expect_drop(&mut sw, A, &plain(), &second, DropReason::Fragment);
    // And the remembered datagram expires.
    let (_, second) = fragments(&big, 512);
    let later = now + Duration::from_secs(31);
    assert_eq!(
        sw.from_port(A, &plain(), &second, later),
        Verdict::Drop(DropReason::Fragment)
    );
}

fn uplink_switch() -> Switch {
    let text = format!(
        "{}\n[uplink]\ntap = \"cardsim-up0\"\n",
        crate::fuzzing::CONFIG
    );
    Switch::new(&VpcConfig::parse(&text).unwrap())
}

#[test]
fn the_uplink_takes_what_is_outside_the_vpc_and_learns_the_hosts_mac() {
    let mut sw = uplink_switch();
    let now = Instant::now();
    let host_mac = MacAddr([0x5a, 1, 2, 3, 4, 5]);
    let host = Ipv4Addr::new(192, 168, 50, 1);
    let out = frames::icmp_echo(ROUTER, MAC_A, IP_A, host, 8, 5);
    assert_eq!(
        sw.from_port(A, &plain(), &out, now),
        Verdict::ToUplink {
            header: plain(),
            frame_offset: 0,
            rewrite: Some(EthRewrite {
                dst: MacAddr::BROADCAST,
                src: ROUTER
            })
        }
    );
    // The host asks for the ENI on the tap: answered with the router MAC, and its MAC is learned.
    let v = sw.from_uplink(&plain(), &arp::request(host_mac, host, IP_A), now);
    let Verdict::Reply {
        to: Egress::Uplink,
        frame,
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!(arp::parse(&frame).unwrap().sender_mac, ROUTER);
    let back = frames::icmp_echo(ROUTER, host_mac, host, IP_A, 0, 5);
    let data_valid = VnetHeader {
        flags: crate::vnet::F_DATA_VALID,
        ..plain()
    };
    assert_eq!(
        sw.from_uplink(&data_valid, &back, now),
        Verdict::ToPort {
            port: A,
            header: plain(),
            frame_offset: 0,
            rewrite: Some(EthRewrite {
                dst: MAC_A,
                src: ROUTER
            })
        }
    );
    assert!(
        matches!(sw.from_port(A, &plain(), &out, now), Verdict::ToUplink { rewrite: Some(EthRewrite { dst, .. }), .. } if dst == host_mac)
    );
    // Inside the VPC but unassigned: not sent up. From the uplink with a VPC source: spoofed.
    let f = frames::icmp_echo(ROUTER, MAC_A, IP_A, Ipv4Addr::new(10, 0, 9, 9), 8, 5);
    assert_eq!(
        sw.from_port(A, &plain(), &f, now),
        Verdict::Drop(DropReason::NoRoute)
    );
    let f = frames::icmp_echo(ROUTER, host_mac, IP_B, IP_A, 8, 5);
    assert_eq!(
        sw.from_uplink(&plain(), &f, now),
        Verdict::Drop(DropReason::SpoofedIp)
    );
    assert_eq!(sw.counters().uplink_drops.drops(DropReason::SpoofedIp), 1);
    // Without an [uplink], nothing comes from one and outside addresses have no route.
    let mut plain_sw = switch();
    assert_eq!(
        plain_sw.from_uplink(&plain(), &back, now),
        Verdict::Drop(DropReason::NoRoute)
    );
    assert_eq!(
        plain_sw.from_port(A, &plain(), &out, now),
        Verdict::Drop(DropReason::NoRoute)
    );
}

#[test]
fn a_partial_checksum_from_a_linux_vxlan_peer_is_marked_needs_csum() {
    let mut sw = switch();
    let now = Instant::now();
    let mut f = frames::tcp_v4(
        ROUTER,
        REMOTE_MAC,
        REMOTE_HOST,
        IP_A,
        3333,
        5201,
        TCP_SYN,
        b"",
    );
    let p = !packet::fold(packet::pseudo_v4(REMOTE_HOST, IP_A, packet::PROTO_TCP, 20));
    f[50..52].copy_from_slice(&p.to_be_bytes());
    let v = from_remote(&mut sw, &f, now);
    let Verdict::ToPort {
        header,
        frame_offset: 8,
        ..
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!(
        (header.flags, header.csum_start, header.csum_offset),
        (F_NEEDS_CSUM, 34, 16)
    );
}

#[test]
fn a_remote_hosts_arp_for_its_gateway_is_answered() {
    let mut sw = switch();
    let v = from_remote(
        &mut sw,
        &arp::request(REMOTE_MAC, REMOTE_HOST, Ipv4Addr::new(10, 0, 2, 1)),
        Instant::now(),
    );
    assert!(
        matches!(
            v,
            Verdict::Reply {
                to: Egress::Vtep(_),
                ..
            }
        ),
        "{v:?}"
    );
    let v = from_remote(
        &mut sw,
        &arp::request(REMOTE_MAC, REMOTE_HOST, Ipv4Addr::new(10, 0, 2, 9)),
        Instant::now(),
    );
    assert_eq!(
        v,
        Verdict::Drop(DropReason::ArpIgnored),
        "another remote host: its own business"
    );
}

#[test]
fn a_tso_frame_from_a_linux_vxlan_peer_is_delivered_as_gso() {
    let mut sw = switch();
    let now = Instant::now();
    let data: Vec<u8> = (0..20000u32).map(|i| i as u8).collect();
    let big = frames::tcp_v4(
        ROUTER,
        REMOTE_MAC,
        REMOTE_HOST,
        IP_A,
        3333,
        5201,
        TCP_ACK,
        &data,
    );
    let v = from_remote(&mut sw, &big, now);
    let Verdict::ToPort {
        port: A,
        header,
        frame_offset: 8,
        ..
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!(
        header,
        VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1460,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0
        }
    );
    // What the card does for a guest without GUEST_TSO4: segments that fit and carry the payload.
    offload::check_tx(&header, &big, 1500).unwrap();
    let mut joined = Vec::new();
    offload::segment(&header, &big, 1500, &mut |s: &[u8]| {
        assert!(s.len() <= 1514);
        joined.extend_from_slice(&s[54..]);
    })
    .unwrap();
    assert_eq!(joined, data);
    let huge = frames::tcp_v4(
        ROUTER,
        REMOTE_MAC,
        REMOTE_HOST,
        IP_A,
        3333,
        5201,
        TCP_ACK,
        &vec![0u8; 65535],
    );
    assert_eq!(
        from_remote(&mut sw, &huge, now),
        Verdict::Drop(DropReason::Oversized)
    );
}

// ---- deciding on the headers only ----------------------------------------------------------------------------

/// `frame` with every byte from `head` on overwritten: what the switch sees when the card copied only the
/// headers (the rest of its buffer holds whatever an earlier frame left).
fn stale_after(frame: &[u8], head: usize) -> Vec<u8> {
    let mut f = frame.to_vec();
    for b in f.iter_mut().skip(head) {
        *b = 0xa5;
    }
    f
}

#[test]
fn a_forwarded_frame_is_decided_on_its_headers_alone() {
    let now = Instant::now();
    let f = frames::tcp_v4(MAC_B, MAC_A, IP_A, IP_B, 40000, 5201, TCP_SYN, &[7u8; 1000]);
    let whole = switch().from_port(A, &plain(), &f, now);
    assert!(
        matches!(whole, Verdict::ToPort { port: B, .. }),
        "{whole:?}"
    );
    let mut sw = switch();
    let v = sw.from_port_headers(
        A,
        &plain(),
        &stale_after(&f, DECISION_HEAD),
        DECISION_HEAD,
        now,
    );
    assert_eq!(v, Some(whole));
    // Bad input is still dropped and counted on the headers alone.
    let spoofed = frames::tcp_v4(MAC_B, MAC_A, IP_C, IP_B, 1, 5201, TCP_SYN, &[7u8; 1000]);
    let v = sw.from_port_headers(A, &plain(), &stale_after(&spoofed, 160), 160, now);
    assert_eq!(v, Some(Verdict::Drop(DropReason::SpoofedIp)));
    assert_eq!(drops(&sw, A, DropReason::SpoofedIp), 1);
    // Fewer headers than the switch may read: it asks for the whole frame.
    assert_eq!(sw.from_port_headers(A, &plain(), &f, 100, now), None);
}

/// DHCP and a ping to the gateway are answered from their payload: with only their headers the switch asks
/// for the whole frame and changes nothing (no counter, no lease, no reply).
#[test]
fn frames_the_switch_answers_are_asked_for_whole() {
    let now = Instant::now();
    let mut sw = switch();
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    icmp.resize(408, 0x5a);
    let sum = !packet::fold(packet::sum16(&icmp, 0));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let gateway = Ipv4Addr::new(10, 0, 1, 1);
    let ping = frames::ipv4(ROUTER, MAC_A, IP_A, gateway, PROTO_ICMP, &icmp);
    let dhcp = dhcp_frame(MAC_C, dhcp::DISCOVER, None);
    assert!(ping.len() > DECISION_HEAD && dhcp.len() > DECISION_HEAD);
    assert_eq!(
        sw.from_port_headers(
            A,
            &plain(),
            &stale_after(&ping, DECISION_HEAD),
            DECISION_HEAD,
            now
        ),
        None
    );
    assert_eq!(
        sw.from_port_headers(
            C,
            &plain(),
            &stale_after(&dhcp, DECISION_HEAD),
            DECISION_HEAD,
            now
        ),
        None
    );
    for p in [A, C] {
        let c = sw.port_counters(p).unwrap();
        assert_eq!(
            (c.icmp_echo_replies, c.dhcp_offers, c.total_drops()),
            (0, 0, 0)
        );
    }
    // Whole, they are answered.
    let v = sw.from_port_headers(A, &plain(), &ping, ping.len(), now);
    assert!(matches!(v, Some(Verdict::Reply { .. })), "{v:?}");
}
