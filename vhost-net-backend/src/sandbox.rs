//! The system calls the networking card makes once serving, for
//! `card_firmware::sandbox` (the lead wires `SandboxArgs` into `main`).
//!
//! Measured with `strace -f` over the card's guest tests (DHCP, ping, iperf3
//! both ways with 2 queue pairs, an allowance, VXLAN to a Linux netns),
//! grouped by thread name from PR_SET_NAME:
//! - `vring_worker` (a port's queue-pair threads; they parse the guest's
//!   rings): epoll_wait, read (kicks, timer), write (call eventfds, logs),
//!   io_uring_enter (VXLAN/uplink sends), timerfd_settime (allowance), futex,
//!   memory and thread housekeeping;
//! - `vhost-net-backend` (the vhost-user protocol thread): recvmsg/sendmsg
//!   with descriptors, mmap of guest memory, epoll_ctl, fcntl, close;
//! - `port-<eni>`: accept4, new connection setup (eventfd2, epoll_create1,
//!   timerfd_create, io_uring_setup for the senders, clone3);
//! - `vxlan-rx`, `uplink-rx`: io_uring_enter; `metrics`: openat, write,
//!   rename, clock_nanosleep; `control`: accept4, recvfrom, sendto.
//!
//! Startup (config, binding sockets, opening the tap) happens before the
//! filter and is not listed.

use card_firmware::sandbox::Allowlist;
use card_firmware::syscalls;

/// The networking card's process allowlist.
pub fn allowlist() -> Allowlist {
    Allowlist::card_base().with(&syscalls![
        // The metrics file: written beside, then renamed over.
        SYS_openat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
    ])
}

/// What a queue-pair thread does: wait on kicks and its timer, copy frames,
/// signal guests, send on its rings, log, allocate, end.
pub fn queue_worker_allowlist() -> Allowlist {
    Allowlist::queue_worker_base().with(&syscalls![
        SYS_epoll_wait,
        SYS_io_uring_enter,
        SYS_timerfd_settime,
    ])
}

#[cfg(test)]
mod tests {
    use card_firmware::sandbox::documented_allowlist;

    const SECURITY_MD: &str = include_str!("../../docs/SECURITY.md");

    #[test]
    fn security_md_lists_the_process_allowlist() {
        assert_eq!(
            documented_allowlist(SECURITY_MD, "vhost-net-backend process"),
            allowlist().names()
        );
    }

    #[test]
    fn security_md_lists_the_queue_worker_allowlist() {
        assert_eq!(
            documented_allowlist(SECURITY_MD, "vhost-net-backend queue worker"),
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
    fn a_queue_worker_cannot_open_bind_or_exec() {
        let w = queue_worker_allowlist();
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_execve,
            libc::SYS_io_uring_setup,
            libc::SYS_ioctl,
        ] {
            assert!(!w.allows(nr), "{nr}");
        }
        w.compile().unwrap();
        allowlist().compile().unwrap();
    }
}
