//! A guest under QEMU: build its command line, boot it, follow its serial
//! console, wait for it to power off.

use crate::{tail, Vmm};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The init prints this once modules are loaded, before the script runs.
pub const READY_MARKER: &str = "CARDSIM-READY";
/// The init prints `CARDSIM-EXIT rc=N` after the script, then powers off.
pub const EXIT_MARKER: &str = "CARDSIM-EXIT";

/// Lines of console kept in error messages.
const TAIL_LINES: usize = 40;

pub struct GuestBuilder {
    vmm: Vmm,
    smp: u32,
    mem_mib: u32,
    script: Option<String>,
    args: Vec<String>,
    chardevs: usize,
    append: Vec<String>,
    timeout: Duration,
}

impl GuestBuilder {
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    /// A shell script the guest runs (as `/cardsim/script.sh`, sourced by
    /// `sh -e`: the first failing command fails it). The init's `wait_dev
    /// PATH [SECONDS]` helper waits for a device node.
    pub fn script(mut self, script: &str) -> Self {
        self.script = Some(script.to_string());
        self
    }

    /// Attaches a vhost-user-blk device whose backend listens on `socket`.
    /// With `reconnect`, QEMU reconnects when the backend restarts.
    pub fn vhost_user_blk(
        mut self,
        socket: impl AsRef<Path>,
        num_queues: u16,
        reconnect: bool,
    ) -> Self {
        let id = format!("c{}", self.chardevs);
        self.chardevs += 1;
        let mut chardev = format!("socket,id={id},path={}", socket.as_ref().display());
        if reconnect {
            chardev.push(',');
            chardev.push_str(self.vmm.vhost_user_reconnect_arg());
        }
        self.args.extend([
            "-chardev".into(),
            chardev,
            "-device".into(),
            format!("vhost-user-blk-pci,chardev={id},num-queues={num_queues}"),
        ]);
        self
    }

    /// Attaches a virtio-net device whose vhost-user-net backend listens on
    /// `socket`, with `queues` queue pairs. QEMU 7.2 gets `vectors=0` (INTx):
    /// under TCG it segfaults in vhost_net_start when a vhost-user-net device
    /// uses MSI-X. QEMU 11 gets MSI-X, one vector per virtqueue plus config
    /// and control.
    pub fn vhost_user_net(mut self, socket: impl AsRef<Path>, mac: &str, queues: u16) -> Self {
        let id = format!("c{}", self.chardevs);
        self.chardevs += 1;
        let vectors = match self.vmm {
            Vmm::Qemu7 => 0,
            Vmm::Qemu11 => 2 * u32::from(queues) + 2,
        };
        let mq = if queues > 1 { ",mq=on" } else { "" };
        self.args.extend([
            "-chardev".into(),
            format!("socket,id={id},path={}", socket.as_ref().display()),
            "-netdev".into(),
            format!("vhost-user,id=n{id},chardev={id},queues={queues}"),
            "-device".into(),
            format!("virtio-net-pci,netdev=n{id},mac={mac}{mq},vectors={vectors}"),
        ]);
        self
    }

    /// Any other QEMU argument, passed as-is.
    pub fn qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends to the kernel command line.
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        self.append.push(arg.into());
        self
    }

    /// The whole run, boot to poweroff; QEMU is killed past it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Builds the image if needed and starts QEMU.
    pub fn boot(self) -> Result<Guest> {
        self.vmm.available()?;
        let image = crate::guest_image().context("preparing the guest image")?;
        let workdir = tempfile::Builder::new()
            .prefix("cardsim-guest-")
            .tempdir()
            .context("creating the guest's temporary folder")?;
        let initramfs = workdir.path().join("initramfs.cpio");
        write_initramfs(&image.initramfs, self.script.as_deref(), &initramfs)?;

        let mut cmdline = image.cmdline.clone();
        for a in &self.append {
            cmdline.push(' ');
            cmdline.push_str(a);
        }
        let mem = format!("{}M", self.mem_mib);
        let mut cmd = self.vmm.command();
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-accel", "tcg", "-machine", "q35", "-cpu", "max"])
        .args(["-smp", &self.smp.to_string()])
        // Shared guest memory so vhost-user backends can map it.
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
        .args(["-numa", "node,memdev=mem", "-m", &mem])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", &cmdline])
        .args(["-serial", "stdio"])
        .args(&self.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let command_line = format!("{cmd:?}");
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}: {command_line}", self.vmm))?;

        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("QEMU stdout")?;
        let echo = std::env::var_os("CARDSIM_CONSOLE").is_some();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                if echo {
                    eprintln!("guest| {line}");
                }
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut qemu_err = child.stderr.take().context("QEMU stderr")?;
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = qemu_err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });

        Ok(Guest {
            vmm: self.vmm,
            child: Some(child),
            lines,
            console: String::new(),
            stderr,
            started,
            deadline: started + self.timeout,
            ready_after: None,
            script_rc: None,
            command_line,
            _workdir: workdir,
        })
    }
}

/// The base image followed by a second newc archive with the script, as
/// host-runtime writes an instance's.
fn write_initramfs(base: &Path, script: Option<&str>, dest: &Path) -> Result<()> {
    host_runtime::instance::write_initramfs(base, script, dest)
        .with_context(|| format!("writing {} from {}", dest.display(), base.display()))
}

/// A running guest. Dropping it kills QEMU.
pub struct Guest {
    vmm: Vmm,
    child: Option<Child>,
    lines: Receiver<(Instant, String)>,
    console: String,
    stderr: Arc<Mutex<String>>,
    started: Instant,
    deadline: Instant,
    ready_after: Option<Duration>,
    script_rc: Option<i32>,
    command_line: String,
    _workdir: tempfile::TempDir,
}

/// What a guest left behind.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// The serial console, one line per line, without carriage returns.
    pub console: String,
    /// The script's exit code from the exit marker; None if the guest never
    /// got there (crash, panic).
    pub script_rc: Option<i32>,
    /// From QEMU's start to the init's ready marker (modules loaded).
    pub boot_time: Option<Duration>,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
}

impl GuestOutput {
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.console, lines)
    }
}

/// Why a guest run failed. The message carries the console's tail.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the guest script failed with exit code {rc}\n--- console tail ---\n{}", .output.console_tail(TAIL_LINES))]
    ScriptFailed { rc: i32, output: Box<GuestOutput> },
    #[error("QEMU exited ({status}) without the guest reaching its exit marker\n--- QEMU stderr ---\n{stderr}\n--- console tail ---\n{}", .output.console_tail(TAIL_LINES))]
    NoExit {
        status: String,
        stderr: String,
        output: Box<GuestOutput>,
    },
    #[error("{what} (timed out after {elapsed:?}, QEMU killed)\n--- QEMU stderr ---\n{stderr}\n--- console tail ---\n{}", .output.console_tail(TAIL_LINES))]
    Timeout {
        what: String,
        elapsed: Duration,
        stderr: String,
        output: Box<GuestOutput>,
    },
}

impl GuestError {
    pub fn output(&self) -> &GuestOutput {
        match self {
            GuestError::ScriptFailed { output, .. }
            | GuestError::NoExit { output, .. }
            | GuestError::Timeout { output, .. } => output,
        }
    }
}

impl Guest {
    pub fn builder(vmm: Vmm) -> GuestBuilder {
        GuestBuilder {
            vmm,
            smp: 2,
            mem_mib: 512,
            script: None,
            args: Vec::new(),
            chardevs: 0,
            append: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }

    pub fn vmm(&self) -> Vmm {
        self.vmm
    }

    /// The QEMU command line, for logs.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// QEMU's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The console so far.
    pub fn console(&self) -> &str {
        &self.console
    }

    /// Waits for a console line containing `needle` and returns it, so a test
    /// can act on the host mid-run (the script can `echo` a cue and then
    /// wait, e.g. for a file or a device). Fails if QEMU exits first or
    /// `timeout` (or the guest's overall timeout) passes; QEMU keeps running
    /// in that case until the guest is dropped.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let until = (Instant::now() + timeout).min(self.deadline);
        loop {
            let now = Instant::now();
            match self.lines.recv_timeout(until.saturating_duration_since(now)) {
                Ok((at, line)) => {
                    self.record(at, &line);
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "no console line with {needle:?} within {timeout:?}\n--- QEMU stderr ---\n{}\n--- console tail ---\n{}",
                    self.stderr_text(),
                    tail(&self.console, TAIL_LINES)
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.reap();
                    bail!(
                        "QEMU exited ({status}) before a console line with {needle:?}\n--- QEMU stderr ---\n{}\n--- console tail ---\n{}",
                        self.stderr_text(),
                        tail(&self.console, TAIL_LINES)
                    )
                }
            }
        }
    }

    /// Waits for the guest to power off. Ok only if the script (or, without
    /// one, the boot) exited 0; otherwise a [`GuestError`] (downcast the
    /// anyhow error to inspect it) whose message has the console's tail.
    pub fn wait(mut self) -> Result<GuestOutput> {
        loop {
            let now = Instant::now();
            match self
                .lines
                .recv_timeout(self.deadline.saturating_duration_since(now))
            {
                Ok((at, line)) => self.record(at, &line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    // Collect what the reader thread still has.
                    while let Ok((at, line)) = self.lines.try_recv() {
                        self.record(at, &line);
                    }
                    let what = match self.script_rc {
                        Some(_) => "the guest did not power off".to_string(),
                        None => "the guest did not finish".to_string(),
                    };
                    return Err(GuestError::Timeout {
                        what,
                        elapsed: self.started.elapsed(),
                        stderr: self.stderr_text(),
                        output: Box::new(self.output()),
                    }
                    .into());
                }
            }
        }
        let status = self.reap();
        let output = self.output();
        match output.script_rc {
            Some(0) => Ok(output),
            Some(rc) => Err(GuestError::ScriptFailed {
                rc,
                output: Box::new(output),
            }
            .into()),
            None => Err(GuestError::NoExit {
                status,
                stderr: self.stderr_text(),
                output: Box::new(output),
            }
            .into()),
        }
    }

    fn record(&mut self, at: Instant, line: &str) {
        if self.ready_after.is_none() && line.contains(READY_MARKER) {
            self.ready_after = Some(at - self.started);
        }
        // Anywhere in the line: a kernel message may share it.
        let marker = format!("{EXIT_MARKER} rc=");
        if let Some(at) = line.rfind(&marker) {
            let digits: String = line[at + marker.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '-')
                .collect();
            self.script_rc = digits.parse().ok();
        }
        self.console.push_str(line);
        self.console.push('\n');
    }

    fn output(&self) -> GuestOutput {
        GuestOutput {
            console: self.console.clone(),
            script_rc: self.script_rc,
            boot_time: self.ready_after,
            elapsed: self.started.elapsed(),
        }
    }

    fn stderr_text(&self) -> String {
        // The reader thread may still be draining the pipe after QEMU died.
        thread::sleep(Duration::from_millis(20));
        let text = self
            .stderr
            .lock()
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if text.is_empty() {
            "(empty)".to_string()
        } else {
            text
        }
    }

    /// Waits for QEMU's exit; returns its status as text.
    fn reap(&mut self) -> String {
        match self.child.take() {
            Some(mut c) => match c.wait() {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            },
            None => "already reaped".into(),
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}
