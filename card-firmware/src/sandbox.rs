//! A card's sandbox, in the spirit of Firecracker's jailer.
//!
//! A card faces a guest that may be hostile. Once it has opened its media and
//! bound its sockets it needs almost nothing from the host, so before it
//! serves a single request it gives up everything else, in this order:
//!
//! 1. **Mount namespace.** A private mount namespace whose root is a fresh,
//!    read-only tmpfs holding only the paths the card still names at run time
//!    (the metrics folder, say), bind-mounted at their usual place. The media
//!    and the sockets are already open and need no path.
//! 2. **Capabilities and uid.** Every capability leaves the bounding set, then
//!    the card becomes an unprivileged uid and gid (nobody by default), which
//!    clears the permitted and effective sets.
//! 3. **no_new_privs**, so nothing it could exec gains privileges.
//! 4. **seccomp**: an allowlist of the system calls the card's threads use;
//!    any other call traps, the card writes which call it was to stderr and
//!    dies of SIGSYS.
//!
//! Steps 1 and 2 need root; a card started by an unprivileged user keeps its
//! uid and the host's mount namespace and still gets 3 and 4.
//!
//! [`enter`] must run while the card has a single thread: a mount namespace
//! belongs to a thread, and threads started afterwards inherit the jail and
//! the filter.
//!
//! io_uring requests are carried out by the kernel outside any seccomp filter;
//! what a card's rings may do is bounded by the operations the card builds
//! (see docs/SECURITY.md).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The uid and gid a card runs as when started as root and none is given:
/// `nobody`.
pub const DEFAULT_ID: u32 = 65534;

/// Where the jail's tmpfs is mounted before it becomes the card's root. Any
/// folder would do: it is shadowed only inside the card's own namespace.
const STAGING: &str = "/tmp";

/// What a card keeps once jailed.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// Folders the card writes by name after it is jailed (a metrics file is
    /// replaced by rename, so its folder must be writable by the card's uid).
    pub writable_dirs: Vec<PathBuf>,
    /// The uid and gid to run as; [`DEFAULT_ID`] if unset and started as root.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// The sandbox flags every card takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SandboxArgs {
    /// Run without the sandbox (no seccomp filter, mount namespace or uid
    /// change): for debugging only.
    #[arg(long)]
    pub no_sandbox: bool,
    /// The uid to run as once jailed (default 65534, nobody, when started as root).
    #[arg(long)]
    pub uid: Option<u32>,
    /// The gid to run as once jailed (default 65534 when started as root).
    #[arg(long)]
    pub gid: Option<u32>,
}

impl SandboxArgs {
    /// Enters the sandbox unless `--no-sandbox`; `writable_dirs` as in
    /// [`SandboxConfig`]. Returns what was done, or None without a sandbox.
    pub fn enter(
        &self,
        writable_dirs: Vec<PathBuf>,
        allowlist: &Allowlist,
    ) -> Result<Option<Jail>, SandboxError> {
        if self.no_sandbox {
            return Ok(None);
        }
        let config = SandboxConfig {
            writable_dirs,
            uid: self.uid,
            gid: self.gid,
        };
        enter(&config, allowlist).map(Some)
    }
}

impl SandboxArgs {
    /// What every card does once its sockets are bound and its media open:
    /// makes `metrics` (the `--metrics` path, if any) absolute, so it can be
    /// written from inside the jail; enters the sandbox with that file's
    /// folder writable and `process` as the allowlist (unless
    /// `--no-sandbox`); sets `queue_worker` as what queue workers confine
    /// themselves to; logs what was done. Returns the absolute metrics path.
    pub fn jail_card(
        &self,
        metrics: Option<&Path>,
        process: &Allowlist,
        queue_worker: &Allowlist,
    ) -> Result<Option<PathBuf>, SandboxError> {
        let metrics = metrics
            .map(|p| {
                crate::metrics::absolute_path(p).map_err(|source| SandboxError::Os {
                    step: format!("--metrics {}", p.display()),
                    source,
                })
            })
            .transpose()?;
        let writable = metrics
            .iter()
            .filter_map(|p| p.parent().map(PathBuf::from))
            .collect();
        if let Some(jail) = self.enter(writable, process)? {
            set_queue_worker_allowlist(queue_worker)?;
            tracing::info!(
                uid = jail.uid,
                gid = jail.gid,
                private_root = jail.private_root,
                syscalls = jail.syscalls,
                "sandbox entered"
            );
        }
        Ok(metrics)
    }
}

/// The system calls a card may make, by name so they can be documented.
#[derive(Debug, Clone)]
pub struct Allowlist {
    calls: Vec<(&'static str, i64)>,
}

/// `syscalls![read, write]` is the allowlist entries for those calls.
#[macro_export]
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        [$((stringify!($name), ::libc::$name)),*]
    };
}

impl Allowlist {
    /// What every card needs once serving: memory, threads, signals, time,
    /// the sockets it already has (accept, messages with descriptors),
    /// epoll, eventfds, timerfds, io_uring, and reading and writing open
    /// descriptors. Measured with `strace -f` over the block card's tests
    /// (startup excluded: it happens before the filter).
    pub fn card_base() -> Self {
        let calls = syscalls![
            // Descriptors the card holds.
            SYS_read,
            SYS_write,
            SYS_pread64,
            SYS_pwrite64,
            SYS_close,
            SYS_fcntl,
            SYS_fdatasync,
            // Memory: the allocator and guest memory regions.
            SYS_mmap,
            SYS_munmap,
            SYS_mprotect,
            SYS_madvise,
            SYS_mremap,
            SYS_brk,
            // Threads, their names and their exits.
            SYS_clone,
            SYS_clone3,
            SYS_futex,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_gettid,
            SYS_getpid,
            SYS_prctl,
            SYS_sched_getaffinity,
            SYS_sched_yield,
            SYS_exit,
            SYS_exit_group,
            // Signals: the SIGSYS report itself, abort() for crash faults.
            SYS_rt_sigaction,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_tgkill,
            // Time and randomness.
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            // A sleep or wait interrupted by a signal resumes through it.
            SYS_restart_syscall,
            SYS_getrandom,
            // Waiting: epoll, eventfds, timerfds.
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_wait,
            SYS_eventfd2,
            SYS_timerfd_create,
            SYS_timerfd_settime,
            // Sockets already bound: new VMM and control connections.
            SYS_accept4,
            SYS_recvmsg,
            SYS_sendmsg,
            SYS_recvfrom,
            SYS_sendto,
            SYS_shutdown,
            // Metrics files; and glibc opens /proc/sys/vm/overcommit_memory
            // the first time a thread's malloc arena shrinks (a thread
            // ending), in whichever thread that is. The jail's root is empty.
            SYS_openat,
            // Threads that confine themselves further (queue workers).
            SYS_seccomp,
            // The queues' rings.
            SYS_io_uring_setup,
            SYS_io_uring_enter,
            SYS_io_uring_register,
        ];
        Allowlist {
            calls: calls.to_vec(),
        }
    }

    /// What any queue worker needs besides waiting on its own descriptors:
    /// reading and writing them (eventfds), memory, thread housekeeping and
    /// its end, time, the SIGSYS report. A card adds how its worker waits
    /// and enters its ring.
    pub fn queue_worker_base() -> Self {
        let calls = syscalls![
            SYS_read,
            SYS_write,
            SYS_close,
            // Debug builds of std check a descriptor they close (F_GETFD).
            SYS_fcntl,
            SYS_futex,
            SYS_mmap,
            SYS_munmap,
            SYS_mprotect,
            SYS_madvise,
            SYS_mremap,
            SYS_brk,
            SYS_getrandom,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_restart_syscall,
            SYS_sched_yield,
            SYS_sched_getaffinity,
            SYS_gettid,
            SYS_getpid,
            SYS_prctl,
            SYS_rseq,
            SYS_set_robust_list,
            SYS_sigaltstack,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_tgkill,
            SYS_exit,
        ];
        Allowlist {
            calls: calls.to_vec(),
        }
    }

    /// Exactly `calls` (a thread's own list).
    pub fn from_calls(calls: &[(&'static str, i64)]) -> Self {
        Allowlist { calls: Vec::new() }.with(calls)
    }

    /// Adds calls a particular card needs beyond [`Allowlist::card_base`].
    pub fn with(mut self, calls: &[(&'static str, i64)]) -> Self {
        for &(name, nr) in calls {
            if !self.calls.iter().any(|&(_, n)| n == nr) {
                self.calls.push((name, nr));
            }
        }
        self
    }

    /// The names of the allowed calls, sorted (for docs and tests).
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self
            .calls
            .iter()
            .map(|(name, _)| name.trim_start_matches("SYS_"))
            .collect();
        names.sort_unstable();
        names
    }

    /// Whether `nr` is allowed.
    pub fn allows(&self, nr: i64) -> bool {
        self.calls.iter().any(|&(_, n)| n == nr)
    }

    /// The BPF program: allowed calls pass, any other traps (SIGSYS).
    pub fn compile(&self) -> Result<BpfProgram, SandboxError> {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            self.calls.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
        let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox must be entered while the card has one thread (it has {0})")]
    Threaded(usize),
    #[error("sandbox: {step}: {source}")]
    Os {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "sandbox: uid {uid} cannot write {}: give that folder to the uid, choose another \
         with --uid/--gid, or run with --no-sandbox",
        path.display()
    )]
    NotWritable { uid: u32, path: PathBuf },
    #[error("sandbox: {0} is not an absolute path")]
    Relative(PathBuf),
    #[error("sandbox: seccomp filter: {0}")]
    Seccomp(String),
}

fn os(step: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let step = step.into();
    move |source| SandboxError::Os { step, source }
}

/// The allowlist a document gives between `<!-- BEGIN name -->` and
/// `<!-- END name -->`, one backquoted call name each, sorted: each card's
/// tests compare docs/SECURITY.md with its code through this.
pub fn documented_allowlist(doc: &str, name: &str) -> Vec<String> {
    let begin = format!("<!-- BEGIN {name} -->");
    let end = format!("<!-- END {name} -->");
    let Some(start) = doc.find(&begin).map(|i| i + begin.len()) else {
        return Vec::new();
    };
    let stop = doc[start..].find(&end).map_or(doc.len(), |i| i + start);
    let mut names: Vec<String> = doc[start..stop]
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

/// The filters queue workers put on themselves, on top of the process's:
/// set once by the card after it enters its sandbox.
static QUEUE_WORKER_FILTERS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

thread_local! {
    static CONFINED: Cell<bool> = const { Cell::new(false) };
}

/// Calls a confined queue worker may attempt but that fail with EACCES
/// instead of killing the card: glibc opens
/// /proc/sys/vm/overcommit_memory the first time a thread's malloc arena
/// shrinks (a worker ending, say). A worker opens nothing on purpose.
pub const QUEUE_WORKER_REFUSED: &[(&str, i64)] = &syscalls![SYS_openat];

/// Sets the allowlist of queue-worker threads: the threads that parse what
/// the guest put in its queues, and so the ones an attacker reaches first.
/// They need far less than the process (no accept, no new rings, no files).
/// The calls in [`QUEUE_WORKER_REFUSED`] fail with EACCES.
pub fn set_queue_worker_allowlist(allowlist: &Allowlist) -> Result<(), SandboxError> {
    // Two filters: the allowlist (which lets the refused calls through) and
    // one that answers the refused calls EACCES. The kernel runs both and
    // takes the stricter answer, so refused calls fail and others pass.
    let allow = allowlist.clone().with(QUEUE_WORKER_REFUSED).compile()?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = QUEUE_WORKER_REFUSED
        .iter()
        .map(|&(_, nr)| (nr, Vec::new()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let refuse: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .and_then(TryInto::try_into)
    .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    QUEUE_WORKER_FILTERS
        // Installed in this order: once the allowlist is on, installing
        // another filter (prctl, seccomp) is itself forbidden.
        .set(vec![refuse, allow])
        .map_err(|_| SandboxError::Seccomp("the queue-worker filter is already set".into()))
}

/// Called by a queue worker before it touches guest data: installs the
/// queue-worker filters on this thread, once. Without a sandbox it does
/// nothing.
pub fn confine_queue_worker() {
    if CONFINED.with(|c| c.replace(true)) {
        return;
    }
    for program in QUEUE_WORKER_FILTERS.get().into_iter().flatten() {
        if let Err(e) = seccompiler::apply_filter(program) {
            // Still under the process's filter; say so once.
            tracing::error!(error = %e, "cannot confine a queue worker");
        }
    }
}

/// What [`enter`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
    /// Whether the card has its own mount namespace and root (only as root).
    pub private_root: bool,
    pub syscalls: usize,
}

/// Jails the calling process: see the module documentation.
pub fn enter(config: &SandboxConfig, allowlist: &Allowlist) -> Result<Jail, SandboxError> {
    let threads = thread_count().map_err(os("counting threads"))?;
    if threads != 1 {
        return Err(SandboxError::Threaded(threads));
    }
    let program = allowlist.compile()?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (uid, gid, private_root) = if root {
        let uid = config.uid.unwrap_or(DEFAULT_ID);
        let gid = config.gid.unwrap_or(DEFAULT_ID);
        private_root_with(&config.writable_dirs)?;
        drop_privileges(uid, gid)?;
        (uid, gid, true)
    } else {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        if config.uid.is_some_and(|u| u != uid) || config.gid.is_some_and(|g| g != gid) {
            return Err(SandboxError::Os {
                step: "changing uid".into(),
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        (uid, gid, false)
    };
    for dir in &config.writable_dirs {
        if !writable(dir) {
            return Err(SandboxError::NotWritable {
                uid,
                path: dir.clone(),
            });
        }
    }
    install_sigsys_reporter().map_err(os("installing the SIGSYS handler"))?;
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    Ok(Jail {
        uid,
        gid,
        private_root,
        syscalls: allowlist.calls.len(),
    })
}

fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Steps 1: a private mount namespace whose root holds only `writable_dirs`.
fn private_root_with(writable_dirs: &[PathBuf]) -> Result<(), SandboxError> {
    // SAFETY: unshare and mount take no pointers but the C strings below,
    // which outlive the calls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "unshare(CLONE_NEWNS)")?;
        mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)
            .map_err(os("making mounts private"))?;
    }
    // Open what stays visible before anything is hidden: the bind mounts
    // below take their source from these descriptors, opened inside the new
    // namespace because a bind source must belong to it.
    let mut keep = Vec::new();
    for dir in writable_dirs {
        if !dir.is_absolute() {
            return Err(SandboxError::Relative(dir.clone()));
        }
        let fd: OwnedFd = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir)
            .map_err(os(format!("opening {}", dir.display())))?
            .into();
        keep.push((dir.clone(), fd));
    }

    let locked = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        STAGING,
        Some("tmpfs"),
        locked,
        Some("mode=0755,size=64k"),
    )
    .map_err(os("mounting the jail's tmpfs"))?;
    for (dir, fd) in &keep {
        let inside = Path::new(STAGING).join(relative(dir));
        std::fs::create_dir_all(&inside).map_err(os(format!("creating {}", inside.display())))?;
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        mount(
            Some(&source),
            &inside.to_string_lossy(),
            None,
            libc::MS_BIND,
            None,
        )
        .map_err(os(format!("bind-mounting {}", dir.display())))?;
        mount(
            None,
            &inside.to_string_lossy(),
            None,
            libc::MS_REMOUNT | libc::MS_BIND | locked,
            None,
        )
        .map_err(os(format!("restricting {}", dir.display())))?;
    }
    drop(keep);

    // pivot_root(".", ".") stacks the old root under the new one; detaching
    // it leaves the tmpfs alone as the root.
    std::env::set_current_dir(STAGING).map_err(os("entering the jail"))?;
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: both arguments are valid C strings.
    unsafe {
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as i32,
            "pivot_root",
        )?;
        check(
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
            "detaching the old root",
        )?;
    }
    std::env::set_current_dir("/").map_err(os("entering the new root"))?;
    mount(
        None,
        "/",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | locked,
        None,
    )
    .map_err(os("making the root read-only"))
}

/// Step 2: no capabilities, then an unprivileged uid and gid.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), SandboxError> {
    // SAFETY: prctl/setgroups/setres[ug]id with plain integer arguments.
    unsafe {
        for cap in 0..64 {
            // EINVAL past the kernel's last capability: done.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(SandboxError::Os {
                    step: format!("dropping capability {cap}"),
                    source: e,
                });
            }
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
            "clearing ambient capabilities",
        )?;
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(gid, gid, gid), "setresgid")?;
        check(libc::setresuid(uid, uid, uid), "setresuid")?;
    }
    Ok(())
}

fn writable(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// `/a/b` → `a/b`.
fn relative(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let source = source.map(c).transpose()?;
    let target = c(target)?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a valid C string living to the end of
    // the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check(rc: i32, step: &str) -> Result<(), SandboxError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(SandboxError::Os {
            step: step.into(),
            source: io::Error::last_os_error(),
        })
    }
}

/// A SIGSYS handler that names the forbidden call on stderr, then lets the
/// signal kill the card.
fn install_sigsys_reporter() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes
    // async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The message the SIGSYS handler writes before the card dies.
pub const FORBIDDEN_SYSCALL_MESSAGE: &str = "cardsim sandbox: forbidden system call ";

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The kernel's siginfo for SIGSYS: after si_signo, si_errno, si_code
    // (and padding) come si_call_addr (a pointer), si_syscall, si_arch.
    // SAFETY: the kernel passes a valid siginfo; the offsets are its ABI.
    let nr = unsafe {
        let base = info.cast::<u8>();
        std::ptr::read_unaligned(base.add(16 + std::mem::size_of::<usize>()).cast::<i32>())
    };
    let mut buf = [0u8; 96];
    let mut len = 0;
    for &b in FORBIDDEN_SYSCALL_MESSAGE.as_bytes() {
        buf[len] = b;
        len += 1;
    }
    len += write_decimal(&mut buf[len..], nr);
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write and raise are async-signal-safe; SA_RESETHAND restored
    // the default action, so the raised SIGSYS ends the process once this
    // handler returns.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::raise(libc::SIGSYS);
    }
}

fn write_decimal(out: &mut [u8], value: i32) -> usize {
    let mut digits = [0u8; 12];
    let mut n = value.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut len = 0;
    if value < 0 {
        out[0] = b'-';
        len = 1;
    }
    for &d in &digits[i..] {
        out[len] = d;
        len += 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_formatting() {
        let mut b = [0u8; 12];
        let n = write_decimal(&mut b, 41);
        assert_eq!(&b[..n], b"41");
        let n = write_decimal(&mut b, -7);
        assert_eq!(&b[..n], b"-7");
        let n = write_decimal(&mut b, 0);
        assert_eq!(&b[..n], b"0");
    }

    #[test]
    fn allowlist_compiles_and_names_its_calls() {
        let list = Allowlist::card_base().with(&syscalls![SYS_openat]);
        assert!(list.allows(libc::SYS_openat));
        assert!(!list.allows(libc::SYS_execve));
        assert!(list.names().contains(&"io_uring_enter"));
        assert!(!list.compile().unwrap().is_empty());
    }

    #[test]
    fn relative_paths_inside_the_jail() {
        assert_eq!(relative(Path::new("/a/b/")), PathBuf::from("a/b"));
    }

    /// Runs `body` in a forked child — single-threaded, as a card is when
    /// it jails itself — and returns what it wrote to the pipe, how it ended
    /// and its stderr. The filter and the jail never touch the test runner.
    fn in_child(body: impl FnOnce(&mut dyn FnMut(&str))) -> (String, i32, String) {
        let mut out = [0i32; 2];
        let mut err = [0i32; 2];
        // SAFETY: plain pipe/fork/dup2/waitpid; the child only runs `body`
        // and leaves with _exit.
        unsafe {
            assert_eq!(libc::pipe(out.as_mut_ptr()), 0);
            assert_eq!(libc::pipe(err.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::dup2(err[1], 2);
                let fd = out[1];
                let mut say = |s: &str| {
                    libc::write(fd, s.as_ptr().cast(), s.len());
                    libc::write(fd, b"\n".as_ptr().cast(), 1);
                };
                body(&mut say);
                libc::_exit(0);
            }
            libc::close(out[1]);
            libc::close(err[1]);
            let read_all = |fd: i32| {
                let mut f = File::from_raw_fd(fd);
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut f, &mut s);
                s
            };
            let stdout = read_all(out[0]);
            let stderr = read_all(err[0]);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            (stdout, status, stderr)
        }
    }

    use std::os::fd::FromRawFd;

    #[test]
    fn a_forbidden_call_kills_the_process_and_is_named() {
        let (stdout, status, stderr) = in_child(|say| {
            let jail = enter(&SandboxConfig::default(), &Allowlist::card_base());
            say(&format!("entered {}", jail.is_ok()));
            // Allowed: an eventfd.
            // SAFETY: plain syscalls.
            let fd = unsafe { libc::eventfd(0, 0) };
            say(&format!("eventfd {}", fd >= 0));
            // Forbidden: socketpair is not in the base list.
            let mut pair = [0i32; 2];
            // SAFETY: a valid array for the two descriptors.
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) };
            say("survived");
        });
        assert!(stdout.contains("entered true"), "{stdout}{stderr}");
        assert!(stdout.contains("eventfd true"), "{stdout}{stderr}");
        assert!(!stdout.contains("survived"), "{stdout}{stderr}");
        assert!(libc::WIFSIGNALED(status), "status {status:#x}: {stderr}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS, "{stderr}");
        let named = format!("{FORBIDDEN_SYSCALL_MESSAGE}{}", libc::SYS_socketpair);
        assert!(stderr.contains(&named), "{stderr}");
    }

    #[test]
    fn a_confined_worker_is_refused_files_and_killed_by_the_rest() {
        let (stdout, status, stderr) = in_child(|say| {
            enter(&SandboxConfig::default(), &Allowlist::card_base()).unwrap();
            let worker = Allowlist::from_calls(&syscalls![
                SYS_write,
                SYS_rt_sigreturn,
                SYS_rt_sigprocmask,
                SYS_tgkill,
                SYS_getpid,
                SYS_gettid,
                SYS_exit_group,
                SYS_close,
            ]);
            set_queue_worker_allowlist(&worker).unwrap();
            confine_queue_worker();
            // Refused, not fatal: what glibc's arena trimming meets.
            let open = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
            say(&format!("open {open:?}"));
            // Allowed to the process, not to a worker: fatal.
            // SAFETY: no arguments that matter; the filter stops it.
            unsafe { libc::eventfd(0, 0) };
            say("survived");
        });
        assert!(
            stdout.contains(&format!("open Err(Some({}))", libc::EACCES)),
            "{stdout}{stderr}"
        );
        assert!(!stdout.contains("survived"), "{stdout}{stderr}");
        assert!(libc::WIFSIGNALED(status), "{stderr}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS, "{stderr}");
        assert!(
            stderr.contains(&format!(
                "{FORBIDDEN_SYSCALL_MESSAGE}{}",
                libc::SYS_eventfd2
            )),
            "{stderr}"
        );
    }

    #[test]
    fn a_jailed_process_sees_only_its_folders() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: the mount namespace needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(DEFAULT_ID), Some(DEFAULT_ID)).unwrap();
        let path = dir.path().to_owned();
        let (stdout, status, stderr) = in_child(|say| {
            let config = SandboxConfig {
                writable_dirs: vec![path.clone()],
                uid: None,
                gid: None,
            };
            let list = Allowlist::card_base().with(&syscalls![
                SYS_openat,
                SYS_getdents64,
                SYS_geteuid,
                SYS_newfstatat,
                SYS_statx
            ]);
            match enter(&config, &list) {
                Ok(jail) => say(&format!(
                    "uid={} private_root={}",
                    jail.uid, jail.private_root
                )),
                Err(e) => say(&format!("error {e}")),
            }
            let root: Vec<String> = std::fs::read_dir("/")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            say(&format!("root={root:?}"));
            say(&format!(
                "write={}",
                std::fs::write(path.join("written"), b"x").is_ok()
            ));
            say(&format!(
                "etc_visible={}",
                Path::new("/etc/passwd").exists()
            ));
            // SAFETY: geteuid has no preconditions.
            say(&format!("euid={}", unsafe { libc::geteuid() }));
        });
        assert_eq!(status, 0, "{stdout}{stderr}");
        assert!(stdout.contains("uid=65534 private_root=true"), "{stdout}");
        let top = relative(dir.path())
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap();
        assert!(stdout.contains(&format!("root=[\"{top}\"]")), "{stdout}");
        assert!(stdout.contains("write=true"), "{stdout}");
        assert!(stdout.contains("etc_visible=false"), "{stdout}");
        assert!(stdout.contains("euid=65534"), "{stdout}");
        assert_eq!(std::fs::read(dir.path().join("written")).unwrap(), b"x");
    }

    #[test]
    fn a_folder_the_uid_cannot_write_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap(); // root's, 0700
        let path = dir.path().to_owned();
        let (stdout, _, stderr) = in_child(|say| {
            let config = SandboxConfig {
                writable_dirs: vec![path.clone()],
                ..SandboxConfig::default()
            };
            match enter(&config, &Allowlist::card_base()) {
                Ok(_) => say("entered"),
                Err(e) => say(&format!("error {e}")),
            }
        });
        assert!(
            stdout.contains("error sandbox: uid 65534 cannot write"),
            "{stdout}{stderr}"
        );
    }
}
