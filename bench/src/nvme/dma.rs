//! The driver's "guest memory": one memfd mapped here and DMA-mapped to the
//! card at IOVA_BASE, carved into page-aligned buffers. Addresses below
//! IOVA_BASE are never mapped, so tests can aim a PRP at unmapped memory.

use std::sync::{Arc, Mutex};

use crate::memory::GuestMemory;

use super::spec::PAGE;

/// Where the memfd appears to the card (4 GiB: a null or small pointer is
/// always outside the mapping).
pub const IOVA_BASE: u64 = 1 << 32;

pub struct DmaMemory {
    mem: GuestMemory,
    /// Free page runs (first page, count), sorted by page.
    free: Mutex<Vec<(u64, u64)>>,
}

impl DmaMemory {
    pub fn new(len: usize) -> std::io::Result<Arc<Self>> {
        let len = len.div_ceil(PAGE as usize) * PAGE as usize;
        let mem = GuestMemory::new(len)?;
        let pages = len as u64 / PAGE;
        Ok(Arc::new(Self {
            mem,
            free: Mutex::new(vec![(0, pages)]),
        }))
    }

    pub fn guest(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn len(&self) -> u64 {
        self.mem.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// A zeroed, page-aligned buffer of at least `len` bytes, or None when
    /// the memory is exhausted.
    pub fn alloc(self: &Arc<Self>, len: u64) -> Option<DmaBuf> {
        let pages = len.max(1).div_ceil(PAGE);
        let first = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let i = free.iter().position(|&(_, n)| n >= pages)?;
            let (first, n) = free[i];
            if n == pages {
                free.remove(i);
            } else {
                free[i] = (first + pages, n - pages);
            }
            first
        };
        let buf = DmaBuf {
            mem: Arc::clone(self),
            offset: first * PAGE,
            len: pages * PAGE,
        };
        buf.fill(0);
        Some(buf)
    }

    fn release(&self, first: u64, pages: u64) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let i = free.partition_point(|&(p, _)| p < first);
        free.insert(i, (first, pages));
        // Merge with the neighbours so large buffers stay possible.
        if i + 1 < free.len() && free[i].0 + free[i].1 == free[i + 1].0 {
            free[i].1 += free[i + 1].1;
            free.remove(i + 1);
        }
        if i > 0 && free[i - 1].0 + free[i - 1].1 == free[i].0 {
            free[i - 1].1 += free[i].1;
            free.remove(i);
        }
    }
}

/// A DMA buffer, returned to the pool when dropped. The driver must not
/// drop a buffer a command in flight still points at.
pub struct DmaBuf {
    mem: Arc<DmaMemory>,
    offset: u64,
    len: u64,
}

impl DmaBuf {
    /// The address the card uses.
    pub fn iova(&self) -> u64 {
        IOVA_BASE + self.offset
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> &[u8] {
        self.mem.mem.slice(self.offset, self.len as usize)
    }

    /// Mutable view; `&self` because the card writes the same memory anyway
    /// and each buffer has one owner.
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self) -> &mut [u8] {
        self.mem.mem.slice_mut(self.offset, self.len as usize)
    }

    pub fn write_at(&self, at: u64, data: &[u8]) {
        self.mem.mem.write(self.offset + at, data);
    }

    pub fn read_at(&self, at: u64, out: &mut [u8]) {
        self.mem.mem.read(self.offset + at, out);
    }

    pub fn fill(&self, byte: u8) {
        self.mem.mem.fill(self.offset, self.len as usize, byte);
    }

    /// A 16- or 32-bit word shared with the card (queues, shadow doorbells).
    pub fn u32_at(&self, at: u64) -> &std::sync::atomic::AtomicU32 {
        self.mem.mem.u32_at(self.offset + at)
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        self.mem.release(self.offset / PAGE, self.len / PAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merge() {
        let m = DmaMemory::new(8 * PAGE as usize).unwrap();
        let a = m.alloc(1).unwrap();
        let b = m.alloc(3 * PAGE).unwrap();
        let c = m.alloc(4 * PAGE).unwrap();
        assert_eq!(a.iova(), IOVA_BASE);
        assert_eq!(b.iova(), IOVA_BASE + PAGE);
        assert_eq!(c.len(), 4 * PAGE);
        assert!(m.alloc(1).is_none(), "exhausted");
        b.fill(7);
        drop(b);
        drop(a);
        let d = m.alloc(4 * PAGE).unwrap();
        assert_eq!(d.iova(), IOVA_BASE, "freed runs merge");
        assert!(d.bytes().iter().all(|&x| x == 0), "buffers start zeroed");
    }
}
