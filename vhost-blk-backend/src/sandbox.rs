//! The system calls the block card makes once it is jailed: the whole
//! process, and its queue workers (which read the guest's requests) apart.
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
        // The metrics file: written beside (openat is in the base), then
        // renamed over.
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        // The inflight region: created for GET_INFLIGHT_FD, sized by
        // lseek when the VMM hands it back (card_firmware::inflight).
        SYS_memfd_create,
        SYS_ftruncate,
        SYS_lseek,
    ])
}

/// What a queue worker does: wait on its kicks, completion eventfd and
/// timer; enter its ring; read back old data for the power-cut undo log;
/// signal the guest; allocate; log; and end.
pub fn queue_worker_allowlist() -> Allowlist {
    Allowlist::queue_worker_base().with(&syscalls![
        SYS_epoll_wait,
        SYS_io_uring_enter,
        SYS_timerfd_settime,
        // Old data for the power-cut undo log.
        SYS_pread64,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use card_firmware::sandbox::documented_allowlist;

    const SECURITY_MD: &str = include_str!("../../docs/SECURITY.md");

    #[test]
    fn security_md_lists_the_process_allowlist() {
        assert_eq!(
            documented_allowlist(SECURITY_MD, "vhost-blk-backend process"),
            allowlist().names()
        );
    }

    #[test]
    fn security_md_lists_the_queue_worker_allowlist() {
        assert_eq!(
            documented_allowlist(SECURITY_MD, "vhost-blk-backend queue worker"),
            queue_worker_allowlist().names()
        );
    }

    #[test]
    fn a_queue_worker_needs_no_more_than_the_process() {
        let process = allowlist().names();
        for call in queue_worker_allowlist().names() {
            assert!(
                process.contains(&call),
                "{call} is not in the process allowlist"
            );
        }
    }
}
