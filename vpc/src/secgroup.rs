//! Stateful security groups: rules plus a bounded connection-tracking table per ENI, as an AWS security
//! group behaves. A packet leaving an ENI is allowed if it belongs to a tracked flow or an egress rule
//! allows it; a packet arriving is allowed if it belongs to a tracked flow (return traffic) or an ingress
//! rule allows it; either way a newly allowed flow is tracked. ICMP errors (destination unreachable, time
//! exceeded, parameter problem) that quote a tracked flow are allowed as related traffic. When the table is
//! full (after expired entries are swept), a new flow is dropped and counted as
//! `conntrack_allowance_exceeded`, as ENA counts it.
//!
//! Time comes from the caller's `now`; nothing here reads a clock.
use crate::config::{Proto, Rule, RulePeer};
use crate::hash::FastMap;
use crate::packet::{self, L4, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Idle timeout of an established TCP flow (AWS: 432000 s, five days).
pub const TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(432_000);
/// Idle timeout of a TCP flow not yet answered.
pub const TCP_OPENING_TIMEOUT: Duration = Duration::from_secs(120);
/// Timeout after a FIN or RST: the flow lingers briefly for the last segments.
pub const TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle timeout of a UDP flow.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle timeout of an ICMP echo exchange and of other protocols.
pub const ICMP_TIMEOUT: Duration = Duration::from_secs(30);

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Which way a packet crosses the ENI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the ENI's guest.
    Outbound,
    /// To the ENI's guest.
    Inbound,
}

/// A flow as seen from the ENI: the ENI's own address is implied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    pub proto: u8,
    pub remote: Ipv4Addr,
    /// The ENI's port (TCP/UDP) or the ICMP echo identifier.
    pub local_port: u16,
    /// The peer's port (TCP/UDP), 0 for ICMP.
    pub remote_port: u16,
}

impl std::hash::Hash for FlowKey {
    /// One 128-bit write: the table's hash is per word, and this is the forwarding path's hottest lookup.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(
            u128::from(u32::from(self.remote))
                | u128::from(self.local_port) << 32
                | u128::from(self.remote_port) << 48
                | u128::from(self.proto) << 64,
        );
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    origin: Direction,
    answered: bool,
    closing: bool,
    expires: Instant,
}

/// What a packet's transport header says, as far as tracking is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    pub icmp_kind: Option<u8>,
    /// For an ICMP error: the flow quoted in it, as (proto, src, dst, src_port, dst_port) of the original.
    pub quoted: Option<(u8, Ipv4Addr, Ipv4Addr, u16, u16)>,
}

impl PacketInfo {
    /// Reads the fields from a parsed IPv4 packet. ICMP echo uses the identifier as both ports.
    pub fn from_ipv4(frame: &[u8], ip: &packet::Ipv4, l4: &L4) -> PacketInfo {
        let mut info = PacketInfo {
            proto: ip.proto,
            src: ip.src,
            dst: ip.dst,
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            icmp_kind: None,
            quoted: None,
        };
        match *l4 {
            L4::Tcp {
                src_port,
                dst_port,
                flags,
                ..
            } => {
                info.src_port = src_port;
                info.dst_port = dst_port;
                info.tcp_flags = flags;
            }
            L4::Udp { src_port, dst_port } => {
                info.src_port = src_port;
                info.dst_port = dst_port;
            }
            L4::Icmp { kind, ident, .. } => {
                info.icmp_kind = Some(kind);
                if matches!(kind, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) {
                    info.src_port = ident;
                    info.dst_port = ident;
                } else if matches!(
                    kind,
                    ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
                ) {
                    info.quoted =
                        quoted_flow(frame.get(ip.l4_offset() + 8..ip.end()).unwrap_or(&[]));
                }
            }
            L4::Other { .. } => {}
        }
        info
    }

    fn is_icmp_error(&self) -> bool {
        self.quoted.is_some()
    }
}

/// The flow an ICMP error quotes: the original IPv4 header and at least 8 bytes of its transport header.
fn quoted_flow(q: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, u16, u16)> {
    if q.len() < 20 || q[0] >> 4 != 4 {
        return None;
    }
    let hl = usize::from(q[0] & 0x0f) * 4;
    if hl < 20 {
        return None;
    }
    let proto = q[9];
    let src = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
    let dst = Ipv4Addr::new(q[16], q[17], q[18], q[19]);
    let t = q.get(hl..hl.checked_add(8)?)?;
    let (sp, dp) = match proto {
        PROTO_TCP | PROTO_UDP => (packet::be16(t, 0)?, packet::be16(t, 2)?),
        PROTO_ICMP => {
            let ident = packet::be16(t, 4)?;
            (ident, ident)
        }
        _ => (0, 0),
    };
    Some((proto, src, dst, sp, dp))
}

/// The key of `pkt` from the ENI's side, given which way it crosses.
pub fn key_of(pkt: &PacketInfo, dir: Direction) -> FlowKey {
    let icmp = pkt.proto == PROTO_ICMP;
    match dir {
        Direction::Outbound => FlowKey {
            proto: pkt.proto,
            remote: pkt.dst,
            local_port: pkt.src_port,
            remote_port: if icmp { 0 } else { pkt.dst_port },
        },
        Direction::Inbound => FlowKey {
            proto: pkt.proto,
            remote: pkt.src,
            local_port: pkt.dst_port,
            remote_port: if icmp { 0 } else { pkt.src_port },
        },
    }
}

/// The key of the flow an ICMP error quotes, from the side of the ENI the error crosses in `dir`.
/// An error arriving (Inbound) quotes a packet the ENI sent; one leaving quotes a packet it received.
fn quoted_key(quoted: (u8, Ipv4Addr, Ipv4Addr, u16, u16), dir: Direction) -> FlowKey {
    let (proto, src, dst, sp, dp) = quoted;
    let orig = PacketInfo {
        proto,
        src,
        dst,
        src_port: sp,
        dst_port: dp,
        tcp_flags: 0,
        icmp_kind: None,
        quoted: None,
    };
    let orig_dir = match dir {
        Direction::Inbound => Direction::Outbound,
        Direction::Outbound => Direction::Inbound,
    };
    key_of(&orig, orig_dir)
}

/// The decision for one packet on one ENI, before it is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Part of (or related to) a tracked flow.
    Tracked(FlowKey),
    /// A new flow the rules allow; tracking it needs a free entry (checked).
    New(FlowKey),
    /// A packet the rules allow but that is not tracked (an ICMP error quoting no known flow).
    Untracked,
    Denied,
    /// Allowed by the rules, but the table is full.
    Full,
}

/// The connection-tracking table of one ENI.
#[derive(Debug)]
pub struct Conntrack {
    flows: FastMap<FlowKey, Entry>,
    capacity: usize,
    /// When the full table was last swept: at most one O(n) sweep per [`SWEEP_INTERVAL`], so a guest
    /// opening flows against a full table can't make every packet cost a scan of it.
    swept_at: Option<Instant>,
    sweeps: u64,
}

/// Least time between two sweeps of a full table.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl Conntrack {
    pub fn new(capacity: usize) -> Conntrack {
        // Pre-size modestly: a big `capacity` must not cost memory until flows exist.
        Conntrack {
            flows: FastMap::with_capacity_and_hasher(capacity.min(1024), Default::default()),
            capacity,
            swept_at: None,
            sweeps: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether `key` is tracked and not expired at `now`.
    pub fn is_tracked(&self, key: &FlowKey, now: Instant) -> bool {
        self.flows.get(key).is_some_and(|e| e.expires > now)
    }

    /// Decides `pkt` crossing in `dir`; `rules_allow` evaluates the rules (called only for untracked packets).
    pub fn decide(
        &mut self,
        pkt: &PacketInfo,
        dir: Direction,
        now: Instant,
        rules_allow: impl FnOnce() -> bool,
    ) -> Decision {
        if let Some(q) = pkt.quoted {
            let key = quoted_key(q, dir);
            if self.is_tracked(&key, now) {
                return Decision::Tracked(key);
            }
            return if rules_allow() {
                Decision::Untracked
            } else {
                Decision::Denied
            };
        }
        let key = key_of(pkt, dir);
        if self.is_tracked(&key, now) {
            return Decision::Tracked(key);
        }
        if !rules_allow() {
            return Decision::Denied;
        }
        if pkt.proto == PROTO_ICMP && !matches!(pkt.icmp_kind, Some(ICMP_ECHO_REQUEST)) {
            // Only echo requests open an ICMP flow; other ICMP the rules allow passes untracked.
            return Decision::Untracked;
        }
        if self.flows.len() >= self.capacity && !self.flows.contains_key(&key) {
            if self.swept_at.is_none_or(|t| now >= t + SWEEP_INTERVAL) {
                self.sweep(now);
                self.swept_at = Some(now);
            }
            if self.flows.len() >= self.capacity {
                return Decision::Full;
            }
        }
        Decision::New(key)
    }

    /// Records the packet a [`Decision`] allowed: refreshes or creates its flow.
    pub fn commit(&mut self, decision: Decision, pkt: &PacketInfo, dir: Direction, now: Instant) {
        let key = match decision {
            Decision::Tracked(k) if !pkt.is_icmp_error() => k,
            Decision::New(k) => k,
            _ => return,
        };
        let entry = self.flows.entry(key).or_insert(Entry {
            origin: dir,
            answered: false,
            closing: false,
            expires: now,
        });
        if entry.expires <= now && !matches!(decision, Decision::New(_)) {
            return;
        }
        if entry.expires <= now {
            // A stale entry for the same key: start over as a new flow.
            *entry = Entry {
                origin: dir,
                answered: false,
                closing: false,
                expires: now,
            };
        }
        if dir != entry.origin {
            entry.answered = true;
        }
        if pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            entry.closing = true;
        }
        let timeout = match pkt.proto {
            PROTO_TCP if entry.closing => TCP_CLOSING_TIMEOUT,
            PROTO_TCP if entry.answered && pkt.tcp_flags & TCP_ACK != 0 => TCP_ESTABLISHED_TIMEOUT,
            PROTO_TCP => TCP_OPENING_TIMEOUT,
            PROTO_UDP => UDP_TIMEOUT,
            _ => ICMP_TIMEOUT,
        };
        entry.expires = now + timeout;
    }

    /// Drops every flow expired at `now`.
    pub fn sweep(&mut self, now: Instant) {
        self.sweeps += 1;
        self.flows.retain(|_, e| e.expires > now);
    }

    /// How many times the table was swept (a full table is swept at most once per [`SWEEP_INTERVAL`]).
    pub fn sweeps(&self) -> u64 {
        self.sweeps
    }
}

/// Whether `rules` allow `pkt` crossing in `dir`. `in_group(g, ip)` says whether `ip` is an ENI that is a
/// member of security group `g` (for `source_group` rules).
pub fn rules_allow(
    rules: &[Rule],
    pkt: &PacketInfo,
    dir: Direction,
    in_group: &dyn Fn(&str, Ipv4Addr) -> bool,
) -> bool {
    let (peer, port) = match dir {
        Direction::Outbound => (pkt.dst, pkt.dst_port),
        Direction::Inbound => (pkt.src, pkt.dst_port),
    };
    rules.iter().any(|r| {
        let proto_ok = match r.proto {
            Proto::All => true,
            Proto::Tcp => pkt.proto == PROTO_TCP,
            Proto::Udp => pkt.proto == PROTO_UDP,
            Proto::Icmp => pkt.proto == PROTO_ICMP,
        };
        let port_ok = r.ports.is_none_or(|p| p.contains(port));
        let peer_ok = match &r.peer {
            RulePeer::Cidr(c) => c.contains(peer),
            RulePeer::Group(g) => in_group(g, peer),
        };
        proto_ok && port_ok && peer_ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRange;
    use crate::packet::TCP_SYN;

    fn tcp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, flags: u8) -> PacketInfo {
        PacketInfo {
            proto: PROTO_TCP,
            src: src.into(),
            dst: dst.into(),
            src_port: sp,
            dst_port: dp,
            tcp_flags: flags,
            icmp_kind: None,
            quoted: None,
        }
    }

    const A: [u8; 4] = [10, 0, 1, 10];
    const B: [u8; 4] = [10, 0, 1, 11];

    fn allow_5201() -> Vec<Rule> {
        vec![Rule {
            proto: Proto::Tcp,
            ports: Some(PortRange {
                first: 5201,
                last: 5201,
            }),
            peer: RulePeer::Cidr("10.0.0.0/16".parse().unwrap()),
        }]
    }

    fn no_groups(_: &str, _: Ipv4Addr) -> bool {
        false
    }

    #[test]
    fn inbound_needs_a_rule_and_return_traffic_is_tracked() {
        let now = Instant::now();
        let rules = allow_5201();
        let mut ct = Conntrack::new(4);
        // B's view: inbound SYN to 5201 is allowed and tracked.
        let syn = tcp(A, 40000, B, 5201, TCP_SYN);
        let d = ct.decide(&syn, Direction::Inbound, now, || {
            rules_allow(&rules, &syn, Direction::Inbound, &no_groups)
        });
        assert!(matches!(d, Decision::New(_)));
        ct.commit(d, &syn, Direction::Inbound, now);
        // The SYN-ACK going out is tracked even though no egress rule is consulted.
        let synack = tcp(B, 5201, A, 40000, TCP_SYN | TCP_ACK);
        let d = ct.decide(&synack, Direction::Outbound, now, || false);
        assert!(matches!(d, Decision::Tracked(_)));
        // Another port is denied inbound.
        let other = tcp(A, 40001, B, 22, TCP_SYN);
        let d = ct.decide(&other, Direction::Inbound, now, || {
            rules_allow(&rules, &other, Direction::Inbound, &no_groups)
        });
        assert_eq!(d, Decision::Denied);
    }

    #[test]
    fn full_table_refuses_new_flows_until_expiry() {
        let now = Instant::now();
        let mut ct = Conntrack::new(2);
        for port in [1000, 1001] {
            let p = tcp(A, port, B, 80, TCP_SYN);
            let d = ct.decide(&p, Direction::Outbound, now, || true);
            ct.commit(d, &p, Direction::Outbound, now);
        }
        assert_eq!(ct.len(), 2);
        let p = tcp(A, 1002, B, 80, TCP_SYN);
        assert_eq!(
            ct.decide(&p, Direction::Outbound, now, || true),
            Decision::Full
        );
        // A tracked flow still passes when the table is full.
        let known = tcp(B, 80, A, 1000, TCP_SYN | TCP_ACK);
        assert!(matches!(
            ct.decide(&known, Direction::Inbound, now, || false),
            Decision::Tracked(_)
        ));
        // After the opening timeout the old flows expire and the new one gets in.
        let later = now + TCP_OPENING_TIMEOUT + Duration::from_secs(1);
        assert!(matches!(
            ct.decide(&p, Direction::Outbound, later, || true),
            Decision::New(_)
        ));
    }

    proptest::proptest! {
        /// Whatever the traffic, the table never holds more flows than its capacity, and a flow that was
        /// just committed is tracked.
        #[test]
        fn the_table_stays_within_its_capacity(
            capacity in 1usize..16,
            packets in proptest::collection::vec((0u16..40, proptest::bool::ANY, 0u8..0x20, 0u64..400), 1..300),
        ) {
            let start = Instant::now();
            let mut ct = Conntrack::new(capacity);
            for (port, inbound, flags, secs) in packets {
                let now = start + Duration::from_secs(secs);
                let (p, dir) = if inbound {
                    (tcp(B, 80, A, port, flags), Direction::Inbound)
                } else {
                    (tcp(A, port, B, 80, flags), Direction::Outbound)
                };
                let d = ct.decide(&p, dir, now, || true);
                ct.commit(d, &p, dir, now);
                proptest::prop_assert!(ct.len() <= capacity);
                if matches!(d, Decision::New(_) | Decision::Tracked(_)) {
                    proptest::prop_assert!(ct.is_tracked(&key_of(&p, dir), now));
                }
            }
        }
    }

    #[test]
    fn icmp_errors_quoting_a_tracked_flow_are_related() {
        let now = Instant::now();
        let mut ct = Conntrack::new(8);
        let udp = PacketInfo {
            proto: PROTO_UDP,
            ..tcp(A, 5000, B, 53, 0)
        };
        let d = ct.decide(&udp, Direction::Outbound, now, || true);
        ct.commit(d, &udp, Direction::Outbound, now);
        let err = PacketInfo {
            proto: PROTO_ICMP,
            src: B.into(),
            dst: A.into(),
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            icmp_kind: Some(ICMP_DEST_UNREACHABLE),
            quoted: Some((PROTO_UDP, A.into(), B.into(), 5000, 53)),
        };
        assert!(matches!(
            ct.decide(&err, Direction::Inbound, now, || false),
            Decision::Tracked(_)
        ));
        let unrelated = PacketInfo {
            quoted: Some((PROTO_UDP, A.into(), B.into(), 5001, 53)),
            ..err
        };
        assert_eq!(
            ct.decide(&unrelated, Direction::Inbound, now, || false),
            Decision::Denied
        );
    }
}
