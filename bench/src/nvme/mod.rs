//! The host side of the local-NVMe card: a userspace NVMe driver over
//! vfio-user (what a VMM and its guest's nvme driver do, in one process),
//! the `cardbench nvme` load generator on it, and `compare-nvme` against
//! raw fio on the same namespace file.

pub mod compare;
pub mod dma;
pub mod driver;
pub mod identify;
pub mod load;
pub mod prp;
pub mod queue;
pub mod spec;
mod transport;

pub use driver::{Controller, DataPointer, DriverConfig, DriverError, IoQueue, NamespaceInfo};
