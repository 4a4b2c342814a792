//! `cardbench blk`: a virtio-blk guest driver over vhost-user, one thread
//! per virtqueue, measuring what a VMM's guest would see.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC};

use crate::error::BenchError;
use crate::frontend::{Connection, DeviceInfo};
use crate::memory::GuestMemory;
use crate::pattern;
use crate::ring::{align_up, RingLayout, SplitRing, DESC_F_NEXT, DESC_F_WRITE};

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
/// Status byte we plant before submitting; a backend must overwrite it.
const STATUS_UNSET: u8 = 0xff;
/// One data descriptor per request, and both peers advertise size_max 128 KiB.
pub const MAX_BS: u64 = 128 << 10;
pub const MAX_IODEPTH: u16 = 256;
/// A backend that completes nothing for this long is declared stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Rw {
    pub fn random(self) -> bool {
        matches!(self, Self::Randread | Self::Randwrite | Self::Randrw)
    }
    pub fn reads(self) -> bool {
        matches!(self, Self::Read | Self::Randread | Self::Randrw)
    }
    pub fn writes(self) -> bool {
        matches!(self, Self::Write | Self::Randwrite | Self::Randrw)
    }
    pub fn fio_name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Randread => "randread",
            Self::Randwrite => "randwrite",
            Self::Randrw => "randrw",
        }
    }
}

#[derive(Clone, Debug)]
pub struct BlkConfig {
    pub socket: PathBuf,
    pub rw: Rw,
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: u16,
    pub queues: u16,
    pub runtime: Duration,
    /// Run before measuring starts (fio's ramp_time).
    pub ramp: Duration,
    /// Working set in bytes from offset 0; default the whole device.
    pub size: Option<u64>,
    pub rwmixread: u8,
    pub verify: bool,
    pub backend_pid: Option<u32>,
    pub handshake_timeout: Duration,
    /// How long to retry a socket that is missing or refusing.
    pub connect_wait: Duration,
}

pub struct DirStats {
    pub ios: u64,
    pub bytes: u64,
    /// Completion latency in nanoseconds.
    pub clat: Histogram<u64>,
}

impl DirStats {
    fn new() -> Self {
        Self {
            ios: 0,
            bytes: 0,
            clat: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static bounds"),
        }
    }

    fn merge(&mut self, other: &DirStats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        self.clat.add(&other.clat).expect("same bounds");
    }
}

pub struct BlkResult {
    pub config: BlkConfig,
    pub device: DeviceInfo,
    pub working_set: u64,
    /// The measured window.
    pub runtime: Duration,
    pub read: DirStats,
    pub write: DirStats,
    /// Backend user+system CPU over the measured window.
    pub backend_cpu: Option<Duration>,
    pub verify_errors: u64,
    /// Blocks whose content was checked (reads with a known generation).
    pub verified_reads: u64,
    pub io_errors: u64,
}

impl BlkResult {
    pub fn total_ios(&self) -> u64 {
        self.read.ios + self.write.ios
    }

    pub fn backend_cpu_per_io(&self) -> Option<Duration> {
        let ios = self.total_ios();
        self.backend_cpu
            .filter(|_| ios > 0)
            .map(|cpu| cpu.div_f64(ios as f64))
    }
}

/// State every queue thread watches.
#[derive(Default)]
struct Shared {
    /// The backend hung up.
    dead: AtomicBool,
    /// No completions for STALL_TIMEOUT.
    stalled: AtomicBool,
    /// Completions so far, so the supervisor can tell progress from a stall.
    progress: AtomicU64,
}

#[derive(Clone, Copy)]
enum Phase {
    /// Write every block once (so reads have something known to check).
    Fill,
    /// The measured workload; stats count completions in [measure, end].
    Timed { measure: Instant, end: Instant },
    /// Read back every block written with a known generation.
    Readback,
}

#[derive(Clone, Copy)]
struct Slot {
    block: u64,
    write: bool,
    generation: u64,
    start: Instant,
    busy: bool,
}

struct QueueDriver {
    ring: SplitRing,
    mem: Arc<GuestMemory>,
    kick: EventFd,
    call: EventFd,
    meta_base: u64,
    data_base: u64,
    buf_stride: u64,
    bs: u64,
    rw: Rw,
    rwmixread: u8,
    verify: bool,
    /// This queue's blocks: [first_block, first_block + nblocks).
    first_block: u64,
    nblocks: u64,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Generation last written to each block; 0 = unknown content.
    expected: Vec<u64>,
    inflight_block: Vec<bool>,
    rng: u64,
    cursor: u64,
    generation: u64,
    scratch: Vec<u8>,
    read: DirStats,
    write: DirStats,
    verify_errors: u64,
    verified_reads: u64,
    io_errors: u64,
    reported: u32,
}

impl QueueDriver {
    fn head(slot: u16) -> u16 {
        slot * 3
    }

    fn inflight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn next_rand(&mut self) -> u64 {
        // splitmix64: cheap, good enough for offsets and the read/write mix.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The next (block index within this queue, is_write), or None when the
    /// phase has nothing more to submit.
    fn next_op(&mut self, phase: Phase) -> Option<(u64, bool)> {
        match phase {
            Phase::Fill => {
                let b = self.cursor;
                (b < self.nblocks).then(|| {
                    self.cursor += 1;
                    (b, true)
                })
            }
            Phase::Readback => {
                while self.cursor < self.nblocks {
                    let b = self.cursor;
                    self.cursor += 1;
                    if self.expected[b as usize] != 0 {
                        return Some((b, false));
                    }
                }
                None
            }
            Phase::Timed { .. } => {
                let write = match self.rw {
                    Rw::Read | Rw::Randread => false,
                    Rw::Write | Rw::Randwrite => true,
                    Rw::Randrw => self.next_rand() % 100 >= u64::from(self.rwmixread),
                };
                let block = if self.rw.random() {
                    let mut b = self.next_rand() % self.nblocks;
                    // Two requests on one block at once would make the
                    // expected content ambiguous; verify mode avoids it.
                    while self.verify && self.inflight_block[b as usize] {
                        b = (b + 1) % self.nblocks;
                    }
                    b
                } else {
                    let b = self.cursor % self.nblocks;
                    self.cursor = self.cursor.wrapping_add(1);
                    b
                };
                Some((block, write))
            }
        }
    }

    fn submit(&mut self, slot: u16, block: u64, write: bool, now: Instant) {
        let meta = self.meta_base + 32 * u64::from(slot);
        let data = self.data_base + self.buf_stride * u64::from(slot);
        let sector = (self.first_block + block) * self.bs / 512;
        let mut hdr = [0u8; 16];
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(meta, &hdr);
        self.mem.write(meta + 16, &[STATUS_UNSET]);
        let mut generation = 0;
        if self.verify {
            self.inflight_block[block as usize] = true;
            let buf = self.mem.slice_mut(data, self.bs as usize);
            if write {
                self.generation += 1;
                generation = self.generation;
                pattern::fill(buf, sector, generation);
            } else {
                // A backend that reports success without writing the data
                // must not pass on stale buffer contents.
                buf.fill(0xa5);
            }
        }
        let head = Self::head(slot);
        let flags = if write {
            DESC_F_NEXT
        } else {
            DESC_F_NEXT | DESC_F_WRITE
        };
        self.ring
            .set_desc(head + 1, data, self.bs as u32, flags, head + 2);
        self.slots[slot as usize] = Slot {
            block,
            write,
            generation,
            start: now,
            busy: true,
        };
        self.ring.push(head);
    }

    fn complete(&mut self, id: u32, phase: Phase, now: Instant) -> Result<(), BenchError> {
        let slot = id / 3;
        if id % 3 != 0 || slot as usize >= self.slots.len() || !self.slots[slot as usize].busy {
            return Err(BenchError::BadCompletion(id));
        }
        let s = self.slots[slot as usize];
        self.slots[slot as usize].busy = false;
        self.free.push(slot as u16);
        let meta = self.meta_base + 32 * u64::from(slot);
        let mut status = [0u8];
        self.mem.read(meta + 16, &mut status);
        let ok = status[0] == 0;
        if !ok {
            self.io_errors += 1;
            self.report(format_args!(
                "{} of block {} failed with virtio-blk status {}",
                if s.write { "write" } else { "read" },
                self.first_block + s.block,
                status[0]
            ));
        }
        if self.verify {
            let b = s.block as usize;
            self.inflight_block[b] = false;
            if s.write {
                self.expected[b] = if ok { s.generation } else { 0 };
            } else if ok && self.expected[b] != 0 {
                self.check(slot, s.block);
            }
        }
        if let Phase::Timed { measure, end } = phase {
            if now >= measure && now <= end {
                let stats = if s.write {
                    &mut self.write
                } else {
                    &mut self.read
                };
                stats.ios += 1;
                stats.bytes += self.bs;
                stats
                    .clat
                    .saturating_record(now.duration_since(s.start).as_nanos() as u64);
            }
        }
        Ok(())
    }

    fn check(&mut self, slot: u32, block: u64) {
        let generation = self.expected[block as usize];
        let sector = (self.first_block + block) * self.bs / 512;
        pattern::fill(&mut self.scratch, sector, generation);
        let data = self.data_base + self.buf_stride * u64::from(slot);
        let found = self.mem.slice(data, self.bs as usize);
        self.verified_reads += 1;
        if found != self.scratch.as_slice() {
            self.verify_errors += 1;
            let what = pattern::describe_mismatch(found, &self.scratch, sector, generation);
            self.report(format_args!(
                "verify: block {} (offset {}): {what}",
                self.first_block + block,
                (self.first_block + block) * self.bs
            ));
        }
    }

    fn report(&mut self, msg: std::fmt::Arguments<'_>) {
        // The first few say what went wrong; thousands more would not.
        if self.reported < 5 {
            tracing::error!("{msg}");
        } else if self.reported == 5 {
            tracing::error!("further errors on this queue are only counted");
        }
        self.reported += 1;
    }

    fn run_phase(&mut self, phase: Phase, shared: &Shared) -> Result<(), BenchError> {
        self.cursor = 0;
        let mut exhausted = false;
        loop {
            let now = Instant::now();
            let stopping = match phase {
                Phase::Timed { end, .. } => now >= end,
                _ => exhausted,
            };
            let mut pushed = false;
            // Refill every free slot (the whole queue depth) in one batch.
            while let (false, Some(&slot)) = (stopping, self.free.last()) {
                let Some((block, write)) = self.next_op(phase) else {
                    exhausted = true;
                    break;
                };
                self.free.pop();
                self.submit(slot, block, write, now);
                pushed = true;
            }
            if pushed && self.ring.publish() {
                self.kick.write(1).map_err(BenchError::EventFd)?;
            }
            if self.inflight() == 0 && (stopping || exhausted) {
                return Ok(());
            }
            let mut reaped = 0;
            let mut done = Instant::now();
            while let Some((id, _len)) = self.ring.pop_used() {
                if reaped == 0 {
                    done = Instant::now();
                }
                self.complete(id, phase, done)?;
                reaped += 1;
            }
            if reaped > 0 {
                shared.progress.fetch_add(reaped, Ordering::Relaxed);
                continue;
            }
            if self.ring.enable_notification() {
                continue;
            }
            wait_readable(self.call.as_raw_fd()).map_err(BenchError::EventFd)?;
            // Peers may have made the eventfd non-blocking (it is one open
            // file): a racing read that finds nothing is fine.
            match self.call.read() {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(BenchError::EventFd(e)),
            }
            if shared.dead.load(Ordering::Relaxed) {
                return Err(BenchError::Disconnected);
            }
            if shared.stalled.load(Ordering::Relaxed) {
                return Err(BenchError::Stalled {
                    inflight: self.inflight(),
                    waited: STALL_TIMEOUT,
                });
            }
        }
    }
}

/// The working set and queue split, checked against the device.
fn plan(config: &BlkConfig, info: &DeviceInfo, path: &std::path::Path) -> Result<u64, BenchError> {
    let device = |detail: String| BenchError::Device {
        path: path.to_owned(),
        detail,
    };
    if config.queues > info.num_queues {
        return Err(device(format!(
            "the device has {} queue(s); --queues {} asks for more",
            info.num_queues, config.queues
        )));
    }
    let size = config.size.unwrap_or(info.capacity_bytes);
    if size > info.capacity_bytes {
        return Err(device(format!(
            "the device holds {} bytes, less than --size {size}",
            info.capacity_bytes
        )));
    }
    if info.read_only && (config.rw.writes() || (config.verify && config.rw.reads())) {
        return Err(device(
            "the device is read-only; this workload (or its verify fill) writes".into(),
        ));
    }
    let per_queue = size / config.bs / u64::from(config.queues);
    let needed = if config.verify {
        2 * u64::from(config.iodepth)
    } else {
        1
    };
    if per_queue < needed {
        return Err(device(format!(
            "a working set of {size} bytes gives each queue {per_queue} blocks of {}; need at least {needed}",
            config.bs
        )));
    }
    Ok(per_queue)
}

pub fn validate(config: &BlkConfig) -> Result<(), BenchError> {
    let usage = |m: String| Err(BenchError::Usage(m));
    if config.bs == 0 || config.bs % 512 != 0 || config.bs > MAX_BS {
        return usage(format!(
            "--bs {} must be a multiple of 512 up to {MAX_BS}",
            config.bs
        ));
    }
    if config.iodepth == 0 || config.iodepth > MAX_IODEPTH {
        return usage(format!("--iodepth must be 1..={MAX_IODEPTH}"));
    }
    if config.queues == 0 {
        return usage("--queues must be at least 1".into());
    }
    if config.rwmixread > 100 {
        return usage("--rwmixread is a percentage, 0..=100".into());
    }
    if config.runtime.is_zero() {
        return usage("--runtime must be more than zero".into());
    }
    Ok(())
}

pub fn run(config: &BlkConfig) -> Result<BlkResult, BenchError> {
    validate(config)?;
    let mut conn = Connection::open(
        &config.socket,
        config.handshake_timeout,
        config.connect_wait,
    )?;
    let info = conn.info.clone();
    let per_queue = plan(config, &info, &config.socket)?;
    tracing::debug!(?info, per_queue, "device");

    // Three descriptors per request (header, data, status), fixed per slot.
    let ring_size = (3 * u32::from(config.iodepth))
        .next_power_of_two()
        .clamp(16, 1024) as u16;
    let buf_stride = align_up(config.bs, 4096);
    let depth = u64::from(config.iodepth);
    let mut layouts = Vec::new();
    let mut offset = 0u64;
    for _ in 0..config.queues {
        let (layout, end) = RingLayout::at(offset, ring_size);
        let meta = end;
        let data = align_up(meta + 32 * depth, 4096);
        offset = data + buf_stride * depth;
        layouts.push((layout, meta, data));
    }
    let mem = Arc::new(GuestMemory::new(offset as usize).map_err(BenchError::Memory)?);
    conn.set_mem_table(&mem)?;

    let mut drivers = Vec::new();
    for (q, &(layout, meta_base, data_base)) in layouts.iter().enumerate() {
        let ring = SplitRing::new(mem.clone(), layout, info.event_idx);
        for slot in 0..config.iodepth {
            let head = QueueDriver::head(slot);
            let meta = meta_base + 32 * u64::from(slot);
            ring.set_desc(head, meta, 16, DESC_F_NEXT, head + 1);
            ring.set_desc(head + 2, meta + 16, 1, DESC_F_WRITE, 0);
        }
        let kick = EventFd::new(EFD_CLOEXEC).map_err(BenchError::EventFd)?;
        let call = EventFd::new(EFD_CLOEXEC).map_err(BenchError::EventFd)?;
        conn.start_queue(q, layout, ring.base(), mem.host_addr(), &kick, &call)?;
        let verify_len = if config.verify { per_queue as usize } else { 0 };
        drivers.push(QueueDriver {
            ring,
            mem: mem.clone(),
            kick,
            call,
            meta_base,
            data_base,
            buf_stride,
            bs: config.bs,
            rw: config.rw,
            rwmixread: config.rwmixread,
            verify: config.verify,
            first_block: q as u64 * per_queue,
            nblocks: per_queue,
            slots: vec![
                Slot {
                    block: 0,
                    write: false,
                    generation: 0,
                    start: Instant::now(),
                    busy: false,
                };
                usize::from(config.iodepth)
            ],
            free: (0..config.iodepth).rev().collect(),
            expected: vec![0; verify_len],
            inflight_block: vec![false; verify_len],
            rng: 0x5eed ^ (q as u64) << 32 ^ std::process::id() as u64,
            cursor: 0,
            generation: 0,
            scratch: vec![0; config.bs as usize],
            read: DirStats::new(),
            write: DirStats::new(),
            verify_errors: 0,
            verified_reads: 0,
            io_errors: 0,
            reported: 0,
        });
    }

    conn.handshake_done();
    let shared = Shared::default();
    let sock = conn.raw_fd();
    if config.verify && config.rw.reads() {
        tracing::info!("verify: writing the working set before reading it");
        run_phase_all(&mut drivers, Phase::Fill, &shared, sock, None)?;
    }
    let measure = Instant::now() + config.ramp;
    let end = measure + config.runtime;
    let cpu = config
        .backend_pid
        .map(|pid| CpuWindow::new(pid, measure, end));
    let backend_cpu = run_phase_all(
        &mut drivers,
        Phase::Timed { measure, end },
        &shared,
        sock,
        cpu,
    )?;
    if config.verify && config.rw.writes() {
        tracing::info!("verify: reading back every block written");
        run_phase_all(&mut drivers, Phase::Readback, &shared, sock, None)?;
    }

    let mut read = DirStats::new();
    let mut write = DirStats::new();
    let (mut verify_errors, mut verified_reads, mut io_errors) = (0, 0, 0);
    for d in &drivers {
        read.merge(&d.read);
        write.merge(&d.write);
        verify_errors += d.verify_errors;
        verified_reads += d.verified_reads;
        io_errors += d.io_errors;
    }
    drop(conn);
    Ok(BlkResult {
        config: config.clone(),
        device: info,
        working_set: per_queue * config.bs * u64::from(config.queues),
        runtime: config.runtime,
        read,
        write,
        backend_cpu,
        verify_errors,
        verified_reads,
        io_errors,
    })
}

/// Samples a process's CPU time at the start and end of the measured window.
struct CpuWindow {
    pid: u32,
    start: Instant,
    end: Instant,
    at_start: Option<Duration>,
    at_end: Option<Duration>,
}

impl CpuWindow {
    fn new(pid: u32, start: Instant, end: Instant) -> Self {
        Self {
            pid,
            start,
            end,
            at_start: None,
            at_end: None,
        }
    }

    /// When the supervisor must next wake to take a sample.
    fn next_deadline(&self) -> Option<Instant> {
        if self.at_start.is_none() {
            Some(self.start)
        } else if self.at_end.is_none() {
            Some(self.end)
        } else {
            None
        }
    }

    fn sample(&mut self, now: Instant) {
        if self.at_start.is_none() && now >= self.start {
            self.at_start = process_cpu(self.pid);
        } else if self.at_start.is_some() && self.at_end.is_none() && now >= self.end {
            self.at_end = process_cpu(self.pid);
        }
    }

    fn result(&self) -> Option<Duration> {
        Some(self.at_end?.saturating_sub(self.at_start?))
    }
}

/// utime + stime of every thread of `pid` (/proc/PID/stat fields 14 and 15).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(Duration::from_nanos((utime + stime) * 1_000_000_000 / hz))
}

/// Runs one phase on every queue, one thread each, while this thread
/// watches the socket, the stall clock and the CPU sampling points.
fn run_phase_all(
    drivers: &mut [QueueDriver],
    phase: Phase,
    shared: &Shared,
    sock: i32,
    mut cpu: Option<CpuWindow>,
) -> Result<Option<Duration>, BenchError> {
    let wakers: Vec<EventFd> = drivers
        .iter()
        .map(|d| d.call.try_clone())
        .collect::<Result<_, _>>()
        .map_err(BenchError::EventFd)?;
    let poke = || {
        for w in &wakers {
            let _ = w.write(1);
        }
    };
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = drivers
            .iter_mut()
            .enumerate()
            .map(|(q, d)| {
                std::thread::Builder::new()
                    .name(format!("queue{q}"))
                    .spawn_scoped(scope, move || d.run_phase(phase, shared))
                    .expect("spawning a queue thread")
            })
            .collect();
        let mut last_progress = shared.progress.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        while !handles.iter().all(|h| h.is_finished()) {
            let now = Instant::now();
            if let Some(c) = cpu.as_mut() {
                c.sample(now);
            }
            let mut wait = Duration::from_millis(50);
            if let Some(at) = cpu.as_ref().and_then(CpuWindow::next_deadline) {
                wait = wait.min(at.saturating_duration_since(now));
            }
            if socket_hung_up(sock, wait) {
                tracing::debug!("backend socket hung up");
                shared.dead.store(true, Ordering::Relaxed);
                poke();
                break;
            }
            let p = shared.progress.load(Ordering::Relaxed);
            if p != last_progress {
                last_progress = p;
                last_change = Instant::now();
            } else if last_change.elapsed() > STALL_TIMEOUT {
                shared.stalled.store(true, Ordering::Relaxed);
                poke();
                break;
            }
        }
        let results = handles
            .into_iter()
            .map(|h| h.join().expect("queue thread panicked"))
            .collect::<Vec<_>>();
        // The queues may drain before the loop above saw the end go by.
        if let Some(c) = cpu.as_mut() {
            c.sample(Instant::now());
        }
        results
    });
    for r in results {
        r?;
    }
    Ok(cpu.and_then(|c| c.result()))
}

/// Sleeps until `fd` is readable. poll, not a blocking read: some peers
/// (libvhost-user) set O_NONBLOCK on the call eventfd we share with them.
fn wait_readable(fd: i32) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits up to `wait` for the peer to close the socket.
fn socket_hung_up(fd: i32, wait: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    let ms = wait.as_millis().min(1000) as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
