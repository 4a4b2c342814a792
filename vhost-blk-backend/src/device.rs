//! The block card as the VMM sees it: a vhost-user-blk backend.
//!
//! One worker thread per virtqueue (queues_per_thread); each waits on its
//! queue's kick eventfd, its io_uring's completion eventfd and its timer. A new
//! `BlockDevice` is made for every VMM connection; the [`Volume`] it serves
//! outlives them all.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use card_firmware::vhost::{CardBackend, GuestMemory, Vring};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
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
