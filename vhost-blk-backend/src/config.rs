//! virtio-blk features and configuration space (VIRTIO 1.2 §5.2.3–5.2.4).

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use card_firmware::media::SECTOR_SIZE;

use crate::Volume;

/// The largest single data buffer we advertise (size_max): 128 KiB.
///
/// SeaBIOS splits a disk read into chunks of `(u16)(size_max * seg_max /
/// blk_size)` sectors; when that product overflows 16 bits the chunk is zero
/// sectors and the firmware loops forever on empty reads before Linux ever
/// boots. 128 KiB × seg_max 128 / 512 = 32768 stays inside it.
pub const SIZE_MAX: u32 = 128 << 10;
/// The most data segments per request we ever advertise (seg_max).
pub const MAX_SEG_MAX: u32 = 128;
/// The largest discard / write-zeroes range, in sectors: 1 GiB.
pub const MAX_RANGE_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// Size of the part of `struct virtio_blk_config` we fill (through
/// write_zeroes_may_unmap and its padding).
pub const CONFIG_LEN: usize = 60;

pub fn features(volume: &Volume) -> u64 {
    let mut bits = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_MQ
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if volume.media.read_only() {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    bits
}

/// The configuration space, little-endian, laid out as `struct virtio_blk_config`.
pub fn config_space(volume: &Volume) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &(volume.media.capacity() / SECTOR_SIZE).to_le_bytes()); // capacity
    put(8, &SIZE_MAX.to_le_bytes()); // size_max
    put(12, &volume.seg_max.to_le_bytes()); // seg_max
                                            // 16..20: geometry, not offered
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
                                                  // 24..32: topology, not offered; 32: writeback (no CONFIG_WCE)
    put(34, &volume.num_queues.to_le_bytes()); // num_queues
    put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &crate::request::MAX_RANGE_SEGMENTS.to_le_bytes()); // max_discard_seg
    put(44, &1u32.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &crate::request::MAX_RANGE_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// The vhost-user limit on a config space (VHOST_USER_MAX_CONFIG_SIZE).
const MAX_CONFIG_LEN: usize = 256;

/// The bytes `[offset, offset + size)` of the config space. Fields a newer
/// VMM knows and we don't offer (secure erase, zoned) read as zero; a range
/// past the vhost-user limit gets nothing.
pub fn read_config(volume: &Volume, offset: u32, size: u32) -> Vec<u8> {
    let start = offset as usize;
    let Some(end) = start
        .checked_add(size as usize)
        .filter(|&e| e <= MAX_CONFIG_LEN)
    else {
        return Vec::new();
    };
    let mut space = [0u8; MAX_CONFIG_LEN];
    space[..CONFIG_LEN].copy_from_slice(&config_space(volume));
    space[start..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seabios_chunk_size_does_not_wrap() {
        let sectors = u64::from(SIZE_MAX) * u64::from(MAX_SEG_MAX) / SECTOR_SIZE;
        assert!(sectors > 0 && sectors <= u64::from(u16::MAX), "{sectors}");
    }
}
