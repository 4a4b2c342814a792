//! The API's resources and requests, and the checks a request passes before
//! anything changes. Every request body refuses unknown fields.

use std::net::Ipv4Addr;
use std::time::Duration;

use hw_model::ebs::{VolumeModel, VolumeSpec, VolumeType};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// The kinds of resource, with their id prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Volume,
    Namespace,
    Eni,
    SecurityGroup,
    Subnet,
    Instance,
}

impl Kind {
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Volume => "vol",
            Kind::Namespace => "ns",
            Kind::Eni => "eni",
            Kind::SecurityGroup => "sg",
            Kind::Subnet => "subnet",
            Kind::Instance => "i",
        }
    }
    /// The name used in the database and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Namespace => "namespace",
            Kind::Eni => "eni",
            Kind::SecurityGroup => "security group",
            Kind::Subnet => "subnet",
            Kind::Instance => "instance",
        }
    }
}

/// A new cloud-style id: the kind's prefix and 17 random hex digits.
pub fn new_id(kind: Kind) -> String {
    let mut bytes = [0u8; 9];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // The kernel's generator never fails for 9 bytes; fall back to time.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes.copy_from_slice(&t.to_le_bytes()[..9]);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}", kind.prefix(), &hex[..17])
}

/// Whether `id` looks like an id of `kind` (prefix, dash, 1–32 hex digits).
pub fn is_id(kind: Kind, id: &str) -> bool {
    id.strip_prefix(kind.prefix())
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            (1..=32).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

// ---------------------------------------------------------------- volumes

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Capacity in bytes: within the type's size range (gp3: 1 GiB to 16 TiB).
    pub size_bytes: u64,
    /// gp2, gp3, io1, io2, st1 or sc1.
    #[schema(value_type = String, example = "gp3")]
    pub volume_type: VolumeType,
    /// Provisioned IOPS (gp3, io1, io2).
    #[serde(default)]
    pub iops: Option<u64>,
    /// Provisioned throughput in MiB/s (gp3).
    #[serde(default)]
    pub throughput_mibps: Option<u64>,
}

/// `PATCH /v1/volumes/{id}`: modify-volume, applied to the running card.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModifyVolume {
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "io2")]
    pub volume_type: Option<VolumeType>,
    #[serde(default)]
    pub iops: Option<u64>,
    #[serde(default)]
    pub throughput_mibps: Option<u64>,
}

/// `POST /v1/volumes/{id}/attach`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    pub instance_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Volume {
    pub id: String,
    pub size_bytes: u64,
    #[schema(value_type = String, example = "gp3")]
    pub volume_type: VolumeType,
    pub iops: Option<u64>,
    pub throughput_mibps: Option<u64>,
    /// `available` or `in-use`.
    pub state: String,
    pub attached_to: Option<String>,
    /// The block card's vhost-user socket.
    pub socket: String,
    pub created_ms: u64,
}

impl Volume {
    pub fn spec(&self) -> VolumeSpec {
        VolumeSpec {
            volume_type: self.volume_type,
            size_bytes: self.size_bytes,
            iops: self.iops,
            throughput_mibps: self.throughput_mibps,
        }
    }
}

/// The field an EBS spec error is about, for the error's `field`.
fn spec_field(e: &hw_model::ebs::SpecError) -> &'static str {
    use hw_model::ebs::SpecError::*;
    match e {
        UnknownType(_) => "volume_type",
        Size { .. } => "size_bytes",
        NotProvisionable { field, .. } => {
            if *field == "iops" {
                "iops"
            } else {
                "throughput_mibps"
            }
        }
        IopsRange { .. } | IopsPerGib { .. } => "iops",
        ThroughputRange { .. } | ThroughputPerIops { .. } => "throughput_mibps",
    }
}

/// Checks a volume spec the way the block card will: the type's size range,
/// IOPS and throughput limits.
pub fn check_volume_spec(spec: &VolumeSpec) -> Result<(), ApiError> {
    if spec.size_bytes == 0 {
        return Err(ApiError::invalid("size_bytes", "must be more than 0"));
    }
    match VolumeModel::new(spec, Duration::ZERO) {
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::invalid(spec_field(&e), e.to_string())),
    }
}

// ------------------------------------------------------------- namespaces

/// `POST /v1/namespaces`: an instance-store NVMe namespace.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNamespace {
    /// Capacity in bytes: 1 MiB to 16 TiB, a multiple of 4096.
    pub size_bytes: u64,
}

pub const NAMESPACE_MIN: u64 = 1 << 20;
pub const NAMESPACE_MAX: u64 = 16 << 40;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Namespace {
    pub id: String,
    pub size_bytes: u64,
    pub state: String,
    pub attached_to: Option<String>,
    /// The NVMe card's vfio-user socket.
    pub socket: String,
    pub created_ms: u64,
}

// ---------------------------------------------------------------- subnets

/// `POST /v1/subnets`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubnet {
    /// Inside the VPC's block, e.g. `10.0.1.0/24`; prefix 16 to 28.
    pub cidr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Subnet {
    pub id: String,
    pub cidr: String,
    /// The first host address: the card's router.
    pub gateway: String,
    pub created_ms: u64,
}

/// An IPv4 block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (ip, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR block (like 10.0.1.0/24)"))?;
        let base: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{prefix:?} is not a prefix length 0..=32"))?;
        let cidr = Cidr { base, prefix };
        if u32::from(base) & !cidr.mask() != 0 {
            return Err(format!("{text}: host bits are set"));
        }
        Ok(cidr)
    }
    pub fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.base)
    }
    pub fn overlaps(self, other: Cidr) -> bool {
        self.contains(other.base) || other.contains(self.base)
    }
    /// The `n`th address of the block.
    pub fn host(self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base).wrapping_add(n))
    }
    pub fn size(self) -> u64 {
        1u64 << (32 - self.prefix)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

// -------------------------------------------------------- security groups

/// One security-group rule, as the networking card takes it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `tcp`, `udp`, `icmp` or `all`.
    pub proto: String,
    /// A port or range (`5201`, `8000-8100`); tcp and udp only. None: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
    /// The peer's block, e.g. `10.0.0.0/16`.
    pub cidr: String,
}

/// `POST /v1/security-groups`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSecurityGroup {
    /// A description for people; 0 to 255 characters.
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub ingress: Vec<Rule>,
    /// Default: all traffic (as AWS's default egress rule).
    #[serde(default)]
    pub egress: Option<Vec<Rule>>,
}

/// The egress rule a group gets when none are given: everything.
pub fn allow_all() -> Vec<Rule> {
    vec![Rule {
        proto: "all".into(),
        ports: None,
        cidr: "0.0.0.0/0".into(),
    }]
}

/// `PUT /v1/security-groups/{id}/rules`: replaces both rule lists, live.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRules {
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SecurityGroup {
    pub id: String,
    pub description: String,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    pub created_ms: u64,
}

pub const MAX_RULES: usize = 64;

pub fn check_rules(field: &str, rules: &[Rule]) -> Result<(), ApiError> {
    if rules.len() > MAX_RULES {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_RULES} rules, got {}", rules.len()),
        ));
    }
    for (i, rule) in rules.iter().enumerate() {
        let at = |key: &str| format!("{field}[{i}].{key}");
        if !matches!(rule.proto.as_str(), "tcp" | "udp" | "icmp" | "all") {
            return Err(ApiError::invalid(
                &at("proto"),
                format!("{:?} is not tcp, udp, icmp or all", rule.proto),
            ));
        }
        if let Some(ports) = &rule.ports {
            if !matches!(rule.proto.as_str(), "tcp" | "udp") {
                return Err(ApiError::invalid(
                    &at("ports"),
                    "ports apply to tcp and udp only",
                ));
            }
            check_ports(ports).map_err(|m| ApiError::invalid(&at("ports"), m))?;
        }
        Cidr::parse(&rule.cidr).map_err(|m| ApiError::invalid(&at("cidr"), m))?;
    }
    Ok(())
}

fn check_ports(text: &str) -> Result<(), String> {
    let bad = || format!("{text:?} is not a port or range (\"5201\" or \"8000-8100\", 0..=65535)");
    let port = |s: &str| s.trim().parse::<u16>().map_err(|_| bad());
    match text.split_once('-') {
        Some((lo, hi)) => {
            if port(lo)? > port(hi)? {
                return Err(bad());
            }
        }
        None => {
            port(text)?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------- ENIs

/// `POST /v1/enis`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEni {
    pub subnet_id: String,
    /// Groups applied to the ENI (0 to 5), by id.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// A private address in the subnet; default: the lowest free one from .10.
    #[serde(default)]
    pub ip: Option<String>,
    /// Bandwidth and packet allowance; default: unlimited.
    #[serde(default)]
    pub allowance: Option<RateLimiter>,
}

/// A token bucket in Firecracker's shape: `size` tokens (bytes or packets)
/// refill every `refill_time` ms; `one_time_burst` is extra initial budget.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// An ENI's allowance, Firecracker's rate-limiter shape: `bandwidth` in
/// bytes, `ops` in packets, each per direction.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

pub fn check_rate_limiter(field: &str, limiter: &RateLimiter) -> Result<(), ApiError> {
    for (name, bucket) in [("bandwidth", &limiter.bandwidth), ("ops", &limiter.ops)] {
        let Some(b) = bucket else { continue };
        if b.size == 0 {
            return Err(ApiError::invalid(
                &format!("{field}.{name}.size"),
                "must be above 0",
            ));
        }
        if b.refill_time == 0 {
            return Err(ApiError::invalid(
                &format!("{field}.{name}.refill_time"),
                "must be above 0 (milliseconds)",
            ));
        }
    }
    Ok(())
}

/// `PATCH /v1/enis/{id}`: replaces the ENI's groups, live.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModifyEni {
    pub security_groups: Vec<String>,
}

pub const MAX_ENI_GROUPS: usize = 5;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Eni {
    pub id: String,
    pub subnet_id: String,
    pub ip: String,
    pub mac: String,
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub allowance: Option<RateLimiter>,
    pub state: String,
    pub attached_to: Option<String>,
    /// The networking card's vhost-user-net socket for this ENI.
    pub socket: String,
    pub created_ms: u64,
}

/// A locally administered unicast MAC derived from the ENI's id.
pub fn eni_mac(id: &str) -> String {
    let hex = id.trim_start_matches("eni-");
    let mut b = [0u8; 4];
    for (i, slot) in b.iter_mut().enumerate() {
        *slot = hex
            .get(i * 2..i * 2 + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

// -------------------------------------------------------------- instances

/// `POST /v1/instances`: launch a QEMU guest with the named devices.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInstance {
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub enis: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// 1 to 16; default 1.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// 128 to 16384; default 512.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Guest kernel; default: the daemon's `--kernel`.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Guest initramfs; default: the daemon's `--initrd`.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line; default: `console=ttyS0 panic=-1 quiet`.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// A shell script the guest runs after boot.
    #[serde(default)]
    pub user_data: Option<String>,
}

/// `POST /v1/instances/register`: a VMM someone else started, by its QMP socket.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterInstance {
    pub qmp_socket: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Instance {
    pub id: String,
    /// `launched` (the daemon runs its QEMU) or `registered`.
    pub origin: String,
    /// `running` or `stopped`.
    pub state: String,
    pub volumes: Vec<String>,
    pub enis: Vec<String>,
    pub namespaces: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub qmp_socket: String,
    pub console_log: Option<String>,
    pub pid: Option<u32>,
    pub created_ms: u64,
}

// ---------------------------------------------------------- events, cards

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    pub seq: i64,
    pub time_ms: u64,
    /// The resource or card the event is about.
    pub resource: String,
    /// e.g. `created`, `attached`, `card-started`, `card-exited`.
    pub kind: String,
    pub message: String,
}

/// A card process as the supervisor sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Card {
    /// `blk-vol-…`, `nvme-ns-…` or `net`.
    pub name: String,
    /// `block`, `nvme` or `net`.
    pub kind: String,
    /// `starting`, `healthy`, `unhealthy`, `backing-off` or `stopped`.
    pub phase: String,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub last_failure: Option<String>,
}

/// `GET /v1/cards/{name}/metrics`: what the card's agent answers to `metrics`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CardMetrics {
    pub name: String,
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
}

// ----------------------------------------------------------------- firmware

/// `GET /v1/firmware`: what the cards run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Firmware {
    /// `verified`: cards run only from the verified image below (the daemon
    /// has `--trusted-keys`); `unverified`: plain binaries from
    /// `card_bin_dir`, for development.
    pub mode: String,
    /// The image in use (verified mode).
    pub image: Option<String>,
    pub version: Option<String>,
    /// The trusted key that signed the image, hex.
    pub signer: Option<String>,
    /// Where unverified cards come from (unverified mode).
    pub card_bin_dir: Option<String>,
    pub cards: Vec<CardFirmware>,
}

/// One card and the image version it was started from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CardFirmware {
    pub name: String,
    pub kind: String,
    pub phase: String,
    pub pid: Option<u32>,
    /// The image version of its running process; none when unverified.
    pub version: Option<String>,
}

/// `POST /v1/firmware/update`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateFirmware {
    /// The new image's folder (absolute): `manifest.json`, `manifest.sig`, `bin/`.
    pub image: String,
}

/// What a firmware update did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct FirmwareUpdated {
    pub previous_version: Option<String>,
    /// The cards restarted, in order.
    pub restarted: Vec<CardRestart>,
    pub firmware: Firmware,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CardRestart {
    pub name: String,
    pub old_pid: Option<u32>,
    pub new_pid: u32,
}

/// `GET /v1/firmware/boot-log`: the measured-boot log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BootLog {
    pub path: String,
    /// Whether the hash chain checks out (numbering, links, digests).
    pub verified: bool,
    /// Where and why it does not.
    pub problem: Option<String>,
    pub entries: Vec<BootLogEntry>,
}

/// One start of a card binary from a verified image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BootLogEntry {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub card: String,
    pub binary: String,
    pub image_version: String,
    /// The binary's SHA-256, as verified.
    pub sha256: String,
    /// The previous entry's digest.
    pub prev: String,
    pub digest: String,
}

impl From<card_firmware::boot::BootEntry> for BootLogEntry {
    fn from(e: card_firmware::boot::BootEntry) -> Self {
        BootLogEntry {
            seq: e.seq,
            time: e.time,
            card: e.card,
            binary: e.binary,
            image_version: e.image_version,
            sha256: e.sha256,
            prev: e.prev,
            digest: e.digest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_kind_prefix_and_17_hex_digits() {
        let id = new_id(Kind::Volume);
        assert!(id.starts_with("vol-") && id.len() == 21, "{id}");
        assert!(is_id(Kind::Volume, &id));
        assert!(!is_id(Kind::Eni, &id));
        assert!(!is_id(Kind::Volume, "vol-xyz"));
        assert_ne!(new_id(Kind::Volume), id);
    }

    #[test]
    fn cidr_checks_host_bits_and_overlap() {
        let a = Cidr::parse("10.0.1.0/24").unwrap();
        assert!(Cidr::parse("10.0.1.5/24").is_err());
        assert!(Cidr::parse("10.0.1.0/33").is_err());
        assert!(a.overlaps(Cidr::parse("10.0.0.0/16").unwrap()));
        assert!(!a.overlaps(Cidr::parse("10.0.2.0/24").unwrap()));
        assert_eq!(a.host(1).to_string(), "10.0.1.1");
    }

    #[test]
    fn volume_limits_come_from_the_ebs_model() {
        let gib = 1 << 30;
        let ok = VolumeSpec::gib(VolumeType::Gp3, 8).with_iops(3000);
        assert!(check_volume_spec(&ok).is_ok());
        let too_many = VolumeSpec::gib(VolumeType::Gp3, 8).with_iops(1_000_000);
        assert_eq!(
            check_volume_spec(&too_many).unwrap_err().field.as_deref(),
            Some("iops")
        );
        let zero = VolumeSpec {
            size_bytes: 0,
            ..VolumeSpec::gib(VolumeType::Gp3, 1)
        };
        assert_eq!(
            check_volume_spec(&zero).unwrap_err().field.as_deref(),
            Some("size_bytes")
        );
        let gp2_iops = VolumeSpec::gib(VolumeType::Gp2, 8).with_iops(100);
        assert_eq!(
            check_volume_spec(&gp2_iops).unwrap_err().field.as_deref(),
            Some("iops")
        );
        assert!(check_volume_spec(&VolumeSpec {
            size_bytes: gib,
            ..ok
        })
        .is_ok());
    }

    #[test]
    fn rules_name_the_bad_field() {
        let rule = |proto: &str, ports: Option<&str>, cidr: &str| Rule {
            proto: proto.into(),
            ports: ports.map(String::from),
            cidr: cidr.into(),
        };
        assert!(check_rules("ingress", &[rule("tcp", Some("5201"), "10.0.0.0/16")]).is_ok());
        let e = check_rules("ingress", &[rule("tcp", Some("70000"), "10.0.0.0/16")]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ingress[0].ports"));
        let e = check_rules("egress", &[rule("icmp", Some("1"), "0.0.0.0/0")]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("egress[0].ports"));
        let e = check_rules("egress", &[rule("sctp", None, "0.0.0.0/0")]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("egress[0].proto"));
    }
}
