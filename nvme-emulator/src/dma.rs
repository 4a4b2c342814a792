//! The driver's memory as the controller may reach it: only the regions the
//! client (the VMM) mapped with DMA_MAP. Every access names a guest physical
//! address and a length and is checked against those regions first; an
//! address outside them is a [`DmaError`], which the controller turns into a
//! Data Transfer Error for that one command. Nothing outside the mappings is
//! ever touched, so a bad PRP cannot fault the card.
//!
//! A [`DmaSpace`] is immutable once built: a map or unmap builds a new one,
//! and a command in flight keeps the space it was started with (an `Arc`),
//! so memory the kernel is still reading or writing for it stays mapped.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum DmaError {
    #[error("guest address {addr:#x}+{len:#x} is outside the mapped DMA regions")]
    Unmapped { addr: u64, len: u64 },
    #[error("guest address {addr:#x} is mapped read-only")]
    ReadOnly { addr: u64 },
}

/// The seam between the controller and the driver's memory: checked copies
/// in and out, and checked host pointers for io_uring.
pub trait DmaMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), DmaError>;
    /// A host pointer to `[addr, addr + len)`, which must lie in one region
    /// (writable if `write`).
    fn host_range(&self, addr: u64, len: u64, write: bool) -> Result<*mut u8, DmaError>;

    fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError> {
        self.write(addr, &value.to_le_bytes())
    }
    fn read_u64(&self, addr: u64) -> Result<u64, DmaError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Who owns a region's host memory.
enum Backing {
    /// Mapped from the client's file descriptor; unmapped on drop.
    Mmap,
    /// Heap memory: tests and fuzz targets play the driver in it.
    Heap(#[allow(dead_code)] Box<[u8]>),
}

/// One region of guest physical memory mapped into this process.
pub struct DmaRegion {
    addr: u64,
    len: u64,
    host: *mut u8,
    writable: bool,
    backing: Backing,
}

// SAFETY: the region is plain shared memory; every access goes through
// bounds-checked copies or pointers handed to the kernel.
unsafe impl Send for DmaRegion {}
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Maps `len` bytes of `file` from `offset` as guest addresses `addr..`.
    pub fn map(
        file: &File,
        offset: u64,
        addr: u64,
        len: u64,
        writable: bool,
    ) -> std::io::Result<Self> {
        if len == 0 || addr.checked_add(len).is_none() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // Touching a shared mapping past the end of its file raises SIGBUS,
        // which would kill the card: refuse a region the file cannot back.
        // (QEMU seals its memfds against shrinking, so this holds later too.)
        let meta = file.metadata()?;
        if meta.is_file() && offset.checked_add(len).is_none_or(|end| end > meta.len()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "DMA region {addr:#x}+{len:#x} at file offset {offset:#x} is past the end of its {}-byte file",
                    meta.len()
                ),
            ));
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh shared mapping of a file we were given; the kernel
        // checks fd, offset and length.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            addr,
            len,
            host: host.cast(),
            writable,
            backing: Backing::Mmap,
        })
    }

    /// Zeroed heap memory at guest addresses `addr..addr + len`.
    pub fn heap(addr: u64, len: usize) -> Self {
        let mut mem = vec![0u8; len].into_boxed_slice();
        let host = mem.as_mut_ptr();
        Self {
            addr,
            len: len as u64,
            host,
            writable: true,
            backing: Backing::Heap(mem),
        }
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.addr + self.len)
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        if let Backing::Mmap = self.backing {
            // SAFETY: unmaps exactly what `map` mapped; nothing refers to it
            // any more (every user holds the Arc this is dropped from).
            unsafe { libc::munmap(self.host.cast(), self.len as usize) };
        }
    }
}

impl std::fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DmaRegion({:#x}+{:#x}{})",
            self.addr,
            self.len,
            if self.writable { "" } else { " ro" }
        )
    }
}

/// The set of regions the client has mapped.
#[derive(Clone, Default, Debug)]
pub struct DmaSpace {
    regions: Vec<Arc<DmaRegion>>,
}

impl DmaSpace {
    /// This space with `region` added; a region it overlaps is replaced.
    pub fn with(&self, region: DmaRegion) -> Self {
        let mut regions: Vec<_> = self
            .regions
            .iter()
            .filter(|r| r.addr + r.len <= region.addr || region.addr + region.len <= r.addr)
            .cloned()
            .collect();
        regions.push(Arc::new(region));
        Self { regions }
    }

    /// This space without the regions that overlap `[addr, addr + len)`.
    pub fn without(&self, addr: u64, len: u64) -> Self {
        let end = addr.saturating_add(len);
        Self {
            regions: self
                .regions
                .iter()
                .filter(|r| r.addr + r.len <= addr || end <= r.addr)
                .cloned()
                .collect(),
        }
    }

    pub fn regions(&self) -> usize {
        self.regions.len()
    }

    fn find(&self, addr: u64, len: u64) -> Result<&DmaRegion, DmaError> {
        self.regions
            .iter()
            .find(|r| r.contains(addr, len))
            .map(|r| r.as_ref())
            .ok_or(DmaError::Unmapped { addr, len })
    }
}

impl DmaMemory for DmaSpace {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let src = self.host_range(addr, buf.len() as u64, false)?;
        fence(Ordering::Acquire);
        // SAFETY: `host_range` checked that the range lies in a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        let dst = self.host_range(addr, buf.len() as u64, true)?;
        // SAFETY: as for `read`, and the region is writable.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
        fence(Ordering::Release);
        Ok(())
    }

    fn host_range(&self, addr: u64, len: u64, write: bool) -> Result<*mut u8, DmaError> {
        let region = self.find(addr, len)?;
        if write && !region.writable {
            return Err(DmaError::ReadOnly { addr });
        }
        // `find` checked addr - region.addr < region.len, which fits a usize
        // because the region was mapped.
        Ok(region.host.wrapping_add((addr - region.addr) as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_outside_every_region_are_refused() {
        let space = DmaSpace::default().with(DmaRegion::heap(0x1000, 0x2000));
        let mut buf = [0u8; 16];
        space.write(0x1000, &[1; 16]).unwrap();
        space.read(0x1000, &mut buf).unwrap();
        assert_eq!(buf, [1; 16]);
        assert!(space.read(0x0ff8, &mut buf).is_err());
        assert!(space.read(0x2ff8, &mut buf).is_err());
        assert!(space.read(u64::MAX - 4, &mut buf).is_err());
        assert!(space.host_range(0x1000, 0x2001, false).is_err());
    }

    #[test]
    fn a_memfd_mapping_is_shared_with_the_file() {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let space =
            DmaSpace::default().with(DmaRegion::map(&file, 4096, 0x10_0000, 4096, true).unwrap());
        space.write(0x10_0010, b"hello").unwrap();
        let mut got = [0u8; 5];
        file.seek(SeekFrom::Start(4096 + 16)).unwrap();
        file.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        let ro =
            DmaSpace::default().with(DmaRegion::map(&file, 0, 0x20_0000, 4096, false).unwrap());
        assert_eq!(
            ro.write(0x20_0000, b"x"),
            Err(DmaError::ReadOnly { addr: 0x20_0000 })
        );
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        assert!(DmaRegion::map(&file, 4096, 0, 8192, true).is_err());
        assert!(DmaRegion::map(&file, u64::MAX - 10, 0, 4096, true).is_err());
        assert!(DmaRegion::map(&file, 4096, 0, 4096, true).is_ok());
    }

    #[test]
    fn unmapping_removes_overlapping_regions_only() {
        let space = DmaSpace::default()
            .with(DmaRegion::heap(0, 0x1000))
            .with(DmaRegion::heap(0x1000, 0x1000));
        let space = space.without(0x1800, 1);
        assert_eq!(space.regions(), 1);
        assert!(space.read_u32(0).is_ok());
        assert!(space.read_u32(0x1000).is_err());
    }
}
