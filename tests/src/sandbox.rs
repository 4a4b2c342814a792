//! Checking a running card's sandbox from outside: what /proc says about it,
//! and making one of its threads call something its filter forbids.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The sandbox-related lines of `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessJail {
    pub uid: u32,
    pub gid: u32,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub no_new_privs: bool,
    /// 2 when a seccomp filter is installed.
    pub seccomp: u32,
    /// Whether the process's mount namespace differs from ours.
    pub own_mount_namespace: bool,
    /// What the process sees at `/`.
    pub root_entries: Vec<String>,
}

/// Reads the jail of `pid`.
pub fn process_jail(pid: u32) -> Result<ProcessJail> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<&str> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let first = |text: &str| -> Result<u32> {
        Ok(text
            .split_whitespace()
            .next()
            .context("empty field")?
            .parse()?)
    };
    let mnt = |p: &str| std::fs::read_link(p).map(|l| l.display().to_string());
    let mut root_entries: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .with_context(|| format!("listing /proc/{pid}/root"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    root_entries.sort();
    Ok(ProcessJail {
        uid: first(field("Uid:")?)?,
        gid: first(field("Gid:")?)?,
        cap_effective: u64::from_str_radix(field("CapEff:")?, 16)?,
        cap_bounding: u64::from_str_radix(field("CapBnd:")?, 16)?,
        no_new_privs: field("NoNewPrivs:")? == "1",
        seccomp: first(field("Seccomp:")?)?,
        own_mount_namespace: mnt(&format!("/proc/{pid}/ns/mnt"))? != mnt("/proc/self/ns/mnt")?,
        root_entries,
    })
}

/// Waits until `pid` has installed a seccomp filter (a card jails itself
/// just after binding its sockets).
pub fn wait_for_seccomp(pid: u32, timeout: Duration) -> Result<ProcessJail> {
    let deadline = Instant::now() + timeout;
    loop {
        let jail = process_jail(pid)?;
        if jail.seccomp == 2 {
            return Ok(jail);
        }
        if Instant::now() > deadline {
            bail!("process {pid} installed no seccomp filter within {timeout:?}: {jail:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes thread `tid` of a process, blocked in a system call, make system
/// call `nr` with `args` instead, and lets it run on.
///
/// The thread is seized and interrupted with ptrace; its instruction pointer
/// then sits just past the `syscall` instruction of the call it was blocked
/// in. Pointing it back at that instruction with `nr` in rax (and
/// orig_rax = -1, so the kernel does not restart the old call) makes it
/// execute `nr` as soon as it runs. What the thread does with the result is
/// not our concern: the point is what the card's filter does with the call.
///
/// A busy thread may be caught in user code rather than in a system call;
/// then it is let go and caught again, up to a few hundred times.
#[cfg(target_arch = "x86_64")]
pub fn inject_syscall(tid: u32, nr: i64, args: [u64; 3]) -> Result<()> {
    for _ in 0..500 {
        if try_inject_syscall(tid, nr, args)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("thread {tid} was never caught inside a system call")
}

/// One attempt: Ok(false) if the thread was not in a system call.
#[cfg(target_arch = "x86_64")]
fn try_inject_syscall(tid: u32, nr: i64, args: [u64; 3]) -> Result<bool> {
    let pid = tid as libc::pid_t;
    let os = |what: &str| anyhow::anyhow!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: ptrace on another process with valid request codes and a regs
    // buffer of the right type; the tracee is detached before returning.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) != 0 {
            return Err(os("PTRACE_SEIZE"));
        }
        let detach = || libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
        if libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) != 0 {
            detach();
            return Err(os("PTRACE_INTERRUPT"));
        }
        let mut status = 0;
        if libc::waitpid(pid, &mut status, libc::__WALL) != pid {
            detach();
            return Err(os("waitpid"));
        }
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        if libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs) != 0 {
            detach();
            return Err(os("PTRACE_GETREGS"));
        }
        let at = regs.rip - 2;
        let word = libc::ptrace(libc::PTRACE_PEEKTEXT, pid, at, 0) as u64;
        // In a system call: rip is just past `syscall` (0f 05) and orig_rax
        // holds the call's number.
        if word & 0xffff != 0x050f || regs.orig_rax == u64::MAX {
            detach();
            return Ok(false);
        }
        regs.rip = at;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        if libc::ptrace(libc::PTRACE_SETREGS, pid, 0, &regs) != 0 {
            detach();
            return Err(os("PTRACE_SETREGS"));
        }
        if detach() != 0 {
            return Err(os("PTRACE_DETACH"));
        }
    }
    Ok(true)
}

/// Whether `path`'s entries, seen from inside a jail, are exactly `names`.
pub fn lists_exactly(entries: &[String], names: &[&str]) -> bool {
    let mut want: Vec<&str> = names.to_vec();
    want.sort_unstable();
    entries.iter().map(String::as_str).eq(want)
}

/// The first path component of `path` (`/tmp/x` → `tmp`).
pub fn top_folder(path: &Path) -> String {
    path.components()
        .find_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .unwrap_or_default()
}
