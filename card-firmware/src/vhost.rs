//! Serving a vhost-user backend, one VMM connection after another.
//!
//! The card is the server of its vhost-user socket. When the VMM disconnects
//! (a guest shut down, or a VMM restarting) the card drains what is in flight
//! and listens again, so a VMM started with `reconnect` finds it; when the
//! card itself restarts, the same path is claimed again by the new process.
//!
//! Each connection gets a fresh backend (fresh queue workers and rings) from
//! the caller's factory, while what must survive connections — the media,
//! the metrics — lives in whatever the factory captures.

use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::socket::{claim_socket_path, SocketPathError};

/// Guest memory as the vhost-user layer shares it with a backend.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type every cardsim vhost-user backend uses.
pub type Vring = VringRwLock<GuestMemory>;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    SocketPath(#[from] SocketPathError),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot set up the backend for a new connection: {0}")]
    Backend(String),
    // vhost_user_backend::Error implements Display but not std::error::Error.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// What a card's backend adds to a plain [`VhostUserBackend`].
pub trait CardBackend: VhostUserBackend<Bitmap = (), Vring = Vring> + 'static {
    /// Extra file descriptors each worker thread waits on beside its kicks
    /// (an io_uring completion eventfd, say): `(thread index, fd, event id)`.
    fn listeners(&self) -> Vec<(usize, RawFd, u64)>;

    /// The connection has ended: wait for everything in flight, so guest
    /// memory can be released safely.
    fn quiesce(&self);
}

/// Claims `socket`, then serves one connection after another, forever.
///
/// `on_listening` runs once the socket accepts connections (a card announces
/// readiness there). Returns only on an error that makes serving impossible.
pub fn serve_forever<B, F>(
    name: &str,
    socket: &Path,
    new_backend: F,
    on_listening: impl FnOnce(),
) -> Result<(), ServeError>
where
    B: CardBackend,
    F: FnMut(GuestMemory) -> Result<B, String>,
{
    let listener = listen(socket)?;
    on_listening();
    serve(name, listener, new_backend)
}

/// Claims `socket` and listens on it. A card that jails itself listens
/// first, enters its sandbox, then calls [`serve`].
pub fn listen(socket: &Path) -> Result<Listener, ServeError> {
    claim_socket_path(socket)?;
    Listener::new(socket, false).map_err(|source| ServeError::Listen {
        path: socket.display().to_string(),
        source,
    })
}

/// Serves one connection after another on `listener`, forever: each gets a
/// fresh backend from `new_backend`.
pub fn serve<B, F>(name: &str, mut listener: Listener, mut new_backend: F) -> Result<(), ServeError>
where
    B: CardBackend,
    F: FnMut(GuestMemory) -> Result<B, String>,
{
    let mut connection = 0u64;
    loop {
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(new_backend(memory.clone()).map_err(ServeError::Backend)?);
        let mut daemon = VhostUserDaemon::new(name.to_owned(), backend.clone(), memory)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (thread, fd, id) in backend.listeners() {
            let handler = handlers
                .get(thread)
                .ok_or_else(|| ServeError::Backend(format!("no worker thread {thread}")))?;
            handler
                .register_listener(fd, EventSet::IN, id)
                .map_err(|e| ServeError::Backend(format!("register listener: {e}")))?;
        }

        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        connection += 1;
        tracing::info!(connection, "VMM connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(connection, "VMM disconnected"),
            Err(e) => tracing::warn!(connection, error = %e, "VMM connection ended"),
        }
        backend.quiesce();
        for handler in &handlers {
            handler.send_exit_event();
        }
    }
}
