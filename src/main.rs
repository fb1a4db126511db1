use clap::Parser;

/// Keeps glibc from returning every large tensor buffer to the kernel when it is freed.
///
/// Burn allocates a fresh buffer for each op's output, many of them megabytes large: above
/// glibc's default mmap threshold each one is a new mapping whose pages fault in zeroed, and
/// its free unmaps it again. Serving them from the heap instead made ResNet-18 training
/// steps about 14% faster (page faults and page clearing were ~10% of a step).
///
/// One arena for all threads: the work runs on rayon's threads (see [`run_on_worker`]), and
/// glibc's per-thread arenas are mmap'd heaps of at most 64 MB that it shrinks and unmaps
/// as buffers come and go (CoAtNet-2 inference lost 27% to page faults and TLB shootdowns).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// The system allocator, with a clear last line instead of Rust's abort (exit 134 and a
/// backtrace) when memory runs out: which size was asked for and what to lower.
#[cfg(unix)]
struct ReportingAllocator;

// SAFETY: every call goes to the system allocator unchanged; a failed allocation ends the
// process instead of returning null.
#[cfg(unix)]
unsafe impl std::alloc::GlobalAlloc for ReportingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's layout is passed on as it is.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: ReportingAllocator = ReportingAllocator;

/// Writes one line to stderr without allocating (there is no memory left) and exits 1. The
/// files kd writes are renamed into place whole, so nothing half-written remains; a run that
/// saved no epoch starts again by the same command.
#[cfg(unix)]
fn out_of_memory(size: usize) -> ! {
    let mut line = [0u8; 256];
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
    let (mut v, mut d) = (size / (1 << 20), digits.len());
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
    // SAFETY: writes `n` initialised bytes to stderr, then ends the process at once.
    unsafe {
        libc::write(2, line.as_ptr().cast(), n);
        libc::_exit(1)
    }
}

/// Runs `job` on a thread of rayon's global pool. The kernels' parallel loops (kd's, Burn's
/// flex backend's, gemm's) then start on the calling worker at once, instead of waking the
/// pool from the main thread and sleeping until it finishes, hundreds of times per training
/// step.
fn run_on_worker<T: Send>(job: impl FnOnce() -> T + Send) -> T {
    let mut out = None;
    rayon::scope(|s| s.spawn(|_| out = Some(job())));
    out.expect("the job ran")
}

fn main() {
    keep_freed_memory();
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown error");
        if msg.contains("Broken pipe") {
            std::process::exit(0); // output closed early (e.g. piped into `head`)
        }
        eprintln!("error: internal failure: {msg} (please report this with the command you ran)");
    }));
    let cli = match kd::commands::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as clap writes them; a usage error is one line: its
        // message with clap's details (the missing arguments, the possible values, a tip),
        // without the usage block.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            let mut line = String::new();
            for part in text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
            {
                if !line.is_empty() {
                    line += if line.ends_with(':') { " " } else { "; " };
                }
                line += part;
            }
            if line.is_empty() {
                line = "error: invalid arguments".into();
            }
            eprintln!("{line} (see --help)");
            std::process::exit(2);
        }
    };
    // First Ctrl-C: finish the current batch, save a resumable state, exit. Second: exit now.
    let handler = ctrlc::set_handler(|| {
        static PRESSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if PRESSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping: a training saves after its current batch, a split removes what it wrote (Ctrl-C again to quit at once)..."
        );
        kd::interrupt::request();
    });
    if let Err(e) = handler {
        eprintln!(
            "warning: Ctrl-C handling unavailable ({e}); an interrupted run resumes from its last epoch"
        );
    }
    if let Err(err) = run_on_worker(|| cli.run()) {
        eprintln!("error: {err:#}");
        let interrupted = err.downcast_ref::<kd::train::Interrupted>().is_some()
            || err.downcast_ref::<kd::interrupt::Stopped>().is_some();
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
