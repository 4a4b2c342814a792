//! Instances: QEMU guests the daemon launches with the cards' vhost-user
//! and vfio-user devices (or an existing VMM registered by its QMP socket),
//! and volume hot-plug on them over QMP.
//!
//! Volumes sit on PCIe root ports of their own (a q35 root complex takes
//! no hot-plug), so any volume can be detached and a few spare ports take
//! volumes attached later.

use crate::cpio::CpioWriter;
use crate::qmp::{QmpClient, QmpError};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Spare root ports a launched instance gets for hot-plugged volumes.
pub const DEFAULT_HOTPLUG_SLOTS: u8 = 4;

/// How long QEMU may take to open its QMP socket after it starts.
const QMP_STARTUP: Duration = Duration::from_secs(15);

/// A volume: a block card's vhost-user-blk socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttachment {
    /// `vol-…`; names the QEMU device (`blk-<id>`) and chardev (`chr-<id>`).
    pub id: String,
    pub socket: PathBuf,
    pub num_queues: u16,
}

/// An ENI: a port of the networking card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicAttachment {
    /// `eni-…`; names the QEMU device (`net-<id>`).
    pub id: String,
    pub socket: PathBuf,
    pub mac: String,
    /// Queue pairs.
    pub queues: u16,
}

/// An instance-store NVMe controller: the NVMe card's vfio-user socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeAttachment {
    /// Names the QEMU device (`nvme-<id>`).
    pub id: String,
    pub socket: PathBuf,
}

/// Everything needed to launch an instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// `i-…`.
    pub id: String,
    /// `qemu-system-x86_64`. One inside an unpacked distribution tree
    /// (`<root>/usr/bin/…` beside `<root>/lib64/ld-linux-x86-64.so.2`, as
    /// QEMU 11 under `target/cardsim/qemu-11`) runs through that tree's own
    /// loader and libraries.
    pub vmm: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// A shell script the guest runs: appended to the initramfs as
    /// `/cardsim/script.sh`.
    pub user_data: Option<String>,
    pub volumes: Vec<VolumeAttachment>,
    pub enis: Vec<NicAttachment>,
    pub namespaces: Vec<NvmeAttachment>,
    /// Holds the QMP socket, the console log, QEMU's log, its pid file and
    /// the instance's initramfs. Created if missing.
    pub run_dir: PathBuf,
    /// Spare root ports for volumes attached later.
    pub hotplug_slots: u8,
    pub accel: Accel,
}

/// How QEMU runs the guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// Emulation: slow, but needs nothing from the host (and is what runs
    /// where /dev/kvm is missing or unusable, as under nested
    /// virtualization).
    Tcg,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("instance {instance}: {what}: {source}")]
    Io {
        instance: String,
        what: String,
        source: io::Error,
    },
    #[error("instance {instance}: invalid spec: {detail}")]
    InvalidSpec { instance: String, detail: String },
    #[error("instance {instance}: {vmm} is QEMU {found}, {feature} needs QEMU {needs} or later")]
    Unsupported {
        instance: String,
        vmm: String,
        found: String,
        feature: String,
        needs: String,
    },
    #[error("instance {instance}: QEMU did not start: {reason}\n--- QEMU log ---\n{log}")]
    StartFailed {
        instance: String,
        reason: String,
        log: String,
    },
    #[error("instance {instance}: QEMU has exited ({status})")]
    Exited { instance: String, status: String },
    #[error("instance {instance}: device {device}: {source}")]
    Qmp {
        instance: String,
        device: String,
        source: QmpError,
    },
    #[error("instance {instance}: device {device} is already attached")]
    AlreadyAttached { instance: String, device: String },
    #[error("instance {instance}: device {device} is not attached")]
    NotAttached { instance: String, device: String },
    /// Nothing serves the card's socket: QEMU would wait for it forever
    /// (a reconnecting chardev retries without end), so it is not asked.
    #[error("instance {instance}: device {device}: nothing serves {socket}: {reason}")]
    CardNotServing {
        instance: String,
        device: String,
        socket: PathBuf,
        reason: String,
    },
    #[error("instance {instance}: no free hot-plug slot for {device} ({slots} in all)")]
    NoFreeSlot {
        instance: String,
        device: String,
        slots: usize,
    },
}

/// What `query-status` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// QEMU's run state: `running`, `paused`, `shutdown`, `prelaunch`, …
    pub status: String,
    pub running: bool,
}

/// The QEMU device id of a volume.
pub fn volume_device_id(volume: &str) -> String {
    format!("blk-{volume}")
}

fn volume_chardev_id(volume: &str) -> String {
    format!("chr-{volume}")
}

/// QEMU ids: a letter, then letters, digits, `-`, `.`, `_`. Checked here so
/// a bad id is refused before QEMU sees it.
fn check_id(instance: &str, kind: &str, id: &str) -> Result<(), InstanceError> {
    let ok = id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(InstanceError::InvalidSpec {
            instance: instance.into(),
            detail: format!(
                "{kind} id {id:?}: a letter, then letters, digits, '-', '.' or '_' (at most 64)"
            ),
        })
    }
}

/// A socket path goes into a `key=value,…` option: a comma would start the
/// next option.
fn check_path(instance: &str, what: &str, path: &Path) -> Result<String, InstanceError> {
    let text = path.to_str().ok_or_else(|| InstanceError::InvalidSpec {
        instance: instance.into(),
        detail: format!("{what} {path:?} is not UTF-8"),
    })?;
    if text.contains(',') || text.is_empty() {
        return Err(InstanceError::InvalidSpec {
            instance: instance.into(),
            detail: format!("{what} {text:?} is empty or contains a comma"),
        });
    }
    Ok(text.to_string())
}

/// `02:00:0a:00:01:0a`: six hex pairs, the multicast bit clear.
fn is_unicast_mac(mac: &str) -> bool {
    let pairs: Vec<&str> = mac.split(':').collect();
    pairs.len() == 6
        && pairs
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(pairs[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// A QEMU binary and the version it reports, which decides option
/// spellings and what it supports.
#[derive(Debug, Clone)]
pub struct VmmBinary {
    pub binary: PathBuf,
    pub version: (u32, u32),
}

impl VmmBinary {
    /// Runs `--version` once.
    pub fn probe(binary: &Path) -> io::Result<Self> {
        let out = Self::command_for(binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = parse_qemu_version(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} --version printed no QEMU version: {}{}",
                    binary.display(),
                    text.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            )
        })?;
        Ok(Self {
            binary: binary.to_path_buf(),
            version,
        })
    }

    /// A command running this QEMU; add arguments.
    pub fn command(&self) -> Command {
        Self::command_for(&self.binary)
    }

    fn command_for(binary: &Path) -> Command {
        // <root>/usr/bin/qemu-system-x86_64 beside <root>/lib64/ld-linux…:
        // run through the tree's loader so its libraries are used, and point
        // QEMU at the tree's firmware and modules.
        let root = binary
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent);
        let loader = root.map(|r| r.join("lib64/ld-linux-x86-64.so.2"));
        match (root, loader) {
            (Some(root), Some(loader)) if loader.is_file() => {
                let mut cmd = Command::new(loader);
                cmd.arg("--library-path")
                    .arg(format!(
                        "{}:{}",
                        root.join("lib/x86_64-linux-gnu").display(),
                        root.join("usr/lib/x86_64-linux-gnu").display()
                    ))
                    .arg(binary)
                    .arg("-L")
                    .arg(root.join("usr/share/qemu"))
                    .arg("-L")
                    .arg(root.join("usr/share/seabios"))
                    .env(
                        "QEMU_MODULE_DIR",
                        root.join("usr/lib/x86_64-linux-gnu/qemu"),
                    );
                cmd
            }
            _ => Command::new(binary),
        }
    }

    /// The `-chardev socket` option that makes QEMU reconnect to a
    /// restarted card: 9.2 added `reconnect-ms`, 10.0 dropped `reconnect`.
    pub fn reconnect_option(&self) -> &'static str {
        if self.version >= (9, 2) {
            "reconnect-ms=50"
        } else {
            "reconnect=1"
        }
    }

    /// MSI-X vectors for a vhost-user-net device: QEMU 7.2 under TCG
    /// crashes in vhost_net_start with MSI-X, so it gets INTx (0).
    fn net_vectors(&self, queues: u16) -> u32 {
        if self.version >= (11, 0) {
            2 * u32::from(queues) + 2
        } else {
            0
        }
    }

    fn version_text(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }
}

/// "QEMU emulator version 7.2.19 (Debian …)" → (7, 2).
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find("version ")? + "version ".len()..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Copies `base` to `dest` and appends, when there is one, a second newc
/// archive holding `script` as `/cardsim/script.sh`: the kernel unpacks
/// concatenated archives in order.
pub fn write_initramfs(base: &Path, script: Option<&str>, dest: &Path) -> io::Result<()> {
    fs::copy(base, dest)?;
    if let Some(script) = script {
        let file = fs::OpenOptions::new().append(true).open(dest)?;
        let mut w = CpioWriter::new(io::BufWriter::new(file));
        w.dir("cardsim", 0o755)?;
        w.file("cardsim/script.sh", 0o755, script.as_bytes())?;
        w.finish()?.flush()?;
    }
    Ok(())
}

/// A running instance.
pub struct Instance {
    id: String,
    qmp: QmpClient,
    qmp_socket: PathBuf,
    /// Only for an instance we launched.
    child: Option<Child>,
    vmm: Option<VmmBinary>,
    console_log: Option<PathBuf>,
    /// The root ports volumes may use, for an instance we launched; a
    /// registered VMM's are whatever root ports it has.
    ports: Option<BTreeSet<String>>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("id", &self.id)
            .field("qmp_socket", &self.qmp_socket)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Starts QEMU with the spec's devices and connects to its QMP socket.
    pub fn launch(spec: InstanceSpec) -> Result<Instance, InstanceError> {
        let id = spec.id.clone();
        let io_err = |what: String| {
            let id = id.clone();
            move |source| InstanceError::Io {
                instance: id,
                what,
                source,
            }
        };
        let invalid = |detail: String| InstanceError::InvalidSpec {
            instance: id.clone(),
            detail,
        };
        check_id(&id, "instance", &id)?;
        if spec.vcpus == 0 || spec.memory_mib < 64 {
            return Err(invalid(format!(
                "{} vCPUs and {} MiB: at least 1 vCPU and 64 MiB",
                spec.vcpus, spec.memory_mib
            )));
        }
        let mut ids = std::collections::HashSet::new();
        for vid in spec
            .volumes
            .iter()
            .map(|v| &v.id)
            .chain(spec.enis.iter().map(|n| &n.id))
            .chain(spec.namespaces.iter().map(|n| &n.id))
        {
            check_id(&id, "device", vid)?;
            if !ids.insert(vid) {
                return Err(invalid(format!("device id {vid} appears twice")));
            }
        }
        for v in &spec.volumes {
            check_path(&id, "volume socket", &v.socket)?;
            if v.num_queues == 0 {
                return Err(invalid(format!(
                    "volume {}: num_queues must be at least 1",
                    v.id
                )));
            }
        }
        for n in &spec.enis {
            check_path(&id, "ENI socket", &n.socket)?;
            if n.queues == 0 {
                return Err(invalid(format!("ENI {}: queues must be at least 1", n.id)));
            }
            if !is_unicast_mac(&n.mac) {
                return Err(invalid(format!(
                    "ENI {}: MAC {:?} is not a unicast MAC (six hex pairs with ':')",
                    n.id, n.mac
                )));
            }
        }
        for ns in &spec.namespaces {
            check_path(&id, "NVMe socket", &ns.socket)?;
        }
        check_path(&id, "run_dir", &spec.run_dir)?;
        // QEMU would wait for a volume's card forever, before its QMP
        // socket even answers.
        for v in &spec.volumes {
            if let Err(e) = std::os::unix::net::UnixStream::connect(&v.socket) {
                return Err(InstanceError::CardNotServing {
                    instance: id.clone(),
                    device: volume_device_id(&v.id),
                    socket: v.socket.clone(),
                    reason: e.to_string(),
                });
            }
        }
        let vmm = VmmBinary::probe(&spec.vmm)
            .map_err(io_err(format!("probing {}", spec.vmm.display())))?;
        if !spec.namespaces.is_empty() && vmm.version < (10, 1) {
            return Err(InstanceError::Unsupported {
                instance: id.clone(),
                vmm: spec.vmm.display().to_string(),
                found: vmm.version_text(),
                feature: "an NVMe namespace (vfio-user-pci)".into(),
                needs: "10.1".into(),
            });
        }

        fs::create_dir_all(&spec.run_dir)
            .map_err(io_err(format!("creating {}", spec.run_dir.display())))?;
        let qmp_socket = spec.run_dir.join("qmp.sock");
        let console_log = spec.run_dir.join("console.log");
        let qemu_log = spec.run_dir.join("qemu.log");
        let pid_file = spec.run_dir.join("qemu.pid");
        let initramfs = spec.run_dir.join("initramfs.cpio");
        // A stale socket from an earlier run would be connected to before
        // QEMU binds the new one.
        let _ = fs::remove_file(&qmp_socket);
        write_initramfs(&spec.initrd, spec.user_data.as_deref(), &initramfs)
            .map_err(io_err(format!("writing {}", initramfs.display())))?;

        let mut cmd = vmm.command();
        let mem = format!("{}M", spec.memory_mib);
        cmd.args(["-name", &id, "-nodefaults", "-no-user-config"])
            .args(["-display", "none"])
            .args(["-accel", spec.accel.as_str()])
            .args(["-machine", "q35", "-cpu", "max"])
            .args(["-smp", &spec.vcpus.to_string()])
            // Shared guest memory so the cards can map it.
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem", "-m", &mem])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", &spec.cmdline])
            .arg("-serial")
            .arg(format!(
                "file:{}",
                check_path(&id, "run_dir", &console_log)?
            ))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                check_path(&id, "run_dir", &qmp_socket)?
            ))
            .arg("-pidfile")
            .arg(&pid_file);

        let mut ports = BTreeSet::new();
        let mut chassis = 0u32;
        let mut root_port = |cmd: &mut Command| {
            chassis += 1;
            let port = format!("rp{chassis}");
            cmd.arg("-device").arg(format!(
                "pcie-root-port,id={port},chassis={chassis},slot={chassis}"
            ));
            port
        };
        for v in &spec.volumes {
            let socket = check_path(&id, "volume socket", &v.socket)?;
            let port = root_port(&mut cmd);
            let chr = volume_chardev_id(&v.id);
            let dev = volume_device_id(&v.id);
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id={chr},path={socket},{}",
                    vmm.reconnect_option()
                ))
                .arg("-device")
                .arg(format!(
                    "vhost-user-blk-pci,id={dev},chardev={chr},num-queues={},bus={port}",
                    v.num_queues
                ));
            ports.insert(port);
        }
        for _ in 0..spec.hotplug_slots {
            ports.insert(root_port(&mut cmd));
        }
        for n in &spec.enis {
            let socket = check_path(&id, "ENI socket", &n.socket)?;
            let mq = if n.queues > 1 { ",mq=on" } else { "" };
            cmd.arg("-chardev")
                // Reconnecting, as a volume's: the networking card can be
                // restarted (or updated) under the guest.
                .arg(format!(
                    "socket,id=chr-{},path={socket},{}",
                    n.id,
                    vmm.reconnect_option()
                ))
                .arg("-netdev")
                .arg(format!(
                    "vhost-user,id=netdev-{0},chardev=chr-{0},queues={1}",
                    n.id, n.queues
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,id=net-{0},netdev=netdev-{0},mac={1}{mq},vectors={2}",
                    n.id,
                    n.mac,
                    vmm.net_vectors(n.queues)
                ));
        }
        for ns in &spec.namespaces {
            let socket = check_path(&id, "NVMe socket", &ns.socket)?;
            cmd.arg("-device").arg(
                json!({
                    "driver": "vfio-user-pci",
                    "id": format!("nvme-{}", ns.id),
                    "socket": {"path": socket, "type": "unix"},
                })
                .to_string(),
            );
        }

        let log = fs::File::create(&qemu_log)
            .map_err(io_err(format!("creating {}", qemu_log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err(format!("opening {}", qemu_log.display())))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        tracing::info!(instance = %id, command = ?cmd, "launching QEMU");
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", spec.vmm.display())))?;

        let qmp = match connect_while_alive(&qmp_socket, &mut child) {
            Ok(qmp) => qmp,
            Err(reason) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(InstanceError::StartFailed {
                    instance: id.clone(),
                    reason,
                    log: fs::read_to_string(&qemu_log).unwrap_or_default(),
                });
            }
        };
        Ok(Instance {
            id,
            qmp,
            qmp_socket,
            child: Some(child),
            vmm: Some(vmm),
            console_log: Some(console_log),
            ports: Some(ports),
        })
    }

    /// An instance whose VMM someone else started: only QMP operations.
    /// Volumes are hot-plugged without naming a bus, so its machine must
    /// take hot-plug on its default bus.
    pub fn register(id: &str, qmp_socket: &Path) -> Result<Instance, InstanceError> {
        check_id(id, "instance", id)?;
        let qmp =
            QmpClient::connect(qmp_socket, QMP_STARTUP).map_err(|source| InstanceError::Qmp {
                instance: id.into(),
                device: "qmp".into(),
                source,
            })?;
        Ok(Instance {
            id: id.into(),
            qmp,
            qmp_socket: qmp_socket.to_path_buf(),
            child: None,
            vmm: None,
            console_log: None,
            ports: None,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// QEMU's pid, for an instance we launched and that still runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The serial console's file, for an instance we launched.
    pub fn console_log(&self) -> Option<&Path> {
        self.console_log.as_deref()
    }

    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// The QMP session, for commands this type has no method for.
    pub fn qmp(&mut self) -> &mut QmpClient {
        &mut self.qmp
    }

    /// QEMU's run state.
    pub fn status(&mut self) -> Result<VmStatus, InstanceError> {
        self.check_alive()?;
        let v = self.execute("instance", "query-status", json!({}))?;
        Ok(VmStatus {
            status: v["status"].as_str().unwrap_or("unknown").to_string(),
            running: v["running"].as_bool().unwrap_or(false),
        })
    }

    /// Device ids of everything attached with an id (`qom-list
    /// /machine/peripheral`): what QEMU has, not what we think it has.
    pub fn devices(&mut self) -> Result<Vec<String>, InstanceError> {
        let list = self.execute(
            "instance",
            "qom-list",
            json!({"path": "/machine/peripheral"}),
        )?;
        Ok(list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Hot-plugs a volume: a reconnecting chardev to the card's socket,
    /// then a vhost-user-blk-pci device on a free root port. On failure
    /// whatever was added is removed again.
    pub fn attach_volume(&mut self, volume: &VolumeAttachment) -> Result<(), InstanceError> {
        check_id(&self.id, "volume", &volume.id)?;
        let socket = check_path(&self.id, "volume socket", &volume.socket)?;
        if volume.num_queues == 0 {
            return Err(InstanceError::InvalidSpec {
                instance: self.id.clone(),
                detail: format!("volume {}: num_queues must be at least 1", volume.id),
            });
        }
        self.check_alive()?;
        let dev = volume_device_id(&volume.id);
        let chr = volume_chardev_id(&volume.id);
        if self.devices()?.contains(&dev) {
            return Err(InstanceError::AlreadyAttached {
                instance: self.id.clone(),
                device: dev,
            });
        }
        let port = self.free_port(&dev)?;
        // The card's socket must answer now: QEMU's device_add waits for the
        // chardev to connect, retrying forever, and would hang its monitor.
        // (The card accepts the probe as a frontend that leaves at once.)
        if let Err(e) = std::os::unix::net::UnixStream::connect(&volume.socket) {
            return Err(InstanceError::CardNotServing {
                instance: self.id.clone(),
                device: dev,
                socket: volume.socket.clone(),
                reason: e.to_string(),
            });
        }

        let reconnect_ms = match &self.vmm {
            Some(vmm) => vmm.version >= (9, 2),
            None => self.qmp.qemu_version().is_some_and(|v| v >= (9, 2)),
        };
        let mut backend = json!({
            "addr": {"type": "unix", "data": {"path": socket}},
            "server": false,
        });
        if reconnect_ms {
            backend["reconnect-ms"] = json!(50);
        } else {
            backend["reconnect"] = json!(1);
        }
        self.execute(
            &dev,
            "chardev-add",
            json!({"id": chr, "backend": {"type": "socket", "data": backend}}),
        )?;
        let mut args = json!({
            "driver": "vhost-user-blk-pci",
            "id": dev,
            "chardev": chr,
            "num-queues": volume.num_queues,
        });
        if let Some(port) = &port {
            args["bus"] = json!(port);
        }
        if let Err(e) = self.execute(&dev, "device_add", args) {
            if let Err(undo) = self.execute(&dev, "chardev-remove", json!({"id": chr})) {
                tracing::warn!(instance = %self.id, error = %undo, "removing the chardev of a failed attach");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Hot-unplugs a volume: `device_del`, then waits (up to `timeout`) for
    /// the guest to let go (DEVICE_DELETED), then removes the chardev.
    pub fn detach_volume(
        &mut self,
        volume_id: &str,
        timeout: Duration,
    ) -> Result<(), InstanceError> {
        check_id(&self.id, "volume", volume_id)?;
        self.check_alive()?;
        let dev = volume_device_id(volume_id);
        if !self.devices()?.contains(&dev) {
            return Err(InstanceError::NotAttached {
                instance: self.id.clone(),
                device: dev,
            });
        }
        let is_this = |dev: String| {
            move |data: &Value| data.get("device").and_then(Value::as_str) == Some(dev.as_str())
        };
        self.qmp
            .discard_events("DEVICE_DELETED", is_this(dev.clone()));
        self.execute(&dev, "device_del", json!({"id": dev}))?;
        self.qmp
            .wait_event("DEVICE_DELETED", is_this(dev.clone()), timeout)
            .map_err(|source| InstanceError::Qmp {
                instance: self.id.clone(),
                device: dev.clone(),
                source,
            })?;
        self.execute(
            &dev,
            "chardev-remove",
            json!({"id": volume_chardev_id(volume_id)}),
        )?;
        Ok(())
    }

    /// A root port with nothing behind it for `device`, read from QEMU's
    /// object tree, so a port the guest emptied by itself is free again.
    /// (`query-pci` cannot tell: it walks the bus numbers the guest's
    /// firmware assigned, none before it ran.) None when the VMM has no root
    /// ports at all: QEMU then picks the bus.
    fn free_port(&mut self, device: &str) -> Result<Option<String>, InstanceError> {
        let peripherals =
            self.execute(device, "qom-list", json!({"path": "/machine/peripheral"}))?;
        let mut ports: Vec<String> = children_of_type(&peripherals, "pcie-root-port");
        if let Some(ours) = &self.ports {
            ports.retain(|id| ours.contains(id));
        }
        if ports.is_empty() {
            return Ok(None);
        }
        for port in &ports {
            // A root port's secondary bus is named after the port; each
            // device on it is a `child[N]` link of the bus.
            let bus = self.execute(
                device,
                "qom-list",
                json!({"path": format!("/machine/peripheral/{port}/{port}")}),
            )?;
            let occupied = bus
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"].as_str().is_some_and(|n| n.starts_with("child[")));
            if !occupied {
                return Ok(Some(port.clone()));
            }
        }
        Err(InstanceError::NoFreeSlot {
            instance: self.id.clone(),
            device: device.into(),
            slots: ports.len(),
        })
    }

    /// Asks the guest to power off (ACPI); past `timeout`, tells QEMU to
    /// quit, and kills a launched QEMU that still does not exit.
    pub fn stop(&mut self, timeout: Duration) -> Result<(), InstanceError> {
        if self.exit_status().is_some() {
            return Ok(());
        }
        let _ = self.qmp.execute("system_powerdown", json!({}));
        let deadline = Instant::now() + timeout;
        if self.child.is_some() {
            while Instant::now() < deadline {
                if self.exit_status().is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        } else if self.qmp.wait_event("SHUTDOWN", |_| true, timeout).is_ok() {
            return Ok(());
        }
        tracing::info!(instance = %self.id, "the guest did not power off; quitting QEMU");
        // QEMU may exit before it answers quit.
        let _ = self.qmp.execute("quit", json!({}));
        if let Some(child) = self.child.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Lets go of the instance without stopping it: a launched QEMU keeps
    /// running, to be found again by [`Instance::register`] on its QMP
    /// socket (a daemon restart).
    pub fn release(mut self) {
        // A Child dropped without kill() leaves its process alone.
        self.child = None;
    }

    /// How a launched QEMU exited, once it has (reaps it).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn check_alive(&mut self) -> Result<(), InstanceError> {
        match self.exit_status() {
            Some(status) => Err(InstanceError::Exited {
                instance: self.id.clone(),
                status: status.to_string(),
            }),
            None => Ok(()),
        }
    }

    fn execute(
        &mut self,
        device: &str,
        command: &str,
        args: Value,
    ) -> Result<Value, InstanceError> {
        self.qmp
            .execute(command, args)
            .map_err(|source| InstanceError::Qmp {
                instance: self.id.clone(),
                device: device.into(),
                source,
            })
    }
}

impl Drop for Instance {
    /// A launched QEMU does not outlive its handle: the daemon stops
    /// instances explicitly, and a test that fails leaves none behind.
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The names of a `qom-list` answer's children of QOM type `type_name`.
fn children_of_type(list: &Value, type_name: &str) -> Vec<String> {
    let want = format!("child<{type_name}>");
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"].as_str() == Some(want.as_str()))
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

/// Connects to the QMP socket of a QEMU that is starting; the error says
/// why not (it exited first, or its QMP did not answer).
fn connect_while_alive(socket: &Path, child: &mut Child) -> Result<QmpClient, String> {
    let deadline = Instant::now() + QMP_STARTUP;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("QEMU exited ({status})"));
        }
        if socket.exists() {
            match QmpClient::connect(socket, QMP_STARTUP) {
                Ok(qmp) => return Ok(qmp),
                Err(QmpError::Connect { .. }) => {}
                // QEMU dying while we connect looks like this.
                Err(e) => return Err(format!("QMP failed: {e}")),
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no QMP socket after {QMP_STARTUP:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_are_read_from_version_output() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)\n"),
            Some((7, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 11.1.0 (Debian 1:11.1+ds-1~bpo13+1)"),
            Some((11, 1))
        );
        assert_eq!(parse_qemu_version("something else"), None);
    }

    #[test]
    fn reconnect_and_vectors_follow_the_version() {
        let vmm = |v| VmmBinary {
            binary: "qemu".into(),
            version: v,
        };
        assert_eq!(vmm((7, 2)).reconnect_option(), "reconnect=1");
        assert_eq!(vmm((11, 1)).reconnect_option(), "reconnect-ms=50");
        assert_eq!(vmm((7, 2)).net_vectors(2), 0);
        assert_eq!(vmm((11, 1)).net_vectors(2), 6);
    }

    #[test]
    fn device_ids_are_checked_before_qemu_sees_them() {
        assert!(check_id("i-1", "volume", "vol-0abc").is_ok());
        for bad in ["", "0vol", "vol,x", "vol=1", "vol 1", &"v".repeat(65)] {
            assert!(check_id("i-1", "volume", bad).is_err(), "{bad:?}");
        }
        assert!(check_path("i-1", "socket", Path::new("/run/a,b.sock")).is_err());
        assert!(check_path("i-1", "socket", Path::new("/run/a.sock")).is_ok());
        assert!(is_unicast_mac("02:00:0a:00:01:0a"));
        for bad in [
            "01:00:0a:00:01:0a",
            "02:00:0a:00:01",
            "02:00:0a:00:01:0g",
            "02-00-0a-00-01-0a",
        ] {
            assert!(!is_unicast_mac(bad), "{bad}");
        }
    }

    /// A VMM someone else started: the host's QEMU with no machine, so
    /// every device_add fails, which shows what a failed attach leaves.
    #[test]
    fn a_registered_vmm_takes_qmp_operations_and_a_failed_attach_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("the host's qemu-system-x86_64 (cargo xtask deps)");
        let mut child = Reap(child);
        wait_for(&sock);

        assert!(matches!(
            Instance::register("i-bad,id", &sock),
            Err(InstanceError::InvalidSpec { .. })
        ));
        let mut vm = Instance::register("i-0abc", &sock).unwrap();
        assert_eq!(vm.pid(), None);
        assert!(vm.status().unwrap().running);
        let chardevs = vm.qmp().execute("query-chardev", json!({})).unwrap();
        let volume = VolumeAttachment {
            id: "vol-0abc".into(),
            socket: dir.path().join("vol.sock"),
            num_queues: 1,
        };
        // Something must answer on the volume's socket for QEMU to be asked;
        // device_add fails anyway (no PCI bus), before any vhost-user talk.
        let _listener = std::os::unix::net::UnixListener::bind(&volume.socket).unwrap();
        match vm.attach_volume(&volume) {
            Err(InstanceError::Qmp { device, source, .. }) => {
                assert_eq!(device, "blk-vol-0abc");
                assert!(
                    matches!(&source, QmpError::Command { command, .. } if command == "device_add"),
                    "{source}"
                );
            }
            other => panic!("{other:?}"),
        }
        // The chardev added before device_add failed is gone again.
        assert_eq!(
            vm.qmp().execute("query-chardev", json!({})).unwrap(),
            chardevs
        );
        assert!(matches!(
            vm.detach_volume("vol-0abc", Duration::from_secs(1)),
            Err(InstanceError::NotAttached { .. })
        ));
        // No guest to power off: QEMU is told to quit.
        vm.stop(Duration::from_millis(500)).unwrap();
        assert!(child.0.wait().is_ok());
        assert!(vm.status().is_err());
    }

    /// Free and used root ports, as a real q35 QEMU reports them.
    #[test]
    fn a_free_root_port_is_found_in_qemus_object_tree() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-S", "-nodefaults", "-display", "none"])
            .args(["-device", "pcie-root-port,id=rp1,chassis=1"])
            .args(["-device", "pcie-root-port,id=rp2,chassis=2"])
            .args(["-device", "virtio-rng-pci,id=rng,bus=rp1"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("the host's qemu-system-x86_64 (cargo xtask deps)");
        let _reap = Reap(child);
        wait_for(&sock);
        let mut vm = Instance::register("i-0abc", &sock).unwrap();
        assert_eq!(vm.free_port("blk-x").unwrap(), Some("rp2".into()));
        vm.ports = Some(["rp1".to_string()].into());
        assert!(matches!(
            vm.free_port("blk-x"),
            Err(InstanceError::NoFreeSlot { slots: 1, .. })
        ));
        vm.ports = Some(BTreeSet::new());
        assert_eq!(vm.free_port("blk-x").unwrap(), None);
    }

    /// Kills a QEMU a test started, also when the test fails.
    struct Reap(Child);

    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn wait_for(sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn user_data_is_appended_as_a_second_archive() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.cpio");
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let base_bytes = w.finish().unwrap();
        fs::write(&base, &base_bytes).unwrap();
        let dest = dir.path().join("out.cpio");
        write_initramfs(&base, Some("echo hi"), &dest).unwrap();
        let out = fs::read(&dest).unwrap();
        assert_eq!(&out[..base_bytes.len()], &base_bytes[..]);
        let tail = String::from_utf8_lossy(&out[base_bytes.len()..]);
        assert!(tail.contains("cardsim/script.sh"), "{tail}");
        assert!(tail.contains("echo hi"), "{tail}");
        write_initramfs(&base, None, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), base_bytes);
    }
}
