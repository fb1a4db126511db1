//! Durable, atomic file writes: a reader never sees a half-written file.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically: temp file in the same folder, fsync, rename, fsync folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_parts(path, &[bytes])
}

/// Writes the concatenation of `parts` to `path` atomically, like [`write_atomic`], without
/// first copying them into one buffer.
pub fn write_atomic_parts(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        if fault_injected(path) {
            let first = parts.first().copied().unwrap_or_default();
            file.write_all(&first[..first.len() / 2])?;
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        for part in parts {
            file.write_all(part)?;
        }
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err).with_context(|| {
            format!(
                "cannot write {}: check that the folder is writable and the disk has space",
                path.display()
            )
        });
    }
    Ok(())
}

/// Test hook: `KD_FAULT_DISK_FULL=<substring>` makes writes of matching paths fail half-way
/// as if the disk were full, to check that nothing half-written is left behind.
fn fault_injected(path: &Path) -> bool {
    std::env::var("KD_FAULT_DISK_FULL")
        .is_ok_and(|pat| !pat.is_empty() && path.to_string_lossy().contains(&pat))
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON for kd", path.display()))
}

/// Creates `dir` (and parents), with a clear error when that is impossible.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create folder {}: choose a writable location",
            dir.display()
        )
    })
}

/// Takes an exclusive lock on the file `path` (created if missing), released when the
/// returned file is dropped or the process ends however it ends; `None` when another process
/// holds it.
pub fn try_lock_file(path: &Path) -> Result<Option<File>> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {}: check that the folder is writable",
                path.display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Whether another process holds the exclusive lock of the file `path` (a run being
/// trained). Looks with a shared lock, so that any number of readers may look at once; a
/// missing file is not held.
pub fn is_locked(path: &Path) -> Result<bool> {
    let Ok(file) = File::open(path) else {
        return Ok(false);
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(fs::TryLockError::WouldBlock) => Ok(true),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// What ends a file guarded by [`with_checksum`]: this tag, then the CRC-32 (little-endian)
/// of everything before it.
const CHECKSUM_TAG: &[u8; 8] = b"KDCRC32:";

/// The trailer that guards `parts` (written one after the other): [`CHECKSUM_TAG`] and their
/// CRC-32.
pub fn with_checksum(parts: &[&[u8]]) -> [u8; 12] {
    let mut crc = crc32fast::Hasher::new();
    for part in parts {
        crc.update(part);
    }
    let mut trailer = [0u8; 12];
    trailer[..8].copy_from_slice(CHECKSUM_TAG);
    trailer[8..].copy_from_slice(&crc.finalize().to_le_bytes());
    trailer
}

/// A file's CRC-32 without reading it whole: the one its checksum trailer holds (the contents
/// are checked against it whenever the file is loaded), or for a file written before kd kept
/// checksums, computed.
pub fn file_checksum(path: &Path) -> Result<u32> {
    use std::io::{Read, Seek, SeekFrom};
    let context = || format!("cannot read {}", path.display());
    let mut file = File::open(path).with_context(context)?;
    if file.metadata().with_context(context)?.len() >= 12 {
        let mut trailer = [0u8; 12];
        file.seek(SeekFrom::End(-12)).with_context(context)?;
        file.read_exact(&mut trailer).with_context(context)?;
        if &trailer[..8] == CHECKSUM_TAG {
            return Ok(u32::from_le_bytes(
                trailer[8..].try_into().expect("4 bytes"),
            ));
        }
    }
    Ok(crc32fast::hash(&fs::read(path).with_context(context)?))
}

/// The contents of a file read as `bytes`, its checksum trailer checked and removed; a file
/// without one (written before kd kept checksums) is taken as it is. A mismatch names the
/// file: it was damaged after it was written.
pub fn verified(mut bytes: Vec<u8>, path: &Path) -> Result<Vec<u8>> {
    let Some(body) = bytes.len().checked_sub(12) else {
        return Ok(bytes);
    };
    if &bytes[body..body + 8] != CHECKSUM_TAG {
        return Ok(bytes);
    }
    let stored = u32::from_le_bytes(bytes[body + 8..].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..body]) != stored {
        anyhow::bail!(
            "{} is damaged (its checksum does not match its contents): restore it from a copy, or use another checkpoint",
            path.display()
        );
    }
    bytes.truncate(body);
    Ok(bytes)
}

/// The process that wrote a temporary file of [`write_atomic`] (`.NAME.tmp-PID`), or
/// another hidden `.NAME<marker>PID` (a split's `.partial-`).
fn temp_writer(name: &str, marker: &str) -> Option<u32> {
    let (_, pid) = name.strip_prefix('.')?.rsplit_once(marker)?;
    pid.parse().ok()
}

/// Whether `name` is a hidden `.NAME<marker>PID` of a process that is no longer running.
pub fn left_by_dead_process(name: &str, marker: &str) -> bool {
    temp_writer(name, marker).is_some_and(|pid| pid != std::process::id() && !alive(pid))
}

/// Whether process `pid` is alive (on Unix; elsewhere every process counts as alive, so
/// nothing is removed).
fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes from `dir` the temporary files of [`write_atomic`] left by processes that died
/// mid-write (`kill -9`); returns how many. The caller holds the folder's lock, so no live
/// writer of another process is touched.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if left_by_dead_process(&name, ".tmp-")
            && entry.file_type().is_ok_and(|t| t.is_file())
            && fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// A path given on the command line: an empty one (`--out ""`) would mean the working
/// folder, which no command means, so it is refused (clap's value parser).
pub fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        Err("an empty path: give a file or folder".into())
    } else {
        Ok(PathBuf::from(s))
    }
}

/// `path` made absolute with symlinks resolved as far as it exists (the rest appended), so
/// that two spellings of one place compare equal, even for a folder not created yet.
pub fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => resolved(parent).join(name),
        (_, Some(name)) => resolved(Path::new(".")).join(name),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_of_dead_writers_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let ours = std::process::id();
        for name in [
            format!(".best.bpk.tmp-{dead}"),
            format!(".last.kdc.tmp-{ours}"),
            "best.bpk".into(),
            format!("notes.tmp-{dead}"),
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(dir.path()), 1);
        assert!(!dir.path().join(format!(".best.bpk.tmp-{dead}")).exists());
        for kept in [format!(".last.kdc.tmp-{ours}"), "best.bpk".into()] {
            assert!(dir.path().join(kept).exists());
        }
    }

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn atomic_write_into_missing_folder_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("a.json");
        let err = write_atomic(&path, b"x").unwrap_err();
        assert!(format!("{err:#}").contains("a.json"));
    }
}
