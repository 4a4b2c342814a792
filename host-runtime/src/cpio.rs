//! A minimal writer for the "newc" cpio format, the one the kernel unpacks
//! into its initramfs. Only what an initramfs needs: directories, regular
//! files, symlinks and character devices.

use std::io::{self, Write};

/// Writes entries in the newc format to `W`. Call [`CpioWriter::finish`] to
/// write the trailer; an archive without one is rejected by the kernel.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        // Inode numbers only need to be distinct within the archive (the
        // kernel uses them to detect hard links).
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), b"")
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), b"")
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 1, (0, 0), 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, mode, nlink, rdev, size, ino)?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        size: u32,
        ino: u32,
    ) -> io::Result<()> {
        // Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize,
        // devmajor, devminor, rdevmajor, rdevminor, namesize, check.
        // mtime stays 0 so identical inputs give an identical archive.
        let namesize = name.len() as u32 + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Header+name and file data are each padded to 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..rem])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_tool_reads_our_archive() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/d", 0o755).unwrap();
        w.file("d/f.txt", 0o644, b"hello").unwrap();
        w.symlink("d/l", "f.txt").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let out = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().unwrap().write_all(&bytes)?;
                c.wait_with_output()
            });
        let Ok(out) = out else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{listing}");
        assert!(listing.contains("d/f.txt"), "{listing}");
        assert!(listing.contains("d/l -> f.txt"), "{listing}");
    }
}
