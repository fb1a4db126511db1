use clap::Parser;

fn main() {
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
    let cli = kd::cli::Cli::parse();
    // First Ctrl-C: finish the current batch, save a resumable state, exit. Second: exit now.
    let handler = ctrlc::set_handler(|| {
        static PRESSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if PRESSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after the current batch (Ctrl-C again to quit at once)...");
        kd::train::request_interrupt();
    });
    if let Err(e) = handler {
        eprintln!(
            "warning: Ctrl-C handling unavailable ({e}); an interrupted run resumes from its last epoch"
        );
    }
    if let Err(err) = cli.run() {
        eprintln!("error: {err:#}");
        let interrupted = err.downcast_ref::<kd::train::Interrupted>().is_some();
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
