//! What a port offers the VMM: virtio-net feature bits, vhost-user protocol
//! features and the device configuration space.
//!
//! QEMU keeps the control virtqueue, the MAC and the link status itself and
//! masks the feature bits it forwards to the backend by its own list; the
//! bits below are the ones a vhost-user-net backend answers for.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Every virtio-net feature a port offers. UFO is left out on purpose (Linux
/// no longer generates it and the switch does not segment UDP).
pub fn offered() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
    ]
    .iter()
    .fold(
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        |acc, bit| acc | (1u64 << bit),
    )
}

/// The vhost-user protocol features a port offers. MQ lets QEMU ask how many
/// queues there are; REPLY_ACK lets it wait for each request's outcome; MTU
/// (NET_MTU) has it tell the port the MTU it gives the guest (`host_mtu`),
/// answered by the listener's handler (third_party/vhost/CARDSIM-PATCH.md).
/// CONFIG is not offered: QEMU's virtio-net builds its config space itself.
pub fn protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MTU
}

/// What the driver and the port agreed on, as the data path needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// The vnet header is 12 bytes (VERSION_1 or MRG_RXBUF), else 10.
    pub header_len: usize,
    pub mrg_rxbuf: bool,
    /// The guest takes frames whose checksum is still to be completed.
    pub guest_csum: bool,
    pub guest_tso4: bool,
    pub guest_tso6: bool,
    pub guest_ecn: bool,
}

impl Negotiated {
    pub fn from_bits(acked: u64) -> Self {
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        let mrg_rxbuf = has(VIRTIO_NET_F_MRG_RXBUF);
        Negotiated {
            header_len: if has(VIRTIO_F_VERSION_1) || mrg_rxbuf {
                12
            } else {
                10
            },
            mrg_rxbuf,
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            guest_tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            guest_tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            guest_ecn: has(VIRTIO_NET_F_GUEST_ECN),
        }
    }
}

/// Bytes of the virtio-net config space a port fills (mac, status,
/// max_virtqueue_pairs, mtu).
pub const CONFIG_LEN: usize = 12;

/// The device configuration space (virtio 1.x §5.1.4), little-endian.
pub fn config_space(mac: [u8; 6], queue_pairs: u16, mtu: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

/// Reads `size` bytes at `offset` of the config space; out of range reads
/// return what exists (nothing beyond the end).
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(space.len());
    let end = start.saturating_add(size as usize).min(space.len());
    space[start..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_what_the_issue_lists_and_not_ufo() {
        let f = offered();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_MQ,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MTU,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(
            f & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_UFO),
            0
        );
        assert_eq!(
            f & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_UFO),
            0
        );
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    }

    #[test]
    fn header_length_follows_version_and_mrg_rxbuf() {
        assert_eq!(Negotiated::from_bits(0).header_len, 10);
        assert_eq!(
            Negotiated::from_bits(1 << VIRTIO_F_VERSION_1).header_len,
            12
        );
        let n = Negotiated::from_bits(1 << VIRTIO_NET_F_MRG_RXBUF);
        assert_eq!((n.header_len, n.mrg_rxbuf), (12, true));
    }

    #[test]
    fn config_space_is_little_endian_and_reads_clip() {
        let c = config_space([2, 0, 10, 0, 1, 10], 4, 1500);
        assert_eq!(&c[..6], &[2, 0, 10, 0, 1, 10]);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        assert_eq!(read_config(&c, 10, 100), vec![0xdc, 0x05]);
        assert!(read_config(&c, 100, 4).is_empty());
        assert!(read_config(&c, u32::MAX, u32::MAX).is_empty());
    }
}
