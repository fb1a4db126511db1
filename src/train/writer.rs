//! Writing a run's files on a background thread, so that the next epoch trains while a
//! large model's checkpoints reach the disk.

use std::thread::JoinHandle;

use anyhow::{Result, anyhow};

/// One file write (each is atomic on its own).
pub type WriteJob = Box<dyn FnOnce() -> Result<()> + Send>;

/// Runs batches of writes in order on one background thread, one batch at a time. A failed
/// write skips the rest of its batch (so the resume state, queued last, never gets ahead of
/// the checkpoints and metrics) and is returned by the next [`poll`](Self::poll),
/// [`wait`](Self::wait) or [`write`](Self::write).
#[derive(Default)]
pub struct BackgroundWriter {
    pending: Option<JoinHandle<Result<()>>>,
}

impl BackgroundWriter {
    /// Waits until the batch queued last is on disk; returns its first error.
    pub fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| anyhow!("the thread writing the checkpoints panicked"))?,
            None => Ok(()),
        }
    }

    /// Returns the error of a batch that has finished and failed, without waiting for one
    /// still running; training calls it every step so a full disk stops it at once.
    pub fn poll(&mut self) -> Result<()> {
        if self.pending.as_ref().is_some_and(JoinHandle::is_finished) {
            self.wait()
        } else {
            Ok(())
        }
    }

    /// Waits for the previous batch, then starts writing `jobs` in order.
    pub fn write(&mut self, jobs: Vec<WriteJob>) -> Result<()> {
        self.wait()?;
        let handle = std::thread::Builder::new()
            .name("kd-checkpoints".into())
            .spawn(move || jobs.into_iter().try_for_each(|job| job()))
            .map_err(|e| anyhow!("cannot start the thread writing the checkpoints: {e}"))?;
        self.pending = Some(handle);
        Ok(())
    }
}

impl Drop for BackgroundWriter {
    /// On an early return (an error elsewhere) the files still finish; a write error is
    /// printed, since the caller is already returning another one.
    fn drop(&mut self) {
        if let Err(err) = self.wait() {
            eprintln!("kd: {err:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn writes_in_order_and_stops_a_batch_at_its_first_error() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let job = |name: &'static str, ok: bool| -> WriteJob {
            let log = log.clone();
            Box::new(move || {
                log.lock().unwrap().push(name);
                if ok {
                    Ok(())
                } else {
                    Err(anyhow!("{name} failed"))
                }
            })
        };
        let mut writer = BackgroundWriter::default();
        writer.write(vec![job("a", true), job("b", true)]).unwrap();
        writer
            .write(vec![job("c", false), job("resume", true)])
            .unwrap();
        while writer.pending.as_ref().is_some_and(|h| !h.is_finished()) {
            std::thread::yield_now();
        }
        let err = writer.poll().unwrap_err();
        assert_eq!(err.to_string(), "c failed");
        assert_eq!(*log.lock().unwrap(), ["a", "b", "c"]);
        writer.wait().unwrap();
    }
}
