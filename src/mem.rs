//! Host memory: the allocator the `kd` binary installs (it counts the bytes in use and their
//! peak, and ends a refused allocation with one clear line instead of Rust's abort), and the
//! memory the system has available. The counts let [`crate::models::memory`] measure what a
//! training step needs before a run allocates it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The system allocator, counting: `#[global_allocator] static A: kd::mem::Allocator =
/// kd::mem::Allocator;` (the `kd` binary does).
pub struct Allocator;

impl Allocator {
    /// Whether `size` more bytes would pass [`set_limit`]'s limit.
    fn over_limit(size: usize) -> bool {
        IN_USE.load(Ordering::Relaxed).saturating_add(size) > LIMIT.load(Ordering::Relaxed)
    }

    fn grew(size: usize) {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        let now = IN_USE.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call goes to the system allocator unchanged; a refused allocation ends the
// process instead of returning null; the counts are plain atomics.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout is passed on as it is.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() || Self::over_limit(layout.size()) {
            out_of_memory(layout.size());
        }
        Self::grew(layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() || Self::over_limit(layout.size()) {
            out_of_memory(layout.size());
        }
        Self::grew(layout.size());
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() || Self::over_limit(new_size.saturating_sub(layout.size())) {
            out_of_memory(new_size);
        }
        if new_size >= layout.size() {
            Self::grew(new_size - layout.size());
        } else {
            IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Writes one line to stderr without allocating (there is no memory left) and ends the
/// process with exit 1. Files kd writes are renamed into place whole, so nothing
/// half-written remains; a run that saved no epoch starts again by the same command.
fn out_of_memory(size: usize) -> ! {
    let mut line = [0u8; 160];
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if n < line.len() {
                line[n] = b;
                n += 1;
            }
        }
    };
    put(b"error: out of memory: ");
    let mut digits = [0u8; 20];
    let (mut v, mut d) = (size >> 20, digits.len());
    loop {
        d -= 1;
        digits[d] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[d..]);
    put(b" MiB more could not be had; lower --batch-size, --image-size or --width\n");
    #[cfg(unix)]
    // SAFETY: writes `n` initialised bytes to stderr, then ends the process at once.
    unsafe {
        libc::write(2, line.as_ptr().cast(), n);
        libc::_exit(1)
    }
    #[cfg(not(unix))]
    {
        use std::io::Write;
        let _ = std::io::stderr().write_all(&line[..n]);
        std::process::exit(1)
    }
}

/// Refuses allocations beyond `bytes` in use, as a system out of memory would: the fault
/// hook `KD_FAULT_MEMORY_MIB` (tests of the out-of-memory path, on any machine).
pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// The bytes allocated now, if the counting allocator is installed.
pub fn in_use() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| IN_USE.load(Ordering::Relaxed))
}

/// Starts a new peak at the bytes allocated now.
pub fn reset_peak() {
    PEAK.store(IN_USE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The most bytes allocated at once since [`reset_peak`], if the counting allocator is
/// installed.
pub fn peak() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| PEAK.load(Ordering::Relaxed))
}

/// The memory this process can still take, in bytes: the system's available memory
/// (`MemAvailable`), or less under a cgroup limit. `None` where it cannot be read.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let system = kib * 1024;
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let cgroup = read("memory.max")
        .zip(read("memory.current"))
        .map(|(max, used)| max.saturating_sub(used));
    Some(cgroup.map_or(system, |c| c.min(system)))
}
