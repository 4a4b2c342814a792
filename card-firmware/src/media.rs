//! Volume media: where a card's blocks live.
//!
//! Storage cards are layered frontend → middle → media; a frontend never
//! knows which media it sits on. Today the only media is a local file (or
//! block device) driven through io_uring: this module opens and checks it and
//! builds the submission entries for each operation, so every frontend's
//! queue worker submits the same way.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use io_uring::{opcode, squeue, types};

/// The unit of addressing of every cardsim volume.
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("backing file {0} does not exist")]
    NotFound(PathBuf),
    #[error("backing file {0} is neither a regular file nor a block device")]
    NotAFile(PathBuf),
    #[error("backing file {path} holds {actual} bytes; --size {requested} would hide data past it (sizes only grow)")]
    SizeBelowContent {
        path: PathBuf,
        requested: u64,
        actual: u64,
    },
    #[error("size {0} is not a positive multiple of {SECTOR_SIZE} bytes")]
    BadSize(u64),
    #[error(
        "backing file {path} has {actual} bytes; a read-only volume cannot be grown to {requested}"
    )]
    CannotGrowReadOnly {
        path: PathBuf,
        requested: u64,
        actual: u64,
    },
    #[error("backing device {path} has {actual} bytes; it cannot hold {requested}")]
    DeviceTooSmall {
        path: PathBuf,
        requested: u64,
        actual: u64,
    },
    #[error("backing file {0} is in use by another card (it holds the lock)")]
    Locked(PathBuf),
    #[error("backing file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A size in bytes with an optional binary suffix K, M, G or T, as the
/// cards' `--size` and `--namespace …,size=` take it.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size in bytes"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// How to open a volume's media.
#[derive(Clone, Debug, Default)]
pub struct MediaOptions {
    /// Capacity in bytes; `None` takes the file's length (rounded down to a sector).
    pub size: Option<u64>,
    pub read_only: bool,
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
}

/// An open backing file and the capacity the guest sees.
#[derive(Debug)]
pub struct FileMedia {
    file: File,
    /// A page-cache descriptor of the same file, for the few synchronous
    /// reads the middle makes (the power-cut log); `file` itself may be O_DIRECT.
    buffered: File,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
}

impl FileMedia {
    /// Opens and checks the backing file. Never truncates; grows a regular
    /// file (sparsely) only when `size` asks for more than it holds.
    pub fn open(path: &Path, options: &MediaOptions) -> Result<Self, MediaError> {
        let io_err = |source| MediaError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(size) = options.size {
            if size == 0 || size % SECTOR_SIZE != 0 {
                return Err(MediaError::BadSize(size));
            }
        }
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(MediaError::NotFound(path.to_owned()))
            }
            Err(e) => return Err(io_err(e)),
        };
        let is_block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !is_block_device {
            return Err(MediaError::NotAFile(path.to_owned()));
        }

        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let mut file = open.open(path).map_err(io_err)?;
        lock(&file, options.read_only).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                MediaError::Locked(path.to_owned())
            } else {
                io_err(e)
            }
        })?;

        // Block devices report 0 in metadata; seeking to the end works for both.
        let actual = file.seek(SeekFrom::End(0)).map_err(io_err)?;
        let capacity = match options.size {
            None => actual - actual % SECTOR_SIZE,
            Some(requested) if requested < actual => {
                return Err(MediaError::SizeBelowContent {
                    path: path.to_owned(),
                    requested,
                    actual,
                })
            }
            Some(requested) if requested > actual => {
                if is_block_device {
                    return Err(MediaError::DeviceTooSmall {
                        path: path.to_owned(),
                        requested,
                        actual,
                    });
                }
                if options.read_only {
                    return Err(MediaError::CannotGrowReadOnly {
                        path: path.to_owned(),
                        requested,
                        actual,
                    });
                }
                file.set_len(requested).map_err(io_err)?;
                requested
            }
            Some(requested) => requested,
        };
        if capacity == 0 {
            return Err(MediaError::BadSize(actual));
        }
        // Beside an O_DIRECT descriptor, a buffered one for unaligned work
        // (the power-cut undo log), writable like the media.
        let buffered = if options.direct {
            OpenOptions::new()
                .read(true)
                .write(!options.read_only)
                .open(path)
                .map_err(io_err)?
        } else {
            file.try_clone().map_err(io_err)?
        };
        Ok(Self {
            file,
            buffered,
            path: path.to_owned(),
            capacity,
            read_only: options.read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in bytes, a multiple of [`SECTOR_SIZE`].
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The file through the page cache, for synchronous reads.
    pub fn buffered(&self) -> &File {
        &self.buffered
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Reads into `iovecs` from `offset`.
    ///
    /// # Safety
    /// `iovecs[..count]` and the memory they describe must stay valid and
    /// unaliased until the entry's completion is reaped.
    pub unsafe fn read(
        &self,
        iovecs: *const libc::iovec,
        count: u32,
        offset: u64,
    ) -> squeue::Entry {
        opcode::Readv::new(self.fd(), iovecs, count)
            .offset(offset)
            .build()
    }

    /// Writes `iovecs` at `offset`.
    ///
    /// # Safety
    /// As for [`FileMedia::read`].
    pub unsafe fn write(
        &self,
        iovecs: *const libc::iovec,
        count: u32,
        offset: u64,
    ) -> squeue::Entry {
        opcode::Writev::new(self.fd(), iovecs, count)
            .offset(offset)
            .build()
    }

    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> squeue::Entry {
        opcode::Fsync::new(self.fd())
            .flags(types::FsyncFlags::DATASYNC)
            .build()
    }

    /// Deallocates a range; later reads return zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> squeue::Entry {
        opcode::Fallocate::new(self.fd(), len)
            .offset(offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build()
    }

    /// Zeroes a range and keeps it allocated.
    pub fn zero_range(&self, offset: u64, len: u64) -> squeue::Entry {
        opcode::Fallocate::new(self.fd(), len)
            .offset(offset)
            .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
            .build()
    }
}

/// Two cards writing one volume would corrupt it: hold an advisory lock for
/// the card's lifetime (shared for read-only cards).
fn lock(file: &File, shared: bool) -> io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("8m"), Ok(8 << 20));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }

    use super::*;

    fn file_with(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    #[test]
    fn capacity_defaults_to_the_file_length() {
        let f = file_with(1 << 20);
        let media = FileMedia::open(f.path(), &MediaOptions::default()).unwrap();
        assert_eq!(media.capacity(), 1 << 20);
    }

    #[test]
    fn a_larger_size_grows_the_file_sparsely() {
        let f = file_with(4096);
        let options = MediaOptions {
            size: Some(1 << 20),
            ..Default::default()
        };
        let media = FileMedia::open(f.path(), &options).unwrap();
        assert_eq!(media.capacity(), 1 << 20);
        assert_eq!(f.as_file().metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn a_smaller_size_is_refused_and_nothing_is_truncated() {
        let f = file_with(1 << 20);
        let options = MediaOptions {
            size: Some(4096),
            ..Default::default()
        };
        let err = FileMedia::open(f.path(), &options).unwrap_err();
        assert!(matches!(err, MediaError::SizeBelowContent { .. }), "{err}");
        assert_eq!(f.as_file().metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn odd_sizes_are_refused() {
        let f = file_with(4096);
        for size in [0, 1000] {
            let options = MediaOptions {
                size: Some(size),
                ..Default::default()
            };
            assert!(matches!(
                FileMedia::open(f.path(), &options),
                Err(MediaError::BadSize(_))
            ));
        }
    }

    #[test]
    fn missing_and_non_files_are_refused() {
        assert!(matches!(
            FileMedia::open(Path::new("/nonexistent/x.img"), &MediaOptions::default()),
            Err(MediaError::NotFound(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileMedia::open(dir.path(), &MediaOptions::default()),
            Err(MediaError::NotAFile(_))
        ));
    }

    #[test]
    fn a_second_writer_is_refused() {
        let f = file_with(4096);
        let _first = FileMedia::open(f.path(), &MediaOptions::default()).unwrap();
        assert!(matches!(
            FileMedia::open(f.path(), &MediaOptions::default()),
            Err(MediaError::Locked(_))
        ));
    }

    #[test]
    fn read_only_media_cannot_grow() {
        let f = file_with(4096);
        let options = MediaOptions {
            size: Some(8192),
            read_only: true,
            ..Default::default()
        };
        assert!(matches!(
            FileMedia::open(f.path(), &options),
            Err(MediaError::CannotGrowReadOnly { .. })
        ));
        assert_eq!(f.as_file().metadata().unwrap().len(), 4096);
    }
}
