//! The driver side of a split virtqueue (VIRTIO 1.2 §2.7), written straight
//! into guest memory as a guest's virtio driver would.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::memory::GuestMemory;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;

/// Byte layout of one split ring inside guest memory.
#[derive(Clone, Copy, Debug)]
pub struct RingLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingLayout {
    /// Lays a ring of `size` entries out at `base` (4 KiB aligned); returns
    /// it and the first byte past it.
    pub fn at(base: u64, size: u16) -> (Self, u64) {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = align_up(avail + 6 + 2 * n, 4096);
        let end = align_up(used + 6 + 8 * n, 4096);
        (
            Self {
                size,
                desc,
                avail,
                used,
            },
            end,
        )
    }
}

pub fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

pub struct SplitRing {
    mem: Arc<GuestMemory>,
    layout: RingLayout,
    event_idx: bool,
    /// Our private copy of avail.idx (entries added, maybe not published).
    next_avail: u16,
    /// avail.idx as of the last publish, for the EVENT_IDX kick decision.
    published: u16,
    last_used: u16,
}

impl SplitRing {
    pub fn new(mem: Arc<GuestMemory>, layout: RingLayout, event_idx: bool) -> Self {
        let ring = Self {
            mem,
            layout,
            event_idx,
            next_avail: 0,
            published: 0,
            last_used: 0,
        };
        // Fresh rings: zero flags, indices and events.
        let l = &ring.layout;
        ring.mem.fill(l.avail, 6 + 2 * usize::from(l.size), 0);
        ring.mem.fill(l.used, 6 + 8 * usize::from(l.size), 0);
        ring
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(self.layout.desc + 16 * u64::from(index), &d);
    }

    /// Adds a chain head to the avail ring without publishing it.
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.layout.size);
        self.mem
            .u16_at(self.layout.avail + 4 + 2 * slot)
            .store(head.to_le(), Ordering::Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes pushed heads; returns whether the device wants a kick.
    pub fn publish(&mut self) -> bool {
        let new = self.next_avail;
        let old = self.published;
        if new == old {
            return false;
        }
        // Ring entries before the index (virtio_wmb).
        self.mem
            .u16_at(self.layout.avail + 2)
            .store(new.to_le(), Ordering::Release);
        self.published = new;
        // The index store before reading the device's event (virtio_mb).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let n = u64::from(self.layout.size);
            let event = u16::from_le(
                self.mem
                    .u16_at(self.layout.used + 4 + 8 * n)
                    .load(Ordering::Relaxed),
            );
            need_event(event, new, old)
        } else {
            let flags = u16::from_le(self.mem.u16_at(self.layout.used).load(Ordering::Relaxed));
            flags & USED_F_NO_NOTIFY == 0
        }
    }

    /// Takes the next used element: (head id, bytes written).
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let idx = u16::from_le(
            self.mem
                .u16_at(self.layout.used + 2)
                .load(Ordering::Acquire),
        );
        if idx == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.layout.size);
        let elem = self.layout.used + 4 + 8 * slot;
        let id = u32::from_le(self.mem.u32_at(elem).load(Ordering::Relaxed));
        let len = u32::from_le(self.mem.u32_at(elem + 4).load(Ordering::Relaxed));
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Asks for a call at the next used entry; true if entries arrived in
    /// the meantime (then don't sleep).
    pub fn enable_notification(&mut self) -> bool {
        if self.event_idx {
            let n = u64::from(self.layout.size);
            self.mem
                .u16_at(self.layout.avail + 4 + 2 * n)
                .store(self.last_used.to_le(), Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        let idx = u16::from_le(
            self.mem
                .u16_at(self.layout.used + 2)
                .load(Ordering::Acquire),
        );
        idx != self.last_used
    }

    /// The avail index the device starts from (SET_VRING_BASE).
    pub fn base(&self) -> u16 {
        self.next_avail
    }
}

/// vring_need_event: has the index moved past `event` since `old`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_linux() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(9, 8, 3));
        assert!(need_event(65535, 2, 65534));
    }
}
