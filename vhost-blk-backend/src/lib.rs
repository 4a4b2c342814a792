//! cardsim's EBS-style block card: virtio-blk over vhost-user, on io_uring.
//!
//! Layers, top-down: [`device`] is what the VMM negotiates with (features,
//! config space, queues); [`queue`] runs one virtqueue against the media;
//! [`request`] checks each guest request before anything acts on it;
//! [`metrics`] counts what happened; [`agent`] answers the card's agent
//! socket. The middle (faults, throttling, latency) and the media come from
//! `card_firmware`.

pub mod agent;
pub mod config;
pub mod device;
pub mod metrics;
pub mod queue;
pub mod request;
pub mod sandbox;

use card_firmware::media::FileMedia;
use card_firmware::middle::Middle;

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
    /// Faults, EBS throttling and modelled latency, shared by every queue.
    pub middle: Middle,
}

impl Volume {
    /// Everything the card counts, as the metrics file and the agent
    /// socket show it: the card's counters, the middle's, the modelled
    /// volume's type and limits, and its figures in CloudWatch's names.
    pub fn snapshot(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let mut snapshot = self.metrics.snapshot();
        let c = &self.middle.counters;
        snapshot["middle"] = serde_json::json!({
            "throttled": c.throttled.load(Relaxed),
            "fault_errors": c.fault_errors.load(Relaxed),
            "fault_delays": c.fault_delays.load(Relaxed),
            "fault_stalls": c.fault_stalls.load(Relaxed),
        });
        if let Some(volume) = self.volume_document() {
            snapshot["volume"] = volume;
        }
        if let Some(volume) = self.middle.volume_metrics() {
            snapshot["cloudwatch"] = serde_json::to_value(volume).unwrap_or_default();
        }
        snapshot
    }

    /// The modelled volume: type, provisioned figures and the limits they
    /// give (they change with the agent's `volume_modify`).
    pub fn volume_document(&self) -> Option<serde_json::Value> {
        let (spec, limits) = self.middle.volume()?;
        Some(serde_json::json!({
            "volume_type": spec.volume_type.as_str(),
            "size_bytes": spec.size_bytes,
            "iops": spec.iops,
            "throughput": spec.throughput_mibps,
            "limits": limits,
        }))
    }
}
