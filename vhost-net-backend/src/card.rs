//! The card: its ports (one per ENI), the VPC switch between them, and the
//! delivery of a switched frame to where the switch sent it.
//!
//! ## The port table and cross-port delivery
//! Each port's receive side ([`RxSide`]: its guest memory, negotiated
//! features and RX vrings) belongs to that port's vhost-user connection. It is
//! published in the port's slot when a VMM connects and taken out when it
//! disconnects; an RX vring is published when its queue-pair thread first
//! runs and taken out when the VMM stops that queue. A thread delivering into
//! another port clones the `Arc`/vring out of the slot (the slot's lock is
//! held only for that clone), then locks just that RX vring for the copy.
//! A port whose guest is gone has an empty slot: the frame is dropped and
//! counted, nothing waits. Lock order: a TX vring, then an RX vring, then
//! that RX queue's backlog; the switch's lock is never held across a
//! delivery. A guest without a free receive buffer gets its frames later,
//! from a bounded backlog drained on its RX kick (`Backlog`).

use std::collections::VecDeque;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use card_firmware::vhost::{GuestMemory, Vring};
use card_firmware::warn::WarnLimiter;
use card_firmware::warn_limited;
use serde_json::{json, Value};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vpc::config::{EniConfig, VpcConfig};
use vpc::switch::{Egress, PortId, Switch, Verdict};
use vpc::vnet::VnetHeader;

use crate::allowance::{Allowance, Exceeded};
use crate::chain::{self, ChainError, CopyCounts, Frame, GuestTail, RxScratch, TxChain};
use crate::counters::{add, PortCounters};
use crate::features::Negotiated;
use crate::uplink::{UplinkCounters, UplinkSender};
use crate::vxlan::{VxlanCounters, VxlanSender};

/// vhost-user-backend maps a thread's queues with a u64 mask: 64 queues.
pub const MAX_QUEUE_PAIRS: u16 = 32;

static DELIVERY_WARNINGS: WarnLimiter = WarnLimiter::new(1000);

/// One ENI: what survives its guest's connections.
pub struct Port {
    pub id: PortId,
    pub eni: EniConfig,
    pub counters: PortCounters,
    pub outbound: Allowance,
    pub inbound: Allowance,
    /// The MTU in force: the ENI's, or the lower one the VMM set
    /// (VHOST_USER_NET_SET_MTU, QEMU's `host_mtu`) for this connection.
    mtu: AtomicU16,
    rx: RwLock<Option<Arc<RxSide>>>,
}

/// A connected port's receive side.
pub struct RxSide {
    memory: GuestMemory,
    acked_features: AtomicU64,
    /// The RX vring of each queue pair, once its thread has run.
    pairs: Vec<RwLock<Option<Vring>>>,
    /// Per queue pair: frames waiting for receive buffers.
    backlogs: Vec<Mutex<Backlog>>,
}

/// Frames held for a guest that has no receive buffer free right now, as a
/// NIC's receive FIFO (or a tap's queue) would hold them: bounded in frames
/// and bytes, oldest delivered first, buffers reused (no allocation once
/// warm). A frame that finds the backlog full is dropped and counted
/// (`rx_no_buffers`).
struct Backlog {
    frames: VecDeque<(VnetHeader, Vec<u8>)>,
    bytes: usize,
    free: Vec<Vec<u8>>,
}

/// Frames and bytes a queue pair's backlog holds at most.
pub const BACKLOG_FRAMES: usize = 512;
pub const BACKLOG_BYTES: usize = 2 << 20;

impl Backlog {
    fn new() -> Self {
        Backlog {
            frames: VecDeque::with_capacity(BACKLOG_FRAMES),
            bytes: 0,
            free: Vec::new(),
        }
    }

    /// Keeps a copy of the frame (a sending guest's bytes are copied now:
    /// its TX chain goes back to it before the frame is delivered); false if
    /// there is no room or the sender's memory cannot be read.
    fn push(&mut self, header: &VnetHeader, frame: Frame<'_>, copies: &mut CopyCounts) -> bool {
        if self.frames.len() >= BACKLOG_FRAMES || self.bytes + frame.len() > BACKLOG_BYTES {
            return false;
        }
        let mut buf = self.free.pop().unwrap_or_default();
        if frame.copy_into(&mut buf, copies).is_err() {
            self.free.push(buf);
            return false;
        }
        self.bytes += buf.len();
        self.frames.push_back((*header, buf));
        true
    }

    fn pop(&mut self) {
        if let Some((_, buf)) = self.frames.pop_front() {
            self.bytes -= buf.len();
            self.free.push(buf);
        }
    }

    fn clear(&mut self) {
        while !self.frames.is_empty() {
            self.pop();
        }
    }
}

impl RxSide {
    pub fn new(memory: GuestMemory, queue_pairs: usize) -> Self {
        RxSide {
            memory,
            acked_features: AtomicU64::new(0),
            pairs: (0..queue_pairs).map(|_| RwLock::new(None)).collect(),
            backlogs: (0..queue_pairs)
                .map(|_| Mutex::new(Backlog::new()))
                .collect(),
        }
    }

    pub fn set_features(&self, acked: u64) {
        self.acked_features.store(acked, Ordering::Release);
    }

    pub fn negotiated(&self) -> Negotiated {
        Negotiated::from_bits(self.acked_features.load(Ordering::Acquire))
    }

    pub fn publish_vring(&self, pair: usize, vring: &Vring) {
        if let Some(slot) = self.pairs.get(pair) {
            let mut slot = slot.write().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(vring.clone());
            }
        }
    }

    pub fn withdraw_vring(&self, pair: usize) {
        if let Some(slot) = self.pairs.get(pair) {
            *slot.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
        if let Some(b) = self.backlogs.get(pair) {
            b.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// The guest added receive buffers on `pair` (an RX kick): deliver what
    /// waits for them, and signal the guest if EVENT_IDX says so.
    pub fn on_rx_kick(
        &self,
        pair: usize,
        vring: &Vring,
        counters: &PortCounters,
        scratch: &mut RxScratch,
    ) {
        let Some(backlog) = self.backlogs.get(pair) else {
            return;
        };
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
        let mut backlog = backlog.lock().unwrap_or_else(|p| p.into_inner());
        if backlog.frames.is_empty() {
            return;
        }
        let memory = self.memory.memory();
        let negotiated = self.negotiated();
        let mut delivered = drain(
            &mut state,
            &memory,
            &mut backlog,
            negotiated,
            scratch,
            counters,
        );
        delivered |= rearm_and_drain(
            &mut state,
            &memory,
            &mut backlog,
            negotiated,
            scratch,
            counters,
        );
        if delivered && wants_signal(&mut state, &memory) {
            let _ = state.signal_used_queue();
        }
    }

    fn vring(&self, pair: usize) -> Option<Vring> {
        self.pairs
            .get(pair)?
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Port {
    /// The MTU in force on this port.
    pub fn mtu(&self) -> u16 {
        self.mtu.load(Ordering::Relaxed)
    }

    pub fn publish(&self, rx: Arc<RxSide>) {
        *self.rx.write().unwrap_or_else(|p| p.into_inner()) = Some(rx);
    }

    pub fn withdraw(&self) {
        *self.rx.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn rx_side(&self) -> Option<Arc<RxSide>> {
        self.rx.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub struct Card {
    pub config: VpcConfig,
    pub switch: Mutex<Switch>,
    pub ports: Vec<Arc<Port>>,
    /// The VXLAN socket, when `[vxlan]` is configured.
    pub vxlan: Option<Arc<UdpSocket>>,
    pub vxlan_counters: Arc<VxlanCounters>,
    /// The TAP uplink, when `[uplink]` is configured.
    pub uplink: Option<Arc<File>>,
    pub uplink_counters: Arc<UplinkCounters>,
    /// Poll window of a TX queue after work (`--poll-us`); zero: interrupt
    /// mode, every batch waits for a kick.
    pub poll: Duration,
    epoch: Instant,
}

impl Card {
    pub fn new(
        config: VpcConfig,
        vxlan: Option<Arc<UdpSocket>>,
        uplink: Option<Arc<File>>,
    ) -> Result<Self, String> {
        let epoch = Instant::now();
        if let Some(eni) = config.enis.iter().find(|e| e.queue_pairs > MAX_QUEUE_PAIRS) {
            return Err(format!(
                "eni {}: queue_pairs {} is more than the {MAX_QUEUE_PAIRS} a vhost-user port can have",
                eni.id, eni.queue_pairs
            ));
        }
        let switch = Switch::new(&config);
        let ports = config
            .enis
            .iter()
            .enumerate()
            .map(|(id, eni)| {
                let allowance = |dir: &str| {
                    Allowance::new(eni.allowance, Duration::ZERO)
                        .map_err(|e| format!("eni {} allowance ({dir}): {e}", eni.id))
                };
                Ok(Arc::new(Port {
                    id,
                    eni: eni.clone(),
                    counters: PortCounters::default(),
                    outbound: allowance("out")?,
                    inbound: allowance("in")?,
                    mtu: AtomicU16::new(eni.mtu),
                    rx: RwLock::new(None),
                }))
            })
            .collect::<Result<_, String>>()?;
        Ok(Card {
            config,
            switch: Mutex::new(switch),
            ports,
            vxlan,
            vxlan_counters: Arc::default(),
            uplink,
            uplink_counters: Arc::default(),
            poll: Duration::ZERO,
            epoch,
        })
    }

    /// What a forwarding thread needs: its own VXLAN and uplink senders.
    pub fn forwarder(&self, queue_size: usize) -> std::io::Result<Forwarder> {
        let vxlan = match &self.vxlan {
            Some(s) => Some(VxlanSender::new(s.clone(), self.vxlan_counters.clone())?),
            None => None,
        };
        let uplink = match &self.uplink {
            Some(t) => Some(UplinkSender::new(t.clone(), self.uplink_counters.clone())?),
            None => None,
        };
        Ok(Forwarder {
            rx: RxScratch::with_capacity(queue_size),
            dirty: Vec::with_capacity(16),
            vxlan,
            uplink,
        })
    }

    /// The VMM sets `port`'s MTU (VHOST_USER_NET_SET_MTU). Outside what a
    /// virtio-net device can have (68..=65535) it is refused; above the
    /// ENI's MTU it is clamped to it, with a warning (the guest then thinks
    /// its link takes more than the VPC carries, and what it sends above the
    /// ENI's MTU is dropped). Returns whether the request is accepted.
    pub fn set_port_mtu(&self, port: PortId, requested: u64) -> bool {
        let Some(p) = self.ports.get(port) else {
            return false;
        };
        let Some(requested) = u16::try_from(requested)
            .ok()
            .filter(|m| *m >= *vpc::config::MTU_RANGE.start())
        else {
            tracing::warn!(eni = %p.eni.id, requested, "the VMM set an MTU no virtio-net device can have: refused");
            return false;
        };
        if requested > p.eni.mtu {
            tracing::warn!(
                eni = %p.eni.id,
                requested,
                mtu = p.eni.mtu,
                "the VMM set an MTU above the ENI's (host_mtu): the ENI's is kept, frames above it are dropped"
            );
        }
        let mtu = requested.min(p.eni.mtu);
        p.mtu.store(mtu, Ordering::Relaxed);
        self.switch().set_port_mtu(port, mtu);
        tracing::info!(eni = %p.eni.id, mtu, "port MTU");
        true
    }

    /// A new VMM connection starts from the ENI's own MTU.
    pub fn reset_port_mtu(&self, port: PortId) {
        if let Some(p) = self.ports.get(port) {
            p.mtu.store(p.eni.mtu, Ordering::Relaxed);
            self.switch().set_port_mtu(port, p.eni.mtu);
        }
    }

    /// Model time for the token buckets.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The wall-clock instant of a model time.
    pub fn instant(&self, at: Duration) -> Instant {
        self.epoch + at
    }

    pub fn switch(&self) -> std::sync::MutexGuard<'_, Switch> {
        self.switch.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Value {
        let switch = self.switch();
        let enis: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut v = p.counters.snapshot();
                v["id"] = json!(p.eni.id);
                v["connected"] = json!(p.rx_side().is_some());
                v["mtu"] = json!(p.mtu());
                if let Some(c) = switch.port_counters(p.id) {
                    v["conntrack_allowance_exceeded"] = json!(c.conntrack_allowance_exceeded);
                    v["switch"] = switch_counters(c);
                    v["conntrack_entries"] = json!(switch.conntrack_len(p.id));
                }
                v
            })
            .collect();
        let c = switch.counters();
        json!({
            "enis": enis,
            "vxlan": self.vxlan_counters.snapshot(),
            "uplink": self.uplink_counters.snapshot(),
            "vxlan_received": c.vxlan_received,
            "vxlan_drops": switch_counters(&c.vxlan_drops),
            "uplink_received": c.uplink_received,
            "uplink_drops": switch_counters(&c.uplink_drops),
            "arp_requests_sent": c.arp_requests_sent,
        })
    }

    /// Acts on the switch's verdict for `frame`, the input the switch saw
    /// (a VXLAN datagram, a frame from the uplink), held whole in the
    /// forwarding thread's own buffer: rewrites and offload completion happen
    /// in it.
    pub fn forward(&self, verdict: Verdict, frame: &mut [u8], out: &mut Forwarder) {
        self.forward_input(verdict, &mut Input::held(frame), out);
    }

    /// Acts on the switch's verdict for `input`: a frame held whole, or a
    /// guest's frame of which the card holds the (checked) headers, its
    /// payload still in the guest's TX chain. The payload is copied into the
    /// card only where the card must work on the whole frame; between guests
    /// it goes straight into the destination's receive buffers.
    pub fn forward_input(&self, verdict: Verdict, input: &mut Input<'_>, out: &mut Forwarder) {
        let frame = match verdict {
            Verdict::ToPort {
                port,
                header,
                frame_offset: 0,
                rewrite,
            } if input.head_len() >= 12 => {
                if let Some(r) = rewrite {
                    r.apply(input.head_mut());
                }
                self.deliver_input(port, &header, input, out);
                return;
            }
            _ if matches!(verdict, Verdict::Reply { .. } | Verdict::Drop(_)) => None,
            _ => match input.whole() {
                Some(f) => Some(f),
                None => return,
            },
        };
        let frame = frame.unwrap_or(&mut []);
        match verdict {
            Verdict::ToPort {
                port,
                header,
                frame_offset,
                rewrite,
            } => {
                let Some(frame) = frame.get_mut(frame_offset..) else {
                    return;
                };
                if let Some(r) = rewrite {
                    r.apply(frame);
                }
                self.deliver(port, &header, frame, out);
            }
            Verdict::ToVtep {
                vtep,
                vxlan_header,
                header,
                frame_offset,
                rewrite,
            } => {
                let Some(frame) = frame.get_mut(frame_offset..) else {
                    return;
                };
                if let Some(r) = rewrite {
                    r.apply(frame);
                }
                self.encapsulate(vtep, &vxlan_header, &header, frame, out);
            }
            Verdict::ToUplink {
                header,
                frame_offset,
                rewrite,
            } => {
                let (Some(frame), Some(uplink)) =
                    (frame.get_mut(frame_offset..), out.uplink.as_mut())
                else {
                    return;
                };
                if let Some(r) = rewrite {
                    r.apply(frame);
                }
                uplink.send(&header, frame);
            }
            Verdict::Reply { to, mut frame } => match to {
                Egress::Port(port) => self.deliver(port, &VnetHeader::plain(), &mut frame, out),
                Egress::Vtep(vtep) => {
                    if let Some(sender) = out.vxlan.as_mut() {
                        sender.send(vtep, &[], &frame);
                    }
                }
                Egress::Uplink => {
                    if let Some(uplink) = out.uplink.as_mut() {
                        uplink.send(&VnetHeader::plain(), &frame);
                    }
                }
            },
            Verdict::Drop(_) => {}
        }
    }

    fn encapsulate(
        &self,
        vtep: SocketAddr,
        vxlan_header: &[u8; 8],
        header: &VnetHeader,
        frame: &mut [u8],
        out: &mut Forwarder,
    ) {
        let Some(sender) = out.vxlan.as_mut() else {
            return;
        };
        if header.is_gso() {
            let mtu = self.config.vpc.mtu;
            let _ = vpc::offload::segment(header, frame, mtu, &mut |segment: &[u8]| {
                sender.send(vtep, vxlan_header, segment);
            });
            return;
        }
        if header.needs_csum() && vpc::offload::complete_checksum(header, frame).is_err() {
            return;
        }
        sender.send(vtep, vxlan_header, frame);
    }

    /// Delivers a frame the card holds to `port`'s guest (see
    /// [`Card::deliver_input`]).
    pub fn deliver(
        &self,
        port: PortId,
        header: &VnetHeader,
        frame: &mut [u8],
        out: &mut Forwarder,
    ) {
        self.deliver_input(port, header, &mut Input::held(frame), out);
    }

    /// Delivers a frame to `port`'s guest: inbound allowance, offloads the
    /// guest cannot take done in software (on the whole frame, copied into
    /// the card if it was not), then its RX queue.
    pub fn deliver_input(
        &self,
        port: PortId,
        header: &VnetHeader,
        input: &mut Input<'_>,
        out: &mut Forwarder,
    ) {
        let Some(dst) = self.ports.get(port) else {
            return;
        };
        let Some(rx) = dst.rx_side() else {
            add(&dst.counters.rx_dropped_port_down, 1);
            return;
        };
        let negotiated = rx.negotiated();
        // A frame longer than the port's MTU is what a NIC drops as a length
        // error (GSO frames are cut to the MTU below or by the guest).
        let frame_len = input.len();
        if !header.is_gso() && frame_len > usize::from(dst.mtu()) + vpc::packet::ETH_HLEN {
            add(&dst.counters.rx_oversized, 1);
            return;
        }
        let packets = crate::allowance::wire_packets(header, frame_len);
        if let Err(e) = dst.inbound.take(frame_len as u64, packets, self.now()) {
            add(
                match e {
                    Exceeded::Bandwidth(_) => &dst.counters.bw_in_allowance_exceeded,
                    Exceeded::Packets(_) => &dst.counters.pps_allowance_exceeded,
                },
                1,
            );
            return;
        }
        let takes_gso = match header.gso_kind() {
            vpc::vnet::GSO_NONE => true,
            vpc::vnet::GSO_TCPV4 => negotiated.guest_tso4,
            vpc::vnet::GSO_TCPV6 => negotiated.guest_tso6,
            _ => false,
        } && (header.gso_type & vpc::vnet::GSO_ECN == 0 || negotiated.guest_ecn);
        if !takes_gso {
            add(&dst.counters.rx_segmented, 1);
            let Some(frame) = input.whole() else {
                add(&dst.counters.rx_offload_errors, 1);
                return;
            };
            let mtu = dst.mtu();
            let segmented = vpc::offload::segment(header, frame, mtu, &mut |segment: &[u8]| {
                let plain = VnetHeader::plain();
                deliver_one(dst, &rx, negotiated, &plain, Frame::held(segment), out);
            });
            if segmented.is_err() {
                add(&dst.counters.rx_offload_errors, 1);
            }
            return;
        }
        let mut header = *header;
        if header.needs_csum() && !negotiated.guest_csum {
            add(&dst.counters.rx_checksummed, 1);
            let Some(frame) = input.whole() else {
                add(&dst.counters.rx_offload_errors, 1);
                return;
            };
            if vpc::offload::complete_checksum(&header, frame).is_err() {
                add(&dst.counters.rx_offload_errors, 1);
                return;
            }
            header.flags &= !vpc::vnet::F_NEEDS_CSUM;
        }
        deliver_one(dst, &rx, negotiated, &header, input.frame(), out);
    }
}

/// The switch's per-port counters as JSON: drops by reason (only those
/// that happened) and the card's own replies.
fn switch_counters(c: &vpc::switch::PortCounters) -> Value {
    let drops: serde_json::Map<String, Value> = c
        .drop_counts()
        .map(|(r, n)| (r.name().to_owned(), json!(n)))
        .collect();
    json!({
        "forwarded": c.forwarded,
        "delivered": c.delivered,
        "drops": drops,
        "drops_total": c.total_drops(),
        "arp_replies": c.arp_replies,
        "dhcp_offers": c.dhcp_offers,
        "dhcp_acks": c.dhcp_acks,
        "dhcp_naks": c.dhcp_naks,
        "icmp_echo_replies": c.icmp_echo_replies,
    })
}

/// Picks the queue pair: a flow stays on one pair (the switch's hash of its
/// addresses and ports would do too; this hashes the IPv4 5-tuple bytes).
fn pick_pair(frame: &[u8], pairs: usize) -> usize {
    if pairs <= 1 {
        return 0;
    }
    // Ethernet (14) + IPv4 addresses at 26..34 + ports at 34..38 (no options
    // assumed: only the choice of queue depends on it).
    let key = frame.get(26..38).unwrap_or(&[]);
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    h as usize % pairs
}

fn deliver_one(
    dst: &Port,
    rx: &RxSide,
    negotiated: Negotiated,
    header: &VnetHeader,
    frame: Frame<'_>,
    out: &mut Forwarder,
) {
    let pairs = rx.pairs.len();
    let first = pick_pair(frame.head, pairs);
    // The chosen pair, or the next one the guest has enabled.
    for i in 0..pairs {
        let pair = (first + i) % pairs;
        let Some(vring) = rx.vring(pair) else {
            continue;
        };
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            continue;
        }
        let memory = rx.memory.memory();
        let mut backlog = rx.backlogs[pair].lock().unwrap_or_else(|p| p.into_inner());
        let counters = &dst.counters;
        // Frames already waiting go first.
        let mut delivered = drain(
            &mut state,
            &memory,
            &mut backlog,
            negotiated,
            &mut out.rx,
            counters,
        );
        let mut wait = !backlog.frames.is_empty();
        if !wait {
            match chain::deliver_rx(
                state.get_queue_mut(),
                &memory,
                &header.to_bytes(),
                negotiated.header_len,
                frame,
                negotiated.mrg_rxbuf,
                &mut out.rx,
            ) {
                Ok(_) => {
                    add(&counters.rx_packets, 1);
                    add(&counters.rx_bytes, frame.len() as u64);
                    delivered = true;
                }
                Err(ChainError::NoRxBuffers) => wait = true,
                Err(e) => {
                    counters.chain_error(e);
                    delivered = true;
                    warn_limited!(DELIVERY_WARNINGS, eni = %dst.eni.id, error = %e, "receive chain refused");
                }
            }
        }
        if wait {
            if backlog.push(header, frame, &mut out.rx.copies) {
                add(&counters.rx_backlogged, 1);
            } else {
                counters.chain_error(ChainError::NoRxBuffers);
            }
            // Ask for a kick when the guest adds buffers; if it already has,
            // take them now.
            delivered |= rearm_and_drain(
                &mut state,
                &memory,
                &mut backlog,
                negotiated,
                &mut out.rx,
                counters,
            );
        }
        drop(backlog);
        drop(state);
        if delivered {
            out.mark(dst.id, pair, &vring, &rx.memory);
        }
        return;
    }
    add(&dst.counters.rx_dropped_port_down, 1);
}

/// Whether the driver wants to hear (an eventfd write, an interrupt in the
/// guest) that the card added used entries to this queue. With EVENT_IDX
/// its `used_event` says (virtio-queue's `needs_notification`); without, its
/// VIRTQ_AVAIL_F_NO_INTERRUPT flag does, which virtio-queue 0.18 ignores
/// ("isn't supported yet") — and a polling driver such as DPDK's virtio PMD
/// sets it and does not negotiate EVENT_IDX: it would get a system call per
/// batch per queue for nothing.
pub fn wants_signal(
    state: &mut vhost_user_backend::VringState<GuestMemory>,
    memory: &GuestMemoryMmap,
) -> bool {
    let queue = state.get_queue();
    if queue.event_idx_enabled() {
        return state.needs_notification().unwrap_or(true);
    }
    let flags = GuestAddress(queue.avail_ring());
    // The used entries are written before the flag is read (virtio 1.x
    // §2.7.7.2: the device reads the flag after updating the used index).
    std::sync::atomic::fence(Ordering::SeqCst);
    memory
        .load::<u16>(flags, Ordering::Acquire)
        .map_or(true, |f| f & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

/// Delivers backlogged frames while the guest has buffers. Returns whether
/// any used entry was added.
fn drain(
    state: &mut vhost_user_backend::VringState<GuestMemory>,
    memory: &GuestMemoryMmap,
    backlog: &mut Backlog,
    negotiated: Negotiated,
    scratch: &mut RxScratch,
    counters: &PortCounters,
) -> bool {
    let mut delivered = false;
    while let Some((header, frame)) = backlog.frames.front() {
        match chain::deliver_rx(
            state.get_queue_mut(),
            memory,
            &header.to_bytes(),
            negotiated.header_len,
            Frame::held(frame),
            negotiated.mrg_rxbuf,
            scratch,
        ) {
            Ok(_) => {
                add(&counters.rx_packets, 1);
                add(&counters.rx_bytes, frame.len() as u64);
            }
            Err(ChainError::NoRxBuffers) => break,
            Err(e) => counters.chain_error(e),
        }
        delivered = true;
        backlog.pop();
    }
    delivered
}

/// Has the guest kick when it next adds a receive buffer. Returns true if it
/// added some since this looked (it may then not kick: look again).
///
/// With EVENT_IDX the driver kicks only when its avail index crosses
/// `avail_event`. The frame at the head of the backlog may need more buffers
/// than the guest has made available: the card then stops *behind* the
/// guest's avail index (nothing taken), so `avail_event` must be the avail
/// index itself, not the card's next_avail — else the guest has already
/// passed it and never kicks again.
fn rearm(
    state: &mut vhost_user_backend::VringState<GuestMemory>,
    memory: &GuestMemoryMmap,
) -> bool {
    let queue = state.get_queue_mut();
    let Ok(avail) = queue.avail_idx(memory, Ordering::Acquire) else {
        return false;
    };
    let next = queue.next_avail();
    queue.set_next_avail(avail.0);
    // Writes avail_event = avail (or clears NO_NOTIFY without EVENT_IDX),
    // then a full fence.
    let _ = queue.enable_notification(memory);
    queue.set_next_avail(next);
    queue
        .avail_idx(memory, Ordering::Acquire)
        .is_ok_and(|now| now != avail)
}

/// Re-arms and retries while the guest keeps adding buffers as the card
/// looks; a few rounds, then the kick it will send takes over.
fn rearm_and_drain(
    state: &mut vhost_user_backend::VringState<GuestMemory>,
    memory: &GuestMemoryMmap,
    backlog: &mut Backlog,
    negotiated: Negotiated,
    scratch: &mut RxScratch,
    counters: &PortCounters,
) -> bool {
    let mut delivered = false;
    for _ in 0..4 {
        if backlog.frames.is_empty() || !rearm(state, memory) {
            break;
        }
        delivered |= drain(state, memory, backlog, negotiated, scratch, counters);
    }
    delivered
}

/// The frame a verdict is about, as the forwarding thread holds it: `buf`
/// has the frame's whole length; the card holds its first `held` bytes (all
/// of them for a frame it made or received whole). For a guest's frame the
/// rest is still in the guest's TX chain, read from there when needed (the
/// chain goes back to the guest only once the frame is delivered).
pub struct Input<'a> {
    buf: &'a mut [u8],
    held: usize,
    chain: Option<InputChain<'a>>,
}

/// A guest's TX chain behind an [`Input`]: `buf` starts `start` bytes into it
/// (after the vnet header).
struct InputChain<'a> {
    memory: &'a GuestMemoryMmap,
    chain: &'a mut TxChain,
    start: usize,
    copies: &'a mut CopyCounts,
}

impl<'a> Input<'a> {
    /// A frame the card holds whole.
    pub fn held(frame: &'a mut [u8]) -> Self {
        let held = frame.len();
        Input {
            buf: frame,
            held,
            chain: None,
        }
    }

    /// A guest's frame taken with [`chain::take_tx`]: `buf` is the whole
    /// chain's length (vnet header included), holding what was copied of it.
    pub fn from_chain(
        buf: &'a mut [u8],
        header_len: usize,
        memory: &'a GuestMemoryMmap,
        chain: &'a mut TxChain,
        copies: &'a mut CopyCounts,
    ) -> Self {
        let held = chain.copied().saturating_sub(header_len);
        let buf = match buf.get_mut(header_len..chain.len()) {
            Some(b) => b,
            None => &mut [],
        };
        Input {
            buf,
            held,
            chain: Some(InputChain {
                memory,
                chain,
                start: header_len,
                copies,
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes at the start of the frame the card holds.
    pub fn head_len(&self) -> usize {
        self.held
    }

    /// The bytes the card holds: the checked headers of a guest's frame.
    pub fn head_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.held]
    }

    /// The whole frame in the card's buffer, copying what is still in the
    /// guest's TX chain; None if that memory cannot be read.
    pub fn whole(&mut self) -> Option<&mut [u8]> {
        if self.held < self.buf.len() {
            let c = self.chain.as_mut()?;
            // copy_rest indexes from the chain's start (the vnet header),
            // which sits just before `buf` in the worker's buffer: give it a
            // window with the same offsets.
            let from = c.chain.copied();
            let out = self.buf.get_mut(from.checked_sub(c.start)?..)?;
            c.chain.copy_rest_into(c.memory, out, c.copies).ok()?;
            self.held = self.buf.len();
        }
        Some(&mut *self.buf)
    }

    /// The frame as it goes into receive buffers.
    pub fn frame(&self) -> Frame<'_> {
        let head = &self.buf[..self.held];
        match &self.chain {
            Some(c) if self.held < self.buf.len() => Frame {
                head,
                tail: Some(GuestTail {
                    memory: c.memory,
                    chain: c.chain,
                    offset: c.start + self.held,
                }),
            },
            _ => Frame::held(head),
        }
    }
}

/// What a forwarding thread keeps between frames: receive scratch, the RX
/// vrings it added used entries to (signalled once per batch), and its VXLAN
/// and uplink senders (entered once per batch).
pub struct Forwarder {
    rx: RxScratch,
    /// (port, pair, vring) of each RX queue touched in this batch.
    dirty: Vec<(PortId, usize, Vring, GuestMemory)>,
    pub vxlan: Option<VxlanSender>,
    pub uplink: Option<UplinkSender>,
}

impl Forwarder {
    pub fn rx_scratch(&mut self) -> &mut RxScratch {
        &mut self.rx
    }

    /// Bytes this thread wrote into receive buffers, by where they came from.
    pub fn copies(&self) -> CopyCounts {
        self.rx.copies
    }

    fn mark(&mut self, port: PortId, pair: usize, vring: &Vring, memory: &GuestMemory) {
        if !self.dirty.iter().any(|d| d.0 == port && d.1 == pair) {
            self.dirty.push((port, pair, vring.clone(), memory.clone()));
        }
    }

    /// Ends a batch: signals each guest whose RX queue got frames (if
    /// EVENT_IDX says it wants to know), sends the VXLAN datagrams queued.
    pub fn flush(&mut self) {
        for (_, _, vring, memory) in self.dirty.drain(..) {
            let mut state = vring.get_mut();
            if !state.get_queue().ready() {
                continue;
            }
            let needs = wants_signal(&mut state, &memory.memory());
            if needs {
                let _ = state.signal_used_queue();
            }
        }
        if let Some(v) = self.vxlan.as_mut() {
            v.flush();
        }
        if let Some(u) = self.uplink.as_mut() {
            u.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A polling driver without EVENT_IDX (DPDK's virtio PMD) sets
    /// VIRTQ_AVAIL_F_NO_INTERRUPT: it gets no signal. Without the flag, or
    /// with EVENT_IDX (its used_event decides), the rules are as before.
    #[test]
    fn a_driver_that_asks_for_no_interrupts_is_not_signalled() {
        use vm_memory::GuestMemoryAtomic;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let memory = GuestMemoryAtomic::new(mem);
        let vring = Vring::new(memory.clone(), 64).unwrap();
        let guard = memory.memory();
        let mock = virtio_queue::mock::MockSplitQueue::create(&*guard, GuestAddress(0), 64);
        let avail = mock.avail_addr();
        vring.set_queue_size(64);
        vring
            .set_queue_info(mock.desc_table_addr().0, avail.0, mock.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        let mut state = vring.get_mut();
        assert!(wants_signal(&mut state, &guard));
        guard
            .write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, avail)
            .unwrap();
        assert!(!wants_signal(&mut state, &guard), "NO_INTERRUPT honoured");
        guard.write_obj(0u16, avail).unwrap();
        assert!(wants_signal(&mut state, &guard));
        // With EVENT_IDX the flag means nothing: used_event (0, and no used
        // entry added since) says no.
        state.get_queue_mut().set_event_idx(true);
        guard
            .write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, avail)
            .unwrap();
        let _ = state.get_queue_mut().add_used(&*guard, 0, 0);
        assert!(wants_signal(&mut state, &guard), "used_event 0 crossed");
        assert!(!wants_signal(&mut state, &guard), "nothing new");
    }

    #[test]
    fn the_backlog_is_bounded_in_frames_and_bytes_and_reuses_buffers() {
        let mut b = Backlog::new();
        let h = VnetHeader::plain();
        for _ in 0..BACKLOG_FRAMES {
            assert!(b.push(&h, Frame::held(&[1; 100]), &mut CopyCounts::default()));
        }
        assert!(
            !b.push(&h, Frame::held(&[1; 100]), &mut CopyCounts::default()),
            "frame limit"
        );
        b.clear();
        assert_eq!((b.frames.len(), b.bytes), (0, 0));
        let reused = b.free.len();
        assert!(b.push(&h, Frame::held(&[2; 100]), &mut CopyCounts::default()));
        assert_eq!(b.free.len(), reused - 1, "a freed buffer was reused");
        b.clear();
        let big = vec![3u8; 65_000];
        let fit = BACKLOG_BYTES / big.len();
        for _ in 0..fit {
            assert!(b.push(&h, Frame::held(&big), &mut CopyCounts::default()));
        }
        assert!(
            !b.push(&h, Frame::held(&big), &mut CopyCounts::default()),
            "byte limit"
        );
        b.pop();
        assert!(b.push(&h, Frame::held(&big), &mut CopyCounts::default()));
    }
}
