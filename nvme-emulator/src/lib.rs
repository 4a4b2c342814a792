//! cardsim's local-NVMe (instance store) card: an NVMe 1.4 controller
//! served out of process over vfio-user, with namespaces on local files
//! driven through io_uring.
//!
//! - [`agent`]: the card's agent operations (faults, metrics);
//! - [`spec`]: register offsets, opcodes, status codes, queue entry layouts;
//! - [`dma`]: the driver's memory, reachable only through the regions the
//!   client mapped (the [`dma::DmaMemory`] seam);
//! - [`datapath`]: PRP and SGL walking;
//! - [`controller`]: registers, queues, features, reset and shutdown, the
//!   admin thread;
//! - [`admin`]: admin commands (Identify, queues, features, log pages,
//!   Doorbell Buffer Config);
//! - [`io`]: per-queue workers on io_uring (the NVM command set);
//! - [`namespace`]: namespaces on files and their command-line form;
//! - [`pci`]: PCI configuration space;
//! - [`server`]: the vfio-user server;
//! - [`sandbox`]: the system calls the card may make once jailed.

pub mod admin;
pub mod agent;
pub mod controller;
pub mod datapath;
pub mod dma;
pub mod io;
pub mod namespace;
pub mod pci;
pub mod sandbox;
pub mod server;
pub mod spec;

#[cfg(test)]
mod tests;
