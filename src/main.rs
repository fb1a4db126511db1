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

/// Counts the bytes in use (what a run's memory check measures) and ends a refused
/// allocation with one clear line instead of an abort.
#[global_allocator]
static ALLOCATOR: kd::mem::Allocator = kd::mem::Allocator;

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
    if let Some(mib) = std::env::var("KD_FAULT_MEMORY_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        kd::mem::set_limit(mib << 20);
    }
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
    // First Ctrl-C (or SIGTERM, SIGHUP): finish the current batch, save a resumable state,
    // exit. Second: exit now.
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
