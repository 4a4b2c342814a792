//! cardsim's real-guest harness: boots a Debian kernel with a busybox
//! initramfs under QEMU (7.2 from the host, or 11.1 from the cache that
//! `cargo xtask deps` fills), attaches vhost-user devices, runs a shell
//! script inside the guest and hands back its console and exit code.
//!
//! ```no_run
//! use cardsim_tests::{Guest, Vmm};
//! # fn main() -> anyhow::Result<()> {
//! let out = Guest::builder(Vmm::Qemu7)
//!     .script("ls /sys/module/virtio_blk")
//!     .boot()?
//!     .wait()?; // fails unless the script exited 0
//! assert_eq!(out.script_rc, Some(0));
//! # Ok(()) }
//! ```

pub mod block_card;
pub use host_runtime::cpio;
pub mod fio;
mod guest;
mod image;
pub mod net_card;
pub mod nvme_card;
pub mod pagecache;
pub mod sandbox;
pub mod soak;
mod vmm;

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

pub use guest::{Guest, GuestBuilder, GuestError, GuestOutput, EXIT_MARKER, READY_MARKER};
pub use image::{guest_image, GuestImage};
pub use vmm::{Vmm, QEMU11_MARKER};

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Cargo's target folder: `CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where QEMU 11 and the guest image live: `CARDSIM_CACHE`, else
/// `<target>/cardsim`. Inside the target folder so `cargo clean` resets it.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("CARDSIM_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => target_dir().join("cardsim"),
    }
}

/// The path of one of the workspace's binaries (a card). Looks in
/// `CARDSIM_BIN_DIR` if set, else in the target folder's profile this code
/// was built with, then the other one.
pub fn card_binary(name: &str) -> Result<PathBuf> {
    let dirs: Vec<PathBuf> = match std::env::var_os("CARDSIM_BIN_DIR") {
        Some(dir) => vec![PathBuf::from(dir)],
        None if cfg!(debug_assertions) => {
            vec![target_dir().join("debug"), target_dir().join("release")]
        }
        None => vec![target_dir().join("release"), target_dir().join("debug")],
    };
    for dir in &dirs {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "card binary `{name}` not found in {}: build it with `cargo build --workspace --bins` \
         (or set CARDSIM_BIN_DIR)",
        looked.join(", ")
    )
}

/// Waits until a unix socket exists at `path` (a peer or card that is still
/// starting up), failing after `timeout`. If `child` exits meanwhile, fails at
/// once, since the socket will never come.
pub fn wait_for_socket(path: &Path, child: Option<&mut Child>, timeout: Duration) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + timeout;
    let mut child = child;
    loop {
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.file_type().is_socket() {
                return Ok(());
            }
        }
        if let Some(c) = child.as_deref_mut() {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "process exited ({status}) before creating socket {}",
                    path.display()
                );
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "socket {} did not appear within {timeout:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed when dropped, so a failing test leaves no
/// peer or card behind.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last `n` lines of `text`, for error messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
