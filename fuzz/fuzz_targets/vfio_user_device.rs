//! A hostile VMM's vfio-user requests, as the NVMe card's device sees them.
//!
//! The vfio_user crate parses the wire format and calls the card's
//! `ServerBackend` (`nvme_emulator::server::NvmeDevice`): region reads and
//! writes (PCI config space, BAR0 registers and doorbells), DMA maps of a
//! memfd at any offset, address and size, unmaps, SET_IRQS with eventfds,
//! device resets. This target makes those calls with the values a VMM
//! chooses, runs the controller after each (as the admin thread would), and
//! keeps the crate's own parser out (it is upstream's and, for one malformed
//! version string, panics; the card drops that connection). Nothing here may
//! panic, fault or touch memory outside what was mapped.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;

use libfuzzer_sys::fuzz_target;
use nvme_emulator::controller::{Controller, ControllerConfig};
use nvme_emulator::namespace::{Namespace, NamespaceSpec};
use nvme_emulator::server::NvmeDevice;
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend};

/// The VMM's guest memory: a memfd this long.
const GUEST_MEM: u64 = 1 << 20;

fn memfd() -> File {
    // SAFETY: a fresh descriptor from memfd_create, owned from here on.
    let fd = unsafe { libc::memfd_create(c"guest-mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(GUEST_MEM).expect("memfd size");
    file
}

fn eventfd() -> File {
    // SAFETY: a fresh eventfd, owned from here on.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    unsafe { File::from_raw_fd(fd) }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
}

fuzz_target!(|data: &[u8]| {
    let file = tempfile::NamedTempFile::new_in("/dev/shm").expect("namespace file");
    file.as_file().set_len(1 << 20).expect("namespace size");
    let spec: NamespaceSpec = format!("{},lba=512", file.path().display())
        .parse()
        .expect("namespace spec");
    let ctrl = Controller::new(ControllerConfig {
        serial: "FUZZ".into(),
        model: "cardsim NVMe Instance Storage".into(),
        firmware: "fuzz".into(),
        io_queues: 2,
        poll: std::time::Duration::ZERO,
        namespaces: vec![Namespace::open_plain(&spec, false).expect("namespace")],
    })
    .expect("controller");
    let mut device = NvmeDevice::new(ctrl.clone());
    let guest = memfd();

    let mut input = Input(data);
    while let Some([op]) = input.take::<1>() {
        let done = match op % 7 {
            0 | 1 => {
                // Region access: region index, offset, length (≤ 16), data.
                let (Some([region, len]), Some(offset)) = (input.take::<2>(), input.u64()) else {
                    break;
                };
                let len = usize::from(len % 17);
                let mut buf = [0u8; 16];
                if op % 7 == 0 {
                    let _ = device.region_read(u32::from(region % 10), offset, &mut buf[..len]);
                } else {
                    let Some(bytes) = input.take::<16>() else {
                        break;
                    };
                    let _ = device.region_write(u32::from(region % 10), offset, &bytes[..len]);
                }
                Some(())
            }
            2 => {
                let (Some([flags]), Some(offset), Some(address), Some(size)) =
                    (input.take::<1>(), input.u64(), input.u64(), input.u64())
                else {
                    break;
                };
                let fd = (flags & 4 != 0).then(|| guest.try_clone().expect("dup"));
                let _ = device.dma_map(
                    DmaMapFlags::from_bits_retain(u32::from(flags & 3)),
                    offset % (2 * GUEST_MEM),
                    address,
                    size % (2 * GUEST_MEM),
                    fd,
                );
                Some(())
            }
            3 => {
                let (Some(flags), Some(address), Some(size)) =
                    (input.u32(), input.u64(), input.u64())
                else {
                    break;
                };
                let _ = device.dma_unmap(DmaUnmapFlags::from_bits_retain(flags), address, size);
                Some(())
            }
            4 => {
                let (Some([index, fds]), Some(flags), Some(start), Some(count)) =
                    (input.take::<2>(), input.u32(), input.u32(), input.u32())
                else {
                    break;
                };
                let fds: Vec<File> = (0..fds % 4).map(|_| eventfd()).collect();
                let _ = device.set_irqs(u32::from(index % 5), flags, start, count, fds);
                Some(())
            }
            5 => device.reset().ok(),
            _ => Some(()),
        };
        if done.is_none() {
            break;
        }
        ctrl.admin_tick();
    }
    // Stop the queue workers before the memory and the file go away.
    ctrl.device_reset();
    ctrl.admin_tick();
    ctrl.dma_unmap_all();
});
