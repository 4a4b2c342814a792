//! Starting the block card for a test, and talking to its control socket.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::{card_binary, wait_for_socket, KillOnDrop};

/// A running `vhost-blk-backend` with its vhost-user and control sockets in `dir`.
pub struct BlockCard {
    pub process: KillOnDrop,
    pub socket: PathBuf,
    pub control: PathBuf,
}

impl BlockCard {
    /// Starts the card on `backing` with `extra` flags and waits for its socket.
    pub fn start(dir: &Path, backing: &Path, extra: &[&str]) -> Result<Self> {
        let socket = dir.join("blk.sock");
        let control = dir.join("control.sock");
        let child = Command::new(card_binary("vhost-blk-backend")?)
            .arg("--socket")
            .arg(&socket)
            .arg("--backing")
            .arg(backing)
            .arg("--control")
            .arg(&control)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .context("starting vhost-blk-backend")?;
        let mut process = KillOnDrop(child);
        wait_for_socket(&socket, Some(&mut process.0), Duration::from_secs(10))?;
        Ok(Self {
            process,
            socket,
            control,
        })
    }

    /// One control-socket request; its `ok` value, or the card's error.
    pub fn call(&self, op: &str, args: Value) -> Result<Value> {
        card_firmware::control::request(&self.control, op, args)?
            .map_err(|e| anyhow::anyhow!("{op}: {}: {}", e.code, e.message))
    }

    /// Everything the card counts, now.
    pub fn metrics(&self) -> Result<Value> {
        self.call("metrics", json!({}))
    }
}
