//! The block card's counters.
//!
//! Counted per queue (each queue's worker is the only writer of its own
//! counters, so they never contend) and summed when a snapshot is taken.
//! They live for the card's lifetime, across VMM connections.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

use crate::request::RequestError;

#[derive(Debug, Default)]
pub struct QueueMetrics {
    pub requests: AtomicU64,
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub discard_ops: AtomicU64,
    pub write_zeroes_ops: AtomicU64,
    pub get_id_ops: AtomicU64,
    /// Requests refused as malformed (VIRTIO_BLK_S_IOERR without touching the media).
    pub invalid_requests: AtomicU64,
    /// Requests refused as unsupported (VIRTIO_BLK_S_UNSUPP).
    pub unsupported_requests: AtomicU64,
    /// Writes, discards and write-zeroes refused by a read-only volume.
    pub read_only_refusals: AtomicU64,
    /// Requests the media failed (VIRTIO_BLK_S_IOERR from the host's I/O).
    pub media_errors: AtomicU64,
    /// Chains the guest made available again while still in flight.
    pub duplicate_heads: AtomicU64,
    /// Requests a killed card left in flight, resubmitted from the VMM's
    /// inflight region when this card took over.
    pub resubmitted: AtomicU64,
}

impl QueueMetrics {
    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn refused(&self, error: RequestError) {
        let counter = if error.is_unsupported() {
            &self.unsupported_requests
        } else if error == RequestError::ReadOnly {
            &self.read_only_refusals
        } else {
            &self.invalid_requests
        };
        Self::count(counter, 1);
    }

    fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "requests": get(&self.requests),
            "read_ops": get(&self.read_ops),
            "write_ops": get(&self.write_ops),
            "read_bytes": get(&self.read_bytes),
            "write_bytes": get(&self.write_bytes),
            "flush_ops": get(&self.flush_ops),
            "discard_ops": get(&self.discard_ops),
            "write_zeroes_ops": get(&self.write_zeroes_ops),
            "get_id_ops": get(&self.get_id_ops),
            "invalid_requests": get(&self.invalid_requests),
            "unsupported_requests": get(&self.unsupported_requests),
            "read_only_refusals": get(&self.read_only_refusals),
            "media_errors": get(&self.media_errors),
            "duplicate_heads": get(&self.duplicate_heads),
            "resubmitted": get(&self.resubmitted),
        })
    }
}

#[derive(Debug)]
pub struct BlockMetrics {
    pub queues: Vec<QueueMetrics>,
}

impl BlockMetrics {
    pub fn new(num_queues: usize) -> Self {
        Self {
            queues: (0..num_queues).map(|_| QueueMetrics::default()).collect(),
        }
    }

    /// `{"total": {...}, "queues": [{...}, ...]}`
    pub fn snapshot(&self) -> serde_json::Value {
        let queues: Vec<serde_json::Value> = self.queues.iter().map(|q| q.snapshot()).collect();
        let mut total = serde_json::Map::new();
        for q in &queues {
            for (key, value) in q.as_object().into_iter().flatten() {
                let sum = total.get(key).and_then(|v| v.as_u64()).unwrap_or(0)
                    + value.as_u64().unwrap_or(0);
                total.insert(key.clone(), sum.into());
            }
        }
        json!({ "total": total, "queues": queues })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_the_queues() {
        let m = BlockMetrics::new(2);
        QueueMetrics::count(&m.queues[0].read_ops, 3);
        QueueMetrics::count(&m.queues[1].read_ops, 4);
        m.queues[1].refused(RequestError::UnsupportedType(99));
        let s = m.snapshot();
        assert_eq!(s["total"]["read_ops"], 7);
        assert_eq!(s["total"]["unsupported_requests"], 1);
        assert_eq!(s["queues"][1]["read_ops"], 4);
    }
}
