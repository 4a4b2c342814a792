//! The socket under the vfio-user crate's `Client`: the crate has no
//! timeouts and hides its stream, so the driver finds its own end by the
//! peer's address to bound reads and writes, and runs the handshake on a
//! helper thread it can give up on.

use std::path::Path;
use std::time::Duration;

use vfio_user::Client;

use super::driver::{DriverError, Result};

/// Connects and runs the crate's handshake (version, device and region
/// info) on a helper thread: the crate has no timeouts, and a peer that
/// accepts but never answers would block `Client::new` for ever. On timeout
/// the socket is shut down, which ends the blocked read.
pub(super) fn handshake(path: &Path, timeout: Duration) -> Result<Client> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_owned();
    let worker = std::thread::Builder::new()
        .name("vfio-user-connect".into())
        .spawn(move || {
            let _ = tx.send(Client::new(&p));
        })
        .map_err(|e| DriverError::Invalid(format!("cannot start a thread: {e}")))?;
    let connect_err = |source| DriverError::Connect {
        path: path.to_owned(),
        error: source,
    };
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let _ = worker.join();
            let client = r.map_err(connect_err)?;
            for fd in sockets_connected_to(path) {
                set_socket_timeouts(fd, timeout);
            }
            Ok(client)
        }
        Err(_) => {
            for fd in sockets_connected_to(path) {
                // SAFETY: shutting down a socket of ours; the fd stays open
                // until the crate drops its stream.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            // The thread's read now fails; let it finish before returning.
            let _ = rx.recv_timeout(Duration::from_secs(1));
            Err(DriverError::NoHandshake {
                path: path.to_owned(),
                waited: timeout,
            })
        }
    }
}

/// Our sockets whose peer is bound at `path` (the crate hides its stream).
fn sockets_connected_to(path: &Path) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return vec![];
    };
    let want = path.as_os_str().as_encoded_bytes();
    let mut fds = Vec::new();
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: a zeroed sockaddr_un is valid; getpeername fills at most len bytes.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: valid pointers; a non-socket fd just fails.
        let r = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) };
        if r != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
            continue;
        }
        let name: Vec<u8> = addr
            .sun_path
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        if name == want {
            fds.push(fd);
        }
    }
    fds
}

/// Bounds each read and write on the socket, so a card that stops
/// answering is an error rather than a hang.
fn set_socket_timeouts(fd: i32, timeout: Duration) {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: a valid timeval for a socket option.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
}
