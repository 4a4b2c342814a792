//! A userspace NVMe driver that attaches to a card over vfio-user the way a
//! VMM and its guest's nvme driver would: it DMA-maps a memfd as guest
//! memory, wires MSI-X vectors to eventfds, enables the controller through
//! the CC/CSTS handshake, identifies it, and creates I/O queue pairs that
//! one thread each drives. Doorbells go through the socket (a trapped BAR
//! write), through a mmapped doorbell page when the card offers one, and
//! are mostly skipped with shadow doorbells (Doorbell Buffer Config).
//!
//! Nothing the controller reports is trusted: queue heads, command ids and
//! register values are checked, and a misbehaving controller is an error.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::dma::{DmaBuf, DmaMemory, IOVA_BASE};
pub use super::identify::{ControllerInfo, NamespaceInfo};
use super::prp;
use super::queue::{need_event, CidPool, CqState, SqState};
use super::spec::{
    self, admin, cc, cns, csts, feature, reg, sgl, Cap, Command, Completion, Status, CQE_SIZE,
    PAGE, SQE_SIZE,
};
use super::transport::handshake;

/// vfio region and IRQ indexes (linux/vfio.h).
const BAR0_REGION: u32 = 0;
const CONFIG_REGION: u32 = 7;
const MSIX_IRQ_INDEX: u32 = 2;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// PCI command register: memory space and bus master enable.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEM_BME: u16 = 0x6;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    // The crate's error already carries its cause in its message: keep it
    // as text, not as a source, or `{:#}` chains print it twice.
    #[error("cannot attach to {}: {error}", path.display())]
    Connect {
        path: PathBuf,
        error: vfio_user::Error,
    },
    #[error("{}: no answer to the vfio-user handshake within {waited:?}; is it a vfio-user server?", path.display())]
    NoHandshake { path: PathBuf, waited: Duration },
    #[error("vfio-user {what}: {error}")]
    Transport {
        what: &'static str,
        error: vfio_user::Error,
    },
    #[error("not an NVMe controller: {0}")]
    NotNvme(String),
    #[error("guest memory: {0}")]
    Memory(std::io::Error),
    #[error("guest memory exhausted ({0} bytes asked)")]
    OutOfMemory(u64),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{what}: no answer within {waited:?}{}", if *.fatal { " (CSTS.CFS: controller fatal status)" } else { "" })]
    Timeout {
        what: String,
        waited: Duration,
        fatal: bool,
    },
    #[error("{what} failed: {status}")]
    Status { what: String, status: Status },
    #[error("the controller misbehaved: {0}")]
    Protocol(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the submission queue is full")]
    QueueFull,
    #[error(
        "the controller was reset; the queue's commands are gone and it must be created again"
    )]
    Reset,
}

impl DriverError {
    /// The status a failed command completed with, if that was the failure.
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub socket: PathBuf,
    /// Guest memory to map (queues, buffers, PRP lists).
    pub mem_size: usize,
    /// I/O queue pairs to ask for with Set Features (Number of Queues).
    pub io_queues: u16,
    /// Use shadow doorbells when the controller supports Doorbell Buffer Config.
    pub shadow_doorbells: bool,
    /// Use a mmappable doorbell area of BAR0 when the card offers one.
    pub mmap_doorbells: bool,
    /// Admin queue entries.
    pub admin_depth: u16,
    /// Limit for each admin command and each socket reply.
    pub timeout: Duration,
}

impl DriverConfig {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            mem_size: 64 << 20,
            io_queues: 4,
            shadow_doorbells: true,
            mmap_doorbells: true,
            admin_depth: 32,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Shadow doorbell and EventIdx pages (Doorbell Buffer Config).
struct Shadow {
    doorbells: DmaBuf,
    event_idx: DmaBuf,
}

/// A mmapped doorbell area of BAR0 (sparse mmap).
struct MappedDoorbells {
    ptr: *mut u8,
    len: usize,
    /// BAR0 offset of the mapping's first byte.
    bar_offset: u64,
}

// SAFETY: the mapping lives as long as the value; doorbells are written
// with atomic stores.
unsafe impl Send for MappedDoorbells {}
unsafe impl Sync for MappedDoorbells {}

impl Drop for MappedDoorbells {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// What every queue of one controller shares.
struct Inner {
    client: Mutex<Client>,
    mem: Arc<DmaMemory>,
    /// Doorbell stride in bytes.
    stride: u64,
    mapped: Option<MappedDoorbells>,
    shadow: Mutex<Option<Arc<Shadow>>>,
    /// One eventfd per MSI-X vector.
    vectors: Vec<EventFd>,
    /// Bumped by every reset; queues of an older epoch are dead.
    epoch: AtomicU64,
    /// Doorbell writes that reached the card (socket or mapped page), and
    /// those the shadow doorbells made unnecessary.
    doorbells_rung: AtomicU64,
    doorbells_skipped: AtomicU64,
    timeout: Duration,
}

impl Inner {
    fn client(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.client()
            .region_read(BAR0_REGION, offset, &mut b)
            .map_err(|source| DriverError::Transport {
                what: "BAR0 read",
                error: source,
            })?;
        Ok(u32::from_le_bytes(b))
    }

    fn write32(&self, offset: u64, value: u32) -> Result<()> {
        self.client()
            .region_write(BAR0_REGION, offset, &value.to_le_bytes())
            .map_err(|source| DriverError::Transport {
                what: "BAR0 write",
                error: source,
            })
    }

    /// Offset of a doorbell: SQ y tail at 2y, CQ y head at 2y+1 strides.
    fn doorbell_offset(&self, qid: u16, cq: bool) -> u64 {
        reg::DOORBELLS + (2 * u64::from(qid) + u64::from(cq)) * self.stride
    }

    /// Writes a doorbell register: through the mmapped page when there is
    /// one covering it, else as a trapped BAR write over the socket.
    fn ring_mmio(&self, qid: u16, cq: bool, value: u16) -> Result<()> {
        self.doorbells_rung.fetch_add(1, Ordering::Relaxed);
        let off = self.doorbell_offset(qid, cq);
        if let Some(m) = &self.mapped {
            if off >= m.bar_offset && off + 4 <= m.bar_offset + m.len as u64 {
                // Entries written before must be visible before the doorbell.
                fence(Ordering::SeqCst);
                // SAFETY: in the mapping (checked) and 4-aligned (stride).
                let db = unsafe { &*m.ptr.add((off - m.bar_offset) as usize).cast::<AtomicU32>() };
                db.store(u32::from(value), Ordering::SeqCst);
                return Ok(());
            }
        }
        self.write32(off, u32::from(value))
    }

    fn wait_vector(&self, vector: usize, timeout: Duration) -> Result<bool> {
        let Some(fd) = self.vectors.get(vector) else {
            std::thread::sleep(timeout.min(Duration::from_micros(50)));
            return Ok(false);
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(DriverError::EventFd(e))
            };
        }
        if n == 0 {
            return Ok(false);
        }
        match fd.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(DriverError::EventFd(e)),
        }
    }
}

/// Where a command's data lives and how to describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPointer {
    Prp,
    /// One SGL Data Block descriptor in the command.
    SglBlock,
    /// A Last Segment descriptor pointing at one Data Block per page.
    SglList,
    /// A Segment descriptor whose list ends in a Last Segment descriptor:
    /// the page-sized Data Blocks split over two chained segments.
    SglChain,
}

/// One submission/completion queue pair and its memory.
struct QueuePair {
    qid: u16,
    sq_mem: DmaBuf,
    cq_mem: DmaBuf,
    sq: SqState,
    cq: CqState,
    cids: CidPool,
    /// MSI-X vector, or None for a polled queue.
    vector: Option<u16>,
    shadow: Option<Arc<Shadow>>,
    epoch: u64,
    /// Shadow doorbell values last written (the "old" of need_event).
    sq_db_shadow: u16,
    cq_db_shadow: u16,
}

impl QueuePair {
    fn new(inner: &Inner, qid: u16, depth: u16, vector: Option<u16>) -> Result<Self> {
        let alloc = |len: u64| inner.mem.alloc(len).ok_or(DriverError::OutOfMemory(len));
        Ok(Self {
            qid,
            sq_mem: alloc(u64::from(depth) * SQE_SIZE as u64)?,
            cq_mem: alloc(u64::from(depth) * CQE_SIZE as u64)?,
            sq: SqState::new(depth),
            cq: CqState::new(depth),
            cids: CidPool::new(depth),
            vector,
            shadow: None,
            epoch: inner.epoch.load(Ordering::SeqCst),
            sq_db_shadow: 0,
            cq_db_shadow: 0,
        })
    }

    fn check_epoch(&self, inner: &Inner) -> Result<()> {
        if inner.epoch.load(Ordering::SeqCst) != self.epoch {
            return Err(DriverError::Reset);
        }
        Ok(())
    }

    /// Places `cmd` at the tail with a fresh command id (not yet rung).
    fn push(&mut self, inner: &Inner, mut cmd: Command) -> Result<u16> {
        self.check_epoch(inner)?;
        if self.sq.is_full() {
            return Err(DriverError::QueueFull);
        }
        let cid = self.cids.take().ok_or(DriverError::QueueFull)?;
        let slot = self.sq.push().ok_or(DriverError::QueueFull)?;
        cmd.cid = cid;
        self.sq_mem
            .write_at(u64::from(slot) * SQE_SIZE as u64, &cmd.to_bytes());
        Ok(cid)
    }

    fn ring(&mut self, inner: &Inner, cq: bool) -> Result<()> {
        let value = if cq { self.cq.head() } else { self.sq.tail() };
        if let Some(s) = &self.shadow {
            let idx = inner.doorbell_offset(self.qid, cq) - reg::DOORBELLS;
            let old = if cq {
                std::mem::replace(&mut self.cq_db_shadow, value)
            } else {
                std::mem::replace(&mut self.sq_db_shadow, value)
            };
            s.doorbells
                .u32_at(idx)
                .store(u32::from(value), Ordering::Release);
            // The shadow store must be visible before we read EventIdx, or
            // the controller and we could each think the other will act.
            fence(Ordering::SeqCst);
            let event = s.event_idx.u32_at(idx).load(Ordering::Acquire) as u16;
            if !need_event(event, value, old) {
                inner.doorbells_skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        inner.ring_mmio(self.qid, cq, value)
    }

    /// Takes every new completion; rings the CQ head doorbell once after.
    fn reap(&mut self, inner: &Inner, out: &mut Vec<Completion>) -> Result<usize> {
        self.check_epoch(inner)?;
        let mut n = 0;
        loop {
            let at = u64::from(self.cq.head()) * CQE_SIZE as u64;
            let dw3 = self.cq_mem.u32_at(at + 12).load(Ordering::Acquire);
            if !self.cq.is_new(dw3 >> 16 & 1 == 1) {
                break;
            }
            let mut b = [0u8; CQE_SIZE];
            self.cq_mem.read_at(at, &mut b);
            let c = Completion::parse(&b);
            if c.sq_id != self.qid {
                return Err(DriverError::Protocol(format!(
                    "completion on queue {} names SQ {}",
                    self.qid, c.sq_id
                )));
            }
            if !self.cids.release(c.cid) {
                return Err(DriverError::Protocol(format!(
                    "queue {}: completion for command id {} which is not in flight",
                    self.qid, c.cid
                )));
            }
            self.sq.update_head(c.sq_head).map_err(|h| {
                DriverError::Protocol(format!(
                    "queue {}: SQ head {h} is not between our head and tail",
                    self.qid
                ))
            })?;
            self.cq.advance();
            out.push(c);
            n += 1;
        }
        if n > 0 {
            self.ring(inner, true)?;
        }
        Ok(n)
    }
}

/// An I/O queue pair, driven by one thread.
pub struct IoQueue {
    inner: Arc<Inner>,
    qp: QueuePair,
    /// Completions reaped while waiting for a particular command.
    stash: Vec<Completion>,
    max_transfer: Option<u64>,
}

impl IoQueue {
    pub fn qid(&self) -> u16 {
        self.qp.qid
    }

    pub fn depth(&self) -> u16 {
        self.qp.sq.depth()
    }

    pub fn in_flight(&self) -> usize {
        self.qp.cids.in_flight()
    }

    /// Where the submission and completion rings live (IOVAs), for
    /// diagnostics and for tests that play a misbehaving controller.
    pub fn ring_addresses(&self) -> (u64, u64) {
        (self.qp.sq_mem.iova(), self.qp.cq_mem.iova())
    }

    pub fn is_polled(&self) -> bool {
        self.qp.vector.is_none()
    }

    pub fn memory(&self) -> &Arc<DmaMemory> {
        &self.inner.mem
    }

    /// Queues `cmd` (its cid is assigned here) without ringing the doorbell.
    pub fn push(&mut self, cmd: Command) -> Result<u16> {
        self.qp.push(&self.inner, cmd)
    }

    /// Rings the SQ tail doorbell for everything pushed.
    pub fn flush(&mut self) -> Result<()> {
        self.qp.check_epoch(&self.inner)?;
        self.qp.ring(&self.inner, false)
    }

    pub fn submit(&mut self, cmd: Command) -> Result<u16> {
        let cid = self.push(cmd)?;
        self.flush()?;
        Ok(cid)
    }

    /// Appends new completions to `out` (and any stashed ones).
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let stashed = self.stash.len();
        out.append(&mut self.stash);
        Ok(stashed + self.qp.reap(&self.inner, out)?)
    }

    /// Sleeps until the queue's interrupt fires or `timeout` passes.
    /// Returns whether an interrupt came (polled queues just pause).
    pub fn wait(&mut self, timeout: Duration) -> Result<bool> {
        self.qp.check_epoch(&self.inner)?;
        match self.qp.vector {
            Some(v) => self.inner.wait_vector(usize::from(v), timeout),
            None => {
                std::thread::sleep(timeout.min(Duration::from_micros(20)));
                Ok(false)
            }
        }
    }

    /// Submits `cmd` and waits for its completion, whatever its status.
    pub fn execute(&mut self, cmd: Command, timeout: Duration) -> Result<Completion> {
        let cid = self.submit(cmd)?;
        self.wait_for(cid, timeout, "I/O command")
    }

    fn wait_for(&mut self, cid: u16, timeout: Duration, what: &str) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            self.qp.reap(&self.inner, &mut got)?;
            if let Some(i) = got.iter().position(|c| c.cid == cid) {
                let c = got.remove(i);
                self.stash.append(&mut got);
                return Ok(c);
            }
            self.stash.append(&mut got);
            let now = Instant::now();
            if now >= deadline {
                let fatal = self
                    .inner
                    .read32(reg::CSTS)
                    .map(|s| s & csts::CFS != 0)
                    .unwrap_or(false);
                return Err(DriverError::Timeout {
                    what: format!("{what} (queue {}, cid {cid})", self.qp.qid),
                    waited: timeout,
                    fatal,
                });
            }
            self.wait((deadline - now).min(Duration::from_millis(100)))?;
        }
    }

    /// Fills in `cmd`'s data pointer for `len` bytes of `buf`. Returns the
    /// list pages, which must live until the command completes.
    #[must_use = "the PRP or SGL list pages must live until the command completes"]
    pub fn set_data(
        &self,
        cmd: &mut Command,
        buf: &DmaBuf,
        len: u64,
        how: DataPointer,
    ) -> Result<Vec<DmaBuf>> {
        set_data(&self.inner.mem, cmd, buf.iova(), len, how)
    }

    /// Runs a data command on `len` bytes of `buf` and checks its status.
    pub fn data_command(
        &mut self,
        mut cmd: Command,
        buf: &DmaBuf,
        len: u64,
        how: DataPointer,
    ) -> Result<Completion> {
        if len > buf.len() {
            return Err(DriverError::Invalid(format!(
                "{len} bytes do not fit a {}-byte buffer",
                buf.len()
            )));
        }
        if let Some(max) = self.max_transfer.filter(|&m| len > m) {
            return Err(DriverError::Invalid(format!(
                "{len} bytes exceed the controller's maximum transfer of {max}"
            )));
        }
        let _lists = self.set_data(&mut cmd, buf, len, how)?;
        let timeout = self.inner.timeout;
        let c = self.execute(cmd, timeout)?;
        check(c, || format!("opcode {:#04x}", cmd.opcode))
    }

    pub fn read(&mut self, ns: &NamespaceInfo, slba: u64, nlb: u16, buf: &DmaBuf) -> Result<()> {
        let cmd = Command::rw(spec::io::READ, ns.nsid, slba, nlb);
        self.data_command(cmd, buf, u64::from(nlb) * ns.lba_size, DataPointer::Prp)
            .map(drop)
    }

    pub fn write(&mut self, ns: &NamespaceInfo, slba: u64, nlb: u16, buf: &DmaBuf) -> Result<()> {
        let cmd = Command::rw(spec::io::WRITE, ns.nsid, slba, nlb);
        self.data_command(cmd, buf, u64::from(nlb) * ns.lba_size, DataPointer::Prp)
            .map(drop)
    }

    pub fn compare(&mut self, ns: &NamespaceInfo, slba: u64, nlb: u16, buf: &DmaBuf) -> Result<()> {
        let cmd = Command::rw(spec::io::COMPARE, ns.nsid, slba, nlb);
        self.data_command(cmd, buf, u64::from(nlb) * ns.lba_size, DataPointer::Prp)
            .map(drop)
    }

    pub fn flush_cache(&mut self, nsid: u32) -> Result<()> {
        let mut cmd = Command::new(spec::io::FLUSH);
        cmd.nsid = nsid;
        let t = self.inner.timeout;
        let c = self.execute(cmd, t)?;
        check(c, || "Flush".into()).map(drop)
    }

    pub fn write_zeroes(&mut self, ns: &NamespaceInfo, slba: u64, nlb: u16) -> Result<()> {
        let cmd = Command::rw(spec::io::WRITE_ZEROES, ns.nsid, slba, nlb);
        let t = self.inner.timeout;
        let c = self.execute(cmd, t)?;
        check(c, || "Write Zeroes".into()).map(drop)
    }

    /// Dataset Management with the deallocate attribute over `ranges`
    /// (starting LBA, blocks).
    pub fn deallocate(&mut self, nsid: u32, ranges: &[(u64, u32)]) -> Result<()> {
        if ranges.is_empty() || ranges.len() > 256 {
            return Err(DriverError::Invalid(
                "Dataset Management takes 1 to 256 ranges".into(),
            ));
        }
        let buf = self
            .inner
            .mem
            .alloc(PAGE)
            .ok_or(DriverError::OutOfMemory(PAGE))?;
        for (i, &(slba, nlb)) in ranges.iter().enumerate() {
            buf.write_at(16 * i as u64, &spec::dsm_range(slba, nlb));
        }
        let mut cmd = Command::new(spec::io::DATASET_MANAGEMENT);
        cmd.nsid = nsid;
        cmd.cdw10 = ranges.len() as u32 - 1;
        cmd.cdw11 = 1 << 2;
        self.data_command(cmd, &buf, 16 * ranges.len() as u64, DataPointer::Prp)
            .map(drop)
    }
}

/// Builds a data pointer for a contiguous IOVA range.
fn set_data(
    mem: &Arc<DmaMemory>,
    cmd: &mut Command,
    iova: u64,
    len: u64,
    how: DataPointer,
) -> Result<Vec<DmaBuf>> {
    let alloc = |len: u64| mem.alloc(len).ok_or(DriverError::OutOfMemory(len));
    match how {
        DataPointer::Prp => {
            let pages = prp::list_pages_needed(iova, len);
            let lists = alloc(pages as u64 * PAGE).map(|b| (pages > 0).then_some(b))?;
            let addrs: Vec<u64> = lists
                .as_ref()
                .map(|b| (0..pages as u64).map(|i| b.iova() + i * PAGE).collect())
                .unwrap_or_default();
            let p = prp::build(iova, len, &addrs)
                .ok_or_else(|| DriverError::Invalid("PRP list pages missing".into()))?;
            if let Some(b) = &lists {
                for (page, entries) in &p.lists {
                    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
                    b.write_at(page - b.iova(), &bytes);
                }
            }
            cmd.psdt = 0;
            cmd.dptr = [p.prp1, p.prp2];
            Ok(lists.into_iter().collect())
        }
        DataPointer::SglBlock => {
            cmd.psdt = 1;
            cmd.dptr = sgl::descriptor(iova, len as u32, sgl::DATA_BLOCK);
            Ok(vec![])
        }
        DataPointer::SglList => {
            let entries = prp::entries(iova, len);
            let list = alloc(16 * entries.len() as u64)?;
            let mut left = len;
            for (i, &e) in entries.iter().enumerate() {
                let chunk = (PAGE - e % PAGE).min(left);
                left -= chunk;
                list.write_at(
                    16 * i as u64,
                    &sgl::to_bytes(sgl::descriptor(e, chunk as u32, sgl::DATA_BLOCK)),
                );
            }
            cmd.psdt = 1;
            cmd.dptr = sgl::descriptor(list.iova(), 16 * entries.len() as u32, sgl::LAST_SEGMENT);
            Ok(vec![list])
        }
        DataPointer::SglChain => {
            let blocks: Vec<[u64; 2]> = {
                let mut left = len;
                prp::entries(iova, len)
                    .into_iter()
                    .map(|e| {
                        let chunk = (PAGE - e % PAGE).min(left);
                        left -= chunk;
                        sgl::descriptor(e, chunk as u32, sgl::DATA_BLOCK)
                    })
                    .collect()
            };
            if blocks.len() < 2 {
                return Err(DriverError::Invalid(
                    "a chained SGL needs at least two pages".into(),
                ));
            }
            let (first, second) = blocks.split_at(blocks.len() / 2);
            let seg1 = alloc(16 * (first.len() as u64 + 1))?;
            let seg2 = alloc(16 * second.len() as u64)?;
            for (i, d) in first.iter().enumerate() {
                seg1.write_at(16 * i as u64, &sgl::to_bytes(*d));
            }
            seg1.write_at(
                16 * first.len() as u64,
                &sgl::to_bytes(sgl::descriptor(
                    seg2.iova(),
                    16 * second.len() as u32,
                    sgl::LAST_SEGMENT,
                )),
            );
            for (i, d) in second.iter().enumerate() {
                seg2.write_at(16 * i as u64, &sgl::to_bytes(*d));
            }
            cmd.psdt = 1;
            cmd.dptr = sgl::descriptor(seg1.iova(), 16 * (first.len() as u32 + 1), sgl::SEGMENT);
            Ok(vec![seg1, seg2])
        }
    }
}

/// Turns a non-success completion into an error naming the command.
pub fn check(c: Completion, what: impl FnOnce() -> String) -> Result<Completion> {
    if c.status.is_success() {
        Ok(c)
    } else {
        Err(DriverError::Status {
            what: what(),
            status: c.status,
        })
    }
}

/// An attached controller. `&self` methods are safe from several threads:
/// admin commands take turns on the admin queue.
pub struct Controller {
    inner: Arc<Inner>,
    admin: Mutex<QueuePair>,
    config: DriverConfig,
    cap: Cap,
    info: ControllerInfo,
    /// I/O queues the controller granted (Number of Queues feature).
    granted: Mutex<u16>,
}

impl Controller {
    /// Attaches to the card: vfio-user handshake, DMA map, MSI-X, enable,
    /// identify, number of queues and shadow doorbells.
    pub fn attach(config: DriverConfig) -> Result<Self> {
        let mut ctrl = Self::connect(config)?;
        ctrl.init()?;
        Ok(ctrl)
    }

    /// The vfio-user half of attaching: the controller is left as the card
    /// presents it (disabled), for tests that look at reset values.
    pub fn connect(config: DriverConfig) -> Result<Self> {
        let path = config.socket.clone();
        let mut client = handshake(&path, config.timeout)?;
        let bar = client
            .region(BAR0_REGION)
            .ok_or_else(|| DriverError::NotNvme("the device has no BAR0".into()))?;
        if bar.size < reg::DOORBELLS + 8 {
            return Err(DriverError::NotNvme(format!(
                "BAR0 is {} bytes, too small for the doorbells",
                bar.size
            )));
        }
        let mapped = if config.mmap_doorbells {
            map_doorbells(bar)
        } else {
            None
        };
        let mut class = [0u8; 4];
        client
            .region_read(CONFIG_REGION, 0x08, &mut class)
            .map_err(|source| DriverError::Transport {
                what: "config space read",
                error: source,
            })?;
        if class[1..4] != [0x02, 0x08, 0x01] {
            return Err(DriverError::NotNvme(format!(
                "class code {:02x}-{:02x}-{:02x}, not 01-08-02",
                class[3], class[2], class[1]
            )));
        }
        client
            .region_write(
                CONFIG_REGION,
                PCI_COMMAND,
                &PCI_COMMAND_MEM_BME.to_le_bytes(),
            )
            .map_err(|source| DriverError::Transport {
                what: "config space write",
                error: source,
            })?;

        let mem = DmaMemory::new(config.mem_size).map_err(DriverError::Memory)?;
        client
            .dma_map(0, IOVA_BASE, mem.len(), mem.guest().fd())
            .map_err(|source| DriverError::Transport {
                what: "DMA map",
                error: source,
            })?;

        let msix =
            client
                .get_irq_info(MSIX_IRQ_INDEX)
                .map_err(|source| DriverError::Transport {
                    what: "MSI-X info",
                    error: source,
                })?;
        let nvec = msix.count.min(u32::from(config.io_queues) + 1);
        let vectors: Vec<EventFd> = (0..nvec)
            .map(|_| EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK))
            .collect::<Result<_, _>>()
            .map_err(DriverError::EventFd)?;
        if nvec > 0 {
            let fds: Vec<i32> = vectors.iter().map(|e| e.as_raw_fd()).collect();
            client
                .set_irqs(
                    MSIX_IRQ_INDEX,
                    IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                    0,
                    nvec,
                    &fds,
                )
                .map_err(|source| DriverError::Transport {
                    what: "SET_IRQS",
                    error: source,
                })?;
        }

        let mut cap_b = [0u8; 8];
        for (i, half) in cap_b.chunks_exact_mut(4).enumerate() {
            // Two 32-bit reads, as Linux's lo_hi_readq does.
            client
                .region_read(BAR0_REGION, reg::CAP + 4 * i as u64, half)
                .map_err(|source| DriverError::Transport {
                    what: "CAP read",
                    error: source,
                })?;
        }
        let cap = Cap(u64::from_le_bytes(cap_b));
        if !cap.css_nvm() || cap.mpsmin() > 0 {
            return Err(DriverError::NotNvme(format!(
                "CAP {:#x}: no NVM command set or no 4 KiB pages",
                cap.0
            )));
        }
        let inner = Arc::new(Inner {
            client: Mutex::new(client),
            mem,
            stride: 4 << cap.dstrd(),
            mapped,
            shadow: Mutex::new(None),
            vectors,
            epoch: AtomicU64::new(0),
            doorbells_rung: AtomicU64::new(0),
            doorbells_skipped: AtomicU64::new(0),
            timeout: config.timeout,
        });
        let admin_depth = config.admin_depth.clamp(2, cap.mqes().min(4096) as u16);
        let admin = QueuePair::new(&inner, 0, admin_depth, Some(0))?;
        Ok(Self {
            inner,
            admin: Mutex::new(admin),
            config,
            cap,
            info: ControllerInfo::parse(&[]),
            granted: Mutex::new(0),
        })
    }

    /// Enables the controller, identifies it, asks for the I/O queues and
    /// sets up shadow doorbells: the rest of [`Controller::attach`].
    pub fn init(&mut self) -> Result<()> {
        self.enable()?;
        let page = self.identify(cns::CONTROLLER, 0)?;
        self.info = ControllerInfo::parse(&page);
        // Bits 3:0 are the required entry size, 7:4 the largest allowed.
        let (sqes, cqes) = (self.info.sqes, self.info.cqes);
        if sqes & 0xf > 6 || sqes >> 4 < 6 || cqes & 0xf > 4 || cqes >> 4 < 4 {
            return Err(DriverError::NotNvme(format!(
                "entry sizes SQES {sqes:#x} CQES {cqes:#x} do not allow 64/16 bytes"
            )));
        }
        self.setup_after_enable()
    }

    /// Number of Queues and shadow doorbells: what must be redone after a reset.
    fn setup_after_enable(&self) -> Result<()> {
        let want = self.config.io_queues.max(1) - 1;
        let c = self.admin_command(
            {
                let mut c = Command::new(admin::SET_FEATURES);
                c.cdw10 = feature::NUMBER_OF_QUEUES;
                c.cdw11 = u32::from(want) << 16 | u32::from(want);
                c
            },
            "Set Features (Number of Queues)",
        )?;
        let nsq = (c.result & 0xffff) as u16;
        let ncq = (c.result >> 16) as u16;
        *self.granted.lock().unwrap_or_else(|e| e.into_inner()) = nsq.min(ncq).saturating_add(1);
        let shadow = if self.config.shadow_doorbells && self.info.supports_doorbell_buffer() {
            let alloc = || {
                self.inner
                    .mem
                    .alloc(PAGE)
                    .ok_or(DriverError::OutOfMemory(PAGE))
            };
            let s = Shadow {
                doorbells: alloc()?,
                event_idx: alloc()?,
            };
            let mut cmd = Command::new(admin::DOORBELL_BUFFER_CONFIG);
            cmd.dptr = [s.doorbells.iova(), s.event_idx.iova()];
            self.admin_command(cmd, "Doorbell Buffer Config")?;
            Some(Arc::new(s))
        } else {
            None
        };
        *self.inner.shadow.lock().unwrap_or_else(|e| e.into_inner()) = shadow;
        Ok(())
    }

    /// CC.EN 0 → configure the admin queue → CC.EN 1, waiting for CSTS.RDY.
    fn enable(&self) -> Result<()> {
        let inner = &self.inner;
        let cc_now = inner.read32(reg::CC)?;
        if cc_now & cc::EN != 0 {
            inner.write32(reg::CC, cc_now & !cc::EN)?;
        }
        self.wait_ready(false)?;
        let admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let depth = u32::from(admin.sq.depth()) - 1;
        inner.write32(reg::AQA, depth << 16 | depth)?;
        for (off, addr) in [
            (reg::ASQ, admin.sq_mem.iova()),
            (reg::ACQ, admin.cq_mem.iova()),
        ] {
            // Low then high dword, as Linux's lo_hi_writeq.
            inner.write32(off, addr as u32)?;
            inner.write32(off + 4, (addr >> 32) as u32)?;
        }
        drop(admin);
        inner.write32(reg::CC, cc::IOSQES_64 | cc::IOCQES_16 | cc::EN)?;
        self.wait_ready(true)
    }

    fn ready_timeout(&self) -> Duration {
        Duration::from_millis(500 * u64::from(self.cap.timeout_500ms().max(1)))
            .max(self.inner.timeout)
    }

    fn wait_ready(&self, ready: bool) -> Result<()> {
        let timeout = self.ready_timeout();
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.inner.read32(reg::CSTS)?;
            if ready && s & csts::CFS != 0 {
                return Err(DriverError::Protocol("CSTS.CFS set while enabling".into()));
            }
            if (s & csts::RDY != 0) == ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DriverError::Timeout {
                    what: format!("CSTS.RDY = {}", u8::from(ready)),
                    waited: timeout,
                    fatal: s & csts::CFS != 0,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn cap(&self) -> Cap {
        self.cap
    }

    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    pub fn memory(&self) -> &Arc<DmaMemory> {
        &self.inner.mem
    }

    pub fn granted_io_queues(&self) -> u16 {
        *self.granted.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn uses_shadow_doorbells(&self) -> bool {
        self.inner
            .shadow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn uses_mapped_doorbells(&self) -> bool {
        self.inner.mapped.is_some()
    }

    /// (doorbell writes that reached the card, writes shadow doorbells saved).
    pub fn doorbell_counts(&self) -> (u64, u64) {
        (
            self.inner.doorbells_rung.load(Ordering::Relaxed),
            self.inner.doorbells_skipped.load(Ordering::Relaxed),
        )
    }

    pub fn vectors(&self) -> usize {
        self.inner.vectors.len()
    }

    /// A controller register, 32 bits (tests read reset values with it).
    pub fn read_reg32(&self, offset: u64) -> Result<u32> {
        self.inner.read32(offset)
    }

    pub fn write_reg32(&self, offset: u64, value: u32) -> Result<()> {
        self.inner.write32(offset, value)
    }

    /// A 64-bit register as two 32-bit reads, low first.
    pub fn read_reg64(&self, offset: u64) -> Result<u64> {
        let lo = self.inner.read32(offset)?;
        let hi = self.inner.read32(offset + 4)?;
        Ok(u64::from(hi) << 32 | u64::from(lo))
    }

    /// Raw access to the vfio-user client (config space, unusual accesses).
    pub fn with_client<T>(&self, f: impl FnOnce(&mut Client) -> T) -> T {
        f(&mut self.inner.client())
    }

    /// Runs an admin command; any status comes back as the completion.
    pub fn admin_raw(&self, cmd: Command) -> Result<Completion> {
        let mut q = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let cid = q.push(&self.inner, cmd)?;
        // The admin queue never uses shadow doorbells (as in Linux).
        q.ring(&self.inner, false)?;
        let deadline = Instant::now() + self.inner.timeout;
        let mut got = Vec::new();
        loop {
            q.reap(&self.inner, &mut got)?;
            if let Some(c) = got.iter().find(|c| c.cid == cid) {
                return Ok(*c);
            }
            // Anything else on the admin queue (an async event) is dropped.
            got.clear();
            let now = Instant::now();
            if now >= deadline {
                let fatal = self
                    .inner
                    .read32(reg::CSTS)
                    .map(|s| s & csts::CFS != 0)
                    .unwrap_or(false);
                return Err(DriverError::Timeout {
                    what: format!("admin opcode {:#04x}", cmd.opcode),
                    waited: self.inner.timeout,
                    fatal,
                });
            }
            self.inner
                .wait_vector(0, (deadline - now).min(Duration::from_millis(100)))?;
        }
    }

    /// Runs an admin command and fails unless it succeeded.
    pub fn admin_command(&self, cmd: Command, what: &str) -> Result<Completion> {
        check(self.admin_raw(cmd)?, || what.to_owned())
    }

    /// An admin command moving `len` bytes through a fresh buffer.
    pub fn admin_data(
        &self,
        mut cmd: Command,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(Completion, Vec<u8>)> {
        let buf = self
            .inner
            .mem
            .alloc(len)
            .ok_or(DriverError::OutOfMemory(len))?;
        if let Some(d) = data {
            buf.write_at(0, d);
        }
        let _lists = set_data(&self.inner.mem, &mut cmd, buf.iova(), len, DataPointer::Prp)?;
        let c = self.admin_raw(cmd)?;
        let mut out = vec![0u8; len as usize];
        buf.read_at(0, &mut out);
        Ok((c, out))
    }

    /// Identify with `cns`, checked; the 4 KiB page.
    pub fn identify(&self, cns: u32, nsid: u32) -> Result<Vec<u8>> {
        let mut cmd = Command::new(admin::IDENTIFY);
        cmd.nsid = nsid;
        cmd.cdw10 = cns;
        let (c, page) = self.admin_data(cmd, PAGE, None)?;
        check(c, || format!("Identify (CNS {cns}, NSID {nsid})"))?;
        Ok(page)
    }

    pub fn identify_namespace(&self, nsid: u32) -> Result<NamespaceInfo> {
        let ns = NamespaceInfo::parse(nsid, &self.identify(cns::NAMESPACE, nsid)?);
        if ns.lba_size == 0 {
            return Err(DriverError::Protocol(format!(
                "namespace {nsid} reports no valid LBA size"
            )));
        }
        Ok(ns)
    }

    /// Active namespace ids (Identify CNS 2 from 0).
    pub fn active_namespaces(&self) -> Result<Vec<u32>> {
        let page = self.identify(cns::ACTIVE_NAMESPACES, 0)?;
        Ok(page
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .take_while(|&id| id != 0)
            .collect())
    }

    pub fn get_feature(&self, fid: u32) -> Result<u32> {
        let mut cmd = Command::new(admin::GET_FEATURES);
        cmd.cdw10 = fid;
        Ok(self
            .admin_command(cmd, &format!("Get Features ({fid:#x})"))?
            .result)
    }

    pub fn set_feature(&self, fid: u32, value: u32) -> Result<u32> {
        let mut cmd = Command::new(admin::SET_FEATURES);
        cmd.cdw10 = fid;
        cmd.cdw11 = value;
        Ok(self
            .admin_command(cmd, &format!("Set Features ({fid:#x})"))?
            .result)
    }

    /// Creates I/O queue pair `qid` with `depth` entries: its CQ on MSI-X
    /// vector `qid` when there is one (else polled), then its SQ.
    pub fn create_io_queue(&self, qid: u16, depth: u16) -> Result<IoQueue> {
        if qid == 0 || qid > self.granted_io_queues() {
            return Err(DriverError::Invalid(format!(
                "queue {qid}: the controller granted queues 1..={}",
                self.granted_io_queues()
            )));
        }
        let depth = depth.max(2);
        if u32::from(depth) > self.cap.mqes() {
            return Err(DriverError::Invalid(format!(
                "queue depth {depth} exceeds CAP.MQES+1 = {}",
                self.cap.mqes()
            )));
        }
        let vector = (usize::from(qid) < self.inner.vectors.len()).then_some(qid);
        let mut qp = QueuePair::new(&self.inner, qid, depth, vector)?;
        self.create_cq_raw(qid, depth, qp.cq_mem.iova(), vector)
            .and_then(|c| check(c, || format!("Create I/O CQ {qid}")))?;
        if let Err(e) = self
            .create_sq_raw(qid, depth, qp.sq_mem.iova(), qid)
            .and_then(|c| check(c, || format!("Create I/O SQ {qid}")))
        {
            let _ = self.delete_queue_raw(admin::DELETE_CQ, qid);
            return Err(e);
        }
        qp.shadow = self
            .inner
            .shadow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(s) = &qp.shadow {
            // Start the shadow doorbells where the real ones are: zero.
            for cq in [false, true] {
                let idx = self.inner.doorbell_offset(qid, cq) - reg::DOORBELLS;
                s.doorbells.u32_at(idx).store(0, Ordering::Release);
            }
        }
        Ok(IoQueue {
            inner: Arc::clone(&self.inner),
            qp,
            stash: Vec::new(),
            max_transfer: self.info.max_transfer(),
        })
    }

    /// Deletes the queue pair (SQ first, as the spec requires).
    pub fn delete_io_queue(&self, q: IoQueue) -> Result<()> {
        let qid = q.qid();
        check(self.delete_queue_raw(admin::DELETE_SQ, qid)?, || {
            format!("Delete I/O SQ {qid}")
        })?;
        check(self.delete_queue_raw(admin::DELETE_CQ, qid)?, || {
            format!("Delete I/O CQ {qid}")
        })?;
        Ok(())
    }

    /// Create I/O Completion Queue with any values (tests send bad ones).
    pub fn create_cq_raw(
        &self,
        qid: u16,
        depth: u16,
        iova: u64,
        vector: Option<u16>,
    ) -> Result<Completion> {
        let mut cmd = Command::new(admin::CREATE_CQ);
        cmd.dptr = [iova, 0];
        cmd.cdw10 = u32::from(depth.wrapping_sub(1)) << 16 | u32::from(qid);
        // PC = 1; IEN and IV when interrupts are wanted.
        cmd.cdw11 = 1 | vector.map_or(0, |v| u32::from(v) << 16 | 2);
        self.admin_raw(cmd)
    }

    /// Create I/O Submission Queue with any values.
    pub fn create_sq_raw(&self, qid: u16, depth: u16, iova: u64, cqid: u16) -> Result<Completion> {
        let mut cmd = Command::new(admin::CREATE_SQ);
        cmd.dptr = [iova, 0];
        cmd.cdw10 = u32::from(depth.wrapping_sub(1)) << 16 | u32::from(qid);
        cmd.cdw11 = u32::from(cqid) << 16 | 1;
        self.admin_raw(cmd)
    }

    pub fn delete_queue_raw(&self, opcode: u8, qid: u16) -> Result<Completion> {
        let mut cmd = Command::new(opcode);
        cmd.cdw10 = u32::from(qid);
        self.admin_raw(cmd)
    }

    /// Controller reset (CC.EN 1 → 0 → 1): every I/O queue is gone (their
    /// `IoQueue`s answer [`DriverError::Reset`]) and must be created again.
    pub fn reset(&self) -> Result<()> {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        let cc_now = self.inner.read32(reg::CC)?;
        self.inner.write32(reg::CC, cc_now & !cc::EN)?;
        self.wait_ready(false)?;
        {
            let mut admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            let depth = admin.sq.depth();
            *admin = QueuePair::new(&self.inner, 0, depth, Some(0))?;
        }
        *self.inner.shadow.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.enable()?;
        self.setup_after_enable()
    }

    /// Normal shutdown (CC.SHN = 01b), waiting for CSTS.SHST = complete.
    pub fn shutdown(&self) -> Result<()> {
        let cc_now = self.inner.read32(reg::CC)?;
        self.inner
            .write32(reg::CC, (cc_now & !cc::SHN_MASK) | cc::SHN_NORMAL)?;
        let timeout = self.ready_timeout();
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.inner.read32(reg::CSTS)?;
            if s & csts::SHST_MASK == csts::SHST_COMPLETE {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DriverError::Timeout {
                    what: "CSTS.SHST = shutdown complete".into(),
                    waited: timeout,
                    fatal: s & csts::CFS != 0,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Maps the part of BAR0 holding the doorbells when the region offers a
/// sparse mmap area covering them; None leaves doorbells on the socket.
fn map_doorbells(bar: &vfio_user::Region) -> Option<MappedDoorbells> {
    let fo = bar.file_offset.as_ref()?;
    let area = bar
        .sparse_areas
        .iter()
        .find(|a| a.offset <= reg::DOORBELLS && a.offset + a.size >= reg::DOORBELLS + 8)?;
    let len = usize::try_from(area.size).ok()?;
    // SAFETY: mapping a file the card handed us; the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fo.file().as_raw_fd(),
            (fo.start() + area.offset) as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        tracing::warn!(
            "cannot mmap the doorbell area: {}; using the socket",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(MappedDoorbells {
        ptr: ptr.cast(),
        len,
        bar_offset: area.offset,
    })
}
