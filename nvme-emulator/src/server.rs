//! Serving the controller over vfio-user (rust-vmm's `vfio_user::Server`).
//!
//! The crate serves one connection on one thread and the client waits for
//! every reply (QEMU gives up after five seconds), so each callback here only
//! records state and wakes the controller's threads. A callback never
//! returns `Err` for a region write: the crate would answer a posted write
//! and the message stream would go out of step.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use card_firmware::warn::WarnLimiter;
use card_firmware::warn_limited;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_DMA_UNMAP_FLAG_ALL, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

use crate::controller::Controller;
use crate::dma::DmaRegion;
use crate::pci::{ConfigSpace, BAR0_SIZE, CONFIG_SIZE};

static BAD_ACCESS: WarnLimiter = WarnLimiter::new(5_000);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    SocketPath(#[from] card_firmware::socket::SocketPathError),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: vfio_user::Error,
    },
    #[error("cannot start the admin thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The vfio-user device: PCI config space in front of the controller.
pub struct NvmeDevice {
    ctrl: Arc<Controller>,
    config: ConfigSpace,
}

impl NvmeDevice {
    pub fn new(ctrl: Arc<Controller>) -> Self {
        let vectors = ctrl.irqs.count() as u16;
        Self {
            ctrl,
            config: ConfigSpace::new(vectors),
        }
    }

    /// The regions the client sees: config space and BAR0.
    pub fn regions() -> Vec<ServerRegion> {
        (0..VFIO_PCI_NUM_REGIONS)
            .map(|index| {
                let mut info = vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    index,
                    ..Default::default()
                };
                let size = match index {
                    VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE,
                    VFIO_PCI_BAR0_REGION_INDEX => BAR0_SIZE,
                    _ => 0,
                };
                if size > 0 {
                    info.size = size;
                    info.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
                }
                ServerRegion {
                    region_info: info,
                    sparse_areas: Vec::new(),
                    mmap_fd: None,
                }
            })
            .collect()
    }

    /// The interrupts: MSI-X with one vector per queue, and the ERR and REQ
    /// indexes QEMU expects; no INTx or MSI.
    pub fn irqs(vectors: u32) -> Vec<IrqInfo> {
        (0..VFIO_PCI_NUM_IRQS)
            .map(|index| {
                let (count, flags) = match index {
                    VFIO_PCI_MSIX_IRQ_INDEX => {
                        (vectors, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE)
                    }
                    VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => (1, VFIO_IRQ_INFO_EVENTFD),
                    _ => (0, 0),
                };
                IrqInfo {
                    index,
                    flags,
                    count,
                }
            })
            .collect()
    }

    fn region_size(region: u32) -> u64 {
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE,
            VFIO_PCI_BAR0_REGION_INDEX => BAR0_SIZE,
            _ => 0,
        }
    }

    fn in_region(region: u32, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= Self::region_size(region))
    }
}

impl ServerBackend for NvmeDevice {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        data.fill(0);
        if !Self::in_region(region, offset, data.len()) {
            warn_limited!(
                BAD_ACCESS,
                region,
                offset,
                len = data.len(),
                "read outside a region"
            );
            return Ok(());
        }
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config.read(offset, data),
            VFIO_PCI_BAR0_REGION_INDEX => self.ctrl.mmio_read(offset, data),
            _ => {}
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if !Self::in_region(region, offset, data.len()) {
            warn_limited!(
                BAD_ACCESS,
                region,
                offset,
                len = data.len(),
                "write outside a region"
            );
            return Ok(());
        }
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config.write(offset, data),
            VFIO_PCI_BAR0_REGION_INDEX => self.ctrl.mmio_write(offset, data),
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let Some(fd) = fd else {
            // Without a file there is nothing to map (DMA_READ/WRITE
            // messages are not supported): the range stays unreachable.
            tracing::debug!(
                address,
                size,
                "DMA region without a file descriptor ignored"
            );
            return Ok(());
        };
        let writable = flags.contains(DmaMapFlags::WRITE);
        let region = DmaRegion::map(&fd, offset, address, size, writable)?;
        tracing::debug!(address, size, writable, "DMA region mapped");
        self.ctrl.dma_map(region);
        Ok(())
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        if flags.bits() & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            self.ctrl.dma_unmap_all();
        } else {
            self.ctrl.dma_unmap(address, size);
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        tracing::info!("device reset requested by the client");
        self.ctrl.device_reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            // ERR and REQ: accepted; the card never raises them.
            return Ok(());
        }
        if flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
            return Ok(());
        }
        if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 {
            // A count with no fds disables those vectors.
            self.ctrl.irqs.set(start, count, fds);
        } else if flags & VFIO_IRQ_SET_DATA_NONE != 0 && count == 0 {
            self.ctrl.irqs.set(0, u32::MAX, Vec::new());
        }
        Ok(())
    }
}

/// Claims `socket` and listens on it: the part of serving that needs a
/// path, done before the card jails itself.
pub fn listen(ctrl: &Controller, socket: &Path) -> Result<Server, ServeError> {
    card_firmware::socket::claim_socket_path(socket)?;
    let vectors = ctrl.irqs.count() as u32;
    Server::new(
        socket,
        true,
        NvmeDevice::irqs(vectors),
        NvmeDevice::regions(),
    )
    .map_err(|source| ServeError::Listen {
        path: socket.display().to_string(),
        source,
    })
}

/// Serves the controller on `server`, connection after connection, until a
/// fatal error; starts the admin thread first. Between connections the
/// controller is reset and its DMA regions dropped, so a restarted VMM finds
/// a fresh controller.
pub fn serve(ctrl: Arc<Controller>, server: Server) -> Result<(), ServeError> {
    let stop = Arc::new(AtomicBool::new(false));
    let admin = {
        let ctrl = ctrl.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("nvme-admin".into())
            .spawn(move || ctrl.run_admin(stop))
            .map_err(ServeError::Thread)?
    };
    loop {
        let mut device = NvmeDevice::new(ctrl.clone());
        // The crate unwraps some of what the client sends (a version string
        // without its NUL panics): a malformed message ends that connection,
        // not the card.
        let served =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.run(&mut device)));
        match served {
            Ok(Ok(())) => tracing::info!("client disconnected; waiting for the next one"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "connection ended with an error; waiting for the next one")
            }
            Err(_) => tracing::error!(
                "malformed vfio-user message; connection dropped, waiting for the next one"
            ),
        }
        ctrl.device_reset();
        ctrl.irqs.set(0, u32::MAX, Vec::new());
        ctrl.dma_unmap_all();
        if admin.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Release);
    let _ = admin.join();
    Ok(())
}

/// [`listen`] then [`serve`], calling `announce` in between.
pub fn serve_forever(
    ctrl: Arc<Controller>,
    socket: &Path,
    announce: impl FnOnce(),
) -> Result<(), ServeError> {
    let server = listen(&ctrl, socket)?;
    announce();
    serve(ctrl, server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ControllerConfig;
    use crate::dma::{DmaMemory, DmaSpace};
    use crate::namespace::{Namespace, NamespaceSpec};
    use crate::spec::{admin, reg, Command, Completion, Status};
    use std::os::unix::io::AsRawFd;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const GUEST: u64 = 0x10_0000;

    fn bar_read32(client: &mut vfio_user::Client, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, offset, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    }

    fn bar_write(client: &mut vfio_user::Client, offset: u64, data: &[u8]) {
        client
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, data)
            .unwrap();
    }

    fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// rust-vmm's client plays the VMM: config space, DMA with a shared
    /// file, an MSI-X eventfd, registers and an Identify through the socket.
    #[test]
    fn a_vfio_user_client_identifies_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let ns_path = dir.path().join("ns.img");
        std::fs::File::create(&ns_path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let spec: NamespaceSpec = ns_path.to_str().unwrap().parse().unwrap();
        let ctrl = Controller::new(ControllerConfig {
            serial: "SOCKTEST".into(),
            model: "cardsim NVMe Instance Storage".into(),
            firmware: "0.1.0".into(),
            io_queues: 1,
            poll: Duration::ZERO,
            namespaces: vec![Namespace::open_plain(&spec, false).unwrap()],
        })
        .unwrap();
        let socket = dir.path().join("nvme.sock");
        {
            let (ctrl, socket) = (ctrl.clone(), socket.clone());
            std::thread::spawn(move || serve_forever(ctrl, &socket, || {}));
        }
        wait("the socket", || socket.exists());
        let mut client = vfio_user::Client::new(&socket).unwrap();

        let mut id = [0u8; 4];
        client
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
            .unwrap();
        assert_eq!(u32::from_le_bytes(id), 0xcd01_1d0f);
        // Accesses outside a region read zeros and keep the stream in step.
        let mut junk = [0xffu8; 8];
        client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, BAR0_SIZE - 4, &mut junk)
            .unwrap();
        assert_eq!(junk, [0; 8]);
        bar_write(&mut client, BAR0_SIZE + 64, &[1, 2, 3, 4]);
        bar_write(&mut client, reg::CC + 1, &[1]);
        assert_eq!(bar_read32(&mut client, reg::VS), 0x0001_0400);

        // Guest memory: a shared file both sides map.
        let memory = tempfile::tempfile().unwrap();
        memory.set_len(1 << 20).unwrap();
        client
            .dma_map(0, GUEST, 1 << 20, memory.as_raw_fd())
            .unwrap();
        let guest =
            DmaSpace::default().with(DmaRegion::map(&memory, 0, GUEST, 1 << 20, true).unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                1,
                &[irq.as_raw_fd()],
            )
            .unwrap();

        let (asq, acq, data) = (GUEST, GUEST + 0x1000, GUEST + 0x2000);
        bar_write(&mut client, reg::AQA, &(7u32 | (7 << 16)).to_le_bytes());
        bar_write(&mut client, reg::ASQ, &asq.to_le_bytes());
        bar_write(&mut client, reg::ACQ, &acq.to_le_bytes());
        bar_write(
            &mut client,
            reg::CC,
            &(1u32 | (6 << 16) | (4 << 20)).to_le_bytes(),
        );
        wait("CSTS.RDY", || bar_read32(&mut client, reg::CSTS) & 1 == 1);

        let mut identify = Command::new(admin::IDENTIFY, 0x42).with_prp(data, 0);
        identify.dw[10] = 1;
        guest.write(asq, &identify.to_bytes()).unwrap();
        bar_write(&mut client, reg::DOORBELLS, &1u32.to_le_bytes());
        let mut cqe = [0u8; 16];
        wait("the completion", || {
            guest.read(acq, &mut cqe).unwrap();
            Completion::from_bytes(&cqe).1
        });
        let (c, _) = Completion::from_bytes(&cqe);
        assert_eq!((c.cid, c.status), (0x42, Status::SUCCESS));
        wait("the MSI-X eventfd", || irq.read().is_ok());
        let mut model = [0u8; 29];
        guest.read(data + 24, &mut model).unwrap();
        assert_eq!(&model, b"cardsim NVMe Instance Storage");

        // A malformed message from another client ends only that connection
        // (the crate panics on a version string without its NUL).
        drop(client);
        let mut bad = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        use std::io::{Read, Write};
        let mut msg = Vec::new();
        msg.extend_from_slice(&1u16.to_le_bytes()); // message id
        msg.extend_from_slice(&1u16.to_le_bytes()); // VERSION
        msg.extend_from_slice(&24u32.to_le_bytes()); // size
        msg.extend_from_slice(&[0; 8]); // flags, error
        msg.extend_from_slice(&[0, 0, 1, 0]); // major, minor
        msg.extend_from_slice(b"{{{{"); // no NUL
        bad.write_all(&msg).unwrap();
        let _ = bad.read(&mut [0u8; 64]);
        drop(bad);
        let mut client = vfio_user::Client::new(&socket).unwrap();
        assert_eq!(bar_read32(&mut client, reg::VS), 0x0001_0400);
        client
            .dma_map(0, GUEST, 1 << 20, memory.as_raw_fd())
            .unwrap();
        bar_write(&mut client, reg::AQA, &(7u32 | (7 << 16)).to_le_bytes());
        bar_write(&mut client, reg::ASQ, &asq.to_le_bytes());
        bar_write(&mut client, reg::ACQ, &acq.to_le_bytes());
        bar_write(
            &mut client,
            reg::CC,
            &(1u32 | (6 << 16) | (4 << 20)).to_le_bytes(),
        );
        wait("CSTS.RDY again", || {
            bar_read32(&mut client, reg::CSTS) & 1 == 1
        });

        // A device reset from the client resets the controller.
        client.reset().unwrap();
        wait("CSTS.RDY = 0", || {
            bar_read32(&mut client, reg::CSTS) & 1 == 0
        });
        // Taking the memory away: the controller holds no mapping of it.
        client.dma_unmap(GUEST, 1 << 20).unwrap();
        wait("the unmap", || ctrl.dma().regions() == 0);
    }
}
