//! Namespaces: local files served as NVMe namespaces, and the
//! `FILE[,size=BYTES][,lba=512|4096]` form the command line names them in.

use std::path::PathBuf;

use card_firmware::media::{FileMedia, MediaError, MediaOptions};
use card_firmware::middle::{Middle, MiddleConfig, MiddleError};

/// A `--namespace` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub path: PathBuf,
    pub size: Option<u64>,
    pub lba_size: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error(transparent)]
    Middle(#[from] MiddleError),
    #[error("namespace {path}: size {size} is not a multiple of its {lba_size}-byte LBA")]
    NotLbaMultiple {
        path: PathBuf,
        size: u64,
        lba_size: u32,
    },
}

impl std::str::FromStr for NamespaceSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err("a namespace needs a file: FILE[,size=BYTES][,lba=512|4096]".into());
        }
        let mut spec = NamespaceSpec {
            path: PathBuf::from(path),
            size: None,
            lba_size: 512,
        };
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value (size=, lba=)"))?;
            match key {
                "size" => spec.size = Some(card_firmware::media::parse_size(value)?),
                "lba" => {
                    spec.lba_size = match value {
                        "512" => 512,
                        "4096" => 4096,
                        other => return Err(format!("lba={other}: the LBA size is 512 or 4096")),
                    }
                }
                other => return Err(format!("unknown namespace option {other:?} (size, lba)")),
            }
        }
        if let Some(size) = spec.size {
            if size == 0 || size % u64::from(spec.lba_size) != 0 {
                return Err(format!(
                    "size={size} is not a positive multiple of the {}-byte LBA",
                    spec.lba_size
                ));
            }
        }
        Ok(spec)
    }
}

/// An open namespace.
pub struct Namespace {
    pub media: FileMedia,
    /// Faults and the flash latency model, shared with the block card.
    pub middle: Middle,
    /// log2 of the LBA size.
    pub lba_shift: u32,
    /// Opened with O_DIRECT: buffers must be aligned (see [`DIRECT_ALIGN`]).
    pub direct: bool,
    /// The file's filesystem refused FALLOC_FL_ZERO_RANGE (tmpfs does):
    /// Write Zeroes punches holes instead.
    pub zero_range_unsupported: std::sync::atomic::AtomicBool,
}

/// Alignment of buffer addresses and lengths that O_DIRECT needs.
pub const DIRECT_ALIGN: usize = 512;

impl Namespace {
    pub fn open(
        spec: &NamespaceSpec,
        direct: bool,
        middle: &MiddleConfig,
    ) -> Result<Self, NamespaceError> {
        let media = FileMedia::open(
            &spec.path,
            &MediaOptions {
                size: spec.size,
                read_only: false,
                direct,
            },
        )?;
        if media.capacity() % u64::from(spec.lba_size) != 0 {
            return Err(NamespaceError::NotLbaMultiple {
                path: spec.path.clone(),
                size: media.capacity(),
                lba_size: spec.lba_size,
            });
        }
        Ok(Self {
            media,
            middle: Middle::new(middle)?,
            direct,
            zero_range_unsupported: std::sync::atomic::AtomicBool::new(false),
            lba_shift: spec.lba_size.trailing_zeros(),
        })
    }

    /// A namespace without faults or modelled latency.
    pub fn open_plain(spec: &NamespaceSpec, direct: bool) -> Result<Self, NamespaceError> {
        Self::open(spec, direct, &MiddleConfig::default())
    }

    pub fn lba_size(&self) -> u64 {
        1 << self.lba_shift
    }

    /// Capacity in logical blocks (NSZE).
    pub fn blocks(&self) -> u64 {
        self.media.capacity() >> self.lba_shift
    }

    /// The byte range of `count` blocks from `slba`, if inside the namespace.
    pub fn byte_range(&self, slba: u64, count: u64) -> Option<(u64, u64)> {
        let end = slba.checked_add(count)?;
        if end > self.blocks() {
            return None;
        }
        Some((slba << self.lba_shift, count << self.lba_shift))
    }
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("media", &self.media)
            .field("lba_shift", &self.lba_shift)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_options() {
        let s: NamespaceSpec = "/x.img,size=1M,lba=4096".parse().unwrap();
        assert_eq!(s.path, PathBuf::from("/x.img"));
        assert_eq!(s.size, Some(1 << 20));
        assert_eq!(s.lba_size, 4096);
        let s: NamespaceSpec = "/y.img".parse().unwrap();
        assert_eq!((s.size, s.lba_size), (None, 512));
        assert!("/x,lba=1024".parse::<NamespaceSpec>().is_err());
        assert!("/x,size=1000,lba=512".parse::<NamespaceSpec>().is_err());
        assert!("/x,size=6K,lba=4096".parse::<NamespaceSpec>().is_err());
        assert!("/x,colour=red".parse::<NamespaceSpec>().is_err());
        assert!(",size=1M".parse::<NamespaceSpec>().is_err());
    }

    #[test]
    fn a_file_that_is_not_a_whole_number_of_lbas_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096 + 512).unwrap();
        let spec: NamespaceSpec = format!("{},lba=4096", f.path().display()).parse().unwrap();
        assert!(matches!(
            Namespace::open_plain(&spec, false),
            Err(NamespaceError::NotLbaMultiple { .. })
        ));
    }

    #[test]
    fn ranges_past_the_end_are_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let spec: NamespaceSpec = f.path().to_str().unwrap().parse().unwrap();
        let ns = Namespace::open_plain(&spec, false).unwrap();
        assert_eq!(ns.blocks(), 16);
        assert_eq!(ns.byte_range(15, 1), Some((15 * 512, 512)));
        assert_eq!(ns.byte_range(15, 2), None);
        assert_eq!(ns.byte_range(u64::MAX, 2), None);
    }
}
