//! Starting the block card for a test, and talking to its agent socket.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use card_firmware::agent::{AgentClient, AgentError};

use crate::{card_binary, wait_for_socket, KillOnDrop};

/// How long a test waits for one answer from a card's agent.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `vhost-blk-backend` with its vhost-user and agent sockets in `dir`.
pub struct BlockCard {
    pub process: KillOnDrop,
    pub socket: PathBuf,
    pub agent: PathBuf,
}

impl BlockCard {
    /// Starts the card on `backing` with `extra` flags and waits for its socket.
    pub fn start(dir: &Path, backing: &Path, extra: &[&str]) -> Result<Self> {
        let socket = dir.join("blk.sock");
        let agent = dir.join("agent.sock");
        let child = Command::new(card_binary("vhost-blk-backend")?)
            .arg("--socket")
            .arg(&socket)
            .arg("--backing")
            .arg(backing)
            .arg("--agent")
            .arg(&agent)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .context("starting vhost-blk-backend")?;
        let mut process = KillOnDrop(child);
        wait_for_socket(&socket, Some(&mut process.0), Duration::from_secs(10))?;
        Ok(Self {
            process,
            socket,
            agent,
        })
    }

    /// One agent request on a fresh connection; its `ok` value, or the
    /// card's error (an [`AgentError::Card`] inside the anyhow error).
    pub fn call(&self, op: &str, args: Value) -> Result<Value> {
        call(&self.agent, op, args)
    }

    /// Everything the card counts, now.
    pub fn metrics(&self) -> Result<Value> {
        self.call("metrics", json!({}))
    }
}

/// One agent request to the card at `agent` on a fresh connection (hello
/// first); the card's error answer is an [`AgentError::Card`] in the chain.
pub fn call(agent: &Path, op: &str, args: Value) -> Result<Value> {
    let mut client = AgentClient::connect(agent, AGENT_TIMEOUT)?;
    client
        .call(op, args)
        .with_context(|| format!("{op} on {}", agent.display()))
}

/// The code of the card's error answer in `e`, if that is what `e` is.
pub fn card_error_code(e: &anyhow::Error) -> Option<&str> {
    e.chain()
        .find_map(|cause| match cause.downcast_ref::<AgentError>() {
            Some(AgentError::Card { code, .. }) => Some(code.as_str()),
            _ => None,
        })
}
