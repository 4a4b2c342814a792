//! `cardbench nvme`: fio-like load through the userspace NVMe driver, one
//! thread per I/O queue pair, reported exactly like `cardbench blk`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::blk::{process_cpu, BlkConfig, BlkResult, DirStats, Rw};
use crate::frontend::DeviceInfo;
use crate::pattern;

use super::dma::DmaBuf;
use super::driver::{Controller, DataPointer, DriverConfig, DriverError, IoQueue};
use super::spec::{io, Command, Completion};

/// A controller that completes nothing for this long is declared stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_IODEPTH: u16 = 1023;

#[derive(Clone, Debug)]
pub struct NvmeConfig {
    pub socket: PathBuf,
    pub nsid: u32,
    pub rw: Rw,
    pub bs: u64,
    pub iodepth: u16,
    pub queues: u16,
    pub runtime: Duration,
    pub ramp: Duration,
    pub size: Option<u64>,
    pub rwmixread: u8,
    pub verify: bool,
    pub backend_pid: Option<u32>,
    pub shadow_doorbells: bool,
    pub timeout: Duration,
    /// How long to retry a socket that is missing or refusing.
    pub connect_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("queue {qid}: the controller stopped completing commands ({in_flight} in flight after {waited:?})")]
    Stalled {
        qid: u16,
        in_flight: usize,
        waited: Duration,
    },
}

impl LoadError {
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Usage(_)
                | Self::Driver(DriverError::Connect { .. })
                | Self::Driver(DriverError::NoHandshake { .. })
                | Self::Driver(DriverError::NotNvme(_))
                | Self::Driver(DriverError::Invalid(_))
        )
    }
}

fn new_stats() -> DirStats {
    DirStats {
        ios: 0,
        bytes: 0,
        clat: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static bounds"),
    }
}

fn merge(into: &mut DirStats, from: &DirStats) {
    into.ios += from.ios;
    into.bytes += from.bytes;
    // Same bounds on both sides, so adding cannot fail.
    let _ = into.clat.add(&from.clat);
}

#[derive(Clone, Copy)]
enum Phase {
    Fill,
    Timed { measure: Instant, end: Instant },
    Readback,
}

#[derive(Clone, Copy)]
struct Slot {
    block: u64,
    write: bool,
    generation: u64,
    start: Instant,
}

struct SlotBuf {
    buf: DmaBuf,
    /// PRP list pages the data pointer names; kept for the run.
    _lists: Vec<DmaBuf>,
    dptr: [u64; 2],
}

struct Worker {
    q: IoQueue,
    nsid: u32,
    bs: u64,
    lba_size: u64,
    rw: Rw,
    rwmixread: u8,
    verify: bool,
    first_block: u64,
    nblocks: u64,
    bufs: Vec<SlotBuf>,
    slots: Vec<Option<Slot>>,
    slot_of_cid: Vec<Option<u16>>,
    free: Vec<u16>,
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

impl Worker {
    fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

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

    /// First 512-byte sector of a block (the pattern's unit).
    fn sector(&self, block: u64) -> u64 {
        (self.first_block + block) * self.bs / 512
    }

    fn submit(
        &mut self,
        slot: u16,
        block: u64,
        write: bool,
        now: Instant,
    ) -> Result<(), LoadError> {
        let lba = (self.first_block + block) * self.bs / self.lba_size;
        let nlb = (self.bs / self.lba_size) as u16;
        let mut cmd = Command::rw(
            if write { io::WRITE } else { io::READ },
            self.nsid,
            lba,
            nlb,
        );
        cmd.dptr = self.bufs[slot as usize].dptr;
        let mut generation = 0;
        if self.verify {
            self.inflight_block[block as usize] = true;
            let sector = self.sector(block);
            let buf = self.bufs[slot as usize].buf.bytes_mut();
            let buf = &mut buf[..self.bs as usize];
            if write {
                self.generation += 1;
                generation = self.generation;
                pattern::fill(buf, sector, generation);
            } else {
                // A controller that succeeds without moving data must not
                // pass on what the buffer held before.
                buf.fill(0xa5);
            }
        }
        let cid = self.q.push(cmd)?;
        self.slot_of_cid[usize::from(cid)] = Some(slot);
        self.slots[slot as usize] = Some(Slot {
            block,
            write,
            generation,
            start: now,
        });
        Ok(())
    }

    fn complete(&mut self, c: &Completion, phase: Phase, now: Instant) {
        // The driver has already checked the cid was in flight.
        let Some(slot) = self
            .slot_of_cid
            .get_mut(usize::from(c.cid))
            .and_then(Option::take)
        else {
            return;
        };
        let Some(s) = self.slots[slot as usize].take() else {
            return;
        };
        self.free.push(slot);
        let ok = c.status.is_success();
        if !ok {
            self.io_errors += 1;
            self.report(format_args!(
                "{} of block {} failed: {}",
                if s.write { "write" } else { "read" },
                self.first_block + s.block,
                c.status
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
    }

    fn check(&mut self, slot: u16, block: u64) {
        let generation = self.expected[block as usize];
        let sector = self.sector(block);
        pattern::fill(&mut self.scratch, sector, generation);
        let found = &self.bufs[slot as usize].buf.bytes()[..self.bs as usize];
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
        if self.reported < 5 {
            tracing::error!("{msg}");
        } else if self.reported == 5 {
            tracing::error!("further errors on this queue are only counted");
        }
        self.reported += 1;
    }

    fn run_phase(&mut self, phase: Phase, progress: &AtomicU64) -> Result<(), LoadError> {
        self.cursor = 0;
        let mut exhausted = false;
        let mut done = Vec::with_capacity(self.slots.len());
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            let stopping = match phase {
                Phase::Timed { end, .. } => now >= end,
                _ => exhausted,
            };
            let mut pushed = false;
            while let (false, Some(&slot)) = (stopping, self.free.last()) {
                let Some((block, write)) = self.next_op(phase) else {
                    exhausted = true;
                    break;
                };
                self.free.pop();
                self.submit(slot, block, write, now)?;
                pushed = true;
            }
            if pushed {
                self.q.flush()?;
            }
            if self.q.in_flight() == 0 && (stopping || exhausted) {
                return Ok(());
            }
            done.clear();
            self.q.reap(&mut done)?;
            if !done.is_empty() {
                let at = Instant::now();
                for c in &done {
                    self.complete(c, phase, at);
                }
                progress.fetch_add(done.len() as u64, Ordering::Relaxed);
                last_progress = at;
                continue;
            }
            if last_progress.elapsed() > STALL_TIMEOUT {
                return Err(LoadError::Stalled {
                    qid: self.q.qid(),
                    in_flight: self.q.in_flight(),
                    waited: STALL_TIMEOUT,
                });
            }
            self.q.wait(Duration::from_millis(100))?;
        }
    }
}

fn run_phase_all(
    workers: &mut [Worker],
    phase: Phase,
    cpu_pid: Option<u32>,
) -> Result<Option<Duration>, LoadError> {
    let progress = AtomicU64::new(0);
    let (results, cpu) = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|w| {
                let progress = &progress;
                let name = format!("nvme-q{}", w.q.qid());
                std::thread::Builder::new()
                    .name(name)
                    .spawn_scoped(scope, move || w.run_phase(phase, progress))
                    .expect("spawning a queue thread")
            })
            .collect();
        // Backend CPU over exactly the measured window.
        let mut cpu = None;
        if let (Phase::Timed { measure, end }, Some(pid)) = (phase, cpu_pid) {
            std::thread::sleep(measure.saturating_duration_since(Instant::now()));
            let a = process_cpu(pid);
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            let b = process_cpu(pid);
            cpu = a.zip(b).map(|(a, b)| b.saturating_sub(a));
        }
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("queue thread panicked"))
            .collect();
        (results, cpu)
    });
    for r in results {
        r?;
    }
    Ok(cpu)
}

/// Attaches, waiting up to `wait` for the socket to appear and accept.
pub fn attach_with_retry(config: DriverConfig, wait: Duration) -> Result<Controller, DriverError> {
    let deadline = Instant::now() + wait;
    loop {
        match Controller::attach(config.clone()) {
            Err(DriverError::Connect { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

pub fn run(config: &NvmeConfig) -> Result<BlkResult, LoadError> {
    let usage = |s: String| LoadError::Usage(s);
    if config.bs == 0 || config.bs % 512 != 0 {
        return Err(usage(format!(
            "--bs {} is not a multiple of 512",
            config.bs
        )));
    }
    if config.iodepth == 0 || config.iodepth > MAX_IODEPTH {
        return Err(usage(format!("--iodepth must be 1..={MAX_IODEPTH}")));
    }
    if config.queues == 0 {
        return Err(usage("--queues must be at least 1".into()));
    }
    if config.rwmixread > 100 {
        return Err(usage("--rwmixread is a percentage".into()));
    }
    let buffers = u64::from(config.queues) * u64::from(config.iodepth) * (config.bs + 4096);
    let mut dc = DriverConfig::new(&config.socket);
    dc.io_queues = config.queues;
    dc.shadow_doorbells = config.shadow_doorbells;
    dc.timeout = config.timeout;
    dc.mem_size = (buffers + (16 << 20)) as usize;
    let ctrl = attach_with_retry(dc, config.connect_wait)?;
    let ns = ctrl.identify_namespace(config.nsid)?;
    if config.bs % ns.lba_size != 0 {
        return Err(usage(format!(
            "--bs {} is not a multiple of the namespace's {}-byte blocks",
            config.bs, ns.lba_size
        )));
    }
    if let Some(max) = ctrl.info().max_transfer().filter(|&m| config.bs > m) {
        return Err(usage(format!(
            "--bs {} exceeds the controller's maximum transfer ({max} bytes)",
            config.bs
        )));
    }
    if config.queues > ctrl.granted_io_queues() {
        return Err(usage(format!(
            "the controller granted {} I/O queue(s); --queues {} asks for more",
            ctrl.granted_io_queues(),
            config.queues
        )));
    }
    let capacity = ns.size_bytes();
    let size = config.size.unwrap_or(capacity);
    if size > capacity {
        return Err(usage(format!(
            "namespace {} holds {capacity} bytes, less than --size {size}",
            ns.nsid
        )));
    }
    let per_queue = size / config.bs / u64::from(config.queues);
    let needed = if config.verify {
        2 * u64::from(config.iodepth)
    } else {
        1
    };
    if per_queue < needed {
        return Err(usage(format!(
            "the working set gives each queue {per_queue} block(s) of {}; need at least {needed}",
            config.bs
        )));
    }
    let depth = (config.iodepth + 1).min(ctrl.cap().mqes().min(u32::from(u16::MAX)) as u16);
    if depth <= config.iodepth {
        return Err(usage(format!(
            "--iodepth {} needs queues of {} entries; CAP.MQES allows {}",
            config.iodepth,
            config.iodepth + 1,
            depth
        )));
    }
    let mut workers = Vec::new();
    for q in 0..config.queues {
        let queue = ctrl.create_io_queue(q + 1, depth)?;
        let mut bufs = Vec::new();
        for _ in 0..config.iodepth {
            let buf = queue
                .memory()
                .alloc(config.bs)
                .ok_or(DriverError::OutOfMemory(config.bs))?;
            let mut cmd = Command::new(io::READ);
            let lists = queue.set_data(&mut cmd, &buf, config.bs, DataPointer::Prp)?;
            bufs.push(SlotBuf {
                buf,
                _lists: lists,
                dptr: cmd.dptr,
            });
        }
        let n = per_queue as usize;
        workers.push(Worker {
            slot_of_cid: vec![None; usize::from(queue.depth())],
            q: queue,
            nsid: ns.nsid,
            bs: config.bs,
            lba_size: ns.lba_size,
            rw: config.rw,
            rwmixread: config.rwmixread,
            verify: config.verify,
            first_block: u64::from(q) * per_queue,
            nblocks: per_queue,
            bufs,
            slots: vec![None; usize::from(config.iodepth)],
            free: (0..config.iodepth).rev().collect(),
            expected: if config.verify { vec![0; n] } else { vec![] },
            inflight_block: if config.verify {
                vec![false; n]
            } else {
                vec![]
            },
            rng: 0x5eed ^ u64::from(q) << 32,
            cursor: 0,
            generation: 0,
            scratch: vec![0; config.bs as usize],
            read: new_stats(),
            write: new_stats(),
            verify_errors: 0,
            verified_reads: 0,
            io_errors: 0,
            reported: 0,
        });
    }
    if config.verify && config.rw.reads() {
        tracing::info!("verify: writing the working set once so reads can be checked");
        run_phase_all(&mut workers, Phase::Fill, None)?;
    }
    let measure = Instant::now() + config.ramp;
    let end = measure + config.runtime;
    let backend_cpu = run_phase_all(
        &mut workers,
        Phase::Timed { measure, end },
        config.backend_pid,
    )?;
    if config.verify && config.rw.writes() {
        tracing::info!("verify: reading back every block written");
        run_phase_all(&mut workers, Phase::Readback, None)?;
    }
    let mut read = new_stats();
    let mut write = new_stats();
    let (mut verify_errors, mut verified_reads, mut io_errors) = (0, 0, 0);
    for w in &workers {
        merge(&mut read, &w.read);
        merge(&mut write, &w.write);
        verify_errors += w.verify_errors;
        verified_reads += w.verified_reads;
        io_errors += w.io_errors;
    }
    let shadow = ctrl.uses_shadow_doorbells();
    let (rung, skipped) = ctrl.doorbell_counts();
    tracing::info!("doorbells: {rung} written to the card, {skipped} left to the shadow doorbells");
    // Leave the controller as a guest's driver would on unbind.
    for w in workers {
        let _ = ctrl.delete_io_queue(w.q);
    }
    let _ = ctrl.shutdown();
    Ok(BlkResult {
        config: BlkConfig {
            socket: config.socket.clone(),
            rw: config.rw,
            bs: config.bs,
            iodepth: config.iodepth,
            queues: config.queues,
            runtime: config.runtime,
            ramp: config.ramp,
            size: config.size,
            rwmixread: config.rwmixread,
            verify: config.verify,
            backend_pid: config.backend_pid,
            handshake_timeout: config.timeout,
            connect_wait: config.connect_wait,
        },
        device: DeviceInfo {
            capacity_bytes: capacity,
            num_queues: ctrl.granted_io_queues(),
            read_only: false,
            event_idx: shadow,
            features: 0,
        },
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
