//! The NVMe controller: its registers, queues and features, shared between
//! the thread that serves the vfio-user socket and the controller's own
//! threads.
//!
//! The socket thread must answer every message quickly (QEMU gives up after
//! five seconds), so register writes only record state and wake a thread:
//! CC and admin doorbells wake the admin thread ([`Controller::admin_tick`]),
//! an I/O submission doorbell wakes that queue's worker ([`crate::io`]).
//! Enabling, resetting and shutting down the controller, and every admin
//! command, happen on the admin thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use card_firmware::warn::WarnLimiter;
use card_firmware::warn_limited;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dma::{DmaMemory, DmaRegion, DmaSpace};
use crate::namespace::Namespace;
use crate::spec::{reg, Command, Completion, Status, CQE_SIZE, MAX_QUEUE_ENTRIES, SQE_SIZE};

static BAD_DOORBELL: WarnLimiter = WarnLimiter::new(5_000);
static BAD_REGISTER: WarnLimiter = WarnLimiter::new(5_000);

/// What the controller is and serves.
#[derive(Debug)]
pub struct ControllerConfig {
    /// Serial number (SN), at most 20 ASCII characters.
    pub serial: String,
    /// Model number (MN), at most 40 ASCII characters.
    pub model: String,
    /// Firmware revision (FR), at most 8 ASCII characters.
    pub firmware: String,
    /// I/O submission/completion queue pairs the controller offers.
    pub io_queues: u16,
    /// How long an idle queue worker keeps polling its (shadow) doorbell
    /// and its ring before it sleeps; zero = sleep at once.
    pub poll: Duration,
    /// Namespaces; NSID n is `namespaces[n - 1]`.
    pub namespaces: Vec<Namespace>,
}

/// MSI-X vectors: the eventfds the client passed with SET_IRQS.
#[derive(Debug)]
pub struct Interrupts {
    vectors: RwLock<Vec<Option<File>>>,
    fired: Vec<AtomicU64>,
}

impl Interrupts {
    fn new(count: usize) -> Self {
        Self {
            vectors: RwLock::new((0..count).map(|_| None).collect()),
            fired: (0..count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn count(&self) -> usize {
        self.fired.len()
    }

    /// Installs eventfds for vectors `start..start + fds.len()`; with no fds,
    /// disables `start..start + count` (as SET_IRQS with DATA_NONE does).
    pub fn set(&self, start: u32, count: u32, fds: Vec<File>) {
        let Ok(mut vectors) = self.vectors.write() else {
            return;
        };
        if fds.is_empty() {
            for v in vectors.iter_mut().skip(start as usize).take(count as usize) {
                *v = None;
            }
            return;
        }
        for (i, fd) in fds.into_iter().enumerate() {
            if let Some(slot) = vectors.get_mut(start as usize + i) {
                *slot = Some(fd);
            }
        }
    }

    /// Signals `vector`.
    pub fn signal(&self, vector: u16) {
        let Some(counter) = self.fired.get(vector as usize) else {
            return;
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(vectors) = self.vectors.read() {
            if let Some(Some(fd)) = vectors.get(vector as usize) {
                let _ = (&*fd).write(&1u64.to_ne_bytes());
            }
        }
    }

    /// How many times `vector` was signalled (for tests and metrics).
    pub fn fired(&self, vector: u16) -> u64 {
        self.fired
            .get(vector as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// Counters for the SMART log and the metrics file.
#[derive(Debug, Default)]
pub struct Counters {
    pub read_commands: AtomicU64,
    pub write_commands: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub other_commands: AtomicU64,
    pub flush_commands: AtomicU64,
    pub deallocate_commands: AtomicU64,
    /// Admin commands that completed with an error status.
    pub admin_errors: AtomicU64,
    /// I/O commands that completed with an error status.
    pub io_errors: AtomicU64,
    pub doorbell_writes: AtomicU64,
    pub resets: AtomicU64,
    /// Successful Doorbell Buffer Config commands (shadow doorbells taken).
    pub doorbell_buffer_configs: AtomicU64,
}

/// A completion queue. Posting is serialised by its lock, since several
/// submission queues may share it.
#[derive(Debug)]
pub struct CompletionQueue {
    pub qid: u16,
    pub base: u64,
    pub size: u32,
    pub vector: u16,
    pub interrupts_enabled: bool,
    state: Mutex<CqState>,
}

#[derive(Debug)]
struct CqState {
    tail: u32,
    phase: bool,
    head: u32,
}

/// Why a completion could not be posted.
#[derive(Debug, PartialEq, Eq)]
pub enum PostError {
    /// The queue is full: try again after the host consumes entries.
    Full,
    /// The queue's memory is not mapped any more.
    Unmapped,
}

impl CompletionQueue {
    pub fn new(qid: u16, base: u64, size: u32, vector: u16, interrupts_enabled: bool) -> Self {
        Self {
            qid,
            base,
            size,
            vector,
            interrupts_enabled,
            state: Mutex::new(CqState {
                tail: 0,
                phase: true,
                head: 0,
            }),
        }
    }

    /// Writes one entry with the current phase tag: DW0-2 first, DW3 (with
    /// the phase tag) last, so the host never sees a half-written entry.
    pub fn post(&self, ctrl: &Controller, mem: &DmaSpace, c: &Completion) -> Result<(), PostError> {
        let mut st = lock(&self.state);
        if let Some(head) = ctrl.cq_head(self.qid, mem) {
            if head < self.size {
                st.head = head;
            } else {
                warn_limited!(
                    BAD_DOORBELL,
                    qid = self.qid,
                    head,
                    "completion queue head past the queue; ignored"
                );
            }
        }
        if (st.tail + 1) % self.size == st.head {
            return Err(PostError::Full);
        }
        let bytes = c.to_bytes(st.phase);
        let addr = self.base + u64::from(st.tail) * CQE_SIZE;
        mem.write(addr, &bytes[..12])
            .map_err(|_| PostError::Unmapped)?;
        mem.write(addr + 12, &bytes[12..])
            .map_err(|_| PostError::Unmapped)?;
        st.tail += 1;
        if st.tail == self.size {
            st.tail = 0;
            st.phase = !st.phase;
        }
        Ok(())
    }
}

/// A running I/O submission queue worker.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    pub cqid: u16,
    /// [`crate::io::RUN`], [`crate::io::STOP_POST`] or [`crate::io::STOP_DISCARD`].
    pub stop: Arc<AtomicU8>,
    pub thread: Option<JoinHandle<()>>,
}

/// What only the admin thread changes.
#[derive(Debug, Default)]
pub(crate) struct AdminState {
    pub enabled: bool,
    pub shut_down: bool,
    pub resets_seen: u64,
    pub sq_base: u64,
    pub sq_size: u32,
    pub sq_head: u32,
    pub pending: VecDeque<Completion>,
    /// Command ids of outstanding Asynchronous Event Requests.
    pub aers: Vec<u16>,
    pub workers: Vec<Option<WorkerHandle>>,
}

/// Features the host can set; reset to defaults with the controller.
#[derive(Debug)]
pub struct Features {
    pub arbitration: AtomicU32,
    pub power_management: AtomicU32,
    pub temperature_threshold: AtomicU32,
    pub error_recovery: AtomicU32,
    pub volatile_write_cache: AtomicU32,
    pub number_of_queues: AtomicU32,
    pub interrupt_coalescing: AtomicU32,
    pub async_event_config: AtomicU32,
    /// Interrupt Vector Configuration: bit 16 = Coalescing Disable.
    pub vector_config: Vec<AtomicU32>,
}

/// Composite temperature the SMART log reports (kelvin), and its default
/// over-temperature threshold.
pub const TEMPERATURE_K: u32 = 313;
pub const DEFAULT_TEMP_THRESHOLD_K: u32 = 343;

impl Features {
    fn new(vectors: usize) -> Self {
        let f = Self {
            arbitration: AtomicU32::new(0),
            power_management: AtomicU32::new(0),
            temperature_threshold: AtomicU32::new(0),
            error_recovery: AtomicU32::new(0),
            volatile_write_cache: AtomicU32::new(0),
            number_of_queues: AtomicU32::new(0),
            interrupt_coalescing: AtomicU32::new(0),
            async_event_config: AtomicU32::new(0),
            vector_config: (0..vectors).map(|_| AtomicU32::new(0)).collect(),
        };
        f.reset(0);
        f
    }

    fn reset(&self, io_queues: u16) {
        self.arbitration.store(0, Ordering::Relaxed);
        self.power_management.store(0, Ordering::Relaxed);
        self.temperature_threshold
            .store(DEFAULT_TEMP_THRESHOLD_K, Ordering::Relaxed);
        self.error_recovery.store(0, Ordering::Relaxed);
        // A volatile write cache is present and enabled, as on a real drive:
        // FLUSH is what makes writes durable.
        self.volatile_write_cache.store(1, Ordering::Relaxed);
        let n = u32::from(io_queues.saturating_sub(1));
        self.number_of_queues
            .store(n | (n << 16), Ordering::Relaxed);
        self.interrupt_coalescing.store(0, Ordering::Relaxed);
        self.async_event_config.store(0, Ordering::Relaxed);
        for (i, v) in self.vector_config.iter().enumerate() {
            v.store(i as u32, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Registers {
    cc: u32,
    intms: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
}

pub struct Controller {
    pub config: ControllerConfig,
    regs: Mutex<Registers>,
    csts: AtomicU32,
    /// Incremented by every request for a reset (CC.EN 1→0, device reset).
    reset_requests: AtomicU64,
    dma: Mutex<Arc<DmaSpace>>,
    pub irqs: Interrupts,
    /// Doorbell values as last written: SQ y tail at 2y, CQ y head at 2y + 1.
    doorbells: Box<[AtomicU32]>,
    /// Wakes the admin thread (0) and I/O queue y's worker (y).
    wakes: Box<[EventFd]>,
    /// Doorbell Buffer Config: shadow doorbells and event indexes (0 = off).
    shadow_doorbells: AtomicU64,
    event_indexes: AtomicU64,
    pub(crate) admin: Mutex<AdminState>,
    /// Completion queues by id (0 = admin).
    pub(crate) cqs: RwLock<Vec<Option<Arc<CompletionQueue>>>>,
    pub features: Features,
    pub counters: Counters,
    /// The error information log: a running count and the newest entries.
    error_log: Mutex<(u64, VecDeque<[u8; 64]>)>,
}

/// CSTS bits.
pub const CSTS_RDY: u32 = 1;
pub const CSTS_CFS: u32 = 1 << 1;
pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("csts", &self.csts)
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub fn new(config: ControllerConfig) -> std::io::Result<Arc<Self>> {
        let queues = usize::from(config.io_queues) + 1;
        let wakes = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let ctrl = Self {
            irqs: Interrupts::new(queues),
            features: Features::new(queues),
            regs: Mutex::new(Registers::default()),
            csts: AtomicU32::new(0),
            reset_requests: AtomicU64::new(0),
            dma: Mutex::new(Arc::new(DmaSpace::default())),
            doorbells: (0..queues * 2).map(|_| AtomicU32::new(0)).collect(),
            wakes: wakes.into_boxed_slice(),
            shadow_doorbells: AtomicU64::new(0),
            event_indexes: AtomicU64::new(0),
            admin: Mutex::new(AdminState::default()),
            cqs: RwLock::new((0..queues).map(|_| None).collect()),
            counters: Counters::default(),
            error_log: Mutex::new((0, VecDeque::new())),
            config,
        };
        ctrl.features.reset(ctrl.config.io_queues);
        Ok(Arc::new(ctrl))
    }

    pub fn io_queues(&self) -> u16 {
        self.config.io_queues
    }

    // ----- memory -----

    /// The DMA space as it is now; commands keep the one they started with.
    pub fn dma(&self) -> Arc<DmaSpace> {
        lock(&self.dma).clone()
    }

    pub fn dma_map(&self, region: DmaRegion) {
        let mut dma = lock(&self.dma);
        *dma = Arc::new(dma.with(region));
    }

    pub fn dma_unmap(&self, addr: u64, len: u64) {
        let mut dma = lock(&self.dma);
        *dma = Arc::new(dma.without(addr, len));
    }

    pub fn dma_unmap_all(&self) {
        *lock(&self.dma) = Arc::new(DmaSpace::default());
    }

    // ----- registers -----

    /// CAP: MQES, contiguous queues required, 15 s timeout, DSTRD 0, NVM
    /// command set, 4 KiB pages only.
    pub fn cap(&self) -> u64 {
        u64::from(MAX_QUEUE_ENTRIES - 1) | (1 << 16) | (30 << 24) | (1 << 37)
    }

    pub fn csts(&self) -> u32 {
        self.csts.load(Ordering::Acquire)
    }

    /// A read of BAR0. Doorbells and reserved space read as zero.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let regs = *lock(&self.regs);
        let mut image = [0u8; 0x40];
        image[0..8].copy_from_slice(&self.cap().to_le_bytes());
        image[8..12].copy_from_slice(&crate::spec::VERSION_1_4.to_le_bytes());
        image[0x0c..0x10].copy_from_slice(&regs.intms.to_le_bytes());
        image[0x10..0x14].copy_from_slice(&regs.intms.to_le_bytes());
        image[0x14..0x18].copy_from_slice(&regs.cc.to_le_bytes());
        image[0x1c..0x20].copy_from_slice(&self.csts().to_le_bytes());
        image[0x24..0x28].copy_from_slice(&regs.aqa.to_le_bytes());
        image[0x28..0x30].copy_from_slice(&regs.asq.to_le_bytes());
        image[0x30..0x38].copy_from_slice(&regs.acq.to_le_bytes());
        let start = offset as usize;
        if offset < image.len() as u64 {
            let n = data.len().min(image.len() - start);
            data[..n].copy_from_slice(&image[start..start + n]);
        }
    }

    /// A write to BAR0: 4- or 8-byte aligned accesses; anything else is
    /// ignored (and logged, rate-limited). Never fails: the socket must stay
    /// in step with the client.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let aligned = matches!(data.len(), 4 | 8) && offset % data.len() as u64 == 0;
        if !aligned {
            warn_limited!(
                BAD_REGISTER,
                offset,
                len = data.len(),
                "unaligned BAR0 write ignored"
            );
            return;
        }
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.write_dword(offset + 4 * i as u64, value);
        }
    }

    fn write_dword(&self, offset: u64, value: u32) {
        if offset >= reg::DOORBELLS {
            let index = ((offset - reg::DOORBELLS) / 4) as usize;
            let Some(slot) = self.doorbells.get(index) else {
                warn_limited!(
                    BAD_DOORBELL,
                    offset,
                    "doorbell of a queue the controller does not have"
                );
                return;
            };
            self.counters
                .doorbell_writes
                .fetch_add(1, Ordering::Relaxed);
            slot.store(value & 0xffff, Ordering::Release);
            self.wake(index / 2);
            return;
        }
        let mut regs = lock(&self.regs);
        match offset {
            reg::INTMS => regs.intms |= value,
            reg::INTMC => regs.intms &= !value,
            reg::CC => {
                let was_enabled = regs.cc & 1 != 0;
                regs.cc = value;
                if was_enabled && value & 1 == 0 {
                    self.reset_requests.fetch_add(1, Ordering::AcqRel);
                }
                drop(regs);
                self.wake(0);
            }
            reg::AQA => regs.aqa = value & 0x0fff_0fff,
            o if o == reg::ASQ => regs.asq = (regs.asq & !0xffff_ffff) | u64::from(value),
            o if o == reg::ASQ + 4 => {
                regs.asq = (regs.asq & 0xffff_ffff) | (u64::from(value) << 32)
            }
            o if o == reg::ACQ => regs.acq = (regs.acq & !0xffff_ffff) | u64::from(value),
            o if o == reg::ACQ + 4 => {
                regs.acq = (regs.acq & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // CAP, VS and CSTS are read-only; NSSR is not supported (CAP.NSSRS = 0).
            _ => {}
        }
    }

    /// A reset from outside the register interface (vfio-user DEVICE_RESET,
    /// or the client going away): registers to their reset values and the
    /// controller reset on the admin thread.
    pub fn device_reset(&self) {
        let mut regs = lock(&self.regs);
        *regs = Registers::default();
        self.reset_requests.fetch_add(1, Ordering::AcqRel);
        drop(regs);
        self.wake(0);
    }

    fn wake(&self, queue: usize) {
        if let Some(fd) = self.wakes.get(queue) {
            let _ = fd.write(1);
        }
    }

    /// The eventfd that wakes queue `qid`'s thread (0 = admin).
    pub fn wake_fd(&self, qid: u16) -> &EventFd {
        &self.wakes[usize::from(qid)]
    }

    // ----- doorbells -----

    /// Shadow doorbell and event index buffers, if the host configured them.
    pub fn doorbell_buffers(&self) -> Option<(u64, u64)> {
        let shadow = self.shadow_doorbells.load(Ordering::Acquire);
        (shadow != 0).then(|| (shadow, self.event_indexes.load(Ordering::Acquire)))
    }

    pub(crate) fn set_doorbell_buffers(&self, shadow: u64, events: u64) {
        self.event_indexes.store(events, Ordering::Release);
        self.shadow_doorbells.store(shadow, Ordering::Release);
    }

    /// The host's latest tail of submission queue `qid`: from the shadow
    /// doorbell if configured (I/O queues only), else the register.
    pub fn sq_tail(&self, qid: u16, mem: &DmaSpace) -> Option<u32> {
        self.doorbell(2 * usize::from(qid), qid, mem)
    }

    /// The host's latest head of completion queue `qid`.
    pub fn cq_head(&self, qid: u16, mem: &DmaSpace) -> Option<u32> {
        self.doorbell(2 * usize::from(qid) + 1, qid, mem)
    }

    fn doorbell(&self, index: usize, qid: u16, mem: &DmaSpace) -> Option<u32> {
        if qid > 0 {
            if let Some((shadow, _)) = self.doorbell_buffers() {
                return mem
                    .read_u32(shadow + 4 * index as u64)
                    .ok()
                    .map(|v| v & 0xffff);
            }
        }
        self.doorbells.get(index).map(|d| d.load(Ordering::Acquire))
    }

    /// Publishes the event index of submission queue `qid`: the host rings
    /// the doorbell register only when its new tail passes it.
    pub fn set_sq_event_index(&self, qid: u16, tail: u32, mem: &DmaSpace) {
        if let Some((_, events)) = self.doorbell_buffers() {
            let _ = mem.write_u32(events + 8 * u64::from(qid), tail);
        }
    }

    // ----- the admin thread -----

    /// Runs the admin thread until `stop`: applies CC changes and processes
    /// the admin queue whenever woken.
    pub fn run_admin(self: Arc<Self>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Acquire) {
            let mut fds = [libc::pollfd {
                fd: self.wakes[0].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd; the timeout bounds how late a stop is seen.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
            let _ = self.wakes[0].read();
            self.admin_tick();
        }
        let mut st = lock(&self.admin);
        self.stop_queues(&mut st);
    }

    /// Applies pending resets and CC changes, then processes the admin
    /// submission queue. Called by the admin thread, or directly by tests.
    pub fn admin_tick(self: &Arc<Self>) {
        let mut st = lock(&self.admin);
        let requested = self.reset_requests.load(Ordering::Acquire);
        if requested != st.resets_seen {
            st.resets_seen = requested;
            self.reset(&mut st);
        }
        let cc = lock(&self.regs).cc;
        if cc & 1 == 0 {
            if st.enabled {
                self.reset(&mut st);
            }
            return;
        }
        if !st.enabled {
            if self.csts() & CSTS_CFS != 0 {
                return;
            }
            self.enable(&mut st, cc);
            if !st.enabled {
                return;
            }
        }
        if (cc >> 14) & 3 != 0 {
            if !st.shut_down {
                self.shutdown(&mut st);
            }
            return;
        }
        self.process_admin_queue(&mut st);
    }

    fn enable(&self, st: &mut AdminState, cc: u32) {
        let regs = *lock(&self.regs);
        let asqs = (regs.aqa & 0xfff) + 1;
        let acqs = ((regs.aqa >> 16) & 0xfff) + 1;
        let css = (cc >> 4) & 7;
        let mps = (cc >> 7) & 0xf;
        let ams = (cc >> 11) & 7;
        let valid = asqs >= 2
            && acqs >= 2
            && regs.asq % crate::spec::PAGE_SIZE == 0
            && regs.acq % crate::spec::PAGE_SIZE == 0
            && css == 0
            && mps == 0
            && ams == 0;
        if !valid {
            tracing::warn!(
                cc = format_args!("{cc:#x}"),
                aqa = format_args!("{:#x}", regs.aqa),
                asq = format_args!("{:#x}", regs.asq),
                acq = format_args!("{:#x}", regs.acq),
                "controller enabled with an invalid configuration: controller fatal status"
            );
            self.csts.store(CSTS_CFS, Ordering::Release);
            return;
        }
        st.sq_base = regs.asq;
        st.sq_size = asqs;
        st.sq_head = 0;
        st.enabled = true;
        st.shut_down = false;
        st.workers = (0..=self.config.io_queues).map(|_| None).collect();
        if let Ok(mut cqs) = self.cqs.write() {
            cqs[0] = Some(Arc::new(CompletionQueue::new(0, regs.acq, acqs, 0, true)));
        }
        self.csts.store(CSTS_RDY, Ordering::Release);
        tracing::info!(asqs, acqs, "controller enabled");
    }

    /// Stops every I/O queue (each waits for its commands in flight at the
    /// media, and posts nothing: after a reset the host owns the queue
    /// memory again) and drops all queues.
    fn stop_queues(&self, st: &mut AdminState) {
        for (qid, w) in st.workers.iter_mut().enumerate() {
            if let Some(mut w) = w.take() {
                w.stop.store(crate::io::STOP_DISCARD, Ordering::Release);
                self.wake(qid);
                if let Some(t) = w.thread.take() {
                    let _ = t.join();
                }
            }
        }
        if let Ok(mut cqs) = self.cqs.write() {
            cqs.iter_mut().for_each(|c| *c = None);
        }
    }

    fn reset(&self, st: &mut AdminState) {
        self.stop_queues(st);
        st.enabled = false;
        st.shut_down = false;
        st.pending.clear();
        st.aers.clear();
        st.sq_head = 0;
        self.set_doorbell_buffers(0, 0);
        for d in self.doorbells.iter() {
            d.store(0, Ordering::Release);
        }
        self.features.reset(self.config.io_queues);
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        self.csts.store(0, Ordering::Release);
        tracing::info!("controller reset");
    }

    fn shutdown(&self, st: &mut AdminState) {
        self.stop_queues(st);
        for ns in &self.config.namespaces {
            if let Err(e) = ns.media.buffered().sync_data() {
                tracing::error!(path = %ns.media.path().display(), error = %e, "flush at shutdown failed");
            }
        }
        st.shut_down = true;
        self.csts
            .store(CSTS_RDY | CSTS_SHST_COMPLETE, Ordering::Release);
        tracing::info!("controller shut down");
    }

    fn process_admin_queue(self: &Arc<Self>, st: &mut AdminState) {
        let mem = self.dma();
        self.flush_admin_completions(st, &mem);
        let Some(tail) = self.sq_tail(0, &mem) else {
            return;
        };
        if tail >= st.sq_size {
            warn_limited!(
                BAD_DOORBELL,
                tail,
                "admin submission tail past the queue; ignored"
            );
            return;
        }
        while st.sq_head != tail && st.pending.len() < st.sq_size as usize {
            let mut raw = [0u8; 64];
            let addr = st.sq_base + u64::from(st.sq_head) * SQE_SIZE;
            st.sq_head = (st.sq_head + 1) % st.sq_size;
            if mem.read(addr, &mut raw).is_err() {
                // The admin queue is not in mapped memory: nothing can be
                // answered. A real controller reports a fatal status.
                tracing::error!(
                    addr,
                    "admin submission queue unreachable: controller fatal status"
                );
                self.csts.fetch_or(CSTS_CFS, Ordering::AcqRel);
                return;
            }
            let cmd = Command::from_bytes(&raw);
            if let Some((status, dw0)) = self.admin_command(st, &mem, &cmd) {
                if !status.is_success() {
                    self.counters.admin_errors.fetch_add(1, Ordering::Relaxed);
                    self.log_error(0, cmd.cid(), status);
                    tracing::debug!(opcode = cmd.opcode(), cdw10 = cmd.cdw(10), %status, "admin command failed");
                }
                st.pending.push_back(Completion {
                    dw0,
                    sq_head: st.sq_head as u16,
                    sq_id: 0,
                    cid: cmd.cid(),
                    status,
                });
            }
        }
        self.flush_admin_completions(st, &mem);
    }

    fn flush_admin_completions(&self, st: &mut AdminState, mem: &DmaSpace) {
        let cq = self.cqs.read().ok().and_then(|c| c[0].clone());
        let Some(cq) = cq else { return };
        let mut posted = false;
        while let Some(c) = st.pending.front() {
            match cq.post(self, mem, c) {
                Ok(()) => {
                    st.pending.pop_front();
                    posted = true;
                }
                Err(_) => break,
            }
        }
        if posted {
            self.irqs.signal(0);
        }
    }

    /// Completes an outstanding Asynchronous Event Request, if the host has
    /// one, with `dw0` (event type, info and log page).
    pub fn post_async_event(self: &Arc<Self>, dw0: u32) -> bool {
        let mut st = lock(&self.admin);
        let Some(cid) = st.aers.pop() else {
            return false;
        };
        let head = st.sq_head as u16;
        st.pending.push_back(Completion {
            dw0,
            sq_head: head,
            sq_id: 0,
            cid,
            status: Status::SUCCESS,
        });
        let mem = self.dma();
        self.flush_admin_completions(&mut st, &mem);
        true
    }

    /// Records a failed command in the error information log.
    pub(crate) fn log_error(&self, sqid: u16, cid: u16, status: Status) {
        let mut log = lock(&self.error_log);
        log.0 += 1;
        let mut e = [0u8; 64];
        e[0..8].copy_from_slice(&log.0.to_le_bytes());
        e[8..10].copy_from_slice(&sqid.to_le_bytes());
        e[10..12].copy_from_slice(&cid.to_le_bytes());
        e[12..14].copy_from_slice(&(status.field() << 1).to_le_bytes());
        // Parameter error location: not recorded.
        e[14..16].copy_from_slice(&0xffffu16.to_le_bytes());
        log.1.push_front(e);
        log.1.truncate(crate::spec::ERROR_LOG_ENTRIES);
    }

    /// The error information log page (newest first) and the count of
    /// errors since the card started.
    pub fn error_log(&self) -> (Vec<u8>, u64) {
        let log = lock(&self.error_log);
        let mut page = vec![0u8; 64 * crate::spec::ERROR_LOG_ENTRIES];
        for (i, e) in log.1.iter().enumerate() {
            page[i * 64..i * 64 + 64].copy_from_slice(e);
        }
        (page, log.0)
    }

    /// A completion queue by id.
    pub fn completion_queue(&self, qid: u16) -> Option<Arc<CompletionQueue>> {
        self.cqs
            .read()
            .ok()
            .and_then(|c| c.get(usize::from(qid)).cloned().flatten())
    }

    /// A snapshot of the counters, for the metrics file.
    pub fn snapshot(&self) -> serde_json::Value {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "read_commands": get(&c.read_commands),
            "write_commands": get(&c.write_commands),
            "bytes_read": get(&c.bytes_read),
            "bytes_written": get(&c.bytes_written),
            "other_commands": get(&c.other_commands),
            "flush_commands": get(&c.flush_commands),
            "deallocate_commands": get(&c.deallocate_commands),
            "admin_errors": get(&c.admin_errors),
            "io_errors": get(&c.io_errors),
            "doorbell_writes": get(&c.doorbell_writes),
            "resets": get(&c.resets),
            "shadow_doorbells": self.doorbell_buffers().is_some(),
            "doorbell_buffer_configs": get(&c.doorbell_buffer_configs),
            "interrupts": (0..self.irqs.count()).map(|v| self.irqs.fired(v as u16)).sum::<u64>(),
        })
    }
}

/// How long an idle queue worker sleeps before looking at its queue again
/// even without a doorbell (a safety net, not the normal wake-up).
pub const IDLE_RECHECK: Duration = Duration::from_millis(100);
