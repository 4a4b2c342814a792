//! DPDK's testpmd, run two ways: as the load generator (virtio_user ports,
//! the guest driver's side, driven through its interactive prompt) and as
//! the peer backend (net_vhost ports forwarding between each other, the
//! vhost-user switch our card is compared against).
//!
//! testpmd runs without hugepages (`--no-huge -m 1024 --no-pci`) and needs
//! two lcores per instance: a main lcore (idle: it reads commands) and one
//! forwarding lcore that busy-polls. On a 2-CPU machine each instance's
//! forwarding lcore gets a CPU of its own (see [`Placement`]).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::NetError;

/// The testpmd binary (Debian's dpdk-dev package).
pub const TESTPMD: &str = "dpdk-testpmd";

/// Mbufs per instance: enough for 2 ports × (RX + TX rings) and bursts in
/// flight, small enough for malloc'd (no hugepage) memory.
const MBUFS: u32 = 16384;

/// Which CPU an instance's main and forwarding lcores run on.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Placement {
    pub main_cpu: usize,
    pub forward_cpu: usize,
}

impl Placement {
    fn lcores(self) -> String {
        format!("0@{},1@{}", self.main_cpu, self.forward_cpu)
    }
}

/// A testpmd process; killed on drop.
pub struct Testpmd {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Everything it printed, for error messages.
    log: Vec<String>,
    what: &'static str,
}

/// The common EAL and application arguments.
fn base_command(prefix: &str, placement: Placement) -> Command {
    // testpmd's printf goes to a pipe, fully buffered: stdbuf makes it line
    // buffered so the prompt's answers arrive as they are printed.
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "-eL", TESTPMD])
        .args(["--lcores", &placement.lcores()])
        .args(["--no-huge", "-m", "1024", "--no-pci", "--no-telemetry"])
        .args(["--file-prefix", prefix]);
    cmd
}

fn app_args(cmd: &mut Command) {
    cmd.arg("--")
        .arg(format!("--total-num-mbufs={MBUFS}"))
        .arg("--no-mlockall");
}

/// One virtio_user port of the generator: the vhost-user socket it connects
/// to and the MAC it sends from.
#[derive(Clone, Debug)]
pub struct GeneratorPort {
    pub socket: PathBuf,
    pub mac: String,
}

/// How the generator forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Port 0 only transmits (UDP from ENI A to ENI B); measured: frames the
    /// backend took from the TX ring per second.
    Txonly,
    /// Frames bounce between the ports through the backend: each port sends
    /// back what it receives with MACs, IPs and UDP ports swapped (testpmd's
    /// 5tswap on a loop topology, so every frame leaves from the port whose
    /// address it carries, as the card's anti-spoofing requires); measured:
    /// frames received per second on both ports.
    Io,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Txonly => "txonly",
            Mode::Io => "io-fwd",
        }
    }
}

/// What the generator sends: frame size, where to (the other ENI's MAC for
/// port 0 and port 1) and the IPs of port 0's frames.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub mode: Mode,
    pub frame_size: u16,
    pub peer_macs: [String; 2],
    /// (source, destination) of the generated frames: ENI A's and ENI B's.
    pub ips: (String, String),
}

/// Port counters from `show port stats all`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl Testpmd {
    /// The generator: one virtio_user port per entry of `ports`, in
    /// interactive mode. Returns once the ports are up (the backend answered
    /// the vhost-user handshake).
    pub fn generator(
        prefix: &str,
        placement: Placement,
        ports: &[GeneratorPort],
        traffic: &Traffic,
        startup: Duration,
    ) -> Result<Self, NetError> {
        let mut cmd = base_command(prefix, placement);
        for (i, p) in ports.iter().enumerate() {
            cmd.arg("--vdev").arg(format!(
                "net_virtio_user{i},path={},queues=1,queue_size=256,mac={}",
                p.socket.display(),
                p.mac
            ));
        }
        app_args(&mut cmd);
        cmd.arg("-i")
            .arg(format!("--txpkts={}", traffic.frame_size))
            .arg(format!("--eth-peer=0,{}", traffic.peer_macs[0]))
            .arg(format!("--eth-peer=1,{}", traffic.peer_macs[1]))
            .arg(format!("--tx-ip={},{}", traffic.ips.0, traffic.ips.1));
        match traffic.mode {
            Mode::Txonly => {
                cmd.args(["--forward-mode=txonly", "--portlist=0"]);
            }
            Mode::Io => {
                cmd.args(["--forward-mode=5tswap", "--port-topology=loop"]);
            }
        }
        let mut pmd = Self::spawn(cmd, "testpmd generator")?;
        pmd.wait_for("Checking link statuses", startup)?;
        pmd.wait_for("Done", startup)?;
        Ok(pmd)
    }

    /// The DPDK vhost peer: one net_vhost port per socket (server mode: it
    /// creates them), forwarding port 0 ↔ port 1 in io mode, started at once.
    pub fn vhost_peer(
        prefix: &str,
        placement: Placement,
        sockets: &[PathBuf],
        startup: Duration,
    ) -> Result<Self, NetError> {
        let mut cmd = base_command(prefix, placement);
        for (i, s) in sockets.iter().enumerate() {
            cmd.arg("--vdev")
                .arg(format!("net_vhost{i},iface={},queues=1", s.display()));
        }
        app_args(&mut cmd);
        cmd.args(["--forward-mode=io", "--auto-start"]);
        let mut pmd = Self::spawn(cmd, "testpmd vhost peer")?;
        let deadline = Instant::now() + startup;
        for s in sockets {
            while !s.exists() {
                pmd.check_running()?;
                if Instant::now() > deadline {
                    return Err(pmd.failure(&format!("no socket {}", s.display())));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(pmd)
    }

    fn spawn(mut cmd: Command, what: &'static str) -> Result<Self, NetError> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                NetError::Setup(format!(
                    "starting {TESTPMD} (apt-get install dpdk dpdk-dev): {e}"
                ))
            })?;
        let (tx, lines) = mpsc::channel();
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    // The prompt has no newline: it prefixes the next line.
                    let line = line.replace("testpmd> ", "");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            lines,
            log: Vec::new(),
            what,
        })
    }

    /// The process id (for CPU accounting).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_running(&mut self) -> Result<(), NetError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(self.failure(&format!("exited ({status})"))),
            _ => Ok(()),
        }
    }

    fn failure(&mut self, what: &str) -> NetError {
        while let Ok(l) = self.lines.try_recv() {
            self.log.push(l);
        }
        let tail: Vec<&str> = self
            .log
            .iter()
            .rev()
            .take(25)
            .rev()
            .map(String::as_str)
            .collect();
        NetError::Peer(format!("{}: {what}\n{}", self.what, tail.join("\n")))
    }

    fn next_line(&mut self, deadline: Instant) -> Result<String, NetError> {
        match self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(line) => {
                self.log.push(line.clone());
                Ok(line)
            }
            Err(RecvTimeoutError::Timeout) => Err(self.failure("timed out")),
            Err(RecvTimeoutError::Disconnected) => {
                let _ = self.child.wait();
                Err(self.failure("output closed"))
            }
        }
    }

    /// Waits for a line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, NetError> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.next_line(deadline)?;
            if line.contains(needle) {
                return Ok(line);
            }
        }
    }

    /// Sends one command line to the interactive prompt.
    pub fn command(&mut self, line: &str) -> Result<(), NetError> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| NetError::Peer(format!("{}: stdin closed", self.what)))?;
        let r = stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush());
        r.map_err(|e| self.failure(&format!("writing {line:?}: {e}")))
    }

    /// `show port stats all` for ports 0..n.
    pub fn port_stats(&mut self, n: usize) -> Result<Vec<PortStats>, NetError> {
        // Drop what is pending so only this command's answer is parsed.
        while let Ok(l) = self.lines.try_recv() {
            self.log.push(l);
        }
        self.command("show port stats all")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stats = vec![PortStats::default(); n];
        let mut port: Option<usize> = None;
        let mut done = 0;
        while done < n {
            let line = self.next_line(deadline)?;
            if let Some(rest) = line.split("NIC statistics for port").nth(1) {
                port = rest
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .filter(|p| *p < n);
                continue;
            }
            let Some(p) = port else { continue };
            if let Some(s) = stats.get_mut(p) {
                if let Some(v) = field(&line, "RX-packets:") {
                    s.rx_packets = v;
                }
                if let Some(v) = field(&line, "RX-bytes:") {
                    s.rx_bytes = v;
                }
                if let Some(v) = field(&line, "TX-bytes:") {
                    s.tx_bytes = v;
                }
                if let Some(v) = field(&line, "TX-packets:") {
                    s.tx_packets = v;
                    // TX-packets and TX-bytes share the block's last counter line.
                    done += 1;
                    port = None;
                }
            }
        }
        Ok(stats)
    }

    /// Stops forwarding and quits; waits up to 10 s, then kills.
    pub fn quit(mut self) {
        let _ = self.command("stop");
        let _ = self.command("quit");
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // Closing stdin ends a non-interactive testpmd ("Press enter to exit").
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            // SIGINT lets it close its vhost sockets and free shared memory.
            // SAFETY: kill has no memory preconditions; the pid is our own
            // unreaped child, so it can't have been recycled.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The number after `key` on a testpmd stats line.
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = line.split(key).nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Whether testpmd can be run at all.
pub fn available() -> Result<(), NetError> {
    match Command::new(TESTPMD)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) => Err(NetError::Setup(format!(
            "{TESTPMD} not found ({e}): apt-get install dpdk dpdk-dev (cargo xtask deps)"
        ))),
    }
}

/// Removes leftovers of a previous run at `path` (a socket testpmd would
/// refuse to create).
pub fn remove_stale(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_fields_are_parsed() {
        let l = "  RX-packets: 20271360   RX-missed: 0          RX-bytes:  1297367040";
        assert_eq!(field(l, "RX-packets:"), Some(20271360));
        assert_eq!(field(l, "RX-bytes:"), Some(1297367040));
        assert_eq!(field(l, "TX-packets:"), None);
        assert_eq!(field("  TX-packets: x", "TX-packets:"), None);
    }

    #[test]
    fn lcores_place_main_and_forwarding_lcore() {
        let p = Placement {
            main_cpu: 1,
            forward_cpu: 0,
        };
        assert_eq!(p.lcores(), "0@1,1@0");
    }
}
