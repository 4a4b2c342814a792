//! The networking card's configuration: the TOML of issue 4 item 1, parsed with serde and the `toml` crate,
//! then validated into typed values. Every error names the key (`eni[1] (eni-0b2).ip`) and the problem.
//! Keys are documented in the top-level README ("The VPC config file").
use crate::addr::{Ipv4Cidr, MacAddr};
use hw_model::token_bucket::{BucketConfig, RateLimiter, RateLimiterConfig};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Default MTU of every ENI (`[vpc] mtu`), as on an AWS ENI without jumbo frames.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest and largest `[vpc] mtu`: IPv4's minimum and AWS's jumbo frame size.
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 68..=9001;
/// Default DHCP lease (`[vpc] lease_time`), seconds.
pub const DEFAULT_LEASE_SECS: u32 = 3600;
/// Default per-ENI connection-tracking capacity (`eni.conntrack_entries`).
pub const DEFAULT_CONNTRACK_ENTRIES: usize = 65536;
/// Upper bound on `eni.conntrack_entries` (memory stays bounded whatever the file says).
pub const MAX_CONNTRACK_ENTRIES: usize = 1 << 22;
/// Upper bound on `eni.queue_pairs`: vhost-user-backend maps a port's virtqueues to threads with a u64 mask,
/// so a port has at most 64 virtqueues = 32 queue pairs.
pub const MAX_QUEUE_PAIRS: u16 = 32;
/// The card's virtual router MAC unless `[vpc] router_mac` says otherwise: the gateway of every subnet,
/// and the MAC answered for addresses behind `[[remote]]`s and the uplink.
pub const DEFAULT_ROUTER_MAC: MacAddr = MacAddr([0x02, 0xca, 0x5d, 0x00, 0x00, 0x01]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// TOML syntax, an unknown key, a missing key or a value of the wrong type (toml's message names it).
    #[error("{0}")]
    Toml(String),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VpcConfig {
    pub vpc: VpcSection,
    pub subnets: Vec<Subnet>,
    pub security_groups: Vec<SecurityGroup>,
    pub enis: Vec<EniConfig>,
    pub remotes: Vec<Remote>,
    pub vxlan: Option<VxlanSection>,
    pub uplink: Option<UplinkSection>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VpcSection {
    pub cidr: Ipv4Cidr,
    /// VXLAN network identifier, < 2^24.
    pub vni: u32,
    /// MTU of every ENI: offered by DHCP (option 26) and the virtio-net MTU feature; frames above it are dropped.
    pub mtu: u16,
    /// The card's virtual router MAC (gateway of every subnet).
    pub router_mac: MacAddr,
    /// DNS server offered by DHCP (option 6); none unless configured.
    pub dns: Option<Ipv4Addr>,
    /// DHCP lease, seconds.
    pub lease_time: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subnet {
    pub id: String,
    pub cidr: Ipv4Cidr,
    pub gateway: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SecurityGroup {
    pub id: String,
    pub ingress: Vec<Rule>,
    /// Outbound rules; a group without an `egress` key allows all outbound traffic.
    pub egress: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// Whom a rule admits: an address block, or the ENIs (of this card) that are members of a security group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulePeer {
    Cidr(Ipv4Cidr),
    Group(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub proto: Proto,
    /// Destination ports (TCP/UDP only); `None` is every port.
    pub ports: Option<PortRange>,
    pub peer: RulePeer,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EniConfig {
    pub id: String,
    pub socket: PathBuf,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub subnet: String,
    /// Index of `subnet` in `VpcConfig::subnets`.
    pub subnet_index: usize,
    pub security_groups: Vec<String>,
    /// Bandwidth (bytes) and packets-per-second (ops) token buckets, Firecracker's shape; validated.
    pub allowance: Option<RateLimiterConfig>,
    pub queue_pairs: u16,
    /// Equal to `[vpc] mtu`.
    pub mtu: u16,
    pub conntrack_entries: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remote {
    pub cidr: Ipv4Cidr,
    pub vtep: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VxlanSection {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UplinkSection {
    /// Host TAP interface name.
    pub tap: String,
    /// MAC to address frames sent up the uplink to; learned from the uplink's traffic when absent.
    pub peer_mac: Option<MacAddr>,
}

// ---- the file as written -------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    vpc: RawVpc,
    #[serde(default)]
    subnet: Vec<RawSubnet>,
    #[serde(default)]
    security_group: Vec<RawSecurityGroup>,
    #[serde(default)]
    eni: Vec<RawEni>,
    #[serde(default)]
    remote: Vec<RawRemote>,
    vxlan: Option<RawVxlan>,
    uplink: Option<RawUplink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVpc {
    cidr: String,
    vni: u64,
    mtu: Option<u64>,
    router_mac: Option<String>,
    dns: Option<String>,
    lease_time: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubnet {
    id: String,
    cidr: String,
    gateway: Option<String>,
}

/// A security group as written: a `[[security_group]]` table, or the same keys in JSON (the networking card's
/// agent takes one with `security_group_put`). Validated by [`VpcConfig::check_security_group`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurityGroup {
    id: String,
    #[serde(default)]
    ingress: Vec<RawRule>,
    egress: Option<Vec<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    proto: String,
    ports: Option<String>,
    cidr: Option<String>,
    source_group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEni {
    id: String,
    socket: PathBuf,
    mac: String,
    ip: String,
    subnet: String,
    #[serde(default)]
    security_groups: Vec<String>,
    allowance: Option<RawAllowance>,
    queue_pairs: Option<u64>,
    conntrack_entries: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowance {
    bandwidth: Option<RawBucket>,
    ops: Option<RawBucket>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucket {
    size: u64,
    #[serde(default)]
    one_time_burst: u64,
    refill_time: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    cidr: String,
    vtep: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVxlan {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    tap: String,
    peer_mac: Option<String>,
}

// ---- validation -------------------------------------------------------------------------------------------------

fn cidr(key: &str, text: &str) -> Result<Ipv4Cidr, ConfigError> {
    text.parse().map_err(|e| invalid(key, format!("{e}")))
}

fn ipv4(key: &str, text: &str) -> Result<Ipv4Addr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(key, format!("{text:?} is not an IPv4 address")))
}

fn unicast_local_mac(key: &str, text: &str) -> Result<MacAddr, ConfigError> {
    let mac: MacAddr = text.parse().map_err(|e| invalid(key, format!("{e}")))?;
    if mac.is_multicast() {
        return Err(invalid(
            key,
            format!("{mac} is a multicast address, not a unicast one"),
        ));
    }
    if !mac.is_locally_administered() {
        return Err(invalid(
            key,
            format!("{mac} is not locally administered (set bit 1 of the first octet, e.g. 02:…)"),
        ));
    }
    Ok(mac)
}

fn socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(key, format!("{text:?} is not an address:port")))
}

fn identifier(key: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            key,
            format!("{id:?} is not an id (1 to 64 letters, digits, '-' or '_')"),
        ));
    }
    Ok(())
}

/// Parses `"5201"` or `"8000-8100"`.
pub fn parse_ports(text: &str) -> Option<PortRange> {
    let port = |s: &str| -> Option<u16> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (port(a.trim())?, port(b.trim())?),
        None => {
            let p = port(text.trim())?;
            (p, p)
        }
    };
    (first <= last).then_some(PortRange { first, last })
}

fn rule(key: &str, raw: &RawRule, groups: &HashSet<&str>) -> Result<Rule, ConfigError> {
    let proto = match raw.proto.as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        "all" | "-1" => Proto::All,
        other => {
            return Err(invalid(
                format!("{key}.proto"),
                format!("{other:?} is not one of \"tcp\", \"udp\", \"icmp\", \"all\""),
            ))
        }
    };
    let ports = match &raw.ports {
        None => None,
        Some(text) => {
            if !matches!(proto, Proto::Tcp | Proto::Udp) {
                return Err(invalid(
                    format!("{key}.ports"),
                    format!("ports apply to tcp and udp rules only, not {:?}", raw.proto),
                ));
            }
            Some(parse_ports(text).ok_or_else(|| {
                invalid(
                    format!("{key}.ports"),
                    format!(
                        "{text:?} is not a port or range (\"5201\" or \"8000-8100\", 0..=65535)"
                    ),
                )
            })?)
        }
    };
    let peer = match (&raw.cidr, &raw.source_group) {
        (Some(c), None) => RulePeer::Cidr(cidr(&format!("{key}.cidr"), c)?),
        (None, Some(g)) => {
            if !groups.contains(g.as_str()) {
                return Err(invalid(
                    format!("{key}.source_group"),
                    format!("no security_group has id {g:?}"),
                ));
            }
            RulePeer::Group(g.clone())
        }
        (Some(_), Some(_)) => {
            return Err(invalid(key, "give either cidr or source_group, not both"));
        }
        (None, None) => return Err(invalid(key, "a rule needs cidr or source_group")),
    };
    Ok(Rule { proto, ports, peer })
}

fn bucket(raw: &Option<RawBucket>) -> Option<BucketConfig> {
    raw.as_ref().map(|b| BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time: b.refill_time,
    })
}

impl VpcConfig {
    /// Parses and validates the TOML text.
    pub fn parse(text: &str) -> Result<VpcConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Toml(e.to_string().trim_end().to_owned()))?;
        Self::validate(raw)
    }

    /// Reads and parses a file; the error names the file when it can't be read.
    pub fn load(path: &std::path::Path) -> Result<VpcConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(path.display().to_string(), format!("cannot read: {e}")))?;
        Self::parse(&text)
    }

    fn validate(raw: RawConfig) -> Result<VpcConfig, ConfigError> {
        // [vpc]
        let vpc_cidr = cidr("vpc.cidr", &raw.vpc.cidr)?;
        if raw.vpc.vni >= 1 << 24 {
            return Err(invalid(
                "vpc.vni",
                format!(
                    "{} does not fit in 24 bits (must be < 16777216)",
                    raw.vpc.vni
                ),
            ));
        }
        let mtu = match raw.vpc.mtu {
            None => DEFAULT_MTU,
            Some(m) => u16::try_from(m)
                .ok()
                .filter(|m| MTU_RANGE.contains(m))
                .ok_or_else(|| {
                    invalid(
                        "vpc.mtu",
                        format!("{m} is outside {}..={}", MTU_RANGE.start(), MTU_RANGE.end()),
                    )
                })?,
        };
        let router_mac = match &raw.vpc.router_mac {
            None => DEFAULT_ROUTER_MAC,
            Some(m) => unicast_local_mac("vpc.router_mac", m)?,
        };
        let dns = raw
            .vpc
            .dns
            .as_deref()
            .map(|d| ipv4("vpc.dns", d))
            .transpose()?;
        let lease_time = match raw.vpc.lease_time {
            None => DEFAULT_LEASE_SECS,
            Some(t) => u32::try_from(t)
                .ok()
                .filter(|t| (60..u32::MAX).contains(t))
                .ok_or_else(|| {
                    invalid(
                        "vpc.lease_time",
                        format!("{t} seconds is outside 60..4294967295"),
                    )
                })?,
        };
        let vpc = VpcSection {
            cidr: vpc_cidr,
            vni: raw.vpc.vni as u32,
            mtu,
            router_mac,
            dns,
            lease_time,
        };

        // [[subnet]]
        let mut subnets: Vec<Subnet> = Vec::new();
        for (i, s) in raw.subnet.iter().enumerate() {
            let key = format!("subnet[{i}] ({})", s.id);
            identifier(&format!("subnet[{i}].id"), &s.id)?;
            if subnets.iter().any(|o| o.id == s.id) {
                return Err(invalid(
                    format!("subnet[{i}].id"),
                    format!("{:?} is used by an earlier subnet", s.id),
                ));
            }
            let c = cidr(&format!("{key}.cidr"), &s.cidr)?;
            if !vpc_cidr.contains_cidr(&c) {
                return Err(invalid(
                    format!("{key}.cidr"),
                    format!("{c} is not inside the VPC's {vpc_cidr}"),
                ));
            }
            if c.prefix() > 30 {
                return Err(invalid(
                    format!("{key}.cidr"),
                    format!("{c} is too small (at most /30: a gateway and a host)"),
                ));
            }
            if let Some(o) = subnets.iter().find(|o| o.cidr.overlaps(&c)) {
                return Err(invalid(
                    format!("{key}.cidr"),
                    format!("{c} overlaps subnet {} ({})", o.id, o.cidr),
                ));
            }
            let gateway = match &s.gateway {
                Some(g) => ipv4(&format!("{key}.gateway"), g)?,
                None => c.nth(1).unwrap_or(c.network()),
            };
            if !c.contains(gateway) || gateway == c.network() || gateway == c.broadcast() {
                return Err(invalid(
                    format!("{key}.gateway"),
                    format!("{gateway} is not a host address inside {c}"),
                ));
            }
            subnets.push(Subnet {
                id: s.id.clone(),
                cidr: c,
                gateway,
            });
        }

        // [[security_group]]
        let group_ids: HashSet<&str> = raw.security_group.iter().map(|g| g.id.as_str()).collect();
        let mut security_groups: Vec<SecurityGroup> = Vec::new();
        for (i, g) in raw.security_group.iter().enumerate() {
            if security_groups.iter().any(|o| o.id == g.id) {
                return Err(invalid(
                    format!("security_group[{i}].id"),
                    format!("{:?} is used by an earlier security_group", g.id),
                ));
            }
            security_groups.push(security_group(
                &format!("security_group[{i}]"),
                g,
                &group_ids,
            )?);
        }

        // [[eni]]
        let mut enis: Vec<EniConfig> = Vec::new();
        for (i, e) in raw.eni.iter().enumerate() {
            identifier(&format!("eni[{i}].id"), &e.id)?;
            let key = format!("eni[{i}] ({})", e.id);
            if enis.iter().any(|o| o.id == e.id) {
                return Err(invalid(
                    format!("eni[{i}].id"),
                    format!("{:?} is used by an earlier eni", e.id),
                ));
            }
            if e.socket.as_os_str().is_empty() {
                return Err(invalid(format!("{key}.socket"), "is empty"));
            }
            if let Some(o) = enis.iter().find(|o| o.socket == e.socket) {
                return Err(invalid(
                    format!("{key}.socket"),
                    format!("{} is also eni {}'s socket", e.socket.display(), o.id),
                ));
            }
            let mac = unicast_local_mac(&format!("{key}.mac"), &e.mac)?;
            if mac == router_mac {
                return Err(invalid(
                    format!("{key}.mac"),
                    format!("{mac} is the card's router MAC (vpc.router_mac)"),
                ));
            }
            if let Some(o) = enis.iter().find(|o| o.mac == mac) {
                return Err(invalid(
                    format!("{key}.mac"),
                    format!("{mac} is also eni {}'s MAC", o.id),
                ));
            }
            let subnet_index = subnets
                .iter()
                .position(|s| s.id == e.subnet)
                .ok_or_else(|| {
                    invalid(
                        format!("{key}.subnet"),
                        format!("no subnet has id {:?}", e.subnet),
                    )
                })?;
            let subnet = &subnets[subnet_index];
            let ip = ipv4(&format!("{key}.ip"), &e.ip)?;
            if !subnet.cidr.contains(ip) {
                return Err(invalid(
                    format!("{key}.ip"),
                    format!("{ip} is not inside subnet {} ({})", subnet.id, subnet.cidr),
                ));
            }
            if ip == subnet.cidr.network() || ip == subnet.cidr.broadcast() {
                return Err(invalid(
                    format!("{key}.ip"),
                    format!(
                        "{ip} is the network or broadcast address of {}",
                        subnet.cidr
                    ),
                ));
            }
            if ip == subnet.gateway {
                return Err(invalid(
                    format!("{key}.ip"),
                    format!("{ip} is subnet {}'s gateway", subnet.id),
                ));
            }
            if Some(ip) == dns {
                return Err(invalid(
                    format!("{key}.ip"),
                    format!("{ip} is the VPC's DNS address (vpc.dns)"),
                ));
            }
            if let Some(o) = enis.iter().find(|o| o.ip == ip) {
                return Err(invalid(
                    format!("{key}.ip"),
                    format!("{ip} is also eni {}'s address", o.id),
                ));
            }
            for (j, g) in e.security_groups.iter().enumerate() {
                if !group_ids.contains(g.as_str()) {
                    return Err(invalid(
                        format!("{key}.security_groups[{j}]"),
                        format!("no security_group has id {g:?}"),
                    ));
                }
                if e.security_groups[..j].contains(g) {
                    return Err(invalid(
                        format!("{key}.security_groups[{j}]"),
                        format!("{g:?} is listed twice"),
                    ));
                }
            }
            let allowance = match &e.allowance {
                None => None,
                Some(a) => {
                    let config = RateLimiterConfig {
                        bandwidth: bucket(&a.bandwidth),
                        ops: bucket(&a.ops),
                    };
                    if let Some(b) = &a.bandwidth {
                        check_bucket(&format!("{key}.allowance.bandwidth"), b)?;
                    }
                    if let Some(b) = &a.ops {
                        check_bucket(&format!("{key}.allowance.ops"), b)?;
                    }
                    RateLimiter::new(config, Duration::ZERO)
                        .map_err(|err| invalid(format!("{key}.allowance"), err.to_string()))?;
                    Some(config)
                }
            };
            let queue_pairs = match e.queue_pairs {
                None => 1,
                Some(q) => u16::try_from(q)
                    .ok()
                    .filter(|q| (1..=MAX_QUEUE_PAIRS).contains(q))
                    .ok_or_else(|| {
                        invalid(
                            format!("{key}.queue_pairs"),
                            format!("{q} is outside 1..={MAX_QUEUE_PAIRS}"),
                        )
                    })?,
            };
            let conntrack_entries = match e.conntrack_entries {
                None => DEFAULT_CONNTRACK_ENTRIES,
                Some(n) => usize::try_from(n)
                    .ok()
                    .filter(|n| (1..=MAX_CONNTRACK_ENTRIES).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            format!("{key}.conntrack_entries"),
                            format!("{n} is outside 1..={MAX_CONNTRACK_ENTRIES}"),
                        )
                    })?,
            };
            enis.push(EniConfig {
                id: e.id.clone(),
                socket: e.socket.clone(),
                mac,
                ip,
                subnet: e.subnet.clone(),
                subnet_index,
                security_groups: e.security_groups.clone(),
                allowance,
                queue_pairs,
                mtu,
                conntrack_entries,
            });
        }

        // [[remote]]
        let mut remotes: Vec<Remote> = Vec::new();
        for (i, r) in raw.remote.iter().enumerate() {
            let key = format!("remote[{i}]");
            let c = cidr(&format!("{key}.cidr"), &r.cidr)?;
            if let Some(s) = subnets.iter().find(|s| s.cidr.overlaps(&c)) {
                return Err(invalid(
                    format!("{key}.cidr"),
                    format!("{c} overlaps local subnet {} ({})", s.id, s.cidr),
                ));
            }
            if let Some((j, _)) = remotes
                .iter()
                .enumerate()
                .find(|(_, o)| o.cidr.overlaps(&c))
            {
                return Err(invalid(
                    format!("{key}.cidr"),
                    format!("{c} overlaps remote[{j}]"),
                ));
            }
            let vtep = socket_addr(&format!("{key}.vtep"), &r.vtep)?;
            if vtep.port() == 0 || vtep.ip().is_unspecified() {
                return Err(invalid(
                    format!("{key}.vtep"),
                    format!("{vtep} is not an address a datagram can be sent to"),
                ));
            }
            remotes.push(Remote { cidr: c, vtep });
        }

        let vxlan = match &raw.vxlan {
            None => None,
            Some(v) => Some(VxlanSection {
                listen: socket_addr("vxlan.listen", &v.listen)?,
            }),
        };
        if !remotes.is_empty() && vxlan.is_none() {
            return Err(invalid(
                "vxlan",
                "[[remote]] entries need a [vxlan] section with listen = \"addr:port\"",
            ));
        }

        let uplink = match &raw.uplink {
            None => None,
            Some(u) => {
                if u.tap.is_empty()
                    || u.tap.len() > 15
                    || u.tap.contains('/')
                    || u.tap.contains(char::is_whitespace)
                {
                    return Err(invalid(
                        "uplink.tap",
                        format!(
                            "{:?} is not an interface name (1 to 15 characters, no '/' or spaces)",
                            u.tap
                        ),
                    ));
                }
                let peer_mac = match &u.peer_mac {
                    None => None,
                    Some(m) => {
                        let mac: MacAddr = m
                            .parse()
                            .map_err(|e| invalid("uplink.peer_mac", format!("{e}")))?;
                        if mac.is_multicast() {
                            return Err(invalid(
                                "uplink.peer_mac",
                                format!("{mac} is a multicast address"),
                            ));
                        }
                        Some(mac)
                    }
                };
                Some(UplinkSection {
                    tap: u.tap.clone(),
                    peer_mac,
                })
            }
        };

        Ok(VpcConfig {
            vpc,
            subnets,
            security_groups,
            enis,
            remotes,
            vxlan,
            uplink,
        })
    }

    /// The index of the ENI with this id.
    pub fn eni_index(&self, id: &str) -> Option<usize> {
        self.enis.iter().position(|e| e.id == id)
    }

    /// Validates a security group given while the card runs, as `[[security_group]]` is validated: its
    /// `source_group`s may name this config's groups or the group itself. Errors name the key under
    /// `security_group (ID)`.
    pub fn check_security_group(
        &self,
        raw: &RawSecurityGroup,
    ) -> Result<SecurityGroup, ConfigError> {
        let mut group_ids: HashSet<&str> =
            self.security_groups.iter().map(|g| g.id.as_str()).collect();
        group_ids.insert(raw.id.as_str());
        security_group("security_group", raw, &group_ids)
    }
}

/// One `[[security_group]]`; `key` is how errors name it (`security_group[2]`).
fn security_group(
    key: &str,
    g: &RawSecurityGroup,
    group_ids: &HashSet<&str>,
) -> Result<SecurityGroup, ConfigError> {
    identifier(&format!("{key}.id"), &g.id)?;
    let key = format!("{key} ({})", g.id);
    let ingress = g
        .ingress
        .iter()
        .enumerate()
        .map(|(j, r)| rule(&format!("{key}.ingress[{j}]"), r, group_ids))
        .collect::<Result<Vec<_>, _>>()?;
    let egress = match &g.egress {
        None => vec![Rule {
            proto: Proto::All,
            ports: None,
            peer: RulePeer::Cidr(Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 0).expect("0.0.0.0/0")),
        }],
        Some(rules) => rules
            .iter()
            .enumerate()
            .map(|(j, r)| rule(&format!("{key}.egress[{j}]"), r, group_ids))
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(SecurityGroup {
        id: g.id.clone(),
        ingress,
        egress,
    })
}

fn check_bucket(key: &str, b: &RawBucket) -> Result<(), ConfigError> {
    if b.size == 0 {
        return Err(invalid(format!("{key}.size"), "must be above 0"));
    }
    if b.refill_time == 0 {
        return Err(invalid(format!("{key}.refill_time"), "must be above 0 ms"));
    }
    Ok(())
}

/// The issue's example configuration (used by tests, the fuzz target and documentation).
pub const EXAMPLE: &str = r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100
[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
gateway = "10.0.1.1"
[[security_group]]
id = "sg-web"
ingress = [ { proto = "tcp", ports = "5201", cidr = "10.0.0.0/16" }, { proto = "icmp", cidr = "0.0.0.0/0" } ]
egress  = [ { proto = "all", cidr = "0.0.0.0/0" } ]
[[eni]]
id = "eni-0a1"
socket = "/run/cardsim/eni-0a1.sock"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
security_groups = ["sg-web"]
allowance = { bandwidth = { size = 1250000, refill_time = 10 }, ops = { size = 1000, refill_time = 10 } }
[[remote]]
cidr = "10.0.2.0/24"
vtep = "127.0.0.1:4790"
[vxlan]
listen = "127.0.0.1:4789"
"#;

/// Map from ENI id to index, for callers that address ENIs by id.
pub fn eni_ids(config: &VpcConfig) -> HashMap<String, usize> {
    config
        .enis
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.clone(), i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issues_example_parses() {
        let c = VpcConfig::parse(EXAMPLE).unwrap();
        assert_eq!(c.vpc.vni, 100);
        assert_eq!(c.vpc.mtu, DEFAULT_MTU);
        assert_eq!(c.subnets[0].gateway, Ipv4Addr::new(10, 0, 1, 1));
        let eni = &c.enis[0];
        assert_eq!(eni.ip, Ipv4Addr::new(10, 0, 1, 10));
        assert_eq!(eni.queue_pairs, 1);
        assert_eq!(eni.allowance.unwrap().bandwidth.unwrap().size, 1_250_000);
        assert_eq!(
            c.security_groups[0].ingress[0].ports,
            Some(PortRange {
                first: 5201,
                last: 5201
            })
        );
        assert_eq!(c.remotes[0].vtep, "127.0.0.1:4790".parse().unwrap());
        assert_eq!(
            c.vxlan.as_ref().unwrap().listen,
            "127.0.0.1:4789".parse().unwrap()
        );
    }

    /// Replaces `from` (which must occur) in the example and returns the error text.
    fn error_with(from: &str, to: &str) -> String {
        assert!(EXAMPLE.contains(from), "{from}");
        VpcConfig::parse(&EXAMPLE.replacen(from, to, 1))
            .unwrap_err()
            .to_string()
    }

    fn second_eni(ip: &str, mac: &str, socket: &str) -> String {
        format!(
            "{EXAMPLE}\n[[eni]]\nid = \"eni-0b2\"\nsocket = \"{socket}\"\nmac = \"{mac}\"\nip = \"{ip}\"\nsubnet = \"subnet-a\"\n"
        )
    }

    #[test]
    fn errors_name_the_key_and_the_problem() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "vni = 100",
                "vni = 16777216",
                "vpc.vni: 16777216 does not fit in 24 bits",
            ),
            (
                "cidr = \"10.0.0.0/16\"",
                "cidr = \"10.0.0.0/33\"",
                "vpc.cidr:",
            ),
            (
                "cidr = \"10.0.1.0/24\"",
                "cidr = \"10.1.1.0/24\"",
                "subnet[0] (subnet-a).cidr: 10.1.1.0/24 is not inside the VPC's 10.0.0.0/16",
            ),
            (
                "gateway = \"10.0.1.1\"",
                "gateway = \"10.0.2.1\"",
                "subnet[0] (subnet-a).gateway: 10.0.2.1 is not a host address inside 10.0.1.0/24",
            ),
            (
                "ports = \"5201\"",
                "ports = \"70000\"",
                "security_group[0] (sg-web).ingress[0].ports: \"70000\" is not a port or range",
            ),
            (
                "ports = \"5201\"",
                "ports = \"9000-8000\"",
                "ingress[0].ports: \"9000-8000\" is not a port or range",
            ),
            (
                "proto = \"tcp\"",
                "proto = \"sctp\"",
                "ingress[0].proto: \"sctp\" is not one of",
            ),
            (
                "{ proto = \"icmp\", cidr = \"0.0.0.0/0\" }",
                "{ proto = \"icmp\", ports = \"1\", cidr = \"0.0.0.0/0\" }",
                "ingress[1].ports: ports apply to tcp and udp rules only",
            ),
            (
                "{ proto = \"icmp\", cidr = \"0.0.0.0/0\" }",
                "{ proto = \"icmp\" }",
                "ingress[1]: a rule needs cidr or source_group",
            ),
            (
                "{ proto = \"icmp\", cidr = \"0.0.0.0/0\" }",
                "{ proto = \"icmp\", source_group = \"sg-nope\" }",
                "ingress[1].source_group: no security_group has id \"sg-nope\"",
            ),
            (
                "ip = \"10.0.1.10\"",
                "ip = \"10.0.3.4\"",
                "eni[0] (eni-0a1).ip: 10.0.3.4 is not inside subnet subnet-a (10.0.1.0/24)",
            ),
            (
                "ip = \"10.0.1.10\"",
                "ip = \"10.0.1.1\"",
                "eni[0] (eni-0a1).ip: 10.0.1.1 is subnet subnet-a's gateway",
            ),
            (
                "ip = \"10.0.1.10\"",
                "ip = \"10.0.1.255\"",
                "is the network or broadcast address",
            ),
            (
                "ip = \"10.0.1.10\"",
                "ip = \"ten\"",
                "eni[0] (eni-0a1).ip: \"ten\" is not an IPv4 address",
            ),
            (
                "mac = \"02:00:0a:00:01:0a\"",
                "mac = \"03:00:0a:00:01:0a\"",
                "eni[0] (eni-0a1).mac: 03:00:0a:00:01:0a is a multicast address",
            ),
            (
                "mac = \"02:00:0a:00:01:0a\"",
                "mac = \"00:00:0a:00:01:0a\"",
                "is not locally administered",
            ),
            (
                "subnet = \"subnet-a\"",
                "subnet = \"subnet-b\"",
                "eni[0] (eni-0a1).subnet: no subnet has id \"subnet-b\"",
            ),
            (
                "security_groups = [\"sg-web\"]",
                "security_groups = [\"sg-db\"]",
                "eni[0] (eni-0a1).security_groups[0]: no security_group has id \"sg-db\"",
            ),
            (
                "size = 1250000",
                "size = 0",
                "eni[0] (eni-0a1).allowance.bandwidth.size: must be above 0",
            ),
            (
                "refill_time = 10 }, ops",
                "refill_time = 0 }, ops",
                "allowance.bandwidth.refill_time: must be above 0 ms",
            ),
            (
                "cidr = \"10.0.2.0/24\"",
                "cidr = \"10.0.1.128/25\"",
                "remote[0].cidr: 10.0.1.128/25 overlaps local subnet subnet-a",
            ),
            (
                "vtep = \"127.0.0.1:4790\"",
                "vtep = \"127.0.0.1\"",
                "remote[0].vtep: \"127.0.0.1\" is not an address:port",
            ),
            (
                "listen = \"127.0.0.1:4789\"",
                "listen = \"nowhere\"",
                "vxlan.listen:",
            ),
            (
                "vni = 100",
                "vni = 100\nmtu = 20",
                "vpc.mtu: 20 is outside 68..=9001",
            ),
            (
                "vni = 100",
                "vni = 100\ncolour = \"blue\"",
                "unknown field `colour`",
            ),
            (
                "subnet = \"subnet-a\"",
                "subnet = \"subnet-a\"\nqueue_pairs = 0",
                "queue_pairs: 0 is outside 1..=32",
            ),
            (
                "subnet = \"subnet-a\"",
                "subnet = \"subnet-a\"\nconntrack_entries = 0",
                "conntrack_entries: 0 is outside",
            ),
            (
                "[vxlan]\nlisten = \"127.0.0.1:4789\"",
                "",
                "vxlan: [[remote]] entries need a [vxlan] section",
            ),
        ];
        for (from, to, want) in cases {
            let got = error_with(from, to);
            assert!(
                got.contains(want),
                "replacing {from:?} with {to:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let dup_ip = VpcConfig::parse(&second_eni("10.0.1.10", "02:00:0a:00:01:0b", "/run/b.sock"))
            .unwrap_err();
        assert_eq!(
            dup_ip.to_string(),
            "eni[1] (eni-0b2).ip: 10.0.1.10 is also eni eni-0a1's address"
        );
        let dup_mac =
            VpcConfig::parse(&second_eni("10.0.1.11", "02:00:0a:00:01:0a", "/run/b.sock"))
                .unwrap_err();
        assert!(dup_mac
            .to_string()
            .contains("eni[1] (eni-0b2).mac: 02:00:0a:00:01:0a is also eni eni-0a1's MAC"));
        let dup_sock = VpcConfig::parse(&second_eni(
            "10.0.1.11",
            "02:00:0a:00:01:0b",
            "/run/cardsim/eni-0a1.sock",
        ))
        .unwrap_err();
        assert!(dup_sock.to_string().contains("eni[1] (eni-0b2).socket"));
        let ok =
            VpcConfig::parse(&second_eni("10.0.1.11", "02:00:0a:00:01:0b", "/run/b.sock")).unwrap();
        assert_eq!(ok.enis.len(), 2);
    }

    #[test]
    fn egress_defaults_to_all_and_gateway_to_the_first_host() {
        let text = EXAMPLE
            .replacen(
                "egress  = [ { proto = \"all\", cidr = \"0.0.0.0/0\" } ]",
                "",
                1,
            )
            .replacen("gateway = \"10.0.1.1\"", "", 1);
        let c = VpcConfig::parse(&text).unwrap();
        assert_eq!(c.security_groups[0].egress.len(), 1);
        assert_eq!(c.security_groups[0].egress[0].proto, Proto::All);
        assert_eq!(c.subnets[0].gateway, Ipv4Addr::new(10, 0, 1, 1));
    }

    proptest::proptest! {
        /// Any edit of a valid file gives a config or an error, never a panic.
        #[test]
        fn parse_never_panics(at in 0usize..2000, with in "[ -~\n]{0,12}", cut in 0usize..2000) {
            let mut text = EXAMPLE.to_string();
            let at = text.char_indices().map(|(i, _)| i).nth(at % EXAMPLE.len()).unwrap_or(0);
            text.insert_str(at, &with);
            let cut = cut.min(text.len());
            let cut = (0..=cut).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            let _ = VpcConfig::parse(&text[..cut]);
            let _ = VpcConfig::parse(&text);
        }
    }

    #[test]
    fn port_ranges() {
        assert_eq!(
            parse_ports("8000-8100"),
            Some(PortRange {
                first: 8000,
                last: 8100
            })
        );
        assert_eq!(parse_ports("0"), Some(PortRange { first: 0, last: 0 }));
        for bad in ["", "-", "1-", "-1", "65536", "a", "1-2-3", "+5"] {
            assert_eq!(parse_ports(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_security_group_given_live_is_validated_as_the_file_is() {
        let c = VpcConfig::parse(EXAMPLE).unwrap();
        let raw = |text: &str| -> RawSecurityGroup { toml::from_str(text).unwrap() };
        let g = c
            .check_security_group(&raw(r#"id = "sg-db"
                ingress = [ { proto = "tcp", ports = "5432", source_group = "sg-db" },
                            { proto = "udp", source_group = "sg-web" } ]"#))
            .unwrap();
        assert_eq!(g.ingress.len(), 2);
        // No egress key: everything outbound, as in the file.
        assert_eq!(g.egress[0].proto, Proto::All);
        for (text, expected) in [
            (
                r#"id = "sg-db"
                ingress = [ { proto = "tcp", ports = "70000", cidr = "10.0.0.0/16" } ]"#,
                "security_group (sg-db).ingress[0].ports: \"70000\" is not a port or range",
            ),
            (
                r#"id = "sg-db"
                egress = [ { proto = "tcp", source_group = "sg-nope" } ]"#,
                "security_group (sg-db).egress[0].source_group: no security_group has id \"sg-nope\"",
            ),
            (r#"id = "sg db""#, "security_group.id: \"sg db\" is not an id"),
        ] {
            let e = c.check_security_group(&raw(text)).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{e}");
        }
    }
}
