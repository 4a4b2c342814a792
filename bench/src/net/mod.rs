//! The networking card's benchmarks: `cardbench compare-net` (DPDK testpmd
//! as the load generator against our card and DPDK's own vhost PMD) and
//! `cardbench compare-net-guests` (two QEMU guests on the card against the
//! same guests on a Linux bridge).

pub mod compare;
pub mod guests;
pub mod testpmd;

/// Why a network benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A missing tool, a bad option: exit 2.
    #[error("{0}")]
    Setup(String),
    /// testpmd or the card misbehaved.
    #[error("{0}")]
    Peer(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// From the guest harness (QEMU, the card's process, fixtures).
    #[error("{0:#}")]
    Harness(anyhow::Error),
}

impl NetError {
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Setup(_))
    }
}
