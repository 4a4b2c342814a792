//! A virtqueue's worker: turns available descriptor chains into io_uring
//! operations on the media and completed operations into used entries.
//!
//! One worker per virtqueue, driven by one thread: on a kick it drains the
//! available ring, queues one io_uring entry per request and enters them all
//! with one system call; on a completion wake-up it reaps every finished
//! operation, writes each status, publishes the used entries and signals the
//! guest once (the virtqueue decides whether EVENT_IDX suppresses it).
//!
//! Requests in flight are kept in slots indexed by their chain's head index:
//! a head cannot be reused by the guest before we return it, so a queue of N
//! entries needs N slots, all allocated when the queue starts.

use std::sync::Arc;

use card_firmware::media::FileMedia;
use card_firmware::ring::{Completion, QueueRing};
use card_firmware::vhost::{GuestMemory, Vring};
use card_firmware::warn::WarnLimiter;
use card_firmware::warn_limited;
use vhost_user_backend::{VringStateMutGuard, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use crate::metrics::QueueMetrics;
use crate::request::{self, IoVecs, Refused, Request, RequestKind, Scratch};
use crate::Volume;

static BAD_REQUEST_WARNINGS: WarnLimiter = WarnLimiter::new(1000);
static MEDIA_ERROR_WARNINGS: WarnLimiter = WarnLimiter::new(1000);

/// A request the media is working on.
struct Slot {
    in_flight: bool,
    kind: RequestKind,
    /// Bytes a read or write must transfer to succeed.
    expected: u64,
    status: GuestAddress,
    /// The used length to report on success.
    used_len: u32,
    iovecs: IoVecs,
    /// The guest memory the iovecs point into, kept mapped until completion.
    memory: Option<Arc<GuestMemoryMmap>>,
}

pub struct QueueWorker {
    index: usize,
    volume: Arc<Volume>,
    memory: GuestMemory,
    ring: QueueRing,
    slots: Vec<Slot>,
    scratch: Scratch,
    /// Heads finished and waiting to be published, with their used lengths.
    finished: Vec<(u16, u32)>,
    /// The vring this worker serves, known from its first event; needed when
    /// the VMM stops the queue from another thread.
    vring: Option<Vring>,
}

impl QueueWorker {
    pub fn new(index: usize, volume: Arc<Volume>, memory: GuestMemory) -> std::io::Result<Self> {
        let queue_size = volume.queue_size as usize;
        let seg_max = volume.seg_max as usize;
        let slots = (0..queue_size)
            .map(|_| Slot {
                in_flight: false,
                kind: RequestKind::Flush,
                expected: 0,
                status: GuestAddress(0),
                used_len: 0,
                // A buffer may straddle two guest memory regions.
                iovecs: IoVecs::with_capacity(seg_max * 2),
                memory: None,
            })
            .collect();
        Ok(Self {
            index,
            ring: QueueRing::new(volume.queue_size as u32)?,
            memory,
            slots,
            // header + data + status
            scratch: Scratch::new(seg_max + 2),
            finished: Vec::with_capacity(queue_size),
            volume,
            vring: None,
        })
    }

    pub fn completion_fd(&self) -> std::os::unix::io::RawFd {
        self.ring.completion_fd()
    }

    fn metrics(&self) -> &QueueMetrics {
        &self.volume.metrics.queues[self.index]
    }

    /// The guest kicked: start every available request.
    pub fn on_kick(&mut self, vring: &Vring) {
        self.remember(vring);
        let memory = self.memory.memory().into_inner();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            return;
        }
        loop {
            let queue = state.get_queue_mut();
            if let Err(e) = queue.disable_notification(&*memory) {
                tracing::warn!(queue = self.index, error = %e, "cannot disable notifications");
            }
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*memory) {
                self.start(chain, &memory);
            }
            // Re-enabling tells us whether the guest added more meanwhile.
            match state.get_queue_mut().enable_notification(&*memory) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(queue = self.index, error = %e, "cannot enable notifications");
                    break;
                }
            }
        }
        if let Err(e) = self.ring.submit() {
            tracing::error!(queue = self.index, error = %e, "io_uring submit failed");
        }
        self.publish(&mut state, &memory);
    }

    /// The ring signalled completions: finish them and tell the guest.
    pub fn on_completions(&mut self, vring: &Vring) {
        self.remember(vring);
        self.reap();
        let memory = self.memory.memory().into_inner();
        let mut state = vring.get_mut();
        self.publish(&mut state, &memory);
    }

    /// The VMM is stopping the queue (GET_VRING_BASE): everything accepted
    /// must complete and be published before we return its position.
    pub fn stop(&mut self) {
        self.drain();
        if let Some(vring) = self.vring.clone() {
            let memory = self.memory.memory().into_inner();
            let mut state = vring.get_mut();
            self.publish(&mut state, &memory);
        }
        self.finished.clear();
    }

    /// The VMM went away: wait for the media, publish nothing.
    pub fn quiesce(&mut self) {
        self.drain();
        self.finished.clear();
        self.vring = None;
    }

    fn remember(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
    }

    fn start(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, memory: &Arc<GuestMemoryMmap>) {
        let head = chain.head_index();
        QueueMetrics::count(&self.metrics().requests, 1);
        let volume = request::Volume {
            capacity: self.volume.media.capacity(),
            read_only: self.volume.media.read_only(),
        };
        let Some(slot) = self.slots.get_mut(head as usize) else {
            // virtio-queue only yields heads below the queue size.
            return;
        };
        if slot.in_flight {
            // The guest made a chain available twice; the first one still
            // owns the head and will complete it.
            QueueMetrics::count(&self.volume.metrics.queues[self.index].duplicate_heads, 1);
            warn_limited!(
                BAD_REQUEST_WARNINGS,
                queue = self.index,
                head,
                "chain made available while in flight"
            );
            return;
        }
        let parsed = request::parse(chain, memory, volume, &mut self.scratch, &mut slot.iovecs);
        match parsed {
            Err(refused) => self.refuse(head, refused, memory),
            Ok(request) => {
                tracing::trace!(queue = self.index, head, ?request, "request");
                self.submit(head, request, memory)
            }
        }
    }

    fn refuse(&mut self, head: u16, refused: Refused, memory: &GuestMemoryMmap) {
        self.metrics().refused(refused.error);
        warn_limited!(BAD_REQUEST_WARNINGS, queue = self.index, head, error = %refused.error, "request refused");
        let status = if refused.error.is_unsupported() {
            VIRTIO_BLK_S_UNSUPP
        } else {
            VIRTIO_BLK_S_IOERR
        };
        let used_len = match refused.status {
            Some(addr) if memory.write_obj(status as u8, addr).is_ok() => 1,
            _ => 0,
        };
        self.finished.push((head, used_len));
    }

    fn submit(&mut self, head: u16, request: Request, memory: &Arc<GuestMemoryMmap>) {
        let media: &FileMedia = &self.volume.media;
        let slot = &mut self.slots[head as usize];
        slot.kind = request.kind;
        slot.status = request.status;
        slot.expected = 0;
        slot.used_len = 1;
        let entry = match request.kind {
            RequestKind::GetId => {
                // Answered from memory: no media operation.
                let (addr, room) = request.id_buffer.unwrap_or((request.status, 0));
                let id = &self.volume.serial[..self.volume.serial.len().min(room as usize)];
                let ok = memory.write_slice(id, addr).is_ok();
                let status = if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                let _ = memory.write_obj(status as u8, request.status);
                QueueMetrics::count(&self.volume.metrics.queues[self.index].get_id_ops, 1);
                self.finished.push((head, id.len() as u32 + 1));
                return;
            }
            RequestKind::Discard | RequestKind::WriteZeroes { .. } if request.len == 0 => {
                let _ = memory.write_obj(VIRTIO_BLK_S_OK as u8, request.status);
                self.finished.push((head, 1));
                return;
            }
            RequestKind::Read => {
                slot.expected = request.len;
                slot.used_len = request.len as u32 + 1;
                // SAFETY: the iovecs and the guest memory they point into are
                // kept in the slot until the completion is reaped.
                unsafe {
                    media.read(
                        slot.iovecs.as_ptr(),
                        slot.iovecs.len() as u32,
                        request.offset,
                    )
                }
            }
            RequestKind::Write => {
                slot.expected = request.len;
                // SAFETY: as for reads.
                unsafe {
                    media.write(
                        slot.iovecs.as_ptr(),
                        slot.iovecs.len() as u32,
                        request.offset,
                    )
                }
            }
            RequestKind::Flush => media.flush(),
            RequestKind::Discard | RequestKind::WriteZeroes { unmap: true } => {
                media.punch_hole(request.offset, request.len)
            }
            RequestKind::WriteZeroes { unmap: false } => {
                media.zero_range(request.offset, request.len)
            }
        };
        slot.memory = Some(memory.clone());
        slot.in_flight = true;
        // SAFETY: see above; the slot keeps everything the entry points at.
        if let Err(e) = unsafe { self.ring.push(entry, u64::from(head)) } {
            tracing::error!(queue = self.index, error = %e, "io_uring push failed");
            self.finish(Completion {
                tag: u64::from(head),
                result: -libc::EIO,
            });
        }
    }

    fn reap(&mut self) {
        let mut done = std::mem::take(&mut self.finished);
        let slots = &mut self.slots;
        let volume = &self.volume;
        let index = self.index;
        self.ring.reap(|c| {
            if let Some(entry) = finish_slot(slots, volume, index, c) {
                done.push(entry);
            }
        });
        self.finished = done;
    }

    fn finish(&mut self, completion: Completion) {
        if let Some(entry) = finish_slot(&mut self.slots, &self.volume, self.index, completion) {
            self.finished.push(entry);
        }
    }

    fn drain(&mut self) {
        let mut done = std::mem::take(&mut self.finished);
        let slots = &mut self.slots;
        let volume = &self.volume;
        let index = self.index;
        if let Err(e) = self.ring.drain(|c| {
            if let Some(entry) = finish_slot(slots, volume, index, c) {
                done.push(entry);
            }
        }) {
            tracing::error!(queue = index, error = %e, "cannot drain io_uring");
        }
        self.finished = done;
    }

    /// Adds every finished head to the used ring and signals the guest once.
    fn publish(
        &mut self,
        state: &mut <Vring as VringStateMutGuard<'_, GuestMemory>>::G,
        memory: &GuestMemoryMmap,
    ) {
        if self.finished.is_empty() {
            return;
        }
        let queue = state.get_queue_mut();
        for (head, len) in self.finished.drain(..) {
            if let Err(e) = queue.add_used(memory, head, len) {
                tracing::warn!(queue = self.index, head, error = %e, "cannot add used entry");
            }
        }
        match queue.needs_notification(memory) {
            Ok(true) => {
                if let Err(e) = state.signal_used_queue() {
                    tracing::warn!(queue = self.index, error = %e, "cannot signal the guest");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(queue = self.index, error = %e, "cannot check notification"),
        }
    }
}

/// Writes the status of a completed media operation and frees its slot.
fn finish_slot(
    slots: &mut [Slot],
    volume: &Volume,
    index: usize,
    completion: Completion,
) -> Option<(u16, u32)> {
    let head = u16::try_from(completion.tag).ok()?;
    let slot = slots.get_mut(head as usize)?;
    if !slot.in_flight {
        return None;
    }
    let metrics = &volume.metrics.queues[index];
    let ok = match slot.kind {
        RequestKind::Read | RequestKind::Write => {
            i64::from(completion.result) == slot.expected as i64
        }
        _ => completion.result == 0,
    };
    if ok {
        let (ops, bytes) = match slot.kind {
            RequestKind::Read => (&metrics.read_ops, Some(&metrics.read_bytes)),
            RequestKind::Write => (&metrics.write_ops, Some(&metrics.write_bytes)),
            RequestKind::Flush => (&metrics.flush_ops, None),
            RequestKind::Discard => (&metrics.discard_ops, None),
            RequestKind::WriteZeroes { .. } => (&metrics.write_zeroes_ops, None),
            RequestKind::GetId => (&metrics.get_id_ops, None),
        };
        QueueMetrics::count(ops, 1);
        if let Some(bytes) = bytes {
            QueueMetrics::count(bytes, slot.expected);
        }
    } else {
        QueueMetrics::count(&metrics.media_errors, 1);
        warn_limited!(
            MEDIA_ERROR_WARNINGS,
            queue = index,
            head,
            kind = ?slot.kind,
            result = completion.result,
            expected = slot.expected,
            "media operation failed"
        );
    }
    let status = if ok {
        VIRTIO_BLK_S_OK
    } else {
        VIRTIO_BLK_S_IOERR
    };
    let used_len = if ok { slot.used_len } else { 1 };
    if let Some(memory) = slot.memory.take() {
        let _ = memory.write_obj(status as u8, slot.status);
    }
    slot.in_flight = false;
    Some((head, used_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::BlockMetrics;
    use card_firmware::media::MediaOptions;
    use std::os::unix::fs::FileExt;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryAtomic;

    const QUEUE_SIZE: u16 = 16;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    /// A queue worker on a real io_uring and a real file, fed by a mock
    /// guest driver writing descriptor chains into guest memory.
    struct Harness {
        memory: GuestMemory,
        vring: Vring,
        worker: QueueWorker,
        backing: tempfile::NamedTempFile,
        next_desc: u16,
        rings: (u64, u64, u64),
    }

    impl Harness {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
            let memory = GuestMemoryAtomic::new(mem);
            let backing = tempfile::NamedTempFile::new().unwrap();
            backing.as_file().set_len(1 << 20).unwrap();
            let volume = Arc::new(Volume {
                media: card_firmware::media::FileMedia::open(
                    backing.path(),
                    &MediaOptions::default(),
                )
                .unwrap(),
                serial: *b"vol0123456789abcdef0",
                num_queues: 1,
                queue_size: QUEUE_SIZE,
                seg_max: 8,
                metrics: BlockMetrics::new(1),
            });
            let vring = Vring::new(memory.clone(), QUEUE_SIZE).unwrap();
            // The mock lays out (and zeroes) the rings once; later steps
            // write them directly, as a driver would.
            let rings = {
                let guard = memory.memory();
                let mock = MockSplitQueue::new(&*guard, QUEUE_SIZE);
                (
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                )
            };
            vring.set_queue_size(QUEUE_SIZE);
            vring.set_queue_info(rings.0, rings.1, rings.2).unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let worker = QueueWorker::new(0, volume, memory.clone()).unwrap();
            Self {
                memory,
                vring,
                worker,
                backing,
                next_desc: 0,
                rings,
            }
        }

        fn mem(&self) -> Arc<GuestMemoryMmap> {
            self.memory.memory().into_inner()
        }

        fn header(&self, addr: u64, request_type: u32, sector: u64) {
            let mem = self.mem();
            mem.write_obj(request_type.to_le(), GuestAddress(addr))
                .unwrap();
            mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
            mem.write_obj(sector.to_le(), GuestAddress(addr + 8))
                .unwrap();
        }

        /// Makes one chain of `(addr, len, flags)` available.
        fn offer(&mut self, chain: &[(u64, u32, u16)]) {
            let first = self.next_desc;
            let raw: Vec<RawDescriptor> = chain
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let last = i + 1 == chain.len();
                    let flags = if last {
                        flags
                    } else {
                        flags | VRING_DESC_F_NEXT as u16
                    };
                    RawDescriptor::from(SplitDescriptor::new(
                        addr,
                        len,
                        flags,
                        first + i as u16 + 1,
                    ))
                })
                .collect();
            let mem = self.mem();
            let (desc_table, avail, _) = self.rings;
            for (i, d) in raw.iter().enumerate() {
                let at = desc_table + 16 * (u64::from(first) + i as u64);
                mem.write_obj(*d, GuestAddress(at)).unwrap();
            }
            let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
            let slot = avail + 4 + 2 * u64::from(idx % QUEUE_SIZE);
            mem.write_obj(first.to_le(), GuestAddress(slot)).unwrap();
            mem.write_obj((idx + 1).to_le(), GuestAddress(avail + 2))
                .unwrap();
            self.next_desc += chain.len() as u16;
        }

        /// Kicks, waits for the media and returns the used entries so far.
        fn run(&mut self) -> Vec<(u32, u32)> {
            self.worker.on_kick(&self.vring);
            self.worker.stop();
            let mem = self.mem();
            let used = self.rings.2;
            let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
            (0..u64::from(idx))
                .map(|i| {
                    let at = used + 4 + 8 * i;
                    let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                    let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
                    (id, len)
                })
                .collect()
        }

        fn status(&self, addr: u64) -> u8 {
            self.mem().read_obj(GuestAddress(addr)).unwrap()
        }
    }

    #[test]
    fn bad_requests_fail_alone_and_good_ones_reach_the_media() {
        let mut h = Harness::new();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        h.mem()
            .write_slice(&pattern, GuestAddress(0x20_0000))
            .unwrap();

        // A: a good write of 4 KiB at sector 8.
        h.header(0x10_0000, VIRTIO_BLK_T_OUT, 8);
        h.offer(&[(0x10_0000, 16, 0), (0x20_0000, 4096, 0), (0x30_0000, 1, W)]);
        // B: a read into memory the guest does not have.
        h.header(0x10_1000, VIRTIO_BLK_T_IN, 0);
        h.offer(&[
            (0x10_1000, 16, 0),
            (0x2000_0000, 4096, W),
            (0x30_0001, 1, W),
        ]);
        // C: an unknown request type.
        h.header(0x10_2000, 0x99, 0);
        h.offer(&[(0x10_2000, 16, 0), (0x30_0002, 1, W)]);
        // D: a read past the end of the volume.
        h.header(0x10_3000, VIRTIO_BLK_T_IN, (1 << 20) / 512);
        h.offer(&[(0x10_3000, 16, 0), (0x21_0000, 512, W), (0x30_0003, 1, W)]);

        let mut used = h.run();
        used.sort();
        assert_eq!(used, [(0, 1), (3, 1), (6, 1), (8, 1)]);
        assert_eq!(h.status(0x30_0000), VIRTIO_BLK_S_OK as u8);
        assert_eq!(h.status(0x30_0001), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(h.status(0x30_0002), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(h.status(0x30_0003), VIRTIO_BLK_S_IOERR as u8);
        let mut on_disk = vec![0u8; 4096];
        h.backing
            .as_file()
            .read_exact_at(&mut on_disk, 8 * 512)
            .unwrap();
        assert_eq!(on_disk, pattern, "the good write reached the file");

        // E: the good data reads back after the bad requests.
        h.header(0x10_4000, VIRTIO_BLK_T_IN, 8);
        h.offer(&[(0x10_4000, 16, 0), (0x40_0000, 4096, W), (0x30_0004, 1, W)]);
        let used = h.run();
        assert_eq!(used.last(), Some(&(11, 4097)));
        assert_eq!(h.status(0x30_0004), VIRTIO_BLK_S_OK as u8);
        let mut read_back = vec![0u8; 4096];
        h.mem()
            .read_slice(&mut read_back, GuestAddress(0x40_0000))
            .unwrap();
        assert_eq!(read_back, pattern);

        let m = h.worker.volume.metrics.snapshot();
        assert_eq!(m["total"]["invalid_requests"], 2);
        assert_eq!(m["total"]["unsupported_requests"], 1);
        assert_eq!(m["total"]["write_bytes"], 4096);
        assert_eq!(m["total"]["read_bytes"], 4096);
    }
}
