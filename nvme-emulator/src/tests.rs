//! The controller driven as a host driver would drive it, without a socket:
//! registers through `mmio_write`/`mmio_read`, queues and data in heap DMA
//! regions, namespaces on real files through real io_uring workers. One test
//! (at least) for every status the controller answers bad input with.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::controller::{Controller, ControllerConfig, CSTS_CFS, CSTS_RDY, CSTS_SHST_COMPLETE};
use crate::dma::{DmaMemory, DmaRegion};
use crate::namespace::{Namespace, NamespaceSpec};
use crate::spec::{admin, feature, io, log, reg, Command, Completion, Status, MAX_TRANSFER};

const BASE: u64 = 0x10_0000;
const MEM: usize = 8 << 20;
const ASQ: u64 = BASE;
const ACQ: u64 = BASE + 0x1000;
const ADMIN_ENTRIES: u32 = 16;
const SHADOW: u64 = BASE + 0x8_0000;
const EVENTS: u64 = BASE + 0x8_1000;
/// Data buffers start here.
const DATA: u64 = BASE + 0x10_0000;
const NS_BYTES: u64 = 4 << 20;

fn sq_base(qid: u16) -> u64 {
    BASE + 0x1_0000 * u64::from(qid)
}
fn cq_base(qid: u16) -> u64 {
    sq_base(qid) + 0x8000
}

struct Queue {
    size: u32,
    tail: u32,
    /// The tail last made visible to the controller.
    rung: u32,
    head: u32,
    phase: bool,
}

struct Host {
    ctrl: Arc<Controller>,
    stop: Arc<AtomicBool>,
    admin_thread: Option<std::thread::JoinHandle<()>>,
    queues: Vec<Option<Queue>>,
    shadow: bool,
    _files: Vec<tempfile::NamedTempFile>,
    next_cid: u16,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.ctrl.wake_fd(0).write(1);
        if let Some(t) = self.admin_thread.take() {
            t.join().unwrap();
        }
    }
}

impl Host {
    fn new(lba: u32) -> Self {
        Self::with_faults(lba, &[])
    }

    /// A host whose namespace has these faults (in `--fault` syntax; "flash"
    /// adds the flash latency model instead).
    fn with_faults(lba: u32, faults: &[&str]) -> Self {
        Self::build(lba, faults, Duration::ZERO, false)
    }

    fn build(lba: u32, faults: &[&str], poll: Duration, direct: bool) -> Self {
        Self::build_in(std::env::temp_dir().as_path(), lba, faults, poll, direct)
    }

    fn build_in(
        dir: &std::path::Path,
        lba: u32,
        faults: &[&str],
        poll: Duration,
        direct: bool,
    ) -> Self {
        let file = tempfile::NamedTempFile::new_in(dir).unwrap();
        file.as_file().set_len(NS_BYTES).unwrap();
        let spec: NamespaceSpec = format!("{},lba={lba}", file.path().display())
            .parse()
            .unwrap();
        let ctrl = Controller::new(ControllerConfig {
            serial: "TESTSERIAL".into(),
            model: "cardsim NVMe Instance Storage".into(),
            firmware: "0.1.0".into(),
            io_queues: 2,
            poll,
            namespaces: vec![{
                let middle = card_firmware::middle::MiddleConfig {
                    latency: if faults.contains(&"flash") {
                        card_firmware::middle::Latency::Flash
                    } else {
                        card_firmware::middle::Latency::None
                    },
                    ..Default::default()
                };
                let ns = Namespace::open(&spec, direct, &middle).unwrap();
                for f in faults.iter().filter(|f| **f != "flash") {
                    ns.middle.add_fault(f.parse().unwrap()).unwrap();
                }
                ns
            }],
        })
        .unwrap();
        ctrl.dma_map(DmaRegion::heap(BASE, MEM));
        let stop = Arc::new(AtomicBool::new(false));
        let admin_thread = {
            let (c, s) = (ctrl.clone(), stop.clone());
            Some(std::thread::spawn(move || c.run_admin(s)))
        };
        Self {
            ctrl,
            stop,
            admin_thread,
            queues: (0..3).map(|_| None).collect(),
            shadow: false,
            _files: vec![file],
            next_cid: 1,
        }
    }

    fn ns_file(&self) -> &std::fs::File {
        self._files[0].as_file()
    }

    fn mem(&self) -> Arc<crate::dma::DmaSpace> {
        self.ctrl.dma()
    }

    fn write32(&self, offset: u64, v: u32) {
        self.ctrl.mmio_write(offset, &v.to_le_bytes());
    }
    fn write64(&self, offset: u64, v: u64) {
        self.ctrl.mmio_write(offset, &v.to_le_bytes());
    }
    fn read64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.ctrl.mmio_read(offset, &mut b);
        u64::from_le_bytes(b)
    }
    fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ctrl.mmio_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wait_csts(&self, mask: u32, want: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ctrl.csts() & mask != want {
            assert!(Instant::now() < deadline, "CSTS {:#x}", self.ctrl.csts());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn enable(&mut self) {
        let n = ADMIN_ENTRIES - 1;
        // A driver clears its completion queues before handing them over.
        self.mem().write(ACQ, &[0; 4096]).unwrap();
        self.write32(reg::AQA, n | (n << 16));
        self.write64(reg::ASQ, ASQ);
        self.write64(reg::ACQ, ACQ);
        self.write32(reg::CC, 1 | (6 << 16) | (4 << 20));
        self.wait_csts(CSTS_RDY, CSTS_RDY);
        self.queues[0] = Some(Queue {
            size: ADMIN_ENTRIES,
            tail: 0,
            rung: 0,
            head: 0,
            phase: true,
        });
    }

    fn disable(&mut self) {
        self.write32(reg::CC, 0);
        self.wait_csts(CSTS_RDY, 0);
        self.queues.iter_mut().for_each(|q| *q = None);
        self.shadow = false;
    }

    fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Places `cmd` in queue `qid` without ringing the doorbell.
    fn push(&mut self, qid: u16, mut cmd: Command) -> u16 {
        let cid = self.cid();
        cmd.dw[0] = (cmd.dw[0] & 0xffff) | (u32::from(cid) << 16);
        let mem = self.mem();
        let q = self.queues[usize::from(qid)].as_mut().expect("queue");
        mem.write(sq_base_of(qid) + u64::from(q.tail) * 64, &cmd.to_bytes())
            .unwrap();
        q.tail = (q.tail + 1) % q.size;
        cid
    }

    /// Makes the new tail visible: with shadow doorbells, in the shadow
    /// buffer, and in the register only if the event index asks for it (as
    /// Linux does); otherwise in the register.
    fn ring(&mut self, qid: u16) {
        let mem = self.mem();
        let shadow = self.shadow && qid > 0;
        let q = self.queues[usize::from(qid)].as_mut().unwrap();
        let (old, new) = (q.rung as u16, q.tail as u16);
        q.rung = q.tail;
        if shadow {
            mem.write_u32(SHADOW + 8 * u64::from(qid), u32::from(new))
                .unwrap();
            std::sync::atomic::fence(Ordering::SeqCst);
            let ei = mem.read_u32(EVENTS + 8 * u64::from(qid)).unwrap() as u16;
            if new.wrapping_sub(ei).wrapping_sub(1) >= new.wrapping_sub(old) {
                return;
            }
        }
        self.write32(reg::DOORBELLS + 8 * u64::from(qid), u32::from(new));
    }

    /// Waits for the next completion on `qid`'s completion queue.
    fn reap(&mut self, qid: u16) -> Completion {
        let mem = self.mem();
        let deadline = Instant::now() + Duration::from_secs(10);
        let q = self.queues[usize::from(qid)].as_mut().unwrap();
        loop {
            let mut raw = [0u8; 16];
            mem.read(cq_base_of(qid) + u64::from(q.head) * 16, &mut raw)
                .unwrap();
            let (c, phase) = Completion::from_bytes(&raw);
            if phase == q.phase {
                q.head += 1;
                if q.head == q.size {
                    q.head = 0;
                    q.phase = !q.phase;
                }
                let head = q.head;
                if self.shadow && qid > 0 {
                    mem.write_u32(SHADOW + 8 * u64::from(qid) + 4, head)
                        .unwrap();
                }
                self.write32(reg::DOORBELLS + 8 * u64::from(qid) + 4, head);
                return c;
            }
            assert!(Instant::now() < deadline, "no completion on queue {qid}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn submit(&mut self, qid: u16, cmd: Command) -> Completion {
        let cid = self.push(qid, cmd);
        self.ring(qid);
        let c = self.reap(qid);
        assert_eq!(c.cid, cid);
        assert_eq!(c.sq_id, qid);
        c
    }

    fn admin(&mut self, cmd: Command) -> Completion {
        self.submit(0, cmd)
    }

    fn create_queues(&mut self, qid: u16, entries: u32) {
        self.mem().write(cq_base(qid), &[0; 0x1000]).unwrap();
        let mut cq = Command::new(admin::CREATE_CQ, 0).with_prp(cq_base(qid), 0);
        cq.dw[10] = u32::from(qid) | ((entries - 1) << 16);
        cq.dw[11] = 0b11 | (u32::from(qid) << 16);
        assert_eq!(self.admin(cq).status, Status::SUCCESS);
        let mut sq = Command::new(admin::CREATE_SQ, 0).with_prp(sq_base(qid), 0);
        sq.dw[10] = u32::from(qid) | ((entries - 1) << 16);
        sq.dw[11] = 1 | (u32::from(qid) << 16);
        assert_eq!(self.admin(sq).status, Status::SUCCESS);
        self.queues[usize::from(qid)] = Some(Queue {
            size: entries,
            tail: 0,
            rung: 0,
            head: 0,
            phase: true,
        });
    }

    fn ready(lba: u32) -> Self {
        Self::ready_with_faults(lba, &[])
    }

    fn ready_with_faults(lba: u32, faults: &[&str]) -> Self {
        let mut h = Self::with_faults(lba, faults);
        h.enable();
        h.create_queues(1, 32);
        h
    }
}

fn sq_base_of(qid: u16) -> u64 {
    if qid == 0 {
        ASQ
    } else {
        sq_base(qid)
    }
}
fn cq_base_of(qid: u16) -> u64 {
    if qid == 0 {
        ACQ
    } else {
        cq_base(qid)
    }
}

fn rw(opcode: u8, slba: u64, blocks: u32, prp1: u64, prp2: u64) -> Command {
    let mut c = Command::new(opcode, 0).with_prp(prp1, prp2);
    c.dw[1] = 1;
    c.dw[10] = slba as u32;
    c.dw[11] = (slba >> 32) as u32;
    c.dw[12] = blocks - 1;
    c
}

fn identify(cns: u32, nsid: u32) -> Command {
    let mut c = Command::new(admin::IDENTIFY, 0).with_prp(DATA, 0);
    c.dw[1] = nsid;
    c.dw[10] = cns;
    c
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn registers_have_their_reset_values() {
    let h = Host::new(512);
    let cap = h.read64(reg::CAP);
    assert_eq!(cap & 0xffff, 1023, "MQES");
    assert_eq!((cap >> 16) & 1, 1, "CQR");
    assert_eq!((cap >> 32) & 0xf, 0, "DSTRD");
    assert_eq!((cap >> 37) & 1, 1, "CSS: NVM");
    assert_eq!((cap >> 48) & 0xff, 0, "MPSMIN/MPSMAX");
    assert_eq!(h.read32(reg::VS), 0x0001_0400);
    assert_eq!(h.read32(reg::CC), 0);
    assert_eq!(h.read32(reg::CSTS), 0);
    assert_eq!(h.read32(reg::AQA), 0);
    // Unaligned and odd-sized accesses change nothing.
    h.ctrl.mmio_write(reg::CC + 1, &[1, 0, 0, 0]);
    h.ctrl.mmio_write(reg::CC, &[1, 0]);
    assert_eq!(h.read32(reg::CC), 0);
}

#[test]
fn an_invalid_configuration_sets_controller_fatal_status() {
    let h = Host::new(512);
    h.write32(reg::AQA, 15 | (15 << 16));
    h.write64(reg::ASQ, ASQ + 0x10); // not page aligned
    h.write64(reg::ACQ, ACQ);
    h.write32(reg::CC, 1);
    h.wait_csts(CSTS_CFS, CSTS_CFS);
    assert_eq!(h.ctrl.csts() & CSTS_RDY, 0);
    // A reset clears it.
    h.write32(reg::CC, 0);
    h.wait_csts(CSTS_CFS, 0);
}

#[test]
fn identify_reports_the_controller_and_namespace() {
    let mut h = Host::new(4096);
    h.enable();
    assert_eq!(h.admin(identify(1, 0)).status, Status::SUCCESS);
    let mut d = vec![0u8; 4096];
    h.mem().read(DATA, &mut d).unwrap();
    assert_eq!(&d[4..24], b"TESTSERIAL          ");
    assert_eq!(
        &d[24..64],
        format!("{:40}", "cardsim NVMe Instance Storage").as_bytes()
    );
    assert_eq!(
        u32::from_le_bytes(d[80..84].try_into().unwrap()),
        0x0001_0400
    );
    assert_eq!(
        u16::from_le_bytes([d[256], d[257]]) & (1 << 8),
        1 << 8,
        "OACS: DBBC"
    );
    assert_eq!(u16::from_le_bytes([d[520], d[521]]), 0b1101, "ONCS");
    assert_eq!(d[536] & 3, 1, "SGLS");
    assert_eq!(u32::from_le_bytes(d[516..520].try_into().unwrap()), 1, "NN");

    assert_eq!(h.admin(identify(0, 1)).status, Status::SUCCESS);
    h.mem().read(DATA, &mut d).unwrap();
    assert_eq!(
        u64::from_le_bytes(d[0..8].try_into().unwrap()),
        NS_BYTES / 4096
    );
    assert_eq!(d[130], 12, "LBADS");

    assert_eq!(h.admin(identify(2, 0)).status, Status::SUCCESS);
    h.mem().read(DATA, &mut d).unwrap();
    assert_eq!(&d[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);

    assert_eq!(h.admin(identify(3, 1)).status, Status::SUCCESS);
    h.mem().read(DATA, &mut d).unwrap();
    assert_eq!((d[0], d[1]), (2, 16), "NGUID descriptor");

    assert_eq!(h.admin(identify(0x42, 0)).status, Status::INVALID_FIELD);
    assert_eq!(h.admin(identify(0, 0)).status, Status::INVALID_NAMESPACE);
    assert_eq!(h.admin(identify(0, 9)).status, Status::INVALID_NAMESPACE);
    assert_eq!(h.admin(identify(3, 2)).status, Status::INVALID_NAMESPACE);
}

#[test]
fn unknown_opcodes_are_invalid_opcodes() {
    let mut h = Host::ready(512);
    assert_eq!(
        h.admin(Command::new(0x7f, 0)).status,
        Status::INVALID_OPCODE
    );
    let mut c = Command::new(0x7e, 0);
    c.dw[1] = 1;
    assert_eq!(h.submit(1, c).status, Status::INVALID_OPCODE);
    // Fused operations are not supported.
    let mut c = rw(io::READ, 0, 1, DATA, 0);
    c.dw[0] |= 1 << 8;
    assert_eq!(h.submit(1, c).status, Status::INVALID_FIELD);
}

#[test]
fn queue_creation_and_deletion_errors() {
    let mut h = Host::new(512);
    h.enable();
    let create_cq = |qid: u32, entries: u32, flags: u32, iv: u32| {
        let mut c = Command::new(admin::CREATE_CQ, 0).with_prp(cq_base(1), 0);
        c.dw[10] = qid | ((entries.wrapping_sub(1) & 0xffff) << 16);
        c.dw[11] = flags | (iv << 16);
        c
    };
    assert_eq!(
        h.admin(create_cq(0, 16, 3, 1)).status,
        Status::INVALID_QUEUE_ID
    );
    assert_eq!(
        h.admin(create_cq(3, 16, 3, 1)).status,
        Status::INVALID_QUEUE_ID
    );
    assert_eq!(
        h.admin(create_cq(1, 1, 3, 1)).status,
        Status::INVALID_QUEUE_SIZE
    );
    assert_eq!(
        h.admin(create_cq(1, 4096, 3, 1)).status,
        Status::INVALID_QUEUE_SIZE
    );
    assert_eq!(
        h.admin(create_cq(1, 16, 3, 9)).status,
        Status::INVALID_INTERRUPT_VECTOR
    );
    assert_eq!(
        h.admin(create_cq(1, 16, 2, 1)).status,
        Status::INVALID_FIELD,
        "non-contiguous"
    );
    let mut outside = create_cq(1, 16, 3, 1);
    outside.dw[6] = 0x7000_0000;
    assert_eq!(
        h.admin(outside).status,
        Status::INVALID_FIELD,
        "queue outside memory"
    );

    let create_sq = |qid: u32, cqid: u32| {
        let mut c = Command::new(admin::CREATE_SQ, 0).with_prp(sq_base(1), 0);
        c.dw[10] = qid | (15 << 16);
        c.dw[11] = 1 | (cqid << 16);
        c
    };
    assert_eq!(h.admin(create_sq(1, 1)).status, Status::CQ_INVALID);
    assert_eq!(h.admin(create_cq(1, 16, 3, 1)).status, Status::SUCCESS);
    assert_eq!(
        h.admin(create_cq(1, 16, 3, 1)).status,
        Status::INVALID_QUEUE_ID,
        "exists"
    );
    assert_eq!(h.admin(create_sq(1, 0)).status, Status::CQ_INVALID);
    assert_eq!(h.admin(create_sq(0, 1)).status, Status::INVALID_QUEUE_ID);
    assert_eq!(h.admin(create_sq(1, 1)).status, Status::SUCCESS);
    assert_eq!(
        h.admin(create_sq(1, 1)).status,
        Status::INVALID_QUEUE_ID,
        "exists"
    );

    let delete = |op: u8, qid: u32| {
        let mut c = Command::new(op, 0);
        c.dw[10] = qid;
        c
    };
    assert_eq!(
        h.admin(delete(admin::DELETE_CQ, 1)).status,
        Status::INVALID_QUEUE_DELETION
    );
    assert_eq!(
        h.admin(delete(admin::DELETE_SQ, 2)).status,
        Status::INVALID_QUEUE_ID
    );
    assert_eq!(
        h.admin(delete(admin::DELETE_SQ, 0)).status,
        Status::INVALID_QUEUE_ID
    );
    assert_eq!(h.admin(delete(admin::DELETE_SQ, 1)).status, Status::SUCCESS);
    assert_eq!(h.admin(delete(admin::DELETE_CQ, 1)).status, Status::SUCCESS);
    assert_eq!(
        h.admin(delete(admin::DELETE_CQ, 1)).status,
        Status::INVALID_QUEUE_ID
    );
    assert_eq!(
        h.admin(delete(admin::DELETE_CQ, 0)).status,
        Status::INVALID_QUEUE_ID
    );
}

#[test]
fn reads_and_writes_through_prp_lists_reach_the_file() {
    let mut h = Host::ready(512);
    // 64 KiB from a buffer starting mid-page: PRP1 + a list of 16 entries.
    let data = pattern(7, 64 << 10);
    let buf = DATA + 0x200;
    h.mem().write(buf, &data).unwrap();
    let list = DATA + 0x8_0000;
    for i in 0..16u64 {
        let page = (buf & !0xfff) + 0x1000 * (i + 1);
        h.mem().write(list + 8 * i, &page.to_le_bytes()).unwrap();
    }
    let c = h.submit(1, rw(io::WRITE, 8, 128, buf, list));
    assert_eq!(c.status, Status::SUCCESS);
    let mut on_file = vec![0u8; data.len()];
    h.ns_file().read_exact_at(&mut on_file, 8 * 512).unwrap();
    assert_eq!(on_file, data);

    let out = DATA + 0x4_0000;
    h.mem().write(list, &(out + 0x1000).to_le_bytes()).unwrap();
    let c = h.submit(1, rw(io::READ, 8, 8, out, out + 0x1000));
    assert_eq!(c.status, Status::SUCCESS);
    let mut back = vec![0u8; 4096];
    h.mem().read(out, &mut back).unwrap();
    assert_eq!(back, data[..4096]);
    assert!(
        h.ctrl.irqs.fired(1) > 0,
        "I/O completions signal the queue's vector"
    );
}

#[test]
fn sgl_writes_reach_the_file() {
    let mut h = Host::ready(512);
    let a = pattern(1, 512);
    let b = pattern(2, 1024);
    h.mem().write(DATA, &a).unwrap();
    h.mem().write(DATA + 0x3000, &b).unwrap();
    let seg = DATA + 0x8000;
    let desc = |addr: u64, len: u32, kind: u8| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[15] = kind << 4;
        d
    };
    h.mem().write(seg, &desc(DATA, 512, 0)).unwrap();
    h.mem()
        .write(seg + 16, &desc(DATA + 0x3000, 1024, 0))
        .unwrap();
    let mut c = rw(io::WRITE, 0, 3, 0, 0);
    c.dw[0] |= 1 << 14;
    c.dw[6] = seg as u32;
    c.dw[7] = (seg >> 32) as u32;
    c.dw[8] = 32;
    c.dw[9] = 3 << 28; // last segment
    assert_eq!(h.submit(1, c).status, Status::SUCCESS);
    let mut on_file = vec![0u8; 1536];
    h.ns_file().read_exact_at(&mut on_file, 0).unwrap();
    assert_eq!(on_file[..512], a);
    assert_eq!(on_file[512..], b);
    // An unsupported descriptor type in the same place.
    c.dw[9] = 1 << 28; // bit bucket
    assert_eq!(h.submit(1, c).status, Status::SGL_TYPE_INVALID);
}

#[test]
fn bad_io_commands_get_their_status_and_harm_nothing() {
    let mut h = Host::ready(512);
    let blocks = (NS_BYTES / 512) as u32;
    h.ns_file().write_all_at(&[0xee; 512], 0).unwrap();
    let cases = [
        (
            rw(io::READ, u64::from(blocks), 1, DATA, 0),
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            rw(io::WRITE, u64::from(blocks) - 1, 2, DATA, 0),
            Status::LBA_OUT_OF_RANGE,
        ),
        (rw(io::READ, u64::MAX, 1, DATA, 0), Status::LBA_OUT_OF_RANGE),
        (
            rw(io::READ, 0, (MAX_TRANSFER / 512) as u32 + 1, DATA, 0),
            Status::INVALID_FIELD,
        ),
        (
            rw(io::WRITE, 0, 1, 0x7000_0000, 0),
            Status::DATA_TRANSFER_ERROR,
        ),
        (
            rw(io::READ, 0, 16, DATA, 0x7000_0000),
            Status::DATA_TRANSFER_ERROR,
        ),
        (rw(io::READ, 0, 1, DATA + 2, 0), Status::INVALID_PRP_OFFSET),
        (
            rw(io::READ, 0, 16, DATA, DATA + 0x1008),
            Status::INVALID_PRP_OFFSET,
        ),
        (
            rw(io::WRITE, 0, 1, u64::MAX - 4095, 0),
            Status::DATA_TRANSFER_ERROR,
        ),
    ];
    for (cmd, want) in cases {
        assert_eq!(h.submit(1, cmd).status, want, "{cmd:?}");
    }
    let mut c = rw(io::READ, 0, 1, DATA, 0);
    c.dw[1] = 0;
    assert_eq!(h.submit(1, c).status, Status::INVALID_NAMESPACE);
    c.dw[1] = 2;
    assert_eq!(h.submit(1, c).status, Status::INVALID_NAMESPACE);
    let mut c = rw(io::READ, 0, 1, DATA, 0);
    c.dw[12] |= 1 << 26; // protection information
    assert_eq!(h.submit(1, c).status, Status::INVALID_FIELD);
    // Nothing was written, and the queue still works.
    let mut first = [0u8; 512];
    h.ns_file().read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, [0xee; 512]);
    assert_eq!(
        h.submit(1, rw(io::READ, 0, 1, DATA, 0)).status,
        Status::SUCCESS
    );
}

#[test]
fn flush_write_zeroes_deallocate_and_compare() {
    let mut h = Host::ready(512);
    h.ns_file().write_all_at(&[0xab; 8192], 0).unwrap();
    let mut flush = Command::new(io::FLUSH, 0);
    flush.dw[1] = 1;
    assert_eq!(h.submit(1, flush).status, Status::SUCCESS);
    flush.dw[1] = 0xffff_ffff;
    assert_eq!(h.submit(1, flush).status, Status::SUCCESS);

    // Write Zeroes of blocks 0-1, then with DEAC of 2-3.
    let wz = rw(io::WRITE_ZEROES, 0, 2, 0, 0);
    assert_eq!(h.submit(1, wz).status, Status::SUCCESS);
    let mut wz = rw(io::WRITE_ZEROES, 2, 2, 0, 0);
    wz.dw[12] |= 1 << 25;
    assert_eq!(h.submit(1, wz).status, Status::SUCCESS);
    let mut got = vec![1u8; 2048];
    h.ns_file().read_exact_at(&mut got, 0).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(
        h.submit(1, rw(io::WRITE_ZEROES, NS_BYTES / 512, 1, 0, 0))
            .status,
        Status::LBA_OUT_OF_RANGE
    );

    // Dataset Management: deallocate blocks 8-15 (a range of 8 at SLBA 8).
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&8u32.to_le_bytes());
    range[8..16].copy_from_slice(&8u64.to_le_bytes());
    h.mem().write(DATA, &range).unwrap();
    let mut dsm = Command::new(io::DATASET_MANAGEMENT, 0).with_prp(DATA, 0);
    dsm.dw[1] = 1;
    dsm.dw[11] = 1 << 2;
    assert_eq!(h.submit(1, dsm).status, Status::SUCCESS);
    let mut got = vec![1u8; 4096];
    h.ns_file().read_exact_at(&mut got, 4096).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    range[8..16].copy_from_slice(&(NS_BYTES / 512 - 4).to_le_bytes());
    h.mem().write(DATA, &range).unwrap();
    assert_eq!(h.submit(1, dsm).status, Status::LBA_OUT_OF_RANGE);

    // Compare: equal, then different.
    h.ns_file().write_all_at(&[0x11; 512], 512 * 20).unwrap();
    h.mem().write(DATA, &[0x11; 512]).unwrap();
    assert_eq!(
        h.submit(1, rw(io::COMPARE, 20, 1, DATA, 0)).status,
        Status::SUCCESS
    );
    h.mem().write(DATA + 100, &[0x12]).unwrap();
    assert_eq!(
        h.submit(1, rw(io::COMPARE, 20, 1, DATA, 0)).status,
        Status::COMPARE_FAILURE
    );
}

#[test]
fn completion_queue_phase_wraps() {
    let mut h = Host::new(512);
    h.enable();
    h.create_queues(1, 4);
    for i in 0..11 {
        let c = h.submit(1, rw(io::READ, i, 1, DATA, 0));
        assert_eq!(c.status, Status::SUCCESS, "command {i}");
    }
    let q = h.queues[1].as_ref().unwrap();
    assert_eq!((q.head, q.phase), (3, true), "wrapped twice");
}

#[test]
fn features_and_log_pages() {
    let mut h = Host::ready(512);
    let get = |fid: u8, cdw11: u32| {
        let mut c = Command::new(admin::GET_FEATURES, 0);
        c.dw[10] = u32::from(fid);
        c.dw[11] = cdw11;
        c
    };
    let set = |fid: u8, v: u32| {
        let mut c = Command::new(admin::SET_FEATURES, 0);
        c.dw[10] = u32::from(fid);
        c.dw[11] = v;
        c
    };
    let c = h.admin(set(feature::NUMBER_OF_QUEUES, 0x0010_0010));
    assert_eq!((c.status, c.dw0), (Status::SUCCESS, 0x0001_0001));
    assert_eq!(
        h.admin(set(feature::NUMBER_OF_QUEUES, 0xffff)).status,
        Status::INVALID_FIELD
    );
    assert_eq!(
        h.admin(set(feature::INTERRUPT_COALESCING, 0x0a03)).status,
        Status::SUCCESS
    );
    assert_eq!(h.admin(get(feature::INTERRUPT_COALESCING, 0)).dw0, 0x0a03);
    assert_eq!(h.admin(get(feature::VOLATILE_WRITE_CACHE, 0)).dw0, 1);
    assert_eq!(
        h.admin(set(feature::VOLATILE_WRITE_CACHE, 0)).status,
        Status::SUCCESS
    );
    assert_eq!(h.admin(get(feature::VOLATILE_WRITE_CACHE, 0)).dw0, 0);
    assert_eq!(
        h.admin(set(feature::ASYNC_EVENT_CONFIG, 0x100)).status,
        Status::SUCCESS
    );
    assert_eq!(h.admin(get(feature::ASYNC_EVENT_CONFIG, 0)).dw0, 0x100);
    assert_eq!(h.admin(get(0x77, 0)).status, Status::INVALID_FIELD);
    assert_eq!(h.admin(set(0x77, 0)).status, Status::INVALID_FIELD);
    assert_eq!(
        h.admin(get(feature::INTERRUPT_VECTOR_CONFIG, 99)).status,
        Status::INVALID_FIELD
    );
    // With the write cache off, writes still complete (made durable first).
    assert_eq!(
        h.submit(1, rw(io::WRITE, 0, 1, DATA, 0)).status,
        Status::SUCCESS
    );

    let log_page = |lid: u8, dwords: u32, offset: u64| {
        let mut c = Command::new(admin::GET_LOG_PAGE, 0).with_prp(DATA, 0);
        c.dw[1] = 0xffff_ffff;
        c.dw[10] = u32::from(lid) | ((dwords - 1) << 16);
        c.dw[12] = offset as u32;
        c
    };
    assert_eq!(
        h.admin(log_page(log::SMART_HEALTH, 128, 0)).status,
        Status::SUCCESS
    );
    let mut smart = vec![0u8; 512];
    h.mem().read(DATA, &mut smart).unwrap();
    assert_eq!(smart[3], 100, "available spare");
    assert!(
        u64::from_le_bytes(smart[80..88].try_into().unwrap()) >= 1,
        "host writes"
    );
    assert_eq!(
        h.admin(log_page(log::ERROR_INFORMATION, 16, 0)).status,
        Status::SUCCESS
    );
    assert_eq!(
        h.admin(log_page(log::FIRMWARE_SLOT, 128, 0)).status,
        Status::SUCCESS
    );
    assert_eq!(
        h.admin(log_page(0x55, 16, 0)).status,
        Status::INVALID_LOG_PAGE
    );
    assert_eq!(
        h.admin(log_page(log::SMART_HEALTH, 16, 4096)).status,
        Status::INVALID_FIELD
    );
    assert_eq!(
        h.admin(log_page(log::SMART_HEALTH, 16, 0).with_prp(0x7000_0000, 0))
            .status,
        Status::DATA_TRANSFER_ERROR
    );
    // Abort: never aborted, but answered.
    let c = h.admin(Command::new(admin::ABORT, 0));
    assert_eq!((c.status, c.dw0 & 1), (Status::SUCCESS, 1));
    // SGLs are refused for admin commands.
    let mut c = identify(1, 0);
    c.dw[0] |= 1 << 14;
    assert_eq!(h.admin(c).status, Status::INVALID_FIELD);
}

#[test]
fn async_event_requests_wait_and_are_limited() {
    let mut h = Host::ready(512);
    for _ in 0..crate::spec::AER_LIMIT {
        h.push(0, Command::new(admin::ASYNC_EVENT_REQUEST, 0));
    }
    let cid = h.push(0, Command::new(admin::ASYNC_EVENT_REQUEST, 0));
    h.ring(0);
    let c = h.reap(0);
    assert_eq!((c.cid, c.status), (cid, Status::AER_LIMIT_EXCEEDED));
    // An event completes one of the outstanding requests.
    assert!(h.ctrl.post_async_event(0x0001_0002));
    let c = h.reap(0);
    assert_eq!((c.status, c.dw0), (Status::SUCCESS, 0x0001_0002));
}

#[test]
fn shadow_doorbells_carry_submissions_and_event_indexes() {
    let mut h = Host::ready(512);
    let mut bad = Command::new(admin::DOORBELL_BUFFER_CONFIG, 0).with_prp(SHADOW + 8, EVENTS);
    assert_eq!(h.admin(bad).status, Status::INVALID_FIELD, "unaligned");
    bad = bad.with_prp(0x7000_0000, EVENTS);
    assert_eq!(h.admin(bad).status, Status::INVALID_FIELD, "unmapped");
    let dbbc = Command::new(admin::DOORBELL_BUFFER_CONFIG, 0).with_prp(SHADOW, EVENTS);
    assert_eq!(h.admin(dbbc).status, Status::SUCCESS);
    h.shadow = true;
    // Submit through the shadow doorbell only: the worker was woken by the
    // config and must notice the new tail on its own recheck, or from one
    // register write.
    let data = pattern(9, 4096);
    h.mem().write(DATA, &data).unwrap();
    let cid = h.push(1, rw(io::WRITE, 0, 8, DATA, DATA + 0x1000));
    h.ring(1);
    let c = h.reap(1);
    assert_eq!((c.cid, c.status), (cid, Status::SUCCESS));
    for i in 0..40 {
        assert_eq!(
            h.submit(1, rw(io::READ, i, 1, DATA, 0)).status,
            Status::SUCCESS
        );
    }
    // The worker publishes the tail it has seen as its event index.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tail = h.queues[1].as_ref().unwrap().tail;
    while h.mem().read_u32(EVENTS + 8).unwrap() != tail {
        assert!(Instant::now() < deadline, "event index not published");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn reset_under_load_drains_and_the_controller_comes_back() {
    let mut h = Host::ready(512);
    h.mem().write(DATA, &pattern(3, 4096)).unwrap();
    for i in 0..31 {
        h.push(1, rw(io::WRITE, i * 8, 8, DATA, 0).with_prp(DATA, 0));
    }
    h.ring(1);
    h.disable();
    assert_eq!(h.ctrl.csts(), 0);
    h.enable();
    h.create_queues(1, 32);
    h.create_queues(2, 8);
    assert_eq!(
        h.submit(2, rw(io::READ, 0, 1, DATA, 0)).status,
        Status::SUCCESS
    );
    assert_eq!(
        h.submit(1, rw(io::READ, 0, 1, DATA, 0)).status,
        Status::SUCCESS
    );
}

#[test]
fn shutdown_reports_completion() {
    let mut h = Host::ready(512);
    assert_eq!(
        h.submit(1, rw(io::WRITE, 0, 1, DATA, 0)).status,
        Status::SUCCESS
    );
    h.write32(reg::CC, 1 | (6 << 16) | (4 << 20) | (1 << 14));
    h.wait_csts(0xc, CSTS_SHST_COMPLETE);
    h.disable();
    h.enable();
    assert_eq!(h.admin(identify(1, 0)).status, Status::SUCCESS);
}

#[test]
fn dma_unmapped_under_the_controller_fails_commands_not_the_process() {
    let mut h = Host::ready(512);
    h.ctrl.dma_map(DmaRegion::heap(0x4000_0000, 4096));
    let c = h.submit(1, rw(io::WRITE, 0, 1, 0x4000_0000, 0));
    assert_eq!(c.status, Status::SUCCESS);
    h.ctrl.dma_unmap(0x4000_0000, 4096);
    let c = h.submit(1, rw(io::WRITE, 0, 1, 0x4000_0000, 0));
    assert_eq!(c.status, Status::DATA_TRANSFER_ERROR);
}

#[test]
fn middle_faults_fail_delay_and_stall_commands() {
    // I/O errors on the first MiB, a 20 ms latency on the second.
    let mut h = Host::ready_with_faults(
        512,
        &[
            "kind=io_error,range=0-1M",
            "kind=latency,fixed_ms=20,range=1M-2M",
        ],
    );
    assert_eq!(
        h.submit(1, rw(io::READ, 0, 1, DATA, 0)).status,
        Status::UNRECOVERED_READ_ERROR
    );
    assert_eq!(
        h.submit(1, rw(io::WRITE, 8, 1, DATA, 0)).status,
        Status::WRITE_FAULT
    );
    let mib = (1 << 20) / 512;
    assert_eq!(
        h.submit(1, rw(io::READ, mib, 1, DATA, 0)).status,
        Status::SUCCESS
    );
    assert_eq!(
        h.submit(1, rw(io::READ, 3 * mib, 1, DATA, 0)).status,
        Status::SUCCESS
    );

    // A stall holds a command until it is cleared; others go by.
    let mut h = Host::ready_with_faults(512, &["kind=stall,range=0-4K"]);
    let stalled = h.push(1, rw(io::READ, 0, 1, DATA, 0));
    h.ring(1);
    let other = h.submit(1, rw(io::READ, 100, 1, DATA + 0x1000, 0));
    assert_eq!(other.status, Status::SUCCESS);
    let ns = h.ctrl.namespace(1).unwrap();
    ns.middle.clear_faults();
    let c = h.reap(1);
    assert_eq!((c.cid, c.status), (stalled, Status::SUCCESS));
}

#[test]
fn interrupt_coalescing_batches_interrupts() {
    let mut h = Host::ready(512);
    // Aggregation threshold 8 entries (0's based 7), time 25.5 ms.
    let mut set = Command::new(admin::SET_FEATURES, 0);
    set.dw[10] = u32::from(feature::INTERRUPT_COALESCING);
    set.dw[11] = 7 | (255 << 8);
    assert_eq!(h.admin(set).status, Status::SUCCESS);
    let before = h.ctrl.irqs.fired(1);
    for i in 0..8 {
        h.push(1, rw(io::READ, i, 1, DATA, 0));
    }
    h.ring(1);
    for _ in 0..8 {
        assert_eq!(h.reap(1).status, Status::SUCCESS);
    }
    // Eight completions, but not one interrupt each (the threshold or the
    // timer fire; a slow machine may split them into two batches).
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.ctrl.irqs.fired(1) == before {
        assert!(Instant::now() < deadline, "no interrupt at all");
        std::thread::sleep(Duration::from_millis(1));
    }
    let fired = h.ctrl.irqs.fired(1) - before;
    assert!(fired < 8, "{fired} interrupts for 8 completions");

    // Coalescing disabled for the vector: a single completion is signalled
    // at once, not after the aggregation time.
    let mut iv = Command::new(admin::SET_FEATURES, 0);
    iv.dw[10] = u32::from(feature::INTERRUPT_VECTOR_CONFIG);
    iv.dw[11] = 1 | (1 << 16);
    assert_eq!(h.admin(iv).status, Status::SUCCESS);
    let before = h.ctrl.irqs.fired(1);
    assert_eq!(
        h.submit(1, rw(io::READ, 0, 1, DATA, 0)).status,
        Status::SUCCESS
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.ctrl.irqs.fired(1) == before {
        assert!(Instant::now() < deadline, "no interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The admin vector cannot coalesce.
    iv.dw[11] = 0;
    assert_eq!(h.admin(iv).status, Status::INVALID_FIELD);
}

#[test]
fn polling_workers_serve_shadow_and_register_doorbells() {
    let mut h = Host::build(512, &[], Duration::from_micros(200), false);
    h.enable();
    h.create_queues(1, 16);
    for i in 0..20 {
        assert_eq!(
            h.submit(1, rw(io::READ, i, 1, DATA, 0)).status,
            Status::SUCCESS
        );
    }
    let dbbc = Command::new(admin::DOORBELL_BUFFER_CONFIG, 0).with_prp(SHADOW, EVENTS);
    assert_eq!(h.admin(dbbc).status, Status::SUCCESS);
    h.shadow = true;
    for i in 0..20 {
        assert_eq!(
            h.submit(1, rw(io::WRITE, i, 1, DATA, 0)).status,
            Status::SUCCESS
        );
    }
    h.disable();
}

#[test]
fn direct_io_bounces_buffers_the_host_did_not_align() {
    let mut h = Host::build(512, &[], Duration::ZERO, true);
    h.enable();
    h.create_queues(1, 16);
    // A dword-aligned buffer, as Linux's nvme driver allows, then an aligned one.
    for (at, seed) in [(DATA + 4, 5u8), (DATA + 0x2000, 6)] {
        let data = pattern(seed, 4096);
        h.mem().write(at, &data).unwrap();
        let next_page = (at & !0xfff) + 0x1000;
        let c = h.submit(1, rw(io::WRITE, 16, 8, at, next_page));
        assert_eq!(c.status, Status::SUCCESS);
        let mut on_file = vec![0u8; 4096];
        h.ns_file().read_exact_at(&mut on_file, 16 * 512).unwrap();
        assert_eq!(on_file, data);
        let out = DATA + 0x10_0000 + (at & 0xfff);
        let c = h.submit(1, rw(io::READ, 16, 8, out, (out & !0xfff) + 0x1000));
        assert_eq!(c.status, Status::SUCCESS);
        let mut back = vec![0u8; 4096];
        h.mem().read(out, &mut back).unwrap();
        assert_eq!(back, data);
        let c = h.submit(1, rw(io::COMPARE, 16, 8, at, next_page));
        assert_eq!(c.status, Status::SUCCESS);
    }
}

#[test]
fn write_zeroes_works_where_the_filesystem_cannot_zero_ranges() {
    // tmpfs has no FALLOC_FL_ZERO_RANGE: the card punches a hole instead.
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let mut h = Host::build_in(shm, 512, &[], Duration::ZERO, false);
    h.enable();
    h.create_queues(1, 16);
    for round in 0..2 {
        h.ns_file().write_all_at(&[0xcd; 8192], 0).unwrap();
        assert_eq!(
            h.submit(1, rw(io::WRITE_ZEROES, 0, 16, 0, 0)).status,
            Status::SUCCESS,
            "round {round}"
        );
        let mut got = vec![1u8; 8192];
        h.ns_file().read_exact_at(&mut got, 0).unwrap();
        assert!(got.iter().all(|&b| b == 0), "round {round}");
    }
}

#[test]
fn the_flash_latency_model_delays_but_completes_everything() {
    let mut h = Host::ready_with_faults(512, &["flash"]);
    let data = pattern(4, 4096);
    h.mem().write(DATA, &data).unwrap();
    for i in 0..16 {
        h.push(1, rw(io::WRITE, i * 8, 8, DATA, DATA + 0x1000));
    }
    h.ring(1);
    let mut seen = 0;
    for _ in 0..16 {
        assert_eq!(h.reap(1).status, Status::SUCCESS);
        seen += 1;
    }
    assert_eq!(seen, 16);
    let mut on_file = vec![0u8; 4096];
    h.ns_file()
        .read_exact_at(&mut on_file, 15 * 8 * 512)
        .unwrap();
    assert_eq!(on_file, data);
}
