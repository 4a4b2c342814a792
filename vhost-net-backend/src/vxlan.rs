//! VXLAN on io_uring: the card's UDP socket (`[vxlan] listen`).
//!
//! Sending: each forwarding thread has a [`VxlanSender`] — its own small
//! io_uring and a fixed pool of datagram buffers. Datagrams are queued as
//! `sendmsg` entries while a batch of guest frames is switched and entered
//! with one `io_uring_enter` at the end of the batch (or when the pool is
//! full).
//!
//! Receiving: one thread keeps a `recvmsg` posted on every buffer of its
//! pool, switches each datagram that completes (`Switch::from_vxlan`),
//! delivers it, and posts the buffer again; all the completions of one wake-up
//! form a batch (one guest signal per RX queue).

use std::io;
use std::mem;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::card::{Card, Forwarder};

/// Largest datagram sent: a 9001-byte MTU frame, its Ethernet header and the
/// VXLAN header, rounded up.
pub const MAX_SEND: usize = 9216 + 64;
/// Datagrams queued per batch before the sender enters the ring.
const SEND_SLOTS: usize = 32;
/// Largest datagram received (a UDP datagram can be no larger).
const MAX_RECV: usize = 65536;
const RECV_SLOTS: usize = 32;

/// Card-wide VXLAN counters.
#[derive(Debug, Default)]
pub struct VxlanCounters {
    pub tx_datagrams: AtomicU64,
    pub tx_errors: AtomicU64,
    pub tx_too_large: AtomicU64,
    pub rx_datagrams: AtomicU64,
    pub rx_errors: AtomicU64,
}

impl VxlanCounters {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "tx_datagrams": g(&self.tx_datagrams),
            "tx_errors": g(&self.tx_errors),
            "tx_too_large": g(&self.tx_too_large),
            "rx_datagrams": g(&self.rx_datagrams),
            "rx_errors": g(&self.rx_errors),
        })
    }
}

/// A buffer with the msghdr that describes it; boxed so the kernel's
/// pointers into it stay valid while the entry is in flight.
struct MsgSlot {
    buf: Vec<u8>,
    addr: libc::sockaddr_storage,
    iov: libc::iovec,
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in iov/msg point into the slot itself.
unsafe impl Send for MsgSlot {}

impl MsgSlot {
    fn new(capacity: usize) -> Box<Self> {
        // SAFETY: all-zero is a valid sockaddr_storage, iovec and msghdr.
        let mut slot = Box::new(MsgSlot {
            buf: vec![0u8; capacity],
            addr: unsafe { mem::zeroed() },
            iov: unsafe { mem::zeroed() },
            msg: unsafe { mem::zeroed() },
        });
        slot.iov.iov_base = slot.buf.as_mut_ptr().cast();
        slot.iov.iov_len = capacity;
        slot.msg.msg_name = (&mut slot.addr as *mut libc::sockaddr_storage).cast();
        slot.msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
        slot.msg.msg_iov = &mut slot.iov;
        slot.msg.msg_iovlen = 1;
        slot
    }

    fn set_peer(&mut self, peer: SocketAddr) {
        // SAFETY: sockaddr_storage is large and aligned enough for both.
        match peer {
            SocketAddr::V4(a) => unsafe {
                let sin = &mut *(&mut self.addr as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>();
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                self.msg.msg_namelen = mem::size_of::<libc::sockaddr_in>() as u32;
            },
            SocketAddr::V6(a) => unsafe {
                let sin6 = &mut *(&mut self.addr as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_flowinfo = 0;
                sin6.sin6_scope_id = a.scope_id();
                self.msg.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as u32;
            },
        }
    }

    fn peer(&self) -> Option<SocketAddr> {
        match i32::from(self.addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in (family says so).
                let sin = unsafe {
                    &*(&self.addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    u32::from_be(sin.sin_addr.s_addr).into(),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe {
                    &*(&self.addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// A forwarding thread's VXLAN output.
pub struct VxlanSender {
    socket: Arc<UdpSocket>,
    counters: Arc<VxlanCounters>,
    ring: IoUring,
    // Boxed: each msghdr points into its own slot, which must never move.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<MsgSlot>>,
    queued: usize,
}

impl VxlanSender {
    pub fn new(socket: Arc<UdpSocket>, counters: Arc<VxlanCounters>) -> io::Result<Self> {
        Ok(VxlanSender {
            socket,
            counters,
            ring: ring_for(SEND_SLOTS as u32, opcode::SendMsg::CODE)?,
            slots: (0..SEND_SLOTS).map(|_| MsgSlot::new(MAX_SEND)).collect(),
            queued: 0,
        })
    }

    /// Queues `vxlan_header ++ frame` for `vtep` (the header may be empty
    /// when the frame already starts with it).
    pub fn send(&mut self, vtep: SocketAddr, vxlan_header: &[u8], frame: &[u8]) {
        let len = vxlan_header.len() + frame.len();
        if len > MAX_SEND {
            self.counters.tx_too_large.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.queued == self.slots.len() {
            self.flush();
        }
        let index = self.queued;
        let slot = &mut self.slots[index];
        let h = vxlan_header.len();
        slot.buf[..h].copy_from_slice(vxlan_header);
        slot.buf[h..len].copy_from_slice(frame);
        slot.iov.iov_len = len;
        slot.set_peer(vtep);
        let entry = opcode::SendMsg::new(types::Fd(self.socket.as_raw_fd()), &slot.msg)
            .build()
            .user_data(index as u64);
        // SAFETY: the slot (buffer, address, msghdr) stays alive and untouched
        // until flush() has reaped this entry.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.queued += 1;
    }

    /// Sends everything queued and waits for it (UDP sends complete at once).
    pub fn flush(&mut self) {
        if self.queued == 0 {
            return;
        }
        let mut pending = self.queued;
        if let Err(e) = self.ring.submit_and_wait(pending) {
            tracing::warn!(error = %e, "VXLAN io_uring submit failed");
        }
        while pending > 0 {
            let mut reaped = 0;
            for cqe in self.ring.completion() {
                reaped += 1;
                if cqe.result() < 0 {
                    self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.tx_datagrams.fetch_add(1, Ordering::Relaxed);
                }
            }
            pending = pending.saturating_sub(reaped);
            if pending > 0 && self.ring.submit_and_wait(pending).is_err() {
                break;
            }
        }
        self.queued = 0;
    }
}

/// A ring that can only send or only receive datagrams (seccomp does not
/// see what a ring does; its restrictions are what bound it).
fn ring_for(entries: u32, operation: u8) -> io::Result<IoUring> {
    card_firmware::ring::restricted_ring(
        &mut IoUring::builder(),
        entries,
        &[operation],
        io_uring::squeue::Flags::empty(),
        |_| Ok(()),
    )
}

/// Receives on the VXLAN socket for ever (a thread of its own).
pub fn receive_forever(card: Arc<Card>, socket: Arc<UdpSocket>, out: Forwarder) -> io::Result<()> {
    let counters = card.vxlan_counters.clone();
    let mut out = out;
    let mut ring = ring_for(RECV_SLOTS as u32 * 2, opcode::RecvMsg::CODE)?;
    let mut slots: Vec<Box<MsgSlot>> = (0..RECV_SLOTS).map(|_| MsgSlot::new(MAX_RECV)).collect();
    let fd = types::Fd(socket.as_raw_fd());
    let post = |ring: &mut IoUring, slot: &mut MsgSlot, index: usize| {
        slot.msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
        slot.iov.iov_len = slot.buf.len();
        let entry = opcode::RecvMsg::new(fd, &mut slot.msg)
            .build()
            .user_data(index as u64);
        // SAFETY: the slot lives as long as this function and is not touched
        // until its completion is reaped.
        unsafe { ring.submission().push(&entry) }.is_ok()
    };
    for (i, slot) in slots.iter_mut().enumerate() {
        post(&mut ring, slot, i);
    }
    let mut done = Vec::with_capacity(RECV_SLOTS);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(index, result) in &done {
            let Some(slot) = slots.get_mut(index) else {
                continue;
            };
            if result < 0 {
                counters.rx_errors.fetch_add(1, Ordering::Relaxed);
            } else if let Some(peer) = slot.peer() {
                counters.rx_datagrams.fetch_add(1, Ordering::Relaxed);
                let len = (result as usize).min(slot.buf.len());
                let datagram = &mut slot.buf[..len];
                let verdict = card
                    .switch()
                    .from_vxlan(datagram, peer, std::time::Instant::now());
                card.forward(verdict, datagram, &mut out);
            }
            post(&mut ring, slot, index);
        }
        out.flush();
    }
}
