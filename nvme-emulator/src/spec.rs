//! The parts of the NVMe 1.4 base specification the card implements:
//! register offsets, opcodes, status codes, and the layouts of submission
//! and completion queue entries.

/// Memory page size: CAP.MPSMIN = CAP.MPSMAX = 0, so CC.MPS must be 0 (4 KiB).
pub const PAGE_SIZE: u64 = 4096;
/// Size of a submission queue entry (CC.IOSQES = 6).
pub const SQE_SIZE: u64 = 64;
/// Size of a completion queue entry (CC.IOCQES = 4).
pub const CQE_SIZE: u64 = 16;
/// Largest queue the controller accepts (CAP.MQES + 1).
pub const MAX_QUEUE_ENTRIES: u32 = 1024;
/// Largest transfer of one command: 2^MDTS pages (MDTS = 5 → 128 KiB).
pub const MDTS: u8 = 5;
pub const MAX_TRANSFER: u64 = PAGE_SIZE << MDTS;
/// Outstanding Asynchronous Event Requests the controller holds (AERL + 1).
pub const AER_LIMIT: usize = 4;
/// Entries of the error information log (ELPE + 1).
pub const ERROR_LOG_ENTRIES: usize = 4;
/// The version register: NVMe 1.4.0.
pub const VERSION_1_4: u32 = 0x0001_0400;

/// Controller registers in BAR0.
pub mod reg {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const INTMS: u64 = 0x0c;
    pub const INTMC: u64 = 0x10;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const NSSR: u64 = 0x20;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;
    /// Doorbells start here; CAP.DSTRD = 0, so each is 4 bytes:
    /// SQ y tail at 0x1000 + 8y, CQ y head at 0x1000 + 8y + 4.
    pub const DOORBELLS: u64 = 0x1000;
}

/// Admin command opcodes.
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

/// NVM command set opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Feature identifiers.
pub mod feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
}

/// Log page identifiers.
pub mod log {
    pub const ERROR_INFORMATION: u8 = 0x01;
    pub const SMART_HEALTH: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
}

/// A completion status: Status Code Type and Status Code, as the completion
/// queue entry carries them (the phase bit is added when it is posted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    /// Do Not Retry: the same command would fail again.
    pub dnr: bool,
}

impl Status {
    const fn generic(sc: u8, dnr: bool) -> Self {
        Self { sct: 0, sc, dnr }
    }
    const fn specific(sc: u8) -> Self {
        Self {
            sct: 1,
            sc,
            dnr: true,
        }
    }
    const fn media(sc: u8) -> Self {
        Self {
            sct: 2,
            sc,
            dnr: false,
        }
    }

    pub const SUCCESS: Status = Status::generic(0x00, false);
    pub const INVALID_OPCODE: Status = Status::generic(0x01, true);
    pub const INVALID_FIELD: Status = Status::generic(0x02, true);
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04, false);
    pub const INTERNAL_ERROR: Status = Status::generic(0x06, false);
    pub const ABORTED_SQ_DELETION: Status = Status::generic(0x08, false);
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b, true);
    pub const INVALID_SGL_SEGMENT: Status = Status::generic(0x0d, true);
    pub const INVALID_SGL_COUNT: Status = Status::generic(0x0e, true);
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::generic(0x0f, true);
    pub const SGL_TYPE_INVALID: Status = Status::generic(0x11, true);
    pub const INVALID_PRP_OFFSET: Status = Status::generic(0x13, true);
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80, true);

    pub const CQ_INVALID: Status = Status::specific(0x00);
    pub const INVALID_QUEUE_ID: Status = Status::specific(0x01);
    pub const INVALID_QUEUE_SIZE: Status = Status::specific(0x02);
    pub const AER_LIMIT_EXCEEDED: Status = Status::specific(0x05);
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::specific(0x08);
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09);
    pub const INVALID_QUEUE_DELETION: Status = Status::specific(0x0c);

    pub const WRITE_FAULT: Status = Status::media(0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(0x81);
    pub const COMPARE_FAILURE: Status = Status::media(0x85);

    /// The 15 status bits of DW3[31:17] (without the phase tag).
    pub fn field(self) -> u16 {
        (u16::from(self.dnr) << 14) | (u16::from(self.sct & 7) << 8) | u16::from(self.sc)
    }

    pub fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SCT {:#x} SC {:#04x}", self.sct, self.sc)
    }
}

/// A submission queue entry, copied out of guest memory before any field is
/// looked at (the guest may change it while we read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    pub dw: [u32; 16],
}

impl Command {
    pub fn from_bytes(bytes: &[u8; 64]) -> Self {
        let mut dw = [0u32; 16];
        for (i, chunk) in bytes.chunks_exact(4).enumerate() {
            dw[i] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Self { dw }
    }

    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        for (i, d) in self.dw.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        out
    }

    pub fn opcode(&self) -> u8 {
        self.dw[0] as u8
    }
    /// Fused operation bits (9:8).
    pub fn fuse(&self) -> u8 {
        ((self.dw[0] >> 8) & 3) as u8
    }
    /// PRP or SGL for Data Transfer (15:14).
    pub fn psdt(&self) -> u8 {
        ((self.dw[0] >> 14) & 3) as u8
    }
    pub fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }
    pub fn nsid(&self) -> u32 {
        self.dw[1]
    }
    pub fn prp1(&self) -> u64 {
        u64::from(self.dw[6]) | (u64::from(self.dw[7]) << 32)
    }
    pub fn prp2(&self) -> u64 {
        u64::from(self.dw[8]) | (u64::from(self.dw[9]) << 32)
    }
    /// The 16-byte SGL descriptor in DPTR.
    pub fn sgl(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for i in 0..4 {
            out[i * 4..i * 4 + 4].copy_from_slice(&self.dw[6 + i].to_le_bytes());
        }
        out
    }
    pub fn cdw(&self, n: usize) -> u32 {
        self.dw[n]
    }
    /// Starting LBA of an I/O command (CDW10-11).
    pub fn slba(&self) -> u64 {
        u64::from(self.dw[10]) | (u64::from(self.dw[11]) << 32)
    }
    /// Number of logical blocks, 0's based (CDW12 15:0).
    pub fn nlb(&self) -> u16 {
        self.dw[12] as u16
    }

    /// A command with the given opcode and command id; the rest zero.
    pub fn new(opcode: u8, cid: u16) -> Self {
        let mut c = Self::default();
        c.dw[0] = u32::from(opcode) | (u32::from(cid) << 16);
        c
    }
    pub fn with_prp(mut self, prp1: u64, prp2: u64) -> Self {
        self.dw[6] = prp1 as u32;
        self.dw[7] = (prp1 >> 32) as u32;
        self.dw[8] = prp2 as u32;
        self.dw[9] = (prp2 >> 32) as u32;
        self
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub dw0: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    pub status: Status,
}

impl Completion {
    pub fn to_bytes(&self, phase: bool) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        out[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        out[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        out[12..14].copy_from_slice(&self.cid.to_le_bytes());
        let status = (self.status.field() << 1) | u16::from(phase);
        out[14..16].copy_from_slice(&status.to_le_bytes());
        out
    }

    /// Parses an entry: the completion and its phase tag.
    pub fn from_bytes(b: &[u8; 16]) -> (Self, bool) {
        let status = u16::from_le_bytes([b[14], b[15]]);
        let field = status >> 1;
        (
            Self {
                dw0: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                sq_head: u16::from_le_bytes([b[8], b[9]]),
                sq_id: u16::from_le_bytes([b[10], b[11]]),
                cid: u16::from_le_bytes([b[12], b[13]]),
                status: Status {
                    sc: field as u8,
                    sct: ((field >> 8) & 7) as u8,
                    dnr: field & (1 << 14) != 0,
                },
            },
            status & 1 != 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_round_trips_with_its_phase() {
        let c = Completion {
            dw0: 7,
            sq_head: 3,
            sq_id: 2,
            cid: 0xbeef,
            status: Status::LBA_OUT_OF_RANGE,
        };
        let bytes = c.to_bytes(true);
        // SC 0x80 in bits 24:17 of DW3, DNR in bit 31, phase in bit 16.
        let dw3 = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        assert_eq!(dw3 >> 17 & 0xff, 0x80);
        assert_eq!(dw3 >> 31, 1);
        assert_eq!(dw3 >> 16 & 1, 1);
        assert_eq!(Completion::from_bytes(&bytes), (c, true));
    }

    #[test]
    fn command_fields_come_from_their_dwords() {
        let c = Command::new(io::READ, 0x1234).with_prp(0x1_0000_2000, 0x3000);
        let c = Command::from_bytes(&c.to_bytes());
        assert_eq!(c.opcode(), io::READ);
        assert_eq!(c.cid(), 0x1234);
        assert_eq!(c.prp1(), 0x1_0000_2000);
        assert_eq!(c.prp2(), 0x3000);
    }
}
