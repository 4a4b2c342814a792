//! The guest image: the installed Debian kernel plus a busybox initramfs with
//! the kernel modules the cards need, fio and iperf3. Built from the host's
//! files, cached under `<cache>/guest/` keyed on a hash of every input.

use crate::cpio::CpioWriter;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the image layout changes in a way the inputs don't show.
const FORMAT: &str = "cardsim-guest-v1";

/// Modules the guest needs, by name or alias. The two `crypto-*` aliases are
/// what the CRC libraries under nvme (t10-pi) ask the crypto API for at run
/// time through request_module(); modinfo's depends/softdep can't see that,
/// and the initramfs has no modprobe to serve it.
const ROOT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "nvme",
    "crypto-crct10dif",
    "crypto-crc64-rocksoft",
];

/// A built guest: boot `kernel` with `initramfs` and `cmdline`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_version: String,
    /// Modules in the order the init loads them.
    pub modules: Vec<String>,
    pub cmdline: String,
}

/// The base kernel command line; `panic=-1` with QEMU's `-no-reboot` turns a
/// guest panic into a prompt QEMU exit instead of a hang.
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Returns the guest image, building it first if it is missing or any input
/// (kernel, modules, binaries, libraries, init script) changed.
pub fn guest_image() -> Result<GuestImage> {
    let (kver, kernel) = pick_kernel()?;
    let modules = resolve_modules(&kver).context("resolving kernel modules")?;
    let mut files: BTreeMap<String, Source> = BTreeMap::new();

    for m in &modules {
        files.insert(
            format!("usr/lib/modules/cardsim/{}.ko", m.name),
            Source::Module(m.path.clone()),
        );
    }
    let busybox = find_program("busybox", &["/usr/bin/busybox", "/bin/busybox"])?;
    files.insert("usr/bin/busybox".into(), Source::File(busybox.clone()));
    // util-linux's blkdiscard sits beside busybox's: only it has -z
    // (BLKZEROOUT, which makes the guest send WRITE_ZEROES). Busybox's shell
    // prefers its own applets, so scripts call it as /usr/sbin/blkdiscard.
    for (prog, dest) in [
        ("fio", "usr/bin/fio"),
        ("iperf3", "usr/bin/iperf3"),
        ("blkdiscard", "usr/sbin/blkdiscard"),
    ] {
        let path = find_program(prog, &["/usr/sbin/blkdiscard", "/sbin/blkdiscard"])?;
        files.insert(dest.to_string(), Source::File(path.clone()));
        for lib in shared_libs(&path)? {
            files.insert(lib.0, Source::File(lib.1));
        }
    }
    let applets = busybox_applets(&busybox)?;
    let init = init_script(&modules);

    let mut hash = Sha256::new();
    hash.update(FORMAT);
    hash.update(&kver);
    hash.update(&init);
    for a in &applets {
        hash.update(a);
    }
    for (dest, src) in &files {
        hash.update(dest);
        // Files are keyed on their metadata, not their bytes: hashing ~90 MB
        // takes seconds in a debug build, on every test. dpkg replaces a file
        // (new inode, the package's mtime) whenever it upgrades it.
        let path = src.path();
        let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        hash.update(path.as_os_str().as_encoded_bytes());
        for n in [
            meta.len(),
            meta.ino(),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
        ] {
            hash.update(n.to_le_bytes());
        }
    }
    let digest = hash.finalize();
    let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();

    let dir = crate::cache_dir().join("guest");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initramfs = dir.join(format!("initramfs-{kver}-{key}.cpio"));
    if !initramfs.is_file() {
        build(&dir, &initramfs, &files, &applets, &init)
            .with_context(|| format!("building {}", initramfs.display()))?;
        // Older images are stale by construction.
        for entry in fs::read_dir(&dir)?.flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if p != initramfs && name.starts_with("initramfs-") && name.ends_with(".cpio") {
                let _ = fs::remove_file(p);
            }
        }
    }
    Ok(GuestImage {
        kernel,
        initramfs,
        kernel_version: kver,
        modules: modules.into_iter().map(|m| m.name).collect(),
        cmdline: CMDLINE.to_string(),
    })
}

enum Source {
    File(PathBuf),
    /// A kernel module, possibly compressed; stored decompressed because
    /// busybox insmod can't read compressed modules.
    Module(PathBuf),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::File(p) | Source::Module(p) => p,
        }
    }

    fn contents(&self) -> Result<Vec<u8>> {
        let path = self.path();
        let name = path.to_string_lossy();
        let tool = match self {
            Source::Module(_) if name.ends_with(".xz") => Some("xz"),
            Source::Module(_) if name.ends_with(".zst") => Some("zstd"),
            Source::Module(_) if name.ends_with(".gz") => Some("gzip"),
            _ => None,
        };
        match tool {
            None => fs::read(path).with_context(|| format!("reading {}", path.display())),
            Some(tool) => {
                let out = Command::new(tool)
                    .arg("-dc")
                    .arg(path)
                    .output()
                    .with_context(|| format!("running {tool} -dc {}", path.display()))?;
                if !out.status.success() {
                    bail!(
                        "{tool} -dc {} failed: {}",
                        path.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Ok(out.stdout)
            }
        }
    }
}

fn build(
    dir: &Path,
    dest: &Path,
    files: &BTreeMap<String, Source>,
    applets: &[String],
    init: &str,
) -> Result<()> {
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    let mut w = CpioWriter::new(BufWriter::new(tmp.as_file()));

    // Parent directories come first; a BTreeSet sorts parents before children.
    let mut dirs: BTreeSet<String> = [
        "dev", "proc", "sys", "tmp", "run", "root", "etc", "cardsim", "usr/bin",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for path in files.keys() {
        let mut p = Path::new(path.as_str());
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    let mut all_dirs: BTreeSet<String> = BTreeSet::new();
    for d in &dirs {
        let mut acc = String::new();
        for part in d.split('/') {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            all_dirs.insert(acc.clone());
        }
    }
    for d in &all_dirs {
        let perm = if d == "tmp" { 0o1777 } else { 0o755 };
        w.dir(d, perm)?;
    }
    // Merged /usr, like the host, so library paths from ldd resolve as-is.
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/bin"),
        ("usr/sbin", "bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        if !all_dirs.contains(link) {
            w.symlink(link, target)?;
        }
    }
    // The kernel opens /dev/console for init's stdio before init can mount
    // devtmpfs; without this node the guest prints nothing.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, init.as_bytes())?;
    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.file("etc/group", 0o644, b"root:x:0:\n")?;
    w.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")?;
    for (path, src) in files {
        w.file(path, 0o755, &src.contents()?)?;
    }
    for a in applets {
        let path = format!("usr/bin/{a}");
        if !files.contains_key(&path) {
            w.symlink(&path, "busybox")?;
        }
    }
    w.finish()?.flush()?;

    tmp.persist(dest)?;
    Ok(())
}

/// The init script. Script failures are reported through the exit marker;
/// the guest always powers off so QEMU exits.
fn init_script(modules: &[Module]) -> String {
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    format!(
        r#"#!/bin/sh
export PATH=/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in {modules}; do
    insmod /lib/modules/cardsim/$m.ko 2>/tmp/insmod.err || echo "cardsim: insmod $m failed: $(cat /tmp/insmod.err)"
done
ip link set lo up
# Waits for a device node (nvme probes asynchronously): wait_dev PATH [SECONDS]
wait_dev() {{
    n=0
    while [ ! -e "$1" ]; do
        n=$((n + 1))
        [ $n -gt $((${{2:-10}} * 10)) ] && {{ echo "cardsim: $1 did not appear"; return 1; }}
        sleep 0.1
    done
}}
echo "{ready}"
rc=0
if [ -f /cardsim/script.sh ]; then
    # A subshell with -e: the first failing command fails the script.
    (set -e; . /cardsim/script.sh)
    rc=$?
fi
sync
echo "{exit} rc=$rc"
poweroff -f
"#,
        modules = names.join(" "),
        ready = crate::READY_MARKER,
        exit = crate::EXIT_MARKER,
    )
}

/// The newest `/boot/vmlinuz-*` that has a matching `/lib/modules` folder.
fn pick_kernel() -> Result<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for entry in fs::read_dir("/boot").context("reading /boot")?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(ver) = name.strip_prefix("vmlinuz-") {
            if Path::new("/lib/modules").join(ver).is_dir() {
                found.push((ver.to_string(), entry.path()));
            }
        }
    }
    found.sort_by_key(|a| version_key(&a.0));
    found.pop().ok_or_else(|| {
        anyhow!(
            "no /boot/vmlinuz-* with a matching /lib/modules folder: run `cargo xtask deps` \
             (installs linux-image-amd64)"
        )
    })
}

/// Splits "6.1.0-56-amd64" into comparable numeric and text chunks.
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits > 0 {
            out.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
            rest = &rest[digits..];
        } else {
            let text = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            out.push((0, rest[..text].to_string()));
            rest = &rest[text..];
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Module {
    name: String,
    path: PathBuf,
}

#[derive(Debug, Default)]
struct ModInfo {
    name: String,
    path: PathBuf,
    depends: Vec<String>,
    pre: Vec<String>,
    post: Vec<String>,
}

/// Runs modinfo on a module name or alias; an alias may match several modules.
fn modinfo(kver: &str, name: &str) -> Result<Vec<ModInfo>> {
    let out = Command::new("modinfo")
        .args(["-k", kver, name])
        .output()
        .context("running modinfo (install kmod)")?;
    if !out.status.success() {
        bail!(
            "modinfo -k {kver} {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut infos: Vec<ModInfo> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if key == "filename" {
            infos.push(ModInfo {
                path: PathBuf::from(value),
                ..Default::default()
            });
            continue;
        }
        let Some(info) = infos.last_mut() else {
            continue;
        };
        match key {
            "name" => info.name = value.to_string(),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            // "pre: a b post: c"
            "softdep" => {
                let mut post = false;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => post = false,
                        "post:" => post = true,
                        w if post => info.post.push(w.to_string()),
                        w => info.pre.push(w.to_string()),
                    }
                }
            }
            _ => {}
        }
    }
    for info in &mut infos {
        if info.path.as_os_str() == "(builtin)" {
            continue;
        }
        if info.name.is_empty() {
            // Older modinfo prints no name: derive it from the file name.
            let file = info.path.file_name().unwrap_or_default().to_string_lossy();
            info.name = file.split(".ko").next().unwrap_or("").replace('-', "_");
        }
    }
    infos.retain(|i| i.path.as_os_str() != "(builtin)");
    Ok(infos)
}

/// Resolves ROOT_MODULES to a load order: hard and "pre" soft dependencies
/// before each module, "post" ones after.
fn resolve_modules(kver: &str) -> Result<Vec<Module>> {
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for root in ROOT_MODULES {
        visit(kver, root, true, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    kver: &str,
    name: &str,
    required: bool,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<Module>,
) -> Result<()> {
    let key = name.replace('-', "_");
    if !seen.insert(key) {
        return Ok(());
    }
    let infos = match modinfo(kver, name) {
        Ok(i) => i,
        // A soft dependency may name something absent from this kernel.
        Err(_) if !required => return Ok(()),
        Err(e) => return Err(e),
    };
    for info in infos {
        if !seen.insert(info.name.clone()) && order.iter().any(|m| m.name == info.name) {
            continue;
        }
        for d in &info.depends {
            visit(kver, d, true, seen, order)?;
        }
        for d in &info.pre {
            visit(kver, d, false, seen, order)?;
        }
        if !order.iter().any(|m| m.name == info.name) {
            order.push(Module {
                name: info.name.clone(),
                path: info.path.clone(),
            });
        }
        for d in &info.post {
            visit(kver, d, false, seen, order)?;
        }
    }
    Ok(())
}

fn find_program(name: &str, extra: &[&str]) -> Result<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path_var)
        .map(|d| d.join(name))
        .chain(extra.iter().map(PathBuf::from));
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
    }
    bail!("`{name}` is not installed: run `cargo xtask deps`")
}

/// The shared libraries (and dynamic loader) of `bin`, as (path in the
/// image, host file). Each keeps the file name ldd shows (the soname) in its
/// parent's canonical folder, which on merged-/usr hosts is under /usr.
fn shared_libs(bin: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("running ldd {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: missing library: {line}", bin.display());
        }
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso lines have no path.
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if !path.starts_with('/') {
            continue;
        }
        let path = Path::new(path);
        let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
            continue;
        };
        let parent =
            fs::canonicalize(parent).with_context(|| format!("resolving {}", parent.display()))?;
        let dest = parent.join(file);
        let dest = dest.to_string_lossy().trim_start_matches('/').to_string();
        libs.push((dest, path.to_path_buf()));
    }
    Ok(libs)
}

fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list failed", busybox.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["6.10.0-1-amd64", "6.1.0-56-amd64", "6.1.0-9-amd64"];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v, ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.10.0-1-amd64"]);
    }
}
