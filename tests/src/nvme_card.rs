//! Starting the local-NVMe card for a test, and attaching it to a QEMU 11
//! guest as a `vfio-user-pci` device.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{card_binary, wait_for_socket, GuestBuilder, KillOnDrop};

/// A running `nvme-emulator` with its vfio-user socket in a folder.
pub struct NvmeCard {
    pub process: KillOnDrop,
    pub socket: PathBuf,
}

impl NvmeCard {
    /// Starts the card with `--namespace` for each of `namespaces` and
    /// `extra` flags, and waits for its socket.
    pub fn start(dir: &Path, namespaces: &[&str], extra: &[&str]) -> Result<Self> {
        let socket = dir.join("nvme.sock");
        let mut cmd = Command::new(card_binary("nvme-emulator")?);
        cmd.arg("--socket").arg(&socket);
        for ns in namespaces {
            cmd.arg("--namespace").arg(ns);
        }
        let child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .context("starting nvme-emulator")?;
        let mut process = KillOnDrop(child);
        wait_for_socket(&socket, Some(&mut process.0), Duration::from_secs(10))?;
        Ok(Self { process, socket })
    }

    /// Adds the card to a guest as QEMU's vfio-user-pci device (QEMU ≥ 10.1).
    pub fn attach(&self, guest: GuestBuilder) -> GuestBuilder {
        guest.qemu_arg("-device").qemu_arg(format!(
            r#"{{"driver":"vfio-user-pci","socket":{{"path":"{}","type":"unix"}}}}"#,
            self.socket.display()
        ))
    }
}
