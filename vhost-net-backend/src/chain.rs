//! Moving frames between descriptor chains and the card.
//!
//! TX: a guest's chain (vnet header + frame, device-readable only) is
//! gathered into the worker's frame buffer, checking every descriptor.
//! RX: a frame is written into a guest's receive buffers — one chain, or with
//! VIRTIO_NET_F_MRG_RXBUF as many as it takes, `num_buffers` set in the
//! header of the first. Nothing here trusts the guest: a chain that does not
//! fit the rules is refused with a [`ChainError`], counted by the caller, and
//! the queue stays usable.
//!
//! Buffers are owned by the caller and reused, so a frame costs no
//! allocation.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

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

/// Gathers one TX chain (header and frame) into `buf` (cleared first).
/// Returns the chain's head index either way, so it can be returned to the
/// guest, and the error if the chain is refused.
pub fn gather_tx(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    header_len: usize,
    buf: &mut Vec<u8>,
) -> Option<(u16, Result<(), ChainError>)> {
    let chain = queue.pop_descriptor_chain(memory)?;
    let head = chain.head_index();
    buf.clear();
    let mut outcome = Ok(());
    for desc in chain {
        if desc.is_write_only() {
            outcome = Err(ChainError::WriteOnlyInTx);
            break;
        }
        let len = desc.len() as usize;
        let start = buf.len();
        let Some(end) = start.checked_add(len).filter(|e| *e <= MAX_TX_CHAIN) else {
            outcome = Err(ChainError::Oversized);
            break;
        };
        // `buf` has MAX_TX_CHAIN capacity: this never reallocates.
        buf.resize(end, 0);
        if memory
            .read_slice(&mut buf[start..end], desc.addr())
            .is_err()
        {
            outcome = Err(ChainError::BadAddress);
            break;
        }
    }
    if outcome.is_ok() && buf.len() < header_len {
        outcome = Err(ChainError::Truncated);
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

/// Reused per worker: where one frame's receive buffers are listed.
#[derive(Debug, Default)]
pub struct RxScratch {
    descs: Vec<(GuestAddress, u32)>,
    chains: Vec<RxChain>,
}

impl RxScratch {
    pub fn with_capacity(queue_size: usize) -> Self {
        RxScratch {
            descs: Vec::with_capacity(queue_size * 2),
            chains: Vec::with_capacity(queue_size),
        }
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
    frame: &[u8],
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
    frame: &[u8],
) -> Result<(), ChainError> {
    let mut sources = [header, frame];
    let mut source = 0usize;
    for chain in scratch.chains.iter_mut() {
        for &(addr, len) in &scratch.descs[chain.descs.0..chain.descs.1] {
            let mut at = addr;
            let mut room = len as usize;
            while room > 0 && source < sources.len() {
                let src = sources[source];
                let n = room.min(src.len());
                if n > 0 {
                    memory
                        .write_slice(&src[..n], at)
                        .map_err(|_| ChainError::BadAddress)?;
                    at = at.checked_add(n as u64).ok_or(ChainError::BadAddress)?;
                    room -= n;
                    chain.used += n as u32;
                }
                sources[source] = &src[n..];
                if sources[source].is_empty() {
                    source += 1;
                }
            }
            if source == sources.len() {
                return Ok(());
            }
        }
    }
    if source == sources.len() {
        Ok(())
    } else {
        Err(ChainError::RxBufferTooSmall)
    }
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
        let n = deliver_rx(&mut q, &mem, &[0xaa; 12], 12, &frame, true, &mut s).unwrap();
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
        let r = deliver_rx(&mut q, &mem, &[0; 12], 12, &[1; 200], true, &mut s);
        assert_eq!(r, Err(ChainError::NoRxBuffers));
        assert_eq!(q.next_avail(), 0);
        // A frame that fits still goes.
        assert_eq!(
            deliver_rx(&mut q, &mem, &[0; 12], 12, &[1; 50], true, &mut s),
            Ok(1)
        );
    }

    #[test]
    fn rx_chain_too_small_without_mrg_rxbuf_is_returned_empty() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 60, W)], &[(0x11_0000, 2000, W)]]);
        let mut s = RxScratch::with_capacity(64);
        let r = deliver_rx(&mut q, &mem, &[0; 12], 12, &[1; 100], false, &mut s);
        assert_eq!(r, Err(ChainError::RxBufferTooSmall));
        assert_eq!(used(&mem, &q, 0), (0, 0));
        // The next chain, large enough, takes the next frame whole.
        assert_eq!(
            deliver_rx(&mut q, &mem, &[0; 12], 12, &[1; 100], false, &mut s),
            Ok(1)
        );
        assert_eq!(used(&mem, &q, 1), (1, 112));
    }

    #[test]
    fn rx_chain_with_a_readable_descriptor_is_refused() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 60, W), (0x11_0000, 2000, 0)]]);
        let mut s = RxScratch::with_capacity(64);
        let r = deliver_rx(&mut q, &mem, &[0; 12], 12, &[1; 100], true, &mut s);
        assert_eq!(r, Err(ChainError::ReadOnlyInRx));
        assert_eq!(used(&mem, &q, 0), (0, 0));
    }

    #[test]
    fn rx_descriptor_outside_guest_memory_is_refused() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x3f_fff0, 2000, W)]]);
        let mut s = RxScratch::with_capacity(64);
        let r = deliver_rx(&mut q, &mem, &[0; 12], 12, &[1; 100], true, &mut s);
        assert_eq!(r, Err(ChainError::BadAddress));
    }

    #[test]
    fn rx_ten_byte_header_without_version_1() {
        let mem = memory();
        let mut q = queue_with(&mem, &[&[(0x10_0000, 2000, W)]]);
        let mut s = RxScratch::with_capacity(64);
        assert_eq!(
            deliver_rx(&mut q, &mem, &[7; 12], 10, &[1; 100], false, &mut s),
            Ok(1)
        );
        assert_eq!(used(&mem, &q, 0), (0, 110));
        let mut b = [0u8; 11];
        mem.read_slice(&mut b, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&b[..10], &[7; 10]);
        assert_eq!(b[10], 1);
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
                    match deliver_rx(&mut q, &mem, &[0; 12], 12, &frame, mrg, &mut s) {
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
