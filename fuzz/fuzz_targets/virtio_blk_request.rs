//! A guest-made descriptor chain through the block card's request checker.
//!
//! The input (see `cardsim_fuzz::blk`) lays out a split virtqueue in guest
//! memory — descriptor table, available ring, header, range segments,
//! indirect tables — and chooses the volume's capacity and read-only flag.
//! The chain is popped the way the card pops it (virtio-queue's `Queue`),
//! then `request::parse` must not panic, and whatever it accepts must be
//! safe for the media: the range within capacity, iovecs inside guest
//! memory and within the limits, no write to a read-only volume.
#![no_main]

use cardsim_fuzz::blk::{Input, AVAIL_RING, DESC_TABLE, REGIONS, USED_RING};
use libfuzzer_sys::fuzz_target;
use vhost_blk_backend::request::{parse, IoVecs, RequestKind, Scratch, Volume};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const MAX_QUEUE_SIZE: u16 = 256;

fuzz_target!(|data: &[u8]| {
    let input = Input::decode(data);
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&REGIONS.map(|(start, len)| (GuestAddress(start), len)))
            .expect("guest memory");

    for (addr, bytes) in &input.patches {
        // Patches past guest memory are dropped, as a guest cannot write there.
        let _ = mem.write_slice(bytes, GuestAddress(u64::from(*addr)));
    }
    let size = 1u16 << input.queue_size_exp.min(8);
    for (i, d) in input.descriptors.iter().enumerate() {
        let at = DESC_TABLE + 16 * (i as u64 % u64::from(size));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }
    // avail ring: flags, idx = 1, ring[0] = head.
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).unwrap();
    mem.write_obj(1u16.to_le(), GuestAddress(AVAIL_RING + 2))
        .unwrap();
    mem.write_obj(input.head.to_le(), GuestAddress(AVAIL_RING + 4))
        .unwrap();

    let mut queue = Queue::new(MAX_QUEUE_SIZE).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(input.event_idx);
    queue.set_ready(true);
    assert!(queue.is_valid(&mem), "the harness lays out a valid queue");

    let volume = Volume {
        capacity: input.capacity,
        read_only: input.read_only,
    };
    let mut scratch = Scratch::new(input.max_descriptors as usize);
    let seg_max = input.seg_max as usize;
    let mut iovecs = IoVecs::with_capacity(seg_max);

    let Some(chain) = queue.pop_descriptor_chain(&mem) else {
        // A head outside the table: virtio-queue yields nothing.
        assert!(input.head >= size);
        return;
    };
    match parse(chain, &mem, volume, &mut scratch, &mut iovecs) {
        Err(refused) => {
            if let Some(status) = refused.status {
                assert!(
                    GuestMemoryBackend::check_range(&mem, status, 1),
                    "status outside memory"
                );
            }
        }
        Ok(request) => {
            assert!(
                GuestMemoryBackend::check_range(&mem, request.status, 1),
                "status outside memory"
            );
            let end = request.offset.checked_add(request.len);
            match request.kind {
                RequestKind::Read
                | RequestKind::Write
                | RequestKind::Discard
                | RequestKind::WriteZeroes { .. } => {
                    let end = end.expect("offset + len overflows");
                    assert!(
                        end <= input.capacity,
                        "{request:?} past capacity {}",
                        input.capacity
                    );
                    assert_eq!(request.offset % 512, 0);
                }
                RequestKind::Flush | RequestKind::GetId => {}
            }
            if input.read_only {
                assert!(
                    matches!(
                        request.kind,
                        RequestKind::Read | RequestKind::Flush | RequestKind::GetId
                    ),
                    "{request:?} accepted on a read-only volume"
                );
            }
            if let Some((addr, len)) = request.id_buffer {
                assert!(GuestMemoryBackend::check_range(&mem, addr, len as usize));
            }
            if matches!(request.kind, RequestKind::Read | RequestKind::Write) {
                assert_eq!(request.len % 512, 0);
                assert!(iovecs.len() <= seg_max);
                // Every iovec lies inside one guest memory mapping, and they
                // add up to the request's length.
                let host: Vec<(usize, usize)> = mem
                    .iter()
                    .map(|r| {
                        let base = r
                            .get_host_address(vm_memory::MemoryRegionAddress(0))
                            .unwrap() as usize;
                        (base, base + r.len() as usize)
                    })
                    .collect();
                let mut total = 0u64;
                let list = unsafe { std::slice::from_raw_parts(iovecs.as_ptr(), iovecs.len()) };
                for iov in list {
                    let start = iov.iov_base as usize;
                    let end = start + iov.iov_len;
                    assert!(
                        host.iter().any(|&(b, e)| b <= start && end <= e),
                        "iovec outside guest memory"
                    );
                    total += iov.iov_len as u64;
                }
                assert_eq!(total, request.len);
            } else {
                assert!(iovecs.is_empty());
            }
        }
    }
});
