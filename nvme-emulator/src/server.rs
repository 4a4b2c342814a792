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

/// Serves the controller on `socket`, connection after connection, until a
/// fatal error. Between connections the controller is reset and its DMA
/// regions dropped, so a restarted VMM finds a fresh controller.
pub fn serve_forever(
    ctrl: Arc<Controller>,
    socket: &Path,
    announce: impl FnOnce(),
) -> Result<(), ServeError> {
    card_firmware::socket::claim_socket_path(socket)?;
    let vectors = ctrl.irqs.count() as u32;
    let server = Server::new(
        socket,
        true,
        NvmeDevice::irqs(vectors),
        NvmeDevice::regions(),
    )
    .map_err(|source| ServeError::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let admin = {
        let ctrl = ctrl.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("nvme-admin".into())
            .spawn(move || ctrl.run_admin(stop))
            .map_err(ServeError::Thread)?
    };
    announce();
    loop {
        let mut device = NvmeDevice::new(ctrl.clone());
        match server.run(&mut device) {
            Ok(()) => tracing::info!("client disconnected; waiting for the next one"),
            Err(e) => {
                tracing::warn!(error = %e, "connection ended with an error; waiting for the next one")
            }
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
