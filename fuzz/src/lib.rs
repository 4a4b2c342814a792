//! Input formats of cardsim's fuzz targets, shared by the targets (which
//! decode them) and the seed corpus (which is encoded with them).
//!
//! Every format is a little-endian byte stream read by [`Reader`], which
//! yields zeros past the end: any byte string is a valid input, and
//! libFuzzer's comparison tracing finds the magic values quickly.
//!
//! `cargo test --manifest-path fuzz/Cargo.toml` checks that the checked-in
//! seeds under `fuzz/corpus/` are what [`seeds`] produces;
//! `CARDSIM_WRITE_SEEDS=1` rewrites them.

pub mod seeds;

/// Reads little-endian values from fuzz input; zeros past the end.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Builds fuzz input in the formats [`Reader`] reads.
#[derive(Default)]
pub struct Writer {
    pub data: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.data.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.data.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.data.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.data.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.data.extend_from_slice(v);
        self
    }
}

/// `virtio_blk_request`: one descriptor chain on a split virtqueue in
/// guest memory, checked by `vhost_blk_backend::request::parse`.
///
/// ```text
/// u8   config: bit 0 read-only volume, bit 1 EVENT_IDX,
///      bits 4-7 queue size exponent (size = 1 << min(e, 8))
/// u64  volume capacity in bytes
/// u8   chain descriptor limit (Scratch), u8 segment limit (IoVecs)
/// u16  head index placed in the available ring
/// u8   n, then n descriptors {u64 addr, u32 len, u16 flags, u16 next}
///      written to descriptor table entries 0.. (modulo the queue size)
/// then, to the end: memory patches {u32 guest address, u16 len, bytes}
///      (headers, range segments, indirect tables), applied first
/// ```
pub mod blk {
    /// Guest memory: two adjacent regions (a buffer may straddle them), a
    /// hole, and a small third region.
    pub const REGIONS: [(u64, usize); 3] =
        [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x3_0000, 0x1000)];
    pub const DESC_TABLE: u64 = 0x0;
    pub const AVAIL_RING: u64 = 0x1000;
    pub const USED_RING: u64 = 0x1400;
    /// Where the seeds put headers, data, status bytes and indirect tables.
    pub const HDR: u64 = 0x2000;
    pub const DATA: u64 = 0x4000;
    pub const STATUS: u64 = 0x3000;
    pub const INDIRECT: u64 = 0x3100;

    pub struct Descriptor {
        pub addr: u64,
        pub len: u32,
        pub flags: u16,
        pub next: u16,
    }

    pub struct Input {
        pub read_only: bool,
        pub event_idx: bool,
        pub queue_size_exp: u8,
        pub capacity: u64,
        pub max_descriptors: u8,
        pub seg_max: u8,
        pub head: u16,
        pub descriptors: Vec<Descriptor>,
        pub patches: Vec<(u32, Vec<u8>)>,
    }

    impl Input {
        pub fn decode(data: &[u8]) -> Self {
            let mut r = super::Reader::new(data);
            let config = r.u8();
            let capacity = r.u64();
            let max_descriptors = r.u8();
            let seg_max = r.u8();
            let head = r.u16();
            let n = r.u8();
            let descriptors = (0..n)
                .map(|_| Descriptor {
                    addr: r.u64(),
                    len: r.u32(),
                    flags: r.u16(),
                    next: r.u16(),
                })
                .collect();
            let mut patches = Vec::new();
            while !r.is_empty() {
                let addr = r.u32();
                let len = r.u16() as usize;
                patches.push((addr, r.bytes(len).to_vec()));
            }
            Input {
                read_only: config & 1 != 0,
                event_idx: config & 2 != 0,
                queue_size_exp: config >> 4,
                capacity,
                max_descriptors,
                seg_max,
                head,
                descriptors,
                patches,
            }
        }

        pub fn encode(&self) -> Vec<u8> {
            let mut w = super::Writer::default();
            w.u8(u8::from(self.read_only)
                | u8::from(self.event_idx) << 1
                | self.queue_size_exp << 4)
                .u64(self.capacity)
                .u8(self.max_descriptors)
                .u8(self.seg_max)
                .u16(self.head)
                .u8(self.descriptors.len() as u8);
            for d in &self.descriptors {
                w.u64(d.addr).u32(d.len).u16(d.flags).u16(d.next);
            }
            for (addr, bytes) in &self.patches {
                w.u32(*addr).u16(bytes.len() as u16).bytes(bytes);
            }
            w.data
        }
    }
}

/// `vhost_user_messages`: frames sent by a fake VMM to a real block card
/// backend over its vhost-user socket.
///
/// ```text
/// frames, to the end of the input; each starts with u8 op:
///   op < 0x80   a message: 12 header bytes {u32 request, u32 flags,
///               u32 size}, u16 body length (at most 4096), the body; sent
///               with one sendmsg carrying the fds op's bits choose:
///               bit 0 the guest memory memfd, bit 1 eventfd A, bit 2 eventfd B
///   0x80..0xc0  a guest memory write: u32 offset (modulo the memfd size),
///               u16 length, bytes
///   0xc0..      a kick: write 1 to eventfd A (op bit 0 clear) or B (set)
/// ```
pub mod vhost_user {
    /// Size of the guest memory memfd.
    pub const MEM_SIZE: u64 = 0x4_0000;
    pub const MAX_BODY: usize = 4096;
    pub const FD_MEM: u8 = 1;
    pub const FD_A: u8 = 2;
    pub const FD_B: u8 = 4;

    pub enum Frame {
        Message {
            fds: u8,
            request: u32,
            flags: u32,
            size: u32,
            body: Vec<u8>,
        },
        Write {
            offset: u32,
            bytes: Vec<u8>,
        },
        Kick {
            b: bool,
        },
    }

    pub fn decode(data: &[u8]) -> Vec<Frame> {
        let mut r = super::Reader::new(data);
        let mut frames = Vec::new();
        while !r.is_empty() {
            let op = r.u8();
            frames.push(match op {
                0..0x80 => {
                    let (request, flags, size) = (r.u32(), r.u32(), r.u32());
                    let len = (r.u16() as usize).min(MAX_BODY);
                    Frame::Message {
                        fds: op & 7,
                        request,
                        flags,
                        size,
                        body: r.bytes(len).to_vec(),
                    }
                }
                0x80..0xc0 => {
                    let offset = r.u32();
                    let len = r.u16() as usize;
                    Frame::Write {
                        offset,
                        bytes: r.bytes(len).to_vec(),
                    }
                }
                _ => Frame::Kick { b: op & 1 != 0 },
            });
        }
        frames
    }

    pub fn encode(frames: &[Frame]) -> Vec<u8> {
        let mut w = super::Writer::default();
        for f in frames {
            match f {
                Frame::Message {
                    fds,
                    request,
                    flags,
                    size,
                    body,
                } => {
                    w.u8(*fds & 7)
                        .u32(*request)
                        .u32(*flags)
                        .u32(*size)
                        .u16(body.len() as u16)
                        .bytes(body);
                }
                Frame::Write { offset, bytes } => {
                    w.u8(0x80).u32(*offset).u16(bytes.len() as u16).bytes(bytes);
                }
                Frame::Kick { b } => {
                    w.u8(0xc0 | u8::from(*b));
                }
            }
        }
        w.data
    }
}

/// `agent_protocol`: the first byte chooses the form, the rest is text.
///
/// ```text
/// byte 0 % 3 == 0: the rest is a `--fault` CLI spec (FaultSpec::from_str)
/// byte 0 % 3 == 1: agent socket lines after the hello, one JSON request a line
/// byte 0 % 3 == 2: agent socket lines from the connection's first (the hello fuzzed too)
/// ```
pub mod agent {
    pub const CLI: u8 = 0;
    pub const JSON: u8 = 1;
    pub const RAW: u8 = 2;

    pub fn encode(form: u8, text: &str) -> Vec<u8> {
        let mut v = vec![form];
        v.extend_from_slice(text.as_bytes());
        v
    }
}
