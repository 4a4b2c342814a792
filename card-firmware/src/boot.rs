//! Verified card images and measured boot.
//!
//! A card image is a folder:
//!
//! ```text
//! IMAGE/manifest.json   {"format": 1, "version": "1.2.0",
//!                        "binaries": {"vhost-blk-backend": {"sha256": "<hex>", "size": N}, ...}}
//! IMAGE/manifest.sig    {"key": "<signer's ed25519 public key, hex>", "signature": "<hex>"}
//! IMAGE/bin/<name>      the card binaries
//! ```
//!
//! The signature is ed25519 over the exact bytes of `manifest.json`. The
//! launcher (mgmt-channel) starts a card only from a [`VerifiedImage`]: the
//! signature checks out against a key in its [`TrustedKeys`], every binary
//! under `bin/` is in the manifest and every binary in the manifest is there
//! with its digest. [`VerifiedImage::command`] then runs exactly the bytes
//! that were hashed, and the launcher records what it started in the
//! [`MeasuredBootLog`], a hash chain that shows any later edit.
//!
//! Keys are hex text: a signing key file holds the 32-byte secret seed, a
//! trusted-keys file one 32-byte public key per line (`#` starts a comment).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ed25519_dalek::{Signature, Signer};
/// The key types, so a launcher needs no direct dependency on the crate.
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's file name in an image.
pub const MANIFEST: &str = "manifest.json";
/// The signature's file name in an image.
pub const SIGNATURE: &str = "manifest.sig";
/// The folder of the binaries in an image.
pub const BIN_DIR: &str = "bin";
/// The manifest format this firmware reads and writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// Largest binary an image may hold (a card is a few MiB; the bound keeps a
/// hostile image from making the launcher read without end).
const MAX_BINARY: u64 = 1 << 30;
/// Largest manifest or signature file read.
const MAX_MANIFEST: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: line {line}: {problem}", path.display())]
    KeyFile {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{}: no trusted keys in it", path.display())]
    NoTrustedKeys { path: PathBuf },
    #[error("{SIGNATURE}: {problem}")]
    SignatureFile { problem: String },
    #[error("manifest signed by an unknown key {key}: not in the trusted keys")]
    UnknownKey { key: String },
    #[error("bad signature: {MANIFEST} is not what key {key} signed (edited after signing?)")]
    BadSignature { key: String },
    #[error("{MANIFEST}: {problem}")]
    Manifest { problem: String },
    #[error("{MANIFEST} lists {name} but bin/{name} is missing")]
    MissingBinary { name: String },
    #[error("bin/{name} is not in {MANIFEST}: refusing an image with unlisted binaries")]
    UnlistedBinary { name: String },
    #[error("bin/{name}: {found} bytes, the manifest says {expected}")]
    SizeMismatch {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("bin/{name}: SHA-256 {found}, the manifest says {expected} (tampered or corrupt)")]
    DigestMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error("the image has no binary {name} (it has {available})")]
    NotInImage { name: String, available: String },
    #[error("nothing to sign: {} holds no binaries", dir.display())]
    EmptyImage { dir: PathBuf },
    #[error("{}: line {line}: {problem}", path.display())]
    LogBroken {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---- hex ---------------------------------------------------------------------------------

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex<const N: usize>(text: &str) -> Result<[u8; N], String> {
    let text = text.trim();
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("expected {} hex digits, got {:?}", 2 * N, text));
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

// ---- keys --------------------------------------------------------------------------------

/// A new signing key from the kernel's random source.
pub fn generate_signing_key() -> std::io::Result<SigningKey> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        // SAFETY: writes at most the remaining length into `seed`.
        let n =
            unsafe { libc::getrandom(seed[filled..].as_mut_ptr().cast(), seed.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `key` as hex text, readable by its owner only; never replaces a file.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<(), BootError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))?;
    writeln!(file, "{}", to_hex(key.as_bytes())).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey, BootError> {
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    let seed = from_hex::<32>(&text).map_err(|problem| BootError::KeyFile {
        path: path.to_owned(),
        line: 1,
        problem,
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A public key as the trusted-keys file spells it.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    to_hex(key.as_bytes())
}

/// The public keys whose signatures the launcher accepts.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
}

impl TrustedKeys {
    /// Reads a trusted-keys file: one hex public key a line, `#` comments
    /// and blank lines allowed. A malformed line or an empty file is an error.
    pub fn load(path: &Path) -> Result<TrustedKeys, BootError> {
        let text = fs::read_to_string(path).map_err(io_error(path))?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let problem = |problem: String| BootError::KeyFile {
                path: path.to_owned(),
                line: i + 1,
                problem,
            };
            let bytes = from_hex::<32>(line).map_err(problem)?;
            let key = VerifyingKey::from_bytes(&bytes)
                .map_err(|e| problem(format!("not an ed25519 public key: {e}")))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(BootError::NoTrustedKeys {
                path: path.to_owned(),
            });
        }
        Ok(TrustedKeys { keys })
    }

    pub fn from_keys(keys: Vec<VerifyingKey>) -> TrustedKeys {
        TrustedKeys { keys }
    }

    pub fn contains(&self, key: &VerifyingKey) -> bool {
        self.keys.contains(key)
    }
}

// ---- the manifest ------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub version: String,
    pub binaries: BTreeMap<String, BinaryEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryEntry {
    pub sha256: String,
    pub size: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureFile {
    key: String,
    signature: String,
}

/// A binary's name: a plain file name, so `bin/<name>` stays inside the image.
fn check_name(name: &str) -> Result<(), BootError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(BootError::Manifest {
            problem: format!("{name:?} is not a binary name (letters, digits, '-', '_', '.')"),
        })
    }
}

/// Reads at most `limit` bytes of `path` (more is an error).
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, BootError> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    if bytes.len() as u64 > limit {
        return Err(BootError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {limit} bytes"),
            ),
        });
    }
    Ok(bytes)
}

/// The regular files under `dir/bin`, by name. Anything else there (a
/// folder, a symlink, a badly named file) is refused: it could not be
/// listed in a manifest.
fn binaries_in(dir: &Path) -> Result<BTreeMap<String, PathBuf>, BootError> {
    let bin = dir.join(BIN_DIR);
    let mut found = BTreeMap::new();
    for entry in fs::read_dir(&bin).map_err(io_error(&bin))? {
        let entry = entry.map_err(io_error(&bin))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(io_error(&entry.path()))?;
        if !kind.is_file() || check_name(&name).is_err() {
            return Err(BootError::UnlistedBinary { name });
        }
        found.insert(name, entry.path());
    }
    Ok(found)
}

/// Writes `manifest.json` and `manifest.sig` for the binaries under
/// `dir/bin`, signed with `key`.
pub fn sign_image(dir: &Path, key: &SigningKey, version: &str) -> Result<Manifest, BootError> {
    let mut binaries = BTreeMap::new();
    for (name, path) in binaries_in(dir)? {
        let bytes = read_bounded(&path, MAX_BINARY)?;
        binaries.insert(
            name,
            BinaryEntry {
                sha256: sha256_hex(&bytes),
                size: bytes.len() as u64,
            },
        );
    }
    if binaries.is_empty() {
        return Err(BootError::EmptyImage {
            dir: dir.to_owned(),
        });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        version: version.to_owned(),
        binaries,
    };
    let mut text = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    text.push(b'\n');
    let signature = SignatureFile {
        key: public_key_hex(&key.verifying_key()),
        signature: to_hex(&key.sign(&text).to_bytes()),
    };
    let mut sig_text = serde_json::to_vec(&signature).expect("a signature serializes");
    sig_text.push(b'\n');
    let manifest_path = dir.join(MANIFEST);
    fs::write(&manifest_path, &text).map_err(io_error(&manifest_path))?;
    let sig_path = dir.join(SIGNATURE);
    fs::write(&sig_path, &sig_text).map_err(io_error(&sig_path))?;
    Ok(manifest)
}

// ---- verification ------------------------------------------------------------------------

/// An image whose signature, manifest and binaries all checked out. It holds
/// each binary's verified bytes, sealed: what [`VerifiedImage::command`]
/// starts is what was hashed, whatever happens to the folder afterwards.
#[derive(Debug)]
pub struct VerifiedImage {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The trusted key that signed the manifest.
    pub signer: VerifyingKey,
    sealed: BTreeMap<String, OwnedFd>,
}

/// Checks the image in `dir` against `trusted`: the signature (by a trusted
/// key, over the exact manifest bytes), then the manifest, then every binary.
/// The first problem found is the error, and it names what is wrong.
pub fn verify_image(dir: &Path, trusted: &TrustedKeys) -> Result<VerifiedImage, BootError> {
    let manifest_bytes = read_bounded(&dir.join(MANIFEST), MAX_MANIFEST)?;
    let sig_bytes = read_bounded(&dir.join(SIGNATURE), MAX_MANIFEST)?;
    let sig: SignatureFile =
        serde_json::from_slice(&sig_bytes).map_err(|e| BootError::SignatureFile {
            problem: e.to_string(),
        })?;
    let key_bytes = from_hex::<32>(&sig.key).map_err(|problem| BootError::SignatureFile {
        problem: format!("key: {problem}"),
    })?;
    let signer = VerifyingKey::from_bytes(&key_bytes).map_err(|e| BootError::SignatureFile {
        problem: format!("key: not an ed25519 public key: {e}"),
    })?;
    if !trusted.contains(&signer) {
        return Err(BootError::UnknownKey { key: sig.key });
    }
    let signature = from_hex::<64>(&sig.signature).map_err(|problem| BootError::SignatureFile {
        problem: format!("signature: {problem}"),
    })?;
    signer
        .verify_strict(&manifest_bytes, &Signature::from_bytes(&signature))
        .map_err(|_| BootError::BadSignature { key: sig.key })?;

    // Signed: now the manifest is read.
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| BootError::Manifest {
            problem: e.to_string(),
        })?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(BootError::Manifest {
            problem: format!(
                "format {} (this firmware reads format {MANIFEST_FORMAT})",
                manifest.format
            ),
        });
    }
    for name in manifest.binaries.keys() {
        check_name(name)?;
    }
    let present = binaries_in(dir)?;
    if let Some(name) = present.keys().find(|n| !manifest.binaries.contains_key(*n)) {
        return Err(BootError::UnlistedBinary { name: name.clone() });
    }
    let mut sealed = BTreeMap::new();
    for (name, entry) in &manifest.binaries {
        let path = present
            .get(name)
            .ok_or_else(|| BootError::MissingBinary { name: name.clone() })?;
        // Read once: these bytes are hashed and these bytes are sealed.
        let bytes = read_bounded(path, MAX_BINARY)?;
        if bytes.len() as u64 != entry.size {
            return Err(BootError::SizeMismatch {
                name: name.clone(),
                expected: entry.size,
                found: bytes.len() as u64,
            });
        }
        let found = sha256_hex(&bytes);
        if !found.eq_ignore_ascii_case(&entry.sha256) {
            return Err(BootError::DigestMismatch {
                name: name.clone(),
                expected: entry.sha256.clone(),
                found,
            });
        }
        sealed.insert(name.clone(), seal(name, &bytes).map_err(io_error(path))?);
    }
    Ok(VerifiedImage {
        dir: dir.to_owned(),
        manifest,
        signer,
        sealed,
    })
}

/// `MFD_EXEC` (Linux 6.3): says the memfd is meant to be executed, so a
/// host with `vm.memfd_noexec = 1` does not make it non-executable.
const MFD_EXEC: libc::c_uint = 0x0010;

/// The verified bytes in a sealed memfd.
///
/// Why a memfd rather than a private copy on disk: once sealed (no write,
/// shrink or grow, and no more seal changes), nobody — not even root through
/// the folder, nor this process — can change what the launcher executes
/// between the check and the exec, and there is no file to clean up or race
/// on. A copy in a 0500 folder would need a second hash after the copy and
/// would still be changeable by root until the exec.
fn seal(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(|e| std::io::Error::other(e.to_string()))?;
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let mut fd = unsafe { libc::memfd_create(cname.as_ptr(), flags | MFD_EXEC) };
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // Before Linux 6.3 there is no MFD_EXEC and memfds are executable.
        // SAFETY: as above.
        fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

impl VerifiedImage {
    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    /// The manifest's SHA-256 of binary `name`.
    pub fn sha256(&self, name: &str) -> Option<&str> {
        self.manifest.binaries.get(name).map(|b| b.sha256.as_str())
    }

    /// A command that runs binary `name` from its sealed, verified bytes
    /// (argv[0] is `name`). The image must outlive the spawn: the command
    /// names the memfd by `/proc/self/fd`, which the child inherits at fork
    /// and the kernel opens at exec (it is close-on-exec, so the card does
    /// not keep it).
    pub fn command(&self, name: &str) -> Result<Command, BootError> {
        let fd = self.sealed.get(name).ok_or_else(|| BootError::NotInImage {
            name: name.to_owned(),
            available: self.sealed.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let mut command = Command::new(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        command.arg0(name);
        Ok(command)
    }
}

// ---- the measured-boot log -----------------------------------------------------------------

/// One binary started, as the measured-boot log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootEntry {
    /// 1, 2, ... in the order of starting.
    pub seq: u64,
    /// When, in RFC 3339 (UTC).
    pub time: String,
    /// Which card instance (the launcher's name for it, e.g. `vol-0a1`).
    pub card: String,
    pub binary: String,
    pub image_version: String,
    /// The binary's SHA-256 (hex), as verified.
    pub sha256: String,
    /// The previous entry's digest; 64 zeros for the first.
    pub prev: String,
    /// SHA-256(prev digest's 32 bytes ‖ this entry's canonical bytes).
    pub digest: String,
}

/// What a launcher records for one start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRecord<'a> {
    pub card: &'a str,
    pub binary: &'a str,
    pub image_version: &'a str,
    pub sha256: &'a str,
}

/// The fields a digest covers, in this order: the canonical bytes are their
/// compact JSON.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: u64,
    time: &'a str,
    card: &'a str,
    binary: &'a str,
    image_version: &'a str,
    sha256: &'a str,
    prev: &'a str,
}

const GENESIS: [u8; 32] = [0; 32];

fn entry_digest(prev: &[u8; 32], e: &BootEntry) -> [u8; 32] {
    let canonical = serde_json::to_vec(&Canonical {
        seq: e.seq,
        time: &e.time,
        card: &e.card,
        binary: &e.binary,
        image_version: &e.image_version,
        sha256: &e.sha256,
        prev: &e.prev,
    })
    .expect("strings serialize");
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(&canonical);
    hasher.finalize().into()
}

/// An append-only JSON-lines file of [`BootEntry`]s, each chained to the one
/// before by its digest, so an edited, removed or reordered entry breaks the
/// chain ([`MeasuredBootLog::verify`]).
#[derive(Debug, Clone)]
pub struct MeasuredBootLog {
    path: PathBuf,
}

impl MeasuredBootLog {
    pub fn new(path: &Path) -> MeasuredBootLog {
        MeasuredBootLog {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry as written (an absent log has none), not checked.
    pub fn entries(&self) -> Result<Vec<BootEntry>, BootError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&self.path)(e)),
        };
        let mut entries = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(io_error(&self.path))?;
            let entry = serde_json::from_str(&line).map_err(|e| BootError::LogBroken {
                path: self.path.clone(),
                line: i + 1,
                problem: format!("not an entry: {e}"),
            })?;
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Checks the whole chain: numbering, links and digests. Returns the
    /// entries; the first break found is the error, naming its line.
    pub fn verify(&self) -> Result<Vec<BootEntry>, BootError> {
        let entries = self.entries()?;
        let mut prev = GENESIS;
        for (i, e) in entries.iter().enumerate() {
            let broken = |problem: String| BootError::LogBroken {
                path: self.path.clone(),
                line: i + 1,
                problem,
            };
            if e.seq != i as u64 + 1 {
                return Err(broken(format!("seq {} where {} belongs", e.seq, i + 1)));
            }
            if e.prev != to_hex(&prev) {
                return Err(broken(
                    "prev is not the digest of the entry before (removed or reordered?)".into(),
                ));
            }
            let digest = entry_digest(&prev, e);
            if e.digest != to_hex(&digest) {
                return Err(broken("digest does not match the entry (edited?)".into()));
            }
            prev = digest;
        }
        Ok(entries)
    }

    /// Appends one start, after checking the chain so far (a broken log is
    /// not silently extended). Creates the log (0600) if absent. Appends are
    /// serialized by an exclusive lock, and each is made durable.
    pub fn append(&self, record: &BootRecord<'_>) -> Result<BootEntry, BootError> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io_error(&self.path))?;
        // SAFETY: flock on a descriptor we own; released when it closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(io_error(&self.path)(std::io::Error::last_os_error()));
        }
        let entries = self.verify()?;
        let (seq, prev) = match entries.last() {
            Some(last) => (
                last.seq + 1,
                from_hex::<32>(&last.digest).unwrap_or(GENESIS),
            ),
            None => (1, GENESIS),
        };
        let mut entry = BootEntry {
            seq,
            time: rfc3339_now(),
            card: record.card.to_owned(),
            binary: record.binary.to_owned(),
            image_version: record.image_version.to_owned(),
            sha256: record.sha256.to_owned(),
            prev: to_hex(&prev),
            digest: String::new(),
        };
        entry.digest = to_hex(&entry_digest(&prev, &entry));
        let mut line = serde_json::to_vec(&entry).expect("an entry serializes");
        line.push(b'\n');
        let mut file = file;
        file.write_all(&line).map_err(io_error(&self.path))?;
        file.sync_data().map_err(io_error(&self.path))?;
        Ok(entry)
    }
}

/// Now as RFC 3339 UTC with milliseconds.
fn rfc3339_now() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Makes `dir/bin` (0755) for an image being built.
pub fn create_bin_dir(dir: &Path) -> Result<PathBuf, BootError> {
    let bin = dir.join(BIN_DIR);
    fs::create_dir_all(&bin).map_err(io_error(&bin))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).map_err(io_error(&bin))?;
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of two small "binaries" (shell scripts are enough to hash).
    fn image(key: &SigningKey) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let bin = create_bin_dir(dir.path()).unwrap();
        fs::write(bin.join("vhost-blk-backend"), b"#!/bin/sh\necho blk\n").unwrap();
        fs::write(bin.join("nvme-emulator"), vec![7u8; 100_000]).unwrap();
        sign_image(dir.path(), key, "1.2.3").unwrap();
        dir
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusting(key: &SigningKey) -> TrustedKeys {
        TrustedKeys::from_keys(vec![key.verifying_key()])
    }

    #[test]
    fn a_good_image_verifies() {
        let k = key(1);
        let dir = image(&k);
        let image = verify_image(dir.path(), &trusting(&k)).unwrap();
        assert_eq!(image.version(), "1.2.3");
        assert_eq!(image.signer, k.verifying_key());
        assert_eq!(
            image.sha256("nvme-emulator"),
            Some(sha256_hex(&[7u8; 100_000]).as_str())
        );
        assert!(image.command("vhost-blk-backend").is_ok());
        assert!(matches!(
            image.command("vhost-net-backend"),
            Err(BootError::NotInImage { .. })
        ));
    }

    #[test]
    fn one_flipped_byte_in_a_binary_is_a_digest_error_naming_it() {
        let k = key(1);
        let dir = image(&k);
        let path = dir.path().join("bin/nvme-emulator");
        let mut bytes = fs::read(&path).unwrap();
        bytes[50_000] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        match verify_image(dir.path(), &trusting(&k)) {
            Err(BootError::DigestMismatch {
                name,
                expected,
                found,
            }) => {
                assert_eq!(name, "nvme-emulator");
                assert_eq!(expected, sha256_hex(&[7u8; 100_000]));
                assert_eq!(found, sha256_hex(&bytes));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_manifest_signed_by_an_unknown_key_is_refused() {
        let dir = image(&key(2));
        let e = verify_image(dir.path(), &trusting(&key(1))).unwrap_err();
        assert!(
            matches!(&e, BootError::UnknownKey { key } if *key == public_key_hex(&key_vk(2))),
            "{e}"
        );
        assert!(e.to_string().contains("unknown key"), "{e}");
    }

    fn key_vk(seed: u8) -> VerifyingKey {
        key(seed).verifying_key()
    }

    #[test]
    fn an_edited_manifest_has_a_bad_signature() {
        let k = key(1);
        let dir = image(&k);
        let path = dir.path().join(MANIFEST);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("1.2.3", "1.2.4")).unwrap();
        assert!(matches!(
            verify_image(dir.path(), &trusting(&k)),
            Err(BootError::BadSignature { .. })
        ));
        // Even whitespace: the signature covers the exact bytes.
        fs::write(&path, format!("{text} ")).unwrap();
        assert!(matches!(
            verify_image(dir.path(), &trusting(&k)),
            Err(BootError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_missing_or_an_unlisted_binary_is_refused() {
        let k = key(1);
        let dir = image(&k);
        fs::write(dir.path().join("bin/extra"), b"x").unwrap();
        match verify_image(dir.path(), &trusting(&k)) {
            Err(BootError::UnlistedBinary { name }) => assert_eq!(name, "extra"),
            other => panic!("{other:?}"),
        }
        fs::remove_file(dir.path().join("bin/extra")).unwrap();
        fs::remove_file(dir.path().join("bin/vhost-blk-backend")).unwrap();
        match verify_image(dir.path(), &trusting(&k)) {
            Err(BootError::MissingBinary { name }) => assert_eq!(name, "vhost-blk-backend"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_runs_is_the_verified_bytes_even_if_the_file_changes_after() {
        let k = key(1);
        let dir = image(&k);
        let image = verify_image(dir.path(), &trusting(&k)).unwrap();
        // Replaced after verification: the command still runs what was hashed.
        fs::write(
            dir.path().join("bin/vhost-blk-backend"),
            b"#!/bin/sh\necho evil\n",
        )
        .unwrap();
        let fd = image.sealed["vhost-blk-backend"].as_raw_fd();
        let sealed = fs::read(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(sealed, b"#!/bin/sh\necho blk\n");
        // And the seals hold: no write, no grow, no shrink.
        // SAFETY: F_GET_SEALS on a descriptor the image owns.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        let all = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & all, all);
        let mut writable = OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
            .unwrap();
        assert!(
            writable.write_all(b"evil").is_err(),
            "a sealed memfd took a write"
        );
    }

    #[test]
    fn trusted_keys_files_take_comments_and_name_a_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trusted");
        fs::write(
            &path,
            format!("# release key\n{}  # 2026\n\n", public_key_hex(&key_vk(1))),
        )
        .unwrap();
        let keys = TrustedKeys::load(&path).unwrap();
        assert!(keys.contains(&key_vk(1)) && !keys.contains(&key_vk(2)));
        fs::write(&path, "# nothing\n").unwrap();
        assert!(matches!(
            TrustedKeys::load(&path),
            Err(BootError::NoTrustedKeys { .. })
        ));
        fs::write(&path, format!("{}\nzz\n", public_key_hex(&key_vk(1)))).unwrap();
        match TrustedKeys::load(&path) {
            Err(BootError::KeyFile { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signing_keys_round_trip_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let k = generate_signing_key().unwrap();
        write_signing_key(&path, &k).unwrap();
        assert_eq!(read_signing_key(&path).unwrap().to_bytes(), k.to_bytes());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Never replaces a key.
        assert!(write_signing_key(&path, &key(3)).is_err());
        assert_ne!(generate_signing_key().unwrap().to_bytes(), k.to_bytes());
    }

    fn record<'a>(card: &'a str) -> BootRecord<'a> {
        BootRecord {
            card,
            binary: "vhost-blk-backend",
            image_version: "1.2.3",
            sha256: "ab",
        }
    }

    #[test]
    fn the_boot_log_chains_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let log = MeasuredBootLog::new(&dir.path().join("boot.log"));
        assert!(log.verify().unwrap().is_empty());
        let first = log.append(&record("vol-1")).unwrap();
        let second = log.append(&record("vol-2")).unwrap();
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(first.prev, "0".repeat(64));
        assert_eq!(second.prev, first.digest);
        assert_eq!(log.verify().unwrap(), vec![first, second]);
        assert_eq!(
            fs::metadata(log.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn the_boot_log_verify_finds_an_edited_or_removed_entry() {
        let dir = tempfile::tempdir().unwrap();
        let log = MeasuredBootLog::new(&dir.path().join("boot.log"));
        for card in ["vol-1", "vol-2", "vol-3"] {
            log.append(&record(card)).unwrap();
        }
        let text = fs::read_to_string(log.path()).unwrap();

        // An edited field, digest left as it was.
        fs::write(log.path(), text.replacen("vol-2", "vol-9", 1)).unwrap();
        match log.verify() {
            Err(BootError::LogBroken { line, problem, .. }) => {
                assert_eq!(line, 2);
                assert!(problem.contains("digest"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
        // Refused: a broken log is not extended.
        assert!(log.append(&record("vol-4")).is_err());

        // A removed entry.
        let lines: Vec<&str> = text.lines().collect();
        fs::write(log.path(), format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        assert!(matches!(
            log.verify(),
            Err(BootError::LogBroken { line: 2, .. })
        ));

        // Edited and re-digested in place: the next entry's link breaks.
        let mut second: BootEntry = serde_json::from_str(lines[1]).unwrap();
        second.card = "vol-9".into();
        let prev = from_hex::<32>(&second.prev).unwrap();
        second.digest = to_hex(&entry_digest(&prev, &second));
        let forged = serde_json::to_string(&second).unwrap();
        fs::write(
            log.path(),
            format!("{}\n{forged}\n{}\n", lines[0], lines[2]),
        )
        .unwrap();
        assert!(matches!(
            log.verify(),
            Err(BootError::LogBroken { line: 3, .. })
        ));

        fs::write(log.path(), &text).unwrap();
        assert_eq!(log.verify().unwrap().len(), 3);
    }

    #[test]
    fn times_are_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), "2026-11-27T08:01:02.123Z".len(), "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
