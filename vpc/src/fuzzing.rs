//! Entry points for cargo-fuzz targets (and the never-panic properties): the switch on a fixed
//! configuration, fed guest TX frames with their vnet headers, or VXLAN datagrams.
use crate::config::VpcConfig;
use crate::offload;
use crate::switch::{Switch, Verdict};
use crate::vnet::VnetHeader;
use std::time::{Duration, Instant};

/// Two subnets, three ENIs (one with a two-entry connection-tracking table), security groups with port
/// ranges and a source_group, a remote behind VXLAN.
pub const CONFIG: &str = r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100
dns = "10.0.0.2"
[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
gateway = "10.0.1.1"
[[subnet]]
id = "subnet-b"
cidr = "10.0.3.0/24"
[[security_group]]
id = "sg-web"
ingress = [ { proto = "tcp", ports = "5201", cidr = "10.0.0.0/16" }, { proto = "icmp", cidr = "0.0.0.0/0" },
            { proto = "udp", ports = "7000-7010", source_group = "sg-web" } ]
egress  = [ { proto = "all", cidr = "0.0.0.0/0" } ]
[[security_group]]
id = "sg-quiet"
egress = [ { proto = "tcp", ports = "443", cidr = "0.0.0.0/0" } ]
[[eni]]
id = "eni-a"
socket = "/run/a.sock"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
security_groups = ["sg-web"]
[[eni]]
id = "eni-b"
socket = "/run/b.sock"
mac = "02:00:0a:00:01:0b"
ip = "10.0.1.11"
subnet = "subnet-a"
security_groups = ["sg-web"]
conntrack_entries = 2
[[eni]]
id = "eni-c"
socket = "/run/c.sock"
mac = "02:00:0a:00:03:0c"
ip = "10.0.3.12"
subnet = "subnet-b"
security_groups = ["sg-quiet"]
[[remote]]
cidr = "10.0.2.0/24"
vtep = "127.0.0.1:4790"
[vxlan]
listen = "127.0.0.1:4789"
"#;

/// A switch on [`CONFIG`].
pub fn switch() -> Switch {
    Switch::new(&VpcConfig::parse(CONFIG).expect("the fuzzing config is valid"))
}

/// Feeds `data` to a fresh switch as a sequence of records, each
/// `[kind: u8][len: u16 le][vnet header: 12 bytes][frame: len bytes]`; kind's low bits pick the port
/// (0..=3, where 3 is no port) and bit 7 sends the record as a VXLAN datagram instead (header bytes
/// ignored). Every forwarded frame also goes through checksum completion and software segmentation,
/// as the card does for destinations without offloads. Time advances one second per record so that
/// connection tracking expires entries too. Must never panic.
pub fn virtio_net_tx(data: &[u8]) {
    let mut sw = switch();
    let start = Instant::now();
    let mut rest = data;
    let mut n = 0u64;
    while let [kind, l0, l1, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*l0, *l1]));
        let Some(header) = tail.get(..VnetHeader::LEN) else {
            return;
        };
        let Some(frame) = tail.get(VnetHeader::LEN..VnetHeader::LEN + len) else {
            return;
        };
        rest = &tail[VnetHeader::LEN + len..];
        let now = start + Duration::from_secs(n);
        n += 1;
        let verdict = if kind & 0x80 != 0 {
            sw.from_vxlan(frame, "127.0.0.1:40000".parse().expect("address"), now)
        } else {
            let Ok(h) = VnetHeader::parse(header) else {
                return;
            };
            sw.from_port(usize::from(kind & 3), &h, frame, now)
        };
        let (h, offset) = match verdict {
            Verdict::ToPort {
                header,
                frame_offset,
                ..
            }
            | Verdict::ToVtep {
                header,
                frame_offset,
                ..
            }
            | Verdict::ToUplink {
                header,
                frame_offset,
                ..
            } => (header, frame_offset),
            _ => continue,
        };
        let Some(inner) = frame.get(offset..) else {
            continue;
        };
        let mut copy = inner.to_vec();
        let _ = offload::complete_checksum(&h, &mut copy);
        let _ = offload::segment(&h, inner, 1450, &mut |_| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn virtio_net_tx_never_panics(d in proptest::collection::vec(any::<u8>(), 0..4000)) {
            virtio_net_tx(&d);
        }
    }
}
