//! A virtqueue's worker: turns available descriptor chains into io_uring
//! operations on the media and completed operations into used entries.
//!
//! One worker per virtqueue, driven by one thread that wakes for three
//! things: a kick (drain the available ring, queue one io_uring entry per
//! request, enter them all with one system call), completions (reap them all,
//! write each status, publish the used entries, signal the guest once —
//! the virtqueue decides whether EVENT_IDX suppresses it), and its timer.
//!
//! Between parsing and the media sits the card's middle (faults, EBS
//! throttling, modelled latency): a throttled request waits in a FIFO until
//! the volume model lets it go; a request whose modelled service time has not
//! passed when the media finishes is held until it has. The timer wakes the
//! worker for both.
//!
//! Requests are kept in slots indexed by their chain's head index: a head
//! cannot be reused by the guest before we return it, so a queue of N entries
//! needs N slots, all allocated when the queue starts.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use card_firmware::inflight::{QueueInflight, ResubmittedChains};
use card_firmware::media::FileMedia;
use card_firmware::middle::Admission;
use card_firmware::ring::{Completion, QueueRing};
use card_firmware::timer::Timer;
use card_firmware::vhost::{GuestMemory, Vring};
use card_firmware::warn::WarnLimiter;
use card_firmware::warn_limited;
use hw_model::ebs::IoDirection;
use vhost_user_backend::{VringStateMutGuard, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};

use crate::metrics::QueueMetrics;
use crate::request::{self, IoVecs, Refused, Request, RequestKind, Scratch};
use crate::Volume;

static BAD_REQUEST_WARNINGS: WarnLimiter = WarnLimiter::new(1000);
static MEDIA_ERROR_WARNINGS: WarnLimiter = WarnLimiter::new(1000);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Waiting in the throttle FIFO.
    Throttled,
    /// The media is working on it.
    InFlight,
    /// The media is done; the completion waits for its modelled time.
    Held,
}

/// One request between the guest making it available and us returning it.
struct Slot {
    state: SlotState,
    request: Option<Request>,
    /// Whether the media did what was asked.
    ok: bool,
    /// The used length to report on success.
    used_len: u32,
    /// Not to be completed before this instant (modelled latency, stalls).
    not_before: Option<Instant>,
    /// An injected stall holds it until the fault ends or is cleared.
    stalled: bool,
    /// Told the middle it was admitted (so it is told of the completion).
    admitted: bool,
    /// The power-cut log position a flush covers.
    flush_position: u64,
    iovecs: IoVecs,
    /// The guest memory the iovecs point into, kept mapped until completion.
    memory: Option<Arc<GuestMemoryMmap>>,
}

pub struct QueueWorker {
    index: usize,
    volume: Arc<Volume>,
    memory: GuestMemory,
    ring: QueueRing,
    timer: Timer,
    slots: Vec<Slot>,
    scratch: Scratch,
    /// Heads waiting for the volume's throttle, oldest first.
    throttled: VecDeque<u16>,
    /// Heads whose completion is being held.
    held: Vec<u16>,
    /// Heads finished and waiting to be published, with their used lengths.
    finished: Vec<(u16, u32)>,
    /// Completions being processed (kept to avoid allocating per batch).
    completions: Vec<Completion>,
    /// The vring this worker serves, known from its first event; needed when
    /// the VMM stops the queue from another thread.
    vring: Option<Vring>,
    /// This queue's part of the VMM's inflight region, when it gave one.
    inflight: Option<QueueInflight>,
    /// Reconcile with the inflight region before taking new requests.
    recover_pending: bool,
}

fn direction(kind: RequestKind) -> Option<IoDirection> {
    match kind {
        RequestKind::Read => Some(IoDirection::Read),
        RequestKind::Write => Some(IoDirection::Write),
        _ => None,
    }
}

impl QueueWorker {
    pub fn new(index: usize, volume: Arc<Volume>, memory: GuestMemory) -> std::io::Result<Self> {
        let queue_size = volume.queue_size as usize;
        let seg_max = volume.seg_max as usize;
        let slots = (0..queue_size)
            .map(|_| Slot {
                state: SlotState::Free,
                request: None,
                ok: false,
                used_len: 0,
                not_before: None,
                stalled: false,
                admitted: false,
                flush_position: 0,
                // A buffer may straddle two guest memory regions.
                iovecs: IoVecs::with_capacity(seg_max * 2),
                memory: None,
            })
            .collect();
        Ok(Self {
            index,
            ring: QueueRing::new(volume.queue_size as u32)?,
            timer: Timer::new()?,
            memory,
            slots,
            // header + data + status
            scratch: Scratch::new(seg_max + 2),
            throttled: VecDeque::with_capacity(queue_size),
            held: Vec::with_capacity(queue_size),
            finished: Vec::with_capacity(queue_size),
            completions: Vec::with_capacity(queue_size),
            volume,
            vring: None,
            inflight: None,
            recover_pending: false,
        })
    }

    /// Track this queue's requests in the VMM's inflight region (None: stop
    /// tracking). Called before the ring starts; its first kick recovers.
    pub fn track_inflight(&mut self, inflight: Option<QueueInflight>) {
        self.recover_pending = inflight.is_some();
        self.inflight = inflight;
    }

    pub fn completion_fd(&self) -> std::os::unix::io::RawFd {
        self.ring.completion_fd()
    }

    pub fn timer_fd(&self) -> std::os::unix::io::RawFd {
        self.timer.fd()
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
        if self.recover_pending {
            self.recover(&mut state, &memory);
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
                // More arrived, unless the guest moved avail.idx more than a
                // queue ahead: virtio-queue then yields no chain and "more"
                // stays true for ever (found by the vhost_user_messages fuzzer).
                Ok(true)
                    if virtio_queue::QueueOwnedT::iter(state.get_queue_mut(), &*memory)
                        .is_err() =>
                {
                    warn_limited!(
                        BAD_REQUEST_WARNINGS,
                        queue = self.index,
                        "available index is more than a queue ahead; ring ignored"
                    );
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(queue = self.index, error = %e, "cannot enable notifications");
                    break;
                }
            }
        }
        self.submit_batch();
        // Media that completes inline (page cache hits, tmpfs) has its
        // completions ready now: finish them in this wake-up rather than the
        // next, which saves a sleep, a wake and an epoll round per batch.
        self.reap();
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

    /// The timer fired: release held completions and throttled requests
    /// whose time has come.
    pub fn on_timer(&mut self, vring: &Vring) {
        self.remember(vring);
        self.timer.clear();
        self.service_timers();
        self.submit_batch();
        let memory = self.memory.memory().into_inner();
        let mut state = vring.get_mut();
        self.publish(&mut state, &memory);
    }

    /// The VMM is stopping the queue (GET_VRING_BASE): everything accepted
    /// must complete and be published before we return its position, so
    /// throttled requests go to the media now and held ones complete now.
    pub fn stop(&mut self) {
        while let Some(head) = self.throttled.pop_front() {
            self.submit_to_media(head);
        }
        self.drain();
        for head in std::mem::take(&mut self.held) {
            self.finish(head);
        }
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
        for slot in &mut self.slots {
            slot.state = SlotState::Free;
            slot.memory = None;
        }
        self.throttled.clear();
        self.held.clear();
        self.finished.clear();
        self.vring = None;
    }

    /// The ring has started on an inflight region: continue the available
    /// ring after every request this queue ever took, and resubmit those a
    /// killed card left unfinished, oldest first (card-firmware's inflight).
    fn recover(
        &mut self,
        state: &mut <Vring as VringStateMutGuard<'_, GuestMemory>>::G,
        memory: &Arc<GuestMemoryMmap>,
    ) {
        self.recover_pending = false;
        let Some(inflight) = self.inflight.as_mut() else {
            return;
        };
        let queue = state.get_queue_mut();
        let used_idx = match queue.used_idx(&**memory, Ordering::Acquire) {
            Ok(idx) => idx.0,
            Err(e) => {
                tracing::warn!(queue = self.index, error = %e, "cannot read the used index; nothing resubmitted");
                return;
            }
        };
        let recovery = inflight.recover(used_idx);
        tracing::info!(
            queue = self.index,
            used_idx,
            vmm_next_avail = queue.next_avail(),
            next_avail = ?recovery.next_avail,
            in_flight = recovery.resubmit.len(),
            "queue started on an inflight region"
        );
        if let Some(next_avail) = recovery.next_avail {
            queue.set_next_avail(next_avail);
        }
        if recovery.resubmit.is_empty() {
            return;
        }
        QueueMetrics::count(&self.metrics().resubmitted, recovery.resubmit.len() as u64);
        let mut chains = match ResubmittedChains::new(
            memory,
            queue.desc_table(),
            queue.size(),
            &recovery.resubmit,
        ) {
            Ok(chains) => chains,
            Err(e) => {
                tracing::error!(queue = self.index, error = %e, "cannot resubmit");
                return;
            }
        };
        while let Some(chain) = chains.next_chain() {
            self.start(chain, memory);
        }
    }

    fn remember(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
    }

    fn submit_batch(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::error!(queue = self.index, error = %e, "io_uring submit failed");
        }
    }

    fn start(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, memory: &Arc<GuestMemoryMmap>) {
        let head = chain.head_index();
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.taken(head);
        }
        QueueMetrics::count(&self.metrics().requests, 1);
        let volume = request::Volume {
            capacity: self.volume.media.capacity(),
            read_only: self.volume.media.read_only(),
        };
        let Some(slot) = self.slots.get_mut(head as usize) else {
            // virtio-queue only yields heads below the queue size.
            return;
        };
        if slot.state != SlotState::Free {
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
        match request::parse(chain, memory, volume, &mut self.scratch, &mut slot.iovecs) {
            Err(refused) => self.refuse(head, refused, memory),
            Ok(request) => {
                tracing::trace!(queue = self.index, head, ?request, "request");
                slot.request = Some(request);
                slot.memory = Some(memory.clone());
                slot.not_before = None;
                slot.stalled = false;
                slot.admitted = false;
                self.dispatch(head);
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

    /// Routes a parsed request: answered at once, through the middle, or
    /// straight to the media.
    fn dispatch(&mut self, head: u16) {
        let slot = &mut self.slots[head as usize];
        let Some(request) = slot.request else {
            return;
        };
        match request.kind {
            RequestKind::GetId => {
                // Answered from memory: no media operation.
                let (addr, room) = request.id_buffer.unwrap_or((request.status, 0));
                let id = &self.volume.serial[..self.volume.serial.len().min(room as usize)];
                let written = slot
                    .memory
                    .as_ref()
                    .is_some_and(|m| m.write_slice(id, addr).is_ok());
                QueueMetrics::count(&self.volume.metrics.queues[self.index].get_id_ops, 1);
                slot.ok = written;
                slot.used_len = id.len() as u32 + 1;
                self.finish(head);
            }
            RequestKind::Discard | RequestKind::WriteZeroes { .. } if request.len == 0 => {
                slot.ok = true;
                slot.used_len = 1;
                self.finish(head);
            }
            RequestKind::Read | RequestKind::Write => {
                if self.throttled.is_empty() {
                    self.admit(head);
                } else {
                    // Keep the guest's order behind requests already waiting.
                    slot.state = SlotState::Throttled;
                    self.throttled.push_back(head);
                }
            }
            _ => self.submit_to_media(head),
        }
    }

    /// Asks the middle about a read or write. Returns false if it must wait.
    fn admit(&mut self, head: u16) -> bool {
        let slot = &mut self.slots[head as usize];
        let Some(request) = slot.request else {
            return true;
        };
        let dir = direction(request.kind).unwrap_or(IoDirection::Read);
        match self.volume.middle.admit(dir, request.offset, request.len) {
            Admission::Retry(at) => {
                if slot.state != SlotState::Throttled {
                    slot.state = SlotState::Throttled;
                    self.throttled.push_back(head);
                }
                self.arm(at);
                false
            }
            Admission::Go { fail: true, .. } => {
                slot.ok = false;
                slot.used_len = 1;
                self.finish(head);
                true
            }
            Admission::Go {
                not_before,
                stalled,
                ..
            } => {
                slot.admitted = true;
                slot.not_before = not_before;
                slot.stalled = stalled;
                self.submit_to_media(head);
                true
            }
        }
    }

    fn submit_to_media(&mut self, head: u16) {
        let media: &FileMedia = &self.volume.media;
        let middle = &self.volume.middle;
        let slot = &mut self.slots[head as usize];
        let Some(request) = slot.request else {
            return;
        };
        slot.used_len = 1;
        let modifies = matches!(
            request.kind,
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes { .. }
        );
        if modifies && middle.power_cut_pending() {
            // What the range held, so a power cut can take this write back.
            if let Err(e) = middle.log_write(media.buffered(), request.offset, request.len) {
                tracing::error!(queue = self.index, error = %e, "cannot log a write for the power-cut fault");
            }
        }
        let entry = match request.kind {
            RequestKind::Read => {
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
                // SAFETY: as for reads.
                unsafe {
                    media.write(
                        slot.iovecs.as_ptr(),
                        slot.iovecs.len() as u32,
                        request.offset,
                    )
                }
            }
            RequestKind::Flush => {
                slot.flush_position = middle.flush_started();
                media.flush()
            }
            RequestKind::Discard | RequestKind::WriteZeroes { unmap: true } => {
                media.punch_hole(request.offset, request.len)
            }
            RequestKind::WriteZeroes { unmap: false } => {
                media.zero_range(request.offset, request.len)
            }
            RequestKind::GetId => return,
        };
        slot.state = SlotState::InFlight;
        // SAFETY: see above; the slot keeps everything the entry points at.
        if let Err(e) = unsafe { self.ring.push(entry, u64::from(head)) } {
            tracing::error!(queue = self.index, error = %e, "io_uring push failed");
            self.media_done(Completion {
                tag: u64::from(head),
                result: -libc::EIO,
            });
        }
    }

    /// Finishes the completions that are ready now.
    fn reap(&mut self) {
        self.collect_media(false);
    }

    /// Waits for everything in flight, then finishes it.
    fn drain(&mut self) {
        self.collect_media(true);
    }

    fn collect_media(&mut self, wait_for_all: bool) {
        // The vector is kept between calls: no allocation per batch.
        let mut done = std::mem::take(&mut self.completions);
        if wait_for_all {
            if let Err(e) = self.ring.drain(|c| done.push(c)) {
                tracing::error!(queue = self.index, error = %e, "cannot drain io_uring");
            }
        } else {
            self.ring.reap(|c| done.push(c));
        }
        for c in done.drain(..) {
            self.media_done(c);
        }
        self.completions = done;
    }

    /// The media finished a request: count it, then complete it now or hold it.
    fn media_done(&mut self, completion: Completion) {
        let Ok(head) = u16::try_from(completion.tag) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(head as usize) else {
            return;
        };
        if slot.state != SlotState::InFlight {
            return;
        }
        let Some(request) = slot.request else {
            return;
        };
        let metrics = &self.volume.metrics.queues[self.index];
        let ok = match request.kind {
            RequestKind::Read | RequestKind::Write => {
                i64::from(completion.result) == request.len as i64
            }
            _ => completion.result == 0,
        };
        if ok {
            let (ops, bytes) = match request.kind {
                RequestKind::Read => (&metrics.read_ops, Some(&metrics.read_bytes)),
                RequestKind::Write => (&metrics.write_ops, Some(&metrics.write_bytes)),
                RequestKind::Flush => {
                    self.volume.middle.flush_completed(slot.flush_position);
                    (&metrics.flush_ops, None)
                }
                RequestKind::Discard => (&metrics.discard_ops, None),
                RequestKind::WriteZeroes { .. } => (&metrics.write_zeroes_ops, None),
                RequestKind::GetId => (&metrics.get_id_ops, None),
            };
            QueueMetrics::count(ops, 1);
            if let Some(bytes) = bytes {
                QueueMetrics::count(bytes, request.len);
            }
        } else {
            QueueMetrics::count(&metrics.media_errors, 1);
            warn_limited!(
                MEDIA_ERROR_WARNINGS,
                queue = self.index,
                head,
                kind = ?request.kind,
                result = completion.result,
                expected = request.len,
                "media operation failed"
            );
        }
        slot.ok = ok;
        let due = slot.not_before.filter(|t| *t > Instant::now());
        if slot.stalled || due.is_some() {
            slot.state = SlotState::Held;
            self.held.push(head);
            self.arm(due.unwrap_or_else(Instant::now));
        } else {
            self.finish(head);
        }
    }

    /// Releases held completions and throttled requests whose time has come,
    /// and arms the timer for the next.
    fn service_timers(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() {
            let head = self.held[i];
            let slot = &mut self.slots[head as usize];
            if slot.stalled {
                match slot.request.and_then(|r| {
                    let dir = direction(r.kind)?;
                    self.volume.middle.still_stalled(dir, r.offset, r.len)
                }) {
                    Some(until) => {
                        slot.not_before = Some(slot.not_before.map_or(until, |t| t.max(until)))
                    }
                    None => slot.stalled = false,
                }
            }
            match slot.not_before.filter(|t| *t > now) {
                Some(due) => {
                    self.arm(due);
                    i += 1;
                }
                None if !slot.stalled => {
                    self.held.swap_remove(i);
                    self.finish(head);
                }
                None => i += 1,
            }
        }
        while let Some(&head) = self.throttled.front() {
            if !self.admit(head) {
                break;
            }
            self.throttled.pop_front();
        }
    }

    fn arm(&mut self, at: Instant) {
        if let Err(e) = self.timer.arm_by(at) {
            tracing::error!(queue = self.index, error = %e, "cannot arm the queue timer");
        }
    }

    /// Writes the status, tells the middle, and queues the used entry.
    fn finish(&mut self, head: u16) {
        let slot = &mut self.slots[head as usize];
        let status = if slot.ok {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        };
        let used_len = if slot.ok { slot.used_len } else { 1 };
        if let (Some(memory), Some(request)) = (slot.memory.take(), slot.request) {
            let _ = memory.write_obj(status as u8, request.status);
            if slot.admitted {
                if let Some(dir) = direction(request.kind) {
                    self.volume.middle.completed(dir, request.len);
                }
            }
        }
        slot.state = SlotState::Free;
        slot.request = None;
        self.finished.push((head, used_len));
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
            // Exactly once across a restart: the region says which head was
            // being published when the used index moved (card-firmware's
            // inflight).
            if let Some(inflight) = &self.inflight {
                inflight.publishing(head);
            }
            match queue.add_used(memory, head, len) {
                Ok(()) => {
                    if let Some(inflight) = &self.inflight {
                        inflight.published(head, queue.next_used());
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = self.index, head, error = %e, "cannot add used entry")
                }
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
    use vm_memory::{GuestAddress, GuestMemoryAtomic};

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
                middle: card_firmware::middle::Middle::new(
                    &card_firmware::middle::MiddleConfig::default(),
                )
                .unwrap(),
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
    fn an_available_index_more_than_a_queue_ahead_does_not_spin() {
        let mut h = Harness::new();
        h.mem()
            .write_obj((QUEUE_SIZE + 1).to_le(), GuestAddress(h.rings.1 + 2))
            .unwrap();
        // Looped for ever before the fix.
        h.worker.on_kick(&h.vring);
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
