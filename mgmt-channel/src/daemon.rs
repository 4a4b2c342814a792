//! The control plane's operations, independent of HTTP: each checks the
//! whole request against the current state first, then acts on the cards
//! and VMMs, then records the new desired state. A request refused at any
//! check changes nothing.
//!
//! Locks: `ops` serializes every mutation (so a check and the change it
//! guards are one step); `store` is held only for single database calls,
//! so describes and lists are answered while a mutation waits on a guest.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use card_firmware::agent::{AgentClient, AgentError};
use card_firmware::boot::{
    public_key_hex, verify_image, MeasuredBootLog, TrustedKeys, VerifiedImage,
};
use host_runtime::card::{
    CardEvent, CardEventKind, CardKind, CardPhase, CardProgram, CardSpec, Supervisor,
    SupervisorConfig,
};
use host_runtime::instance::{
    Accel, Instance as Vm, InstanceError, InstanceSpec, NicAttachment, NvmeAttachment,
    VolumeAttachment, DEFAULT_HOTPLUG_SLOTS,
};
use serde_json::json;

use crate::error::{ApiError, ErrorKind};
use crate::model::*;
use crate::netconfig;
use crate::store::Store;

/// How the daemon runs its cards and guests.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// Where the cards' programs come from.
    pub cards: CardSource,
    /// Run cards in their sandbox (seccomp, namespaces, uid change).
    pub card_sandbox: bool,
    /// `qemu-system-x86_64` for launched instances.
    pub vmm: PathBuf,
    /// KVM, or TCG where /dev/kvm is missing or unusable.
    pub accel: Accel,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The VPC every subnet lies in.
    pub vpc_cidr: Cidr,
    pub vni: u32,
    pub supervisor: SupervisorConfig,
}

/// Where the cards' programs come from.
#[derive(Debug, Clone)]
pub enum CardSource {
    /// `vhost-blk-backend`, `nvme-emulator` and `vhost-net-backend` as
    /// plain binaries in a folder: unverified, for development.
    Unverified { bin_dir: PathBuf },
    /// Only binaries of an image signed by one of `trusted`. The image in
    /// use is desired state; `initial_image` is run when none is recorded.
    Verified {
        trusted: TrustedKeys,
        initial_image: Option<PathBuf>,
    },
}

/// The setting that records the image in use.
const FIRMWARE_IMAGE: &str = "firmware_image";
/// The card binaries, by kind.
const CARD_BINARIES: [&str; 3] = ["vhost-blk-backend", "nvme-emulator", "vhost-net-backend"];

fn card_binary(kind: CardKind) -> &'static str {
    match kind {
        CardKind::Block => "vhost-blk-backend",
        CardKind::Nvme => "nvme-emulator",
        CardKind::Net => "vhost-net-backend",
    }
}

fn kind_name(kind: CardKind) -> &'static str {
    match kind {
        CardKind::Block => "block",
        CardKind::Nvme => "nvme",
        CardKind::Net => "net",
    }
}

fn phase_name(phase: CardPhase) -> &'static str {
    match phase {
        CardPhase::Starting => "starting",
        CardPhase::Healthy => "healthy",
        CardPhase::Unhealthy => "unhealthy",
        CardPhase::BackingOff => "backing-off",
        CardPhase::Stopped => "stopped",
    }
}

/// How long an agent call may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a card just started may take to answer on its agent socket.
const CARD_START: Duration = Duration::from_secs(15);
/// How long a guest may take to let go of a volume being detached.
const DETACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest may take to power off before QEMU is told to quit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The name of the one networking card: it serves every ENI on the host.
pub const NET_CARD: &str = "net";

pub struct Daemon {
    config: Config,
    store: Mutex<Store>,
    ops: Mutex<()>,
    vms: Mutex<BTreeMap<String, Vm>>,
    supervisor: Supervisor,
    /// The verified image new cards start from (verified mode).
    image: Mutex<Option<Arc<VerifiedImage>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn blk_card(volume: &str) -> String {
    format!("blk-{volume}")
}
fn nvme_card(namespace: &str) -> String {
    format!("nvme-{namespace}")
}

impl Daemon {
    /// Opens the state database, starts the event thread and brings every
    /// card and instance of the desired state back (reconcile).
    pub fn open(config: Config) -> anyhow::Result<Arc<Daemon>> {
        use anyhow::Context;
        for sub in ["volumes", "namespaces", "run", "logs", "instances"] {
            let dir = config.state_dir.join(sub);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let db = config.state_dir.join("state.db");
        let store = Store::open(&db).with_context(|| format!("opening {}", db.display()))?;
        let mut supervisor_config = config.supervisor.clone();
        let image = match &config.cards {
            CardSource::Unverified { bin_dir } => {
                tracing::warn!(dir = %bin_dir.display(), "cards run UNVERIFIED from plain binaries (development): give --trusted-keys to run only verified images");
                None
            }
            CardSource::Verified {
                trusted,
                initial_image,
            } => {
                let recorded = store.setting(FIRMWARE_IMAGE)?.map(PathBuf::from);
                if let (Some(recorded), Some(given)) = (&recorded, initial_image) {
                    if recorded != given {
                        tracing::warn!(recorded = %recorded.display(), given = %given.display(), "running the recorded image (the last firmware update's); --image is only the first one");
                    }
                }
                let dir = recorded
                    .or_else(|| initial_image.clone())
                    .context("no card image: give --image DIR (the state records none yet)")?;
                let image = verify_image(&dir, trusted)
                    .with_context(|| format!("card image {}", dir.display()))?;
                for binary in CARD_BINARIES {
                    if image.sha256(binary).is_none() {
                        tracing::warn!(binary, image = %dir.display(), "the image has no such card: its resources cannot be created");
                    }
                }
                store.set_setting(FIRMWARE_IMAGE, &dir.display().to_string())?;
                tracing::info!(image = %dir.display(), version = image.version(), "cards run only from this verified image");
                supervisor_config.boot_log =
                    Some(MeasuredBootLog::new(&config.state_dir.join("boot.log")));
                Some(Arc::new(image))
            }
        };
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let supervisor = Supervisor::with_config(events_tx, supervisor_config);
        let daemon = Arc::new(Daemon {
            config,
            store: Mutex::new(store),
            ops: Mutex::new(()),
            vms: Mutex::new(BTreeMap::new()),
            supervisor,
            image: Mutex::new(image),
        });
        let weak = Arc::downgrade(&daemon);
        std::thread::Builder::new()
            .name("card-events".into())
            .spawn(move || card_events(weak, events_rx))
            .context("spawning the card event thread")?;
        daemon.reconcile();
        Ok(daemon)
    }

    /// Starts every card the desired state names and finds every instance
    /// again. A card that fails to start is recorded and retried by the
    /// supervisor's backoff; the daemon serves regardless.
    fn reconcile(&self) {
        let _ops = lock(&self.ops);
        self.end_orphaned_cards();
        let run = || -> Result<(), ApiError> {
            for volume in self.store().list::<Volume>(Kind::Volume)? {
                if let Err(e) = self.start_blk_card(&volume) {
                    self.event(&volume.id, "card-failed", &e.message);
                }
            }
            for ns in self.store().list::<Namespace>(Kind::Namespace)? {
                if let Err(e) = self.start_nvme_card(&ns) {
                    self.event(&ns.id, "card-failed", &e.message);
                }
            }
            if let Err(e) = self.apply_net_config() {
                self.event(NET_CARD, "card-failed", &e.message);
            }
            for mut instance in self.store().list::<Instance>(Kind::Instance)? {
                match Vm::register(&instance.id, Path::new(&instance.qmp_socket)) {
                    Ok(vm) => {
                        lock(&self.vms).insert(instance.id.clone(), vm);
                        self.event(&instance.id, "registered", "found its VMM again");
                        if instance.state != "running" {
                            instance.state = "running".into();
                            self.store().put(Kind::Instance, &instance.id, &instance)?;
                        }
                    }
                    Err(e) => {
                        if instance.state != "stopped" {
                            instance.state = "stopped".into();
                            instance.pid = None;
                            self.store().put(Kind::Instance, &instance.id, &instance)?;
                        }
                        self.event(&instance.id, "stopped", &format!("its VMM is gone: {e}"));
                    }
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            tracing::error!(error = %e, "reconciling");
        }
    }

    /// Ends the cards a daemon that died without stopping them (SIGKILL)
    /// left running: each card's pid is kept in `run/<card>.pid`, and a
    /// process is ended only if its command line still names that card's
    /// agent socket (the pid may have been reused).
    fn end_orphaned_cards(&self) {
        let Ok(entries) = std::fs::read_dir(self.config.state_dir.join("run")) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pid") {
                continue;
            }
            let card = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let pid: Option<i32> = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .filter(|p| *p > 1);
            let _ = std::fs::remove_file(&path);
            let Some(pid) = pid else { continue };
            let agent = self.agent_socket(&card).display().to_string();
            let names_card = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|arg| arg == agent.as_bytes()))
                .unwrap_or(false);
            if !names_card {
                continue;
            }
            // SAFETY: kill(2) on a pid whose command line names our card.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists()
                && std::time::Instant::now() < deadline
            {
                // Gone, or a zombie of its old parent's reaper (init).
                if std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.event(
                &card,
                "card-orphan-ended",
                &format!("pid {pid} left by the last daemon"),
            );
        }
    }

    /// Remembers a card's pid, for [`Daemon::end_orphaned_cards`].
    fn record_card_pid(&self, card: &str, pid: Option<u32>) {
        let path = self.path("run", &format!("{card}.pid"));
        let result = match pid {
            Some(pid) => std::fs::write(&path, format!("{pid}\n")),
            None => std::fs::remove_file(&path).or(Ok(())),
        };
        if let Err(e) = result {
            tracing::warn!(card, error = %e, "recording a card's pid");
        }
    }

    /// Stops every card. Launched guests are left running (the next daemon
    /// finds them by their QMP sockets), as a card restart leaves them.
    pub fn shutdown(&self) {
        let vms = std::mem::take(&mut *lock(&self.vms));
        for (_, vm) in vms {
            std::mem::forget(vm);
        }
        for card in self.supervisor.list() {
            if let Err(e) = self.supervisor.stop(&card.name) {
                tracing::warn!(card = %card.name, error = %e, "stopping a card");
            }
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn event(&self, resource: &str, kind: &str, message: &str) {
        tracing::info!(resource, kind, message, "event");
        if let Err(e) = self.store().record_event(resource, kind, message) {
            tracing::error!(error = %e, "recording an event");
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, kind: Kind, id: &str) -> Result<T, ApiError> {
        self.store()
            .get(kind, id)?
            .ok_or_else(|| ApiError::not_found(kind.name(), id))
    }

    fn path(&self, sub: &str, name: &str) -> PathBuf {
        self.config.state_dir.join(sub).join(name)
    }

    /// What a card of `binary` runs: the current image's verified bytes,
    /// or (unverified mode) the plain binary.
    fn card_program(&self, binary: &str) -> Result<CardProgram, ApiError> {
        match &self.config.cards {
            CardSource::Unverified { bin_dir } => Ok(CardProgram::Binary(bin_dir.join(binary))),
            CardSource::Verified { .. } => {
                let image = lock(&self.image)
                    .clone()
                    .ok_or_else(|| ApiError::unavailable("no verified card image is loaded"))?;
                if image.sha256(binary).is_none() {
                    return Err(ApiError::unavailable(format!(
                        "card image {} (version {}) has no {binary}",
                        image.dir.display(),
                        image.version()
                    )));
                }
                Ok(CardProgram::Image {
                    image,
                    binary: binary.into(),
                })
            }
        }
    }

    /// A one-off command of a card binary (`--check-config`), from the
    /// same place its card would run from.
    fn card_command(&self, binary: &str) -> Result<std::process::Command, ApiError> {
        match self.card_program(binary)? {
            CardProgram::Image { image, binary } => image
                .command(&binary)
                .map_err(|e| ApiError::unavailable(e.to_string())),
            CardProgram::Binary(path) => Ok(std::process::Command::new(path)),
            CardProgram::Launcher(l) => Err(ApiError::internal(format!(
                "no one-off command for {}",
                l.describe()
            ))),
        }
    }

    fn card_args(&self, mut args: Vec<String>, agent: &Path) -> Vec<std::ffi::OsString> {
        args.push("--agent".into());
        args.push(agent.display().to_string());
        if !self.config.card_sandbox {
            args.push("--no-sandbox".into());
        }
        args.into_iter().map(Into::into).collect()
    }

    fn agent_socket(&self, card: &str) -> PathBuf {
        self.path("run", &format!("{card}.agent"))
    }

    /// Starts a card and waits until it answers; on failure it is stopped
    /// again, so a refused create leaves no process behind.
    fn start_card(&self, spec: CardSpec) -> Result<(), ApiError> {
        let name = spec.name.clone();
        // A card stopped by a crash of the last daemon left its sockets.
        let _ = std::fs::remove_file(&spec.agent_socket);
        self.supervisor
            .start(spec)
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        if let Err(e) = self.supervisor.wait_healthy(&name, CARD_START) {
            let _ = self.supervisor.stop(&name);
            return Err(ApiError::unavailable(format!(
                "{e} (log: {})",
                self.path("logs", &format!("{name}.log")).display()
            )));
        }
        Ok(())
    }

    fn agent_call(
        &self,
        card: &str,
        op: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, ApiError> {
        let socket = self.agent_socket(card);
        let mut client = AgentClient::connect(&socket, AGENT_TIMEOUT)
            .map_err(|e| ApiError::unavailable(format!("card {card}: {e}")))?;
        client.call(op, args).map_err(|e| match e {
            AgentError::Card { code, message } => {
                ApiError::unavailable(format!("card {card} refused {op}: {code}: {message}"))
            }
            other => ApiError::unavailable(format!("card {card}: {other}")),
        })
    }

    // ------------------------------------------------------------ volumes

    fn start_blk_card(&self, volume: &Volume) -> Result<(), ApiError> {
        let name = blk_card(&volume.id);
        let mut args = vec![
            "--socket".into(),
            volume.socket.clone(),
            "--backing".into(),
            self.path("volumes", &format!("{}.img", volume.id))
                .display()
                .to_string(),
            "--size".into(),
            volume.size_bytes.to_string(),
            "--volume-type".into(),
            volume.volume_type.to_string(),
        ];
        if let Some(iops) = volume.iops {
            args.extend(["--iops".into(), iops.to_string()]);
        }
        if let Some(t) = volume.throughput_mibps {
            args.extend(["--throughput".into(), t.to_string()]);
        }
        let agent = self.agent_socket(&name);
        let _ = std::fs::remove_file(&volume.socket);
        self.start_card(CardSpec {
            name: name.clone(),
            kind: CardKind::Block,
            program: self.card_program("vhost-blk-backend")?,
            args: self.card_args(args, &agent),
            agent_socket: agent,
            log: self.path("logs", &format!("{name}.log")),
        })
    }

    pub fn create_volume(&self, req: CreateVolume) -> Result<Volume, ApiError> {
        let _ops = lock(&self.ops);
        let id = new_id(Kind::Volume);
        let volume = Volume {
            socket: self
                .path("run", &format!("{id}.sock"))
                .display()
                .to_string(),
            id,
            size_bytes: req.size_bytes,
            volume_type: req.volume_type,
            iops: req.iops,
            throughput_mibps: req.throughput_mibps,
            state: "available".into(),
            attached_to: None,
            created_ms: now_ms(),
        };
        check_volume_spec(&volume.spec())?;
        let backing = self.path("volumes", &format!("{}.img", volume.id));
        create_sparse(&backing, volume.size_bytes)?;
        if let Err(e) = self.start_blk_card(&volume) {
            let _ = std::fs::remove_file(&backing);
            return Err(e);
        }
        self.store().put(Kind::Volume, &volume.id, &volume)?;
        self.event(
            &volume.id,
            "created",
            &format!("{} {} bytes", volume.volume_type, volume.size_bytes),
        );
        Ok(volume)
    }

    pub fn volume(&self, id: &str) -> Result<Volume, ApiError> {
        self.get(Kind::Volume, id)
    }

    pub fn volumes(&self) -> Result<Vec<Volume>, ApiError> {
        Ok(self.store().list(Kind::Volume)?)
    }

    pub fn delete_volume(&self, id: &str) -> Result<(), ApiError> {
        let _ops = lock(&self.ops);
        let volume: Volume = self.get(Kind::Volume, id)?;
        if let Some(instance) = &volume.attached_to {
            return Err(ApiError::conflict(format!(
                "volume {id} is attached to {instance}: detach it first"
            )));
        }
        self.stop_card(&blk_card(id));
        self.store().delete(id)?;
        let _ = std::fs::remove_file(self.path("volumes", &format!("{id}.img")));
        let _ = std::fs::remove_file(&volume.socket);
        self.event(id, "deleted", "");
        Ok(())
    }

    fn stop_card(&self, name: &str) {
        if let Err(e) = self.supervisor.stop(name) {
            tracing::debug!(card = name, error = %e, "stopping a card");
        }
    }

    /// modify-volume: checked as a whole spec, sent to the running card,
    /// then recorded.
    pub fn modify_volume(&self, id: &str, req: ModifyVolume) -> Result<Volume, ApiError> {
        let _ops = lock(&self.ops);
        let mut volume: Volume = self.get(Kind::Volume, id)?;
        if req.volume_type.is_none() && req.iops.is_none() && req.throughput_mibps.is_none() {
            return Err(ApiError::invalid(
                "volume_type",
                "give at least one of volume_type, iops, throughput_mibps",
            ));
        }
        if let Some(t) = req.volume_type {
            if t != volume.volume_type {
                // A new type starts from its own defaults unless told.
                volume.iops = None;
                volume.throughput_mibps = None;
            }
            volume.volume_type = t;
        }
        if req.iops.is_some() {
            volume.iops = req.iops;
        }
        if req.throughput_mibps.is_some() {
            volume.throughput_mibps = req.throughput_mibps;
        }
        check_volume_spec(&volume.spec())?;
        self.agent_call(&blk_card(id), "volume_modify", volume_modify_args(&volume))?;
        self.store().put(Kind::Volume, id, &volume)?;
        self.event(
            id,
            "modified",
            &format!(
                "{} iops={:?} throughput={:?}",
                volume.volume_type, volume.iops, volume.throughput_mibps
            ),
        );
        Ok(volume)
    }

    pub fn attach_volume(&self, id: &str, req: AttachVolume) -> Result<Volume, ApiError> {
        let _ops = lock(&self.ops);
        let mut volume: Volume = self.get(Kind::Volume, id)?;
        let mut instance: Instance = self
            .get(Kind::Instance, &req.instance_id)
            .map_err(|e| e.with_field("instance_id"))?;
        if let Some(other) = &volume.attached_to {
            return Err(ApiError::conflict(format!(
                "volume {id} is already attached to {other}"
            )));
        }
        let attachment = VolumeAttachment {
            id: id.to_string(),
            socket: PathBuf::from(&volume.socket),
            num_queues: 1,
        };
        {
            let mut vms = lock(&self.vms);
            let vm = vms.get_mut(&instance.id).ok_or_else(|| {
                ApiError::conflict(format!("instance {} is not running", instance.id))
            })?;
            vm.attach_volume(&attachment).map_err(vm_error)?;
        }
        volume.state = "in-use".into();
        volume.attached_to = Some(instance.id.clone());
        instance.volumes.push(id.to_string());
        let store = self.store();
        store.put(Kind::Volume, id, &volume)?;
        store.put(Kind::Instance, &instance.id, &instance)?;
        drop(store);
        self.event(id, "attached", &format!("to {}", instance.id));
        Ok(volume)
    }

    pub fn detach_volume(&self, id: &str) -> Result<Volume, ApiError> {
        let _ops = lock(&self.ops);
        let mut volume: Volume = self.get(Kind::Volume, id)?;
        let Some(instance_id) = volume.attached_to.clone() else {
            return Err(ApiError::conflict(format!("volume {id} is not attached")));
        };
        let mut instance: Instance = self.get(Kind::Instance, &instance_id)?;
        {
            let mut vms = lock(&self.vms);
            if let Some(vm) = vms.get_mut(&instance_id) {
                vm.detach_volume(id, DETACH_TIMEOUT).map_err(vm_error)?;
            }
            // A stopped instance holds nothing: the record alone changes.
        }
        volume.state = "available".into();
        volume.attached_to = None;
        instance.volumes.retain(|v| v != id);
        let store = self.store();
        store.put(Kind::Volume, id, &volume)?;
        store.put(Kind::Instance, &instance_id, &instance)?;
        drop(store);
        self.event(id, "detached", &format!("from {instance_id}"));
        Ok(volume)
    }

    // --------------------------------------------------------- namespaces

    fn start_nvme_card(&self, ns: &Namespace) -> Result<(), ApiError> {
        let name = nvme_card(&ns.id);
        let file = self.path("namespaces", &format!("{}.img", ns.id));
        let args = vec![
            "--socket".into(),
            ns.socket.clone(),
            "--namespace".into(),
            format!("{},size={}", file.display(), ns.size_bytes),
        ];
        let agent = self.agent_socket(&name);
        let _ = std::fs::remove_file(&ns.socket);
        self.start_card(CardSpec {
            name: name.clone(),
            kind: CardKind::Nvme,
            program: self.card_program("nvme-emulator")?,
            args: self.card_args(args, &agent),
            agent_socket: agent,
            log: self.path("logs", &format!("{name}.log")),
        })
    }

    pub fn create_namespace(&self, req: CreateNamespace) -> Result<Namespace, ApiError> {
        let _ops = lock(&self.ops);
        if !(NAMESPACE_MIN..=NAMESPACE_MAX).contains(&req.size_bytes) || req.size_bytes % 4096 != 0
        {
            return Err(ApiError::invalid(
                "size_bytes",
                format!(
                    "must be 1 MiB to 16 TiB and a multiple of 4096, got {}",
                    req.size_bytes
                ),
            ));
        }
        let id = new_id(Kind::Namespace);
        let ns = Namespace {
            socket: self
                .path("run", &format!("{id}.sock"))
                .display()
                .to_string(),
            id,
            size_bytes: req.size_bytes,
            state: "available".into(),
            attached_to: None,
            created_ms: now_ms(),
        };
        let file = self.path("namespaces", &format!("{}.img", ns.id));
        create_sparse(&file, ns.size_bytes)?;
        if let Err(e) = self.start_nvme_card(&ns) {
            let _ = std::fs::remove_file(&file);
            return Err(e);
        }
        self.store().put(Kind::Namespace, &ns.id, &ns)?;
        self.event(&ns.id, "created", &format!("{} bytes", ns.size_bytes));
        Ok(ns)
    }

    pub fn namespace(&self, id: &str) -> Result<Namespace, ApiError> {
        self.get(Kind::Namespace, id)
    }

    pub fn namespaces(&self) -> Result<Vec<Namespace>, ApiError> {
        Ok(self.store().list(Kind::Namespace)?)
    }

    pub fn delete_namespace(&self, id: &str) -> Result<(), ApiError> {
        let _ops = lock(&self.ops);
        let ns: Namespace = self.get(Kind::Namespace, id)?;
        if let Some(instance) = &ns.attached_to {
            return Err(ApiError::conflict(format!(
                "namespace {id} belongs to {instance}: terminate it first"
            )));
        }
        self.stop_card(&nvme_card(id));
        self.store().delete(id)?;
        let _ = std::fs::remove_file(self.path("namespaces", &format!("{id}.img")));
        let _ = std::fs::remove_file(&ns.socket);
        self.event(id, "deleted", "");
        Ok(())
    }

    // ------------------------------------------------------------ subnets

    pub fn create_subnet(&self, req: CreateSubnet) -> Result<Subnet, ApiError> {
        let _ops = lock(&self.ops);
        let cidr = Cidr::parse(&req.cidr).map_err(|m| ApiError::invalid("cidr", m))?;
        let vpc = self.config.vpc_cidr;
        if !(16..=28).contains(&cidr.prefix) || !vpc.contains(cidr.base) || cidr.prefix < vpc.prefix
        {
            return Err(ApiError::invalid(
                "cidr",
                format!("{cidr} must lie inside the VPC's {vpc} with a prefix of 16 to 28"),
            ));
        }
        for other in self.store().list::<Subnet>(Kind::Subnet)? {
            if let Ok(o) = Cidr::parse(&other.cidr) {
                if o.overlaps(cidr) {
                    return Err(ApiError::invalid(
                        "cidr",
                        format!("{cidr} overlaps {} ({})", other.id, other.cidr),
                    ));
                }
            }
        }
        let subnet = Subnet {
            id: new_id(Kind::Subnet),
            cidr: cidr.to_string(),
            gateway: cidr.host(1).to_string(),
            created_ms: now_ms(),
        };
        self.store().put(Kind::Subnet, &subnet.id, &subnet)?;
        self.event(&subnet.id, "created", &subnet.cidr);
        Ok(subnet)
    }

    pub fn subnet(&self, id: &str) -> Result<Subnet, ApiError> {
        self.get(Kind::Subnet, id)
    }

    pub fn subnets(&self) -> Result<Vec<Subnet>, ApiError> {
        Ok(self.store().list(Kind::Subnet)?)
    }

    pub fn delete_subnet(&self, id: &str) -> Result<(), ApiError> {
        let _ops = lock(&self.ops);
        self.get::<Subnet>(Kind::Subnet, id)?;
        if let Some(eni) = self
            .store()
            .list::<Eni>(Kind::Eni)?
            .into_iter()
            .find(|e| e.subnet_id == id)
        {
            return Err(ApiError::conflict(format!(
                "subnet {id} still has {}: delete it first",
                eni.id
            )));
        }
        self.store().delete(id)?;
        self.event(id, "deleted", "");
        Ok(())
    }

    // ---------------------------------------------------- security groups

    pub fn create_security_group(
        &self,
        req: CreateSecurityGroup,
    ) -> Result<SecurityGroup, ApiError> {
        let _ops = lock(&self.ops);
        if req.description.chars().count() > 255 {
            return Err(ApiError::invalid("description", "at most 255 characters"));
        }
        check_rules("ingress", &req.ingress)?;
        let egress = req.egress.unwrap_or_else(allow_all);
        check_rules("egress", &egress)?;
        let sg = SecurityGroup {
            id: new_id(Kind::SecurityGroup),
            description: req.description,
            ingress: req.ingress,
            egress,
            created_ms: now_ms(),
        };
        // A running networking card learns the group now, so an ENI can
        // take it live.
        if self.net_card_running() {
            self.agent_call(NET_CARD, "security_group_put", netconfig::group_args(&sg))?;
        }
        self.store().put(Kind::SecurityGroup, &sg.id, &sg)?;
        self.write_net_config_quietly();
        self.event(&sg.id, "created", &sg.description);
        Ok(sg)
    }

    pub fn security_group(&self, id: &str) -> Result<SecurityGroup, ApiError> {
        self.get(Kind::SecurityGroup, id)
    }

    pub fn security_groups(&self) -> Result<Vec<SecurityGroup>, ApiError> {
        Ok(self.store().list(Kind::SecurityGroup)?)
    }

    pub fn set_rules(&self, id: &str, req: SetRules) -> Result<SecurityGroup, ApiError> {
        let _ops = lock(&self.ops);
        let mut sg: SecurityGroup = self.get(Kind::SecurityGroup, id)?;
        check_rules("ingress", &req.ingress)?;
        check_rules("egress", &req.egress)?;
        sg.ingress = req.ingress;
        sg.egress = req.egress;
        if self.net_card_running() {
            self.agent_call(NET_CARD, "security_group_put", netconfig::group_args(&sg))?;
        }
        self.store().put(Kind::SecurityGroup, id, &sg)?;
        self.write_net_config_quietly();
        self.event(
            id,
            "rules-set",
            &format!("{} ingress, {} egress", sg.ingress.len(), sg.egress.len()),
        );
        Ok(sg)
    }

    pub fn delete_security_group(&self, id: &str) -> Result<(), ApiError> {
        let _ops = lock(&self.ops);
        self.get::<SecurityGroup>(Kind::SecurityGroup, id)?;
        if let Some(eni) = self
            .store()
            .list::<Eni>(Kind::Eni)?
            .into_iter()
            .find(|e| e.security_groups.iter().any(|g| g == id))
        {
            return Err(ApiError::conflict(format!(
                "security group {id} is used by {}",
                eni.id
            )));
        }
        self.store().delete(id)?;
        self.write_net_config_quietly();
        self.event(id, "deleted", "");
        Ok(())
    }

    // --------------------------------------------------------------- ENIs

    fn check_groups(&self, groups: &[String]) -> Result<(), ApiError> {
        if groups.len() > MAX_ENI_GROUPS {
            return Err(ApiError::invalid(
                "security_groups",
                format!("at most {MAX_ENI_GROUPS} groups, got {}", groups.len()),
            ));
        }
        for (i, g) in groups.iter().enumerate() {
            if groups[..i].contains(g) {
                return Err(ApiError::invalid(
                    "security_groups",
                    format!("{g} is named twice"),
                ));
            }
            if self
                .store()
                .get::<SecurityGroup>(Kind::SecurityGroup, g)?
                .is_none()
            {
                return Err(ApiError::invalid(
                    "security_groups",
                    format!("no security group {g}"),
                ));
            }
        }
        Ok(())
    }

    pub fn create_eni(&self, req: CreateEni) -> Result<Eni, ApiError> {
        let _ops = lock(&self.ops);
        let subnet: Subnet = self
            .get(Kind::Subnet, &req.subnet_id)
            .map_err(|e| ApiError::invalid("subnet_id", e.message))?;
        self.check_groups(&req.security_groups)?;
        if let Some(allowance) = &req.allowance {
            check_rate_limiter("allowance", allowance)?;
        }
        let cidr = Cidr::parse(&subnet.cidr).map_err(ApiError::internal)?;
        let enis: Vec<Eni> = self.store().list(Kind::Eni)?;
        let used = |ip: Ipv4Addr| enis.iter().any(|e| e.ip == ip.to_string());
        let ip = match &req.ip {
            Some(text) => {
                let ip: Ipv4Addr = text.parse().map_err(|_| {
                    ApiError::invalid("ip", format!("{text:?} is not an IPv4 address"))
                })?;
                let n = u32::from(ip).wrapping_sub(u32::from(cidr.base)) as u64;
                if !cidr.contains(ip) || n < 2 || n + 1 >= cidr.size() {
                    return Err(ApiError::invalid(
                        "ip",
                        format!(
                            "{ip} is not a host address of {} ({cidr}) past the gateway",
                            subnet.id
                        ),
                    ));
                }
                if used(ip) {
                    return Err(ApiError::invalid("ip", format!("{ip} is in use")));
                }
                ip
            }
            None => (10..cidr.size().saturating_sub(1))
                .map(|n| cidr.host(n as u32))
                .find(|ip| !used(*ip))
                .ok_or_else(|| {
                    ApiError::conflict(format!("subnet {} has no free address", subnet.id))
                })?,
        };
        let id = new_id(Kind::Eni);
        let eni = Eni {
            mac: eni_mac(&id),
            socket: self
                .path("run", &format!("{id}.sock"))
                .display()
                .to_string(),
            id,
            subnet_id: subnet.id,
            ip: ip.to_string(),
            security_groups: req.security_groups,
            allowance: req.allowance,
            state: "available".into(),
            attached_to: None,
            created_ms: now_ms(),
        };
        // The card's port set changes: it is given the new config and
        // restarted (guests on other ENIs reconnect). On failure the ENI is
        // not recorded and the card is put back on the old config.
        self.store().put(Kind::Eni, &eni.id, &eni)?;
        if let Err(e) = self.apply_net_config() {
            self.store().delete(&eni.id)?;
            if let Err(again) = self.apply_net_config() {
                tracing::error!(error = %again, "restoring the networking card");
            }
            return Err(e);
        }
        self.event(
            &eni.id,
            "created",
            &format!("{} in {}", eni.ip, eni.subnet_id),
        );
        Ok(eni)
    }

    pub fn eni(&self, id: &str) -> Result<Eni, ApiError> {
        self.get(Kind::Eni, id)
    }

    pub fn enis(&self) -> Result<Vec<Eni>, ApiError> {
        Ok(self.store().list(Kind::Eni)?)
    }

    pub fn modify_eni(&self, id: &str, req: ModifyEni) -> Result<Eni, ApiError> {
        let _ops = lock(&self.ops);
        let mut eni: Eni = self.get(Kind::Eni, id)?;
        self.check_groups(&req.security_groups)?;
        self.agent_call(
            NET_CARD,
            "set_security_groups",
            json!({"eni": id, "groups": req.security_groups}),
        )?;
        eni.security_groups = req.security_groups;
        self.store().put(Kind::Eni, id, &eni)?;
        self.write_net_config_quietly();
        self.event(id, "groups-set", &eni.security_groups.join(","));
        Ok(eni)
    }

    pub fn delete_eni(&self, id: &str) -> Result<(), ApiError> {
        let _ops = lock(&self.ops);
        let eni: Eni = self.get(Kind::Eni, id)?;
        if let Some(instance) = &eni.attached_to {
            return Err(ApiError::conflict(format!(
                "eni {id} is attached to {instance}: terminate it first"
            )));
        }
        self.store().delete(id)?;
        if let Err(e) = self.apply_net_config() {
            self.store().put(Kind::Eni, id, &eni)?;
            return Err(e);
        }
        let _ = std::fs::remove_file(&eni.socket);
        self.event(id, "deleted", "");
        Ok(())
    }

    fn net_card_running(&self) -> bool {
        self.supervisor
            .status(NET_CARD)
            .is_ok_and(|s| s.phase != CardPhase::Stopped)
    }

    fn net_config_path(&self) -> PathBuf {
        self.path("run", "vpc.toml")
    }

    fn render_net_config(&self) -> Result<Option<String>, ApiError> {
        let store = self.store();
        let enis: Vec<Eni> = store.list(Kind::Eni)?;
        if enis.is_empty() {
            return Ok(None);
        }
        Ok(Some(netconfig::render(
            self.config.vpc_cidr,
            self.config.vni,
            &store.list(Kind::Subnet)?,
            &store.list(Kind::SecurityGroup)?,
            &enis,
        )))
    }

    /// Keeps the config file in step with a change already applied live, so
    /// a restarted card starts with it.
    fn write_net_config_quietly(&self) {
        match self.render_net_config() {
            Ok(Some(text)) => {
                if let Err(e) = std::fs::write(self.net_config_path(), text) {
                    tracing::error!(error = %e, "writing the VPC config");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "rendering the VPC config"),
        }
    }

    /// Writes the VPC config from the desired state, has the card check it,
    /// and (re)starts the networking card on it; stops the card when no ENI
    /// is left.
    fn apply_net_config(&self) -> Result<(), ApiError> {
        let Some(text) = self.render_net_config()? else {
            self.stop_card(NET_CARD);
            return Ok(());
        };
        let path = self.net_config_path();
        let staged = path.with_extension("toml.new");
        std::fs::write(&staged, &text)
            .map_err(|e| ApiError::internal(format!("writing {}: {e}", staged.display())))?;
        let program = self.card_program("vhost-net-backend")?;
        let check = self
            .card_command("vhost-net-backend")?
            .arg("--check-config")
            .arg("--config")
            .arg(&staged)
            .output()
            .map_err(|e| ApiError::unavailable(format!("running {}: {e}", program.describe())))?;
        if !check.status.success() {
            let _ = std::fs::remove_file(&staged);
            return Err(ApiError::internal(format!(
                "the networking card refused the generated VPC config: {}",
                String::from_utf8_lossy(&check.stderr).trim()
            )));
        }
        std::fs::rename(&staged, &path)
            .map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))?;
        self.stop_card(NET_CARD);
        for eni in self.store().list::<Eni>(Kind::Eni)? {
            let _ = std::fs::remove_file(&eni.socket);
        }
        let agent = self.agent_socket(NET_CARD);
        let args = vec!["--config".into(), path.display().to_string()];
        self.start_card(CardSpec {
            name: NET_CARD.into(),
            kind: CardKind::Net,
            program,
            args: self.card_args(args, &agent),
            agent_socket: agent,
            log: self.path("logs", "net.log"),
        })
    }

    // ---------------------------------------------------------- instances

    pub fn run_instance(&self, req: RunInstance) -> Result<Instance, ApiError> {
        let _ops = lock(&self.ops);
        let vcpus = req.vcpus.unwrap_or(1);
        if !(1..=16).contains(&vcpus) {
            return Err(ApiError::invalid(
                "vcpus",
                format!("must be 1 to 16, got {vcpus}"),
            ));
        }
        let memory_mib = req.memory_mib.unwrap_or(512);
        if !(128..=16384).contains(&memory_mib) {
            return Err(ApiError::invalid(
                "memory_mib",
                format!("must be 128 to 16384, got {memory_mib}"),
            ));
        }
        let file = |field: &str, given: &Option<String>, default: &Option<PathBuf>| {
            let path = given
                .as_ref()
                .map(PathBuf::from)
                .or_else(|| default.clone())
                .ok_or_else(|| {
                    ApiError::invalid(
                        field,
                        "required (the daemon has no default; see --kernel/--initrd)",
                    )
                })?;
            if !path.is_file() {
                return Err(ApiError::invalid(
                    field,
                    format!("{} is not a file", path.display()),
                ));
            }
            Ok(path)
        };
        let kernel = file("kernel", &req.kernel, &self.config.kernel)?;
        let initrd = file("initrd", &req.initrd, &self.config.initrd)?;
        check_unique("volumes", &req.volumes)?;
        check_unique("enis", &req.enis)?;
        check_unique("namespaces", &req.namespaces)?;
        let mut volumes = Vec::new();
        for id in &req.volumes {
            let v: Volume = self
                .get(Kind::Volume, id)
                .map_err(|e| ApiError::invalid("volumes", e.message))?;
            if let Some(other) = &v.attached_to {
                return Err(ApiError::conflict(format!(
                    "volume {id} is attached to {other}"
                )));
            }
            volumes.push(v);
        }
        let mut enis = Vec::new();
        for id in &req.enis {
            let e: Eni = self
                .get(Kind::Eni, id)
                .map_err(|e| ApiError::invalid("enis", e.message))?;
            if let Some(other) = &e.attached_to {
                return Err(ApiError::conflict(format!(
                    "eni {id} is attached to {other}"
                )));
            }
            enis.push(e);
        }
        let mut namespaces = Vec::new();
        for id in &req.namespaces {
            let n: Namespace = self
                .get(Kind::Namespace, id)
                .map_err(|e| ApiError::invalid("namespaces", e.message))?;
            if let Some(other) = &n.attached_to {
                return Err(ApiError::conflict(format!(
                    "namespace {id} belongs to {other}"
                )));
            }
            namespaces.push(n);
        }
        let id = new_id(Kind::Instance);
        let run_dir = self.path("instances", &id);
        let spec = InstanceSpec {
            id: id.clone(),
            vmm: self.config.vmm.clone(),
            vcpus,
            memory_mib,
            kernel,
            initrd,
            cmdline: req
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 panic=-1 quiet".into()),
            user_data: req.user_data.clone(),
            volumes: volumes
                .iter()
                .map(|v| VolumeAttachment {
                    id: v.id.clone(),
                    socket: PathBuf::from(&v.socket),
                    num_queues: 1,
                })
                .collect(),
            enis: enis
                .iter()
                .map(|e| NicAttachment {
                    id: e.id.clone(),
                    socket: PathBuf::from(&e.socket),
                    mac: e.mac.clone(),
                    queues: 1,
                })
                .collect(),
            namespaces: namespaces
                .iter()
                .map(|n| NvmeAttachment {
                    id: n.id.clone(),
                    socket: PathBuf::from(&n.socket),
                })
                .collect(),
            run_dir: run_dir.clone(),
            hotplug_slots: DEFAULT_HOTPLUG_SLOTS,
            accel: self.config.accel,
        };
        let vm = Vm::launch(spec).map_err(vm_error)?;
        let instance = Instance {
            id: id.clone(),
            origin: "launched".into(),
            state: "running".into(),
            volumes: req.volumes.clone(),
            enis: req.enis.clone(),
            namespaces: req.namespaces.clone(),
            vcpus,
            memory_mib,
            qmp_socket: vm.qmp_socket().display().to_string(),
            console_log: vm.console_log().map(|p| p.display().to_string()),
            pid: vm.pid(),
            created_ms: now_ms(),
        };
        lock(&self.vms).insert(id.clone(), vm);
        let store = self.store();
        for mut v in volumes {
            v.state = "in-use".into();
            v.attached_to = Some(id.clone());
            store.put(Kind::Volume, &v.id, &v)?;
        }
        for mut e in enis {
            e.state = "in-use".into();
            e.attached_to = Some(id.clone());
            store.put(Kind::Eni, &e.id, &e)?;
        }
        for mut n in namespaces {
            n.state = "in-use".into();
            n.attached_to = Some(id.clone());
            store.put(Kind::Namespace, &n.id, &n)?;
        }
        store.put(Kind::Instance, &id, &instance)?;
        drop(store);
        self.event(&id, "launched", &format!("pid {:?}", instance.pid));
        Ok(instance)
    }

    pub fn register_instance(&self, req: RegisterInstance) -> Result<Instance, ApiError> {
        let _ops = lock(&self.ops);
        let socket = PathBuf::from(&req.qmp_socket);
        if !socket.is_absolute() {
            return Err(ApiError::invalid("qmp_socket", "must be an absolute path"));
        }
        // QEMU serves one QMP client at a time: a second registration would
        // wait for a greeting that never comes.
        if let Some(other) = self
            .store()
            .list::<Instance>(Kind::Instance)?
            .into_iter()
            .find(|i| Path::new(&i.qmp_socket) == socket)
        {
            return Err(ApiError::conflict(format!(
                "{} is already {}'s QMP socket",
                req.qmp_socket, other.id
            )));
        }
        let id = new_id(Kind::Instance);
        let vm = Vm::register(&id, &socket)
            .map_err(|e| ApiError::invalid("qmp_socket", e.to_string()))?;
        let instance = Instance {
            id: id.clone(),
            origin: "registered".into(),
            state: "running".into(),
            volumes: vec![],
            enis: vec![],
            namespaces: vec![],
            vcpus: 0,
            memory_mib: 0,
            qmp_socket: req.qmp_socket,
            console_log: None,
            pid: None,
            created_ms: now_ms(),
        };
        lock(&self.vms).insert(id.clone(), vm);
        self.store().put(Kind::Instance, &id, &instance)?;
        self.event(&id, "registered", &instance.qmp_socket);
        Ok(instance)
    }

    pub fn instance(&self, id: &str) -> Result<Instance, ApiError> {
        self.refresh_instances();
        self.get(Kind::Instance, id)
    }

    pub fn instances(&self) -> Result<Vec<Instance>, ApiError> {
        self.refresh_instances();
        Ok(self.store().list(Kind::Instance)?)
    }

    /// Records launched guests whose QEMU has exited (a guest that powered
    /// off) as stopped. Skipped while a mutation holds the instances (an
    /// attach waiting on a guest): the next read catches up.
    fn refresh_instances(&self) {
        let Ok(mut vms) = self.vms.try_lock() else {
            return;
        };
        let exited: Vec<(String, String)> = vms
            .iter_mut()
            .filter_map(|(id, vm)| vm.exit_status().map(|s| (id.clone(), s.to_string())))
            .collect();
        for (id, status) in exited {
            vms.remove(&id);
            let store = self.store();
            if let Ok(Some(mut instance)) = store.get::<Instance>(Kind::Instance, &id) {
                instance.state = "stopped".into();
                instance.pid = None;
                if let Err(e) = store.put(Kind::Instance, &id, &instance) {
                    tracing::error!(error = %e, "recording a stopped instance");
                }
            }
            drop(store);
            self.event(&id, "stopped", &format!("QEMU exited ({status})"));
        }
    }

    /// Terminates a launched instance (stops its QEMU) or forgets a
    /// registered one, and frees its volumes, ENIs and namespaces.
    pub fn delete_instance(&self, id: &str) -> Result<(), ApiError> {
        let _ops = lock(&self.ops);
        let instance: Instance = self.get(Kind::Instance, id)?;
        if let Some(mut vm) = lock(&self.vms).remove(id) {
            if instance.origin == "launched" {
                if let Err(e) = vm.stop(STOP_TIMEOUT) {
                    tracing::warn!(instance = id, error = %e, "stopping QEMU");
                }
            } else {
                for v in &instance.volumes {
                    if let Err(e) = vm.detach_volume(v, DETACH_TIMEOUT) {
                        tracing::warn!(instance = id, volume = v, error = %e, "detaching");
                    }
                }
            }
        }
        let store = self.store();
        for v in &instance.volumes {
            if let Some(mut vol) = store.get::<Volume>(Kind::Volume, v)? {
                vol.state = "available".into();
                vol.attached_to = None;
                store.put(Kind::Volume, v, &vol)?;
            }
        }
        for e in &instance.enis {
            if let Some(mut eni) = store.get::<Eni>(Kind::Eni, e)? {
                eni.state = "available".into();
                eni.attached_to = None;
                store.put(Kind::Eni, e, &eni)?;
            }
        }
        for n in &instance.namespaces {
            if let Some(mut ns) = store.get::<Namespace>(Kind::Namespace, n)? {
                ns.state = "available".into();
                ns.attached_to = None;
                store.put(Kind::Namespace, n, &ns)?;
            }
        }
        store.delete(id)?;
        drop(store);
        self.event(id, "terminated", "");
        Ok(())
    }

    // ------------------------------------------------------------ firmware

    pub fn firmware(&self) -> Firmware {
        let image = lock(&self.image).clone();
        let cards = self
            .supervisor
            .list()
            .into_iter()
            .map(|s| CardFirmware {
                version: s.image_version,
                name: s.name,
                kind: kind_name(s.kind).into(),
                phase: phase_name(s.phase).into(),
                pid: s.pid,
            })
            .collect();
        let (mode, card_bin_dir) = match &self.config.cards {
            CardSource::Unverified { bin_dir } => {
                ("unverified", Some(bin_dir.display().to_string()))
            }
            CardSource::Verified { .. } => ("verified", None),
        };
        Firmware {
            mode: mode.into(),
            image: image.as_ref().map(|i| i.dir.display().to_string()),
            version: image.as_ref().map(|i| i.version().to_string()),
            signer: image.as_ref().map(|i| public_key_hex(&i.signer)),
            card_bin_dir,
            cards,
        }
    }

    /// Verifies the image, then restarts the cards on it one at a time,
    /// each healthy before the next. An image that does not verify changes
    /// nothing; a card that does not come up on it puts every card
    /// restarted so far back on the previous image.
    pub fn update_firmware(&self, req: UpdateFirmware) -> Result<FirmwareUpdated, ApiError> {
        let _ops = lock(&self.ops);
        let CardSource::Verified { trusted, .. } = &self.config.cards else {
            return Err(ApiError::conflict(
                "this daemon runs unverified cards from --card-bin-dir: start it with --trusted-keys and --image to run (and update) verified images",
            ));
        };
        let dir = PathBuf::from(&req.image);
        if !dir.is_absolute() {
            return Err(ApiError::invalid("image", "must be an absolute path"));
        }
        let new = verify_image(&dir, trusted)
            .map_err(|e| ApiError::invalid("image", format!("{}: {e}", dir.display())))?;
        let cards: Vec<_> = self
            .supervisor
            .list()
            .into_iter()
            .filter(|c| c.phase != CardPhase::Stopped)
            .collect();
        for card in &cards {
            let binary = card_binary(card.kind);
            if new.sha256(binary).is_none() {
                return Err(ApiError::invalid(
                    "image",
                    format!(
                        "{}: no {binary}, which card {} runs",
                        dir.display(),
                        card.name
                    ),
                ));
            }
        }
        let new = Arc::new(new);
        let old = lock(&self.image).clone();
        let previous_version = old.as_ref().map(|i| i.version().to_string());
        let (from, to) = (
            previous_version.clone().unwrap_or_else(|| "-".into()),
            new.version().to_string(),
        );
        self.event(
            "firmware",
            "update-started",
            &format!("{from} -> {to} ({})", dir.display()),
        );
        let mut restarted = Vec::new();
        for card in &cards {
            let program = CardProgram::Image {
                image: new.clone(),
                binary: card_binary(card.kind).into(),
            };
            match self.supervisor.restart(&card.name, Some(program)) {
                Ok(pid) => {
                    self.event(
                        &card.name,
                        "firmware-updated",
                        &format!(
                            "{from} -> {to}, pid {} -> {pid}",
                            card.pid.map_or("-".into(), |p| p.to_string())
                        ),
                    );
                    restarted.push(CardRestart {
                        name: card.name.clone(),
                        old_pid: card.pid,
                        new_pid: pid,
                    });
                }
                Err(e) => {
                    let message = format!("card {} did not come up on {to}: {e}", card.name);
                    self.event(&card.name, "firmware-update-failed", &message);
                    let back = self.roll_back(old.as_ref(), &card.name, &restarted);
                    self.event("firmware", "update-failed", &format!("{message}; {back}"));
                    return Err(ApiError::unavailable(format!("{message}; {back}")));
                }
            }
        }
        *lock(&self.image) = Some(new);
        self.store()
            .set_setting(FIRMWARE_IMAGE, &dir.display().to_string())?;
        self.event(
            "firmware",
            "updated",
            &format!("{from} -> {to}, {} cards", restarted.len()),
        );
        Ok(FirmwareUpdated {
            previous_version,
            restarted,
            firmware: self.firmware(),
        })
    }

    /// Puts the failed card and every card already restarted back on the
    /// previous image; says what it did.
    fn roll_back(
        &self,
        old: Option<&Arc<VerifiedImage>>,
        failed: &str,
        restarted: &[CardRestart],
    ) -> String {
        let Some(old) = old else {
            return "no previous image to go back to".into();
        };
        let mut back = 0;
        let names = restarted.iter().map(|r| r.name.as_str()).chain([failed]);
        for name in names {
            let Ok(status) = self.supervisor.status(name) else {
                continue;
            };
            let program = CardProgram::Image {
                image: old.clone(),
                binary: card_binary(status.kind).into(),
            };
            match self.supervisor.restart(name, Some(program)) {
                Ok(_) => {
                    self.event(
                        name,
                        "firmware-rolled-back",
                        &format!("to {}", old.version()),
                    );
                    back += 1;
                }
                Err(e) => self.event(name, "firmware-rollback-failed", &e.to_string()),
            }
        }
        format!("{back} card(s) back on {}", old.version())
    }

    /// The measured-boot log and whether its chain checks out.
    pub fn boot_log(&self) -> Result<BootLog, ApiError> {
        let log = MeasuredBootLog::new(&self.config.state_dir.join("boot.log"));
        let (verified, problem, entries) = match log.verify() {
            Ok(entries) => (true, None, entries),
            Err(e) => (
                false,
                Some(e.to_string()),
                log.entries().unwrap_or_default(),
            ),
        };
        Ok(BootLog {
            path: log.path().display().to_string(),
            verified,
            problem,
            entries: entries.into_iter().map(Into::into).collect(),
        })
    }

    // ------------------------------------------------------ cards, events

    pub fn cards(&self) -> Vec<Card> {
        self.supervisor
            .list()
            .into_iter()
            .map(|s| Card {
                name: s.name,
                kind: kind_name(s.kind).into(),
                phase: phase_name(s.phase).into(),
                pid: s.pid,
                restarts: s.restarts,
                last_failure: s.last_failure,
            })
            .collect()
    }

    pub fn card_metrics(&self, name: &str) -> Result<CardMetrics, ApiError> {
        if self.supervisor.status(name).is_err() {
            return Err(ApiError::not_found("card", name));
        }
        let metrics = self.agent_call(name, "metrics", json!({}))?;
        Ok(CardMetrics {
            name: name.to_string(),
            metrics,
        })
    }

    pub fn events(
        &self,
        since: i64,
        resource: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Event>, ApiError> {
        Ok(self.store().events(since, resource, limit)?)
    }

    /// A card answered again after a start: give it the desired state that
    /// may have changed since its command line was made.
    fn configure_card(&self, card: &str) {
        if let Some(volume_id) = card.strip_prefix("blk-") {
            if let Ok(Some(volume)) = self.store().get::<Volume>(Kind::Volume, volume_id) {
                if let Err(e) = self.agent_call(card, "volume_modify", volume_modify_args(&volume))
                {
                    self.event(card, "configure-failed", &e.message);
                }
            }
        }
    }
}

fn volume_modify_args(volume: &Volume) -> serde_json::Value {
    let mut args = json!({"volume_type": volume.volume_type.as_str()});
    if let Some(iops) = volume.iops {
        args["iops"] = json!(iops);
    }
    if let Some(t) = volume.throughput_mibps {
        args["throughput"] = json!(t);
    }
    args
}

fn check_unique(field: &str, ids: &[String]) -> Result<(), ApiError> {
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            return Err(ApiError::invalid(field, format!("{id} is named twice")));
        }
    }
    Ok(())
}

fn create_sparse(path: &Path, size: u64) -> Result<(), ApiError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", path.display())))?;
    file.set_len(size).map_err(|e| {
        let _ = std::fs::remove_file(path);
        ApiError::internal(format!("sizing {}: {e}", path.display()))
    })
}

fn vm_error(e: InstanceError) -> ApiError {
    let kind = match &e {
        InstanceError::AlreadyAttached { .. } | InstanceError::NotAttached { .. } => {
            ErrorKind::Conflict
        }
        InstanceError::NoFreeSlot { .. } | InstanceError::Exited { .. } => ErrorKind::Conflict,
        InstanceError::InvalidSpec { .. } => ErrorKind::InvalidValue,
        _ => ErrorKind::Unavailable,
    };
    ApiError::new(kind, e.to_string())
}

/// Records every card event, and configures a card each time it becomes
/// healthy after a start.
fn card_events(daemon: Weak<Daemon>, events: crossbeam_channel::Receiver<CardEvent>) {
    for event in events {
        let Some(daemon) = daemon.upgrade() else {
            return;
        };
        let (kind, message) = match &event.kind {
            CardEventKind::Started { pid } => ("card-started", format!("pid {pid}")),
            CardEventKind::Healthy => ("card-healthy", String::new()),
            CardEventKind::Exited { status } => ("card-exited", status.to_string()),
            CardEventKind::Restarting { after_ms } => {
                ("card-restarting", format!("in {after_ms} ms"))
            }
            CardEventKind::Unhealthy { reason } => ("card-unhealthy", reason.clone()),
            CardEventKind::Stopped => ("card-stopped", String::new()),
        };
        daemon.event(&event.card, kind, &message);
        match &event.kind {
            CardEventKind::Started { pid } => daemon.record_card_pid(&event.card, Some(*pid)),
            CardEventKind::Stopped => daemon.record_card_pid(&event.card, None),
            _ => {}
        }
        if event.kind == CardEventKind::Healthy {
            daemon.configure_card(&event.card);
        }
    }
}
