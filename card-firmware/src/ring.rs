//! A queue worker's io_uring.
//!
//! Each virtqueue (or NVMe queue pair) has one worker thread that owns one
//! ring. The ring signals an eventfd when completions arrive; the worker waits
//! on that eventfd beside the queue's kick eventfd, so kicks and completions
//! wake the same thread and nothing is handed between threads on the I/O path.
//! Submissions are batched: entries are queued while the available ring is
//! drained and entered into the kernel with one `io_uring_enter`.
//!
//! A ring is born disabled, told which operations it may ever carry
//! (IORING_REGISTER_RESTRICTIONS), then enabled. seccomp does not see what a
//! ring does, so this is what keeps a confused or subverted queue worker from
//! using its ring to open, connect or do anything but media I/O.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// One completed operation: the caller's tag and the kernel's result
/// (bytes transferred, or a negative errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub result: i32,
}

/// A ring of `entries` built by `builder`, restricted to `operations`
/// (io_uring opcodes) and submission `flags`: born disabled, `before_enable`
/// registers what it must (no register operation is allowed afterwards),
/// then restricted and enabled. An operation outside the list completes with
/// -EACCES.
pub fn restricted_ring(
    builder: &mut io_uring::Builder,
    entries: u32,
    operations: &[u8],
    flags: squeue::Flags,
    before_enable: impl FnOnce(&IoUring) -> io::Result<()>,
) -> io::Result<IoUring> {
    let ring = builder.setup_r_disabled().build(entries)?;
    before_enable(&ring)?;
    let mut restrictions: Vec<Restriction> = operations
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    restrictions.push(Restriction::sqe_flags_allowed(flags.bits()));
    let submitter = ring.submitter();
    submitter.register_restrictions(&mut restrictions)?;
    submitter.register_enable_rings()?;
    Ok(ring)
}

/// What a queue's ring does to a volume's media: vectored and plain reads
/// and writes, fsync for flushes, fallocate for discard and write-zeroes
/// (and no-ops).
pub const MEDIA_OPERATIONS: &[u8] = &[
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
    opcode::Nop::CODE,
];

pub struct QueueRing {
    ring: IoUring,
    completion_event: EventFd,
    in_flight: usize,
    unsubmitted: usize,
}

impl QueueRing {
    /// A ring that can hold `depth` operations in flight: the queue's size,
    /// since a virtqueue cannot have more requests outstanding than that.
    /// It carries [`MEDIA_OPERATIONS`] only.
    pub fn new(depth: u32) -> io::Result<Self> {
        Self::with_operations(depth, MEDIA_OPERATIONS, squeue::Flags::IO_LINK)
    }

    /// A ring restricted to the `operations` (io_uring opcodes) and the
    /// submission `flags` given; anything else completes with -EACCES.
    pub fn with_operations(
        depth: u32,
        operations: &[u8],
        flags: squeue::Flags,
    ) -> io::Result<Self> {
        let completion_event = EventFd::new(EFD_NONBLOCK)?;
        let ring = restricted_ring(
            IoUring::builder().setup_cqsize(depth.saturating_mul(2).max(8)),
            depth.max(4),
            operations,
            flags,
            |ring| {
                ring.submitter()
                    .register_eventfd(completion_event.as_raw_fd())
                    .map(drop)
            },
        )?;
        Ok(Self {
            ring,
            completion_event,
            in_flight: 0,
            unsubmitted: 0,
        })
    }

    /// The eventfd that becomes readable when completions are waiting.
    pub fn completion_fd(&self) -> RawFd {
        self.completion_event.as_raw_fd()
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `entry` tagged with `tag`, entering the kernel early only when
    /// the submission queue is full.
    ///
    /// # Safety
    /// Whatever memory `entry` points at must stay valid until its completion
    /// is reaped.
    pub unsafe fn push(&mut self, entry: squeue::Entry, tag: u64) -> io::Result<()> {
        let entry = entry.user_data(tag);
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Enters every queued entry into the kernel with one system call.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is momentarily full: the caller reaps
                // and submits again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Clears the completion eventfd and hands every available completion to
    /// `f`. Returns how many were reaped.
    pub fn reap(&mut self, mut f: impl FnMut(Completion)) -> usize {
        // Reset first: a completion landing after this read re-arms it.
        let _ = self.completion_event.read();
        let mut reaped = 0;
        for cqe in self.ring.completion() {
            reaped += 1;
            f(Completion {
                tag: cqe.user_data(),
                result: cqe.result(),
            });
        }
        self.in_flight -= reaped.min(self.in_flight);
        reaped
    }

    /// Blocks until every operation in flight has completed, handing each
    /// completion to `f`. Used when a queue is stopped or the VMM goes away:
    /// guest memory must not be released while the kernel may still write it.
    pub fn drain(&mut self, mut f: impl FnMut(Completion)) -> io::Result<()> {
        self.submit()?;
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            self.unsubmitted = 0;
            self.reap(&mut f);
        }
        Ok(())
    }
}

impl std::fmt::Debug for QueueRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRing")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;

    #[test]
    fn completions_wake_the_eventfd_and_carry_their_tag() {
        let mut ring = QueueRing::new(8).unwrap();
        for tag in [7, 9] {
            // SAFETY: a no-op touches no memory.
            unsafe { ring.push(opcode::Nop::new().build(), tag).unwrap() };
        }
        assert_eq!(ring.in_flight(), 2);
        let mut seen = Vec::new();
        ring.drain(|c| seen.push(c.tag)).unwrap();
        seen.sort();
        assert_eq!(seen, [7, 9]);
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn an_operation_outside_the_ring_restrictions_is_refused() {
        let mut ring = QueueRing::new(8).unwrap();
        let path = c"/etc/hostname";
        let open = opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        // SAFETY: the path is a static C string.
        unsafe { ring.push(open, 1).unwrap() };
        // SAFETY: a no-op touches no memory.
        unsafe { ring.push(opcode::Nop::new().build(), 2).unwrap() };
        let mut seen = Vec::new();
        ring.drain(|c| seen.push((c.tag, c.result))).unwrap();
        seen.sort();
        assert_eq!(seen, [(1, -libc::EACCES), (2, 0)]);
    }

    #[test]
    fn a_full_submission_queue_is_entered_early_not_dropped() {
        let mut ring = QueueRing::new(4).unwrap();
        for tag in 0..32 {
            // SAFETY: a no-op touches no memory.
            unsafe { ring.push(opcode::Nop::new().build(), tag).unwrap() };
            if ring.in_flight() >= 4 {
                ring.drain(|_| {}).unwrap();
            }
        }
        let mut count = 0;
        ring.drain(|_| count += 1).unwrap();
        assert_eq!(ring.in_flight(), 0);
    }
}
