//! I/O submission queue workers: one thread and one io_uring per queue.
//!
//! A worker sleeps on two eventfds: its queue's doorbell (written by the
//! socket thread when the host rings it) and its ring's completion eventfd.
//! Woken, it fetches every new submission entry (from the shadow doorbell
//! when the host configured one), checks it, submits the media operations
//! with one `io_uring_enter`, reaps completions and posts them to the
//! completion queue with one interrupt per batch, as interrupt coalescing
//! allows. With shadow doorbells it publishes its event index before
//! sleeping, so the host rings the (slow, trapped) doorbell register only
//! when the worker is idle.

use std::sync::atomic::{fence, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use card_firmware::middle::Admission;
use card_firmware::ring::{Completion as RingCompletion, QueueRing};
use card_firmware::warn::WarnLimiter;
use card_firmware::warn_limited;
use hw_model::ebs::IoDirection;
use io_uring::squeue;

use crate::controller::{CompletionQueue, Controller, PostError, IDLE_RECHECK};
use crate::datapath::{copy_from_guest, copy_to_guest, data_segments, iovecs, Segment};
use crate::dma::{DmaMemory, DmaSpace};
use crate::namespace::DIRECT_ALIGN;
use crate::spec::{io, Command, Completion, Status, MAX_TRANSFER, SQE_SIZE};

static BAD_TAIL: WarnLimiter = WarnLimiter::new(5_000);
static MEDIA_ERROR: WarnLimiter = WarnLimiter::new(5_000);

/// Worker states: running; stopping after posting what is in flight (queue
/// deleted); stopping without posting (controller reset).
pub const RUN: u8 = 0;
pub const STOP_POST: u8 = 1;
pub const STOP_DISCARD: u8 = 2;

/// The most Dataset Management ranges one command may carry (NR is 8 bits).
const DSM_MAX_RANGES: usize = 256;

/// An I/O submission queue as created by the host.
#[derive(Debug)]
pub struct IoQueue {
    pub qid: u16,
    pub base: u64,
    pub size: u32,
    pub cq: Arc<CompletionQueue>,
}

/// A page-aligned buffer: O_DIRECT needs aligned memory, which a guest's
/// buffers need not be (Linux's nvme driver only asks for dword alignment).
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: plain heap memory owned by the buffer.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    pub fn new(len: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Self { ptr, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn iovec(&mut self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = std::alloc::Layout::from_size_align(self.len.max(1), Self::ALIGN) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// What a command does with its data when its operations complete.
#[derive(Debug)]
enum Kind {
    Read,
    /// A read through a bounce buffer: copy it to the host's ranges.
    BounceRead {
        bounce: AlignedBuf,
        segments: Vec<Segment>,
    },
    /// A write from a bounce buffer (kept until the write completes).
    BounceWrite {
        _bounce: AlignedBuf,
    },
    Write,
    /// Compare: the media's data landed in `bounce`; compare with the host's.
    Compare {
        bounce: AlignedBuf,
        segments: Vec<Segment>,
    },
    /// Write Zeroes as FALLOC_FL_ZERO_RANGE; punched instead where the
    /// filesystem lacks it (tmpfs).
    ZeroRange {
        nsid: u32,
        offset: u64,
        len: u64,
    },
    Other,
}

/// Whether O_DIRECT can take these iovecs as they are.
fn direct_aligned(iov: &[libc::iovec]) -> bool {
    iov.iter()
        .all(|v| (v.iov_base as usize) % DIRECT_ALIGN == 0 && v.iov_len % DIRECT_ALIGN == 0)
}

/// What the middle asked of a read or write: complete no earlier than
/// `not_before` (modelled latency, a latency fault), and while `stalled`
/// not before the stall is cleared.
#[derive(Debug, Clone, Copy)]
struct Hold {
    nsid: u32,
    dir: IoDirection,
    offset: u64,
    len: u64,
    not_before: Option<Instant>,
    stalled: bool,
}

/// A finished command waiting for its hold to pass.
#[derive(Debug)]
struct Held {
    at: Instant,
    cid: u16,
    status: Status,
    hold: Hold,
}

/// A command with media operations in flight.
#[derive(Debug)]
struct InFlight {
    cid: u16,
    hold: Option<Hold>,
    kind: Kind,
    status: Status,
    /// Operations not yet completed.
    remaining: u32,
    /// Bytes the data operation must move.
    expected: u64,
    /// The iovecs the kernel reads or writes; kept until completion.
    _iovecs: Vec<libc::iovec>,
    /// The DMA space the iovecs point into, kept mapped until completion.
    _mem: Arc<DmaSpace>,
}

// SAFETY: the raw pointers in the iovecs point into `_mem`, which the
// in-flight entry keeps alive; the entry is only used by its worker thread.
unsafe impl Send for InFlight {}

/// Tags carry the slot in the low 32 bits; bit 32 marks a data operation
/// (whose byte count is checked).
const DATA_OP: u64 = 1 << 32;

pub struct IoWorker {
    ctrl: Arc<Controller>,
    /// The queue's doorbell eventfd (a duplicate, made before the worker
    /// confines itself).
    wake: vmm_sys_util::eventfd::EventFd,
    q: IoQueue,
    stop: Arc<AtomicU8>,
    ring: QueueRing,
    head: u32,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Completions waiting for room in the completion queue.
    pending: Vec<Completion>,
    /// Completions posted but not yet signalled (interrupt coalescing).
    unsignalled: u32,
    unsignalled_since: Option<Instant>,
    /// Finished commands the middle holds back.
    held: Vec<Held>,
    /// The hold of the command `submit` is about to put in flight.
    next_hold: Option<Hold>,
}

impl IoWorker {
    pub fn new(ctrl: Arc<Controller>, q: IoQueue, stop: Arc<AtomicU8>) -> std::io::Result<Self> {
        let depth = q.size.min(1024);
        let ring = QueueRing::new(depth)?;
        let wake = ctrl.wake_fd(q.qid).try_clone()?;
        Ok(Self {
            ctrl,
            wake,
            q,
            stop,
            ring,
            head: 0,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as usize).rev().collect(),
            pending: Vec::new(),
            unsignalled: 0,
            unsignalled_since: None,
            held: Vec::new(),
            next_hold: None,
        })
    }

    pub fn run(mut self) {
        // Before the first submission entry is read: this thread is the
        // first one guest-controlled data reaches.
        card_firmware::sandbox::confine_queue_worker();
        use std::os::unix::io::AsRawFd;
        loop {
            if self.stop.load(Ordering::Acquire) != RUN {
                break;
            }
            self.release_held();
            let mem = self.ctrl.dma();
            let fetched = self.fetch(&mem);
            if let Err(e) = self.ring.submit() {
                tracing::error!(qid = self.q.qid, error = %e, "io_uring submit failed");
            }
            let reaped = self.reap();
            self.post(&mem);
            if fetched > 0 || reaped > 0 || self.poll(&mem) {
                continue;
            }
            // Idle: publish the event index, then look once more so a tail
            // written just before it is not missed. Not while commands are
            // in flight: their completions wake this worker anyway, and it
            // reads the shadow tail then, so the driver need not ring (each
            // ring is a trapped write, a round trip through the socket).
            let busy = self.ring.in_flight() > 0;
            if let Some(tail) = self.ctrl.sq_tail(self.q.qid, &mem).filter(|_| !busy) {
                if self.ctrl.doorbell_buffers().is_some() {
                    self.ctrl.set_sq_event_index(self.q.qid, tail, &mem);
                    fence(Ordering::SeqCst);
                    if self.ctrl.sq_tail(self.q.qid, &mem) != Some(tail) {
                        continue;
                    }
                }
            }
            let timeout = self.sleep_limit();
            let mut fds = [
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.ring.completion_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Microsecond precision: modelled flash latencies are ~100 µs.
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos().max(1_000) as libc::c_long,
            };
            // SAFETY: two valid pollfds and a valid timespec; no signal mask.
            unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
            let _ = self.wake.read();
        }
        // Stopped (queue deleted or controller reset): the kernel must be
        // done with guest memory before the worker goes away.
        let mut done = Vec::new();
        if let Err(e) = self.ring.drain(|c| done.push(c)) {
            tracing::error!(qid = self.q.qid, error = %e, "draining io_uring failed");
        }
        for c in done {
            self.complete_op(c);
        }
        if self.stop.load(Ordering::Acquire) == STOP_DISCARD {
            return;
        }
        // Held completions (modelled latency, stalls) go out now.
        for h in std::mem::take(&mut self.held) {
            self.release(h);
        }
        let mem = self.ctrl.dma();
        self.post(&mem);
    }

    /// Polls for a new tail or a completion for up to the configured poll
    /// time; true if something arrived.
    fn poll(&mut self, mem: &Arc<DmaSpace>) -> bool {
        let limit = self.ctrl.config.poll;
        if limit.is_zero() {
            return false;
        }
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if self.stop.load(Ordering::Relaxed) != RUN {
                return true;
            }
            if self.ctrl.sq_tail(self.q.qid, mem) != Some(self.head) && !self.free.is_empty() {
                return true;
            }
            if self.ring.in_flight() > 0 && self.reap() > 0 {
                self.post(mem);
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// How long to sleep: until a coalesced interrupt is due, a short while
    /// if completions wait for room, else the idle recheck.
    fn sleep_limit(&self) -> Duration {
        if !self.pending.is_empty() {
            return Duration::from_millis(1);
        }
        let mut limit = IDLE_RECHECK;
        if let Some(since) = self.unsignalled_since {
            let (_, time) = self.coalescing();
            limit = limit.min((since + time).saturating_duration_since(Instant::now()));
        }
        if let Some(at) = self.held.iter().map(|h| h.at).min() {
            limit = limit.min(at.saturating_duration_since(Instant::now()));
        }
        limit
    }

    /// Aggregation threshold (entries) and time of this queue's vector.
    fn coalescing(&self) -> (u32, Duration) {
        let f = &self.ctrl.features;
        let disabled = f
            .vector_config
            .get(usize::from(self.q.cq.vector))
            .is_some_and(|v| v.load(Ordering::Relaxed) & (1 << 16) != 0);
        let v = f.interrupt_coalescing.load(Ordering::Relaxed);
        if disabled || self.q.cq.vector == 0 {
            return (0, Duration::ZERO);
        }
        (
            v & 0xff,
            Duration::from_micros(100 * u64::from((v >> 8) & 0xff)),
        )
    }

    /// Fetches new entries while there is room for them in flight.
    fn fetch(&mut self, mem: &Arc<DmaSpace>) -> usize {
        let Some(tail) = self.ctrl.sq_tail(self.q.qid, mem) else {
            return 0;
        };
        if tail >= self.q.size {
            warn_limited!(
                BAD_TAIL,
                qid = self.q.qid,
                tail,
                "submission tail past the queue; ignored"
            );
            return 0;
        }
        let mut fetched = 0;
        while self.head != tail
            && !self.free.is_empty()
            && self.pending.len() < self.q.size as usize
        {
            let addr = self.q.base + u64::from(self.head) * SQE_SIZE;
            let mut raw = [0u8; 64];
            if mem.read(addr, &mut raw).is_err() {
                warn_limited!(
                    BAD_TAIL,
                    qid = self.q.qid,
                    "submission queue memory unmapped"
                );
                return fetched;
            }
            self.head = (self.head + 1) % self.q.size;
            fetched += 1;
            let cmd = Command::from_bytes(&raw);
            if let Err(status) = self.start(mem, &cmd) {
                self.finish(cmd.cid(), status);
            }
        }
        fetched
    }

    fn finish(&mut self, cid: u16, status: Status) {
        if !status.is_success() {
            self.ctrl.counters.io_errors.fetch_add(1, Ordering::Relaxed);
            self.ctrl.log_error(self.q.qid, cid, status);
        }
        self.pending.push(Completion {
            dw0: 0,
            sq_head: self.head as u16,
            sq_id: self.q.qid,
            cid,
            status,
        });
    }

    /// Checks a command and submits its media operations.
    fn start(&mut self, mem: &Arc<DmaSpace>, cmd: &Command) -> Result<(), Status> {
        self.next_hold = None;
        if cmd.fuse() != 0 {
            return Err(Status::INVALID_FIELD);
        }
        let ctrl = self.ctrl.clone();
        let counters = &ctrl.counters;
        if cmd.opcode() == io::FLUSH && cmd.nsid() == 0xffff_ffff {
            let entries: Vec<_> = ctrl
                .config
                .namespaces
                .iter()
                .map(|ns| ns.media.flush())
                .collect();
            counters.flush_commands.fetch_add(1, Ordering::Relaxed);
            return self.submit(cmd.cid(), Kind::Other, 0, Vec::new(), mem, entries);
        }
        let ns = ctrl.namespace(cmd.nsid())?;
        match cmd.opcode() {
            io::READ | io::WRITE | io::COMPARE => {
                let count = u64::from(cmd.nlb()) + 1;
                let (offset, len) = ns
                    .byte_range(cmd.slba(), count)
                    .ok_or(Status::LBA_OUT_OF_RANGE)?;
                if len > MAX_TRANSFER {
                    return Err(Status::INVALID_FIELD);
                }
                // No end-to-end protection information.
                if (cmd.cdw(12) >> 26) & 0xf != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                let fua = cmd.cdw(12) & (1 << 30) != 0;
                let segments = data_segments(mem.as_ref(), cmd, len, true)?;
                let dir = if cmd.opcode() == io::WRITE {
                    IoDirection::Write
                } else {
                    IoDirection::Read
                };
                let (not_before, stalled) = match ns.middle.admit(dir, offset, len) {
                    Admission::Go { fail: true, .. } => {
                        return Err(if dir == IoDirection::Write {
                            Status::WRITE_FAULT
                        } else {
                            Status::UNRECOVERED_READ_ERROR
                        })
                    }
                    Admission::Go {
                        not_before,
                        stalled,
                        ..
                    } => (not_before, stalled),
                    // Only EBS volume models throttle; an NVMe namespace has
                    // none, but if one did, the command would wait it out.
                    Admission::Retry(at) => (Some(at), false),
                };
                self.next_hold = Some(Hold {
                    nsid: cmd.nsid(),
                    dir,
                    offset,
                    len,
                    not_before,
                    stalled,
                });
                match cmd.opcode() {
                    io::READ => {
                        let mut iov = iovecs(mem.as_ref(), &segments, true)?;
                        let mut kind = Kind::Read;
                        if ns.direct && !direct_aligned(&iov) {
                            let mut bounce =
                                AlignedBuf::new(len as usize).ok_or(Status::INTERNAL_ERROR)?;
                            iov = vec![bounce.iovec()];
                            kind = Kind::BounceRead { bounce, segments };
                        }
                        counters.read_commands.fetch_add(1, Ordering::Relaxed);
                        counters.bytes_read.fetch_add(len, Ordering::Relaxed);
                        // SAFETY: the iovecs stay in the in-flight slot, and
                        // the memory they describe in `mem` (or the bounce
                        // buffer, also in the slot), until completion.
                        let e = unsafe { ns.media.read(iov.as_ptr(), iov.len() as u32, offset) };
                        self.submit(cmd.cid(), kind, len, iov, mem, vec![e])
                    }
                    io::WRITE => {
                        let mut iov = iovecs(mem.as_ref(), &segments, false)?;
                        let mut kind = Kind::Write;
                        if ns.direct && !direct_aligned(&iov) {
                            let mut bounce =
                                AlignedBuf::new(len as usize).ok_or(Status::INTERNAL_ERROR)?;
                            copy_from_guest(mem.as_ref(), &segments, bounce.as_mut_slice())?;
                            iov = vec![bounce.iovec()];
                            kind = Kind::BounceWrite { _bounce: bounce };
                        }
                        counters.write_commands.fetch_add(1, Ordering::Relaxed);
                        counters.bytes_written.fetch_add(len, Ordering::Relaxed);
                        // SAFETY: as for reads.
                        let e = unsafe { ns.media.write(iov.as_ptr(), iov.len() as u32, offset) };
                        let mut entries = vec![e];
                        // Force Unit Access, or no volatile write cache: the
                        // write is durable before it completes.
                        let wce =
                            ctrl.features.volatile_write_cache.load(Ordering::Relaxed) & 1 != 0;
                        if fua || !wce {
                            entries[0] = entries[0].clone().flags(squeue::Flags::IO_LINK);
                            entries.push(ns.media.flush());
                        }
                        self.submit(cmd.cid(), kind, len, iov, mem, entries)
                    }
                    _ => {
                        let mut bounce =
                            AlignedBuf::new(len as usize).ok_or(Status::INTERNAL_ERROR)?;
                        let iov = vec![bounce.iovec()];
                        counters.other_commands.fetch_add(1, Ordering::Relaxed);
                        // SAFETY: the bounce buffer moves into the slot with
                        // the iovec (a Vec's heap data does not move).
                        let e = unsafe { ns.media.read(iov.as_ptr(), 1, offset) };
                        self.submit(
                            cmd.cid(),
                            Kind::Compare { bounce, segments },
                            len,
                            iov,
                            mem,
                            vec![e],
                        )
                    }
                }
            }
            io::FLUSH => {
                counters.flush_commands.fetch_add(1, Ordering::Relaxed);
                self.submit(
                    cmd.cid(),
                    Kind::Other,
                    0,
                    Vec::new(),
                    mem,
                    vec![ns.media.flush()],
                )
            }
            io::WRITE_ZEROES => {
                let count = u64::from(cmd.nlb()) + 1;
                let (offset, len) = ns
                    .byte_range(cmd.slba(), count)
                    .ok_or(Status::LBA_OUT_OF_RANGE)?;
                counters.other_commands.fetch_add(1, Ordering::Relaxed);
                // DEAC: deallocate as well (DLFEAT says it reads zeros).
                if cmd.cdw(12) & (1 << 25) != 0 || ns.zero_range_unsupported.load(Ordering::Relaxed)
                {
                    let e = ns.media.punch_hole(offset, len);
                    return self.submit(cmd.cid(), Kind::Other, 0, Vec::new(), mem, vec![e]);
                }
                let e = ns.media.zero_range(offset, len);
                let kind = Kind::ZeroRange {
                    nsid: cmd.nsid(),
                    offset,
                    len,
                };
                self.submit(cmd.cid(), kind, 0, Vec::new(), mem, vec![e])
            }
            io::DATASET_MANAGEMENT => {
                let ranges = (cmd.cdw(10) & 0xff) as usize + 1;
                let deallocate = cmd.cdw(11) & (1 << 2) != 0;
                let mut raw = vec![0u8; ranges * 16];
                let segments = data_segments(mem.as_ref(), cmd, raw.len() as u64, true)?;
                copy_from_guest(mem.as_ref(), &segments, &mut raw)?;
                counters.other_commands.fetch_add(1, Ordering::Relaxed);
                counters
                    .deallocate_commands
                    .fetch_add(u64::from(deallocate), Ordering::Relaxed);
                if !deallocate {
                    // Only hints (IDR, IDW): nothing to do.
                    return Err(Status::SUCCESS);
                }
                let mut entries = Vec::with_capacity(ranges.min(DSM_MAX_RANGES));
                for r in raw.chunks_exact(16) {
                    let blocks = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
                    let slba =
                        u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
                    if blocks == 0 {
                        continue;
                    }
                    let (offset, len) = ns
                        .byte_range(slba, blocks)
                        .ok_or(Status::LBA_OUT_OF_RANGE)?;
                    entries.push(ns.media.punch_hole(offset, len));
                }
                if entries.is_empty() {
                    return Err(Status::SUCCESS);
                }
                self.submit(cmd.cid(), Kind::Other, 0, Vec::new(), mem, entries)
            }
            _ => Err(Status::INVALID_OPCODE),
        }
    }

    /// Puts a command in flight with its operations (the first is the data
    /// operation for reads, writes and compares).
    fn submit(
        &mut self,
        cid: u16,
        kind: Kind,
        expected: u64,
        iovecs: Vec<libc::iovec>,
        mem: &Arc<DmaSpace>,
        entries: Vec<squeue::Entry>,
    ) -> Result<(), Status> {
        let Some(slot) = self.free.pop() else {
            return Err(Status::INTERNAL_ERROR);
        };
        let has_data = !matches!(kind, Kind::Other | Kind::ZeroRange { .. });
        let hold = self.next_hold.take();
        self.slots[slot] = Some(InFlight {
            cid,
            hold,
            kind,
            status: Status::SUCCESS,
            remaining: entries.len() as u32,
            expected,
            _iovecs: iovecs,
            _mem: mem.clone(),
        });
        for (i, e) in entries.into_iter().enumerate() {
            let tag = slot as u64 | if i == 0 && has_data { DATA_OP } else { 0 };
            // SAFETY: every pointer in the entry points into the slot's
            // iovecs, bounce buffer or DMA space, which live until the
            // slot's last operation completes.
            if let Err(e) = unsafe { self.ring.push(e, tag) } {
                tracing::error!(error = %e, "io_uring push failed");
                if let Some(f) = self.slots[slot].as_mut() {
                    f.status = Status::INTERNAL_ERROR;
                    f.remaining -= 1;
                }
            }
        }
        if self.slots[slot].as_ref().is_some_and(|f| f.remaining == 0) {
            self.slots[slot] = None;
            self.free.push(slot);
            return Err(Status::INTERNAL_ERROR);
        }
        Ok(())
    }

    fn reap(&mut self) -> usize {
        let mut done = Vec::new();
        let n = self.ring.reap(|c| done.push(c));
        for c in done {
            self.complete_op(c);
        }
        n
    }

    fn complete_op(&mut self, c: RingCompletion) {
        let slot = (c.tag & 0xffff_ffff) as usize;
        let Some(Some(f)) = self.slots.get_mut(slot) else {
            return;
        };
        if let (Kind::ZeroRange { nsid, offset, len }, true) =
            (&f.kind, c.result == -libc::EOPNOTSUPP)
        {
            // A hole reads as zeros too (DLFEAT says so): punch one, and
            // from now on punch straight away on this namespace.
            let (nsid, offset, len) = (*nsid, *offset, *len);
            f.kind = Kind::Other;
            if let Ok(ns) = self.ctrl.namespace(nsid) {
                ns.zero_range_unsupported.store(true, Ordering::Relaxed);
                // SAFETY: fallocate touches no memory of ours.
                if unsafe {
                    self.ring
                        .push(ns.media.punch_hole(offset, len), slot as u64)
                }
                .is_ok()
                {
                    return;
                }
            }
        }
        if f.status.is_success() {
            if c.result < 0 {
                warn_limited!(
                    MEDIA_ERROR,
                    qid = self.q.qid,
                    errno = -c.result,
                    "media operation failed"
                );
                f.status = match f.kind {
                    Kind::Read | Kind::BounceRead { .. } | Kind::Compare { .. } => {
                        Status::UNRECOVERED_READ_ERROR
                    }
                    Kind::Write | Kind::BounceWrite { .. } => Status::WRITE_FAULT,
                    Kind::Other | Kind::ZeroRange { .. } => Status::INTERNAL_ERROR,
                };
                if -c.result == libc::EFAULT {
                    f.status = Status::DATA_TRANSFER_ERROR;
                }
            } else if c.tag & DATA_OP != 0 && c.result as u64 != f.expected {
                f.status = Status::INTERNAL_ERROR;
            }
        }
        f.remaining = f.remaining.saturating_sub(1);
        if f.remaining > 0 {
            return;
        }
        let Some(f) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        let mut status = f.status;
        if status.is_success() {
            match &f.kind {
                Kind::Compare { bounce, segments } => {
                    let mut host = vec![0u8; bounce.len];
                    status = match copy_from_guest(f._mem.as_ref(), segments, &mut host) {
                        Ok(()) if host == bounce.as_slice() => Status::SUCCESS,
                        Ok(()) => Status::COMPARE_FAILURE,
                        Err(s) => s,
                    };
                }
                Kind::BounceRead { bounce, segments } => {
                    if let Err(s) = copy_to_guest(f._mem.as_ref(), segments, bounce.as_slice()) {
                        status = s;
                    }
                }
                _ => {}
            }
        }
        match f.hold {
            Some(hold) => self.release(Held {
                at: hold.not_before.unwrap_or_else(Instant::now),
                cid: f.cid,
                status,
                hold,
            }),
            None => self.complete(f.cid, status),
        }
    }

    fn complete(&mut self, cid: u16, status: Status) {
        self.finish(cid, status);
    }

    /// Completes a held command if its time has come, else keeps it.
    fn release(&mut self, mut h: Held) {
        let stopping = self.stop.load(Ordering::Relaxed) != RUN;
        let ns = self.ctrl.namespace(h.hold.nsid).ok();
        if !stopping {
            if h.at > Instant::now() {
                self.held.push(h);
                return;
            }
            if h.hold.stalled {
                if let Some(at) = ns.and_then(|ns| {
                    ns.middle
                        .still_stalled(h.hold.dir, h.hold.offset, h.hold.len)
                }) {
                    h.at = at;
                    self.held.push(h);
                    return;
                }
            }
        }
        if let Some(ns) = ns {
            ns.middle.completed(h.hold.dir, h.hold.len);
        }
        self.complete(h.cid, h.status);
    }

    /// Releases every held command whose time has come.
    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = Instant::now();
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.at <= now);
        self.held = wait;
        for h in due {
            self.release(h);
        }
    }

    /// Posts waiting completions and signals the vector as coalescing allows.
    fn post(&mut self, mem: &DmaSpace) {
        let mut posted = 0;
        let mut at = 0;
        while at < self.pending.len() {
            match self.q.cq.post(&self.ctrl, mem, &self.pending[at]) {
                Ok(()) => {
                    posted += 1;
                    at += 1;
                }
                Err(PostError::Full) => break,
                Err(PostError::Unmapped) => {
                    // Nowhere to post: the host took the memory away.
                    at += 1;
                }
            }
        }
        self.pending.drain(..at);
        if posted == 0 && self.unsignalled == 0 {
            return;
        }
        self.unsignalled += posted;
        let since = *self.unsignalled_since.get_or_insert_with(Instant::now);
        let (threshold, time) = self.coalescing();
        if self.unsignalled > threshold
            || since.elapsed() >= time
            || self.stop.load(Ordering::Relaxed) != RUN
        {
            if self.q.cq.interrupts_enabled {
                self.ctrl.irqs.signal(self.q.cq.vector);
            }
            self.unsignalled = 0;
            self.unsignalled_since = None;
        }
    }
}

impl std::fmt::Debug for IoWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoWorker")
            .field("qid", &self.q.qid)
            .finish()
    }
}
