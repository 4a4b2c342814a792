//! Per-ENI counters, named as ENA names them where ENA has one
//! (`ethtool -S` on an EC2 instance: bw_in_allowance_exceeded, …).
//!
//! Written by the port's own queue threads and by the threads delivering
//! into it (other ports, VXLAN), read by metrics: plain relaxed atomics.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use crate::chain::ChainError;

#[derive(Debug, Default)]
pub struct PortCounters {
    /// Frames the guest sent that the switch accepted.
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames delivered into the guest's receive buffers.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Outbound frames held back by the bandwidth bucket (ENA: bw_out_allowance_exceeded).
    pub bw_out_allowance_exceeded: AtomicU64,
    /// Inbound frames dropped by the bandwidth bucket (ENA: bw_in_allowance_exceeded).
    pub bw_in_allowance_exceeded: AtomicU64,
    /// Frames held back (out) or dropped (in) by the packets-per-second bucket.
    pub pps_allowance_exceeded: AtomicU64,
    /// Frames held in the receive backlog because the guest had no buffer free.
    pub rx_backlogged: AtomicU64,
    /// Frames for this port dropped because its guest is not connected.
    pub rx_dropped_port_down: AtomicU64,
    /// GSO frames segmented in software for this port (no GUEST_TSO).
    pub rx_segmented: AtomicU64,
    /// Partial checksums completed in software for this port (no GUEST_CSUM).
    pub rx_checksummed: AtomicU64,
    /// Frames for this port dropped because software segmentation or
    /// checksum completion found their headers inconsistent.
    pub rx_offload_errors: AtomicU64,
    /// Frames for this port dropped because they are longer than its MTU.
    pub rx_oversized: AtomicU64,
    /// Descriptor chains refused, by reason.
    pub chain_errors: [AtomicU64; ChainError::ALL.len()],
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl PortCounters {
    pub fn chain_error(&self, e: ChainError) {
        add(&self.chain_errors[e.index()], 1);
    }

    pub fn chain_errors_total(&self) -> u64 {
        self.chain_errors
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut chains = Map::new();
        for e in ChainError::ALL {
            chains.insert(e.name().into(), json!(get(&self.chain_errors[e.index()])));
        }
        json!({
            "tx_packets": get(&self.tx_packets),
            "tx_bytes": get(&self.tx_bytes),
            "rx_packets": get(&self.rx_packets),
            "rx_bytes": get(&self.rx_bytes),
            "bw_in_allowance_exceeded": get(&self.bw_in_allowance_exceeded),
            "bw_out_allowance_exceeded": get(&self.bw_out_allowance_exceeded),
            "pps_allowance_exceeded": get(&self.pps_allowance_exceeded),
            "rx_backlogged": get(&self.rx_backlogged),
            "rx_dropped_port_down": get(&self.rx_dropped_port_down),
            "rx_segmented": get(&self.rx_segmented),
            "rx_checksummed": get(&self.rx_checksummed),
            "rx_offload_errors": get(&self.rx_offload_errors),
            "rx_oversized": get(&self.rx_oversized),
            "chain_errors": chains,
        })
    }
}
