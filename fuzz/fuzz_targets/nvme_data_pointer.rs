//! An NVMe command's data pointer — PRP1/PRP2 with PRP lists, or an SGL with
//! segments and last segments — walked the way the card walks every I/O
//! command's, over driver-written memory.
//!
//! Whatever the walk accepts must add up to exactly the transfer length,
//! and every range it yields must map into the DMA space when turned into
//! host iovecs (or the command fails with a status). Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvme_emulator::datapath::{data_segments, iovecs};
use nvme_emulator::dma::{DmaMemory, DmaRegion, DmaSpace};
use nvme_emulator::spec::Command;

const BASE: u64 = 0x10_0000;
const MEM: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<70>() else {
        return;
    };
    let mut command = [0u8; 64];
    command.copy_from_slice(&head[..64]);
    let command = Command::from_bytes(&command);
    let len = u64::from(u32::from_le_bytes([head[64], head[65], head[66], 0]));
    let allow_sgl = head[67] & 1 != 0;
    let guest_written = head[67] & 2 != 0;
    let space = DmaSpace::default().with(DmaRegion::heap(BASE, MEM));
    // The rest of the input is the driver's memory: lists and descriptors.
    let _ = space.write(BASE, &rest[..rest.len().min(MEM)]);

    if let Ok(segments) = data_segments(&space, &command, len, allow_sgl) {
        let total: u64 = segments.iter().map(|s| s.len).sum();
        assert_eq!(total, len, "segments do not add up to the transfer");
        if let Ok(iov) = iovecs(&space, &segments, guest_written) {
            let host = space
                .host_range(BASE, MEM as u64, false)
                .expect("the region") as usize;
            for v in &iov {
                let start = v.iov_base as usize;
                assert!(
                    start >= host && start + v.iov_len <= host + MEM,
                    "an iovec outside the driver's memory"
                );
            }
        }
    }
});
