//! cardbench's typed errors. `is_usage` separates what the user must fix
//! (exit 2) from failures during a run (exit 1).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("{}: no answer to {step} within {timeout:?}; is it a vhost-user-blk backend?", path.display())]
    Timeout {
        path: PathBuf,
        step: &'static str,
        timeout: Duration,
    },
    #[error("{}: vhost-user {step} failed ({source}); is it a vhost-user-blk backend?", path.display())]
    Handshake {
        path: PathBuf,
        step: &'static str,
        source: vhost::Error,
    },
    #[error("{}: {detail}", path.display())]
    Device { path: PathBuf, detail: String },
    #[error("guest memory: {0}")]
    Memory(io::Error),
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("the backend disconnected during the run")]
    Disconnected,
    #[error("the backend stopped completing requests ({inflight} in flight after {waited:?})")]
    Stalled { inflight: usize, waited: Duration },
    #[error("the backend completed unknown head {0}")]
    BadCompletion(u32),
}

impl BenchError {
    /// Errors the user fixes by changing the command or the peer.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Usage(_)
                | Self::Connect { .. }
                | Self::Timeout { .. }
                | Self::Handshake { .. }
                | Self::Device { .. }
        )
    }
}
