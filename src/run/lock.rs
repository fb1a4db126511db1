//! The lock a process holds on a run folder while it trains there (`.kd-lock`), so that a
//! second `kd train` / `kd distill` / `kd run` on the same folder stops at once instead of
//! mixing its files in. The operating system releases it when the process ends, however it
//! ends. Taking it removes the temporary files of writers that died mid-write.

use std::fs::File;
use std::path::Path;

use anyhow::{Result, bail};

use super::files;
use crate::io::ensure_dir;

/// A held lock on a run folder; released when dropped.
#[derive(Debug)]
pub struct RunLock(#[allow(dead_code)] File);

impl RunLock {
    /// Locks `dir` (created if missing), or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        ensure_dir(dir)?;
        let Some(file) = crate::io::try_lock_file(&dir.join(files::LOCK))? else {
            bail!(
                "{} is in use by another kd process training there: wait for it to finish, or choose another --out",
                dir.display()
            );
        };
        // Half-written files of a process killed mid-write go now.
        for folder in [dir.to_path_buf(), dir.join(files::CHECKPOINTS)] {
            crate::io::remove_stale_temps(&folder);
        }
        Ok(Self(file))
    }
}
