//! Parsing a virtio-blk request from a descriptor chain.
//!
//! Everything here is guest-controlled and checked before use (VIRTIO 1.2
//! §5.2.6): the chain's shape (a device-readable header first, a
//! device-writable status byte last, data in between with the direction the
//! request type demands), every address against guest memory, lengths against
//! the 512-byte sector, and the sector range against the volume's capacity
//! with overflow-checked arithmetic. A request that fails any check is
//! reported with the status the guest should see; it never reaches the media.

use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap,
};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;

use card_firmware::media::SECTOR_SIZE;

/// Size of `struct virtio_blk_outhdr`: type, reserved (ioprio), sector.
pub const HEADER_LEN: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const RANGE_SEGMENT_LEN: u32 = 16;
/// Discard and write-zeroes requests carry one range (we advertise
/// max_discard_seg = max_write_zeroes_seg = 1).
pub const MAX_RANGE_SEGMENTS: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes { unmap: bool },
}

/// Why a request was refused. Each maps to the status the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is broken (loops, too long, or points outside the table)")]
    BrokenChain,
    #[error("descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("descriptor chain lacks a header or a status descriptor")]
    MissingDescriptor,
    #[error("request header is shorter than {HEADER_LEN} bytes or device-writable")]
    BadHeader,
    #[error("status descriptor is empty or not device-writable")]
    BadStatus,
    #[error("descriptor points outside guest memory")]
    OutsideGuestMemory,
    #[error("data descriptor has the wrong direction for this request")]
    WrongDirection,
    #[error("data length is not a multiple of {SECTOR_SIZE} bytes")]
    UnalignedLength,
    #[error("sector range lies past the end of the volume")]
    OutOfRange,
    #[error("request has more data segments than the device's seg_max")]
    TooManySegments,
    #[error("discard or write-zeroes range list is malformed")]
    BadRangeList,
    #[error("write to a read-only volume")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("unsupported discard or write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
}

impl RequestError {
    /// Unsupported requests get VIRTIO_BLK_S_UNSUPP; everything else IOERR.
    pub fn is_unsupported(self) -> bool {
        matches!(
            self,
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_)
        )
    }
}

/// A request that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Byte offset on the volume (reads, writes, discard, write-zeroes).
    pub offset: u64,
    /// Bytes to transfer, or the length of the discarded / zeroed range.
    pub len: u64,
    /// Where GET_ID writes the serial, and how much room it has.
    pub id_buffer: Option<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

/// A request that failed; `status` is where to report it, when the chain
/// had a usable status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

/// Host-side scatter list of a read or write, pointing into guest memory.
///
/// Capacity is fixed when a queue starts, so parsing never allocates.
pub struct IoVecs {
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the pointers refer to guest memory mappings, which the queue keeps
// alive (by holding the memory snapshot) for as long as the iovecs are used.
unsafe impl Send for IoVecs {}

impl IoVecs {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            iovecs: Vec::with_capacity(capacity),
        }
    }

    pub fn as_ptr(&self) -> *const libc::iovec {
        self.iovecs.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.iovecs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.iovecs.is_empty()
    }

    pub fn clear(&mut self) {
        self.iovecs.clear();
    }

    fn push(&mut self, base: *mut u8, len: usize) -> Result<(), RequestError> {
        if self.iovecs.len() == self.iovecs.capacity() {
            return Err(RequestError::TooManySegments);
        }
        self.iovecs.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
        Ok(())
    }
}

/// Per-queue scratch space reused for every request.
pub struct Scratch {
    descriptors: Vec<Descriptor>,
}

impl Scratch {
    /// Room for a chain of `max_descriptors` (header + data + status).
    pub fn new(max_descriptors: usize) -> Self {
        Self {
            descriptors: Vec::with_capacity(max_descriptors),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Header {
    request_type: u32,
    _ioprio: u32,
    sector: u64,
}
// SAFETY: plain old data, every bit pattern valid.
unsafe impl ByteValued for Header {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RangeSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain old data, every bit pattern valid.
unsafe impl ByteValued for RangeSegment {}

/// What the parser needs to know about the volume.
#[derive(Clone, Copy, Debug)]
pub struct Volume {
    pub capacity: u64,
    pub read_only: bool,
}

/// Checks `chain` and, for reads and writes, fills `iovecs` with the host
/// addresses of its data buffers.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    volume: Volume,
    scratch: &mut Scratch,
    iovecs: &mut IoVecs,
) -> Result<Request, Refused>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    iovecs.clear();
    let descriptors = &mut scratch.descriptors;
    descriptors.clear();
    let refuse = |error| Refused {
        error,
        status: None,
    };

    let limit = descriptors.capacity();
    for descriptor in chain {
        if descriptors.len() == limit {
            return Err(refuse(RequestError::TooManyDescriptors(limit)));
        }
        descriptors.push(descriptor);
    }
    // The iterator stops silently on a loop, a bad index or a bad indirect
    // table; a last descriptor that still claims a successor gives it away.
    match descriptors.last() {
        None => return Err(refuse(RequestError::MissingDescriptor)),
        Some(last) if last.has_next() => return Err(refuse(RequestError::BrokenChain)),
        Some(_) => {}
    }
    if descriptors.len() < 2 {
        return Err(refuse(RequestError::MissingDescriptor));
    }

    let status_desc = descriptors[descriptors.len() - 1];
    if !status_desc.is_write_only() || status_desc.len() == 0 {
        return Err(refuse(RequestError::BadStatus));
    }
    if !GuestMemoryBackend::check_range(mem, status_desc.addr(), 1) {
        return Err(refuse(RequestError::OutsideGuestMemory));
    }
    let status = status_desc.addr();
    let refuse = |error| Refused {
        error,
        status: Some(status),
    };

    let header_desc = descriptors[0];
    if header_desc.is_write_only() || header_desc.len() < HEADER_LEN {
        return Err(refuse(RequestError::BadHeader));
    }
    let header: Header = mem
        .read_obj(header_desc.addr())
        .map_err(|_| refuse(RequestError::OutsideGuestMemory))?;
    let request_type = u32::from_le(header.request_type);
    let sector = u64::from_le(header.sector);
    let data = &descriptors[1..descriptors.len() - 1];

    let kind = match request_type {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes { unmap: false },
        other => return Err(refuse(RequestError::UnsupportedType(other))),
    };
    let device_writes_data = matches!(kind, RequestKind::Read | RequestKind::GetId);
    if data.iter().any(|d| d.is_write_only() != device_writes_data) {
        return Err(refuse(RequestError::WrongDirection));
    }
    if volume.read_only
        && matches!(
            kind,
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes { .. }
        )
    {
        return Err(refuse(RequestError::ReadOnly));
    }

    let mut request = Request {
        kind,
        offset: 0,
        len: 0,
        id_buffer: None,
        status,
    };
    match kind {
        RequestKind::Read | RequestKind::Write => {
            let mut len: u64 = 0;
            for d in data {
                len += u64::from(d.len());
                for slice in GuestMemoryBackend::get_slices(mem, d.addr(), d.len() as usize) {
                    let slice = slice.map_err(|_| refuse(RequestError::OutsideGuestMemory))?;
                    iovecs
                        .push(slice.ptr_guard_mut().as_ptr(), slice.len())
                        .map_err(refuse)?;
                }
            }
            if len % SECTOR_SIZE != 0 {
                return Err(refuse(RequestError::UnalignedLength));
            }
            request.offset = checked_range(sector, len, volume.capacity).map_err(refuse)?;
            request.len = len;
        }
        RequestKind::Flush => {}
        RequestKind::GetId => {
            let d = data
                .first()
                .ok_or(refuse(RequestError::MissingDescriptor))?;
            if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
                return Err(refuse(RequestError::OutsideGuestMemory));
            }
            request.id_buffer = Some((d.addr(), d.len()));
        }
        RequestKind::Discard | RequestKind::WriteZeroes { .. } => {
            // One segment, in one descriptor: what Linux sends with
            // max_discard_seg = 1.
            let [d] = data else {
                return Err(refuse(RequestError::BadRangeList));
            };
            if d.len() != RANGE_SEGMENT_LEN * MAX_RANGE_SEGMENTS {
                return Err(refuse(RequestError::BadRangeList));
            }
            let segment: RangeSegment = mem
                .read_obj(d.addr())
                .map_err(|_| refuse(RequestError::OutsideGuestMemory))?;
            let flags = u32::from_le(segment.flags);
            let allowed = match kind {
                RequestKind::WriteZeroes { .. } => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                _ => 0,
            };
            if flags & !allowed != 0 {
                return Err(refuse(RequestError::UnsupportedFlags(flags)));
            }
            if let RequestKind::WriteZeroes { .. } = kind {
                request.kind = RequestKind::WriteZeroes {
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                };
            }
            let len = u64::from(u32::from_le(segment.num_sectors)) * SECTOR_SIZE;
            request.offset = checked_range(u64::from_le(segment.sector), len, volume.capacity)
                .map_err(refuse)?;
            request.len = len;
        }
    }
    Ok(request)
}

/// Byte offset of `sector`, if `[sector, sector + len)` lies within `capacity`.
fn checked_range(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::OutOfRange)?;
    let end = offset.checked_add(len).ok_or(RequestError::OutOfRange)?;
    if end > capacity {
        return Err(RequestError::OutOfRange);
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    const MEM_SIZE: usize = 0x100_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const CAPACITY: u64 = 1 << 20;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    struct Fixture {
        mem: GuestMemoryMmap,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            }
        }

        fn header(&self, request_type: u32, sector: u64) {
            let h = Header {
                request_type: request_type.to_le(),
                _ioprio: 0,
                sector: sector.to_le(),
            };
            self.mem.write_obj(h, GuestAddress(HDR)).unwrap();
        }

        fn range(&self, sector: u64, num_sectors: u32, flags: u32) {
            let r = RangeSegment {
                sector: sector.to_le(),
                num_sectors: num_sectors.to_le(),
                flags: flags.to_le(),
            };
            self.mem.write_obj(r, GuestAddress(DATA)).unwrap();
        }

        /// Parses a chain of `(addr, len, flags)` descriptors.
        fn parse_with(
            &self,
            descs: &[(u64, u32, u16)],
            volume: Volume,
            max_descriptors: usize,
        ) -> Result<Request, Refused> {
            let queue = MockSplitQueue::new(&self.mem, 256);
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
                .collect();
            let chain = queue.build_desc_chain(&raw).unwrap();
            let mut scratch = Scratch::new(max_descriptors);
            let mut iovecs = IoVecs::with_capacity(8);
            parse(chain, &self.mem, volume, &mut scratch, &mut iovecs)
        }

        fn parse(&self, descs: &[(u64, u32, u16)]) -> Result<Request, Refused> {
            self.parse_with(descs, VOLUME, 16)
        }
    }

    const VOLUME: Volume = Volume {
        capacity: CAPACITY,
        read_only: false,
    };

    fn error(result: Result<Request, Refused>) -> RequestError {
        result.expect_err("request should be refused").error
    }

    #[test]
    fn a_read_is_parsed_with_its_offset_and_length() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 8);
        let r = f
            .parse(&[(HDR, 16, 0), (DATA, 4096, W), (STATUS, 1, W)])
            .unwrap();
        assert_eq!(r.kind, RequestKind::Read);
        assert_eq!(r.offset, 8 * 512);
        assert_eq!(r.len, 4096);
        assert_eq!(r.status, GuestAddress(STATUS));
    }

    #[test]
    fn a_write_of_several_buffers_adds_up() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_OUT, 0);
        let r = f
            .parse(&[
                (HDR, 16, 0),
                (DATA, 512, 0),
                (DATA + 4096, 1024, 0),
                (STATUS, 1, W),
            ])
            .unwrap();
        assert_eq!((r.kind, r.len), (RequestKind::Write, 1536));
    }

    #[test]
    fn a_descriptor_outside_guest_memory_is_refused_with_a_status() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        let refused = f
            .parse(&[
                (HDR, 16, 0),
                (MEM_SIZE as u64 - 512, 4096, W),
                (STATUS, 1, W),
            ])
            .unwrap_err();
        assert_eq!(refused.error, RequestError::OutsideGuestMemory);
        assert_eq!(refused.status, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn a_header_outside_guest_memory_is_refused() {
        let f = Fixture::new();
        assert_eq!(
            error(f.parse(&[(u64::MAX - 8, 16, 0), (STATUS, 1, W)])),
            RequestError::OutsideGuestMemory
        );
    }

    #[test]
    fn a_status_outside_guest_memory_is_refused_without_a_status() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        let refused = f
            .parse(&[(HDR, 16, 0), (MEM_SIZE as u64, 1, W)])
            .unwrap_err();
        assert_eq!(refused.error, RequestError::OutsideGuestMemory);
        assert_eq!(refused.status, None);
    }

    #[test]
    fn a_looping_chain_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        let queue = MockSplitQueue::new(&f.mem, 16);
        let n = VRING_DESC_F_NEXT as u16;
        // 0 -> 1 -> 0 -> ...
        let raw = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, n, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, n | W, 0)),
        ];
        let chain = queue.build_multiple_desc_chains(&raw).unwrap();
        let mut scratch = Scratch::new(64);
        let mut iovecs = IoVecs::with_capacity(8);
        let refused = parse(chain, &f.mem, VOLUME, &mut scratch, &mut iovecs).unwrap_err();
        assert_eq!(refused.error, RequestError::BrokenChain);
    }

    #[test]
    fn a_next_index_outside_the_table_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        let queue = MockSplitQueue::new(&f.mem, 16);
        let n = VRING_DESC_F_NEXT as u16;
        let raw = [RawDescriptor::from(SplitDescriptor::new(HDR, 16, n, 999))];
        let chain = queue.build_multiple_desc_chains(&raw).unwrap();
        let mut scratch = Scratch::new(64);
        let mut iovecs = IoVecs::with_capacity(8);
        let refused = parse(chain, &f.mem, VOLUME, &mut scratch, &mut iovecs).unwrap_err();
        assert_eq!(refused.error, RequestError::BrokenChain);
    }

    #[test]
    fn an_overlong_chain_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![(HDR, 16, 0)];
        descs.extend((0..8).map(|i| (DATA + i * 512, 512, W)));
        descs.push((STATUS, 1, W));
        assert_eq!(
            error(f.parse_with(&descs, VOLUME, 4)),
            RequestError::TooManyDescriptors(4)
        );
    }

    #[test]
    fn more_segments_than_seg_max_are_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![(HDR, 16, 0)];
        descs.extend((0..9).map(|i| (DATA + i * 512, 512, W)));
        descs.push((STATUS, 1, W));
        // IoVecs holds 8 in the fixture.
        assert_eq!(
            error(f.parse_with(&descs, VOLUME, 64)),
            RequestError::TooManySegments
        );
    }

    #[test]
    fn an_indirect_table_is_followed() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        let table = GuestAddress(0x40_0000);
        let n = VRING_DESC_F_NEXT as u16;
        let inner = [
            SplitDescriptor::new(HDR, 16, n, 1),
            SplitDescriptor::new(DATA, 4096, n | W, 2),
            SplitDescriptor::new(STATUS, 1, W, 0),
        ];
        for (i, d) in inner.iter().enumerate() {
            f.mem
                .write_obj(RawDescriptor::from(*d), table.unchecked_add(16 * i as u64))
                .unwrap();
        }
        let queue = MockSplitQueue::new(&f.mem, 16);
        let raw = [RawDescriptor::from(SplitDescriptor::new(
            table.0,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))];
        let chain = queue.build_multiple_desc_chains(&raw).unwrap();
        let mut scratch = Scratch::new(64);
        let mut iovecs = IoVecs::with_capacity(8);
        let r = parse(chain, &f.mem, VOLUME, &mut scratch, &mut iovecs).unwrap();
        assert_eq!((r.kind, r.len), (RequestKind::Read, 4096));
        assert_eq!(iovecs.len(), 1);
    }

    #[test]
    fn a_missing_status_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0)])),
            RequestError::MissingDescriptor
        );
    }

    #[test]
    fn a_readable_or_empty_status_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (STATUS, 1, 0)])),
            RequestError::BadStatus
        );
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (STATUS, 0, W)])),
            RequestError::BadStatus
        );
    }

    #[test]
    fn a_short_or_writable_header_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            error(f.parse(&[(HDR, 8, 0), (DATA, 512, W), (STATUS, 1, W)])),
            RequestError::BadHeader
        );
        assert_eq!(
            error(f.parse(&[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)])),
            RequestError::BadHeader
        );
    }

    #[test]
    fn a_buffer_of_the_wrong_direction_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)])),
            RequestError::WrongDirection
        );
        f.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)])),
            RequestError::WrongDirection
        );
    }

    #[test]
    fn a_range_past_capacity_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_IN, CAPACITY / 512 - 1);
        assert!(f
            .parse(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)])
            .is_ok());
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)])),
            RequestError::OutOfRange
        );
    }

    #[test]
    fn a_sector_that_overflows_u64_is_refused() {
        let f = Fixture::new();
        for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 - 1] {
            f.header(VIRTIO_BLK_T_IN, sector);
            assert_eq!(
                error(f.parse(&[(HDR, 16, 0), (DATA, 4096, W), (STATUS, 1, W)])),
                RequestError::OutOfRange
            );
        }
    }

    #[test]
    fn a_length_not_a_multiple_of_512_is_refused() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (DATA, 513, 0), (STATUS, 1, W)])),
            RequestError::UnalignedLength
        );
    }

    #[test]
    fn an_unknown_type_is_unsupported() {
        let f = Fixture::new();
        f.header(0x7777, 0);
        let e = error(f.parse(&[(HDR, 16, 0), (STATUS, 1, W)]));
        assert_eq!(e, RequestError::UnsupportedType(0x7777));
        assert!(e.is_unsupported());
    }

    #[test]
    fn writes_to_a_read_only_volume_are_refused() {
        let f = Fixture::new();
        let ro = Volume {
            read_only: true,
            ..VOLUME
        };
        f.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            error(f.parse_with(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)], ro, 16)),
            RequestError::ReadOnly
        );
        f.header(VIRTIO_BLK_T_IN, 0);
        assert!(f
            .parse_with(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)], ro, 16)
            .is_ok());
    }

    #[test]
    fn discard_and_write_zeroes_take_one_checked_range() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_DISCARD, 0);
        f.range(16, 8, 0);
        let r = f
            .parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)])
            .unwrap();
        assert_eq!(
            (r.kind, r.offset, r.len),
            (RequestKind::Discard, 16 * 512, 4096)
        );

        f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        f.range(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let r = f
            .parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)])
            .unwrap();
        assert_eq!(r.kind, RequestKind::WriteZeroes { unmap: true });

        f.range(CAPACITY / 512, 1, 0);
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)])),
            RequestError::OutOfRange
        );
        f.range(0, 1, 0x80);
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)])),
            RequestError::UnsupportedFlags(0x80)
        );
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, W)])),
            RequestError::BadRangeList
        );
    }

    #[test]
    fn discard_takes_no_flags() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_DISCARD, 0);
        f.range(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert!(error(f.parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)])).is_unsupported());
    }

    #[test]
    fn get_id_needs_a_writable_buffer() {
        let f = Fixture::new();
        f.header(VIRTIO_BLK_T_GET_ID, 0);
        let r = f
            .parse(&[(HDR, 16, 0), (DATA, 20, W), (STATUS, 1, W)])
            .unwrap();
        assert_eq!(r.id_buffer, Some((GuestAddress(DATA), 20)));
        assert_eq!(
            error(f.parse(&[(HDR, 16, 0), (STATUS, 1, W)])),
            RequestError::MissingDescriptor
        );
    }
}
