//! The two VMMs the guests run under.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// File written into the QEMU 11 folder once it is complete; a folder
/// without it is half-done and gets rebuilt.
pub const QEMU11_MARKER: &str = ".cardsim-complete";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// The host's QEMU (7.2 on Debian 12).
    Qemu7,
    /// QEMU 11.1 from Debian trixie-backports, in `<cache>/qemu-11`.
    Qemu11,
}

impl Vmm {
    pub const ALL: [Vmm; 2] = [Vmm::Qemu7, Vmm::Qemu11];

    /// The root of the trixie tree that holds QEMU 11.
    pub fn qemu11_root() -> PathBuf {
        crate::cache_dir().join("qemu-11")
    }

    /// Ok if this VMM can be started; else an error that says how to get it.
    pub fn available(&self) -> Result<()> {
        if *self == Vmm::Qemu11 && !Self::qemu11_root().join(QEMU11_MARKER).is_file() {
            bail!(
                "QEMU 11 is not prepared in {}: run `cargo xtask deps`",
                Self::qemu11_root().display()
            );
        }
        self.version().map(|_| ())
    }

    /// The first line of `qemu-system-x86_64 --version`, without the
    /// completeness check of [`Vmm::available`].
    pub fn version(&self) -> Result<String> {
        let out = self
            .command()
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("starting {self} (run `cargo xtask deps`)"))?;
        if !out.status.success() {
            bail!(
                "{self} --version failed (run `cargo xtask deps`): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// The `-chardev socket` option that makes QEMU reconnect to a restarted
    /// backend: 11 dropped `reconnect` (seconds) for `reconnect-ms`.
    pub fn vhost_user_reconnect_arg(&self) -> &'static str {
        match self {
            Vmm::Qemu7 => "reconnect=1",
            Vmm::Qemu11 => "reconnect-ms=50",
        }
    }

    /// A command that runs this VMM's qemu-system-x86_64; add arguments.
    /// QEMU 11 runs from its trixie tree through that tree's own dynamic
    /// loader, so no chroot (and no root) is needed.
    pub fn command(&self) -> Command {
        match self {
            Vmm::Qemu7 => Command::new("qemu-system-x86_64"),
            Vmm::Qemu11 => {
                let d = Self::qemu11_root();
                let mut cmd = Command::new(d.join("lib64/ld-linux-x86-64.so.2"));
                cmd.arg("--library-path")
                    .arg(format!(
                        "{}:{}",
                        d.join("lib/x86_64-linux-gnu").display(),
                        d.join("usr/lib/x86_64-linux-gnu").display()
                    ))
                    .arg(d.join("usr/bin/qemu-system-x86_64"))
                    .arg("-L")
                    .arg(d.join("usr/share/qemu"))
                    .arg("-L")
                    .arg(d.join("usr/share/seabios"))
                    .env("QEMU_MODULE_DIR", d.join("usr/lib/x86_64-linux-gnu/qemu"));
                cmd
            }
        }
    }
}

impl std::fmt::Display for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Vmm::Qemu7 => "QEMU 7.2 (host)",
            Vmm::Qemu11 => "QEMU 11.1 (trixie-backports)",
        })
    }
}
