//! Guest memory: one memfd mapped shared, handed to the backend with
//! SET_MEM_TABLE. Guest physical addresses are offsets into it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32};

pub struct GuestMemory {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping lives as long as the value; concurrent users touch
// disjoint ranges (each queue owns its rings and buffers) or go through atomics.
unsafe impl Send for GuestMemory {}
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: plain syscalls; every result is checked.
        unsafe {
            let fd = libc::memfd_create(c"cardbench-guest".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) < 0 {
                return Err(io::Error::last_os_error());
            }
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            );
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(Self {
                fd,
                ptr: NonNull::new_unchecked(ptr.cast()),
                len,
            })
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the memory sits in our address space (vhost-user ring
    /// addresses are frontend virtual addresses, not guest physical).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn at(&self, offset: u64, len: usize, align: usize) -> *mut u8 {
        let offset = offset as usize;
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len) && offset % align == 0,
            "guest memory access {offset:#x}+{len} out of bounds or misaligned"
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    pub fn u16_at(&self, offset: u64) -> &AtomicU16 {
        // SAFETY: in bounds and aligned; shared with the backend, hence atomic.
        unsafe { &*self.at(offset, 2, 2).cast::<AtomicU16>() }
    }

    pub fn u32_at(&self, offset: u64) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.at(offset, 4, 4).cast::<AtomicU32>() }
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        let dst = self.at(offset, data.len(), 1);
        // SAFETY: in bounds; the caller owns the range (not in flight).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
    }

    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let src = self.at(offset, out.len(), 1);
        // SAFETY: in bounds; the backend has completed any request on it.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
    }

    pub fn fill(&self, offset: u64, len: usize, byte: u8) {
        let dst = self.at(offset, len, 1);
        // SAFETY: in bounds; the caller owns the range.
        unsafe { std::ptr::write_bytes(dst, byte, len) }
    }

    /// A view of a buffer the caller owns (no request in flight on it).
    pub fn slice(&self, offset: u64, len: usize) -> &[u8] {
        let p = self.at(offset, len, 1);
        // SAFETY: in bounds; nobody writes it while the caller holds it.
        unsafe { std::slice::from_raw_parts(p, len) }
    }

    /// Mutable view of a buffer the caller owns; `&self` because the queue
    /// threads share the mapping but never each other's ranges.
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut(&self, offset: u64, len: usize) -> &mut [u8] {
        let p = self.at(offset, len, 1);
        // SAFETY: in bounds; exclusive by construction (one owner per range).
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
