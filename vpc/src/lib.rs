//! The VPC switch of cardsim's networking card, without I/O: configuration ([`config`]), ARP ([`arp`]),
//! DHCP ([`dhcp`]), routing and anti-spoofing ([`switch`]), stateful security groups with connection
//! tracking ([`secgroup`]), VXLAN ([`vxlan`]), the virtio-net header ([`vnet`]) and software offloads
//! ([`offload`]). Deterministic: time is passed in, nothing here reads a clock, opens a socket or spawns.
pub mod addr;
pub mod arp;
pub mod config;
pub mod dhcp;
pub mod frames;
pub mod fuzzing;
pub mod hash;
pub mod offload;
pub mod packet;
pub mod secgroup;
pub mod switch;
pub mod vnet;
pub mod vxlan;

pub use addr::{Ipv4Cidr, MacAddr};
pub use config::{ConfigError, EniConfig, VpcConfig};
pub use switch::{
    DropReason, Egress, EthRewrite, PortCounters, PortId, Switch, SwitchCounters, Verdict,
};
pub use vnet::VnetHeader;
