//! cardsim's networking card: vhost-user-net ports switched as a VPC.
//!
//! - [`features`]: what a port offers (virtio-net features, config space);
//! - [`chain`]: TX chains gathered and RX buffers filled, every guest value checked;
//! - [`card`]: the ports, the shared port table and delivery between ports;
//! - [`device`]: a port's vhost-user backend and its queue-pair threads;
//! - [`allowance`]: per-ENI bandwidth and packets-per-second buckets;
//! - [`vxlan`]: the VXLAN socket on io_uring;
//! - [`uplink`]: the optional TAP uplink on io_uring;
//! - [`counters`], [`agent`]: what the card reports, and its agent operations;
//! - [`sandbox`]: the system calls it makes, for its seccomp filters.

pub mod agent;
pub mod allowance;
pub mod card;
pub mod chain;
pub mod counters;
pub mod device;
pub mod features;
pub mod sandbox;
pub mod uplink;
pub mod vxlan;
