//! Whether the host has a file's data still dirty in its page cache.
//!
//! A guest FLUSH must make everything the card acknowledged durable: on a
//! buffered backing file that means no page of it is left dirty in the host's
//! page cache. This reads the kernel's own page flags (root only): map the
//! range, find each page's frame in /proc/self/pagemap, and read its flags
//! from /proc/kpageflags.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use anyhow::{bail, Context, Result};

const PAGE: u64 = 4096;
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_PFN_MASK: u64 = (1 << 55) - 1;
/// KPF_DIRTY in include/uapi/linux/kernel-page-flags.h.
const KPF_DIRTY: u64 = 1 << 4;

/// How many pages of `path` in `[offset, offset + len)` are dirty in the
/// host page cache. `offset` and `len` are rounded out to whole pages.
pub fn dirty_pages(path: &Path, offset: u64, len: u64) -> Result<usize> {
    let start = offset / PAGE * PAGE;
    let end = (offset + len).div_ceil(PAGE) * PAGE;
    let pages = ((end - start) / PAGE) as usize;
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: a fresh shared read-only mapping of a file we opened; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (end - start) as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as libc::off_t,
        )
    };
    if map == libc::MAP_FAILED {
        bail!(
            "mmap {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let result = (|| {
        let mut pagemap = File::open("/proc/self/pagemap").context("open /proc/self/pagemap")?;
        let kpageflags = File::open("/proc/kpageflags")
            .context("open /proc/kpageflags (the flush check needs root)")?;
        let mut dirty = 0;
        for i in 0..pages {
            let addr = map as usize + i * PAGE as usize;
            // Touch the page so it is mapped (a page not in the cache is read
            // in clean, which is what it is).
            // SAFETY: addr lies within the mapping made above.
            let _ = unsafe { std::ptr::read_volatile(addr as *const u8) };
            let mut entry = [0u8; 8];
            pagemap.seek(SeekFrom::Start((addr as u64 / PAGE) * 8))?;
            pagemap.read_exact(&mut entry)?;
            let entry = u64::from_le_bytes(entry);
            let pfn = entry & PAGEMAP_PFN_MASK;
            if entry & PAGEMAP_PRESENT == 0 || pfn == 0 {
                bail!("page frame numbers are hidden: the flush check needs root");
            }
            let mut flags = [0u8; 8];
            kpageflags.read_exact_at(&mut flags, pfn * 8)?;
            if u64::from_le_bytes(flags) & KPF_DIRTY != 0 {
                dirty += 1;
            }
        }
        Ok(dirty)
    })();
    // SAFETY: unmapping exactly what was mapped.
    unsafe { libc::munmap(map, (end - start) as usize) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_written_page_is_dirty_until_fdatasync() {
        // Not tmpfs: its pages have no backing store to be written to.
        let dir = tempfile::tempdir_in(crate::target_dir()).unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        assert_eq!(dirty_pages(&path, 0, 8192).unwrap(), 2);
        f.sync_data().unwrap();
        assert_eq!(dirty_pages(&path, 0, 8192).unwrap(), 0);
    }
}
