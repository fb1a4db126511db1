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
    if let Err(err) = cli.run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
