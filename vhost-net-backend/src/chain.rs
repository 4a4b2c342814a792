//! Moving frames between descriptor chains and the card.
//!
//! TX: a guest's chain (vnet header + frame, device-readable only) is taken
//! and every descriptor checked ([`take_tx`]); only its head — the vnet header
//! and the first [`TX_HEAD`] bytes of the frame, every header the switch reads
//! — is copied into the worker's frame buffer. The switch decides on that
//! copy, so the guest cannot change what was checked (guest memory is shared
//! and the guest may write it at any time). The rest stays in the guest's
//! memory ([`TxChain`]) until it is needed: written straight into another
//! guest's receive buffers, or copied after the head when the card must work
//! on the whole frame (software GSO or checksum, VXLAN, the uplink).
//! RX: a frame — bytes the card holds, then possibly the rest of a TX chain
//! ([`Frame`]) — is written into a guest's receive buffers: one chain, or with
//! VIRTIO_NET_F_MRG_RXBUF as many as it takes, `num_buffers` set in the
//! header of the first. Nothing here trusts the guest: a chain that does not
//! fit the rules is refused with a [`ChainError`], counted by the caller, and
//! the queue stays usable.
//!
//! Buffers are owned by the caller and reused, so a frame costs no
//! allocation. Bytes copied are counted ([`CopyCounts`]): between guests on
//! one card, each payload byte is copied once.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Why a chain was refused. Each has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a TX chain holds a device-writable descriptor")]
    WriteOnlyInTx,
    #[error("an RX chain holds a device-readable descriptor")]
    ReadOnlyInRx,
    #[error("the chain is shorter than the vnet header")]
    Truncated,
    #[error("the chain is longer than the largest frame")]
    Oversized,
    #[error("a descriptor points outside guest memory")]
    BadAddress,
    #[error("no receive buffers available")]
    NoRxBuffers,
    #[error("the receive buffer is too small for the frame")]
    RxBufferTooSmall,
}

impl ChainError {
    pub const ALL: [ChainError; 7] = [
        ChainError::WriteOnlyInTx,
        ChainError::ReadOnlyInRx,
        ChainError::Truncated,
        ChainError::Oversized,
        ChainError::BadAddress,
        ChainError::NoRxBuffers,
        ChainError::RxBufferTooSmall,
    ];

    /// The counter name.
    pub fn name(self) -> &'static str {
        match self {
            ChainError::WriteOnlyInTx => "tx_write_only_descriptor",
            ChainError::ReadOnlyInRx => "rx_read_only_descriptor",
            ChainError::Truncated => "tx_truncated_chain",
            ChainError::Oversized => "tx_oversized_chain",
            ChainError::BadAddress => "bad_descriptor_address",
            ChainError::NoRxBuffers => "rx_no_buffers",
            ChainError::RxBufferTooSmall => "rx_buffer_too_small",
        }
    }

    pub fn index(self) -> usize {
        ChainError::ALL.iter().position(|e| *e == self).unwrap_or(0)
    }
}

/// Largest vnet header + frame a TX chain may carry: a 64 KiB IP packet
/// (GSO) behind an Ethernet header with one VLAN tag, and the header.
pub const MAX_TX_CHAIN: usize = 12 + 14 + 4 + 65535;

/// Bytes of a frame copied with its vnet header when a TX chain is taken:
/// every header the switch reads (`vpc::switch::DECISION_HEAD`).
pub const TX_HEAD: usize = vpc::switch::DECISION_HEAD;

/// Bytes copied by one worker, by where they went. Plain numbers: each
/// worker owns its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyCounts {
    /// From a guest's TX chain into the card (heads, and whole frames the
    /// card works on).
    pub tx_to_card: u64,
    /// From the card into a guest's receive buffers.
    pub card_to_rx: u64,
    /// Straight from one guest's TX chain into another's receive buffers.
    pub guest_to_guest: u64,
}

/// A TX chain taken from the ring and checked, its bytes still in the
/// guest's memory: where they are, in order. Reused for every chain.
#[derive(Debug, Default)]
pub struct TxChain {
    descs: Vec<(GuestAddress, u32)>,
    len: usize,
    /// Bytes at the start of the chain already copied into the card.
    copied: usize,
}

impl TxChain {
    pub fn with_capacity(descriptors: usize) -> Self {
        TxChain {
            descs: Vec::with_capacity(descriptors),
            len: 0,
            copied: 0,
        }
    }

    /// Bytes of the chain (vnet header and frame).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes at the start of the chain the card holds a copy of.
    pub fn copied(&self) -> usize {
        self.copied
    }

    /// Copies the chain's bytes `[self.copied, self.copied + out.len())` into
    /// `out` and counts them as copied.
    fn copy_next(
        &mut self,
        memory: &GuestMemoryMmap,
        out: &mut [u8],
        counts: &mut CopyCounts,
    ) -> Result<(), ChainError> {
        let mut at = 0usize;
        for (addr, n) in pieces(&self.descs, self.copied, out.len()) {
            memory
                .read_slice(&mut out[at..at + n], addr)
                .map_err(|_| ChainError::BadAddress)?;
            at += n;
        }
        self.copied += out.len();
        counts.tx_to_card += out.len() as u64;
        Ok(())
    }

    /// Copies what the card does not hold yet (the chain's bytes from
    /// [`TxChain::copied`] to its end) into `out`, which must be that long.
    pub fn copy_rest_into(
        &mut self,
        memory: &GuestMemoryMmap,
        out: &mut [u8],
        counts: &mut CopyCounts,
    ) -> Result<(), ChainError> {
        if out.len() != self.len - self.copied {
            return Err(ChainError::Oversized);
        }
        self.copy_next(memory, out, counts)
    }
}

/// The `(address, length)` pieces of `count` bytes at `offset` of a chain.
fn pieces(
    descs: &[(GuestAddress, u32)],
    offset: usize,
    count: usize,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut skip = offset;
    let mut left = count;
    descs.iter().filter_map(move |&(addr, len)| {
        let len = len as usize;
        if skip >= len {
            skip -= len;
            return None;
        }
        if left == 0 {
            return None;
        }
        let n = (len - skip).min(left);
        let at = addr.unchecked_add(skip as u64);
        skip = 0;
        left -= n;
        Some((at, n))
    })
}

/// Takes one TX chain: checks every descriptor (device-readable, inside guest
/// memory, at most [`MAX_TX_CHAIN`] bytes in all), lists them in `chain`, and
/// copies the vnet header and up to [`TX_HEAD`] bytes of the frame into
/// `buf[..chain.copied()]` (`buf` is at least [`MAX_TX_CHAIN`] long).
/// Returns the chain's head index either way, so it can be returned to the
/// guest, and the error if the chain is refused.
pub fn take_tx(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    header_len: usize,
    chain: &mut TxChain,
    buf: &mut [u8],
    counts: &mut CopyCounts,
) -> Option<(u16, Result<(), ChainError>)> {
    let descriptors = queue.pop_descriptor_chain(memory)?;
    let head = descriptors.head_index();
    chain.descs.clear();
    chain.len = 0;
    chain.copied = 0;
    let mut outcome = Ok(());
    for desc in descriptors {
        if desc.is_write_only() {
            outcome = Err(ChainError::WriteOnlyInTx);
            break;
        }
        let len = desc.len() as usize;
        let Some(end) = chain.len.checked_add(len).filter(|e| *e <= MAX_TX_CHAIN) else {
            outcome = Err(ChainError::Oversized);
            break;
        };
        // The whole descriptor, not only what is read now: the rest may be
        // read later, from another thread's point of view of the same memory.
        if len > 0 && !GuestMemoryBackend::check_range(memory, desc.addr(), len) {
            outcome = Err(ChainError::BadAddress);
            break;
        }
        if len > 0 {
            chain.descs.push((desc.addr(), len as u32));
        }
        chain.len = end;
    }
    if outcome.is_ok() && chain.len < header_len {
        outcome = Err(ChainError::Truncated);
    }
    if outcome.is_ok() {
        let n = chain.len.min(header_len + TX_HEAD).min(buf.len());
        outcome = chain.copy_next(memory, &mut buf[..n], counts);
    }
    Some((head, outcome))
}

/// One receive chain taken for a frame.
#[derive(Clone, Copy, Debug)]
struct RxChain {
    head: u16,
    /// The chain's descriptors in `RxScratch::descs`.
    descs: (usize, usize),
    /// Bytes written into it.
    used: u32,
}

/// Reused per worker: where one frame's receive buffers are listed, and the
/// bytes the worker wrote into receive buffers.
#[derive(Debug, Default)]
pub struct RxScratch {
    descs: Vec<(GuestAddress, u32)>,
    chains: Vec<RxChain>,
    pub copies: CopyCounts,
}

impl RxScratch {
    pub fn with_capacity(queue_size: usize) -> Self {
        RxScratch {
            descs: Vec::with_capacity(queue_size * 2),
            chains: Vec::with_capacity(queue_size),
            copies: CopyCounts::default(),
        }
    }
}

/// A frame on its way into receive buffers: bytes the card holds, then
/// (between guests) the rest of the sender's TX chain, read from its memory
/// as it is written.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    pub head: &'a [u8],
    pub tail: Option<GuestTail<'a>>,
}

/// The bytes of a TX chain from `offset` on, in the sending guest's memory.
#[derive(Clone, Copy)]
pub struct GuestTail<'a> {
    pub memory: &'a GuestMemoryMmap,
    pub chain: &'a TxChain,
    pub offset: usize,
}

impl GuestTail<'_> {
    fn len(&self) -> usize {
        self.chain.len.saturating_sub(self.offset)
    }
}

impl<'a> Frame<'a> {
    /// Copies the whole frame into `out` (replacing what it held).
    pub fn copy_into(&self, out: &mut Vec<u8>, counts: &mut CopyCounts) -> Result<(), ChainError> {
        out.clear();
        out.extend_from_slice(self.head);
        if let Some(t) = self.tail {
            let at = out.len();
            out.resize(at + t.len(), 0);
            let mut done = at;
            for (addr, n) in pieces(&t.chain.descs, t.offset, t.len()) {
                t.memory
                    .read_slice(&mut out[done..done + n], addr)
                    .map_err(|_| ChainError::BadAddress)?;
                done += n;
            }
            counts.tx_to_card += t.len() as u64;
        }
        Ok(())
    }

    /// A frame the card holds whole.
    pub fn held(bytes: &'a [u8]) -> Self {
        Frame {
            head: bytes,
            tail: None,
        }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.tail.map_or(0, |t| t.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes `header` (its first `header_len` bytes; num_buffers is filled in
/// here) followed by `frame` into the receive queue and adds the used
/// entries. Returns how many buffers the frame took; the caller signals the
/// guest. On `NoRxBuffers` nothing was taken from the queue; on a bad chain
/// the chains taken are returned to the guest empty.
pub fn deliver_rx(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    header: &[u8; 12],
    header_len: usize,
    frame: Frame<'_>,
    mrg_rxbuf: bool,
    scratch: &mut RxScratch,
) -> Result<u16, ChainError> {
    let header_len = header_len.min(header.len());
    let need = header_len + frame.len();
    let start = queue.next_avail();
    scratch.descs.clear();
    scratch.chains.clear();
    let mut capacity = 0usize;
    let mut bad = None;
    while capacity < need {
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            // Not enough buffers now: put back what was taken, drop the frame.
            queue.set_next_avail(start);
            return Err(ChainError::NoRxBuffers);
        };
        let first = scratch.descs.len();
        let head = chain.head_index();
        let mut chain_capacity = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                bad.get_or_insert(ChainError::ReadOnlyInRx);
                break;
            }
            scratch.descs.push((desc.addr(), desc.len()));
            chain_capacity += desc.len() as usize;
        }
        scratch.chains.push(RxChain {
            head,
            descs: (first, scratch.descs.len()),
            used: 0,
        });
        capacity += chain_capacity;
        if bad.is_some() {
            break;
        }
        if !mrg_rxbuf && capacity < need {
            bad = Some(ChainError::RxBufferTooSmall);
            break;
        }
        if mrg_rxbuf && scratch.chains.len() >= usize::from(u16::MAX) {
            bad = Some(ChainError::RxBufferTooSmall);
            break;
        }
    }
    if bad.is_none() {
        let num_buffers = scratch.chains.len() as u16;
        let mut hdr = *header;
        hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        if let Err(e) = write_frame(memory, scratch, &hdr[..header_len], frame) {
            bad = Some(e);
        }
    }
    if let Some(e) = bad {
        for c in &scratch.chains {
            let _ = queue.add_used(memory, c.head, 0);
        }
        return Err(e);
    }
    for c in &scratch.chains {
        // The head came from this queue; add_used only fails on a ring
        // address the guest made invalid, and then nothing more can be done.
        let _ = queue.add_used(memory, c.head, c.used);
    }
    Ok(scratch.chains.len() as u16)
}

/// Copies header then frame into the listed descriptors, in order.
fn write_frame(
    memory: &GuestMemoryMmap,
    scratch: &mut RxScratch,
    header: &[u8],
    frame: Frame<'_>,
) -> Result<(), ChainError> {
    let mut sources = [header, frame.head];
    let mut source = 0usize;
    // Bytes of the guest tail written so far.
    let mut tail_done = 0usize;
    let tail_len = frame.tail.map_or(0, |t| t.len());
    let RxScratch {
        descs,
        chains,
        copies,
    } = scratch;
    for chain in chains.iter_mut() {
        for &(addr, len) in &descs[chain.descs.0..chain.descs.1] {
            let mut at = addr;
            let mut room = len as usize;
            while room > 0 && source < sources.len() {
                let src = sources[source];
                let n = room.min(src.len());
                if n > 0 {
                    memory
                        .write_slice(&src[..n], at)
                        .map_err(|_| ChainError::BadAddress)?;
                    copies.card_to_rx += n as u64;
                    at = at.checked_add(n as u64).ok_or(ChainError::BadAddress)?;
                    room -= n;
                    chain.used += n as u32;
                }
                sources[source] = &src[n..];
                if sources[source].is_empty() {
                    source += 1;
                }
            }
            if source < sources.len() {
                continue;
            }
            if let Some(tail) = frame.tail {
                let n = room.min(tail_len - tail_done);
                if n > 0 {
                    copy_from_guest(tail, tail_done, n, memory, at)?;
                    copies.guest_to_guest += n as u64;
                    tail_done += n;
                    chain.used += n as u32;
                }
            }
            if tail_done == tail_len {
                return Ok(());
            }
        }
    }
    if source == sources.len() && tail_done == tail_len {
        Ok(())
    } else {
        Err(ChainError::RxBufferTooSmall)
    }
}

/// Copies `count` bytes at `offset` of a guest tail into `to` in `memory`:
/// one guest's memory to another's, through vm-memory's checked slices (a
/// range crossing a region boundary comes in pieces).
fn copy_from_guest(
    tail: GuestTail<'_>,
    offset: usize,
    count: usize,
    memory: &GuestMemoryMmap,
    to: GuestAddress,
) -> Result<(), ChainError> {
    let mut to = to;
    for (from, n) in pieces(&tail.chain.descs, tail.offset + offset, count) {
        for src in GuestMemoryBackend::get_slices(tail.memory, from, n) {
            let src = src.map_err(|_| ChainError::BadAddress)?;
            let mut done = 0usize;
            for dst in GuestMemoryBackend::get_slices(memory, to, src.len()) {
                let dst = dst.map_err(|_| ChainError::BadAddress)?;
                let piece = src
                    .subslice(done, dst.len())
                    .map_err(|_| ChainError::BadAddress)?;
                piece.copy_to_volatile_slice(dst);
                done += dst.len();
            }
            if done != src.len() {
                return Err(ChainError::BadAddress);
            }
            to = to
                .checked_add(src.len() as u64)
                .ok_or(ChainError::BadAddress)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// Offers chains of `(addr, len, flags)` (NEXT filled in) on a fresh queue.
    fn queue_with(mem: &GuestMemoryMmap, chains: &[&[(u64, u32, u16)]]) -> Queue {
        let mock = MockSplitQueue::new(mem, 64);
        let mut raw = Vec::new();
        for chain in chains {
            for (i, &(a, l, f)) in chain.iter().enumerate() {
                let next = raw.len() as u16 + 1;
                let flags = if i + 1 < chain.len() { f | N } else { f & !N };
                raw.push(RawDescriptor::from(SplitDescriptor::new(a, l, flags, next)));
            }
        }
        mock.add_desc_chains(&raw, 0).unwrap();
        mock.create_queue::<Queue>().unwrap()
    }

    /// Takes a TX chain and copies all of it (head, then the rest) into
    /// `buf`, as the card does for a frame it works on whole.
    fn gather_tx(
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        header_len: usize,
        buf: &mut Vec<u8>,
    ) -> Option<(u16, Result<(), ChainError>)> {
        buf.resize(MAX_TX_CHAIN, 0);
        let mut chain = TxChain::default();
        let mut counts = CopyCounts::default();
        let (head, r) = take_tx(q, mem, header_len, &mut chain, buf, &mut counts)?;
        let (from, to) = (chain.copied(), chain.len());
        let r = r.and_then(|()| chain.copy_rest_into(mem, &mut buf[from..to], &mut counts));
        buf.truncate(chain.len());
        Some((head, r))
    }

    fn used(mem: &GuestMemoryMmap, q: &Queue, i: u16) -> (u32, u32) {
        let base = q.used_ring() + 4 + 8 * u64::from(i);
        (
            mem.read_obj(GuestAddress(base)).unwrap(),
            mem.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    #[test]
    fn tx_header_split_oddly_across_descriptors_is_gathered() {
        let mem = memory();
        let bytes: Vec<u8> = (0..100u8).collect();
        mem.write_slice(&bytes[..5], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&bytes[5..7], GuestAddress(0x11_0000))
            .unwrap();
        mem.write_slice(&bytes[7..], GuestAddress(0x12_0000))
            .unwrap();
        let mut q = queue_with(
            &mem,
            &[&[(0x10_0000, 5, 0), (0x11_0000, 2, 0), (0x12_0000, 93, 0)]],
        );
        let mut buf = Vec::with_capacity(MAX_TX_CHAIN);
        let (head, r) = gather_tx(&mut q, &mem, 12, &mut buf).unwrap();
        assert_eq!((head, r), (0, Ok(())));
        assert_eq!(buf, bytes);
    }

    #[test]
    fn tx_chain_with_a_write_only_descriptor_is_refused() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 64, 0), (0x11_0000, 64, W)]]);
        let mut buf = Vec::with_capacity(MAX_TX_CHAIN);
        let (_, r) = gather_tx(&mut q, &mem, 12, &mut buf).unwrap();
        assert_eq!(r, Err(ChainError::WriteOnlyInTx));
    }

    #[test]
    fn tx_chain_shorter_than_the_header_is_truncated() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 11, 0)], &[(0x11_0000, 0, 0)]]);
        let mut buf = Vec::with_capacity(MAX_TX_CHAIN);
        assert_eq!(
            gather_tx(&mut q, &mem, 12, &mut buf).unwrap().1,
            Err(ChainError::Truncated)
        );
        assert_eq!(
            gather_tx(&mut q, &mem, 12, &mut buf).unwrap().1,
            Err(ChainError::Truncated)
        );
        assert!(gather_tx(&mut q, &mem, 12, &mut buf).is_none());
    }

    #[test]
    fn tx_chain_above_the_largest_frame_is_refused_without_growing() {
        let mem = memory();
        let mut q = queue_with(
            &mem,
            &[&[
                (0x10_0000, 0x8000, 0),
                (0x20_0000, 0x8000, 0),
                (0x30_0000, 0x100, 0),
            ]],
        );
        let mut buf = Vec::with_capacity(MAX_TX_CHAIN);
        let cap = buf.capacity();
        assert_eq!(
            gather_tx(&mut q, &mem, 12, &mut buf).unwrap().1,
            Err(ChainError::Oversized)
        );
        assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn tx_descriptor_outside_guest_memory_is_refused() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x3f_fff0, 64, 0)]]);
        let mut buf = Vec::with_capacity(MAX_TX_CHAIN);
        assert_eq!(
            gather_tx(&mut q, &mem, 12, &mut buf).unwrap().1,
            Err(ChainError::BadAddress)
        );
    }

    #[test]
    fn rx_merges_buffers_and_sets_num_buffers() {
        let mem = memory();
        let mut q = queue_with(
            &mem,
            &[
                &[(0x10_0000, 100, W)],
                &[(0x11_0000, 100, W)],
                &[(0x12_0000, 100, W)],
            ],
        );
        let frame: Vec<u8> = (0..150u32).map(|i| i as u8).collect();
        let mut s = RxScratch::with_capacity(64);
        let n = deliver_rx(
            &mut q,
            &mem,
            &[0xaa; 12],
            12,
            Frame::held(&frame),
            true,
            &mut s,
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(used(&mem, &q, 0), (0, 100));
        assert_eq!(used(&mem, &q, 1), (1, 62));
        let mut first = [0u8; 100];
        mem.read_slice(&mut first, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&first[..10], &[0xaa; 10]);
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 2);
        assert_eq!(&first[12..], &frame[..88]);
        let mut second = [0u8; 62];
        mem.read_slice(&mut second, GuestAddress(0x11_0000))
            .unwrap();
        assert_eq!(&second[..], &frame[88..]);
        // The third buffer is still the guest's to fill next time.
        assert_eq!(q.next_avail(), 2);
    }

    #[test]
    fn rx_without_enough_buffers_takes_nothing() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 100, W)]]);
        let mut s = RxScratch::with_capacity(64);
        let r = deliver_rx(
            &mut q,
            &mem,
            &[0; 12],
            12,
            Frame::held(&[1; 200]),
            true,
            &mut s,
        );
        assert_eq!(r, Err(ChainError::NoRxBuffers));
        assert_eq!(q.next_avail(), 0);
        // A frame that fits still goes.
        assert_eq!(
            deliver_rx(
                &mut q,
                &mem,
                &[0; 12],
                12,
                Frame::held(&[1; 50]),
                true,
                &mut s
            ),
            Ok(1)
        );
    }

    #[test]
    fn rx_chain_too_small_without_mrg_rxbuf_is_returned_empty() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 60, W)], &[(0x11_0000, 2000, W)]]);
        let mut s = RxScratch::with_capacity(64);
        let r = deliver_rx(
            &mut q,
            &mem,
            &[0; 12],
            12,
            Frame::held(&[1; 100]),
            false,
            &mut s,
        );
        assert_eq!(r, Err(ChainError::RxBufferTooSmall));
        assert_eq!(used(&mem, &q, 0), (0, 0));
        // The next chain, large enough, takes the next frame whole.
        assert_eq!(
            deliver_rx(
                &mut q,
                &mem,
                &[0; 12],
                12,
                Frame::held(&[1; 100]),
                false,
                &mut s
            ),
            Ok(1)
        );
        assert_eq!(used(&mem, &q, 1), (1, 112));
    }

    #[test]
    fn rx_chain_with_a_readable_descriptor_is_refused() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 60, W), (0x11_0000, 2000, 0)]]);
        let mut s = RxScratch::with_capacity(64);
        let r = deliver_rx(
            &mut q,
            &mem,
            &[0; 12],
            12,
            Frame::held(&[1; 100]),
            true,
            &mut s,
        );
        assert_eq!(r, Err(ChainError::ReadOnlyInRx));
        assert_eq!(used(&mem, &q, 0), (0, 0));
    }

    #[test]
    fn rx_descriptor_outside_guest_memory_is_refused() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x3f_fff0, 2000, W)]]);
        let mut s = RxScratch::with_capacity(64);
        let r = deliver_rx(
            &mut q,
            &mem,
            &[0; 12],
            12,
            Frame::held(&[1; 100]),
            true,
            &mut s,
        );
        assert_eq!(r, Err(ChainError::BadAddress));
    }

    #[test]
    fn rx_ten_byte_header_without_version_1() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 2000, W)]]);
        let mut s = RxScratch::with_capacity(64);
        assert_eq!(
            deliver_rx(
                &mut q,
                &mem,
                &[7; 12],
                10,
                Frame::held(&[1; 100]),
                false,
                &mut s
            ),
            Ok(1)
        );
        assert_eq!(used(&mem, &q, 0), (0, 110));
        let mut b = [0u8; 11];
        mem.read_slice(&mut b, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&b[..10], &[7; 10]);
        assert_eq!(b[10], 1);
    }

    /// A guest's TX chain: a 12-byte vnet header in its own descriptor, then
    /// `frame` cut into `pieces` descriptors, at 0x20_0000 of `mem`.
    fn tx_chain(mem: &GuestMemoryMmap, header: &[u8; 12], frame: &[u8], pieces: usize) -> Queue {
        let mut descs = vec![(0x20_0000u64, 12u32, 0u16)];
        mem.write_slice(header, GuestAddress(0x20_0000)).unwrap();
        let step = frame.len().div_ceil(pieces);
        for (i, part) in frame.chunks(step).enumerate() {
            // Scattered, a page apart, as a guest's pages are.
            let at = 0x21_0000 + 0x1000 * i as u64 * (1 + step as u64 / 0x1000);
            mem.write_slice(part, GuestAddress(at)).unwrap();
            descs.push((at, part.len() as u32, 0));
        }
        queue_with(mem, &[&descs])
    }

    fn frame_bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// Takes the TX chain from `tx` and delivers it into `rx`, as the card
    /// does between two guests: headers from the card's copy, the rest
    /// straight from the sender's memory. Returns the outcome and the copies.
    fn guest_to_guest(
        tx_mem: &GuestMemoryMmap,
        tx: &mut Queue,
        rx_mem: &GuestMemoryMmap,
        rx: &mut Queue,
        mrg_rxbuf: bool,
        between: impl FnOnce(),
    ) -> (Result<u16, ChainError>, CopyCounts, Vec<u8>) {
        let mut buf = vec![0u8; MAX_TX_CHAIN];
        let mut chain = TxChain::default();
        let mut counts = CopyCounts::default();
        let (_, r) = take_tx(tx, tx_mem, 12, &mut chain, &mut buf, &mut counts).unwrap();
        r.unwrap();
        // The guest may write its TX buffers at any time from here on.
        between();
        let held = chain.copied();
        let frame = Frame {
            head: &buf[12..held],
            tail: Some(GuestTail {
                memory: tx_mem,
                chain: &chain,
                offset: held,
            }),
        };
        let mut s = RxScratch::with_capacity(64);
        let header: [u8; 12] = buf[..12].try_into().unwrap();
        let r = deliver_rx(rx, rx_mem, &header, 12, frame, mrg_rxbuf, &mut s);
        counts.card_to_rx += s.copies.card_to_rx;
        counts.guest_to_guest += s.copies.guest_to_guest;
        (r, counts, buf[..held].to_vec())
    }

    /// The bytes the RX queue's used entries hold, in order.
    fn received(mem: &GuestMemoryMmap, q: &Queue, chains: &[&[(u64, u32, u16)]]) -> Vec<u8> {
        let mut out = Vec::new();
        let idx: u16 = mem.read_obj(GuestAddress(q.used_ring() + 2)).unwrap();
        for i in 0..idx {
            let (head, mut len) = used(mem, q, i);
            // Heads are numbered by descriptor; find the chain that starts there.
            let mut first = 0u32;
            for c in chains {
                if first == head {
                    for &(a, l, _) in c.iter() {
                        let n = len.min(l);
                        let mut b = vec![0u8; n as usize];
                        mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                        out.extend_from_slice(&b);
                        len -= n;
                    }
                }
                first += c.len() as u32;
            }
        }
        out
    }

    /// A 9000-byte frame in 40 TX descriptors reaches another guest's 1 KiB
    /// buffers (MRG_RXBUF) whole; the card copied only the vnet header and
    /// TX_HEAD bytes, every other byte went guest to guest once.
    #[test]
    fn a_frame_in_many_descriptors_is_copied_once_into_merged_buffers() {
        let (tx_mem, rx_mem) = (memory(), memory());
        let frame = frame_bytes(9000);
        let mut tx = tx_chain(&tx_mem, &[0x11; 12], &frame, 40);
        let chains: Vec<Vec<(u64, u32, u16)>> = (0..12)
            .map(|i| vec![(0x10_0000 + 0x1000 * i, 1024, W)])
            .collect();
        let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| c.as_slice()).collect();
        let mut rx = queue_with(&rx_mem, &refs);
        let (r, counts, _) = guest_to_guest(&tx_mem, &mut tx, &rx_mem, &mut rx, true, || {});
        assert_eq!(r, Ok(9));
        let got = received(&rx_mem, &rx, &refs);
        assert_eq!(got.len(), 12 + 9000);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 9, "num_buffers");
        assert_eq!(&got[12..], &frame[..]);
        assert_eq!(
            counts,
            CopyCounts {
                tx_to_card: 12 + TX_HEAD as u64,
                card_to_rx: 12 + TX_HEAD as u64,
                guest_to_guest: 9000 - TX_HEAD as u64,
            },
            "each payload byte copied once"
        );
    }

    /// Without MRG_RXBUF a frame needs one chain big enough: one of three
    /// descriptors takes it (split at odd places); one too small is returned
    /// empty and counted, nothing of the frame written.
    #[test]
    fn without_mrg_rxbuf_a_frame_fills_one_chain_of_descriptors_or_none() {
        let (tx_mem, rx_mem) = (memory(), memory());
        let frame = frame_bytes(3000);
        let mut tx = tx_chain(&tx_mem, &[0x22; 12], &frame, 7);
        let chains: [&[(u64, u32, u16)]; 1] = [&[
            (0x10_0000, 100, W),
            (0x11_0000, 1001, W),
            (0x12_0000, 4000, W),
        ]];
        let mut rx = queue_with(&rx_mem, &chains);
        let (r, counts, _) = guest_to_guest(&tx_mem, &mut tx, &rx_mem, &mut rx, false, || {});
        assert_eq!(r, Ok(1));
        assert_eq!(used(&rx_mem, &rx, 0), (0, 3012));
        let got = received(&rx_mem, &rx, &chains);
        assert_eq!(&got[12..], &frame[..]);
        assert_eq!(counts.guest_to_guest, 3000 - TX_HEAD as u64);

        let mut tx = tx_chain(&tx_mem, &[0x22; 12], &frame, 7);
        let small: [&[(u64, u32, u16)]; 1] = [&[(0x10_0000, 1000, W), (0x11_0000, 1000, W)]];
        let mut rx = queue_with(&rx_mem, &small);
        rx_mem
            .write_slice(&[0xee; 1000], GuestAddress(0x11_0000))
            .unwrap();
        let (r, counts, _) = guest_to_guest(&tx_mem, &mut tx, &rx_mem, &mut rx, false, || {});
        assert_eq!(r, Err(ChainError::RxBufferTooSmall));
        assert_eq!(used(&rx_mem, &rx, 0), (0, 0));
        assert_eq!(counts.guest_to_guest, 0);
        let mut b = [0u8; 1000];
        rx_mem.read_slice(&mut b, GuestAddress(0x11_0000)).unwrap();
        assert_eq!(b, [0xee; 1000], "nothing written");
    }

    /// The guest rewrites its vnet header and frame headers after the card
    /// took the chain (guest memory is shared): the receiver gets the headers
    /// the card copied (those the switch checked), not the new ones.
    #[test]
    fn headers_the_guest_rewrites_after_the_check_are_not_delivered() {
        let (tx_mem, rx_mem) = (memory(), memory());
        let frame = frame_bytes(2000);
        let mut tx = tx_chain(&tx_mem, &[0x33; 12], &frame, 4);
        let chains: [&[(u64, u32, u16)]; 1] = [&[(0x10_0000, 4096, W)]];
        let mut rx = queue_with(&rx_mem, &chains);
        let (r, _, checked) = guest_to_guest(&tx_mem, &mut tx, &rx_mem, &mut rx, true, || {
            tx_mem
                .write_slice(&[0xff; 12], GuestAddress(0x20_0000))
                .unwrap();
            tx_mem
                .write_slice(&[0xff; 64], GuestAddress(0x21_0000))
                .unwrap();
        });
        assert_eq!(r, Ok(1));
        let got = received(&rx_mem, &rx, &chains);
        assert_eq!(&got[..10], &[0x33; 10], "the vnet header the card took");
        assert_eq!(
            &got[12..12 + 64],
            &frame[..64],
            "the frame headers the card took"
        );
        assert_eq!(&got[..12 + TX_HEAD][12..], &checked[12..]);
        assert_eq!(&got[12..], &frame[..]);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A descriptor anywhere (inside guest memory, straddling its end,
        /// far outside), of any length, readable or writable.
        fn descriptor() -> impl Strategy<Value = (u64, u32, u16)> {
            (
                prop_oneof![
                    0x10_0000u64..0x3f_0000,
                    0x3f_f000u64..0x40_1000,
                    Just(u64::MAX - 16),
                ],
                prop_oneof![0u32..4096, Just(0x1_0000), Just(u32::MAX)],
                prop_oneof![Just(0u16), Just(W)],
            )
        }

        fn chains() -> impl Strategy<Value = Vec<Vec<(u64, u32, u16)>>> {
            prop::collection::vec(prop::collection::vec(descriptor(), 1..6), 1..8)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever chains a guest offers on TX, gathering never panics,
            /// never grows the buffer beyond the largest frame, and every
            /// chain is taken once.
            #[test]
            fn tx_chains_never_panic(chains in chains()) {
                let mem = memory();
                let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| c.as_slice()).collect();
                let mut q = queue_with(&mem, &refs);
                let mut buf = Vec::with_capacity(MAX_TX_CHAIN);
                let mut taken = 0;
                while let Some((_, r)) = gather_tx(&mut q, &mem, 12, &mut buf) {
                    taken += 1;
                    prop_assert!(buf.len() <= MAX_TX_CHAIN);
                    if r.is_ok() {
                        prop_assert!(buf.len() >= 12);
                    }
                }
                prop_assert_eq!(taken, chains.len());
            }

            /// Whatever chains a guest offers on RX, delivering never panics,
            /// and a delivered frame's used lengths add up to header + frame.
            #[test]
            fn rx_chains_never_panic(chains in chains(), len in 0usize..70_000, mrg in any::<bool>()) {
                let mem = memory();
                let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| c.as_slice()).collect();
                let mut q = queue_with(&mem, &refs);
                let frame = vec![0xa5u8; len];
                let mut s = RxScratch::with_capacity(64);
                for _ in 0..chains.len() {
                    let before = q.next_avail();
                    match deliver_rx(&mut q, &mem, &[0; 12], 12, Frame::held(&frame), mrg, &mut s) {
                        Ok(n) => {
                            let total: u64 = s.chains.iter().map(|c| u64::from(c.used)).sum();
                            prop_assert_eq!(total, 12 + len as u64);
                            prop_assert_eq!(usize::from(n), s.chains.len());
                        }
                        Err(ChainError::NoRxBuffers) => {
                            prop_assert_eq!(q.next_avail(), before);
                            break;
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    }
}
