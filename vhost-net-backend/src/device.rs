//! A port as the VMM sees it: a vhost-user-net backend.
//!
//! Queues come in pairs (rx0, tx0, rx1, tx1, …; QEMU keeps the control
//! queue). Each pair has one thread: it takes the guest's TX queue on a kick
//! or when the allowance timer fires, and publishes its RX vring in the port
//! table the first time it runs. A new `PortDevice` is made for every VMM
//! connection; the [`Port`] (counters, allowance buckets) outlives them.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use card_firmware::timer::Timer;
use card_firmware::vhost::{CardBackend, GuestMemory, Vring};
use card_firmware::warn::WarnLimiter;
use card_firmware::warn_limited;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::allowance::Exceeded;
use crate::card::{Card, Forwarder, Port, RxSide};
use crate::chain::{self, MAX_TX_CHAIN};
use crate::counters::add;
use crate::features;
use crate::vxlan::VxlanSender;
use vpc::vnet::VnetHeader;

static TX_WARNINGS: WarnLimiter = WarnLimiter::new(1000);

/// Largest virtqueue accepted.
pub const MAX_QUEUE_SIZE: usize = 1024;

pub struct PortDevice {
    card: Arc<Card>,
    port: Arc<Port>,
    rx: Arc<RxSide>,
    memory: GuestMemory,
    workers: Vec<Mutex<PairWorker>>,
    config_space: [u8; features::CONFIG_LEN],
}

/// The event id of a pair's allowance timer, after the ids the vhost-user
/// layer reserves (one per queue, plus its exit event).
fn timer_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

impl PortDevice {
    pub fn new(
        card: Arc<Card>,
        port: Arc<Port>,
        memory: GuestMemory,
        vxlan: Option<&Arc<crate::vxlan::VxlanCounters>>,
    ) -> io::Result<Self> {
        let pairs = usize::from(port.eni.queue_pairs.max(1));
        let rx = Arc::new(RxSide::new(memory.clone(), pairs));
        let workers = (0..pairs)
            .map(|pair| {
                let sender = match (&card.vxlan, vxlan) {
                    (Some(socket), Some(counters)) => {
                        Some(VxlanSender::new(socket.clone(), counters.clone())?)
                    }
                    _ => None,
                };
                Ok(Mutex::new(PairWorker {
                    pair,
                    timer: Timer::new()?,
                    throttled: false,
                    buf: Vec::with_capacity(MAX_TX_CHAIN),
                    out: Forwarder::new(MAX_QUEUE_SIZE, sender),
                }))
            })
            .collect::<io::Result<_>>()?;
        let config_space = features::config_space(port.eni.mac.0, pairs as u16, port.eni.mtu);
        port.publish(rx.clone());
        Ok(PortDevice {
            card,
            port,
            rx,
            memory,
            workers,
            config_space,
        })
    }

    fn worker(&self, pair: usize) -> io::Result<MutexGuard<'_, PairWorker>> {
        self.workers
            .get(pair)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?
            .lock()
            .map_err(|_| io::Error::other("pair worker poisoned"))
    }
}

struct PairWorker {
    pair: usize,
    timer: Timer,
    /// Waiting for the outbound allowance: kicks are ignored until the timer.
    throttled: bool,
    /// The TX frame being switched (vnet header included).
    buf: Vec<u8>,
    out: Forwarder,
}

impl PairWorker {
    /// Takes the guest's TX queue until it is empty or the allowance stops it.
    fn transmit(
        &mut self,
        card: &Card,
        port: &Port,
        rx: &RxSide,
        memory: &GuestMemory,
        tx: &Vring,
    ) {
        if self.throttled {
            return;
        }
        let negotiated = rx.negotiated();
        let header_len = negotiated.header_len;
        let memory = memory.memory();
        let mut state = tx.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let mut returned = false;
        'batch: loop {
            let _ = state.get_queue_mut().disable_notification(&*memory);
            while let Some((head, outcome)) =
                chain::gather_tx(state.get_queue_mut(), &memory, header_len, &mut self.buf)
            {
                if let Err(e) = outcome {
                    port.counters.chain_error(e);
                    warn_limited!(TX_WARNINGS, eni = %port.eni.id, head, error = %e, "TX chain refused");
                    let _ = state.get_queue_mut().add_used(&*memory, head, 0);
                    returned = true;
                    continue;
                }
                let frame_len = self.buf.len() - header_len;
                if let Err(e) = port.outbound.take(frame_len as u64, card.now()) {
                    // Leave the chain in the ring; come back when the
                    // buckets hold enough.
                    let q = state.get_queue_mut();
                    let next = q.next_avail().wrapping_sub(1);
                    q.set_next_avail(next);
                    add(
                        match e {
                            Exceeded::Bandwidth(_) => &port.counters.bw_out_allowance_exceeded,
                            Exceeded::Packets(_) => &port.counters.pps_allowance_exceeded,
                        },
                        1,
                    );
                    self.throttled = true;
                    if let Err(err) = self.timer.arm_by(card.instant(e.ready_at())) {
                        tracing::error!(error = %err, "cannot arm the allowance timer");
                        self.throttled = false;
                    }
                    break 'batch;
                }
                let _ = state.get_queue_mut().add_used(&*memory, head, 0);
                returned = true;
                self.switch_frame(card, port, header_len);
            }
            match state.get_queue_mut().enable_notification(&*memory) {
                Ok(true) => {
                    // The guest moved avail.idx more than a queue ahead:
                    // virtio-queue yields no chain, so stop here.
                    if virtio_queue::QueueOwnedT::iter(state.get_queue_mut(), &*memory).is_err() {
                        warn_limited!(TX_WARNINGS, eni = %port.eni.id, "available index is more than a queue ahead; TX ring ignored");
                        break;
                    }
                }
                Ok(false) | Err(_) => break,
            }
        }
        if returned && state.needs_notification().unwrap_or(true) {
            let _ = state.signal_used_queue();
        }
        drop(state);
        self.out.flush();
    }

    fn switch_frame(&mut self, card: &Card, port: &Port, header_len: usize) {
        let (head_bytes, frame) = self.buf.split_at_mut(header_len);
        let mut raw = [0u8; 12];
        raw[..header_len.min(12)].copy_from_slice(&head_bytes[..header_len.min(12)]);
        let header = match VnetHeader::parse(&raw) {
            Ok(h) => h,
            Err(_) => return,
        };
        let verdict = card
            .switch()
            .from_port(port.id, &header, frame, std::time::Instant::now());
        if !matches!(verdict, vpc::switch::Verdict::Drop(_)) {
            add(&port.counters.tx_packets, 1);
            add(&port.counters.tx_bytes, frame.len() as u64);
        }
        card.forward(verdict, frame, &mut self.out);
    }
}

impl VhostUserBackend for PortDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.workers.len() * 2
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        features::offered()
    }

    fn acked_features(&self, features: u64) {
        self.rx.set_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        features::protocol()
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vhost-user layer sets EVENT_IDX on each virtqueue.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        features::read_config(&self.config_space, offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn update_memory(&self, _memory: GuestMemory) -> io::Result<()> {
        // Workers read the shared GuestMemoryAtomic, already updated.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len())
            .map(|p| 0b11u64 << (2 * p))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn reset_device(&self) {
        for pair in 0..self.workers.len() {
            self.rx.withdraw_vring(pair);
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: an RX queue stops taking frames from other ports
        // now; a TX queue is only ever taken by its own thread.
        if queue_index % 2 == 0 {
            self.rx.withdraw_vring(queue_index as usize / 2);
        } else if let Ok(mut w) = self.worker(queue_index as usize / 2) {
            w.throttled = false;
            w.timer.clear();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rx_vring), Some(tx_vring)) = (vrings.first(), vrings.get(1)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let mut worker = self.worker(thread_id)?;
        self.rx.publish_vring(worker.pair, rx_vring);
        match device_event {
            // RX kick: the guest added receive buffers. Frames are dropped,
            // not queued, when it has none, so there is nothing to resume.
            0 => {}
            1 => worker.transmit(&self.card, &self.port, &self.rx, &self.memory, tx_vring),
            e if e == timer_event(self.num_queues()) => {
                worker.timer.clear();
                worker.throttled = false;
                worker.transmit(&self.card, &self.port, &self.rx, &self.memory, tx_vring);
            }
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
        Ok(())
    }
}

impl CardBackend for PortDevice {
    fn listeners(&self) -> Vec<(usize, RawFd, u64)> {
        let timer = u64::from(timer_event(self.num_queues()));
        self.workers
            .iter()
            .enumerate()
            .filter_map(|(pair, w)| w.lock().ok().map(|w| (pair, w.timer.fd(), timer)))
            .collect()
    }

    fn quiesce(&self) {
        // The VMM is gone: nothing may write into its memory any more.
        self.port.withdraw();
        for pair in 0..self.workers.len() {
            self.rx.withdraw_vring(pair);
        }
    }
}
