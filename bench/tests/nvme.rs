//! Conformance of the local-NVMe card (`nvme-emulator`) as seen through the
//! userspace NVMe driver: register reset values, Identify, queue management
//! errors, phase-tag wrap, every I/O command and error status, data
//! integrity across a controller reset under load, several queues at once,
//! and `cardbench nvme` end to end.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardbench::nvme::dma::{DmaBuf, IOVA_BASE};
use cardbench::nvme::driver::{check, DataPointer};
use cardbench::nvme::spec::{admin, cns, feature, io, reg, status, Command, Completion, PAGE};
use cardbench::nvme::{Controller, DriverConfig, DriverError, IoQueue};
use cardbench::pattern;

const TIMEOUT: Duration = Duration::from_secs(20);
const MODEL: &str = "cardsim NVMe Instance Storage";

fn bin_dir() -> PathBuf {
    std::env::var_os("CARDSIM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // The card is built into the same target directory as cardbench.
            Path::new(env!("CARGO_BIN_EXE_cardbench"))
                .parent()
                .expect("cardbench has a directory")
                .to_owned()
        })
}

fn card_bin() -> PathBuf {
    let p = bin_dir().join("nvme-emulator");
    assert!(
        p.exists(),
        "{} missing: cargo build -p nvme-emulator --bins (or set CARDSIM_BIN_DIR)",
        p.display()
    );
    p
}

/// A running card on namespace files in a scratch directory; killed on drop.
struct Card {
    child: Child,
    socket: PathBuf,
    namespaces: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct CardSpec<'a> {
    /// (size, lba size) per namespace.
    namespaces: &'a [(u64, u32)],
    io_queues: u16,
    serial: Option<&'a str>,
}

impl Default for CardSpec<'_> {
    fn default() -> Self {
        Self {
            namespaces: &[(16 << 20, 512)],
            io_queues: 4,
            serial: Some("CARDSIM-TEST-0001"),
        }
    }
}

fn scratch() -> tempfile::TempDir {
    // tmpfs when there is one: the files are RAM and tests stay fast.
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

fn start(spec: CardSpec<'_>) -> Card {
    let dir = scratch();
    let socket = dir.path().join("nvme.sock");
    let mut cmd = Process::new(card_bin());
    cmd.arg("--socket").arg(&socket);
    let mut namespaces = Vec::new();
    for (i, &(size, lba)) in spec.namespaces.iter().enumerate() {
        let f = dir.path().join(format!("ns{}.img", i + 1));
        std::fs::File::create(&f).unwrap().set_len(size).unwrap();
        cmd.arg("--namespace")
            .arg(format!("{},lba={lba}", f.display()));
        namespaces.push(f);
    }
    cmd.arg("--io-queues").arg(spec.io_queues.to_string());
    if let Some(s) = spec.serial {
        cmd.arg("--serial").arg(s);
    }
    let child = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut card = Card {
        child,
        socket,
        namespaces,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !card.socket.exists() {
        assert!(
            card.child.try_wait().unwrap().is_none(),
            "nvme-emulator exited early"
        );
        assert!(Instant::now() < deadline, "no socket from nvme-emulator");
        std::thread::sleep(Duration::from_millis(10));
    }
    card
}

fn config(card: &Card) -> DriverConfig {
    let mut c = DriverConfig::new(&card.socket);
    c.mem_size = 32 << 20;
    c.timeout = TIMEOUT;
    c
}

fn attach(card: &Card) -> Controller {
    Controller::attach(config(card)).expect("attach")
}

fn buf(ctrl: &Controller, len: u64) -> DmaBuf {
    ctrl.memory().alloc(len).expect("DMA memory")
}

fn status_of(c: &Completion) -> (u8, u8) {
    c.status.code()
}

fn io_cmd(q: &mut IoQueue, cmd: Command) -> Completion {
    q.execute(cmd, TIMEOUT).expect("the command completes")
}

#[test]
fn register_reset_values() {
    let card = start(CardSpec::default());
    let ctrl = Controller::connect(config(&card)).expect("connect");
    let cap = ctrl.cap();
    assert!(cap.mqes() >= 2, "CAP.MQES {}", cap.mqes());
    assert!(cap.cqr(), "the card requires contiguous queues");
    assert!(cap.css_nvm(), "CAP.CSS has the NVM command set");
    assert!(cap.timeout_500ms() > 0, "CAP.TO must be non-zero");
    assert_eq!(cap.mpsmin(), 0, "4 KiB pages");
    assert_eq!(ctrl.read_reg32(reg::VS).unwrap(), 0x0001_0400, "VS 1.4");
    assert_eq!(ctrl.read_reg32(reg::CC).unwrap(), 0, "CC resets to 0");
    assert_eq!(ctrl.read_reg32(reg::CSTS).unwrap() & 1, 0, "CSTS.RDY 0");
    assert_eq!(ctrl.read_reg32(reg::AQA).unwrap(), 0);
    assert_eq!(ctrl.read_reg64(reg::ASQ).unwrap(), 0);
    assert_eq!(ctrl.read_reg64(reg::ACQ).unwrap(), 0);
    // A 64-bit read of CAP in one access agrees with the two halves.
    let mut b = [0u8; 8];
    ctrl.with_client(|c| c.region_read(0, reg::CAP, &mut b))
        .unwrap();
    assert_eq!(u64::from_le_bytes(b), ctrl.read_reg64(reg::CAP).unwrap());

    let mut ctrl = ctrl;
    ctrl.init().expect("enable");
    let csts = ctrl.read_reg32(reg::CSTS).unwrap();
    assert_eq!(csts & 0b11, 1, "RDY 1, CFS 0 after enabling");
    let cc = ctrl.read_reg32(reg::CC).unwrap();
    assert_eq!(cc & 1, 1);
    // Disabling returns CSTS.RDY to 0 and keeps the admin queue registers.
    ctrl.write_reg32(reg::CC, cc & !1).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while ctrl.read_reg32(reg::CSTS).unwrap() & 1 != 0 {
        assert!(Instant::now() < deadline, "RDY stuck at 1 after CC.EN=0");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_ne!(ctrl.read_reg64(reg::ASQ).unwrap(), 0);
}

#[test]
fn identify_fields() {
    let card = start(CardSpec {
        namespaces: &[(16 << 20, 512), (8 << 20, 4096)],
        io_queues: 3,
        serial: Some("SN-IDENTIFY-42"),
    });
    let ctrl = attach(&card);
    let info = ctrl.info();
    assert_eq!(info.model, MODEL);
    assert_eq!(info.serial, "SN-IDENTIFY-42");
    assert!(!info.firmware.is_empty(), "a firmware revision");
    assert_eq!(info.version, 0x0001_0400);
    assert_eq!(info.nn, 2, "two namespaces");
    assert_eq!(info.sqes, 0x66, "SQ entries are 64 bytes");
    assert_eq!(info.cqes, 0x44, "CQ entries are 16 bytes");
    assert!(
        info.supports_doorbell_buffer(),
        "OACS advertises Doorbell Buffer Config"
    );
    assert_eq!(info.oncs & 0b1101, 0b1101, "Compare, DSM and Write Zeroes");
    assert_eq!(
        ctrl.granted_io_queues(),
        3,
        "Number of Queues grants --io-queues"
    );

    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1, 2]);
    let ns1 = ctrl.identify_namespace(1).unwrap();
    assert_eq!(ns1.lba_size, 512);
    assert_eq!(ns1.nsze, (16 << 20) / 512);
    assert_eq!(ns1.ncap, ns1.nsze);
    let ns2 = ctrl.identify_namespace(2).unwrap();
    assert_eq!(ns2.lba_size, 4096);
    assert_eq!(ns2.nsze, (8 << 20) / 4096);

    // Namespace identification descriptors: a list of (type, length, id).
    let page = ctrl.identify(cns::NAMESPACE_DESCRIPTORS, 1).unwrap();
    let (nidt, nidl) = (page[0], page[1]);
    let expected_len = match nidt {
        1 => 8,
        2 | 3 => 16,
        other => panic!("descriptor type {other}"),
    };
    assert_eq!(nidl, expected_len);
    assert!(page[4..4 + usize::from(nidl)].iter().any(|&b| b != 0));
    let page2 = ctrl.identify(cns::NAMESPACE_DESCRIPTORS, 2).unwrap();
    assert_ne!(
        page[..4 + usize::from(nidl)],
        page2[..4 + usize::from(nidl)],
        "namespaces have distinct identifiers"
    );

    // A namespace that does not exist.
    let e = ctrl.identify_namespace(3).unwrap_err();
    assert_eq!(
        e.status().map(|s| s.code()),
        Some((status::SCT_GENERIC, status::INVALID_NAMESPACE)),
        "{e}"
    );
}

#[test]
fn queue_creation_and_deletion_errors() {
    let card = start(CardSpec {
        io_queues: 2,
        ..CardSpec::default()
    });
    let ctrl = attach(&card);
    let mem = buf(&ctrl, 64 * 64);
    let cq_mem = buf(&ctrl, 16 * 64);
    let specific = |c: Completion| (c.status.sct, c.status.sc);
    let qid_err = (status::SCT_COMMAND_SPECIFIC, status::INVALID_QUEUE_ID);
    let size_err = (status::SCT_COMMAND_SPECIFIC, status::INVALID_QUEUE_SIZE);

    // Queue 0 is the admin queue; 3 is past the granted two.
    assert_eq!(
        specific(ctrl.create_cq_raw(0, 16, cq_mem.iova(), None).unwrap()),
        qid_err
    );
    assert_eq!(
        specific(ctrl.create_cq_raw(3, 16, cq_mem.iova(), None).unwrap()),
        qid_err
    );
    // One entry (size field 0) and more than CAP.MQES.
    assert_eq!(
        specific(ctrl.create_cq_raw(1, 1, cq_mem.iova(), None).unwrap()),
        size_err
    );
    let too_big = u16::try_from(ctrl.cap().mqes() + 1).unwrap_or(u16::MAX);
    if u32::from(too_big) > ctrl.cap().mqes() {
        assert_eq!(
            specific(ctrl.create_cq_raw(1, too_big, cq_mem.iova(), None).unwrap()),
            size_err
        );
    }
    // A vector the card has not got.
    assert_eq!(
        specific(
            ctrl.create_cq_raw(1, 16, cq_mem.iova(), Some(2000))
                .unwrap()
        ),
        (
            status::SCT_COMMAND_SPECIFIC,
            status::INVALID_INTERRUPT_VECTOR
        )
    );
    // An SQ on a CQ that does not exist.
    assert_eq!(
        specific(ctrl.create_sq_raw(1, 16, mem.iova(), 1).unwrap()),
        (status::SCT_COMMAND_SPECIFIC, status::CQ_INVALID)
    );
    // Deleting queues that do not exist.
    assert_eq!(
        specific(ctrl.delete_queue_raw(admin::DELETE_SQ, 1).unwrap()),
        qid_err
    );
    assert_eq!(
        specific(ctrl.delete_queue_raw(admin::DELETE_CQ, 2).unwrap()),
        qid_err
    );
    assert_eq!(
        specific(ctrl.delete_queue_raw(admin::DELETE_SQ, 0).unwrap()),
        qid_err
    );

    // A good pair; then the same ids again, and the CQ while its SQ lives.
    let q = ctrl.create_io_queue(1, 16).unwrap();
    assert_eq!(
        specific(ctrl.create_cq_raw(1, 16, cq_mem.iova(), None).unwrap()),
        qid_err
    );
    assert_eq!(
        specific(ctrl.create_sq_raw(1, 16, mem.iova(), 1).unwrap()),
        qid_err
    );
    assert_eq!(
        specific(ctrl.delete_queue_raw(admin::DELETE_CQ, 1).unwrap()),
        (status::SCT_COMMAND_SPECIFIC, status::INVALID_QUEUE_DELETION)
    );
    ctrl.delete_io_queue(q).unwrap();
    // After deletion the ids are free again and work.
    let mut q = ctrl.create_io_queue(1, 16).unwrap();
    let ns = ctrl.identify_namespace(1).unwrap();
    let b = buf(&ctrl, 4096);
    q.read(&ns, 0, 8, &b).unwrap();
}

#[test]
fn phase_tag_wraps() {
    let card = start(CardSpec::default());
    let ctrl = attach(&card);
    let ns = ctrl.identify_namespace(1).unwrap();
    // Depth 4 holds 3 commands: 200 commands wrap the rings ~66 times,
    // flipping the phase tag each time.
    let mut q = ctrl.create_io_queue(1, 4).unwrap();
    let bufs: Vec<DmaBuf> = (0..3).map(|_| buf(&ctrl, 4096)).collect();
    let mut done = Vec::new();
    let mut generation = 0;
    for round in 0..67u64 {
        for (i, b) in bufs.iter().enumerate() {
            generation += 1;
            let lba = (round * 3 + i as u64) * 8 % ns.nsze;
            pattern::fill(&mut b.bytes_mut()[..4096], lba, generation);
            let mut cmd = Command::rw(io::WRITE, 1, lba, 8);
            q.set_data(&mut cmd, b, 4096, DataPointer::Prp).unwrap();
            q.push(cmd).unwrap();
        }
        assert!(
            matches!(q.push(Command::new(io::FLUSH)), Err(DriverError::QueueFull)),
            "a depth-4 queue holds three"
        );
        q.flush().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        done.clear();
        while done.len() < 3 {
            q.reap(&mut done).unwrap();
            assert!(
                Instant::now() < deadline,
                "round {round}: {} of 3",
                done.len()
            );
            if done.len() < 3 {
                q.wait(Duration::from_millis(100)).unwrap();
            }
        }
        for c in &done {
            assert!(c.status.is_success(), "round {round}: {}", c.status);
        }
    }
    // The last round's data is on the namespace file.
    let f = std::fs::File::open(&card.namespaces[0]).unwrap();
    let mut found = vec![0u8; 4096];
    let lba = (66 * 3 + 2) * 8 % ns.nsze;
    f.read_exact_at(&mut found, lba * 512).unwrap();
    let mut expected = vec![0u8; 4096];
    pattern::fill(&mut expected, lba, generation);
    assert!(found == expected, "the last write reached the file");
}

#[test]
fn every_io_command() {
    let card = start(CardSpec::default());
    let ctrl = attach(&card);
    let ns = ctrl.identify_namespace(1).unwrap();
    let mut q = ctrl.create_io_queue(1, 32).unwrap();
    // Completions arrive as MSI-X interrupts on the queue's eventfd.
    assert!(!q.is_polled(), "queue 1 has an interrupt vector");
    let cid = q
        .submit(Command {
            nsid: 1,
            ..Command::new(io::FLUSH)
        })
        .unwrap();
    assert!(
        q.wait(TIMEOUT).unwrap(),
        "the completion raised the interrupt"
    );
    let mut done = Vec::new();
    q.reap(&mut done).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].cid, cid);
    assert!(done[0].status.is_success());
    let file = std::fs::File::open(&card.namespaces[0]).unwrap();
    let on_file = |off: u64, len: usize| {
        let mut v = vec![0u8; len];
        file.read_exact_at(&mut v, off).unwrap();
        v
    };

    // Write with each kind of data pointer, read back with another.
    let kinds = [
        (4096u64, DataPointer::Prp, "one PRP"),
        (8192, DataPointer::Prp, "PRP1 + PRP2"),
        (128 << 10, DataPointer::Prp, "a PRP list"),
        (16 << 10, DataPointer::SglBlock, "one SGL data block"),
        (
            64 << 10,
            DataPointer::SglList,
            "an SGL segment of data blocks",
        ),
        (32 << 10, DataPointer::SglChain, "two chained SGL segments"),
    ];
    let mut lba = 0u64;
    for (gen, &(len, how, what)) in kinds.iter().enumerate() {
        let nlb = (len / ns.lba_size) as u16;
        let w = buf(&ctrl, len);
        pattern::fill(w.bytes_mut(), lba, gen as u64 + 1);
        q.data_command(Command::rw(io::WRITE, 1, lba, nlb), &w, len, how)
            .unwrap_or_else(|e| panic!("write with {what}: {e}"));
        assert!(
            on_file(lba * 512, len as usize) == w.bytes()[..len as usize],
            "write with {what} reached the file"
        );
        let r = buf(&ctrl, len);
        r.fill(0xa5);
        let back = if how == DataPointer::Prp {
            DataPointer::SglList
        } else {
            DataPointer::Prp
        };
        q.data_command(Command::rw(io::READ, 1, lba, nlb), &r, len, back)
            .unwrap_or_else(|e| panic!("read back {what}: {e}"));
        assert!(r.bytes() == w.bytes(), "read back of {what}");
        // Compare: equal data succeeds, one flipped byte fails.
        q.compare(&ns, lba, nlb, &w).unwrap();
        r.bytes_mut()[100] ^= 1;
        let e = q.compare(&ns, lba, nlb, &r).unwrap_err();
        assert_eq!(
            e.status().map(|s| s.code()),
            Some((status::SCT_MEDIA, status::COMPARE_FAILURE)),
            "{e}"
        );
        lba += u64::from(nlb);
    }

    // Flush (with the namespace and with all namespaces).
    q.flush_cache(1).unwrap();
    q.flush_cache(0xffff_ffff).unwrap();

    // Write Zeroes over the first 8 blocks.
    q.write_zeroes(&ns, 0, 8).unwrap();
    let r = buf(&ctrl, 4096);
    r.fill(0xa5);
    q.read(&ns, 0, 8, &r).unwrap();
    assert!(
        r.bytes().iter().all(|&b| b == 0),
        "Write Zeroes reads as zeros"
    );
    assert!(on_file(0, 4096).iter().all(|&b| b == 0));

    // Dataset Management (deallocate) on two ranges; DLFEAT says reads of
    // deallocated blocks return zeros.
    let dlfeat = ns.raw[33] & 0b111;
    q.deallocate(1, &[(8, 8), (32, 16)]).unwrap();
    if dlfeat == 1 {
        for (slba, nlb) in [(8u64, 8u16), (32, 16)] {
            let r = buf(&ctrl, u64::from(nlb) * 512);
            r.fill(0xa5);
            q.read(&ns, slba, nlb, &r).unwrap();
            assert!(
                r.bytes().iter().all(|&b| b == 0),
                "deallocated {slba}+{nlb} reads as zeros"
            );
        }
    }
    // Blocks next to the deallocated ones kept their data.
    let r = buf(&ctrl, 4096);
    q.read(&ns, 16, 8, &r).unwrap();
    let mut expected = vec![0u8; 8192];
    pattern::fill(&mut expected, 8, 2);
    assert!(
        r.bytes()[..4096] == expected[4096..],
        "DSM touched only its ranges"
    );
}

#[test]
fn every_error_status() {
    let card = start(CardSpec::default());
    let ctrl = attach(&card);
    let ns = ctrl.identify_namespace(1).unwrap();
    let mut q = ctrl.create_io_queue(1, 16).unwrap();
    let b = buf(&ctrl, 8192);
    let generic = |s| (status::SCT_GENERIC, s);

    // Invalid opcodes, admin and I/O.
    let c = ctrl.admin_raw(Command::new(0x3f)).unwrap();
    assert_eq!(status_of(&c), generic(status::INVALID_OPCODE));
    assert!(c.status.dnr, "do not retry");
    let mut cmd = Command::new(0x7e);
    cmd.nsid = 1;
    let bad = io_cmd(&mut q, cmd);
    assert_eq!(status_of(&bad), generic(status::INVALID_OPCODE));
    // The Error Information log's newest entry names that command.
    let log = Command {
        nsid: 0xffff_ffff,
        cdw10: 1 | 15 << 16,
        ..Command::new(admin::GET_LOG_PAGE)
    };
    let (c, page) = ctrl.admin_data(log, 64, None).unwrap();
    check(c, || "Get Log Page (error information)".into()).unwrap();
    let le16 = |o: usize| u16::from_le_bytes([page[o], page[o + 1]]);
    assert_ne!(page[0..8], [0u8; 8], "error count");
    assert_eq!(le16(8), 1, "SQ id");
    assert_eq!(le16(10), bad.cid, "command id");
    assert_eq!(
        (le16(12) >> 1) & 0x7ff,
        u16::from(status::INVALID_OPCODE),
        "status field"
    );

    // Invalid fields: an unknown Identify CNS, an unknown feature, a
    // Doorbell Buffer Config without aligned pages.
    let (c, _) = ctrl
        .admin_data(
            Command {
                cdw10: 0xee,
                ..Command::new(admin::IDENTIFY)
            },
            PAGE,
            None,
        )
        .unwrap();
    assert_eq!(status_of(&c), generic(status::INVALID_FIELD));
    let c = ctrl
        .admin_raw(Command {
            cdw10: 0x7f,
            ..Command::new(admin::GET_FEATURES)
        })
        .unwrap();
    assert_eq!(status_of(&c), generic(status::INVALID_FIELD));
    let c = ctrl
        .admin_raw(Command {
            dptr: [IOVA_BASE + 12, IOVA_BASE + PAGE],
            ..Command::new(admin::DOORBELL_BUFFER_CONFIG)
        })
        .unwrap();
    assert_eq!(status_of(&c), generic(status::INVALID_FIELD));

    // LBA out of range: starting past the end, and running over it.
    let mut cmd = Command::rw(io::READ, 1, ns.nsze, 1);
    q.set_data(&mut cmd, &b, 512, DataPointer::Prp).unwrap();
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::LBA_OUT_OF_RANGE)
    );
    let mut cmd = Command::rw(io::WRITE, 1, ns.nsze - 4, 8);
    q.set_data(&mut cmd, &b, 4096, DataPointer::Prp).unwrap();
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::LBA_OUT_OF_RANGE)
    );
    assert_eq!(
        status_of(&io_cmd(
            &mut q,
            Command::rw(io::WRITE_ZEROES, 1, ns.nsze - 1, 2)
        )),
        generic(status::LBA_OUT_OF_RANGE)
    );

    // A namespace that does not exist.
    let mut cmd = Command::rw(io::READ, 7, 0, 1);
    q.set_data(&mut cmd, &b, 512, DataPointer::Prp).unwrap();
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::INVALID_NAMESPACE)
    );

    // PRPs outside the mapped memory: PRP1, PRP2, and an entry of a list.
    let mut cmd = Command::rw(io::READ, 1, 0, 8);
    cmd.dptr = [0x1000, 0];
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::DATA_TRANSFER_ERROR)
    );
    let mut cmd = Command::rw(io::WRITE, 1, 0, 16);
    cmd.dptr = [b.iova(), 0x2000];
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::DATA_TRANSFER_ERROR)
    );
    let list = buf(&ctrl, PAGE);
    list.write_at(0, &(b.iova() + PAGE).to_le_bytes());
    list.write_at(8, &0x3000u64.to_le_bytes());
    let mut cmd = Command::rw(io::READ, 1, 0, 24);
    cmd.dptr = [b.iova(), list.iova()];
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::DATA_TRANSFER_ERROR)
    );
    // A PRP list pointer past the end of the mapping.
    let mut cmd = Command::rw(io::READ, 1, 0, 24);
    cmd.dptr = [b.iova(), IOVA_BASE + ctrl.memory().len()];
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::DATA_TRANSFER_ERROR)
    );
    // An SGL data block outside the mapping.
    let mut cmd = Command::rw(io::READ, 1, 0, 8);
    cmd.psdt = 1;
    cmd.dptr = [0x4000, 4096];
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::DATA_TRANSFER_ERROR)
    );
    // An SGL descriptor of a reserved type.
    let mut cmd = Command::rw(io::READ, 1, 0, 8);
    cmd.psdt = 1;
    cmd.dptr = [b.iova(), 4096 | 0xe0 << 56];
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::SGL_TYPE_INVALID)
    );
    // An SGL data block shorter than the transfer.
    let mut cmd = Command::rw(io::READ, 1, 0, 8);
    cmd.psdt = 1;
    cmd.dptr = [b.iova(), 512];
    assert_eq!(
        status_of(&io_cmd(&mut q, cmd)),
        generic(status::DATA_SGL_LENGTH_INVALID)
    );

    // None of that harmed the controller or the data.
    pattern::fill(&mut b.bytes_mut()[..4096], 0, 9);
    q.write(&ns, 0, 8, &b).unwrap();
    let r = buf(&ctrl, 4096);
    q.read(&ns, 0, 8, &r).unwrap();
    assert!(r.bytes()[..4096] == b.bytes()[..4096]);
    assert_eq!(
        ctrl.read_reg32(reg::CSTS).unwrap() & 0b11,
        1,
        "ready, no fatal status"
    );
}

#[test]
fn admin_features_and_log_pages() {
    let card = start(CardSpec::default());
    let ctrl = attach(&card);
    // Volatile write cache, interrupt coalescing and async event config
    // round-trip through Set and Get Features.
    ctrl.get_feature(feature::VOLATILE_WRITE_CACHE).unwrap();
    ctrl.set_feature(feature::INTERRUPT_COALESCING, 0x0102)
        .unwrap();
    assert_eq!(
        ctrl.get_feature(feature::INTERRUPT_COALESCING).unwrap() & 0xffff,
        0x0102
    );
    ctrl.set_feature(feature::INTERRUPT_COALESCING, 0).unwrap();
    ctrl.set_feature(feature::ASYNC_EVENT_CONFIG, 0x1ff)
        .unwrap();
    let nq = ctrl.get_feature(feature::NUMBER_OF_QUEUES).unwrap();
    assert_eq!(nq & 0xffff, 3, "four queues, 0-based");
    // Error information, SMART / health and firmware slot log pages.
    for (lid, len) in [(1u32, 64u64), (2, 512), (3, 512)] {
        let numd = (len / 4 - 1) as u32;
        let cmd = Command {
            nsid: 0xffff_ffff,
            cdw10: lid | (numd & 0xffff) << 16,
            ..Command::new(admin::GET_LOG_PAGE)
        };
        let (c, page) = ctrl.admin_data(cmd, len, None).unwrap();
        check(c, || format!("Get Log Page {lid}")).unwrap();
        if lid == 3 {
            assert_ne!(page[8..16], [0u8; 8], "firmware slot 1 has a revision");
        }
    }
    // An unknown log page.
    let cmd = Command {
        cdw10: 0x70 | 15 << 16,
        ..Command::new(admin::GET_LOG_PAGE)
    };
    let (c, _) = ctrl.admin_data(cmd, 64, None).unwrap();
    assert_eq!(
        status_of(&c),
        (status::SCT_COMMAND_SPECIFIC, status::INVALID_LOG_PAGE),
        "log page 0x70 does not exist"
    );
    // Shutdown completes.
    ctrl.shutdown().unwrap();
}

/// Writes random blocks of one queue's region, tracking what each holds.
struct Writer {
    q: IoQueue,
    first: u64,
    blocks: u64,
    /// Generation each block holds; 0 = never written.
    expected: Vec<u64>,
    /// Blocks whose last write was lost in a reset: old or new generation.
    either: Vec<Option<(u64, u64)>>,
    generation: u64,
}

const BLOCK: u64 = 4096;

impl Writer {
    /// Random writes at depth 8 until `stop` or a reset.
    fn run(&mut self, ctrl: &Controller, stop: &AtomicBool) -> Result<u64, DriverError> {
        let bufs: Vec<DmaBuf> = (0..8).map(|_| buf(ctrl, BLOCK)).collect();
        let mut inflight: Vec<Option<(u16, u64, u64)>> = vec![None; 8];
        let mut rng = 0x1234_5678_u64 ^ self.first;
        let mut done = Vec::new();
        let mut writes = 0;
        loop {
            if !stop.load(Ordering::Relaxed) {
                for (slot, b) in bufs.iter().enumerate() {
                    if inflight[slot].is_some() {
                        continue;
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let mut block = rng % self.blocks;
                    while inflight.iter().flatten().any(|&(_, bl, _)| bl == block) {
                        block = (block + 1) % self.blocks;
                    }
                    self.generation += 1;
                    let lba = (self.first + block) * BLOCK / 512;
                    pattern::fill(b.bytes_mut(), lba, self.generation);
                    let mut cmd = Command::rw(io::WRITE, 1, lba, (BLOCK / 512) as u16);
                    self.q.set_data(&mut cmd, b, BLOCK, DataPointer::Prp)?;
                    match self.q.push(cmd) {
                        Ok(cid) => inflight[slot] = Some((cid, block, self.generation)),
                        Err(e) => return self.lost(e, &inflight),
                    }
                }
                if let Err(e) = self.q.flush() {
                    return self.lost(e, &inflight);
                }
            } else if inflight.iter().all(Option::is_none) {
                return Ok(writes);
            }
            done.clear();
            if let Err(e) = self.q.reap(&mut done) {
                return self.lost(e, &inflight);
            }
            for c in &done {
                let slot = inflight
                    .iter()
                    .position(|s| s.is_some_and(|(cid, _, _)| cid == c.cid))
                    .expect("a completion for a command in flight");
                let (_, block, generation) = inflight[slot].take().unwrap();
                assert!(c.status.is_success(), "write: {}", c.status);
                self.expected[block as usize] = generation;
                writes += 1;
            }
            if done.is_empty() {
                if let Err(e) = self.q.wait(Duration::from_millis(50)) {
                    return self.lost(e, &inflight);
                }
            }
        }
    }

    /// After a reset, blocks with a write in flight may hold either version.
    fn lost(
        &mut self,
        e: DriverError,
        inflight: &[Option<(u16, u64, u64)>],
    ) -> Result<u64, DriverError> {
        if !matches!(e, DriverError::Reset) {
            return Err(e);
        }
        for &(_, block, generation) in inflight.iter().flatten() {
            self.either[block as usize] = Some((self.expected[block as usize], generation));
        }
        Err(e)
    }

    /// Reads every block back on `q` and checks it.
    fn verify(&mut self, ctrl: &Controller, q: &mut IoQueue) -> usize {
        let ns = ctrl.identify_namespace(1).unwrap();
        let r = buf(ctrl, BLOCK);
        let mut expected = vec![0u8; BLOCK as usize];
        let mut checked = 0;
        for block in 0..self.blocks {
            let lba = (self.first + block) * BLOCK / 512;
            q.read(&ns, lba, (BLOCK / 512) as u16, &r).unwrap();
            let found = &r.bytes()[..BLOCK as usize];
            let ok = |generation: u64, expected: &mut Vec<u8>| {
                if generation == 0 {
                    return found.iter().all(|&b| b == 0);
                }
                pattern::fill(expected, lba, generation);
                found == expected.as_slice()
            };
            match self.either[block as usize].take() {
                Some((old, new)) => {
                    let which = if ok(new, &mut expected) {
                        new
                    } else {
                        assert!(
                            ok(old, &mut expected),
                            "block {}: neither the old nor the new write: {}",
                            self.first + block,
                            pattern::describe_mismatch(found, &expected, lba, old)
                        );
                        old
                    };
                    self.expected[block as usize] = which;
                }
                None => {
                    let g = self.expected[block as usize];
                    assert!(
                        ok(g, &mut expected),
                        "block {}: {}",
                        self.first + block,
                        pattern::describe_mismatch(found, &expected, lba, g)
                    );
                }
            }
            checked += 1;
        }
        checked
    }
}

#[test]
fn random_writes_verify_across_reset_under_load() {
    let card = start(CardSpec {
        namespaces: &[(8 << 20, 512)],
        io_queues: 2,
        ..CardSpec::default()
    });
    let ctrl = Arc::new(attach(&card));
    let per_queue = (8 << 20) / BLOCK / 2;
    let mut writers: Vec<Writer> = (0..2u16)
        .map(|i| Writer {
            q: ctrl.create_io_queue(i + 1, 16).unwrap(),
            first: u64::from(i) * per_queue,
            blocks: per_queue,
            expected: vec![0; per_queue as usize],
            either: vec![None; per_queue as usize],
            generation: 0,
        })
        .collect();
    let stop = AtomicBool::new(false);
    // Reset while both queues have writes in flight.
    let writes = std::thread::scope(|s| {
        let handles: Vec<_> = writers
            .iter_mut()
            .map(|w| {
                let (ctrl, stop) = (&ctrl, &stop);
                s.spawn(move || w.run(ctrl, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        ctrl.reset().expect("reset under load");
        handles
            .into_iter()
            .map(|h| match h.join().unwrap() {
                Err(DriverError::Reset) => 0,
                Ok(n) => n,
                Err(e) => panic!("writer: {e}"),
            })
            .sum::<u64>()
    });
    assert!(writes == 0, "every writer saw the reset");
    let written: usize = writers
        .iter()
        .map(|w| w.expected.iter().filter(|&&g| g != 0).count())
        .sum();
    assert!(
        written > 50,
        "only {written} blocks written before the reset"
    );
    // The reset controller was set up again, shadow doorbells included.
    assert!(ctrl.uses_shadow_doorbells());
    assert_eq!(ctrl.read_reg32(reg::CSTS).unwrap() & 0b11, 1);
    // Queues are gone: new ones on the reset controller read everything back.
    for (i, w) in writers.iter_mut().enumerate() {
        let mut q = ctrl.create_io_queue(i as u16 + 1, 16).unwrap();
        assert_eq!(w.verify(&ctrl, &mut q), per_queue as usize);
        w.q = q;
    }
    // A second round of writes on the new queues, a quiet reset, and verify.
    std::thread::scope(|s| {
        for w in writers.iter_mut() {
            let (ctrl, stop) = (&ctrl, &stop);
            s.spawn(move || w.run(ctrl, stop).expect("writes after the reset"));
        }
        std::thread::sleep(Duration::from_millis(400));
        stop.store(true, Ordering::Relaxed);
    });
    ctrl.reset().unwrap();
    for (i, w) in writers.iter_mut().enumerate() {
        let mut q = ctrl.create_io_queue(i as u16 + 1, 16).unwrap();
        w.verify(&ctrl, &mut q);
    }
    // And the namespace file holds what the driver last read.
    let f = std::fs::File::open(&card.namespaces[0]).unwrap();
    let w = &writers[1];
    let block = w
        .expected
        .iter()
        .position(|&g| g != 0)
        .expect("queue 2 wrote something") as u64;
    let lba = (w.first + block) * BLOCK / 512;
    let mut found = vec![0u8; BLOCK as usize];
    f.read_exact_at(&mut found, lba * 512).unwrap();
    let mut expected = vec![0u8; BLOCK as usize];
    pattern::fill(&mut expected, lba, w.expected[block as usize]);
    assert!(found == expected, "the namespace file holds the data");
}

#[test]
fn several_queues_at_once() {
    let card = start(CardSpec {
        namespaces: &[(16 << 20, 4096)],
        io_queues: 4,
        ..CardSpec::default()
    });
    let ctrl = attach(&card);
    let ns = ctrl.identify_namespace(1).unwrap();
    assert_eq!(ns.lba_size, 4096);
    let queues: Vec<IoQueue> = (1..=4)
        .map(|i| ctrl.create_io_queue(i, 32).unwrap())
        .collect();
    assert_eq!(
        ctrl.vectors(),
        5,
        "one MSI-X vector for admin and each queue"
    );
    assert!(queues.iter().all(|q| !q.is_polled()));
    let per_queue = ns.nsze / 4;
    std::thread::scope(|s| {
        for (i, mut q) in queues.into_iter().enumerate() {
            let (ctrl, ns) = (&ctrl, &ns);
            s.spawn(move || {
                // 16 commands in flight: 64 KiB writes, then reads of each.
                let first = i as u64 * per_queue;
                let bufs: Vec<DmaBuf> = (0..16).map(|_| buf(ctrl, 64 << 10)).collect();
                for (round, chunk) in (0..per_queue / 16)
                    .collect::<Vec<_>>()
                    .chunks(16)
                    .enumerate()
                {
                    let mut cids = Vec::new();
                    // PRP list pages live until the commands complete.
                    let mut lists = Vec::new();
                    for (b, &k) in bufs.iter().zip(chunk) {
                        let lba = first + k * 16;
                        pattern::fill(b.bytes_mut(), lba * 8, round as u64 + 1);
                        let mut cmd = Command::rw(io::WRITE, 1, lba, 16);
                        lists.push(q.set_data(&mut cmd, b, 64 << 10, DataPointer::Prp).unwrap());
                        cids.push(q.push(cmd).unwrap());
                    }
                    q.flush().unwrap();
                    let mut done = Vec::new();
                    let deadline = Instant::now() + TIMEOUT;
                    while done.len() < cids.len() {
                        q.reap(&mut done).unwrap();
                        assert!(Instant::now() < deadline, "queue {} stalled", q.qid());
                        if done.len() < cids.len() {
                            q.wait(Duration::from_millis(50)).unwrap();
                        }
                    }
                    for c in &done {
                        assert!(
                            c.status.is_success(),
                            "queue {}: write failed: {}",
                            q.qid(),
                            c.status
                        );
                    }
                    for (b, &k) in bufs.iter().zip(chunk) {
                        let lba = first + k * 16;
                        let r = buf(ctrl, 64 << 10);
                        q.read(ns, lba, 16, &r).unwrap();
                        assert!(r.bytes() == b.bytes(), "queue {} lba {lba}", q.qid());
                    }
                }
            });
        }
    });
}

#[test]
fn shadow_and_socket_doorbells_both_work() {
    let card = start(CardSpec::default());
    for shadow in [true, false] {
        let mut cfg = config(&card);
        cfg.shadow_doorbells = shadow;
        let ctrl = Controller::attach(cfg).unwrap();
        assert_eq!(ctrl.uses_shadow_doorbells(), shadow);
        let ns = ctrl.identify_namespace(1).unwrap();
        let mut q = ctrl.create_io_queue(1, 8).unwrap();
        let w = buf(&ctrl, 4096);
        let r = buf(&ctrl, 4096);
        // Enough commands to wrap the queue several times.
        for i in 0..40u64 {
            pattern::fill(w.bytes_mut(), i * 8, i + 1 + u64::from(shadow) * 100);
            q.write(&ns, i * 8, 8, &w).unwrap();
            q.read(&ns, i * 8, 8, &r).unwrap();
            assert!(r.bytes() == w.bytes(), "shadow={shadow} block {i}");
        }
        ctrl.delete_io_queue(q).unwrap();
        ctrl.shutdown().unwrap();
        drop(ctrl);
        // The card takes the next connection (a VMM reconnecting).
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cardbench(args: &[&str]) -> Output {
    Process::new(env!("CARGO_BIN_EXE_cardbench"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn cardbench_nvme_verify_json() {
    let card = start(CardSpec {
        namespaces: &[(32 << 20, 512)],
        ..CardSpec::default()
    });
    let pid = card.child.id().to_string();
    let out = cardbench(&[
        "nvme",
        "--socket",
        card.socket.to_str().unwrap(),
        "--rw",
        "randrw",
        "--bs",
        "8k",
        "--iodepth",
        "8",
        "--queues",
        "2",
        "--runtime",
        "1",
        "--verify",
        "--backend-pid",
        &pid,
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cardbench nvme failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = &v["jobs"][0];
    assert!(job["read"]["total_ios"].as_u64().unwrap() > 0);
    assert!(job["write"]["total_ios"].as_u64().unwrap() > 0);
    assert!(job["read"]["clat_ns"]["percentile"]["99.000000"]
        .as_u64()
        .is_some());
    let x = &v["cardbench"];
    assert_eq!(x["rw"], "randrw");
    assert_eq!(x["bs"], 8192);
    assert_eq!(x["queues"], 2);
    assert_eq!(x["verify_errors"], 0);
    assert!(x["verified_reads"].as_u64().unwrap() > 0);
    assert!(x["backend_cpu_us_per_io"].as_f64().is_some());
    assert_eq!(x["capacity"], 32 << 20);
}

#[test]
fn cardbench_nvme_usage_errors() {
    let out = cardbench(&[
        "nvme",
        "--socket",
        "/nonexistent/nvme.sock",
        "--rw",
        "read",
        "--runtime",
        "1",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing socket is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot attach"));

    let card = start(CardSpec::default());
    let s = card.socket.to_str().unwrap();
    for (args, needle) in [
        (vec!["--bs", "1000"], "multiple of 512"),
        (vec!["--bs", "1m"], "maximum transfer"),
        (vec!["--queues", "9"], "granted"),
        (vec!["--iodepth", "0"], "iodepth"),
    ] {
        let mut all = vec![
            "nvme",
            "--socket",
            s,
            "--rw",
            "randread",
            "--runtime",
            "0.2",
        ];
        all.extend_from_slice(&args);
        let out = cardbench(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn wrong_or_silent_peers_are_errors_not_hangs() {
    let dir = scratch();
    // A socket that accepts and never answers.
    let silent = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let mut cfg = DriverConfig::new(&silent);
    cfg.timeout = Duration::from_millis(500);
    let t = Instant::now();
    let e = Controller::attach(cfg).err().expect("no controller there");
    assert!(matches!(e, DriverError::NoHandshake { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "gave up in time");
    drop(held.join());

    // A socket that hangs up straight away.
    let rude = dir.path().join("rude.sock");
    let listener = std::os::unix::net::UnixListener::bind(&rude).unwrap();
    let closer = std::thread::spawn(move || drop(listener.accept()));
    let e = Controller::attach(DriverConfig::new(&rude))
        .err()
        .expect("no controller there");
    assert!(matches!(e, DriverError::Connect { .. }), "{e}");
    closer.join().unwrap();

    // cardbench says so and exits 2.
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("quiet.sock")).unwrap();
    let _held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let socket = dir.path().join("quiet.sock");
    let out = cardbench(&[
        "nvme",
        "--socket",
        socket.to_str().unwrap(),
        "--rw",
        "read",
        "--timeout",
        "0.5",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vfio-user server"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compare_nvme_quick_runs() {
    if Process::new("fio").arg("--version").output().is_err() {
        eprintln!("skipped: fio not installed");
        return;
    }
    let dir = scratch();
    let results = dir.path().join("results");
    let out = Process::new(env!("CARGO_BIN_EXE_cardbench"))
        .args([
            "compare-nvme",
            "--quick",
            "--runtime",
            "300ms",
            "--only",
            "randread QD32",
            "--file-size",
            "32M",
            "--results",
        ])
        .arg(&results)
        .env("CARDSIM_BIN_DIR", bin_dir())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("4k randread QD32 1q"), "{table}");
    assert!(table.contains("4k randread QD32 2q"), "{table}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(results.join("results.json")).unwrap()).unwrap();
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    for c in cells {
        for s in ["median_ours", "median_raw"] {
            assert!(c[s]["iops"].as_f64().unwrap() > 0.0, "{c}");
        }
        assert!(c["ours_over_raw_iops"].as_f64().unwrap() > 0.0);
        assert!(
            c["median_ours"]["cpu_us_per_io"].as_f64().is_some(),
            "card CPU sampled"
        );
    }
    // An unknown workload name is a usage error.
    let out = Process::new(env!("CARGO_BIN_EXE_cardbench"))
        .args(["compare-nvme", "--quick", "--only", "sideways"])
        .env("CARDSIM_BIN_DIR", bin_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workload matches"));
}

/// Plays a misbehaving controller by writing a completion entry straight
/// into the queue's completion ring, as a controller's DMA would.
fn forge_completion(ctrl: &Controller, q: &IoQueue, slot: u64, sqid: u16, sq_head: u16, cid: u16) {
    let (_, cq) = q.ring_addresses();
    let mut e = [0u8; 16];
    e[8..12].copy_from_slice(&(u32::from(sqid) << 16 | u32::from(sq_head)).to_le_bytes());
    e[12..16].copy_from_slice(&(u32::from(cid) | 1 << 16).to_le_bytes());
    ctrl.memory().guest().write(cq - IOVA_BASE + 16 * slot, &e);
}

#[test]
fn bogus_completions_are_protocol_errors() {
    let card = start(CardSpec::default());
    let ctrl = attach(&card);
    let protocol = |r: Result<usize, DriverError>, what: &str| match r {
        Err(DriverError::Protocol(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("expected a protocol error about {what}, got {other:?}"),
    };
    let mut done = Vec::new();
    // A command id nobody submitted.
    let mut q = ctrl.create_io_queue(1, 8).unwrap();
    forge_completion(&ctrl, &q, 0, 1, 0, 5);
    protocol(q.reap(&mut done), "not in flight");
    // A completion naming another queue.
    let mut q = ctrl.create_io_queue(2, 8).unwrap();
    forge_completion(&ctrl, &q, 0, 7, 0, 0);
    protocol(q.reap(&mut done), "names SQ 7");
    // An SQ head past everything submitted (the command is queued but the
    // doorbell not rung, so the real controller stays out of it).
    let mut q = ctrl.create_io_queue(3, 8).unwrap();
    let cid = q.push(Command::new(io::FLUSH)).unwrap();
    forge_completion(&ctrl, &q, 0, 3, 5, cid);
    protocol(q.reap(&mut done), "SQ head");
    assert!(done.is_empty());
    // The controller itself is unharmed: queue 4 works.
    let ns = ctrl.identify_namespace(1).unwrap();
    let mut q = ctrl.create_io_queue(4, 8).unwrap();
    let b = buf(&ctrl, 4096);
    q.read(&ns, 0, 8, &b).unwrap();
}

#[test]
fn shutdown_under_load_then_reset_keeps_data() {
    let card = start(CardSpec {
        namespaces: &[(4 << 20, 512)],
        io_queues: 2,
        ..CardSpec::default()
    });
    let ctrl = Arc::new(attach(&card));
    let per_queue = (4 << 20) / BLOCK / 2;
    let mut writers: Vec<Writer> = (0..2u16)
        .map(|i| Writer {
            q: ctrl.create_io_queue(i + 1, 16).unwrap(),
            first: u64::from(i) * per_queue,
            blocks: per_queue,
            expected: vec![0; per_queue as usize],
            either: vec![None; per_queue as usize],
            generation: 0,
        })
        .collect();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = writers
            .iter_mut()
            .map(|w| {
                let (ctrl, stop) = (&ctrl, &stop);
                s.spawn(move || w.run(ctrl, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400));
        // CC.SHN with writes in flight: the card must reach SHST complete.
        ctrl.shutdown().expect("shutdown under load");
        // Bring it back (CC.EN 1 -> 0 -> 1); the writers see their queues go.
        ctrl.reset().expect("enable after shutdown");
        for h in handles {
            match h.join().unwrap() {
                Err(DriverError::Reset) => {}
                other => panic!("writer: {other:?}"),
            }
        }
    });
    let written: usize = writers
        .iter()
        .map(|w| w.expected.iter().filter(|&&g| g != 0).count())
        .sum();
    assert!(
        written > 20,
        "only {written} blocks written before the shutdown"
    );
    for (i, w) in writers.iter_mut().enumerate() {
        let mut q = ctrl.create_io_queue(i as u16 + 1, 16).unwrap();
        assert_eq!(w.verify(&ctrl, &mut q), per_queue as usize);
    }
}
