//! cardbench: host-side load generators that play the VMM's part.

pub mod blk;
pub mod chart;
pub mod compare;
pub mod error;
pub mod frontend;
pub mod memory;
pub mod net;
pub mod nvme;
pub mod pattern;
pub mod report;
pub mod ring;
pub mod units;
