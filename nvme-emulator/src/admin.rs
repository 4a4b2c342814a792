//! Admin commands. Each is checked field by field and answered with the
//! spec's status; none of them can harm the queues or the data of another.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::controller::{AdminState, CompletionQueue, Controller, WorkerHandle, TEMPERATURE_K};
use crate::datapath::{copy_to_guest, data_segments};
use crate::dma::{DmaMemory, DmaSpace};
use crate::io::{IoQueue, IoWorker};
use crate::spec::{
    admin, feature, log, Command, Status, AER_LIMIT, CQE_SIZE, ERROR_LOG_ENTRIES,
    MAX_QUEUE_ENTRIES, MDTS, PAGE_SIZE, SQE_SIZE, VERSION_1_4,
};

/// PCI vendor id reported in Identify (and config space): Amazon, whose
/// instance-store NVMe devices this card imitates.
pub const VENDOR_ID: u16 = 0x1d0f;
/// Size of the Identify data structures.
const IDENTIFY_SIZE: usize = 4096;

/// `text` space-padded (or cut) to `len` bytes, as Identify strings are.
fn ascii_field(text: &str, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = text.bytes().take(len).collect();
    out.resize(len, b' ');
    out
}

/// A stable 16-byte namespace id (NGUID) from the serial and the NSID.
pub fn namespace_guid(serial: &str, nsid: u32) -> [u8; 16] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = [0u8; 16];
    for (round, chunk) in out.chunks_mut(8).enumerate() {
        for b in serial
            .bytes()
            .chain(nsid.to_le_bytes())
            .chain([round as u8])
        {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        chunk.copy_from_slice(&h.to_be_bytes());
    }
    out
}

impl Controller {
    /// Executes one admin command; `None` if it completes later (an
    /// Asynchronous Event Request).
    pub(crate) fn admin_command(
        self: &Arc<Self>,
        st: &mut AdminState,
        mem: &Arc<DmaSpace>,
        cmd: &Command,
    ) -> Option<(Status, u32)> {
        if cmd.fuse() != 0 || cmd.psdt() != 0 {
            return Some((Status::INVALID_FIELD, 0));
        }
        let result = match cmd.opcode() {
            admin::IDENTIFY => self.identify(mem, cmd).map(|()| 0),
            admin::CREATE_CQ => self.create_cq(mem, cmd).map(|()| 0),
            admin::CREATE_SQ => self.create_sq(st, mem, cmd).map(|()| 0),
            admin::DELETE_SQ => self.delete_sq(st, cmd).map(|()| 0),
            admin::DELETE_CQ => self.delete_cq(st, cmd).map(|()| 0),
            admin::GET_FEATURES => self.get_features(cmd),
            admin::SET_FEATURES => self.set_features(cmd),
            admin::GET_LOG_PAGE => self.get_log_page(mem, cmd).map(|()| 0),
            // Commands already fetched cannot be recalled from io_uring:
            // answer "not aborted" (DW0 bit 0), as the spec allows.
            admin::ABORT => Ok(1),
            admin::ASYNC_EVENT_REQUEST => {
                if st.aers.len() >= AER_LIMIT {
                    Err(Status::AER_LIMIT_EXCEEDED)
                } else {
                    st.aers.push(cmd.cid());
                    return None;
                }
            }
            admin::DOORBELL_BUFFER_CONFIG => self.doorbell_buffer_config(st, mem, cmd).map(|()| 0),
            _ => Err(Status::INVALID_OPCODE),
        };
        Some(match result {
            Ok(dw0) => (Status::SUCCESS, dw0),
            Err(status) => (status, 0),
        })
    }

    fn respond(&self, mem: &DmaSpace, cmd: &Command, data: &[u8]) -> Result<(), Status> {
        let segments = data_segments(mem, cmd, data.len() as u64, false)?;
        copy_to_guest(mem, &segments, data)
    }

    fn identify(&self, mem: &DmaSpace, cmd: &Command) -> Result<(), Status> {
        let cns = cmd.cdw(10) as u8;
        let data = match cns {
            0x00 => self.identify_namespace(cmd.nsid())?,
            0x01 => self.identify_controller(),
            0x02 => {
                // Active namespaces above NSID, ascending.
                let mut out = vec![0u8; IDENTIFY_SIZE];
                if cmd.nsid() >= 0xffff_fffe {
                    return Err(Status::INVALID_NAMESPACE);
                }
                let ids = (cmd.nsid() + 1..=self.config.namespaces.len() as u32).take(1024);
                for (i, id) in ids.enumerate() {
                    out[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                }
                out
            }
            0x03 => {
                self.namespace(cmd.nsid())?;
                let guid = namespace_guid(&self.config.serial, cmd.nsid());
                let mut out = vec![0u8; IDENTIFY_SIZE];
                // NGUID descriptor (type 2, 16 bytes), then a UUID (type 3).
                out[0] = 2;
                out[1] = 16;
                out[4..20].copy_from_slice(&guid);
                out[20] = 3;
                out[21] = 16;
                let mut uuid = guid;
                uuid.reverse();
                uuid[6] = (uuid[6] & 0x0f) | 0x40;
                uuid[8] = (uuid[8] & 0x3f) | 0x80;
                out[24..40].copy_from_slice(&uuid);
                out
            }
            _ => return Err(Status::INVALID_FIELD),
        };
        self.respond(mem, cmd, &data)
    }

    pub(crate) fn namespace(&self, nsid: u32) -> Result<&crate::namespace::Namespace, Status> {
        nsid.checked_sub(1)
            .and_then(|i| self.config.namespaces.get(i as usize))
            .ok_or(Status::INVALID_NAMESPACE)
    }

    fn identify_namespace(&self, nsid: u32) -> Result<Vec<u8>, Status> {
        let ns = self.namespace(nsid)?;
        let mut d = vec![0u8; IDENTIFY_SIZE];
        let blocks = ns.blocks();
        d[0..8].copy_from_slice(&blocks.to_le_bytes()); // NSZE
        d[8..16].copy_from_slice(&blocks.to_le_bytes()); // NCAP
        d[16..24].copy_from_slice(&blocks.to_le_bytes()); // NUSE
        d[24] = 1; // NSFEAT: thin provisioning (deallocated blocks are holes)
        d[25] = 0; // NLBAF: one format
        d[26] = 0; // FLBAS: format 0
                   // DLFEAT: deallocated blocks read as zeros; Write Zeroes may deallocate.
        d[33] = 0x09;
        d[104..120].copy_from_slice(&namespace_guid(&self.config.serial, nsid)); // NGUID
                                                                                 // LBA format 0: no metadata, LBADS, best relative performance.
        d[128 + 2] = ns.lba_shift as u8;
        Ok(d)
    }

    fn identify_controller(&self) -> Vec<u8> {
        let c = &self.config;
        let mut d = vec![0u8; IDENTIFY_SIZE];
        d[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes()); // VID
        d[2..4].copy_from_slice(&VENDOR_ID.to_le_bytes()); // SSVID
        d[4..24].copy_from_slice(&ascii_field(&c.serial, 20));
        d[24..64].copy_from_slice(&ascii_field(&c.model, 40));
        d[64..72].copy_from_slice(&ascii_field(&c.firmware, 8));
        d[72] = 6; // RAB
        d[77] = MDTS;
        d[78..80].copy_from_slice(&1u16.to_le_bytes()); // CNTLID
        d[80..84].copy_from_slice(&VERSION_1_4.to_le_bytes());
        d[111] = 1; // CNTRLTYPE: I/O controller
                    // OACS: Doorbell Buffer Config (bit 8).
        d[256..258].copy_from_slice(&(1u16 << 8).to_le_bytes());
        d[258] = 3; // ACL: 4 aborts
        d[259] = (AER_LIMIT - 1) as u8; // AERL
        d[260] = 0x03; // FRMW: one slot, slot 1 read-only
        d[261] = 0x04; // LPA: extended data for Get Log Page
        d[262] = (ERROR_LOG_ENTRIES - 1) as u8; // ELPE
        d[266..268].copy_from_slice(&343u16.to_le_bytes()); // WCTEMP
        d[268..270].copy_from_slice(&373u16.to_le_bytes()); // CCTEMP
        d[512] = 0x66; // SQES: 64 bytes
        d[513] = 0x44; // CQES: 16 bytes
        d[514..516].copy_from_slice(&(MAX_QUEUE_ENTRIES as u16).to_le_bytes()); // MAXCMD
        d[516..520].copy_from_slice(&(c.namespaces.len() as u32).to_le_bytes()); // NN
                                                                                 // ONCS: Compare, Dataset Management, Write Zeroes.
        d[520..522].copy_from_slice(&(1u16 | 1 << 2 | 1 << 3).to_le_bytes());
        d[525] = 1; // VWC: a volatile write cache is present
                    // SGLS: SGLs supported, no alignment requirement.
        d[536..540].copy_from_slice(&1u32.to_le_bytes());
        let nqn = format!("nqn.2026-11.dev.cardsim:nvme:{}", c.serial);
        d[768..768 + nqn.len().min(255)].copy_from_slice(&nqn.as_bytes()[..nqn.len().min(255)]);
        // Power state 0: 25 W.
        d[2048..2050].copy_from_slice(&2500u16.to_le_bytes());
        d
    }

    fn create_cq(&self, mem: &DmaSpace, cmd: &Command) -> Result<(), Status> {
        let qid = cmd.cdw(10) as u16;
        let size = (cmd.cdw(10) >> 16) + 1;
        let contiguous = cmd.cdw(11) & 1 != 0;
        let ien = cmd.cdw(11) & 2 != 0;
        let vector = (cmd.cdw(11) >> 16) as u16;
        if qid == 0 || qid > self.config.io_queues || self.completion_queue(qid).is_some() {
            return Err(Status::INVALID_QUEUE_ID);
        }
        if !(2..=MAX_QUEUE_ENTRIES).contains(&size) {
            return Err(Status::INVALID_QUEUE_SIZE);
        }
        if usize::from(vector) >= self.irqs.count() {
            return Err(Status::INVALID_INTERRUPT_VECTOR);
        }
        let base = cmd.prp1();
        // CAP.CQR: queues must be physically contiguous and page aligned.
        if !contiguous || base % PAGE_SIZE != 0 {
            return Err(Status::INVALID_FIELD);
        }
        mem.host_range(base, u64::from(size) * CQE_SIZE, true)
            .map_err(|_| Status::INVALID_FIELD)?;
        let cq = CompletionQueue::new(qid, base, size, vector, ien);
        if let Ok(mut cqs) = self.cqs.write() {
            cqs[usize::from(qid)] = Some(Arc::new(cq));
        }
        Ok(())
    }

    fn create_sq(
        self: &Arc<Self>,
        st: &mut AdminState,
        mem: &DmaSpace,
        cmd: &Command,
    ) -> Result<(), Status> {
        let qid = cmd.cdw(10) as u16;
        let size = (cmd.cdw(10) >> 16) + 1;
        let contiguous = cmd.cdw(11) & 1 != 0;
        let cqid = (cmd.cdw(11) >> 16) as u16;
        if qid == 0
            || qid > self.config.io_queues
            || st.workers.get(usize::from(qid)).is_none_or(|w| w.is_some())
        {
            return Err(Status::INVALID_QUEUE_ID);
        }
        if !(2..=MAX_QUEUE_ENTRIES).contains(&size) {
            return Err(Status::INVALID_QUEUE_SIZE);
        }
        let cq = match cqid {
            0 => None,
            id => self.completion_queue(id),
        }
        .ok_or(Status::CQ_INVALID)?;
        let base = cmd.prp1();
        if !contiguous || base % PAGE_SIZE != 0 {
            return Err(Status::INVALID_FIELD);
        }
        mem.host_range(base, u64::from(size) * SQE_SIZE, false)
            .map_err(|_| Status::INVALID_FIELD)?;
        let stop = Arc::new(AtomicU8::new(crate::io::RUN));
        let worker = IoWorker::new(
            self.clone(),
            IoQueue {
                qid,
                base,
                size,
                cq,
            },
            stop.clone(),
        )
        .map_err(|e| {
            tracing::error!(qid, error = %e, "cannot start an I/O queue");
            Status::INTERNAL_ERROR
        })?;
        let thread = std::thread::Builder::new()
            .name(format!("nvme-sq{qid}"))
            .spawn(move || worker.run())
            .map_err(|_| Status::INTERNAL_ERROR)?;
        st.workers[usize::from(qid)] = Some(WorkerHandle {
            cqid,
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    fn delete_sq(&self, st: &mut AdminState, cmd: &Command) -> Result<(), Status> {
        let qid = cmd.cdw(10) as u16;
        if qid == 0 {
            return Err(Status::INVALID_QUEUE_ID);
        }
        let mut worker = st
            .workers
            .get_mut(usize::from(qid))
            .and_then(Option::take)
            .ok_or(Status::INVALID_QUEUE_ID)?;
        // Commands in flight complete (their completion queue still exists).
        worker.stop.store(crate::io::STOP_POST, Ordering::Release);
        let _ = self.wake_fd(qid).write(1);
        if let Some(t) = worker.thread.take() {
            let _ = t.join();
        }
        Ok(())
    }

    fn delete_cq(&self, st: &AdminState, cmd: &Command) -> Result<(), Status> {
        let qid = cmd.cdw(10) as u16;
        if qid == 0 || self.completion_queue(qid).is_none() {
            return Err(Status::INVALID_QUEUE_ID);
        }
        if st.workers.iter().flatten().any(|w| w.cqid == qid) {
            return Err(Status::INVALID_QUEUE_DELETION);
        }
        if let Ok(mut cqs) = self.cqs.write() {
            cqs[usize::from(qid)] = None;
        }
        Ok(())
    }

    fn get_features(&self, cmd: &Command) -> Result<u32, Status> {
        let f = &self.features;
        let fid = cmd.cdw(10) as u8;
        // SEL (bits 10:8): current, default and saved all read the current
        // value (nothing is saveable); 3 = supported capabilities = none.
        if (cmd.cdw(10) >> 8) & 7 == 3 {
            return Ok(0);
        }
        let value = match fid {
            feature::ARBITRATION => f.arbitration.load(Ordering::Relaxed),
            feature::POWER_MANAGEMENT => f.power_management.load(Ordering::Relaxed),
            feature::TEMPERATURE_THRESHOLD => f.temperature_threshold.load(Ordering::Relaxed),
            feature::ERROR_RECOVERY => f.error_recovery.load(Ordering::Relaxed),
            feature::VOLATILE_WRITE_CACHE => f.volatile_write_cache.load(Ordering::Relaxed),
            feature::NUMBER_OF_QUEUES => f.number_of_queues.load(Ordering::Relaxed),
            feature::INTERRUPT_COALESCING => f.interrupt_coalescing.load(Ordering::Relaxed),
            feature::INTERRUPT_VECTOR_CONFIG => {
                let iv = cmd.cdw(11) as u16;
                f.vector_config
                    .get(usize::from(iv))
                    .ok_or(Status::INVALID_FIELD)?
                    .load(Ordering::Relaxed)
            }
            feature::WRITE_ATOMICITY => 0,
            feature::ASYNC_EVENT_CONFIG => f.async_event_config.load(Ordering::Relaxed),
            _ => return Err(Status::INVALID_FIELD),
        };
        Ok(value)
    }

    fn set_features(&self, cmd: &Command) -> Result<u32, Status> {
        let f = &self.features;
        let fid = cmd.cdw(10) as u8;
        // SV: nothing is saveable.
        if cmd.cdw(10) & (1 << 31) != 0 {
            return Err(Status {
                sct: 1,
                sc: 0x0d,
                dnr: true,
            });
        }
        let v = cmd.cdw(11);
        match fid {
            feature::ARBITRATION => f.arbitration.store(v, Ordering::Relaxed),
            feature::POWER_MANAGEMENT => {
                // One power state.
                if v & 0x1f != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                f.power_management.store(v, Ordering::Relaxed)
            }
            feature::TEMPERATURE_THRESHOLD => {
                // Only the composite sensor's over-temperature threshold.
                if (v >> 16) & 0x3f != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                f.temperature_threshold.store(v & 0xffff, Ordering::Relaxed)
            }
            feature::ERROR_RECOVERY => f.error_recovery.store(v & 0x1_ffff, Ordering::Relaxed),
            feature::VOLATILE_WRITE_CACHE => f.volatile_write_cache.store(v & 1, Ordering::Relaxed),
            feature::NUMBER_OF_QUEUES => {
                let nsqr = v & 0xffff;
                let ncqr = v >> 16;
                if nsqr == 0xffff || ncqr == 0xffff {
                    return Err(Status::INVALID_FIELD);
                }
                // Allocated: what the controller has, whatever was asked.
                return Ok(f.number_of_queues.load(Ordering::Relaxed));
            }
            feature::INTERRUPT_COALESCING => {
                f.interrupt_coalescing.store(v & 0xffff, Ordering::Relaxed)
            }
            feature::INTERRUPT_VECTOR_CONFIG => {
                let iv = v as u16;
                // The admin vector cannot have coalescing.
                if iv == 0 && v & (1 << 16) == 0 {
                    return Err(Status::INVALID_FIELD);
                }
                f.vector_config
                    .get(usize::from(iv))
                    .ok_or(Status::INVALID_FIELD)?
                    .store(v & 0x1_ffff, Ordering::Relaxed)
            }
            feature::WRITE_ATOMICITY => {}
            feature::ASYNC_EVENT_CONFIG => f.async_event_config.store(v, Ordering::Relaxed),
            _ => return Err(Status::INVALID_FIELD),
        }
        Ok(0)
    }

    fn get_log_page(&self, mem: &DmaSpace, cmd: &Command) -> Result<(), Status> {
        let lid = cmd.cdw(10) as u8;
        let numd = (u64::from(cmd.cdw(10) >> 16) | (u64::from(cmd.cdw(11) & 0xffff) << 16)) + 1;
        let len = numd * 4;
        let offset = u64::from(cmd.cdw(12)) | (u64::from(cmd.cdw(13)) << 32);
        let page = match lid {
            log::ERROR_INFORMATION => self.error_log().0,
            log::SMART_HEALTH => {
                if cmd.nsid() != 0 && cmd.nsid() != 0xffff_ffff {
                    // LPA bit 0 is clear: no per-namespace SMART data.
                    return Err(Status::INVALID_FIELD);
                }
                self.smart_log()
            }
            log::FIRMWARE_SLOT => {
                let mut p = vec![0u8; 512];
                p[0] = 1; // slot 1 active
                p[8..16].copy_from_slice(&ascii_field(&self.config.firmware, 8));
                p
            }
            _ => return Err(Status::INVALID_LOG_PAGE),
        };
        if offset % 4 != 0 || offset >= page.len() as u64 {
            return Err(Status::INVALID_FIELD);
        }
        if len > PAGE_SIZE * 2 {
            return Err(Status::INVALID_FIELD);
        }
        let mut out = vec![0u8; len as usize];
        let avail = &page[offset as usize..];
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.respond(mem, cmd, &out)
    }

    fn smart_log(&self) -> Vec<u8> {
        let c = &self.counters;
        let mut p = vec![0u8; 512];
        p[1..3].copy_from_slice(&(TEMPERATURE_K as u16).to_le_bytes());
        p[3] = 100; // available spare
        p[4] = 10; // available spare threshold
                   // Data units are thousands of 512-byte units, rounded up.
        let units = |bytes: u64| (bytes / 512).div_ceil(1000);
        let put = |p: &mut Vec<u8>, at: usize, v: u64| {
            p[at..at + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(&mut p, 32, units(c.bytes_read.load(Ordering::Relaxed)));
        put(&mut p, 48, units(c.bytes_written.load(Ordering::Relaxed)));
        put(&mut p, 64, c.read_commands.load(Ordering::Relaxed));
        put(&mut p, 80, c.write_commands.load(Ordering::Relaxed));
        put(&mut p, 112, 1); // power cycles
        put(&mut p, 176, self.error_log().1);
        p
    }

    fn doorbell_buffer_config(
        &self,
        st: &AdminState,
        mem: &DmaSpace,
        cmd: &Command,
    ) -> Result<(), Status> {
        let shadow = cmd.prp1();
        let events = cmd.prp2();
        if shadow == 0 || events == 0 || shadow % PAGE_SIZE != 0 || events % PAGE_SIZE != 0 {
            return Err(Status::INVALID_FIELD);
        }
        mem.host_range(shadow, PAGE_SIZE, true)
            .and_then(|_| mem.host_range(events, PAGE_SIZE, true))
            .map_err(|_| Status::INVALID_FIELD)?;
        // Queues that already exist carry on from where their registers are.
        for qid in 1..=self.config.io_queues {
            if st
                .workers
                .get(usize::from(qid))
                .is_some_and(Option::is_some)
                || self.completion_queue(qid).is_some()
            {
                let tail = self.sq_tail(qid, mem).unwrap_or(0);
                let head = self.cq_head(qid, mem).unwrap_or(0);
                let at = 8 * u64::from(qid);
                let _ = mem.write_u32(shadow + at, tail);
                let _ = mem.write_u32(shadow + at + 4, head);
                let _ = mem.write_u32(events + at, tail);
            }
        }
        self.set_doorbell_buffers(shadow, events);
        self.counters
            .doorbell_buffer_configs
            .fetch_add(1, Ordering::Relaxed);
        // Let every worker look at its shadow doorbell now.
        for qid in 1..=self.config.io_queues {
            let _ = self.wake_fd(qid).write(1);
        }
        Ok(())
    }
}
