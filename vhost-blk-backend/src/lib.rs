//! cardsim's EBS-style block card: virtio-blk over vhost-user, on io_uring.
//!
//! Layers, top-down: [`device`] is what the VMM negotiates with (features,
//! config space, queues); [`queue`] runs one virtqueue against the media;
//! [`request`] checks each guest request before anything acts on it;
//! [`metrics`] counts what happened. The media itself comes from
//! `card_firmware::media`.

pub mod config;
pub mod device;
pub mod metrics;
pub mod queue;
pub mod request;

use card_firmware::media::FileMedia;

use crate::metrics::BlockMetrics;

/// Length of the virtio-blk serial (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_LEN: usize = 20;

/// What a card serves, the same for every VMM connection.
#[derive(Debug)]
pub struct Volume {
    pub media: FileMedia,
    /// The GET_ID answer, NUL-padded.
    pub serial: [u8; SERIAL_LEN],
    pub num_queues: u16,
    /// The largest virtqueue the card accepts.
    pub queue_size: u16,
    /// The most data segments in one request (advertised as seg_max).
    pub seg_max: u32,
    pub metrics: BlockMetrics,
}
