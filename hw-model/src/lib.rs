//! cardsim's performance and fault model of cloud I/O, with no I/O of its own.
//!
//! - [`token_bucket`]: token buckets and rate limiters in Firecracker's shape
//!   (`size`, `one_time_burst`, `refill_time` in ms; bandwidth and ops).
//! - [`ebs`]: EBS volume types (gp2, gp3, io1, io2, st1, sc1) with AWS's
//!   published limits, gp2 I/O credits and st1/sc1 throughput credits, I/O
//!   counted the way EBS counts it, and CloudWatch-style metrics.
//! - [`instance`]: a small catalog of instance types and their EBS and
//!   network allowances.
//! - [`latency`]: service-time models of an EBS network hop and of local flash.
//! - [`fault`]: fault plans (errors, latency, stalls, power cuts, crashes, and
//!   network faults as data) with a CLI form.
//! - [`clock`]: the clocks callers read `now` from, including one that runs
//!   model time faster than the wall clock.
//!
//! Deterministic by construction: every function that depends on time takes
//! `now: Duration` (model time since an epoch of the caller's choosing), and
//! randomness comes from [`rng::Rng`] with an explicit seed. The same inputs
//! give the same outputs on every run and machine.
//!
//! The card's admission loop, in short:
//! ```
//! use std::time::Duration;
//! use hw_model::ebs::{IoDirection, VolumeModel, VolumeSpec, VolumeType};
//!
//! let mut vol = VolumeModel::new(&VolumeSpec::gib(VolumeType::Gp2, 100), Duration::ZERO)?;
//! let now = Duration::ZERO;
//! match vol.admit(IoDirection::Read, 0, 4096, now) {
//!     Ok(()) => { /* submit; later: */ vol.on_complete(IoDirection::Read, 4096, now) }
//!     Err(not_before) => { /* park the request until model time `not_before` */ let _ = not_before; }
//! }
//! # Ok::<(), hw_model::ebs::SpecError>(())
//! ```

pub mod clock;
pub mod ebs;
pub mod fault;
pub mod instance;
pub mod latency;
pub mod rng;
pub mod token_bucket;
