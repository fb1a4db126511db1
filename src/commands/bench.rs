//! `kd bench`.

use anyhow::Result;
use clap::Args;

use crate::bench::BenchOptions;

/// Options of `kd bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    options: BenchOptions,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let r = crate::bench::run(&a.options)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let rss = r
        .peak_rss_mib
        .map_or_else(|| "n/a".into(), |m| format!("{m:.0} MiB"));
    let device_memory = r
        .peak_device_mib
        .map(|m| format!(", peak device memory {m:.0} MiB"))
        .unwrap_or_default();
    println!(
        "{}: {:.1} img/s ({:.3} s/step, batch {}, {}x{}, {} threads, {}, {}), peak RSS {rss}{device_memory}",
        r.what,
        r.images_per_second,
        r.seconds_per_step,
        r.batch,
        r.image_size,
        r.image_size,
        r.threads,
        r.device,
        r.precision,
    );
    if let Some(profile) = &r.profile {
        let steps = &profile.steps;
        let total: f64 = steps.iter().map(|s| s.seconds).sum();
        let unit = if profile.workers > 1 {
            "thread-ms/batch"
        } else {
            "ms/batch"
        };
        println!("{:>4}  {unit:>9}  {:>6}  step", "#", "share");
        for (i, s) in steps.iter().enumerate() {
            println!(
                "{i:>4}  {:>9.3}  {:>5.1}%  {}",
                s.seconds * 1e3,
                s.seconds / total.max(f64::MIN_POSITIVE) * 100.0,
                s.step
            );
        }
        println!("{:>4}  {:>9.3}  100.0%  all steps", "", total * 1e3);
        if profile.workers > 1 {
            println!(
                "(the batch ran in chunks of images on {} workers: each row adds up their time)",
                profile.workers
            );
        }
    }
    Ok(())
}
