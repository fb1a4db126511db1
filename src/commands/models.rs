//! `kd models`.

use anyhow::{Result, bail};
use clap::Args;

use crate::models::{FAMILIES, MAX_CLASSES, MAX_WIDTH, ModelSpec, param_count};

/// Options of `kd models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Class count for the parameter counts.
    #[arg(long, default_value_t = 1000)]
    classes: usize,
    /// Image size for the parameter counts (CoAtNet's attention tables grow with it).
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Base width, as --width of kd train (the counts of the tiny models a test trains).
    #[arg(long)]
    width: Option<usize>,
}

pub fn run(a: ModelsArgs) -> Result<()> {
    if a.classes < 2 {
        bail!("--classes {} is invalid: use at least 2", a.classes);
    }
    crate::data::check_image_size(a.image_size)?;
    let device = burn::tensor::Device::flex();
    if a.width == Some(0) {
        bail!("--width 0 is invalid: use at least 1");
    }
    if let Some(w) = a.width.filter(|&w| w > MAX_WIDTH) {
        bail!("--width {w} is too large: use at most {MAX_WIDTH}");
    }
    if a.classes > MAX_CLASSES {
        bail!(
            "--classes {} is too many: use at most {MAX_CLASSES}",
            a.classes
        );
    }
    let width = a.width.map(|w| format!(", width {w}")).unwrap_or_default();
    println!(
        "{:<18} {:>14}  kind  ({} classes, {}x{} images{width})",
        "model", "parameters", a.classes, a.image_size, a.image_size
    );
    for family in FAMILIES {
        // Where the count follows the size, a size the family cannot take shows '-'; the
        // others count at the recipe's size whatever the size asked for.
        let size = if family.size_dependent {
            a.image_size
        } else {
            224
        };
        for name in family.names {
            let spec = ModelSpec {
                width: a.width,
                ..ModelSpec::named(name)
            };
            let count = match spec.validate(size) {
                Ok(()) => param_count(&spec.build(a.classes, size, &device)?).to_string(),
                Err(_) => "-".into(),
            };
            println!("{name:<18} {count:>14}  {}", family.description);
        }
    }
    Ok(())
}
