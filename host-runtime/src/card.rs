//! Card processes under supervision: started from a binary (or, later, a
//! verified card image), watched by one thread that reaps a card that
//! exited and starts it again after an exponential backoff, and checked
//! through the card's agent socket. Every change of state is sent as a
//! [`CardEvent`].

use card_firmware::agent::{self, AgentClient};
use card_firmware::boot::{BootRecord, MeasuredBootLog, VerifiedImage};
use crossbeam_channel::{Sender, TrySendError};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CardKind {
    Block,
    Nvme,
    Net,
}

/// Makes the [`Command`] that runs a card some other way than a binary or
/// an image does.
pub trait CardLauncher: Send + Sync + std::fmt::Debug {
    fn command(&self) -> Result<Command, String>;
    /// For logs and status: what runs.
    fn describe(&self) -> String;
}

/// What a card runs: the one place a card's [`Command`] is made.
#[derive(Debug, Clone)]
pub enum CardProgram {
    /// A binary on the host, e.g. from `target/release`.
    Binary(PathBuf),
    /// A binary of a verified card image, run from the bytes that were
    /// verified (`card_firmware::boot`).
    Image {
        image: Arc<VerifiedImage>,
        binary: String,
    },
    Launcher(Arc<dyn CardLauncher>),
}

impl CardProgram {
    fn command(&self) -> Result<Command, String> {
        match self {
            CardProgram::Binary(path) => {
                if !path.is_file() {
                    return Err(format!("card program {} is not a file", path.display()));
                }
                Ok(Command::new(path))
            }
            CardProgram::Image { image, binary } => {
                image.command(binary).map_err(|e| e.to_string())
            }
            CardProgram::Launcher(launcher) => launcher.command(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            CardProgram::Binary(path) => path.display().to_string(),
            CardProgram::Image { image, binary } => format!(
                "{binary} of image {} (version {})",
                image.dir.display(),
                image.version()
            ),
            CardProgram::Launcher(launcher) => launcher.describe(),
        }
    }
}

impl From<PathBuf> for CardProgram {
    fn from(path: PathBuf) -> Self {
        CardProgram::Binary(path)
    }
}

/// One card process.
#[derive(Debug, Clone)]
pub struct CardSpec {
    /// Unique among the supervisor's cards, e.g. `blk-vol-0abc`.
    pub name: String,
    pub kind: CardKind,
    pub program: CardProgram,
    pub args: Vec<OsString>,
    /// Where the card's agent listens; health is checked there.
    pub agent_socket: PathBuf,
    /// The card's stdout and stderr, appended.
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardEvent {
    pub time: SystemTime,
    pub card: String,
    pub kind: CardEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardEventKind {
    Started { pid: u32 },
    Healthy,
    Exited { status: ExitStatus },
    Restarting { after_ms: u64 },
    Unhealthy { reason: String },
    Stopped,
}

/// Where a card is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardPhase {
    /// Running, not yet answering on its agent socket.
    Starting,
    Healthy,
    /// Running, but its last health check failed.
    Unhealthy,
    /// Exited; started again once the backoff passes.
    BackingOff,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardStatus {
    pub name: String,
    pub kind: CardKind,
    pub phase: CardPhase,
    pub pid: Option<u32>,
    /// Restarts after an exit (not counting [`Supervisor::restart`]).
    pub restarts: u32,
    pub program: String,
    /// The image version a card from a verified image runs.
    pub image_version: Option<String>,
    /// Why the last health check or start failed, if one did; while the
    /// card is starting, why it is not up yet.
    pub last_failure: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("card {name:?}: invalid name (letters, digits, '-', '_', '.'; 1 to 64)")]
    InvalidName { name: String },
    #[error("card {name} is already supervised")]
    AlreadyExists { name: String },
    #[error("card {name} is not supervised")]
    NotFound { name: String },
    #[error("card {name}: starting {program}: {reason}")]
    StartFailed {
        name: String,
        program: String,
        reason: String,
    },
    #[error("card {name} was not healthy within {waited:?}{}", .last_failure.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    NotHealthy {
        name: String,
        waited: Duration,
        last_failure: Option<String>,
    },
    #[error("card {name} was stopped")]
    Stopped { name: String },
}

/// Timings of supervision.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// First wait before restarting a card that exited; doubles each time.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A card healthy this long starts again from `backoff_initial`.
    pub stable_after: Duration,
    /// Between health checks of a healthy card.
    pub health_interval: Duration,
    /// One health check's budget.
    pub health_timeout: Duration,
    /// A card not healthy this long after starting is killed (and restarted).
    pub start_timeout: Duration,
    /// Failed checks in a row after which a running card is killed.
    pub unhealthy_limit: u32,
    /// From SIGTERM to SIGKILL when stopping a card.
    pub stop_grace: Duration,
    /// Where every start of a card from a verified image is recorded
    /// (before it runs); a start that cannot be recorded does not happen.
    pub boot_log: Option<MeasuredBootLog>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(30),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(1),
            start_timeout: Duration::from_secs(15),
            unhealthy_limit: 3,
            stop_grace: Duration::from_secs(5),
            boot_log: None,
        }
    }
}

/// The watcher's tick: how soon an exit is noticed.
const TICK: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running {
        failed_checks: u32,
    },
    /// Killed for failing its health checks; restarted once reaped.
    Killed,
    Backoff {
        until: Instant,
    },
    /// `stop` owns the process; the watcher leaves it alone.
    Stopping,
    Stopped,
}

struct Card {
    spec: CardSpec,
    child: Option<Child>,
    phase: Phase,
    backoff: Duration,
    started_at: Instant,
    healthy_since: Option<Instant>,
    last_check: Option<Instant>,
    /// The health check under way: its number and when it began.
    check: Option<(u64, Instant)>,
    restarts: u32,
    last_failure: Option<String>,
    /// Why the card is not healthy yet while it starts (its agent socket
    /// not there yet, say): shown only until it comes up, since a check
    /// that races a starting card is not a failure.
    start_probe: Option<String>,
}

struct Shared {
    cards: Mutex<BTreeMap<String, Card>>,
    events: Sender<CardEvent>,
    config: SupervisorConfig,
    shutdown: AtomicBool,
}

/// Supervises card processes; dropping it stops them all.
pub struct Supervisor {
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
}

impl Supervisor {
    pub fn new(events: Sender<CardEvent>) -> Self {
        Self::with_config(events, SupervisorConfig::default())
    }

    pub fn with_config(events: Sender<CardEvent>, config: SupervisorConfig) -> Self {
        let shared = Arc::new(Shared {
            cards: Mutex::new(BTreeMap::new()),
            events,
            config,
            shutdown: AtomicBool::new(false),
        });
        let watcher_shared = shared.clone();
        let watcher = std::thread::Builder::new()
            .name("card-watcher".into())
            .spawn(move || watch(&watcher_shared))
            .expect("spawning the card watcher thread");
        Self {
            shared,
            watcher: Some(watcher),
        }
    }

    /// Starts a card (or starts again one that was stopped, with this
    /// spec) and returns its pid. Does not wait for it to be healthy: see
    /// [`Supervisor::wait_healthy`].
    pub fn start(&self, spec: CardSpec) -> Result<u32, CardError> {
        check_name(&spec.name)?;
        let mut cards = self.shared.lock();
        if let Some(card) = cards.get(&spec.name) {
            if card.phase != Phase::Stopped {
                return Err(CardError::AlreadyExists { name: spec.name });
            }
        }
        let name = spec.name.clone();
        let mut card = Card {
            spec,
            child: None,
            phase: Phase::Stopped,
            backoff: self.shared.config.backoff_initial,
            started_at: Instant::now(),
            healthy_since: None,
            last_check: None,
            check: None,
            restarts: 0,
            last_failure: None,
            start_probe: None,
        };
        let pid = spawn(&mut card, self.shared.config.boot_log.as_ref()).map_err(|reason| {
            CardError::StartFailed {
                name: name.clone(),
                program: card.spec.program.describe(),
                reason,
            }
        })?;
        // Under the lock: the watcher's events for this card come after.
        self.shared.emit(&name, CardEventKind::Started { pid });
        cards.insert(name, card);
        Ok(pid)
    }

    /// Stops a card: SIGTERM, then SIGKILL past the grace period. It stays
    /// known (as stopped) until started again.
    pub fn stop(&self, name: &str) -> Result<(), CardError> {
        let child = {
            let mut cards = self.shared.lock();
            let card = cards
                .get_mut(name)
                .ok_or_else(|| CardError::NotFound { name: name.into() })?;
            if matches!(card.phase, Phase::Stopped | Phase::Stopping) {
                return Ok(());
            }
            card.phase = Phase::Stopping;
            card.child.take()
        };
        if let Some(child) = child {
            terminate(child, self.shared.config.stop_grace);
        }
        let mut cards = self.shared.lock();
        if let Some(card) = cards.get_mut(name) {
            card.phase = Phase::Stopped;
            card.healthy_since = None;
        }
        self.shared.emit(name, CardEventKind::Stopped);
        Ok(())
    }

    /// Stops a card and starts it again, on `program` if given (a firmware
    /// update), and waits until it is healthy. Returns the new pid.
    pub fn restart(&self, name: &str, program: Option<CardProgram>) -> Result<u32, CardError> {
        self.stop(name)?;
        let pid = {
            let mut cards = self.shared.lock();
            let card = cards
                .get_mut(name)
                .ok_or_else(|| CardError::NotFound { name: name.into() })?;
            if card.phase != Phase::Stopped {
                // Someone started it in between.
                return Err(CardError::AlreadyExists { name: name.into() });
            }
            let previous = program.map(|p| std::mem::replace(&mut card.spec.program, p));
            card.backoff = self.shared.config.backoff_initial;
            match spawn(card, self.shared.config.boot_log.as_ref()) {
                Ok(pid) => {
                    self.shared.emit(name, CardEventKind::Started { pid });
                    pid
                }
                Err(reason) => {
                    let program = card.spec.program.describe();
                    // A bad new program leaves the card as it was: stopped, on
                    // the old one.
                    if let Some(previous) = previous {
                        card.spec.program = previous;
                    }
                    return Err(CardError::StartFailed {
                        name: name.into(),
                        program,
                        reason,
                    });
                }
            }
        };
        self.wait_healthy(name, self.shared.config.start_timeout)?;
        Ok(pid)
    }

    /// Waits until the card answers on its agent socket.
    pub fn wait_healthy(&self, name: &str, timeout: Duration) -> Result<(), CardError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(name)?;
            match status.phase {
                CardPhase::Healthy => return Ok(()),
                CardPhase::Stopped => return Err(CardError::Stopped { name: name.into() }),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(CardError::NotHealthy {
                    name: name.into(),
                    waited: timeout,
                    last_failure: status.last_failure,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self, name: &str) -> Result<CardStatus, CardError> {
        let cards = self.shared.lock();
        let card = cards
            .get(name)
            .ok_or_else(|| CardError::NotFound { name: name.into() })?;
        Ok(card.status())
    }

    /// Every card's status, by name.
    pub fn list(&self) -> Vec<CardStatus> {
        self.shared.lock().values().map(Card::status).collect()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
        let names: Vec<String> = self.shared.lock().keys().cloned().collect();
        for name in names {
            let _ = self.stop(&name);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Card>> {
        // A panic while holding the lock leaves the map consistent enough
        // (every step is a whole assignment): keep supervising.
        self.cards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Never blocks: a full channel loses the event (and says so in the log).
    fn emit(&self, card: &str, kind: CardEventKind) {
        tracing::info!(card, event = ?kind, "card event");
        let event = CardEvent {
            time: SystemTime::now(),
            card: card.into(),
            kind,
        };
        if let Err(TrySendError::Full(event)) = self.events.try_send(event) {
            tracing::warn!(card, event = ?event.kind, "card event channel full: event lost");
        }
    }
}

impl Card {
    fn status(&self) -> CardStatus {
        let phase = match self.phase {
            Phase::Starting => CardPhase::Starting,
            Phase::Running { failed_checks: 0 } => CardPhase::Healthy,
            Phase::Running { .. } | Phase::Killed => CardPhase::Unhealthy,
            Phase::Backoff { .. } => CardPhase::BackingOff,
            Phase::Stopping | Phase::Stopped => CardPhase::Stopped,
        };
        CardStatus {
            name: self.spec.name.clone(),
            kind: self.spec.kind,
            phase,
            pid: self.child.as_ref().map(Child::id),
            restarts: self.restarts,
            program: self.spec.program.describe(),
            image_version: match &self.spec.program {
                CardProgram::Image { image, .. } => Some(image.version().to_string()),
                _ => None,
            },
            // While it starts, why it is not up yet; after, real failures only.
            last_failure: match self.phase {
                Phase::Starting => self.start_probe.clone().or(self.last_failure.clone()),
                _ => self.last_failure.clone(),
            },
        }
    }
}

fn check_name(name: &str) -> Result<(), CardError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CardError::InvalidName { name: name.into() })
    }
}

/// Starts the card's process, its output appended to its log; a card from
/// a verified image is measured into `boot_log` first.
fn spawn(card: &mut Card, boot_log: Option<&MeasuredBootLog>) -> Result<u32, String> {
    let spec = &card.spec;
    let mut cmd = spec.program.command()?;
    if let (Some(log), CardProgram::Image { image, binary }) = (boot_log, &spec.program) {
        // command() succeeded, so the image lists the binary.
        let sha256 = image
            .sha256(binary)
            .ok_or_else(|| format!("image {} has no binary {binary}", image.dir.display()))?;
        log.append(&BootRecord {
            card: &spec.name,
            binary,
            image_version: image.version(),
            sha256,
        })
        .map_err(|e| format!("measuring the start into the boot log: {e}"))?;
    }
    if let Some(dir) = spec.log.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let open_log = || {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| format!("opening log {}: {e}", spec.log.display()))
    };
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?);
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    let pid = child.id();
    card.child = Some(child);
    card.phase = Phase::Starting;
    card.started_at = Instant::now();
    card.healthy_since = None;
    card.start_probe = None;
    card.last_check = None;
    // An answer from a check of the previous process is not this one's.
    card.check = None;
    Ok(pid)
}

/// SIGTERM, then SIGKILL after `grace`; reaps the process.
fn terminate(mut child: Child, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        // The child is ours and not yet reaped, so its pid is still its own.
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// A card is healthy when its agent says hello as the kind of card it
/// should be, from the process we started, and answers `health` with "ok".
fn check_health(kind: CardKind, pid: u32, socket: &Path, timeout: Duration) -> Result<(), String> {
    let mut agent = AgentClient::connect(socket, timeout).map_err(|e| e.to_string())?;
    let hello = agent.card();
    let expected = match kind {
        CardKind::Block => agent::CardKind::Blk,
        CardKind::Nvme => agent::CardKind::Nvme,
        CardKind::Net => agent::CardKind::Net,
    };
    if hello.card != expected {
        return Err(format!(
            "agent socket {} is served by a {:?} card, not a {expected:?} card",
            socket.display(),
            hello.card
        ));
    }
    if hello.pid != pid {
        return Err(format!(
            "agent socket {} is served by pid {}, not by the card's pid {pid}",
            socket.display(),
            hello.pid
        ));
    }
    let health = agent.call("health", json!({})).map_err(|e| e.to_string())?;
    match health.get("status").and_then(Value::as_str) {
        Some("ok") => Ok(()),
        _ => Err(format!(
            "agent socket {}: health is {health}",
            socket.display()
        )),
    }
}

/// A health check's answer, sent by its thread to the watcher.
type CheckResult = (String, u64, Result<(), String>);

/// The watcher thread: reaps exits, restarts after backoff, checks health.
/// Each health check runs on a thread of its own, so a card that hangs its
/// agent socket (a connect that never completes) cannot stall the others;
/// one with no answer within `health_timeout` counts as failed.
fn watch(shared: &Shared) {
    let config = &shared.config;
    let (results_tx, results) = crossbeam_channel::unbounded::<CheckResult>();
    let mut next_check = 0u64;
    while !shared.shutdown.load(Ordering::SeqCst) {
        let mut events = Vec::new();
        {
            let mut cards = shared.lock();
            let now = Instant::now();
            for (id, name, result) in results.try_iter().map(|(n, i, r)| (i, n, r)) {
                let Some(card) = cards.get_mut(&name) else {
                    continue;
                };
                if card.check.is_some_and(|(current, _)| current == id) {
                    card.check = None;
                    apply_health(card, result, config, &mut |kind| {
                        events.push((name.clone(), kind))
                    });
                }
            }
            for (name, card) in cards.iter_mut() {
                let mut emit = |kind| events.push((name.clone(), kind));
                step(card, now, config, &mut emit);
                if let Some((_, began)) = card.check {
                    if now.duration_since(began) >= config.health_timeout {
                        // Its late answer, if any, is ignored.
                        card.check = None;
                        let reason = format!(
                            "agent socket {}: no answer within {:?}",
                            card.spec.agent_socket.display(),
                            config.health_timeout
                        );
                        apply_health(card, Err(reason), config, &mut emit);
                    }
                }
                let due = card.check.is_none()
                    && match card.phase {
                        Phase::Starting => true,
                        Phase::Running { .. } => card
                            .last_check
                            .is_none_or(|at| now.duration_since(at) >= config.health_interval),
                        _ => false,
                    };
                if due {
                    next_check += 1;
                    card.last_check = Some(now);
                    card.check = Some((next_check, now));
                    let (id, name, kind) = (next_check, name.clone(), card.spec.kind);
                    let pid = card.child.as_ref().map_or(0, Child::id);
                    let socket = card.spec.agent_socket.clone();
                    let timeout = config.health_timeout;
                    let tx = results_tx.clone();
                    let spawned = std::thread::Builder::new()
                        .name("card-health".into())
                        .spawn(move || {
                            let result = check_health(kind, pid, &socket, timeout);
                            let _ = tx.send((name, id, result));
                        });
                    if let Err(e) = spawned {
                        card.check = None;
                        let reason = format!("starting a health check: {e}");
                        apply_health(card, Err(reason), config, &mut emit);
                    }
                }
            }
        }
        for (name, kind) in events {
            shared.emit(&name, kind);
        }
        std::thread::sleep(TICK);
    }
}

/// Reaps an exited card and schedules its restart, or restarts one whose
/// backoff has passed.
fn step(
    card: &mut Card,
    now: Instant,
    config: &SupervisorConfig,
    emit: &mut dyn FnMut(CardEventKind),
) {
    match card.phase {
        Phase::Starting | Phase::Running { .. } | Phase::Killed => {
            let exited = match card.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status),
                _ => None,
            };
            if let Some(status) = exited {
                card.child = None;
                emit(CardEventKind::Exited { status });
                if card
                    .healthy_since
                    .is_some_and(|t| now.duration_since(t) >= config.stable_after)
                {
                    card.backoff = config.backoff_initial;
                }
                let delay = card.backoff;
                card.backoff = (card.backoff * 2).min(config.backoff_max);
                card.healthy_since = None;
                card.phase = Phase::Backoff { until: now + delay };
                emit(CardEventKind::Restarting {
                    after_ms: delay.as_millis() as u64,
                });
            }
        }
        Phase::Backoff { until } if now >= until => {
            card.restarts += 1;
            match spawn(card, config.boot_log.as_ref()) {
                Ok(pid) => emit(CardEventKind::Started { pid }),
                Err(reason) => {
                    card.last_failure = Some(reason.clone());
                    emit(CardEventKind::Unhealthy { reason });
                    let delay = card.backoff;
                    card.backoff = (card.backoff * 2).min(config.backoff_max);
                    card.phase = Phase::Backoff { until: now + delay };
                    emit(CardEventKind::Restarting {
                        after_ms: delay.as_millis() as u64,
                    });
                }
            }
        }
        Phase::Backoff { .. } | Phase::Stopping | Phase::Stopped => {}
    }
}

fn apply_health(
    card: &mut Card,
    result: Result<(), String>,
    config: &SupervisorConfig,
    emit: &mut dyn FnMut(CardEventKind),
) {
    match (card.phase, result) {
        (Phase::Starting, Ok(())) | (Phase::Running { failed_checks: 1.. }, Ok(())) => {
            if card.phase == Phase::Starting {
                card.healthy_since = Some(Instant::now());
                card.start_probe = None;
            }
            card.phase = Phase::Running { failed_checks: 0 };
            emit(CardEventKind::Healthy);
        }
        (Phase::Starting, Err(reason)) => {
            card.start_probe = Some(reason.clone());
            if card.started_at.elapsed() >= config.start_timeout {
                card.last_failure = Some(reason.clone());
                emit(CardEventKind::Unhealthy {
                    reason: format!(
                        "not healthy {:?} after starting ({reason}): killed",
                        config.start_timeout
                    ),
                });
                kill(card);
            }
        }
        (Phase::Running { failed_checks }, Err(reason)) => {
            let failed_checks = failed_checks + 1;
            card.phase = Phase::Running { failed_checks };
            card.last_failure = Some(reason.clone());
            let killing = failed_checks >= config.unhealthy_limit;
            emit(CardEventKind::Unhealthy {
                reason: if killing {
                    format!("{failed_checks} failed health checks ({reason}): killed")
                } else {
                    reason
                },
            });
            if killing {
                kill(card);
            }
        }
        _ => {}
    }
}

/// SIGKILL; the watcher reaps the exit and restarts the card.
fn kill(card: &mut Card) {
    if let Some(child) = card.child.as_mut() {
        let _ = child.kill();
    }
    card.phase = Phase::Killed;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::Receiver;

    fn fast() -> SupervisorConfig {
        SupervisorConfig {
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
            stable_after: Duration::from_secs(30),
            health_interval: Duration::from_millis(100),
            health_timeout: Duration::from_millis(200),
            start_timeout: Duration::from_secs(5),
            unhealthy_limit: 3,
            stop_grace: Duration::from_secs(2),
            boot_log: None,
        }
    }

    /// A card whose agent hangs: it listens but never accepts, so every
    /// hello goes unanswered. (Real cards are supervised in the tests
    /// crate's host_runtime_guest tests.)
    const HUNG_AGENT: &str = "import socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.bind(sys.argv[1])\n\
        s.listen(0)\n\
        time.sleep(3600)\n";

    fn next_kind(events: &Receiver<CardEvent>) -> CardEventKind {
        events
            .recv_timeout(Duration::from_secs(10))
            .expect("an event within 10 s")
            .kind
    }

    #[test]
    fn a_card_that_keeps_crashing_backs_off_exponentially() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, events) = crossbeam_channel::unbounded();
        let sup = Supervisor::with_config(tx, fast());
        sup.start(CardSpec {
            name: "crashy".into(),
            kind: CardKind::Net,
            program: CardProgram::Binary("/bin/sh".into()),
            args: vec!["-c".into(), "exit 3".into()],
            agent_socket: dir.path().join("none.sock"),
            log: dir.path().join("crashy.log"),
        })
        .unwrap();
        let mut delays = Vec::new();
        while delays.len() < 5 {
            if let CardEventKind::Restarting { after_ms } = next_kind(&events) {
                delays.push(after_ms);
            }
        }
        assert_eq!(delays, [50, 100, 200, 400, 400]);
        assert!(sup.status("crashy").unwrap().restarts >= 4);
    }

    #[test]
    fn a_card_whose_agent_never_answers_is_killed_and_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let python = PathBuf::from("/usr/bin/python3");
        assert!(python.is_file(), "this test needs /usr/bin/python3");
        let socket = dir.path().join("hung.sock");
        let (tx, events) = crossbeam_channel::unbounded();
        let config = SupervisorConfig {
            start_timeout: Duration::from_secs(1),
            ..fast()
        };
        let sup = Supervisor::with_config(tx, config);
        let pid = sup
            .start(CardSpec {
                name: "blk-hung".into(),
                kind: CardKind::Block,
                program: CardProgram::Binary(python),
                args: vec!["-c".into(), HUNG_AGENT.into(), socket.clone().into()],
                agent_socket: socket,
                log: dir.path().join("hung.log"),
            })
            .unwrap();
        assert_eq!(next_kind(&events), CardEventKind::Started { pid });
        match next_kind(&events) {
            CardEventKind::Unhealthy { reason } => {
                assert!(reason.contains("killed"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let k = next_kind(&events);
        assert!(matches!(k, CardEventKind::Exited { .. }), "{k:?}");
        assert!(matches!(
            next_kind(&events),
            CardEventKind::Restarting { after_ms: 50 }
        ));
        assert!(matches!(
            next_kind(&events),
            CardEventKind::Started { pid: again } if again != pid
        ));
        let err = sup.wait_healthy("blk-hung", Duration::from_millis(300));
        assert!(matches!(err, Err(CardError::NotHealthy { .. })), "{err:?}");
    }

    /// Checks that race a starting card's agent socket are not failures:
    /// they explain a card that is not up yet, and vanish once it is.
    #[test]
    fn a_card_that_comes_up_shows_no_failure_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut card = Card {
            spec: CardSpec {
                name: "blk-starting".into(),
                kind: CardKind::Block,
                program: CardProgram::Binary("/bin/true".into()),
                args: vec![],
                agent_socket: dir.path().join("agent.sock"),
                log: dir.path().join("card.log"),
            },
            child: None,
            phase: Phase::Starting,
            backoff: Duration::from_millis(50),
            started_at: Instant::now(),
            healthy_since: None,
            last_check: None,
            check: None,
            restarts: 0,
            last_failure: None,
            start_probe: None,
        };
        let mut events = Vec::new();
        let config = fast();
        let not_yet = "cannot connect to agent socket: No such file or directory".to_string();
        apply_health(&mut card, Err(not_yet.clone()), &config, &mut |e| {
            events.push(e)
        });
        assert_eq!(card.status().phase, CardPhase::Starting);
        assert_eq!(card.status().last_failure, Some(not_yet));
        apply_health(&mut card, Ok(()), &config, &mut |e| events.push(e));
        assert_eq!(card.status().phase, CardPhase::Healthy);
        assert_eq!(card.status().last_failure, None);
        assert_eq!(events, [CardEventKind::Healthy]);
    }

    /// An image holding a copy of /bin/sh as its one binary, `card`.
    fn sh_image(dir: &Path, version: &str) -> Arc<VerifiedImage> {
        use card_firmware::boot;
        let bin = boot::create_bin_dir(dir).unwrap();
        fs::copy("/bin/sh", bin.join("card")).unwrap();
        let key = boot::generate_signing_key().unwrap();
        boot::sign_image(dir, &key, version).unwrap();
        let trusted = boot::TrustedKeys::from_keys(vec![key.verifying_key()]);
        Arc::new(boot::verify_image(dir, &trusted).unwrap())
    }

    #[test]
    fn starts_from_an_image_are_measured_and_an_unmeasurable_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = MeasuredBootLog::new(&dir.path().join("boot.log"));
        let (tx, _events) = crossbeam_channel::unbounded();
        let config = SupervisorConfig {
            boot_log: Some(log.clone()),
            start_timeout: Duration::from_millis(500),
            ..fast()
        };
        let sup = Supervisor::with_config(tx, config);
        let (v1, v2) = (
            sh_image(&dir.path().join("v1"), "1.0"),
            sh_image(&dir.path().join("v2"), "2.0"),
        );
        let image = |image: &Arc<VerifiedImage>| CardProgram::Image {
            image: image.clone(),
            binary: "card".into(),
        };
        let spec = CardSpec {
            name: "blk-measured".into(),
            kind: CardKind::Block,
            program: image(&v1),
            args: vec!["-c".into(), "sleep 60".into()],
            agent_socket: dir.path().join("none.sock"),
            log: dir.path().join("card.log"),
        };
        sup.start(spec.clone()).unwrap();
        // Not healthy (no agent), but started: restart() says so after the
        // start, which is measured all the same.
        let _ = sup.restart("blk-measured", Some(image(&v2)));
        let entries = log.verify().unwrap();
        let got: Vec<(&str, &str, &str)> = entries
            .iter()
            .map(|e| (e.card.as_str(), e.binary.as_str(), e.image_version.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("blk-measured", "card", "1.0"),
                ("blk-measured", "card", "2.0")
            ]
        );
        assert_eq!(entries[1].sha256, v2.sha256("card").unwrap());
        // A binary is not measured: there is no verified digest to record.
        sup.restart("blk-measured", Some(CardProgram::Binary("/bin/sh".into())))
            .unwrap_err();
        assert_eq!(log.verify().unwrap().len(), 2);
        sup.stop("blk-measured").unwrap();

        // A log that was edited cannot be extended: the start is refused.
        let text = fs::read_to_string(log.path()).unwrap();
        fs::write(log.path(), text.replacen("\"1.0\"", "\"1.1\"", 1)).unwrap();
        let err = sup
            .start(CardSpec {
                name: "blk-other".into(),
                ..spec
            })
            .unwrap_err();
        assert!(
            matches!(&err, CardError::StartFailed { reason, .. } if reason.contains("boot log")),
            "{err}"
        );
        assert_eq!(sup.list().len(), 1, "{:?}", sup.list());
    }

    #[test]
    fn bad_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _events) = crossbeam_channel::unbounded();
        let sup = Supervisor::with_config(tx, fast());
        let spec = |name: &str, program: &str| CardSpec {
            name: name.into(),
            kind: CardKind::Block,
            program: CardProgram::Binary(program.into()),
            args: vec![],
            agent_socket: dir.path().join("a.sock"),
            log: dir.path().join("a.log"),
        };
        assert!(matches!(
            sup.start(spec("bad name/..", "/bin/true")),
            Err(CardError::InvalidName { .. })
        ));
        assert!(matches!(
            sup.start(spec("blk-1", "/no/such/card")),
            Err(CardError::StartFailed { .. })
        ));
        assert!(sup.list().is_empty());
        assert!(matches!(sup.stop("blk-1"), Err(CardError::NotFound { .. })));
        assert!(matches!(
            sup.restart("blk-1", None),
            Err(CardError::NotFound { .. })
        ));
    }
}
