//! The VPC switch: one port per ENI, plus VXLAN to remote hosts and an optional uplink. It decides what
//! happens to each frame and returns a [`Verdict`]; the card process moves the bytes.
//!
//! Routing model (documented in the top-level README, "Forwarding model"):
//! - Within a subnet, guests reach each other at L2: the card answers ARP for a peer ENI with the peer's own
//!   MAC and delivers frames unchanged.
//! - Across subnets, to `[[remote]]`s and to the uplink, guests send to their gateway, whose MAC is the card's
//!   router MAC; the card rewrites the Ethernet header (source: router MAC, destination: the next hop's MAC)
//!   and, like an AWS VPC router, does not decrement the TTL (so IP and transport checksums stay valid and
//!   GSO frames pass through unchanged).
//! - Nothing is ever flooded: broadcasts other than ARP and DHCP, and frames for unknown destinations, are
//!   dropped and counted.
use crate::addr::MacAddr;
use crate::arp::{self, Arp};
use crate::config::{ConfigError, Remote, VpcConfig};
use crate::dhcp;
use crate::hash::FastMap;
use crate::offload;
use crate::packet::{self, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_HLEN, L4, PROTO_ICMP};
use crate::secgroup::{self, Conntrack, Decision, Direction, PacketInfo};
use crate::vnet::{self, VnetHeader};
use crate::vxlan;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

/// An ENI's index in [`VpcConfig::enis`].
pub type PortId = usize;

/// Why a frame was dropped. Each is counted per port ([`PortCounters::drops`]) or, before a port is known,
/// per switch ([`Switch::counters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than its headers say.
    Truncated,
    /// A vnet header field that is invalid whatever the frame (unknown flag or GSO type, csum outside the frame).
    BadVnetHeader,
    /// GSO fields that don't match the packet (type vs IP version/protocol, gso_size, hdr_len).
    GsoMismatch,
    /// Larger than the MTU (or than 64 KiB for a GSO frame).
    Oversized,
    /// Source MAC is not the ENI's.
    SpoofedMac,
    /// Source IP is not the ENI's (or, from a remote or the uplink, not one it may use).
    SpoofedIp,
    /// Denied by the security groups.
    SecurityGroup,
    /// No ENI, remote or uplink for the destination, or a destination MAC that is not the target's.
    NoRoute,
    /// A new flow while the connection-tracking table was full (`conntrack_allowance_exceeded`).
    ConntrackFull,
    /// VXLAN with another VNI.
    UnknownVni,
    /// VXLAN header without the I flag.
    BadVxlanHeader,
    /// VXLAN from an address that is no configured remote's VTEP.
    UnknownVtep,
    /// A header that is not what it claims (bad version, header length, ARP hardware type, DHCP message…).
    Malformed,
    /// A protocol the VPC does not carry (IPv6, VLAN tags, other ethertypes).
    Unsupported,
    /// A broadcast or multicast that is neither ARP nor DHCP (never flooded).
    Broadcast,
    /// ARP the card does not answer: gratuitous, for an unknown address, or a reply nobody asked for.
    ArpIgnored,
    /// The next hop's MAC is not known yet; the card asked for it by ARP and dropped this frame.
    NeighborUnknown,
    /// A later IPv4 fragment (no transport header for the security groups to check).
    Fragment,
    /// A DHCP message the server does not answer.
    DhcpIgnored,
    /// The caller passed a port the switch does not have.
    NoSuchPort,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        DropReason::Truncated,
        DropReason::BadVnetHeader,
        DropReason::GsoMismatch,
        DropReason::Oversized,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::SecurityGroup,
        DropReason::NoRoute,
        DropReason::ConntrackFull,
        DropReason::UnknownVni,
        DropReason::BadVxlanHeader,
        DropReason::UnknownVtep,
        DropReason::Malformed,
        DropReason::Unsupported,
        DropReason::Broadcast,
        DropReason::ArpIgnored,
        DropReason::NeighborUnknown,
        DropReason::Fragment,
        DropReason::DhcpIgnored,
        DropReason::NoSuchPort,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// The metric name (snake case).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadVnetHeader => "bad_vnet_header",
            DropReason::GsoMismatch => "gso_mismatch",
            DropReason::Oversized => "oversized",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::SecurityGroup => "security_group",
            DropReason::NoRoute => "no_route",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::UnknownVni => "unknown_vni",
            DropReason::BadVxlanHeader => "bad_vxlan_header",
            DropReason::UnknownVtep => "unknown_vtep",
            DropReason::Malformed => "malformed",
            DropReason::Unsupported => "unsupported",
            DropReason::Broadcast => "broadcast",
            DropReason::ArpIgnored => "arp_ignored",
            DropReason::NeighborUnknown => "neighbor_unknown",
            DropReason::Fragment => "fragment",
            DropReason::DhcpIgnored => "dhcp_ignored",
            DropReason::NoSuchPort => "no_such_port",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A new Ethernet header for a routed frame: the caller writes `dst` then `src` over the frame's first 12
/// bytes as it copies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthRewrite {
    pub dst: MacAddr,
    pub src: MacAddr,
}

impl EthRewrite {
    /// The 12 bytes that replace the frame's destination and source MACs.
    pub fn bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..6].copy_from_slice(&self.dst.0);
        b[6..].copy_from_slice(&self.src.0);
        b
    }

    /// Applies the rewrite to a frame in place (no-op on a frame shorter than 12 bytes).
    pub fn apply(&self, frame: &mut [u8]) {
        if let Some(head) = frame.get_mut(..12) {
            head.copy_from_slice(&self.bytes());
        }
    }
}

/// Where a frame the card builds itself goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// A port's RX, with a plain vnet header ([`VnetHeader::plain`]).
    Port(PortId),
    /// One UDP datagram to this VTEP (the frame already starts with the VXLAN header).
    Vtep(SocketAddr),
    /// The TAP uplink, with a plain vnet header.
    Uplink,
}

/// Bytes at the start of a frame the switch reads to forward it (every header: Ethernet with a VLAN tag, IPv4
/// with options, TCP with options, or ICMP quoting an IPv4 header with options and 8 bytes after it). A frame
/// it answers itself (DHCP, a ping to the gateway) it reads whole. See [`Switch::from_port_headers`].
pub const DECISION_HEAD: usize = 160;

/// What to do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver the input's bytes from `frame_offset` on to `port`'s RX with `header` (the caller sets
    /// `num_buffers`), writing `rewrite` over the first 12 bytes if given. If the port did not negotiate
    /// GUEST_TSO4/6 (for a GSO header) or GUEST_CSUM (for NEEDS_CSUM), the caller uses
    /// [`offload::segment`] / [`offload::complete_checksum`] instead.
    ToPort {
        port: PortId,
        header: VnetHeader,
        frame_offset: usize,
        rewrite: Option<EthRewrite>,
    },
    /// Send `vxlan_header ++ frame[frame_offset..]` (rewritten) to `vtep` as one UDP datagram. A GSO frame
    /// (`header.is_gso()`) is segmented first and partial checksums completed (a remote host's vxlan device
    /// takes neither), with [`offload::segment`] / [`offload::complete_checksum`].
    ToVtep {
        vtep: SocketAddr,
        vxlan_header: [u8; 8],
        header: VnetHeader,
        frame_offset: usize,
        rewrite: Option<EthRewrite>,
    },
    /// Write to the TAP uplink with `header`, from `frame_offset`, rewritten.
    ToUplink {
        header: VnetHeader,
        frame_offset: usize,
        rewrite: Option<EthRewrite>,
    },
    /// The card answers itself (ARP reply or request, DHCP offer/ack/nak, ICMP echo reply from a gateway).
    Reply {
        to: Egress,
        frame: Vec<u8>,
    },
    Drop(DropReason),
}

/// Per-port counters (frames the guest sent, drops by reason, replies the card made).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames from the guest that the switch forwarded (to a port, a VTEP or the uplink).
    pub forwarded: u64,
    /// Frames delivered to this port from elsewhere.
    pub delivered: u64,
    drops: [u64; DropReason::COUNT],
    /// New flows dropped because the connection-tracking table was full (ENA's name).
    pub conntrack_allowance_exceeded: u64,
    pub arp_replies: u64,
    pub dhcp_offers: u64,
    pub dhcp_acks: u64,
    pub dhcp_naks: u64,
    pub icmp_echo_replies: u64,
}

impl PortCounters {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops, by reason, with counts above zero.
    pub fn drop_counts(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.drops(*r)))
            .filter(|(_, n)| *n > 0)
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
        if reason == DropReason::ConntrackFull {
            self.conntrack_allowance_exceeded += 1;
        }
    }
}

/// Counters of traffic that reaches no port: VXLAN and uplink input dropped before a destination was known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwitchCounters {
    pub vxlan_received: u64,
    pub vxlan_drops: PortCounters,
    pub uplink_received: u64,
    pub uplink_drops: PortCounters,
    pub arp_requests_sent: u64,
}

/// Remote neighbours learned from VXLAN traffic (inner source IP → MAC). Bounded: when full, a new
/// address replaces nothing and is not learned (the card asks by ARP each time instead).
const MAX_NEIGHBORS: usize = 4096;
/// How long the card waits before asking again for a remote address that has not answered.
const ARP_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How many fragmented datagrams the switch remembers at once, and for how long (Linux's ipfrag_time).
const MAX_FRAGMENTED: usize = 256;
const FRAGMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// IPv4 datagrams whose first fragment (the one with the transport header) the security groups allowed:
/// their later fragments follow without a transport header to check. Keyed as reassembly is, by
/// (source, destination, protocol, id); bounded, oldest forgotten first.
#[derive(Default)]
struct Fragments {
    allowed: std::collections::VecDeque<((Ipv4Addr, Ipv4Addr, u8, u16), Instant)>,
}

impl Fragments {
    fn key(ip: &packet::Ipv4) -> (Ipv4Addr, Ipv4Addr, u8, u16) {
        (ip.src, ip.dst, ip.proto, ip.id)
    }

    fn remember(&mut self, ip: &packet::Ipv4, now: Instant) {
        if self.allowed.len() >= MAX_FRAGMENTED {
            self.allowed.pop_front();
        }
        self.allowed
            .push_back((Self::key(ip), now + FRAGMENT_TIMEOUT));
    }

    fn is_allowed(&self, ip: &packet::Ipv4, now: Instant) -> bool {
        let key = Self::key(ip);
        self.allowed
            .iter()
            .any(|(k, until)| *k == key && *until > now)
    }
}

struct Port {
    conntrack: Conntrack,
    counters: PortCounters,
    /// The MTU in force: the ENI's, or the lower one its VMM set.
    mtu: u16,
}

pub struct Switch {
    config: VpcConfig,
    ports: Vec<Port>,
    /// Each port's security groups (indices into `config.security_groups`), apart from `ports` so rules can
    /// be read while a port's connection table is borrowed mutably.
    port_groups: Vec<Vec<usize>>,
    by_ip: FastMap<Ipv4Addr, PortId>,
    /// Learned MACs of hosts behind `[[remote]]`s.
    neighbors: HashMap<Ipv4Addr, MacAddr>,
    /// When the card last asked for an unresolved remote address.
    arp_asked: HashMap<Ipv4Addr, Instant>,
    arp_forgotten_at: Option<Instant>,
    uplink_mac: Option<MacAddr>,
    counters: SwitchCounters,
    fragments: Fragments,
}

/// Where a routed IPv4 packet goes.
enum Route<'a> {
    Port(PortId),
    Remote(&'a Remote),
    Uplink,
    /// One of the card's own addresses (a subnet gateway).
    Gateway,
}

impl Switch {
    pub fn new(config: &VpcConfig) -> Switch {
        let ports = config
            .enis
            .iter()
            .map(|e| Port {
                conntrack: Conntrack::new(e.conntrack_entries),
                counters: PortCounters::default(),
                mtu: e.mtu,
            })
            .collect();
        let port_groups = config
            .enis
            .iter()
            .map(|e| {
                e.security_groups
                    .iter()
                    .filter_map(|g| config.security_groups.iter().position(|s| &s.id == g))
                    .collect()
            })
            .collect();
        Switch {
            by_ip: config
                .enis
                .iter()
                .enumerate()
                .map(|(i, e)| (e.ip, i))
                .collect(),
            config: config.clone(),
            ports,
            port_groups,
            neighbors: HashMap::new(),
            arp_asked: HashMap::new(),
            arp_forgotten_at: None,
            uplink_mac: config.uplink.as_ref().and_then(|u| u.peer_mac),
            counters: SwitchCounters::default(),
            fragments: Fragments::default(),
        }
    }

    pub fn config(&self) -> &VpcConfig {
        &self.config
    }

    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// Counters of `port`, or `None` for a port the switch does not have.
    pub fn port_counters(&self, port: PortId) -> Option<&PortCounters> {
        self.ports.get(port).map(|p| &p.counters)
    }

    pub fn counters(&self) -> &SwitchCounters {
        &self.counters
    }

    /// The MTU in force on `port`: frames the guest sends above it are dropped (`oversized`) and DHCP hands it
    /// out (option 26).
    pub fn port_mtu(&self, port: PortId) -> Option<u16> {
        self.ports.get(port).map(|p| p.mtu)
    }

    /// Sets the MTU in force on `port` (the card clamps it to the ENI's first); ignored for a port the switch
    /// does not have.
    pub fn set_port_mtu(&mut self, port: PortId, mtu: u16) {
        if let Some(p) = self.ports.get_mut(port) {
            p.mtu = mtu;
        }
    }

    /// Flows tracked on `port` (expired ones included until swept).
    pub fn conntrack_len(&self, port: PortId) -> usize {
        self.ports.get(port).map_or(0, |p| p.conntrack.len())
    }

    /// Defines `group` or replaces the group of the same id (validated by
    /// [`crate::config::VpcConfig::check_security_group`]). Tracked flows stay allowed (as on AWS); new flows
    /// see the new rules, on every ENI in the group.
    pub fn put_security_group(&mut self, group: crate::config::SecurityGroup) {
        match self
            .config
            .security_groups
            .iter_mut()
            .find(|g| g.id == group.id)
        {
            Some(existing) => *existing = group,
            // Appended: the indices in `port_groups` stay valid.
            None => self.config.security_groups.push(group),
        }
    }

    /// Replaces `port`'s security groups. Tracked flows stay allowed (as on AWS); new flows see the new rules.
    pub fn set_security_groups(
        &mut self,
        port: PortId,
        groups: &[String],
    ) -> Result<(), ConfigError> {
        let key = format!("eni[{port}].security_groups");
        let p = self
            .port_groups
            .get_mut(port)
            .ok_or_else(|| ConfigError::Invalid {
                key: key.clone(),
                problem: "no such port".into(),
            })?;
        let mut ids = Vec::with_capacity(groups.len());
        for (j, g) in groups.iter().enumerate() {
            let i = self
                .config
                .security_groups
                .iter()
                .position(|s| &s.id == g)
                .ok_or_else(|| ConfigError::Invalid {
                    key: format!("{key}[{j}]"),
                    problem: format!("no security_group has id {g:?}"),
                })?;
            ids.push(i);
        }
        *p = ids;
        self.config.enis[port].security_groups = groups.to_vec();
        Ok(())
    }

    fn drop_at(&mut self, port: PortId, reason: DropReason) -> Verdict {
        if let Some(p) = self.ports.get_mut(port) {
            p.counters.drop(reason);
        }
        Verdict::Drop(reason)
    }

    fn route(&self, dst: Ipv4Addr) -> Option<Route<'_>> {
        if let Some(&p) = self.by_ip.get(&dst) {
            return Some(Route::Port(p));
        }
        if self.config.subnets.iter().any(|s| s.gateway == dst) {
            return Some(Route::Gateway);
        }
        if let Some(r) = self.config.remotes.iter().find(|r| r.cidr.contains(dst)) {
            return Some(Route::Remote(r));
        }
        if self.config.vpc.cidr.contains(dst) {
            // Inside the VPC but no ENI or remote has it: not for the uplink either.
            return None;
        }
        self.config.uplink.as_ref().map(|_| Route::Uplink)
    }

    /// The security-group decision for `pkt` crossing `port` in `dir`. Rules are evaluated only for a
    /// packet that no tracked flow explains.
    fn decide(&mut self, port: PortId, pkt: &PacketInfo, dir: Direction, now: Instant) -> Decision {
        let Switch {
            config,
            ports,
            port_groups,
            by_ip,
            ..
        } = self;
        let groups = &port_groups[port];
        // Whether `ip` is an ENI of this card in security group `group` (for `source_group` rules).
        let in_group = |group: &str, ip: Ipv4Addr| -> bool {
            let Some(gi) = config.security_groups.iter().position(|s| s.id == group) else {
                return false;
            };
            by_ip
                .get(&ip)
                .is_some_and(|&p| port_groups[p].contains(&gi))
        };
        let allow = || {
            // An ENI without security groups may send anything (and receives only return traffic).
            (dir == Direction::Outbound && groups.is_empty())
                || groups.iter().any(|&g| {
                    let sg = &config.security_groups[g];
                    let rules = match dir {
                        Direction::Inbound => &sg.ingress,
                        Direction::Outbound => &sg.egress,
                    };
                    secgroup::rules_allow(rules, pkt, dir, &in_group)
                })
        };
        ports[port].conntrack.decide(pkt, dir, now, allow)
    }

    /// The security-group check of an IPv4 packet from `src` to `dst` (ports, if any): a later fragment
    /// passes if its first fragment did; anything else goes through [`Switch::filter`], and a first
    /// fragment that passes is remembered for the rest.
    fn admit(
        &mut self,
        src: Option<PortId>,
        dst: Option<PortId>,
        ip: &packet::Ipv4,
        pkt: &PacketInfo,
        now: Instant,
    ) -> Result<(), (PortId, DropReason)> {
        if ip.frag_offset != 0 {
            if self.fragments.is_allowed(ip, now) {
                return Ok(());
            }
            return Err((src.or(dst).unwrap_or_default(), DropReason::Fragment));
        }
        self.filter(src, dst, pkt, now)?;
        if ip.more_fragments {
            self.fragments.remember(ip, now);
        }
        Ok(())
    }

    /// Checks `pkt` out of `src` (if a port) and into `dst` (if a port); commits both or neither.
    fn filter(
        &mut self,
        src: Option<PortId>,
        dst: Option<PortId>,
        pkt: &PacketInfo,
        now: Instant,
    ) -> Result<(), (PortId, DropReason)> {
        let mut out = None;
        if let Some(s) = src {
            let d = self.decide(s, pkt, Direction::Outbound, now);
            match d {
                Decision::Denied => return Err((s, DropReason::SecurityGroup)),
                Decision::Full => return Err((s, DropReason::ConntrackFull)),
                _ => out = Some((s, d)),
            }
        }
        let mut inn = None;
        if let Some(t) = dst {
            let d = self.decide(t, pkt, Direction::Inbound, now);
            match d {
                Decision::Denied => return Err((t, DropReason::SecurityGroup)),
                Decision::Full => return Err((t, DropReason::ConntrackFull)),
                _ => inn = Some((t, d)),
            }
        }
        if let Some((s, d)) = out {
            self.ports[s]
                .conntrack
                .commit(d, pkt, Direction::Outbound, now);
        }
        if let Some((t, d)) = inn {
            self.ports[t]
                .conntrack
                .commit(d, pkt, Direction::Inbound, now);
        }
        Ok(())
    }

    /// [`Switch::from_port`] on a frame of which only the first `head` bytes are the guest's (the card copied
    /// them; the rest is still in guest memory and may be anything here): `frame` has the frame's whole length,
    /// `head` is at least [`DECISION_HEAD`] or the whole frame. Returns `None`, having changed nothing, for a
    /// frame the card answers itself from its payload (DHCP, anything to a gateway address): call `from_port`
    /// with the whole frame. Any other verdict reads no byte past `head`.
    pub fn from_port_headers(
        &mut self,
        port: PortId,
        header: &VnetHeader,
        frame: &[u8],
        head: usize,
        now: Instant,
    ) -> Option<Verdict> {
        if head < frame.len() && (head < DECISION_HEAD || self.answers_itself(frame)) {
            return None;
        }
        Some(self.from_port(port, header, frame, now))
    }

    /// Whether the switch may answer `frame` itself, building the answer from its payload: DHCP from a client,
    /// or an IPv4 packet to one of the gateways. Headers only.
    fn answers_itself(&self, frame: &[u8]) -> bool {
        let Ok(ip) = packet::ipv4(frame) else {
            return false;
        };
        let dhcp = matches!(
            packet::l4(frame, &ip),
            Ok(L4::Udp {
                src_port: dhcp::CLIENT_PORT,
                dst_port: dhcp::SERVER_PORT,
            })
        );
        dhcp || matches!(self.route(ip.dst), Some(Route::Gateway))
    }

    /// A frame a guest sent on `port` (vnet header split off). See [`Verdict`].
    pub fn from_port(
        &mut self,
        port: PortId,
        header: &VnetHeader,
        frame: &[u8],
        now: Instant,
    ) -> Verdict {
        if port >= self.ports.len() {
            return Verdict::Drop(DropReason::NoSuchPort);
        }
        match self.port_input(port, header, frame, now) {
            Ok(v) => {
                if matches!(
                    v,
                    Verdict::ToPort { .. } | Verdict::ToVtep { .. } | Verdict::ToUplink { .. }
                ) {
                    self.ports[port].counters.forwarded += 1;
                }
                if let Verdict::ToPort { port: to, .. } = v {
                    self.ports[to].counters.delivered += 1;
                }
                v
            }
            Err((at, reason)) => self.drop_at(at, reason),
        }
    }

    fn port_input(
        &mut self,
        port: PortId,
        header: &VnetHeader,
        frame: &[u8],
        now: Instant,
    ) -> Result<Verdict, (PortId, DropReason)> {
        let eni = &self.config.enis[port];
        let (eni_mac, eni_ip, mtu) = (eni.mac, eni.ip, self.ports[port].mtu);
        let subnet = &self.config.subnets[eni.subnet_index];
        let (gateway, subnet_cidr) = (subnet.gateway, subnet.cidr);
        let router_mac = self.config.vpc.router_mac;
        let here = |r| (port, r);

        offload::check_tx(header, frame, mtu).map_err(here)?;
        let eth = packet::eth(frame).map_err(here)?;
        if eth.src != eni_mac {
            return Err(here(DropReason::SpoofedMac));
        }
        match eth.ethertype {
            ETHERTYPE_ARP => {
                let a = arp::parse(frame).map_err(here)?;
                if a.sender_mac != eni_mac {
                    return Err(here(DropReason::SpoofedMac));
                }
                if a.sender_ip != eni_ip && !a.sender_ip.is_unspecified() {
                    return Err(here(DropReason::SpoofedIp));
                }
                if a.op != arp::OP_REQUEST || a.is_gratuitous() {
                    return Err(here(DropReason::ArpIgnored));
                }
                let t = a.target_ip;
                let mac = if t == gateway {
                    Some(router_mac)
                } else if let Some(&p) = self.by_ip.get(&t) {
                    // A peer in the same subnet is answered with its own MAC (L2); elsewhere via the router.
                    (p != port).then(|| {
                        if subnet_cidr.contains(t) {
                            self.config.enis[p].mac
                        } else {
                            router_mac
                        }
                    })
                } else if self.config.remotes.iter().any(|r| r.cidr.contains(t)) {
                    Some(router_mac)
                } else {
                    None
                };
                let mac = mac.ok_or(here(DropReason::ArpIgnored))?;
                self.ports[port].counters.arp_replies += 1;
                Ok(Verdict::Reply {
                    to: Egress::Port(port),
                    frame: arp::reply(&a, mac),
                })
            }
            ETHERTYPE_IPV4 => {
                let ip = packet::ipv4(frame).map_err(here)?;
                if !header.is_gso() && ip.total_len > usize::from(mtu) {
                    return Err(here(DropReason::Oversized));
                }
                let l4 = packet::l4(frame, &ip).map_err(here)?;
                if let L4::Udp {
                    src_port: dhcp::CLIENT_PORT,
                    dst_port: dhcp::SERVER_PORT,
                } = l4
                {
                    if ip.src.is_unspecified() || ip.src == eni_ip {
                        return self.dhcp(port, frame, &ip).map_err(here);
                    }
                }
                if ip.src != eni_ip {
                    return Err(here(DropReason::SpoofedIp));
                }
                if eth.dst.is_multicast()
                    || ip.dst.is_broadcast()
                    || ip.dst.is_multicast()
                    || ip.dst == subnet_cidr.broadcast()
                {
                    return Err(here(DropReason::Broadcast));
                }
                let pkt = PacketInfo::from_ipv4(frame, &ip, &l4);
                match self.route(ip.dst).ok_or(here(DropReason::NoRoute))? {
                    Route::Gateway => {
                        if eth.dst != router_mac {
                            return Err(here(DropReason::NoRoute));
                        }
                        self.admit(Some(port), None, &ip, &pkt, now)?;
                        let reply =
                            icmp_echo_reply(frame, &ip, &l4).ok_or(here(DropReason::NoRoute))?;
                        self.ports[port].counters.icmp_echo_replies += 1;
                        Ok(Verdict::Reply {
                            to: Egress::Port(port),
                            frame: reply,
                        })
                    }
                    Route::Port(to) => {
                        let to_mac = self.config.enis[to].mac;
                        let rewrite = if eth.dst == to_mac {
                            None
                        } else if eth.dst == router_mac {
                            Some(EthRewrite {
                                dst: to_mac,
                                src: router_mac,
                            })
                        } else {
                            return Err(here(DropReason::NoRoute));
                        };
                        self.admit(Some(port), Some(to), &ip, &pkt, now)?;
                        Ok(Verdict::ToPort {
                            port: to,
                            header: *header,
                            frame_offset: 0,
                            rewrite,
                        })
                    }
                    Route::Remote(r) => {
                        if eth.dst != router_mac {
                            return Err(here(DropReason::NoRoute));
                        }
                        let vtep = r.vtep;
                        let next = self.neighbors.get(&ip.dst).copied();
                        self.admit(Some(port), None, &ip, &pkt, now)?;
                        match next {
                            Some(mac) => Ok(Verdict::ToVtep {
                                vtep,
                                vxlan_header: vxlan::header(self.config.vpc.vni),
                                header: *header,
                                frame_offset: 0,
                                rewrite: Some(EthRewrite {
                                    dst: mac,
                                    src: router_mac,
                                }),
                            }),
                            None => {
                                if !self.may_ask(ip.dst, now) {
                                    return Err(here(DropReason::NeighborUnknown));
                                }
                                self.ports[port].counters.drop(DropReason::NeighborUnknown);
                                self.counters.arp_requests_sent += 1;
                                let mut d = vxlan::header(self.config.vpc.vni).to_vec();
                                d.extend_from_slice(&arp::request(router_mac, ip.src, ip.dst));
                                Ok(Verdict::Reply {
                                    to: Egress::Vtep(vtep),
                                    frame: d,
                                })
                            }
                        }
                    }
                    Route::Uplink => {
                        if eth.dst != router_mac {
                            return Err(here(DropReason::NoRoute));
                        }
                        self.admit(Some(port), None, &ip, &pkt, now)?;
                        let dst = self.uplink_mac.unwrap_or(MacAddr::BROADCAST);
                        Ok(Verdict::ToUplink {
                            header: *header,
                            frame_offset: 0,
                            rewrite: Some(EthRewrite {
                                dst,
                                src: router_mac,
                            }),
                        })
                    }
                }
            }
            _ => Err(here(DropReason::Unsupported)),
        }
    }

    fn dhcp(
        &mut self,
        port: PortId,
        frame: &[u8],
        ip: &packet::Ipv4,
    ) -> Result<Verdict, DropReason> {
        let eni = &self.config.enis[port];
        let subnet = &self.config.subnets[eni.subnet_index];
        let lease = dhcp::Lease {
            client_mac: eni.mac,
            yiaddr: eni.ip,
            server: subnet.gateway,
            server_mac: self.config.vpc.router_mac,
            netmask: subnet.cidr.netmask(),
            router: subnet.gateway,
            dns: self.config.vpc.dns,
            lease_secs: self.config.vpc.lease_time,
            mtu: self.ports[port].mtu,
        };
        let payload = frame
            .get(ip.l4_offset() + 8..ip.end())
            .ok_or(DropReason::Truncated)?;
        let (kind, reply) = dhcp::respond(&lease, payload)?;
        let c = &mut self.ports[port].counters;
        match kind {
            dhcp::OFFER => c.dhcp_offers += 1,
            dhcp::ACK => c.dhcp_acks += 1,
            _ => c.dhcp_naks += 1,
        }
        Ok(Verdict::Reply {
            to: Egress::Port(port),
            frame: reply,
        })
    }

    /// A datagram received on the VXLAN socket from `peer` (RFC 7348 header + inner Ethernet frame).
    pub fn from_vxlan(&mut self, datagram: &[u8], peer: SocketAddr, now: Instant) -> Verdict {
        self.counters.vxlan_received += 1;
        match self.vxlan_input(datagram, peer, now) {
            Ok(v) => {
                if let Verdict::ToPort { port, .. } = v {
                    self.ports[port].counters.delivered += 1;
                }
                v
            }
            Err((Some(port), r)) => self.drop_at(port, r),
            Err((None, r)) => {
                self.counters.vxlan_drops.drop(r);
                Verdict::Drop(r)
            }
        }
    }

    fn vxlan_input(
        &mut self,
        datagram: &[u8],
        peer: SocketAddr,
        now: Instant,
    ) -> Result<Verdict, (Option<PortId>, DropReason)> {
        let nowhere = |r| (None, r);
        let inner = vxlan::decap(datagram, self.config.vpc.vni).map_err(nowhere)?;
        let ri = self
            .config
            .remotes
            .iter()
            .position(|r| r.vtep.ip() == peer.ip())
            .ok_or(nowhere(DropReason::UnknownVtep))?;
        let remote = self.config.remotes[ri];
        let router_mac = self.config.vpc.router_mac;
        let mtu = self.config.vpc.mtu;
        let gso = if inner.len() > usize::from(mtu) + ETH_HLEN {
            Some(peer_gso_header(inner, mtu).ok_or(nowhere(DropReason::Oversized))?)
        } else {
            None
        };
        let eth = packet::eth(inner).map_err(nowhere)?;
        if eth.src.is_multicast() {
            return Err(nowhere(DropReason::SpoofedMac));
        }
        match eth.ethertype {
            ETHERTYPE_ARP => {
                let a = arp::parse(inner).map_err(nowhere)?;
                if !remote.cidr.contains(a.sender_ip) || a.sender_mac.is_multicast() {
                    return Err(nowhere(DropReason::SpoofedIp));
                }
                self.learn(a.sender_ip, a.sender_mac);
                if a.op != arp::OP_REQUEST || a.is_gratuitous() {
                    return Err(nowhere(DropReason::ArpIgnored));
                }
                // Local ENIs (and gateways) are behind the card's router, as seen from a remote host.
                // Also the first host of the remote's own block, the conventional gateway a plain Linux host
                // there may route through, unless a host there has been seen using that address.
                let ours = self.by_ip.contains_key(&a.target_ip)
                    || self.config.subnets.iter().any(|s| s.gateway == a.target_ip)
                    || (remote.cidr.nth(1) == Some(a.target_ip)
                        && !self.neighbors.contains_key(&a.target_ip));
                if !ours {
                    return Err(nowhere(DropReason::ArpIgnored));
                }
                let mut d = vxlan::header(self.config.vpc.vni).to_vec();
                d.extend_from_slice(&arp::reply(&a, router_mac));
                Ok(Verdict::Reply {
                    to: Egress::Vtep(remote.vtep),
                    frame: d,
                })
            }
            ETHERTYPE_IPV4 => {
                let ip = packet::ipv4(inner).map_err(nowhere)?;
                if !remote.cidr.contains(ip.src) {
                    return Err(nowhere(DropReason::SpoofedIp));
                }
                self.learn(ip.src, eth.src);
                let to = *self
                    .by_ip
                    .get(&ip.dst)
                    .ok_or(nowhere(DropReason::NoRoute))?;
                let to_mac = self.config.enis[to].mac;
                if eth.dst != router_mac && eth.dst != to_mac {
                    return Err((Some(to), DropReason::NoRoute));
                }
                let l4 = packet::l4(inner, &ip).map_err(|r| (Some(to), r))?;
                let pkt = PacketInfo::from_ipv4(inner, &ip, &l4);
                self.admit(None, Some(to), &ip, &pkt, now)
                    .map_err(|(p, r)| (Some(p), r))?;
                Ok(Verdict::ToPort {
                    port: to,
                    header: gso
                        .or_else(|| offload::partial_checksum_header(inner))
                        .unwrap_or_default(),
                    frame_offset: vxlan::HEADER_LEN,
                    rewrite: Some(EthRewrite {
                        dst: to_mac,
                        src: router_mac,
                    }),
                })
            }
            _ => Err(nowhere(DropReason::Unsupported)),
        }
    }

    /// Whether the card may send an ARP request for `ip` now: at most one per address per
    /// [`ARP_RETRY`], so a guest blasting at an unresolved address does not turn into an ARP flood.
    fn may_ask(&mut self, ip: Ipv4Addr, now: Instant) -> bool {
        if self
            .arp_asked
            .get(&ip)
            .is_some_and(|&t| now < t + ARP_RETRY)
        {
            return false;
        }
        if self.arp_asked.len() >= MAX_NEIGHBORS {
            // Forget old questions at most once per ARP_RETRY (each pass scans the table).
            if self.arp_forgotten_at.is_some_and(|t| now < t + ARP_RETRY) {
                return false;
            }
            self.arp_forgotten_at = Some(now);
            self.arp_asked.retain(|_, t| now < *t + ARP_RETRY);
            if self.arp_asked.len() >= MAX_NEIGHBORS {
                return false;
            }
        }
        self.arp_asked.insert(ip, now);
        true
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        if mac.is_multicast() || mac == MacAddr::ZERO {
            return;
        }
        if self.neighbors.len() < MAX_NEIGHBORS || self.neighbors.contains_key(&ip) {
            self.neighbors.insert(ip, mac);
        }
    }

    /// The MAC learned for a host behind a remote, if any.
    pub fn neighbor(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.neighbors.get(&ip).copied()
    }

    /// A frame from the TAP uplink (vnet header included by IFF_VNET_HDR, split off by the caller).
    pub fn from_uplink(&mut self, header: &VnetHeader, frame: &[u8], now: Instant) -> Verdict {
        self.counters.uplink_received += 1;
        match self.uplink_input(header, frame, now) {
            Ok(v) => {
                if let Verdict::ToPort { port, .. } = v {
                    self.ports[port].counters.delivered += 1;
                }
                v
            }
            Err((Some(port), r)) => self.drop_at(port, r),
            Err((None, r)) => {
                self.counters.uplink_drops.drop(r);
                Verdict::Drop(r)
            }
        }
    }

    fn uplink_input(
        &mut self,
        header: &VnetHeader,
        frame: &[u8],
        now: Instant,
    ) -> Result<Verdict, (Option<PortId>, DropReason)> {
        let nowhere = |r| (None, r);
        if self.config.uplink.is_none() {
            return Err(nowhere(DropReason::NoRoute));
        }
        // A tap with IFF_VNET_HDR marks checksums the host verified with DATA_VALID (tun_put_user); that is
        // the only difference from a driver's header, and it carries no meaning onward.
        let header = &VnetHeader {
            flags: header.flags & !vnet::F_DATA_VALID,
            ..*header
        };
        offload::check_tx(header, frame, self.config.vpc.mtu).map_err(nowhere)?;
        let eth = packet::eth(frame).map_err(nowhere)?;
        if eth.src.is_multicast() {
            return Err(nowhere(DropReason::SpoofedMac));
        }
        let router_mac = self.config.vpc.router_mac;
        match eth.ethertype {
            ETHERTYPE_ARP => {
                let a: Arp = arp::parse(frame).map_err(nowhere)?;
                if self.config.vpc.cidr.contains(a.sender_ip) {
                    return Err(nowhere(DropReason::SpoofedIp));
                }
                if self
                    .config
                    .uplink
                    .as_ref()
                    .is_some_and(|u| u.peer_mac.is_none())
                {
                    self.uplink_mac = Some(a.sender_mac);
                }
                if a.op != arp::OP_REQUEST
                    || a.is_gratuitous()
                    || !self.by_ip.contains_key(&a.target_ip)
                {
                    return Err(nowhere(DropReason::ArpIgnored));
                }
                Ok(Verdict::Reply {
                    to: Egress::Uplink,
                    frame: arp::reply(&a, router_mac),
                })
            }
            ETHERTYPE_IPV4 => {
                let ip = packet::ipv4(frame).map_err(nowhere)?;
                if self.config.vpc.cidr.contains(ip.src) {
                    return Err(nowhere(DropReason::SpoofedIp));
                }
                let to = *self
                    .by_ip
                    .get(&ip.dst)
                    .ok_or(nowhere(DropReason::NoRoute))?;
                if eth.dst != router_mac && !eth.dst.is_broadcast() {
                    return Err((Some(to), DropReason::NoRoute));
                }
                if self
                    .config
                    .uplink
                    .as_ref()
                    .is_some_and(|u| u.peer_mac.is_none())
                {
                    self.uplink_mac = Some(eth.src);
                }
                let l4 = packet::l4(frame, &ip).map_err(|r| (Some(to), r))?;
                let pkt = PacketInfo::from_ipv4(frame, &ip, &l4);
                self.admit(None, Some(to), &ip, &pkt, now)
                    .map_err(|(p, r)| (Some(p), r))?;
                let to_mac = self.config.enis[to].mac;
                Ok(Verdict::ToPort {
                    port: to,
                    header: *header,
                    frame_offset: 0,
                    rewrite: Some(EthRewrite {
                        dst: to_mac,
                        src: router_mac,
                    }),
                })
            }
            _ => Err(nowhere(DropReason::Unsupported)),
        }
    }
}

/// The vnet header for a TCP/IPv4 frame larger than the MTU from a VXLAN peer. Linux's vxlan device does
/// TSO, and a tunnel GSO packet reaches a plain UDP socket unsegmented (the kernel segments only UDP_L4 GSO
/// there), so a datagram may carry an inner TCP frame of up to 64 KiB with a partial checksum. It is
/// delivered as the GSO frame it is: MSS = MTU less the IP and TCP headers, checksum partial at the TCP
/// field. `None` (oversized) for anything else.
fn peer_gso_header(inner: &[u8], mtu: u16) -> Option<VnetHeader> {
    if inner.len() > offload::MAX_GSO_FRAME {
        return None;
    }
    let l = offload::tcp_layout(inner).ok()?;
    if l.ipv6 {
        return None;
    }
    let gso_size = usize::from(mtu)
        .checked_sub(l.l3_len + l.tcp_len)
        .filter(|s| *s > 0)?;
    Some(VnetHeader {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: vnet::GSO_TCPV4,
        hdr_len: u16::try_from(l.headers_len()).ok()?,
        gso_size: u16::try_from(gso_size).ok()?,
        csum_start: u16::try_from(l.l4_offset).ok()?,
        csum_offset: 16,
        num_buffers: 0,
    })
}

/// The gateway's answer to an ICMP echo request: the same packet with addresses swapped (Ethernet and IP),
/// type 0 and the ICMP checksum updated. `None` if it is not an echo request.
fn icmp_echo_reply(frame: &[u8], ip: &packet::Ipv4, l4: &L4) -> Option<Vec<u8>> {
    if ip.proto != PROTO_ICMP
        || !matches!(
            l4,
            L4::Icmp {
                kind: 8,
                code: 0,
                ..
            }
        )
        || ip.is_fragment()
    {
        return None;
    }
    let mut r = frame.get(..ip.end())?.to_vec();
    let (dst, src) = (r[0..6].to_vec(), r[6..12].to_vec());
    r[0..6].copy_from_slice(&src);
    r[6..12].copy_from_slice(&dst);
    let l3 = ETH_HLEN;
    r[l3 + 8] = 64;
    r[l3 + 12..l3 + 16].copy_from_slice(&ip.dst.octets());
    r[l3 + 16..l3 + 20].copy_from_slice(&ip.src.octets());
    packet::set_ipv4_checksum(&mut r[l3..l3 + ip.header_len]);
    let icmp = &mut r[ip.l4_offset()..ip.end()];
    icmp[0] = 0;
    icmp[2] = 0;
    icmp[3] = 0;
    let c = packet::fold(packet::sum16(icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(r)
}

#[cfg(test)]
#[path = "switch_tests.rs"]
mod tests;
