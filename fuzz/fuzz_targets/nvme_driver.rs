//! A hostile NVMe driver against the NVMe card's controller.
//!
//! The controller is the card's own (`nvme_emulator::controller`), with a
//! namespace on a real file and heap memory mapped as the driver's DMA
//! space; only the vfio-user socket is left out (the `vfio_user_messages`
//! target covers it). Each input first brings the controller up as Linux
//! does (admin queue, CC.EN), then is a sequence of operations: register
//! writes (doorbells, CC, AQA/ASQ/ACQ), writes to DMA memory (queues, PRP
//! lists, SGL segments, data), admin commands placed on the admin queue and
//! run, resets. Admin commands create I/O queues, whose workers then walk
//! I/O commands' PRPs and SGLs on real io_uring. Nothing may panic or read
//! outside the mapped memory.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nvme_emulator::controller::{Controller, ControllerConfig};
use nvme_emulator::dma::{DmaMemory, DmaRegion};
use nvme_emulator::namespace::{Namespace, NamespaceSpec};
use nvme_emulator::spec::reg;

const BASE: u64 = 0x10_0000;
const MEM: usize = 1 << 20;
const ASQ: u64 = BASE;
const ACQ: u64 = BASE + 0x1000;
const ADMIN_ENTRIES: u32 = 16;

struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
}

fuzz_target!(|data: &[u8]| {
    let file = tempfile::NamedTempFile::new_in("/dev/shm").expect("namespace file");
    file.as_file().set_len(1 << 20).expect("namespace size");
    let spec: NamespaceSpec = format!("{},lba=512", file.path().display())
        .parse()
        .expect("namespace spec");
    let ctrl: Arc<Controller> = Controller::new(ControllerConfig {
        serial: "FUZZ".into(),
        model: "cardsim NVMe Instance Storage".into(),
        firmware: "fuzz".into(),
        io_queues: 2,
        poll: std::time::Duration::ZERO,
        namespaces: vec![Namespace::open_plain(&spec, false).expect("namespace")],
    })
    .expect("controller");
    ctrl.dma_map(DmaRegion::heap(BASE, MEM));
    let mem = ctrl.dma();

    let write32 = |offset: u64, v: u32| ctrl.mmio_write(offset, &v.to_le_bytes());
    write32(reg::AQA, (ADMIN_ENTRIES - 1) << 16 | (ADMIN_ENTRIES - 1));
    ctrl.mmio_write(reg::ASQ, &ASQ.to_le_bytes());
    ctrl.mmio_write(reg::ACQ, &ACQ.to_le_bytes());
    write32(reg::CC, 1 | 6 << 16 | 4 << 20);
    ctrl.admin_tick();

    let mut ops = Ops(data);
    let mut tail = 0u32;
    while let Some([op]) = ops.take::<1>() {
        match op % 6 {
            0 => {
                let (Some(off), Some(v)) = (ops.take::<2>(), ops.take::<4>()) else {
                    break;
                };
                let offset = u64::from(u16::from_le_bytes(off)) & 0x1ffc;
                ctrl.mmio_write(offset, &v);
            }
            1 => {
                let (Some(off), Some([len])) = (ops.take::<3>(), ops.take::<1>()) else {
                    break;
                };
                let offset = u64::from(u32::from_le_bytes([off[0], off[1], off[2], 0]));
                let Some(bytes) = ops.bytes(usize::from(len)) else {
                    break;
                };
                let _ = mem.write(BASE + offset % MEM as u64, bytes);
            }
            2 => {
                let Some(command) = ops.take::<64>() else {
                    break;
                };
                let _ = mem.write(ASQ + u64::from(tail) * 64, &command);
                tail = (tail + 1) % ADMIN_ENTRIES;
                write32(reg::DOORBELLS, tail);
                ctrl.admin_tick();
            }
            3 => ctrl.admin_tick(),
            4 => {
                let Some(head) = ops.take::<2>() else {
                    break;
                };
                write32(reg::DOORBELLS + 4, u32::from(u16::from_le_bytes(head)));
            }
            _ => {
                ctrl.device_reset();
                ctrl.admin_tick();
                tail = 0;
            }
        }
    }
    // Stop every queue worker before the memory and the file go away.
    ctrl.device_reset();
    ctrl.admin_tick();
});
