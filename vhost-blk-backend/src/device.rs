//! The block card as the VMM sees it: a vhost-user-blk backend.
//!
//! One worker thread per virtqueue (queues_per_thread); each waits on its
//! queue's kick eventfd, its io_uring's completion eventfd and its timer. A new
//! `BlockDevice` is made for every VMM connection; the [`Volume`] it serves
//! outlives them all.

use std::fs::File;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use card_firmware::inflight::{self, InflightRegion};
use card_firmware::vhost::{CardBackend, GuestMemory, Vring};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config;
use crate::queue::QueueWorker;
use crate::Volume;

/// The event id of a queue's io_uring completions, after the ids the
/// vhost-user layer reserves (one per queue, plus its own exit event).
fn completion_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

/// The event id of a queue's timer.
fn timer_event(num_queues: usize) -> u16 {
    num_queues as u16 + 2
}

pub struct BlockDevice {
    volume: Arc<Volume>,
    workers: Vec<Mutex<QueueWorker>>,
}

impl BlockDevice {
    pub fn new(volume: Arc<Volume>, memory: GuestMemory) -> io::Result<Self> {
        let workers = (0..volume.num_queues as usize)
            .map(|i| QueueWorker::new(i, volume.clone(), memory.clone()).map(Mutex::new))
            .collect::<io::Result<_>>()?;
        Ok(Self { volume, workers })
    }

    fn worker(&self, queue: usize) -> io::Result<MutexGuard<'_, QueueWorker>> {
        self.workers
            .get(queue)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?
            .lock()
            .map_err(|_| io::Error::other("queue worker poisoned"))
    }
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.volume.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.volume.queue_size as usize
    }

    fn features(&self) -> u64 {
        config::features(&self.volume)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vhost-user layer sets EVENT_IDX on each virtqueue, which is
        // where notification suppression is decided.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::read_config(&self.volume, offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in our config space is writable (no CONFIG_WCE).
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn update_memory(&self, _memory: GuestMemory) -> io::Result<()> {
        // Workers read the shared GuestMemoryAtomic, already updated.
        Ok(())
    }

    /// A new region for the VMM to keep across card restarts.
    fn get_inflight_fd(&self, asked: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (file, size) = inflight::create_region(
            asked.num_queues,
            asked.queue_size,
            self.volume.num_queues,
            self.volume.queue_size,
        )
        .map_err(refused_region)?;
        let answer = VhostUserInflight::new(size, 0, asked.num_queues, asked.queue_size);
        Ok((answer, file))
    }

    /// The VMM hands the region back, after a restart with what was in
    /// flight: each queue worker recovers from it when its ring starts.
    fn set_inflight_fd(&self, region: &VhostUserInflight, file: File) -> io::Result<()> {
        let mapped = InflightRegion::map(
            &file,
            region.mmap_size,
            region.mmap_offset,
            region.num_queues,
            region.queue_size,
            self.volume.num_queues,
            self.volume.queue_size,
        )
        .map_err(refused_region)?;
        tracing::info!(
            queues = region.num_queues,
            queue_size = region.queue_size,
            "inflight region from the VMM"
        );
        for (index, worker) in self.workers.iter().enumerate() {
            let queue = u16::try_from(index).ok().and_then(|i| mapped.queue(i));
            worker
                .lock()
                .map_err(|_| io::Error::other("queue worker poisoned"))?
                .track_inflight(queue);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.volume.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.worker(queue_index as usize)?.stop();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // This thread reads what the guest wrote: narrow its system calls
        // before it does (once; nothing without a sandbox).
        card_firmware::sandbox::confine_queue_worker();
        // One queue per thread: the thread's only vring is that queue.
        let vring = vrings
            .first()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut worker = self.worker(thread_id)?;
        if device_event == 0 {
            worker.on_kick(vring);
        } else if device_event == completion_event(self.workers.len()) {
            worker.on_completions(vring);
        } else if device_event == timer_event(self.workers.len()) {
            worker.on_timer(vring);
        } else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

fn refused_region(e: inflight::InflightError) -> io::Error {
    tracing::warn!(error = %e, "inflight region refused");
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

impl CardBackend for BlockDevice {
    fn listeners(&self) -> Vec<(usize, RawFd, u64)> {
        let completions = u64::from(completion_event(self.workers.len()));
        let timer = u64::from(timer_event(self.workers.len()));
        let mut listeners = Vec::new();
        for (q, worker) in self.workers.iter().enumerate() {
            if let Ok(w) = worker.lock() {
                listeners.push((q, w.completion_fd(), completions));
                listeners.push((q, w.timer_fd(), timer));
            }
        }
        listeners
    }

    fn quiesce(&self) {
        for worker in &self.workers {
            if let Ok(mut w) = worker.lock() {
                w.quiesce();
            }
        }
    }
}
