//! `kd models`.

use anyhow::{Result, bail};
use clap::Args;

use crate::models::{FAMILIES, ModelSpec, param_count};

/// Options of `kd models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Class count for the parameter counts.
    #[arg(long, default_value_t = 1000)]
    classes: usize,
    /// Image size for the parameter counts (CoAtNet's attention tables grow with it).
    #[arg(long, default_value_t = 224)]
    image_size: usize,
}

pub fn run(a: ModelsArgs) -> Result<()> {
    if a.classes < 2 {
        bail!("--classes {} is invalid: use at least 2", a.classes);
    }
    crate::data::check_image_size(a.image_size)?;
    let device = burn::tensor::Device::flex();
    println!(
        "{:<18} {:>14}  kind  ({} classes, {}x{} images)",
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
            let spec = ModelSpec::named(name);
            let count = match spec.validate(size) {
                Ok(()) => param_count(&spec.build(a.classes, size, &device)?).to_string(),
                Err(_) => "-".into(),
            };
            println!("{name:<18} {count:>14}  {}", family.description);
        }
    }
    Ok(())
}
