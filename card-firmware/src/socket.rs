//! Claiming the path of a card's listening socket.
//!
//! A card is the server of its VMM socket. Starting a card must never take the
//! socket away from a card that is still serving it, and must never delete a
//! file that is not a socket (a mistyped `--socket` pointing at a disk image
//! would otherwise be lost).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    #[error("socket path {0} is in use by a live process")]
    InUse(PathBuf),
    #[error("socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket path {0}: parent directory does not exist")]
    NoParent(PathBuf),
    #[error("socket path {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Makes `path` free for a new listener: absent, or a stale socket that no
/// process accepts on any more (removed here). Anything else is an error and
/// nothing is touched.
pub fn claim_socket_path(path: &Path) -> Result<(), SocketPathError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        if !parent.is_dir() {
            return Err(SocketPathError::NoParent(path.to_owned()));
        }
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketPathError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketPathError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketPathError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| SocketPathError::Io {
                path: path.to_owned(),
                source,
            }),
        Err(source) => Err(SocketPathError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn absent_path_is_free() {
        let dir = tempfile::tempdir().unwrap();
        claim_socket_path(&dir.path().join("s")).unwrap();
    }

    #[test]
    fn live_socket_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let _listener = UnixListener::bind(&path).unwrap();
        assert!(matches!(
            claim_socket_path(&path),
            Err(SocketPathError::InUse(_))
        ));
        assert!(path.exists());
    }

    #[test]
    fn stale_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        drop(UnixListener::bind(&path).unwrap());
        claim_socket_path(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn regular_file_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            claim_socket_path(&path),
            Err(SocketPathError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn missing_parent_is_reported() {
        assert!(matches!(
            claim_socket_path(Path::new("/nonexistent-cardsim-dir/s")),
            Err(SocketPathError::NoParent(_))
        ));
    }
}
