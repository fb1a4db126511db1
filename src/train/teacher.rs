//! The frozen teacher of a distillation run.

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::TrainConfig;
use crate::data::{Batch, Loader};
use crate::eval::{images_tensor, logits_rows};
use crate::losses::DistillLoss;
use crate::models::Network;
use crate::run::Run;

/// A trained network in inference mode (BatchNorm running statistics, no autodiff graph,
/// never updated) and the distillation loss that uses its logits.
pub struct Teacher {
    /// The network, on a plain (non-autodiff) device.
    pub net: Network,
    /// The loss comparing student and teacher logits.
    pub loss: Box<dyn DistillLoss>,
    device: Device,
}

impl Teacher {
    /// Loads the frozen teacher of a distillation config and checks it fits the data; the
    /// student takes the teacher's normalization unless one is given (it must then match).
    pub fn load(
        config: &mut TrainConfig,
        classes: &[String],
        device: &Device,
    ) -> Result<Option<Self>> {
        let Some(tc) = config.teacher.clone() else {
            return Ok(None);
        };
        let run = Run::open(&tc.run).context("cannot load the teacher")?;
        for (name, mine, theirs) in [
            ("mean", &mut config.mean, run.config.mean),
            ("std", &mut config.std, run.config.std),
        ] {
            match (*mine, theirs) {
                (None, t) => *mine = t,
                (Some(m), Some(t)) if m != t => bail!(
                    "--{name} {m:?} differs from the teacher's {t:?} ({}): the teacher must see the same normalization; drop --{name}",
                    tc.run.display()
                ),
                _ => {}
            }
        }
        if run.classes != classes {
            let (missing, extra) = crate::data::folder::class_difference(classes, &run.classes);
            bail!(
                "teacher {} was trained on other classes than {} (data only: {missing:?}, teacher only: {extra:?}{}): train the teacher on the same class folders",
                tc.run.display(),
                config.data.display(),
                if missing.is_empty() && extra.is_empty() {
                    ", same names in another order"
                } else {
                    ""
                }
            );
        }
        if run.config.image_size != config.image_size {
            bail!(
                "teacher {} uses image size {} but the student {}: use --image-size {}",
                tc.run.display(),
                run.config.image_size,
                config.image_size,
                run.config.image_size
            );
        }
        let net = run.load_network(&tc.checkpoint, device)?.valid();
        Ok(Some(Self {
            net,
            loss: tc.kd.build(),
            device: device.clone(),
        }))
    }

    /// Teacher logits for a batch (the exact images the student sees), outside any graph.
    pub fn logits(&self, batch: &Batch) -> Tensor<2> {
        self.forward(images_tensor(batch, &self.device))
    }

    /// Teacher logits for images already on [`Teacher::device`].
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.net.forward(images)
    }

    /// The plain (non-autodiff) device the teacher runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits of every image of a loader, indexed like its samples (the logit cache).
    pub fn logits_of_all(&self, loader: &Loader) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); loader.len()];
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            for (row, &i) in logits_rows(self.logits(&batch))?
                .into_iter()
                .zip(&batch.indices)
            {
                out[i] = row;
            }
        }
        Ok(out)
    }
}
