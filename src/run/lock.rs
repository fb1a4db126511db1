//! The lock a process holds on a run folder while it trains there (`.kd-lock`), so that a
//! second `kd train` / `kd distill` / `kd run` on the same folder stops at once instead of
//! mixing its files in. The operating system releases it when the process ends, however it
//! ends.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::files;
use crate::io::ensure_dir;

/// A held lock on a run folder; released when dropped.
#[derive(Debug)]
pub struct RunLock(#[allow(dead_code)] File);

impl RunLock {
    /// Locks `dir` (created if missing), or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        ensure_dir(dir)?;
        let path = dir.join(files::LOCK);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| {
                format!(
                    "cannot create {}: check that the folder is writable",
                    path.display()
                )
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Self(file)),
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "{} is in use by another kd process training there: wait for it to finish, or choose another --out",
                dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}
