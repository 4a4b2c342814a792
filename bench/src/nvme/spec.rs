//! The host's view of NVMe 1.4: register offsets, opcodes, the 64-byte
//! submission entry the driver builds and the 16-byte completion entry it
//! parses, and status codes. Written from the base specification, not from
//! the card's source, so the driver checks the card rather than mirroring it.

/// Memory page size the driver configures (CC.MPS = 0).
pub const PAGE: u64 = 4096;
pub const SQE_SIZE: usize = 64;
pub const CQE_SIZE: usize = 16;

/// Controller registers (BAR0 offsets, section 3.1).
pub mod reg {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const INTMS: u64 = 0x0c;
    pub const INTMC: u64 = 0x10;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;
    /// Submission queue 0 tail doorbell; the others follow at the stride.
    pub const DOORBELLS: u64 = 0x1000;
}

pub mod cc {
    pub const EN: u32 = 1;
    /// Normal shutdown notification (SHN = 01b).
    pub const SHN_NORMAL: u32 = 1 << 14;
    pub const SHN_MASK: u32 = 3 << 14;
    /// 64-byte submission entries (2^6), 16-byte completion entries (2^4).
    pub const IOSQES_64: u32 = 6 << 16;
    pub const IOCQES_16: u32 = 4 << 20;
}

pub mod csts {
    pub const RDY: u32 = 1;
    pub const CFS: u32 = 1 << 1;
    pub const SHST_MASK: u32 = 3 << 2;
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// CAP fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum queue entries supported (1-based).
    pub fn mqes(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    pub fn cqr(self) -> bool {
        self.0 >> 16 & 1 == 1
    }
    /// Worst-case time to become ready, in 500 ms units.
    pub fn timeout_500ms(self) -> u32 {
        (self.0 >> 24 & 0xff) as u32
    }
    /// Doorbell stride: 4 << DSTRD bytes.
    pub fn dstrd(self) -> u32 {
        (self.0 >> 32 & 0xf) as u32
    }
    pub fn css_nvm(self) -> bool {
        self.0 >> 37 & 1 == 1
    }
    /// Minimum and maximum memory page size exponents (2^(12+x)).
    pub fn mpsmin(self) -> u32 {
        (self.0 >> 48 & 0xf) as u32
    }
    pub fn mpsmax(self) -> u32 {
        (self.0 >> 52 & 0xf) as u32
    }
}

pub mod admin {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

pub mod cns {
    pub const NAMESPACE: u32 = 0x00;
    pub const CONTROLLER: u32 = 0x01;
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
    pub const NAMESPACE_DESCRIPTORS: u32 = 0x03;
}

pub mod feature {
    pub const VOLATILE_WRITE_CACHE: u32 = 0x06;
    pub const NUMBER_OF_QUEUES: u32 = 0x07;
    pub const INTERRUPT_COALESCING: u32 = 0x08;
    pub const ASYNC_EVENT_CONFIG: u32 = 0x0b;
}

/// Status code types and the codes the driver and its tests name.
pub mod status {
    pub const SCT_GENERIC: u8 = 0;
    pub const SCT_COMMAND_SPECIFIC: u8 = 1;
    pub const SCT_MEDIA: u8 = 2;

    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    pub const INVALID_SGL_SEGMENT: u8 = 0x0d;
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0f;
    pub const SGL_TYPE_INVALID: u8 = 0x11;
    pub const INVALID_PRP_OFFSET: u8 = 0x13;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;

    // Command specific (SCT 1).
    pub const CQ_INVALID: u8 = 0x00;
    pub const INVALID_QUEUE_ID: u8 = 0x01;
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    pub const INVALID_INTERRUPT_VECTOR: u8 = 0x08;
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    pub const INVALID_QUEUE_DELETION: u8 = 0x0c;

    // Media and data integrity (SCT 2).
    pub const COMPARE_FAILURE: u8 = 0x85;
}

/// A submission queue entry (figure 105 of NVMe 1.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    pub opcode: u8,
    /// PSDT: 0 = PRPs, 1 = SGL with a contiguous metadata buffer.
    pub psdt: u8,
    pub cid: u16,
    pub nsid: u32,
    pub mptr: u64,
    /// DPTR: PRP1 and PRP2, or one 16-byte SGL descriptor.
    pub dptr: [u64; 2],
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

impl Command {
    pub fn new(opcode: u8) -> Self {
        Self {
            opcode,
            ..Self::default()
        }
    }

    pub fn to_bytes(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        let dw0 =
            u32::from(self.opcode) | u32::from(self.psdt & 3) << 14 | u32::from(self.cid) << 16;
        b[0..4].copy_from_slice(&dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dptr[0].to_le_bytes());
        b[32..40].copy_from_slice(&self.dptr[1].to_le_bytes());
        for (i, dw) in [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
        .into_iter()
        .enumerate()
        {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&dw.to_le_bytes());
        }
        b
    }

    /// Read, Write or Compare of `nlb` blocks (1-based; the entry holds nlb-1).
    pub fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u16) -> Self {
        Self {
            nsid,
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            cdw12: u32::from(nlb.saturating_sub(1)),
            ..Self::new(opcode)
        }
    }
}

/// The status field of a completion (figure 126).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub more: bool,
    pub dnr: bool,
}

impl Status {
    pub fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    /// (type, code), the pair tests compare against.
    pub fn code(self) -> (u8, u8) {
        (self.sct, self.sc)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match (self.sct, self.sc) {
            (0, status::SUCCESS) => "Successful Completion",
            (0, status::INVALID_OPCODE) => "Invalid Command Opcode",
            (0, status::INVALID_FIELD) => "Invalid Field in Command",
            (0, status::DATA_TRANSFER_ERROR) => "Data Transfer Error",
            (0, status::ABORTED_SQ_DELETION) => "Command Aborted due to SQ Deletion",
            (0, status::INVALID_NAMESPACE) => "Invalid Namespace or Format",
            (0, status::INVALID_SGL_SEGMENT) => "Invalid SGL Segment Descriptor",
            (0, status::DATA_SGL_LENGTH_INVALID) => "Data SGL Length Invalid",
            (0, status::SGL_TYPE_INVALID) => "SGL Descriptor Type Invalid",
            (0, status::INVALID_PRP_OFFSET) => "PRP Offset Invalid",
            (0, status::LBA_OUT_OF_RANGE) => "LBA Out of Range",
            (1, status::CQ_INVALID) => "Completion Queue Invalid",
            (1, status::INVALID_QUEUE_ID) => "Invalid Queue Identifier",
            (1, status::INVALID_QUEUE_SIZE) => "Invalid Queue Size",
            (1, status::INVALID_INTERRUPT_VECTOR) => "Invalid Interrupt Vector",
            (1, status::INVALID_LOG_PAGE) => "Invalid Log Page",
            (1, status::INVALID_QUEUE_DELETION) => "Invalid Queue Deletion",
            (2, status::COMPARE_FAILURE) => "Compare Failure",
            _ => "",
        };
        write!(f, "SCT {:#x} SC {:#04x}", self.sct, self.sc)?;
        if !name.is_empty() {
            write!(f, " ({name})")?;
        }
        if self.dnr {
            write!(f, " DNR")?;
        }
        Ok(())
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command specific result (DW0).
    pub result: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    pub phase: bool,
    pub status: Status,
}

impl Completion {
    pub fn parse(b: &[u8; CQE_SIZE]) -> Self {
        let dw =
            |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let dw2 = dw(2);
        let dw3 = dw(3);
        let sf = dw3 >> 17;
        Self {
            result: dw(0),
            sq_head: dw2 as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            phase: dw3 >> 16 & 1 == 1,
            status: Status {
                sc: sf as u8,
                sct: (sf >> 8 & 7) as u8,
                more: sf >> 13 & 1 == 1,
                dnr: sf >> 14 & 1 == 1,
            },
        }
    }
}

/// An SGL descriptor (figure 112): 16 bytes, type in the high nibble of the last.
pub mod sgl {
    pub const DATA_BLOCK: u8 = 0x00;
    pub const SEGMENT: u8 = 0x20;
    pub const LAST_SEGMENT: u8 = 0x30;

    pub fn descriptor(addr: u64, len: u32, kind: u8) -> [u64; 2] {
        [addr, u64::from(len) | u64::from(kind) << 56]
    }

    pub fn to_bytes(d: [u64; 2]) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d[0].to_le_bytes());
        b[8..16].copy_from_slice(&d[1].to_le_bytes());
        b
    }
}

/// A Dataset Management range (figure 164): context attributes, length in
/// blocks (1-based), starting LBA.
pub fn dsm_range(slba: u64, nlb: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[4..8].copy_from_slice(&nlb.to_le_bytes());
    b[8..16].copy_from_slice(&slba.to_le_bytes());
    b
}

/// Reads a little-endian integer field out of an Identify page.
pub fn le(page: &[u8], offset: usize, len: usize) -> u64 {
    page.get(offset..offset + len)
        .map(|s| s.iter().rev().fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
        .unwrap_or(0)
}

/// An ASCII Identify string field without its space padding.
pub fn ascii(page: &[u8], offset: usize, len: usize) -> String {
    page.get(offset..offset + len)
        .map(|s| {
            String::from_utf8_lossy(s)
                .trim_end_matches([' ', '\0'])
                .to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_layout() {
        let mut c = Command::rw(io::WRITE, 1, 0x1_2345_6789, 8);
        c.cid = 0xbeef;
        c.dptr = [0x1000, 0x2000];
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &[0x01, 0x00, 0xef, 0xbe]);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x2000);
        assert_eq!(
            u32::from_le_bytes(b[40..44].try_into().unwrap()),
            0x2345_6789
        );
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 7);
        let mut s = Command::new(io::READ);
        s.psdt = 1;
        assert_eq!(s.to_bytes()[1], 0x40);
    }

    #[test]
    fn completion_fields() {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&7u32.to_le_bytes());
        b[8..12].copy_from_slice(&(3u32 << 16 | 17).to_le_bytes());
        // cid 9, phase 1, SCT 1 SC 2, DNR.
        let dw3 = 9u32 | 1 << 16 | (0x102 | 1 << 14) << 17;
        b[12..16].copy_from_slice(&dw3.to_le_bytes());
        let c = Completion::parse(&b);
        assert_eq!(c.result, 7);
        assert_eq!((c.sq_id, c.sq_head, c.cid), (3, 17, 9));
        assert!(c.phase);
        assert_eq!(c.status.code(), (1, 2));
        assert!(c.status.dnr && !c.status.more);
        assert!(c.status.to_string().contains("Invalid Queue Size"));
    }

    #[test]
    fn cap_fields() {
        let cap = Cap(0x0020_0020_0f01_03ff | 1 << 37);
        assert_eq!(cap.mqes(), 1024);
        assert!(cap.cqr());
        assert_eq!(cap.timeout_500ms(), 0x0f);
        assert_eq!(cap.dstrd(), 0);
        assert!(cap.css_nvm());
    }

    #[test]
    fn identify_fields() {
        let mut page = vec![0u8; 64];
        page[4..12].copy_from_slice(b"SN1     ");
        page[20..22].copy_from_slice(&0x1234u16.to_le_bytes());
        assert_eq!(ascii(&page, 4, 8), "SN1");
        assert_eq!(le(&page, 20, 2), 0x1234);
        assert_eq!(le(&page, 60, 8), 0, "a field past the page reads as zero");
    }
}
