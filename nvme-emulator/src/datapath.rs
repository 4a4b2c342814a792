//! Walking a command's data pointer: PRP entries and lists, or SGL
//! descriptors and segments, into the guest address ranges that hold its
//! data. Every pointer and length comes from the driver and is checked here:
//! offsets and alignment against the spec, list reads against the DMA
//! space, totals against the transfer length, and the number of descriptors
//! against a bound, so a loop or a huge list cannot keep the card busy.

use crate::dma::DmaMemory;
use crate::spec::{Command, Status, PAGE_SIZE};

/// At most this many SGL descriptors (data blocks and segment pointers) per
/// command; more is "Invalid Number of SGL Descriptors".
pub const MAX_SGL_DESCRIPTORS: usize = 256;

/// A guest-physical range of a command's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u64,
}

/// SGL descriptor types (byte 15, bits 7:4).
mod sgl {
    pub const DATA_BLOCK: u8 = 0x0;
    pub const SEGMENT: u8 = 0x2;
    pub const LAST_SEGMENT: u8 = 0x3;
}

/// The ranges holding `len` bytes of `cmd`'s data. `allow_sgl` is false for
/// admin commands, which must use PRPs on PCIe.
pub fn data_segments(
    mem: &dyn DmaMemory,
    cmd: &Command,
    len: u64,
    allow_sgl: bool,
) -> Result<Vec<Segment>, Status> {
    match cmd.psdt() {
        0 => prp_segments(mem, cmd.prp1(), cmd.prp2(), len),
        1 | 2 if allow_sgl => sgl_segments(mem, &cmd.sgl(), len),
        _ => Err(Status::INVALID_FIELD),
    }
}

fn prp_segments(
    mem: &dyn DmaMemory,
    prp1: u64,
    prp2: u64,
    len: u64,
) -> Result<Vec<Segment>, Status> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if prp1 & 3 != 0 {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let first = len.min(PAGE_SIZE - prp1 % PAGE_SIZE);
    let mut segments = vec![Segment {
        addr: prp1,
        len: first,
    }];
    let mut remaining = len - first;
    if remaining == 0 {
        return Ok(segments);
    }
    if remaining <= PAGE_SIZE {
        if prp2 % PAGE_SIZE != 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        segments.push(Segment {
            addr: prp2,
            len: remaining,
        });
        return Ok(segments);
    }
    // PRP2 points at a PRP list, which may start inside a page; the last
    // entry of a full list page points at the next list page.
    if prp2 & 7 != 0 {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let mut list = prp2;
    loop {
        let entries_in_page = (PAGE_SIZE - list % PAGE_SIZE) / 8;
        let pages_left = remaining.div_ceil(PAGE_SIZE);
        // Use every entry for data if the rest fits this page; else the last
        // one chains to the next page.
        let data_entries = if pages_left <= entries_in_page {
            pages_left
        } else {
            entries_in_page - 1
        };
        for i in 0..data_entries {
            let entry = mem
                .read_u64(list + i * 8)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            if entry % PAGE_SIZE != 0 {
                return Err(Status::INVALID_PRP_OFFSET);
            }
            let chunk = remaining.min(PAGE_SIZE);
            push_merged(&mut segments, entry, chunk);
            remaining -= chunk;
        }
        if remaining == 0 {
            return Ok(segments);
        }
        let next = mem
            .read_u64(list + data_entries * 8)
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        if next % PAGE_SIZE != 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        list = next;
    }
}

fn push_merged(segments: &mut Vec<Segment>, addr: u64, len: u64) {
    if let Some(last) = segments.last_mut() {
        if last.addr.checked_add(last.len) == Some(addr) {
            last.len += len;
            return;
        }
    }
    segments.push(Segment { addr, len });
}

struct Descriptor {
    addr: u64,
    len: u32,
    kind: u8,
    subtype: u8,
}

fn parse_descriptor(b: &[u8; 16]) -> Descriptor {
    Descriptor {
        addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        kind: b[15] >> 4,
        subtype: b[15] & 0xf,
    }
}

fn sgl_segments(mem: &dyn DmaMemory, first: &[u8; 16], len: u64) -> Result<Vec<Segment>, Status> {
    let mut segments = Vec::new();
    let mut total: u64 = 0;
    let mut seen = 0usize;
    let mut current = parse_descriptor(first);
    // Whether `current` came from a Last Segment (no more segment pointers).
    let mut in_last = false;
    loop {
        seen += 1;
        if seen > MAX_SGL_DESCRIPTORS {
            return Err(Status::INVALID_SGL_COUNT);
        }
        // Only address subtypes exist on PCIe.
        if current.subtype != 0 {
            return Err(Status::SGL_TYPE_INVALID);
        }
        match current.kind {
            sgl::DATA_BLOCK => {
                if current.len > 0 {
                    total = total.saturating_add(u64::from(current.len));
                    if total > len {
                        return Err(Status::DATA_SGL_LENGTH_INVALID);
                    }
                    push_merged(&mut segments, current.addr, u64::from(current.len));
                }
                // A data block in DPTR is the whole list.
                if seen == 1 {
                    break;
                }
                return Err(Status::INVALID_SGL_SEGMENT);
            }
            sgl::SEGMENT | sgl::LAST_SEGMENT => {
                if in_last {
                    return Err(Status::INVALID_SGL_SEGMENT);
                }
                let count = current.len as usize / 16;
                if current.len == 0 || current.len % 16 != 0 {
                    return Err(Status::INVALID_SGL_SEGMENT);
                }
                if seen + count > MAX_SGL_DESCRIPTORS + 1 {
                    return Err(Status::INVALID_SGL_COUNT);
                }
                let last_segment = current.kind == sgl::LAST_SEGMENT;
                let base = current.addr;
                let mut next: Option<Descriptor> = None;
                for i in 0..count {
                    let mut raw = [0u8; 16];
                    mem.read(base + i as u64 * 16, &mut raw)
                        .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
                    let d = parse_descriptor(&raw);
                    if d.subtype != 0 {
                        return Err(Status::SGL_TYPE_INVALID);
                    }
                    match d.kind {
                        sgl::DATA_BLOCK => {
                            seen += 1;
                            total = total.saturating_add(u64::from(d.len));
                            if total > len {
                                return Err(Status::DATA_SGL_LENGTH_INVALID);
                            }
                            if d.len > 0 {
                                push_merged(&mut segments, d.addr, u64::from(d.len));
                            }
                        }
                        // Only the last descriptor of a (non-last) segment
                        // may point at the next segment.
                        sgl::SEGMENT | sgl::LAST_SEGMENT if !last_segment && i + 1 == count => {
                            next = Some(d)
                        }
                        sgl::SEGMENT | sgl::LAST_SEGMENT => {
                            return Err(Status::INVALID_SGL_SEGMENT)
                        }
                        _ => return Err(Status::SGL_TYPE_INVALID),
                    }
                }
                match next {
                    Some(d) => {
                        in_last = false;
                        current = d;
                    }
                    None => {
                        if !last_segment {
                            // A Segment must end in a pointer to the next one.
                            return Err(Status::INVALID_SGL_SEGMENT);
                        }
                        break;
                    }
                }
            }
            _ => return Err(Status::SGL_TYPE_INVALID),
        }
    }
    if total != len {
        return Err(Status::DATA_SGL_LENGTH_INVALID);
    }
    Ok(segments)
}

/// Copies `data` into the guest ranges, in order.
pub fn copy_to_guest(mem: &dyn DmaMemory, segments: &[Segment], data: &[u8]) -> Result<(), Status> {
    let mut at = 0usize;
    for s in segments {
        let n = (s.len as usize).min(data.len() - at);
        mem.write(s.addr, &data[at..at + n])
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        at += n;
        if at == data.len() {
            break;
        }
    }
    Ok(())
}

/// Copies the guest ranges into `buf`, in order.
pub fn copy_from_guest(
    mem: &dyn DmaMemory,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<(), Status> {
    let mut at = 0usize;
    for s in segments {
        let n = (s.len as usize).min(buf.len() - at);
        mem.read(s.addr, &mut buf[at..at + n])
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        at += n;
        if at == buf.len() {
            break;
        }
    }
    Ok(())
}

/// Host iovecs for the guest ranges; each range must lie in one mapped
/// region (writable when the media writes into it, i.e. for reads).
pub fn iovecs(
    mem: &dyn DmaMemory,
    segments: &[Segment],
    guest_written: bool,
) -> Result<Vec<libc::iovec>, Status> {
    segments
        .iter()
        .map(|s| {
            let base = mem
                .host_range(s.addr, s.len, guest_written)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            Ok(libc::iovec {
                iov_base: base.cast(),
                iov_len: s.len as usize,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{DmaRegion, DmaSpace};

    const BASE: u64 = 0x10_0000;

    fn space() -> DmaSpace {
        DmaSpace::default().with(DmaRegion::heap(BASE, 64 << 10))
    }

    fn sgl_cmd(addr: u64, len: u32, kind: u8) -> Command {
        let mut c = Command::new(crate::spec::io::READ, 1);
        c.dw[0] |= 1 << 14;
        c.dw[6] = addr as u32;
        c.dw[7] = (addr >> 32) as u32;
        c.dw[8] = len;
        c.dw[9] = u32::from(kind << 4) << 24;
        c
    }

    fn descriptor(addr: u64, len: u32, kind: u8) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[15] = kind << 4;
        d
    }

    #[test]
    fn prp_with_offset_spans_two_pages() {
        let mem = space();
        let cmd = Command::new(0, 0).with_prp(BASE + 0x800, BASE + 0x4000);
        let s = data_segments(&mem, &cmd, 4096, true).unwrap();
        assert_eq!(
            s,
            [
                Segment {
                    addr: BASE + 0x800,
                    len: 0x800
                },
                Segment {
                    addr: BASE + 0x4000,
                    len: 0x800
                }
            ]
        );
    }

    #[test]
    fn prp_lists_chain_across_pages() {
        let mem = space();
        // A list that starts 16 bytes before the end of its page: one data
        // entry, then a pointer to a second list page.
        let list = BASE + 0x1000 - 16;
        mem.write(list, &(BASE + 0x8000).to_le_bytes()).unwrap();
        mem.write(list + 8, &(BASE + 0x2000).to_le_bytes()).unwrap();
        mem.write(BASE + 0x2000, &(BASE + 0xa000).to_le_bytes())
            .unwrap();
        mem.write(BASE + 0x2008, &(BASE + 0xb000).to_le_bytes())
            .unwrap();
        let cmd = Command::new(0, 0).with_prp(BASE + 0x7000, list);
        let s = data_segments(&mem, &cmd, 4 * 4096, true).unwrap();
        assert_eq!(
            s,
            [
                Segment {
                    addr: BASE + 0x7000,
                    len: 0x2000
                },
                Segment {
                    addr: BASE + 0xa000,
                    len: 0x2000
                }
            ]
        );
    }

    #[test]
    fn misaligned_prps_are_invalid_prp_offsets() {
        let mem = space();
        for (p1, p2, len) in [
            (BASE + 2, 0, 512),
            (BASE, BASE + 0x2004, 8192),
            (BASE, BASE + 0x2003, 3 * 4096),
        ] {
            let cmd = Command::new(0, 0).with_prp(p1, p2);
            assert_eq!(
                data_segments(&mem, &cmd, len, true),
                Err(Status::INVALID_PRP_OFFSET),
                "{p1:#x} {p2:#x} {len}"
            );
        }
        // A list entry with an offset.
        mem.write(BASE + 0x3000, &(BASE + 0x10).to_le_bytes())
            .unwrap();
        let cmd = Command::new(0, 0).with_prp(BASE, BASE + 0x3000);
        assert_eq!(
            data_segments(&mem, &cmd, 3 * 4096, true),
            Err(Status::INVALID_PRP_OFFSET)
        );
    }

    #[test]
    fn a_prp_list_outside_memory_is_a_data_transfer_error() {
        let mem = space();
        let cmd = Command::new(0, 0).with_prp(BASE, 0x7000_0000);
        assert_eq!(
            data_segments(&mem, &cmd, 3 * 4096, true),
            Err(Status::DATA_TRANSFER_ERROR)
        );
    }

    #[test]
    fn sgl_data_block_and_segments() {
        let mem = space();
        let cmd = sgl_cmd(BASE + 0x100, 512, sgl::DATA_BLOCK);
        assert_eq!(
            data_segments(&mem, &cmd, 512, true).unwrap(),
            [Segment {
                addr: BASE + 0x100,
                len: 512
            }]
        );
        // Segment (2 data blocks + pointer) → last segment (1 data block).
        let seg1 = BASE + 0x1000;
        let seg2 = BASE + 0x2000;
        mem.write(seg1, &descriptor(BASE + 0x4000, 1024, sgl::DATA_BLOCK))
            .unwrap();
        mem.write(seg1 + 16, &descriptor(BASE + 0x8000, 512, sgl::DATA_BLOCK))
            .unwrap();
        mem.write(seg1 + 32, &descriptor(seg2, 16, sgl::LAST_SEGMENT))
            .unwrap();
        mem.write(seg2, &descriptor(BASE + 0x8200, 512, sgl::DATA_BLOCK))
            .unwrap();
        let cmd = sgl_cmd(seg1, 48, sgl::SEGMENT);
        assert_eq!(
            data_segments(&mem, &cmd, 2048, true).unwrap(),
            [
                Segment {
                    addr: BASE + 0x4000,
                    len: 1024
                },
                Segment {
                    addr: BASE + 0x8000,
                    len: 1024
                }
            ]
        );
        // Lengths that do not add up.
        assert_eq!(
            data_segments(&mem, &cmd, 4096, true),
            Err(Status::DATA_SGL_LENGTH_INVALID)
        );
        assert_eq!(
            data_segments(&mem, &cmd, 1024, true),
            Err(Status::DATA_SGL_LENGTH_INVALID)
        );
    }

    #[test]
    fn bad_sgl_descriptors_get_their_status() {
        let mem = space();
        // Bit bucket (type 1) and keyed data block (type 4) are not supported.
        for kind in [1u8, 4, 0xf] {
            let cmd = sgl_cmd(BASE, 512, kind);
            assert_eq!(
                data_segments(&mem, &cmd, 512, true),
                Err(Status::SGL_TYPE_INVALID)
            );
        }
        // A segment length that is not a multiple of 16.
        let cmd = sgl_cmd(BASE, 20, sgl::LAST_SEGMENT);
        assert_eq!(
            data_segments(&mem, &cmd, 512, true),
            Err(Status::INVALID_SGL_SEGMENT)
        );
        // A last segment that points at another segment.
        mem.write(BASE, &descriptor(BASE + 0x1000, 16, sgl::SEGMENT))
            .unwrap();
        let cmd = sgl_cmd(BASE, 16, sgl::LAST_SEGMENT);
        assert_eq!(
            data_segments(&mem, &cmd, 512, true),
            Err(Status::INVALID_SGL_SEGMENT)
        );
        // A segment outside memory.
        let cmd = sgl_cmd(0x9000_0000, 16, sgl::LAST_SEGMENT);
        assert_eq!(
            data_segments(&mem, &cmd, 512, true),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        // A segment that points at itself loops until the descriptor bound.
        mem.write(BASE + 0x100, &descriptor(BASE + 0x100, 16, sgl::SEGMENT))
            .unwrap();
        let cmd = sgl_cmd(BASE + 0x100, 16, sgl::SEGMENT);
        assert_eq!(
            data_segments(&mem, &cmd, 512, true),
            Err(Status::INVALID_SGL_COUNT)
        );
        // Admin commands may not use SGLs.
        let cmd = sgl_cmd(BASE, 512, sgl::DATA_BLOCK);
        assert_eq!(
            data_segments(&mem, &cmd, 512, false),
            Err(Status::INVALID_FIELD)
        );
    }

    #[test]
    fn iovecs_refuse_ranges_outside_one_region() {
        let mem = space();
        let ok = [Segment {
            addr: BASE,
            len: 4096,
        }];
        assert_eq!(iovecs(&mem, &ok, true).unwrap().len(), 1);
        let bad = [Segment {
            addr: BASE + (64 << 10) - 8,
            len: 16,
        }];
        assert_eq!(
            iovecs(&mem, &bad, true).err(),
            Some(Status::DATA_TRANSFER_ERROR)
        );
    }
}
