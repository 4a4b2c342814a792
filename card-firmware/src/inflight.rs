//! Inflight I/O tracking across a card restart
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! On `GET_INFLIGHT_FD` the card creates a memfd; the VMM keeps it mapped
//! and hands it back with `SET_INFLIGHT_FD` on every (re)connection until the
//! guest resets the device. The card marks each request it takes from the
//! available ring in that region and clears the mark once the request's used
//! entry is published, so a card that is killed leaves behind exactly which
//! requests the guest still waits for. The restarted card resubmits those, in
//! the order it first took them, and nothing else.
//!
//! The layout is libvhost-user's and DPDK's split-ring `VuVirtqInflight`, one
//! per queue, each `queue_region_size` bytes:
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc[desc_num]: u8 inflight | u8 padding[5] | u16 next | u64 counter
//! ```
//!
//! Exactly once, as libvhost-user does it: before publishing a used entry the
//! card notes its head in `last_batch_head`; after the ring's used index moves
//! it clears the head's mark and copies the used index to `used_idx`. A card
//! killed between the two leaves `used_idx` one behind the ring's, which tells
//! the next card that `last_batch_head` was in fact completed. Every request
//! taken is either published (counted by the ring's used index) or marked, so
//! the next request to take is at `used index + marked`.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// The region version this card writes (libvhost-user's `INFLIGHT_VERSION`).
pub const INFLIGHT_VERSION: u16 = 1;
/// Each queue's part of the region starts on this boundary.
const QUEUE_ALIGNMENT: u64 = 64;
/// Bytes of one `VuDescStateSplit`.
const DESC_STATE_SIZE: usize = 16;
/// Bytes of the `VuVirtqInflight` header before `desc[]`.
const QUEUE_HEADER_SIZE: usize = 16;

// Offsets inside a queue's header and inside a descriptor's state.
const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
const DESC_INFLIGHT: usize = 0;
const DESC_COUNTER: usize = 8;

/// Where the rebuilt chains' private available ring lives: far above any
/// guest physical address a VMM hands out.
const SCRATCH_BASE: u64 = 1 << 63;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region for {asked} queues, the card has {max}")]
    QueueCount { asked: u16, max: u16 },
    #[error("inflight region for queues of {asked} entries, the card accepts 1..={max}")]
    QueueSize { asked: u16, max: u16 },
    #[error("inflight region of {size} bytes is smaller than the {needed} its queues need")]
    TooSmall { size: u64, needed: u64 },
    #[error("inflight region offset {0} is not page-aligned")]
    Unaligned(u64),
    #[error("inflight file holds {file} bytes, the region ends at {end}")]
    FileTooShort { file: u64, end: u64 },
    #[error("inflight file is not sealed against shrinking (not the card's memfd)")]
    NotSealed,
    #[error("inflight region: {what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rebuilding resubmitted chains: {0}")]
    Rebuild(String),
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> InflightError {
    move |source| InflightError::Os { what, source }
}

/// Bytes of one queue's part of the region, as libvhost-user and QEMU size
/// it (`vu_inflight_queue_size`): its descriptor states plus a little, on a
/// 64-byte boundary — which leaves room for the 16-byte header when the
/// queue size is a multiple of 4, as every virtqueue size the card accepts is.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = (DESC_STATE_SIZE * usize::from(queue_size) + 2) as u64;
    raw.div_ceil(QUEUE_ALIGNMENT) * QUEUE_ALIGNMENT
}

fn checked_shape(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<u64, InflightError> {
    if num_queues == 0 || num_queues > max_queues {
        return Err(InflightError::QueueCount {
            asked: num_queues,
            max: max_queues,
        });
    }
    // A multiple of 4 keeps the header inside libvhost-user's sizing.
    if queue_size == 0 || queue_size > max_queue_size || queue_size % 4 != 0 {
        return Err(InflightError::QueueSize {
            asked: queue_size,
            max: max_queue_size,
        });
    }
    Ok(queue_region_size(queue_size) * u64::from(num_queues))
}

/// Creates the zeroed region a VMM asked for with `GET_INFLIGHT_FD`: the file
/// to share and its size. Queues set themselves up the first time they
/// recover (version 0 means new).
pub fn create_region(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<(File, u64), InflightError> {
    let size = checked_shape(num_queues, queue_size, max_queues, max_queue_size)?;
    // SAFETY: a NUL-terminated name and plain flags; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"cardsim-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(os("memfd_create")(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(os("ftruncate"))?;
    // Sealed: whoever holds it can never shrink it under the card's mapping
    // (an access past the end would kill the card with SIGBUS).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(os("F_ADD_SEALS")(std::io::Error::last_os_error()));
    }
    Ok((file, size))
}

/// A region the VMM handed over with `SET_INFLIGHT_FD`, mapped.
pub struct InflightRegion {
    map: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is shared memory accessed only through atomics; it
// stays mapped for the region's lifetime.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// Maps `file` after checking the VMM's description of it against the
    /// card's limits and the file's real size (so no access can fault).
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<Arc<Self>, InflightError> {
        let needed = checked_shape(num_queues, queue_size, max_queues, max_queue_size)?;
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                size: mmap_size,
                needed,
            });
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if mmap_offset % page != 0 {
            return Err(InflightError::Unaligned(mmap_offset));
        }
        // Only a file that cannot shrink under the mapping: the card's own memfd.
        // SAFETY: fcntl on a descriptor the caller owns, no pointer argument.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        // lseek, not fstat: one system call the jailed card already needs.
        let file_len = (&*file).seek(SeekFrom::End(0)).map_err(os("lseek"))?;
        let end = mmap_offset.saturating_add(mmap_size);
        if file_len < end {
            return Err(InflightError::FileTooShort {
                file: file_len,
                end,
            });
        }
        // Only what the queues use is mapped: a huge mmap_size maps nothing more.
        let len = needed as usize;
        let offset =
            libc::off_t::try_from(mmap_offset).map_err(|_| InflightError::FileTooShort {
                file: file_len,
                end,
            })?;
        // SAFETY: a fresh shared mapping of a range the file holds (checked above).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os("mmap")(std::io::Error::last_os_error()));
        }
        let map = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| os("mmap")(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        Ok(Arc::new(Self {
            map,
            len,
            num_queues,
            queue_size,
        }))
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The tracker of queue `index`, or None if the region has no such queue.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        if index >= self.num_queues {
            return None;
        }
        Some(QueueInflight {
            base: queue_region_size(self.queue_size) as usize * usize::from(index),
            queue_size: self.queue_size,
            counter: 0,
            region: self.clone(),
        })
    }

    fn at(&self, offset: usize, size: usize) -> *mut u8 {
        assert!(
            offset + size <= self.len,
            "inflight access out of the region"
        );
        // SAFETY: in bounds (asserted); every offset used is size-aligned.
        unsafe { self.map.as_ptr().add(offset) }
    }

    fn u8_at(&self, offset: usize) -> &AtomicU8 {
        // SAFETY: in bounds, shared memory alive as long as self.
        unsafe { AtomicU8::from_ptr(self.at(offset, 1)) }
    }

    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: in bounds and 2-aligned (the mapping is page-aligned and every
        // offset is a multiple of the field's size).
        unsafe { AtomicU16::from_ptr(self.at(offset, 2).cast()) }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: in bounds and 8-aligned, as above.
        unsafe { AtomicU64::from_ptr(self.at(offset, 8).cast()) }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped; nothing refers to it now.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.len) };
    }
}

/// What a restarted queue must do before it takes new requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads the guest still waits for, in the order the card first took them.
    pub resubmit: Vec<u16>,
    /// Where the available ring continues, or None for a new region (the
    /// VMM's SET_VRING_BASE stands).
    pub next_avail: Option<u16>,
}

/// One queue's part of the region.
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    base: usize,
    queue_size: u16,
    /// Order of taking, for resubmission.
    counter: u64,
}

impl QueueInflight {
    fn desc(&self, head: u16) -> usize {
        self.base + QUEUE_HEADER_SIZE + DESC_STATE_SIZE * usize::from(head)
    }

    fn tracks(&self, head: u16) -> bool {
        head < self.queue_size
    }

    /// The card took `head` from the available ring.
    pub fn taken(&mut self, head: u16) {
        if !self.tracks(head) {
            return;
        }
        let d = self.desc(head);
        self.region
            .u64_at(d + DESC_COUNTER)
            .store(self.counter, Ordering::Relaxed);
        self.counter += 1;
        self.region
            .u8_at(d + DESC_INFLIGHT)
            .store(1, Ordering::Release);
    }

    /// The card is about to publish `head`'s used entry.
    pub fn publishing(&self, head: u16) {
        if self.tracks(head) {
            self.region
                .u16_at(self.base + LAST_BATCH_HEAD)
                .store(head, Ordering::Release);
        }
    }

    /// `head`'s used entry is published and the ring's used index is now
    /// `used_idx`.
    pub fn published(&self, head: u16, used_idx: u16) {
        if self.tracks(head) {
            self.region
                .u8_at(self.desc(head) + DESC_INFLIGHT)
                .store(0, Ordering::Release);
        }
        self.region
            .u16_at(self.base + USED_IDX)
            .store(used_idx, Ordering::Release);
    }

    /// Reconciles the region with the ring's used index as the guest sees it
    /// (libvhost-user's `vu_check_queue_inflights`) and says what to resubmit.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovery {
        let r = &self.region;
        if r.u16_at(self.base + VERSION).load(Ordering::Acquire) != INFLIGHT_VERSION {
            // A new region: nothing was taken on it yet.
            for head in 0..self.queue_size {
                r.u8_at(self.desc(head) + DESC_INFLIGHT)
                    .store(0, Ordering::Relaxed);
            }
            r.u16_at(self.base + DESC_NUM)
                .store(self.queue_size, Ordering::Relaxed);
            r.u16_at(self.base + USED_IDX)
                .store(ring_used_idx, Ordering::Relaxed);
            r.u16_at(self.base + VERSION)
                .store(INFLIGHT_VERSION, Ordering::Release);
            self.counter = 0;
            return Recovery {
                resubmit: Vec::new(),
                next_avail: None,
            };
        }
        if r.u16_at(self.base + USED_IDX).load(Ordering::Acquire) != ring_used_idx {
            // Killed after publishing last_batch_head, before clearing its mark.
            let last = r
                .u16_at(self.base + LAST_BATCH_HEAD)
                .load(Ordering::Acquire);
            if self.tracks(last) {
                r.u8_at(self.desc(last) + DESC_INFLIGHT)
                    .store(0, Ordering::Release);
            }
            r.u16_at(self.base + USED_IDX)
                .store(ring_used_idx, Ordering::Release);
        }
        let mut marked: Vec<(u64, u16)> = (0..self.queue_size)
            .filter(|&head| {
                r.u8_at(self.desc(head) + DESC_INFLIGHT)
                    .load(Ordering::Acquire)
                    != 0
            })
            .map(|head| {
                let counter = r
                    .u64_at(self.desc(head) + DESC_COUNTER)
                    .load(Ordering::Acquire);
                (counter, head)
            })
            .collect();
        marked.sort_unstable();
        self.counter = marked.last().map_or(0, |&(c, _)| c.saturating_add(1));
        Recovery {
            next_avail: Some(ring_used_idx.wrapping_add(marked.len() as u16)),
            resubmit: marked.into_iter().map(|(_, head)| head).collect(),
        }
    }
}

/// Descriptor chains rebuilt from head indices alone, for resubmission: the
/// heads go into a private available ring (in a scratch region above guest
/// memory), so virtio-queue walks each chain — indirect tables, loops and
/// bounds checks included — exactly as it walks a guest's.
pub struct ResubmittedChains {
    memory: GuestMemoryMmap,
    queue: Queue,
}

impl ResubmittedChains {
    pub fn new(
        guest: &GuestMemoryMmap,
        desc_table: u64,
        queue_size: u16,
        heads: &[u16],
    ) -> Result<Self, InflightError> {
        let rebuild = |e: &dyn std::fmt::Display| InflightError::Rebuild(e.to_string());
        let avail_len = (6 + 2 * usize::from(queue_size)).next_multiple_of(4096);
        let used_len = (6 + 8 * usize::from(queue_size)).next_multiple_of(4096);
        let mapping = MmapRegion::new(avail_len + used_len).map_err(|e| rebuild(&e))?;
        let scratch = GuestRegionMmap::new(mapping, GuestAddress(SCRATCH_BASE))
            .ok_or_else(|| rebuild(&"scratch region"))?;
        let memory = guest
            .insert_region(Arc::new(scratch))
            .map_err(|e| rebuild(&e))?;
        let mut queue = Queue::new(queue_size).map_err(|e| rebuild(&e))?;
        queue.try_set_size(queue_size).map_err(|e| rebuild(&e))?;
        queue
            .try_set_desc_table_address(GuestAddress(desc_table))
            .map_err(|e| rebuild(&e))?;
        queue
            .try_set_avail_ring_address(GuestAddress(SCRATCH_BASE))
            .map_err(|e| rebuild(&e))?;
        queue
            .try_set_used_ring_address(GuestAddress(SCRATCH_BASE + avail_len as u64))
            .map_err(|e| rebuild(&e))?;
        queue.set_ready(true);
        let heads = &heads[..heads.len().min(usize::from(queue_size))];
        for (i, head) in heads.iter().enumerate() {
            memory
                .write_obj(head.to_le(), GuestAddress(SCRATCH_BASE + 4 + 2 * i as u64))
                .map_err(|e| rebuild(&e))?;
        }
        memory
            .write_obj((heads.len() as u16).to_le(), GuestAddress(SCRATCH_BASE + 2))
            .map_err(|e| rebuild(&e))?;
        Ok(Self { memory, queue })
    }

    /// The next chain to resubmit. Its descriptors come from the guest's
    /// table; check its buffers against guest memory, not this one.
    pub fn next_chain(&mut self) -> Option<DescriptorChain<&GuestMemoryMmap>> {
        self.queue.pop_descriptor_chain(&self.memory)
    }
}

/// Reads a queue's raw header fields (for tests and diagnostics):
/// `(version, desc_num, last_batch_head, used_idx)`.
pub fn read_queue_header(
    file: &File,
    queue_size: u16,
    index: u16,
) -> std::io::Result<(u16, u16, u16, u16)> {
    let mut h = [0u8; QUEUE_HEADER_SIZE];
    file.read_exact_at(&mut h, queue_region_size(queue_size) * u64::from(index))?;
    let at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    Ok((at(VERSION), at(DESC_NUM), at(LAST_BATCH_HEAD), at(USED_IDX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const QS: u16 = 128;

    fn region(queues: u16) -> (File, Arc<InflightRegion>) {
        let (file, size) = create_region(queues, QS, 4, 1024).unwrap();
        let region = InflightRegion::map(&file, size, 0, queues, QS, 4, 1024).unwrap();
        (file, region)
    }

    /// A ring's used index as the guest sees it, moved the way a queue worker
    /// moves it around each publication.
    struct Ring {
        used_idx: u16,
    }

    impl Ring {
        fn publish(&mut self, q: &QueueInflight, head: u16) {
            q.publishing(head);
            self.used_idx = self.used_idx.wrapping_add(1);
            q.published(head, self.used_idx);
        }
    }

    #[test]
    fn sizes_match_libvhost_user() {
        // ALIGN_UP(16 * 128 + 2, 64) and ALIGN_UP(16 * 256 + 2, 64).
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        let (file, size) = create_region(2, 256, 4, 1024).unwrap();
        assert_eq!(size, 8320);
        assert_eq!(file.metadata().unwrap().len(), 8320);
    }

    #[test]
    fn a_new_region_keeps_the_vmms_base_and_is_stamped_with_the_version() {
        let (file, region) = region(2);
        let mut q1 = region.queue(1).unwrap();
        let recovery = q1.recover(7);
        assert_eq!(recovery.resubmit, Vec::<u16>::new());
        assert_eq!(recovery.next_avail, None);
        assert_eq!(read_queue_header(&file, QS, 1).unwrap(), (1, QS, 0, 7));
        assert_eq!(read_queue_header(&file, QS, 0).unwrap(), (0, 0, 0, 0));
    }

    #[test]
    fn published_requests_are_not_resubmitted_and_the_rest_are_in_taking_order() {
        let (_file, region) = region(1);
        let mut card = region.queue(0).unwrap();
        let mut ring = Ring { used_idx: 40 };
        assert_eq!(card.recover(ring.used_idx).next_avail, None);
        for head in [9, 2, 4, 30, 17] {
            card.taken(head);
        }
        // Completed out of order.
        ring.publish(&card, 4);
        ring.publish(&card, 9);
        drop(card); // kill -9

        let mut restarted = region.queue(0).unwrap();
        let recovery = restarted.recover(ring.used_idx);
        assert_eq!(recovery.resubmit, [2, 30, 17]);
        // 42 published + 3 marked = 45 taken.
        assert_eq!(recovery.next_avail, Some(45));
    }

    #[test]
    fn killed_between_publishing_and_clearing_the_mark_completes_once() {
        let (_file, region) = region(1);
        let mut card = region.queue(0).unwrap();
        card.recover(0);
        for head in [5, 6, 7] {
            card.taken(head);
        }
        // Head 6's used entry reaches the guest; the card dies before
        // clearing its mark.
        card.publishing(6);
        let ring_used_idx = 1;
        drop(card);

        let mut restarted = region.queue(0).unwrap();
        let recovery = restarted.recover(ring_used_idx);
        assert_eq!(recovery.resubmit, [5, 7]);
        assert_eq!(recovery.next_avail, Some(3));
    }

    #[test]
    fn used_index_wraps_and_counters_continue_after_a_restart() {
        let (_file, region) = region(1);
        let mut card = region.queue(0).unwrap();
        let mut ring = Ring { used_idx: u16::MAX };
        card.recover(ring.used_idx);
        card.taken(1);
        card.taken(2);
        ring.publish(&card, 1);
        drop(card);

        let mut second = region.queue(0).unwrap();
        let recovery = second.recover(ring.used_idx);
        assert_eq!(recovery.resubmit, [2]);
        assert_eq!(recovery.next_avail, Some(1));
        // Resubmitted, then a new one, then killed again: order is kept.
        second.taken(2);
        second.taken(3);
        drop(second);
        let recovery = region.queue(0).unwrap().recover(ring.used_idx);
        assert_eq!(recovery.resubmit, [2, 3]);
    }

    #[test]
    fn a_clean_stop_leaves_nothing_to_resubmit() {
        let (_file, region) = region(1);
        let mut card = region.queue(0).unwrap();
        let mut ring = Ring { used_idx: 0 };
        card.recover(0);
        for head in 0..QS {
            card.taken(head);
        }
        for head in (0..QS).rev() {
            ring.publish(&card, head);
        }
        let recovery = region.queue(0).unwrap().recover(ring.used_idx);
        assert_eq!(recovery.resubmit, Vec::<u16>::new());
        assert_eq!(recovery.next_avail, Some(QS));
    }

    #[test]
    fn heads_beyond_the_region_are_ignored() {
        let (_file, region) = region(1);
        let mut card = region.queue(0).unwrap();
        card.recover(0);
        card.taken(QS);
        card.publishing(QS + 3);
        card.published(QS + 1, 0);
        assert_eq!(
            region.queue(0).unwrap().recover(0).resubmit,
            Vec::<u16>::new()
        );
        assert!(region.queue(1).is_none());
    }

    #[test]
    fn a_vmms_bad_description_of_the_region_is_refused() {
        let (file, size) = create_region(2, QS, 4, 1024).unwrap();
        let map = |size, offset, queues, qs| {
            InflightRegion::map(&file, size, offset, queues, qs, 4, 1024)
        };
        assert!(matches!(
            map(size, 0, 5, QS),
            Err(InflightError::QueueCount { asked: 5, .. })
        ));
        assert!(matches!(
            map(size, 0, 0, QS),
            Err(InflightError::QueueCount { .. })
        ));
        assert!(matches!(
            map(size, 0, 2, 2048),
            Err(InflightError::QueueSize { .. })
        ));
        assert!(matches!(
            map(size, 0, 2, 130),
            Err(InflightError::QueueSize { .. })
        ));
        assert!(matches!(
            map(size - 1, 0, 2, QS),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            map(size, 64, 2, QS),
            Err(InflightError::Unaligned(64))
        ));
        assert!(matches!(
            map(size, 4096, 2, QS),
            Err(InflightError::FileTooShort { .. })
        ));
        assert!(matches!(
            map(u64::MAX, 0, 2, QS),
            Err(InflightError::FileTooShort { .. })
        ));
        assert!(map(size, 0, 2, QS).is_ok());
        // A file the VMM could shrink under the mapping.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(size).unwrap();
        assert!(matches!(
            InflightRegion::map(&plain, size, 0, 2, QS, 4, 1024),
            Err(InflightError::NotSealed)
        ));
        // The card's memfd cannot shrink.
        assert!(file.set_len(0).is_err());
        assert!(matches!(
            create_region(1, 0, 4, 1024),
            Err(InflightError::QueueSize { .. })
        ));
    }

    #[test]
    fn chains_are_rebuilt_from_heads_alone() {
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let table = 0x1000u64;
        let write = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            guest
                .write_obj(d, GuestAddress(table + 16 * u64::from(i)))
                .unwrap();
        };
        // Head 3: 3 -> 4; head 7: alone; head 9: points outside the table.
        write(3, 0x8000, 16, NEXT, 4);
        write(4, 0x9000, 512, 0, 0);
        write(7, 0xa000, 1, 0, 0);
        write(9, 0xb000, 16, NEXT, 200);
        let mut chains = ResubmittedChains::new(&guest, table, 16, &[7, 3, 9]).unwrap();
        let walk = |c: DescriptorChain<&GuestMemoryMmap>| {
            (c.head_index(), c.map(|d| d.addr().0).collect::<Vec<_>>())
        };
        assert_eq!(walk(chains.next_chain().unwrap()), (7, vec![0xa000]));
        assert_eq!(
            walk(chains.next_chain().unwrap()),
            (3, vec![0x8000, 0x9000])
        );
        // The broken chain stops where the guest's would.
        assert_eq!(walk(chains.next_chain().unwrap()), (9, vec![0xb000]));
        assert!(chains.next_chain().is_none());
    }
}
