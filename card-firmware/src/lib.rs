//! What every cardsim card shares.
//!
//! A card is one process that faces a guest through a VMM socket (vhost-user
//! or vfio-user) and does its I/O on io_uring. This crate holds the parts that
//! do not depend on which device the guest sees:
//!
//! - [`agent`]: the card end of the management channel, the versioned
//!   agent protocol (JSON lines) the control plane configures cards with;
//! - [`boot`]: verified card images (signed manifests, sealed binaries) and
//!   the measured-boot log of what was started;
//! - [`media`]: volume media (a local file) and the io_uring operations on it;
//! - [`ring`]: a per-queue io_uring whose completions wake an eventfd, so a
//!   queue worker waits on its kicks and its completions in one place;
//! - [`socket`]: claiming a socket path without harming a live card or a file
//!   that is not ours;
//! - [`vhost`]: serving a vhost-user backend connection after connection, so a
//!   VMM that reconnects finds the card again;
//! - [`metrics`]: periodic JSON snapshots of a card's counters;
//! - [`warn`]: rate-limited warnings, so a hostile guest cannot flood the log.

pub mod agent;
pub mod boot;
pub mod inflight;
pub mod media;
pub mod metrics;
pub mod middle;
pub mod ring;
pub mod sandbox;
pub mod socket;
pub mod timer;
pub mod vhost;
pub mod warn;
