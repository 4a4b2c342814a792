//! The VMM's half of the vhost-user handshake, on rust-vmm's `Frontend`.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::EventFd;

use crate::error::BenchError;
use crate::memory::GuestMemory;
use crate::ring::RingLayout;

/// Bytes of virtio_blk_config we read: capacity .. num_queues. Shorter than
/// any backend's config space, so every backend can answer it.
const CONFIG_READ_LEN: u32 = 36;

/// What the handshake learned about the device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub capacity_bytes: u64,
    pub num_queues: u16,
    pub read_only: bool,
    pub event_idx: bool,
    pub features: u64,
}

pub struct Connection {
    path: PathBuf,
    frontend: Frontend,
    timeout: Duration,
    watchdog: Option<Watchdog>,
    pub info: DeviceInfo,
}

impl Connection {
    /// Connects and negotiates features, protocol features and config.
    /// `connect_wait` retries a missing or refusing socket (a backend that
    /// is still starting); the CLI uses zero, so a wrong path fails at once.
    pub fn open(
        path: &Path,
        timeout: Duration,
        connect_wait: Duration,
    ) -> Result<Self, BenchError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if started.elapsed() < connect_wait
                        && matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(BenchError::Connect {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        };
        // A silent peer must not hang the handshake. Socket read timeouts
        // don't help: vhost's Endpoint retries EAGAIN forever. Instead a
        // watchdog shuts the socket down, which fails the pending step.
        let watchdog = Watchdog::start(&stream, timeout).map_err(|source| BenchError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let frontend = Frontend::from_stream(stream, 1);
        let mut conn = Self {
            path: path.to_owned(),
            frontend,
            timeout,
            watchdog: Some(watchdog),
            info: DeviceInfo {
                capacity_bytes: 0,
                num_queues: 1,
                read_only: false,
                event_idx: false,
                features: 0,
            },
        };
        conn.negotiate()?;
        Ok(conn)
    }

    fn step<T>(&self, step: &'static str, r: vhost::Result<T>) -> Result<T, BenchError> {
        r.map_err(|source| {
            let fired = self.watchdog.as_ref().is_some_and(Watchdog::fired);
            if fired || is_timeout(&source) {
                BenchError::Timeout {
                    path: self.path.clone(),
                    step,
                    timeout: self.timeout,
                }
            } else {
                BenchError::Handshake {
                    path: self.path.clone(),
                    step,
                    source,
                }
            }
        })
    }

    fn device_error(&self, detail: String) -> BenchError {
        BenchError::Device {
            path: self.path.clone(),
            detail,
        }
    }

    fn negotiate(&mut self) -> Result<(), BenchError> {
        let r = self.frontend.set_owner();
        self.step("SET_OWNER", r)?;
        let r = self.frontend.get_features();
        let offered = self.step("GET_FEATURES", r)?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 || offered & protocol_bit == 0 {
            return Err(self.device_error(format!(
                "features {offered:#x} lack VERSION_1 or PROTOCOL_FEATURES; not a vhost-user-blk backend we can drive"
            )));
        }
        let r = self.frontend.get_protocol_features();
        let proto = self.step("GET_PROTOCOL_FEATURES", r)?;
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(self.device_error(
                "backend lacks the CONFIG protocol feature; cannot read the disk's capacity".into(),
            ));
        }
        let acked = proto & want;
        let r = self.frontend.set_protocol_features(acked);
        self.step("SET_PROTOCOL_FEATURES", r)?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request is answered, so a refusal surfaces at its step.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let mut max_queues = 1;
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let r = self.frontend.get_queue_num();
            max_queues = self.step("GET_QUEUE_NUM", r)?;
        }

        let buf = [0u8; CONFIG_READ_LEN as usize];
        let r = self
            .frontend
            .get_config(0, CONFIG_READ_LEN, VhostUserConfigFlags::empty(), &buf);
        let (_, config) = self.step("GET_CONFIG", r)?;
        let capacity_sectors = u64::from_le_bytes(config[0..8].try_into().expect("8 bytes"));
        let config_queues = u16::from_le_bytes(config[34..36].try_into().expect("2 bytes"));

        let mut features = protocol_bit
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_RO;
        features &= offered;
        let r = self.frontend.set_features(features);
        self.step("SET_FEATURES", r)?;

        let num_queues = if features & (1 << VIRTIO_BLK_F_MQ) != 0 {
            config_queues.max(1)
        } else {
            1
        };
        self.info = DeviceInfo {
            capacity_bytes: capacity_sectors.saturating_mul(512),
            num_queues: num_queues.min(u16::try_from(max_queues).unwrap_or(u16::MAX)),
            read_only: features & (1 << VIRTIO_BLK_F_RO) != 0,
            event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            features,
        };
        Ok(())
    }

    pub fn set_mem_table(&self, mem: &GuestMemory) -> Result<(), BenchError> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.len() as u64,
            userspace_addr: mem.host_addr(),
            mmap_offset: 0,
            mmap_handle: mem.fd(),
        };
        let r = self.frontend.set_mem_table(&[region]);
        self.step("SET_MEM_TABLE", r).map(|_| ())
    }

    /// Hands one ring to the backend and enables it.
    pub fn start_queue(
        &mut self,
        index: usize,
        layout: RingLayout,
        base: u16,
        host_addr: u64,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), BenchError> {
        let r = self.frontend.set_vring_num(index, layout.size);
        self.step("SET_VRING_NUM", r)?;
        let r = self.frontend.set_vring_base(index, base);
        self.step("SET_VRING_BASE", r)?;
        let config = VringConfigData {
            queue_max_size: layout.size,
            queue_size: layout.size,
            flags: 0,
            desc_table_addr: host_addr + layout.desc,
            used_ring_addr: host_addr + layout.used,
            avail_ring_addr: host_addr + layout.avail,
            log_addr: None,
        };
        let r = self.frontend.set_vring_addr(index, &config);
        self.step("SET_VRING_ADDR", r)?;
        // Call before kick: once kicked the backend may want to signal.
        let r = self.frontend.set_vring_call(index, call);
        self.step("SET_VRING_CALL", r)?;
        let r = self.frontend.set_vring_kick(index, kick);
        self.step("SET_VRING_KICK", r)?;
        let r = self.frontend.set_vring_enable(index, true);
        self.step("SET_VRING_ENABLE", r)
    }

    /// The handshake is over: the run may take as long as it likes.
    pub fn handshake_done(&mut self) {
        self.watchdog = None;
    }

    /// The socket, for noticing a backend that goes away mid-run.
    pub fn raw_fd(&self) -> i32 {
        self.frontend.as_raw_fd()
    }
}

fn is_timeout(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as U;
    match e {
        vhost::Error::VhostUserProtocol(
            U::SocketError(io) | U::SocketRetry(io) | U::SocketBroken(io),
        ) => matches!(
            io.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        _ => false,
    }
}

/// Shuts the socket down unless dropped within the timeout.
struct Watchdog {
    fired: Arc<AtomicBool>,
    // Dropping the sender wakes the thread early.
    _done: mpsc::Sender<()>,
}

impl Watchdog {
    fn start(stream: &UnixStream, timeout: Duration) -> io::Result<Self> {
        let sock = stream.try_clone()?;
        let fired = Arc::new(AtomicBool::new(false));
        let (done, wait) = mpsc::channel::<()>();
        let flag = fired.clone();
        std::thread::Builder::new()
            .name("handshake-watchdog".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
                    flag.store(true, Ordering::SeqCst);
                    let _ = sock.shutdown(Shutdown::Both);
                }
            })?;
        Ok(Self { fired, _done: done })
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}
