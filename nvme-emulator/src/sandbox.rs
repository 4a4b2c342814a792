//! The system calls the NVMe card makes once it is jailed: the whole
//! process, and its I/O queue workers (which read the host's submission
//! entries and data pointers) apart.
//!
//! Measured with `strace -f` over the NVMe card's guest test (QEMU 11's
//! vfio-user-pci, fio with verify on two queues, flush, discard, write
//! zeroes, a controller reset under load, metrics). Startup (opening the
//! namespaces, binding the socket) happens before the filter.
//!
//! By thread:
//! - the socket thread (main): `accept4`, `recvmsg`/`recvfrom` and
//!   `sendmsg`/`sendto`/`writev` on the vfio-user connection, `mmap`/`munmap` and
//!   `fstat`/`statx` for DMA regions, `write` to eventfds (doorbells);
//! - `nvme-admin`: `poll` and `read` on its eventfd, `clone3` for a queue
//!   worker and `futex` to join one, `io_uring_setup`/`io_uring_register`
//!   and `eventfd2` for a queue's ring, `fdatasync` at shutdown, `write` to
//!   the admin MSI-X eventfd;
//! - `nvme-sqN` (one per I/O submission queue, started on Create I/O SQ):
//!   `poll`, `read`/`write` on eventfds (its doorbell, its ring, MSI-X),
//!   `io_uring_enter`, and what allocation and thread exit need;
//! - `metrics` (with `--metrics`): `openat`, `write`, `rename`,
//!   `clock_nanosleep`.

use card_firmware::sandbox::Allowlist;
use card_firmware::syscalls;

/// The NVMe card's allowlist.
pub fn allowlist() -> Allowlist {
    Allowlist::card_base().with(&syscalls![
        // The vfio-user crate answers VERSION with one vectored write.
        SYS_writev,
        // Doorbell and completion waits use poll(2); a poll with a timeout
        // interrupted by a signal resumes through restart_syscall.
        SYS_poll,
        SYS_ppoll,
        SYS_restart_syscall,
        // A DMA region is checked against its file's size before mapping.
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        // The metrics file: written beside, then renamed over.
        SYS_openat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
    ])
}

/// What an I/O queue worker does: wait on its doorbell and completion
/// eventfds, enter its ring, signal MSI-X eventfds, allocate, log, and end
/// (dropping its ring).
pub fn queue_worker_allowlist() -> Allowlist {
    Allowlist::queue_worker_base().with(&syscalls![
        // Doorbell and completion waits use poll(2).
        SYS_poll,
        SYS_ppoll,
        SYS_io_uring_enter,
    ])
}

#[cfg(test)]
mod tests {
    use card_firmware::sandbox::documented_allowlist;

    const SECURITY_MD: &str = include_str!("../../docs/SECURITY.md");

    #[test]
    fn security_md_lists_the_process_allowlist() {
        assert_eq!(
            documented_allowlist(SECURITY_MD, "nvme-emulator process"),
            allowlist().names()
        );
    }

    #[test]
    fn security_md_lists_the_queue_worker_allowlist() {
        assert_eq!(
            documented_allowlist(SECURITY_MD, "nvme-emulator queue worker"),
            queue_worker_allowlist().names()
        );
    }

    use super::*;

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

    #[test]
    fn both_allowlists_compile() {
        allowlist().compile().unwrap();
        queue_worker_allowlist().compile().unwrap();
    }
}
