//! The optional TAP uplink (`[uplink] tap`), on io_uring.
//!
//! The tap is opened IFF_TAP | IFF_NO_PI | IFF_VNET_HDR with a 12-byte vnet
//! header and TSO/checksum offloads on, so GSO frames cross it whole in both
//! directions (the switch checks the header of what comes up, as it does a
//! guest's). Reading: one thread keeps a `read` posted on each buffer of its
//! pool and switches what completes (`Switch::from_uplink`). Writing: each
//! forwarding thread queues `write`s on its own ring from a fixed buffer
//! pool and enters them once per batch, like [`crate::vxlan::VxlanSender`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vpc::vnet::VnetHeader;

use crate::card::{Card, Forwarder};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// vnet header + a 64 KiB GSO frame.
const MAX_FRAME: usize = VnetHeader::LEN + 65536 + 64;
const WRITE_SLOTS: usize = 16;
const READ_SLOTS: usize = 16;

#[derive(Debug, Default)]
pub struct UplinkCounters {
    pub tx_frames: AtomicU64,
    pub tx_errors: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_errors: AtomicU64,
}

impl UplinkCounters {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "tx_frames": g(&self.tx_frames),
            "tx_errors": g(&self.tx_errors),
            "rx_frames": g(&self.rx_frames),
            "rx_errors": g(&self.rx_errors),
        })
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating it if it does not exist) the tap `name`.
pub fn open_tap(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = file.as_raw_fd();
    // SAFETY: the tun ioctls read/write the structs passed, which live here.
    unsafe {
        if libc::ioctl(fd, TUNSETIFF, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        let size: libc::c_int = VnetHeader::LEN as libc::c_int;
        if libc::ioctl(fd, TUNSETVNETHDRSZ, &size) < 0 {
            return Err(io::Error::last_os_error());
        }
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        if libc::ioctl(fd, TUNSETOFFLOAD, offloads as libc::c_ulong) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// A forwarding thread's writes to the tap.
pub struct UplinkSender {
    tap: Arc<File>,
    counters: Arc<UplinkCounters>,
    ring: IoUring,
    slots: Vec<Vec<u8>>,
    lens: Vec<usize>,
    queued: usize,
}

impl UplinkSender {
    pub fn new(tap: Arc<File>, counters: Arc<UplinkCounters>) -> io::Result<Self> {
        Ok(UplinkSender {
            tap,
            counters,
            ring: ring_for(WRITE_SLOTS as u32, opcode::Write::CODE)?,
            slots: (0..WRITE_SLOTS).map(|_| vec![0u8; MAX_FRAME]).collect(),
            lens: vec![0; WRITE_SLOTS],
            queued: 0,
        })
    }

    /// Queues `header ++ frame`.
    pub fn send(&mut self, header: &VnetHeader, frame: &[u8]) {
        let len = VnetHeader::LEN + frame.len();
        if len > MAX_FRAME {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.queued == self.slots.len() {
            self.flush();
        }
        let i = self.queued;
        let buf = &mut self.slots[i];
        buf[..VnetHeader::LEN].copy_from_slice(&header.to_bytes());
        buf[VnetHeader::LEN..len].copy_from_slice(frame);
        self.lens[i] = len;
        let entry = opcode::Write::new(types::Fd(self.tap.as_raw_fd()), buf.as_ptr(), len as u32)
            .build()
            .user_data(i as u64);
        // SAFETY: the buffer is not touched until flush() reaps the entry.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.queued += 1;
    }

    pub fn flush(&mut self) {
        let mut pending = self.queued;
        while pending > 0 {
            if self.ring.submit_and_wait(pending).is_err() {
                break;
            }
            for cqe in self.ring.completion() {
                pending = pending.saturating_sub(1);
                if cqe.result() < 0 {
                    self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.queued = 0;
    }
}

/// A ring that can only write or only read the tap (seccomp does not see
/// what a ring does; its restrictions are what bound it).
fn ring_for(entries: u32, operation: u8) -> io::Result<IoUring> {
    card_firmware::ring::restricted_ring(
        &mut IoUring::builder(),
        entries,
        &[operation],
        io_uring::squeue::Flags::empty(),
        |_| Ok(()),
    )
}

/// Reads frames from the tap for ever (a thread of its own).
pub fn receive_forever(card: Arc<Card>, tap: Arc<File>, out: Forwarder) -> io::Result<()> {
    let counters = card.uplink_counters.clone();
    let mut out = out;
    let mut ring = ring_for(READ_SLOTS as u32 * 2, opcode::Read::CODE)?;
    let mut slots: Vec<Vec<u8>> = (0..READ_SLOTS).map(|_| vec![0u8; MAX_FRAME]).collect();
    let fd = types::Fd(tap.as_raw_fd());
    let post = |ring: &mut IoUring, buf: &mut Vec<u8>, index: usize| {
        let entry = opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32)
            .build()
            .user_data(index as u64);
        // SAFETY: the buffer lives as long as this function and is not
        // touched until its completion is reaped.
        unsafe { ring.submission().push(&entry) }.is_ok()
    };
    for (i, buf) in slots.iter_mut().enumerate() {
        post(&mut ring, buf, i);
    }
    let mut done = Vec::with_capacity(READ_SLOTS);
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
            let Some(buf) = slots.get_mut(index) else {
                continue;
            };
            let len = usize::try_from(result).unwrap_or(0).min(buf.len());
            if result < 0 || len < VnetHeader::LEN {
                counters.rx_errors.fetch_add(1, Ordering::Relaxed);
            } else if let Ok(header) = VnetHeader::parse(&buf[..VnetHeader::LEN]) {
                counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                let frame = &mut buf[VnetHeader::LEN..len];
                let verdict = card
                    .switch()
                    .from_uplink(&header, frame, std::time::Instant::now());
                card.forward(verdict, frame, &mut out);
            }
            post(&mut ring, buf, index);
        }
        out.flush();
    }
}
