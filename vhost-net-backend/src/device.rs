//! A port as the VMM sees it: a vhost-user-net backend.
//!
//! Queues come in pairs (rx0, tx0, rx1, tx1, …; QEMU keeps the control
//! queue). Each pair has one thread: it takes the guest's TX queue on a kick
//! or when the allowance timer fires, and publishes its RX vring in the port
//! table the first time it runs. A new `PortDevice` is made for every VMM
//! connection; the [`Port`] (counters, allowance buckets) outlives them.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::card::{Card, Forwarder, Input, Port, RxSide};
use crate::chain::{self, CopyCounts, TxChain, MAX_TX_CHAIN};
use crate::counters::add;
use crate::features;
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
    /// Set when the VMM stops a TX queue or goes away: a polling worker
    /// returns to its event loop.
    stopping: AtomicBool,
}

/// The event id of a pair's allowance timer, after the ids the vhost-user
/// layer reserves (one per queue, plus its exit event).
fn timer_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

impl PortDevice {
    pub fn new(card: Arc<Card>, port: Arc<Port>, memory: GuestMemory) -> io::Result<Self> {
        let pairs = usize::from(port.eni.queue_pairs.max(1));
        let rx = Arc::new(RxSide::new(memory.clone(), pairs));
        let workers = (0..pairs)
            .map(|pair| {
                Ok(Mutex::new(PairWorker {
                    pair,
                    timer: Timer::new()?,
                    throttled: false,
                    buf: vec![0; MAX_TX_CHAIN],
                    chain: TxChain::with_capacity(MAX_QUEUE_SIZE),
                    copies: CopyCounts::default(),
                    out: card.forwarder(MAX_QUEUE_SIZE)?,
                }))
            })
            .collect::<io::Result<_>>()?;
        let config_space = features::config_space(port.eni.mac.0, pairs as u16, port.eni.mtu);
        // Until this connection's VMM sets one (NET_SET_MTU).
        card.reset_port_mtu(port.id);
        port.publish(rx.clone());
        Ok(PortDevice {
            card,
            port,
            rx,
            memory,
            workers,
            config_space,
            stopping: AtomicBool::new(false),
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
    /// The TX frame being switched (vnet header included), as much of it as
    /// the card copied: the headers, or all of it when the card works on the
    /// whole frame. MAX_TX_CHAIN long; bytes past the copy are stale.
    buf: Vec<u8>,
    /// Where the rest of that frame is in the guest's memory.
    chain: TxChain,
    /// Bytes this worker copied out of its guest's TX chains.
    copies: CopyCounts,
    out: Forwarder,
}

impl PairWorker {
    /// Takes the guest's TX queue until it is empty or the allowance stops it.
    /// Takes the guest's TX queue until it is empty. With `rearm`, the
    /// guest is then asked to kick for more (and what it added meanwhile is
    /// taken); without, notifications stay off (poll mode). Returns whether
    /// any chain was taken.
    fn transmit(
        &mut self,
        card: &Card,
        port: &Port,
        rx: &RxSide,
        memory: &GuestMemory,
        tx: &Vring,
        rearm: bool,
    ) -> bool {
        if self.throttled {
            return false;
        }
        let negotiated = rx.negotiated();
        let header_len = negotiated.header_len;
        let memory = memory.memory();
        let mut state = tx.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return false;
        }
        let mut returned = false;
        'batch: loop {
            let _ = state.get_queue_mut().disable_notification(&*memory);
            while let Some((head, outcome)) = chain::take_tx(
                state.get_queue_mut(),
                &memory,
                header_len,
                &mut self.chain,
                &mut self.buf,
                &mut self.copies,
            ) {
                if let Err(e) = outcome {
                    port.counters.chain_error(e);
                    warn_limited!(TX_WARNINGS, eni = %port.eni.id, head, error = %e, "TX chain refused");
                    let _ = state.get_queue_mut().add_used(&*memory, head, 0);
                    returned = true;
                    continue;
                }
                let frame_len = self.chain.len() - header_len;
                let packets = match parse_header(&self.buf, header_len) {
                    Some(h) => crate::allowance::wire_packets(&h, frame_len),
                    None => 1,
                };
                if let Err(e) = port.outbound.take(frame_len as u64, packets, card.now()) {
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
                self.switch_frame(card, port, header_len, &memory);
                // Only now: the payload may have been read from the chain
                // until the frame was delivered.
                let _ = state.get_queue_mut().add_used(&*memory, head, 0);
                returned = true;
            }
            if !rearm {
                break;
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
        if returned && crate::card::wants_signal(&mut state, &memory) {
            let _ = state.signal_used_queue();
        }
        drop(state);
        self.out.flush();
        returned
    }

    /// A TX kick. In poll mode (`--poll-us`), the queue is then polled with
    /// the guest's kicks off until it has been idle for the poll window (or
    /// the VMM stops the queue), saving a kick per batch under load.
    fn on_tx_kick(&mut self, d: &PortDevice, tx: &Vring) {
        let poll = d.card.poll;
        if poll.is_zero() {
            self.transmit(&d.card, &d.port, &d.rx, &d.memory, tx, true);
            return;
        }
        let mut idle_since = std::time::Instant::now();
        self.transmit(&d.card, &d.port, &d.rx, &d.memory, tx, false);
        while idle_since.elapsed() < poll && !self.throttled && !d.stopping.load(Ordering::Acquire)
        {
            if self.transmit(&d.card, &d.port, &d.rx, &d.memory, tx, false) {
                idle_since = std::time::Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
        // Kicks back on; take what raced with turning them on.
        self.transmit(&d.card, &d.port, &d.rx, &d.memory, tx, true);
    }

    /// Switches the frame [`chain::take_tx`] took: the switch decides on the
    /// headers the card copied (the guest cannot change them meanwhile),
    /// unless it answers the frame itself (DHCP, a ping to the gateway) and
    /// needs it whole.
    fn switch_frame(
        &mut self,
        card: &Card,
        port: &Port,
        header_len: usize,
        memory: &vm_memory::GuestMemoryMmap,
    ) {
        let Some(header) = parse_header(&self.buf, header_len) else {
            return;
        };
        let total = self.chain.len();
        let head = self.chain.copied().saturating_sub(header_len);
        let now = std::time::Instant::now();
        let decided = card.switch().from_port_headers(
            port.id,
            &header,
            &self.buf[header_len..total],
            head,
            now,
        );
        let verdict = match decided {
            Some(v) => v,
            None => {
                let from = self.chain.copied();
                if self
                    .chain
                    .copy_rest_into(memory, &mut self.buf[from..total], &mut self.copies)
                    .is_err()
                {
                    port.counters.chain_error(chain::ChainError::BadAddress);
                    return;
                }
                card.switch()
                    .from_port(port.id, &header, &self.buf[header_len..total], now)
            }
        };
        if !matches!(verdict, vpc::switch::Verdict::Drop(_)) {
            add(&port.counters.tx_packets, 1);
            add(&port.counters.tx_bytes, (total - header_len) as u64);
        }
        let mut input = Input::from_chain(
            &mut self.buf[..total],
            header_len,
            memory,
            &mut self.chain,
            &mut self.copies,
        );
        card.forward_input(verdict, &mut input, &mut self.out);
    }
}

/// The vnet header at the start of `buf` (10 bytes for a legacy driver:
/// num_buffers is then absent and read as 0).
fn parse_header(buf: &[u8], header_len: usize) -> Option<VnetHeader> {
    let n = header_len.min(VnetHeader::LEN);
    let mut raw = [0u8; VnetHeader::LEN];
    raw[..n].copy_from_slice(buf.get(..n)?);
    VnetHeader::parse(&raw).ok()
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
        } else {
            // Before taking the worker: a polling worker holds it.
            self.stopping.store(true, Ordering::Release);
            if let Ok(mut w) = self.worker(queue_index as usize / 2) {
                w.throttled = false;
                w.timer.clear();
            }
            self.stopping.store(false, Ordering::Release);
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
        // Before touching anything the guest wrote: this thread's own filter,
        // once (a no-op unless the card entered its sandbox).
        card_firmware::sandbox::confine_queue_worker();
        let (Some(rx_vring), Some(tx_vring)) = (vrings.first(), vrings.get(1)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let mut worker = self.worker(thread_id)?;
        self.rx.publish_vring(worker.pair, rx_vring);
        match device_event {
            // RX kick: the guest added receive buffers; frames waiting for
            // them go now.
            0 => {
                let pair = worker.pair;
                self.rx
                    .on_rx_kick(pair, rx_vring, &self.port.counters, worker.out.rx_scratch());
            }
            1 => worker.on_tx_kick(self, tx_vring),
            e if e == timer_event(self.num_queues()) => {
                worker.timer.clear();
                worker.throttled = false;
                worker.transmit(
                    &self.card,
                    &self.port,
                    &self.rx,
                    &self.memory,
                    tx_vring,
                    true,
                );
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
        self.stopping.store(true, Ordering::Release);
        // The VMM is gone: nothing may write into its memory any more.
        self.port.withdraw();
        for pair in 0..self.workers.len() {
            self.rx.withdraw_vring(pair);
        }
    }
}

#[cfg(test)]
mod tests_support {
    //! Two ports of one card, each with a guest simulated on its own memory:
    //! rings laid out by virtio-queue's mock, chains written as a driver would,
    //! the port threads' events called directly.

    use super::*;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    pub(super) use vpc::addr::MacAddr;
    use vpc::config::VpcConfig;

    pub(super) const QSIZE: u16 = 64;
    pub(super) const W: u16 = VRING_DESC_F_WRITE as u16;
    pub(super) const RX_RING: u64 = 0x0;
    pub(super) const TX_RING: u64 = 0x4000;
    pub(super) const BUFFERS: u64 = 0x10_0000;
    pub(super) const MAC_A: MacAddr = MacAddr([2, 0, 10, 0, 1, 10]);
    pub(super) const MAC_B: MacAddr = MacAddr([2, 0, 10, 0, 1, 11]);

    pub(super) fn config(a_extra: &str) -> VpcConfig {
        config_with(a_extra, "")
    }

    pub(super) fn config_with(a_extra: &str, tail: &str) -> VpcConfig {
        VpcConfig::parse(&format!(
            r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100
[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
gateway = "10.0.1.1"
[[security_group]]
id = "sg-web"
ingress = [ {{ proto = "tcp", ports = "5201", cidr = "10.0.0.0/16" }}, {{ proto = "icmp", cidr = "0.0.0.0/0" }} ]
egress  = [ {{ proto = "all", cidr = "0.0.0.0/0" }} ]
[[eni]]
id = "eni-a"
socket = "/nonexistent/a.sock"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
security_groups = ["sg-web"]
{a_extra}
[[eni]]
id = "eni-b"
socket = "/nonexistent/b.sock"
mac = "02:00:0a:00:01:0b"
ip = "10.0.1.11"
subnet = "subnet-a"
security_groups = ["sg-web"]
{tail}
"#
        ))
        .unwrap()
    }

    /// One simulated guest on a port: its memory, rings and the device.
    pub(super) struct Guest {
        memory: GuestMemory,
        pub(super) device: PortDevice,
        rx: Vring,
        tx: Vring,
        next_desc: [u16; 2],
        next_buf: u64,
        /// (descriptor table, avail, used) of RX and TX, as the mock laid them out.
        layout: [(u64, u64, u64); 2],
    }

    impl Guest {
        pub(super) fn connect(card: &Arc<Card>, port: usize, features: u64) -> Guest {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
            let memory = GuestMemoryAtomic::new(mem);
            let device =
                PortDevice::new(card.clone(), card.ports[port].clone(), memory.clone()).unwrap();
            device.acked_features(features);
            let ring = |base: u64| -> (Vring, (u64, u64, u64)) {
                let vring = Vring::new(memory.clone(), QSIZE).unwrap();
                let (d, a, u) = {
                    let guard = memory.memory();
                    let mock = MockSplitQueue::create(&*guard, GuestAddress(base), QSIZE);
                    (
                        mock.desc_table_addr().0,
                        mock.avail_addr().0,
                        mock.used_addr().0,
                    )
                };
                vring.set_queue_size(QSIZE);
                vring.set_queue_info(d, a, u).unwrap();
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                // As vhost-user-backend does on SET_FEATURES with EVENT_IDX.
                vring.set_queue_event_idx(true);
                (vring, (d, a, u))
            };
            let (rx, rx_layout) = ring(RX_RING);
            let (tx, tx_layout) = ring(TX_RING);
            Guest {
                memory,
                device,
                rx,
                tx,
                next_desc: [0, 0],
                next_buf: BUFFERS,
                layout: [rx_layout, tx_layout],
            }
        }

        pub(super) fn mem(&self) -> Arc<GuestMemoryMmap> {
            self.memory.memory().into_inner()
        }

        pub(super) fn rings(&self, q: usize) -> (u64, u64, u64) {
            self.layout[q]
        }

        /// Makes a chain of `(addr, len, flags)` available on queue `q`
        /// (0 RX, 1 TX).
        pub(super) fn offer(&mut self, q: usize, chain: &[(u64, u32, u16)]) {
            let mem = self.mem();
            let (table, avail, _) = self.rings(q);
            let first = self.next_desc[q];
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                let d = RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags,
                    (first + i as u16 + 1) % QSIZE,
                ));
                let at = table + 16 * u64::from((first + i as u16) % QSIZE);
                mem.write_obj(d, GuestAddress(at)).unwrap();
            }
            let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
            mem.write_obj(first, GuestAddress(avail + 4 + 2 * u64::from(idx % QSIZE)))
                .unwrap();
            mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                .unwrap();
            self.next_desc[q] = (first + chain.len() as u16) % QSIZE;
        }

        pub(super) fn buffer(&mut self, bytes: &[u8], room: u32) -> u64 {
            let at = self.next_buf;
            self.mem().write_slice(bytes, GuestAddress(at)).unwrap();
            self.next_buf += u64::from(room.max(bytes.len() as u32)).next_multiple_of(0x1000);
            at
        }

        /// Posts `n` receive buffers of `len` bytes.
        pub(super) fn post_rx(&mut self, n: usize, len: u32) {
            for _ in 0..n {
                let at = self.buffer(&[], len);
                self.offer(0, &[(at, len, W)]);
            }
        }

        /// Sends a frame behind `header` in one descriptor.
        pub(super) fn send(&mut self, header: &VnetHeader, frame: &[u8]) {
            let bytes = [&header.to_bytes()[..], frame].concat();
            let at = self.buffer(&bytes, 0);
            self.offer(1, &[(at, bytes.len() as u32, 0)]);
        }

        pub(super) fn kick(&self, q: u16) {
            self.device
                .handle_event(q, EventSet::IN, &[self.rx.clone(), self.tx.clone()], 0)
                .unwrap();
        }

        /// The used entries of queue `q`: (head, len).
        pub(super) fn used(&self, q: usize) -> Vec<(u32, u32)> {
            let mem = self.mem();
            let (_, _, used) = self.rings(q);
            let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
            (0..idx)
                .map(|i| {
                    let at = used + 4 + 8 * u64::from(i);
                    (
                        mem.read_obj(GuestAddress(at)).unwrap(),
                        mem.read_obj(GuestAddress(at + 4)).unwrap(),
                    )
                })
                .collect()
        }

        /// The avail_event the device published on queue `q` (EVENT_IDX).
        pub(super) fn avail_event(&self, q: usize) -> u16 {
            let (_, _, used) = self.rings(q);
            self.mem()
                .read_obj(GuestAddress(used + 4 + 8 * u64::from(QSIZE)))
                .unwrap()
        }

        /// The bytes the device wrote into RX buffer number `n` (posted in order).
        pub(super) fn received(&self, n: usize) -> Vec<u8> {
            let (head, len) = self.used(0)[n];
            let mem = self.mem();
            let (table, _, _) = self.rings(0);
            let d: RawDescriptor = mem
                .read_obj(GuestAddress(table + 16 * u64::from(head)))
                .unwrap();
            let d = SplitDescriptor::from(d);
            let mut out = vec![0u8; len as usize];
            mem.read_slice(&mut out, d.addr()).unwrap();
            out
        }
    }

    pub(super) fn features() -> u64 {
        features::offered()
    }

    pub(super) fn without(bits: &[u32]) -> u64 {
        bits.iter().fold(features(), |f, b| f & !(1u64 << b))
    }

    pub(super) fn ping(src_mac: MacAddr, src: [u8; 4], dst: [u8; 4], payload: usize) -> Vec<u8> {
        ping_to(MAC_B, src_mac, src, dst, payload)
    }

    pub(super) fn ping_to(
        dst_mac: MacAddr,
        src_mac: MacAddr,
        src: [u8; 4],
        dst: [u8; 4],
        payload: usize,
    ) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
        icmp.resize(8 + payload, 0x5a);
        vpc::frames::ipv4(dst_mac, src_mac, src.into(), dst.into(), 1, &icmp)
    }

    pub(super) fn card(a_extra: &str) -> Arc<Card> {
        Arc::new(Card::new(config(a_extra), None, None).unwrap())
    }

    pub(super) fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
    };
    use vpc::vnet::{F_NEEDS_CSUM, GSO_TCPV4};

    #[test]
    fn a_frame_goes_from_one_guests_tx_chain_into_the_others_rx_buffers() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(4, 2048);
        b.kick(0); // the RX kick publishes B's receive queue
        let frame = ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 100);
        a.send(&VnetHeader::plain(), &frame);
        a.kick(1);
        assert_eq!(a.used(1).len(), 1, "A's TX chain returned");
        assert_eq!(b.used(0).len(), 1, "one RX buffer used");
        let got = b.received(0);
        assert_eq!(got.len(), 12 + frame.len());
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(&got[12..], &frame[..]);
        assert_eq!(counter(&card.ports[0].counters.tx_packets), 1);
        assert_eq!(counter(&card.ports[1].counters.rx_packets), 1);
    }

    /// The MTU a VMM sets (NET_SET_MTU): taken if a virtio-net device can
    /// have it, clamped to the ENI's, in force both ways (what the guest sends
    /// above it is dropped by the switch, what would reach it above it is
    /// dropped and counted), and back to the ENI's on the next connection.
    #[test]
    fn the_mtu_the_vmm_sets_is_enforced_both_ways_and_clamped_to_the_enis() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        for (requested, accepted, mtu) in [
            (67, false, 1500),
            (70_000, false, 1500),
            (u64::MAX, false, 1500),
            (9000, true, 1500),
            (1400, true, 1400),
        ] {
            assert_eq!(card.set_port_mtu(0, requested), accepted, "{requested}");
            assert_eq!(card.ports[0].mtu(), mtu, "{requested}");
            assert_eq!(card.switch().port_mtu(0), Some(mtu), "{requested}");
        }
        assert!(!card.set_port_mtu(7, 1400), "no such port");
        a.post_rx(4, 2048);
        a.kick(0);
        b.post_rx(4, 2048);
        b.kick(0);
        // A sends 1428 bytes of IP (above 1400): dropped as oversized; 1400 goes.
        a.send(
            &VnetHeader::plain(),
            &ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 1400),
        );
        a.send(
            &VnetHeader::plain(),
            &ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 1372),
        );
        a.kick(1);
        assert_eq!(b.used(0).len(), 1);
        assert_eq!(b.received(0).len(), 12 + 14 + 1400);
        let drops = card
            .switch()
            .port_counters(0)
            .unwrap()
            .drops(vpc::switch::DropReason::Oversized);
        assert_eq!(drops, 1);
        // B (MTU 1500) answers with 1428 bytes of IP: too long for A.
        let big = ping_to(MAC_A, MAC_B, [10, 0, 1, 11], [10, 0, 1, 10], 1400);
        b.send(&VnetHeader::plain(), &big);
        b.kick(1);
        assert!(a.used(0).is_empty());
        assert_eq!(counter(&card.ports[0].counters.rx_oversized), 1);
        let fits = ping_to(MAC_A, MAC_B, [10, 0, 1, 11], [10, 0, 1, 10], 1372);
        b.send(&VnetHeader::plain(), &fits);
        b.kick(1);
        assert_eq!(a.used(0).len(), 1);
        // The next VMM connection starts from the ENI's MTU.
        let _a = Guest::connect(&card, 0, features());
        assert_eq!(card.ports[0].mtu(), 1500);
        assert_eq!(card.switch().port_mtu(0), Some(1500));
    }

    /// A TSO frame from A to B in 12 TX descriptors, B merging 1 KiB
    /// buffers: B receives it whole and unchanged, and A's worker copied
    /// only its headers into the card; the rest went guest to guest once. A
    /// DHCP request (answered from its payload) is copied whole instead.
    #[test]
    fn between_guests_the_payload_is_copied_once_and_headers_only_into_the_card() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(16, 1024);
        b.kick(0);
        let (header, frame, _) = tso_frame(9000);
        let bytes = [&header.to_bytes()[..], &frame].concat();
        let pieces: Vec<(u64, u32, u16)> = bytes
            .chunks(bytes.len().div_ceil(12))
            .map(|part| (a.buffer(part, 0), part.len() as u32, 0))
            .collect();
        a.offer(1, &pieces);
        a.kick(1);
        assert_eq!(a.used(1).len(), 1);
        let used = b.used(0);
        assert_eq!(used.len(), 9, "merged over nine 1 KiB buffers");
        let got: Vec<u8> = (0..used.len()).flat_map(|n| b.received(n)).collect();
        assert_eq!(&got[12..], &frame[..]);
        let worker = a.device.worker(0).unwrap();
        let head = 12 + chain::TX_HEAD as u64;
        assert_eq!(worker.copies.tx_to_card, head);
        let rx = worker.out.copies();
        assert_eq!(rx.card_to_rx, head);
        assert_eq!(
            rx.guest_to_guest,
            frame.len() as u64 - chain::TX_HEAD as u64
        );
        drop(worker);

        let discover = vpc::dhcp::client_message(
            vpc::dhcp::DISCOVER,
            MAC_A,
            7,
            0x8000,
            std::net::Ipv4Addr::UNSPECIFIED,
            None,
        );
        let dhcp = vpc::frames::udp_v4(
            MacAddr::BROADCAST,
            MAC_A,
            std::net::Ipv4Addr::UNSPECIFIED,
            std::net::Ipv4Addr::BROADCAST,
            68,
            67,
            &discover,
        );
        assert!(dhcp.len() > chain::TX_HEAD);
        a.post_rx(2, 2048);
        a.kick(0);
        a.send(&VnetHeader::plain(), &dhcp);
        a.kick(1);
        assert_eq!(a.used(0).len(), 1, "an offer came back");
        let worker = a.device.worker(0).unwrap();
        assert_eq!(
            worker.copies.tx_to_card,
            head + 12 + dhcp.len() as u64,
            "whole"
        );
    }

    /// A guest that takes nothing: its backlog fills, then frames are
    /// dropped and counted. Buffers it adds, even before its kick is seen,
    /// take the backlog first.
    #[test]
    fn a_full_backlog_drops_until_the_guest_adds_buffers() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.kick(0);
        let frame = ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 10);
        let c = &card.ports[1].counters;
        let no_buffers = |c: &crate::counters::PortCounters| {
            counter(&c.chain_errors[crate::chain::ChainError::NoRxBuffers.index()])
        };
        // (The mock driver offers 64 chains a round, at most a ring's worth.)
        while no_buffers(c) == 0 {
            for _ in 0..QSIZE {
                a.send(&VnetHeader::plain(), &frame);
            }
            a.kick(1);
        }
        assert_eq!(
            counter(&c.rx_backlogged),
            crate::card::BACKLOG_FRAMES as u64
        );
        let dropped = no_buffers(c);
        // B adds buffers; its kick has not been handled when A sends again.
        b.post_rx(usize::from(QSIZE), 2048);
        a.send(&VnetHeader::plain(), &frame);
        a.kick(1);
        assert!(
            !b.used(0).is_empty(),
            "the backlog went into the new buffers"
        );
        assert_eq!(no_buffers(c), dropped, "the new frame waits, not dropped");
        assert_eq!(
            counter(&c.rx_backlogged),
            crate::card::BACKLOG_FRAMES as u64 + 1
        );
    }

    #[test]
    fn a_port_without_a_guest_drops_and_counts() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        a.send(
            &VnetHeader::plain(),
            &ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 10),
        );
        a.kick(1);
        assert_eq!(a.used(1).len(), 1);
        assert_eq!(counter(&card.ports[1].counters.rx_dropped_port_down), 1);
        // B connects, then goes away again: frames are dropped, never written.
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(2, 2048);
        b.kick(0);
        b.device.quiesce();
        a.send(
            &VnetHeader::plain(),
            &ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 10),
        );
        a.kick(1);
        assert!(b.used(0).is_empty());
        assert_eq!(counter(&card.ports[1].counters.rx_dropped_port_down), 2);
    }

    #[test]
    fn bad_tx_chains_are_counted_and_the_queue_goes_on() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(4, 2048);
        b.kick(0);
        let frame = ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 64);
        // A header split across three descriptors, the frame in a fourth: fine.
        let hdr = VnetHeader::plain().to_bytes();
        let p0 = a.buffer(&hdr[..3], 0);
        let p1 = a.buffer(&hdr[3..11], 0);
        let p2 = a.buffer(&hdr[11..], 0);
        let p3 = a.buffer(&frame, 0);
        a.offer(
            1,
            &[
                (p0, 3, 0),
                (p1, 8, 0),
                (p2, 1, 0),
                (p3, frame.len() as u32, 0),
            ],
        );
        // A device-writable descriptor in a TX chain.
        let w = a.buffer(&frame, 0);
        a.offer(1, &[(w, frame.len() as u32, W)]);
        // Shorter than the vnet header.
        let t = a.buffer(&hdr[..7], 0);
        a.offer(1, &[(t, 7, 0)]);
        // Outside guest memory.
        a.offer(1, &[(0xfff_0000_0000, 100, 0)]);
        // A frame above the MTU without GSO (the switch refuses it).
        let big = ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 3000);
        a.send(&VnetHeader::plain(), &big);
        // And a good one after all that.
        a.send(&VnetHeader::plain(), &frame);
        a.kick(1);
        assert_eq!(a.used(1).len(), 6, "every chain returned to the guest");
        assert_eq!(b.used(0).len(), 2, "the two good frames delivered");
        assert_eq!(&b.received(0)[12..], &frame[..]);
        assert_eq!(&b.received(1)[12..], &frame[..]);
        let c = &card.ports[0].counters;
        use crate::chain::ChainError::*;
        for e in [WriteOnlyInTx, Truncated, BadAddress] {
            assert_eq!(counter(&c.chain_errors[e.index()]), 1, "{e:?}");
        }
        let sw = card.switch();
        let drops = sw.port_counters(0).unwrap();
        assert_eq!(drops.drops(vpc::switch::DropReason::Oversized), 1);
    }

    #[test]
    fn spoofed_sources_are_dropped_and_never_delivered() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(4, 2048);
        b.kick(0);
        a.send(
            &VnetHeader::plain(),
            &ping(
                MacAddr([2, 0, 0, 0, 0, 99]),
                [10, 0, 1, 10],
                [10, 0, 1, 11],
                10,
            ),
        );
        a.send(
            &VnetHeader::plain(),
            &ping(MAC_A, [10, 0, 1, 99], [10, 0, 1, 11], 10),
        );
        a.kick(1);
        assert_eq!(a.used(1).len(), 2);
        assert!(b.used(0).is_empty());
        let sw = card.switch();
        let c = sw.port_counters(0).unwrap();
        assert_eq!(c.drops(vpc::switch::DropReason::SpoofedMac), 1);
        assert_eq!(c.drops(vpc::switch::DropReason::SpoofedIp), 1);
    }

    #[test]
    fn frames_wait_in_the_backlog_until_the_guest_adds_buffers() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(1, 2048);
        b.kick(0);
        let frames: Vec<Vec<u8>> = (0..3)
            .map(|i| ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 10 + i))
            .collect();
        for f in &frames {
            a.send(&VnetHeader::plain(), f);
        }
        a.kick(1);
        assert_eq!(b.used(0).len(), 1);
        let c = &card.ports[1].counters;
        assert_eq!(counter(&c.rx_backlogged), 2);
        // The guest refills its ring and kicks: the two waiting frames land,
        // in order.
        b.post_rx(4, 2048);
        b.kick(0);
        assert_eq!(b.used(0).len(), 3);
        for (n, f) in frames.iter().enumerate() {
            assert_eq!(&b.received(n)[12..], &f[..], "frame {n}");
        }
        assert_eq!(counter(&c.rx_packets), 3);
        assert_eq!(
            counter(&c.chain_errors[crate::chain::ChainError::NoRxBuffers.index()]),
            0
        );
    }

    /// A TSO frame from A to B (TCP port 5201, a SYN so the security group
    /// admits the flow): its vnet header and frame, as a driver leaves them.
    fn tso_frame(payload_len: usize) -> (VnetHeader, Vec<u8>, Vec<u8>) {
        let payload: Vec<u8> = (0..payload_len as u32).map(|i| i as u8).collect();
        let mut frame = vpc::frames::tcp_v4(
            MAC_B,
            MAC_A,
            [10, 0, 1, 10].into(),
            [10, 0, 1, 11].into(),
            40000,
            5201,
            0x02,
            &payload,
        );
        let pseudo = vpc::packet::pseudo_v4(
            [10, 0, 1, 10].into(),
            [10, 0, 1, 11].into(),
            6,
            frame.len() - 34,
        );
        let folded = !vpc::packet::fold(pseudo);
        frame[50..52].copy_from_slice(&folded.to_be_bytes());
        let header = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        (header, frame, payload)
    }

    /// A frame that needs more receive buffers than the guest has posted
    /// waits; the guest must be asked to kick at its *next* buffer (with
    /// EVENT_IDX: avail_event = its avail index, which the card's next_avail
    /// is behind), else it never kicks and TCP stalls on retransmits.
    #[test]
    fn a_frame_waiting_for_more_buffers_asks_for_a_kick_at_the_next_one() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(1, 2048);
        b.kick(0);
        let (header, frame, _) = tso_frame(4000);
        a.send(&header, &frame);
        a.kick(1);
        assert!(b.used(0).is_empty(), "one 2 KiB buffer cannot take 4 KiB");
        assert_eq!(counter(&card.ports[1].counters.rx_backlogged), 1);
        // The guest's avail index is 1: its next buffer must trigger a kick.
        assert_eq!(b.avail_event(0), 1);
        b.post_rx(1, 2048);
        b.kick(0);
        assert_eq!(b.used(0).len(), 2, "the frame took both buffers");
        let first = b.received(0);
        assert_eq!(VnetHeader::parse(&first).unwrap().num_buffers, 2);
    }

    /// A TSO frame for a guest that did not negotiate GUEST_TSO4 is segmented
    /// (each segment a whole frame with a plain header); one that did gets it
    /// whole, merged across buffers, header passed through.
    #[test]
    fn gso_passes_through_or_is_segmented_by_what_the_destination_took() {
        for (b_features, segmented) in [
            (
                without(&[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_CSUM]),
                true,
            ),
            (features(), false),
        ] {
            let card = card("");
            let mut a = Guest::connect(&card, 0, features());
            let mut b = Guest::connect(&card, 1, b_features);
            b.post_rx(16, 2048);
            b.kick(0);
            let (header, frame, payload) = tso_frame(4000);
            a.send(&header, &frame);
            a.kick(1);
            let c = &card.ports[1].counters;
            if segmented {
                assert_eq!(counter(&c.rx_segmented), 1);
                assert_eq!(
                    counter(&c.rx_packets),
                    3,
                    "4000 bytes in 1448-byte segments"
                );
                let mut joined = Vec::new();
                for n in 0..3 {
                    let got = b.received(n);
                    let h = VnetHeader::parse(&got).unwrap();
                    assert!(!h.is_gso() && !h.needs_csum(), "{h:?}");
                    assert!(got.len() - 12 <= 1514);
                    joined.extend_from_slice(&got[12 + 54..]);
                }
                assert_eq!(joined, payload);
            } else {
                assert_eq!(counter(&c.rx_packets), 1);
                let used = b.used(0);
                assert_eq!(used.len(), 2, "merged over two 2 KiB buffers");
                let first = b.received(0);
                let h = VnetHeader::parse(&first).unwrap();
                assert_eq!(
                    (h.gso_type, h.gso_size, h.num_buffers),
                    (GSO_TCPV4, 1448, 2)
                );
                let total: u32 = used.iter().map(|u| u.1).sum();
                assert_eq!(total as usize, 12 + frame.len());
            }
        }
    }

    #[test]
    fn the_outbound_allowance_holds_the_tx_queue_until_its_timer() {
        // Two packets per 200 ms.
        let card = card("allowance = { ops = { size = 2, refill_time = 200 } }");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(8, 2048);
        b.kick(0);
        for _ in 0..3 {
            a.send(
                &VnetHeader::plain(),
                &ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 10),
            );
        }
        a.kick(1);
        assert_eq!(b.used(0).len(), 2);
        assert_eq!(a.used(1).len(), 2, "the third chain stays with the device");
        assert_eq!(counter(&card.ports[0].counters.pps_allowance_exceeded), 1);
        // A kick while throttled changes nothing.
        a.kick(1);
        assert_eq!(a.used(1).len(), 2);
        // The timer fires once the bucket has a token again.
        let fd = a.device.listeners()[0].1;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let start = Instant::now();
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "allowance timer never fired");
        assert!(start.elapsed() < Duration::from_secs(10));
        a.kick(timer_event(2));
        assert_eq!(b.used(0).len(), 3);
        assert_eq!(a.used(1).len(), 3);
    }

    #[test]
    fn poll_mode_takes_the_queue_then_turns_kicks_back_on() {
        let mut c = Card::new(config(""), None, None).unwrap();
        c.poll = Duration::from_millis(20);
        let card = Arc::new(c);
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(4, 2048);
        b.kick(0);
        for _ in 0..2 {
            a.send(
                &VnetHeader::plain(),
                &ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 10),
            );
        }
        let start = Instant::now();
        a.kick(1);
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "polled the window"
        );
        assert_eq!(b.used(0).len(), 2);
        // avail_event (after the used ring) asks for a kick at the next chain.
        assert_eq!(a.avail_event(1), 2);
        // The VMM stopping the queue ends a poll at once.
        let mut c = Card::new(config(""), None, None).unwrap();
        c.poll = Duration::from_secs(30);
        let card = Arc::new(c);
        let a = Guest::connect(&card, 0, features());
        a.device.stopping.store(true, Ordering::Release);
        let start = Instant::now();
        a.kick(1);
        assert!(start.elapsed() < Duration::from_secs(20));
    }

    /// Forwarding between two guests, the outbound allowance and its timer,
    /// all on a thread under the queue-worker seccomp filter: a call outside
    /// the list would kill the test process with SIGSYS.
    #[test]
    fn pair_threads_work_under_their_seccomp_filter() {
        let card = card("allowance = { ops = { size = 2, refill_time = 100 } }");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, features());
        b.post_rx(8, 2048);
        for _ in 0..3 {
            a.send(
                &VnetHeader::plain(),
                &ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 10),
            );
        }
        let filter = crate::sandbox::queue_worker_allowlist().compile().unwrap();
        let (a, b) = std::thread::spawn(move || {
            seccompiler::apply_filter(&filter).unwrap();
            b.kick(0);
            a.kick(1);
            // The third frame waits for the packet bucket: retry as the
            // timer would (poll itself is not a worker call).
            let deadline = Instant::now() + Duration::from_secs(20);
            while a.used(1).len() < 3 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                a.kick(timer_event(2));
            }
            (a, b)
        })
        .join()
        .unwrap();
        assert_eq!(a.used(1).len(), 3);
        assert_eq!(b.used(0).len(), 3);
    }

    #[test]
    fn mrg_rxbuf_off_needs_one_buffer_per_frame() {
        let card = card("");
        let mut a = Guest::connect(&card, 0, features());
        let mut b = Guest::connect(&card, 1, without(&[VIRTIO_NET_F_MRG_RXBUF]));
        // Too small for the frame: returned empty and counted.
        b.post_rx(1, 64);
        b.post_rx(1, 2048);
        b.kick(0);
        let frame = ping(MAC_A, [10, 0, 1, 10], [10, 0, 1, 11], 200);
        a.send(&VnetHeader::plain(), &frame);
        a.send(&VnetHeader::plain(), &frame);
        a.kick(1);
        let used = b.used(0);
        assert_eq!(used[0].1, 0);
        assert_eq!(used[1].1 as usize, 12 + frame.len());
        let c = &card.ports[1].counters;
        assert_eq!(
            counter(&c.chain_errors[crate::chain::ChainError::RxBufferTooSmall.index()]),
            1
        );
    }
}

#[cfg(test)]
mod uplink_tests {
    //! The TAP uplink against the host's side of a real tap: what the card
    //! writes up the tap is read from an AF_PACKET socket on it, and what the
    //! host sends down reaches the guest. Needs root (CI runs as root).

    use super::tests_support::*;
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    struct Tap(String);
    impl Drop for Tap {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }

    fn packet_socket(ifname: &str) -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscalls on a fresh socket we own; structs live here.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(ifname).unwrap();
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            assert!(sll.sll_ifindex > 0);
            let r = libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            std::os::fd::OwnedFd::from_raw_fd(fd)
        }
    }

    #[test]
    fn frames_cross_the_tap_uplink_both_ways() {
        use std::os::fd::AsRawFd;
        let name = format!("csup{}", std::process::id() % 100_000);
        let tap_file = Arc::new(crate::uplink::open_tap(&name).expect("open a tap (root?)"));
        let _tap = Tap(name.clone());
        assert!(Command::new("ip")
            .args(["link", "set", "dev", &name, "up"])
            .status()
            .unwrap()
            .success());
        let host = packet_socket(&name);
        let uplink = format!("[uplink]\ntap = \"{name}\"\n");
        let card =
            Arc::new(Card::new(config_with("", &uplink), None, Some(tap_file.clone())).unwrap());
        {
            let c = card.clone();
            let out = card.forwarder(64).unwrap();
            std::thread::spawn(move || crate::uplink::receive_forever(c, tap_file, out));
        }
        let mut a = Guest::connect(&card, 0, features::offered());
        a.post_rx(8, 2048);
        a.kick(0);
        let router = card.config.vpc.router_mac;
        let outside = [192, 0, 2, 1];

        // Up: a ping to an address outside the VPC, sent to the gateway.
        let up = ping_to(router, MAC_A, [10, 0, 1, 10], outside, 32);
        a.send(&VnetHeader::plain(), &up);
        a.kick(1);
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            assert!(Instant::now() < deadline, "the frame never came up the tap");
            // SAFETY: reading into a live buffer.
            let n = unsafe { libc::recv(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 34 && buf[12..14] == [0x08, 0x00] && buf[30..34] == outside {
                break buf[..n as usize].to_vec();
            }
        };
        assert_eq!(&got[6..12], &router.0, "sent from the router MAC");
        assert_eq!(&got[14..], &up[14..], "IP packet unchanged");
        assert_eq!(
            card.uplink_counters
                .tx_frames
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        // Down: the host answers; the guest receives it.
        let host_mac = MacAddr([2, 0, 0, 0, 0, 0x99]);
        let mut icmp = up[34..].to_vec();
        icmp[0] = 0; // echo reply
        icmp[2] = 0;
        icmp[3] = 0;
        let reply = vpc::frames::ipv4(
            router,
            host_mac,
            outside.into(),
            [10, 0, 1, 10].into(),
            1,
            &icmp,
        );
        // SAFETY: sending a live buffer on our socket.
        let n = unsafe { libc::send(host.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
        assert_eq!(n as usize, reply.len());
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.used(0).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the reply never reached the guest: {}",
                card.snapshot()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let got = a.received(0);
        assert_eq!(&got[12 + 14..], &reply[14..]);
        assert_eq!(&got[12..18], &MAC_A.0, "addressed to the ENI");
    }
}
