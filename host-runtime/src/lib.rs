//! What the control plane runs on the host: card processes under
//! supervision, and instances (QEMU guests) driven over QMP.
//!
//! - [`qmp`]: a blocking QMP client (commands, typed errors, buffered events);
//! - [`instance`]: launching a guest with the cards' devices, or registering
//!   an existing VMM, and volume hot-plug;
//! - [`card`]: card processes under a supervisor that restarts them with
//!   backoff and checks their health through their agent sockets;
//! - [`cpio`]: the newc writer that puts an instance's user data into its
//!   initramfs.

pub mod card;
pub mod cpio;
pub mod instance;
pub mod qmp;

/// The channel type [`card::Supervisor`] reports on, re-exported so callers
/// need not depend on it themselves.
pub use crossbeam_channel;
