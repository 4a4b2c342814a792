//! Publishing a card's metrics.
//!
//! Like Firecracker, a card writes its counters as one JSON document to a path
//! it was given, every interval and on request. The document is replaced
//! atomically (write, then rename), so a reader never sees half of it.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

/// Writes `snapshot()` to `path` now, atomically.
pub fn write_snapshot(path: &Path, snapshot: &serde_json::Value) -> std::io::Result<()> {
    let mut tmp: PathBuf = path.to_owned();
    tmp.as_mut_os_string().push(".tmp");
    let mut text = serde_json::to_string_pretty(snapshot)?;
    text.push('\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `path` made absolute, in its real folder: a card writes its metrics by
/// name (write beside, then rename) after it has jailed itself, from the
/// jail's root, so a relative path or a symlinked folder would not do.
pub fn absolute_path(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let (Some(dir), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        ));
    };
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("folder {}: {e}", dir.display())))?;
    Ok(dir.join(name))
}

/// Starts a thread that writes `snapshot()` to `path` every `interval`.
pub fn spawn_writer<F>(path: PathBuf, interval: Duration, snapshot: F) -> std::io::Result<()>
where
    F: Fn() -> serde_json::Value + Send + 'static,
{
    write_snapshot(&path, &snapshot())?;
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || loop {
            thread::sleep(interval);
            if let Err(e) = write_snapshot(&path, &snapshot()) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write metrics");
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        write_snapshot(&path, &serde_json::json!({"a": 1})).unwrap();
        write_snapshot(&path, &serde_json::json!({"a": 2})).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["a"], 2);
        assert!(!dir.path().join("m.json.tmp").exists());
    }
}
