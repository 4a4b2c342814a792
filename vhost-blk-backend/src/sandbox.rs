//! The system calls the block card makes once it is jailed.
//!
//! Measured with `strace -f` over the block-card tests (guest fio, faults,
//! control calls, metrics, reconnects); docs/SECURITY.md lists them per
//! thread. Everything in [`Allowlist::card_base`] plus what the metrics
//! writer needs to replace its file by name.

use card_firmware::sandbox::Allowlist;
use card_firmware::syscalls;

/// The block card's allowlist.
pub fn allowlist() -> Allowlist {
    Allowlist::card_base().with(&syscalls![
        // The metrics file: written beside, then renamed over.
        SYS_openat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
    ])
}
