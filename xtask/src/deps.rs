//! `cargo xtask deps`: Debian packages, then QEMU 11.1 from trixie-backports
//! in a cache folder (Debian 12 only ships 7.2, which lacks vfio-user-pci and
//! reconnect-ms).

use crate::Exit;
use anyhow::{bail, Context, Result};
use cardsim_tests::{Vmm, QEMU11_MARKER};
use std::fs;
use std::path::Path;
use std::process::Command;

/// Host packages. qemu-system-common brings qemu-storage-daemon.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "linux-image-amd64",
    "busybox-static",
    "fio",
    "iperf3",
    "cpio",
    "debootstrap",
    "kmod",
    // dpdk-testpmd (in dpdk-dev) with the net_vhost and virtio_user PMDs (in
    // dpdk): the load generator and peer of `cardbench compare-net`.
    "dpdk",
    "dpdk-dev",
    // Turns off the veth offloads of the VXLAN test's namespace.
    "ethtool",
];

const MIRROR: &str = "http://deb.debian.org/debian";

/// Packages installed into the trixie tree. seabios is a hard dependency of
/// qemu-system-x86 (the BIOS that runs before `-kernel` hands over); ipxe-qemu
/// is only recommended, but QEMU refuses to start a virtio-net-pci device
/// whose option ROM (efi-virtio.rom) is missing.
const QEMU11_PACKAGES: &[&str] = &["qemu-system-x86", "seabios", "ipxe-qemu"];

pub fn run() -> Result<()> {
    host_packages()?;
    qemu11()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn host_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("deps: host packages present");
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        return Err(Exit {
            code: 2,
            message: format!("missing Debian packages; run as root: sudo {install}"),
        }
        .into());
    }
    println!("deps: installing {}", missing.join(" "));
    sh("apt-get update", Command::new("apt-get").arg("update"))?;
    sh(
        &install,
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn qemu11() -> Result<()> {
    let dir = Vmm::qemu11_root();
    let marker = dir.join(QEMU11_MARKER);
    if marker.is_file() && Vmm::Qemu11.available().is_ok() {
        println!("deps: QEMU 11 ready in {}", dir.display());
        return Ok(());
    }
    if !is_root() {
        return Err(Exit {
            code: 2,
            message: format!(
                "QEMU 11 is not prepared in {} and debootstrap needs root; run as root: cargo xtask deps",
                dir.display()
            ),
        }
        .into());
    }
    if dir.exists() {
        // Half-done (no marker) or broken: start over rather than patch it.
        println!("deps: removing incomplete {}", dir.display());
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    println!(
        "deps: debootstrap trixie into {} (about a minute)",
        dir.display()
    );
    sh(
        "debootstrap",
        Command::new("debootstrap")
            .args(["--variant=minbase", "trixie"])
            .arg(&dir)
            .arg(MIRROR),
    )?;
    fs::write(
        dir.join("etc/apt/sources.list.d/backports.list"),
        format!("deb {MIRROR} trixie-backports main\n"),
    )?;
    sh(
        "apt-get update (trixie)",
        Command::new("chroot").arg(&dir).args(["apt-get", "update"]),
    )?;
    sh(
        "apt-get install qemu (trixie-backports)",
        Command::new("chroot")
            .arg(&dir)
            .args(["apt-get", "install", "-y", "--no-install-recommends"])
            .args(["-t", "trixie-backports"])
            .args(QEMU11_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // Downloaded .debs are ~100 MB we never need again.
    let _ = Command::new("chroot")
        .arg(&dir)
        .args(["apt-get", "clean"])
        .status();
    Vmm::Qemu11
        .version()
        .context("QEMU 11 was installed but does not start")?;
    let version = Command::new("chroot")
        .arg(&dir)
        .args(["dpkg-query", "-W", "-f=${Version}", "qemu-system-x86"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    write_marker(&marker, &version)?;
    println!("deps: QEMU 11 ready in {} ({version})", dir.display());
    Ok(())
}

fn write_marker(marker: &Path, version: &str) -> Result<()> {
    fs::write(marker, format!("qemu-system-x86 {version}\n"))
        .with_context(|| format!("writing {}", marker.display()))
}

fn sh(what: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
