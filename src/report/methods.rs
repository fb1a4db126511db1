//! A comparison over seeds: runs that differ only in their seed form one group (a method,
//! the plain student, the teacher), ranked by mean best validation accuracy with the spread
//! over seeds and the difference to the plain student and to Hinton's KD.

use serde::{Deserialize, Serialize};

use super::charts::Series;
use crate::losses::Method;
use crate::run::{EpochMetrics, Run, TeacherConfig};

/// How a run's method reads in labels: `None` for Hinton's loss with its defaults (the
/// plain "student with KD"), else the method's name with the settings that differ from its
/// defaults (`dkd beta=2`) and the feature term (`+ features 0.5`).
pub fn method_label(teacher: &TeacherConfig) -> Option<String> {
    let settings = serde_json::to_value(&teacher.kd).ok()?;
    let defaults =
        Method::defaults(teacher.kd.name()).and_then(|d| serde_json::to_value(d).ok())?;
    let mut label = teacher.kd.name().to_string();
    if let (Some(settings), Some(defaults)) = (settings.as_object(), defaults.as_object()) {
        for (key, value) in settings {
            if key != "method" && defaults.get(key) != Some(value) {
                label += &format!(" {key}={value}");
            }
        }
    }
    if teacher.feature_weight > 0.0 {
        label += &format!(" + features {}", teacher.feature_weight);
    }
    (label != Method::default().name()).then_some(label)
}

/// A method's settings as [`MethodRow::settings`] shows them.
fn method_settings(teacher: &TeacherConfig) -> Option<String> {
    let label = method_label(teacher)?;
    let settings = label
        .strip_prefix(teacher.kd.name())
        .unwrap_or(&label)
        .trim();
    (!settings.is_empty()).then(|| settings.to_string())
}

/// What makes two runs the same experiment but for the seed: the config with the seed
/// cleared and the split's seed made explicit (a run whose split follows its seed and one
/// given the same split seed share a split).
fn key(run: &Run) -> String {
    let mut config = run.config.clone();
    config.split_seed = Some(run.config.data_seed());
    config.seed = 0;
    // Each seed's teacher may be another checkpoint of the same teacher config.
    if let Some(t) = &mut config.teacher {
        t.checkpoint_crc32 = None;
    }
    serde_json::to_string(&config).unwrap_or_default()
}

/// The runs grouped by [`key`], each group's indices in the order given, groups in the order
/// of their first run. A group holds each seed once: two runs of the same config and seed
/// (a teacher and a student of the same network, say) are two groups, not two seeds.
pub fn groups(runs: &[Run]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let k = key(run);
        let seed = run.config.seed;
        let fits = |(g, members): &&mut (String, Vec<usize>)| {
            *g == k && members.iter().all(|&m| runs[m].config.seed != seed)
        };
        match groups.iter_mut().find(fits) {
            Some((_, members)) => members.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// A difference of mean best accuracies between two groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delta {
    /// This group's mean minus the other's, in accuracy (0..1).
    pub difference: f64,
    /// Whether the two groups' min–max ranges overlap: the difference is within the spread
    /// over seeds.
    pub within_spread: bool,
}

/// One group of a comparison over seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodRow {
    /// Role, network and method.
    pub label: String,
    /// Architecture name.
    pub network: String,
    /// The method's name (`None` for runs without distillation).
    pub method: Option<String>,
    /// Its settings that differ from the method's defaults, and the feature term
    /// (`beta=2.0 warmup=1 + features 0.5`); `None` for the defaults.
    pub settings: Option<String>,
    /// The seeds of its runs.
    pub seeds: Vec<u64>,
    /// Mean of the runs' best validation accuracies.
    pub mean_best_accuracy: f64,
    /// Their sample standard deviation (0 for one run).
    pub std_best_accuracy: f64,
    /// The lowest.
    pub min_best_accuracy: f64,
    /// The highest.
    pub max_best_accuracy: f64,
    /// Against the plain student (runs without distillation next to KD runs).
    pub vs_plain: Option<Delta>,
    /// Against Hinton's KD with its defaults.
    pub vs_hinton: Option<Delta>,
}

impl MethodRow {
    fn delta(&self, other: &Self) -> Delta {
        Delta {
            difference: self.mean_best_accuracy - other.mean_best_accuracy,
            within_spread: self.min_best_accuracy <= other.max_best_accuracy
                && other.min_best_accuracy <= self.max_best_accuracy,
        }
    }
}

/// The groups' rows, ranked by mean best accuracy (best first). `best` holds each run's best
/// validation accuracy, `labels` each group's label, `roles` whether it is the plain student.
pub fn method_rows(
    runs: &[Run],
    groups: &[Vec<usize>],
    labels: &[String],
    best: &[f64],
    plain: &[bool],
) -> Vec<MethodRow> {
    let mut rows: Vec<(MethodRow, bool)> = groups
        .iter()
        .zip(labels)
        .zip(plain)
        .map(|((members, label), &plain)| {
            let accs: Vec<f64> = members.iter().map(|&i| best[i]).collect();
            let n = accs.len() as f64;
            let mean = accs.iter().sum::<f64>() / n;
            let sd = if accs.len() > 1 {
                (accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
            } else {
                0.0
            };
            let first = &runs[members[0]];
            let row = MethodRow {
                label: label.clone(),
                network: first.config.model.name.clone(),
                method: first
                    .config
                    .teacher
                    .as_ref()
                    .map(|t| t.kd.name().to_string()),
                settings: first.config.teacher.as_ref().and_then(method_settings),
                seeds: members.iter().map(|&i| runs[i].config.seed).collect(),
                mean_best_accuracy: mean,
                std_best_accuracy: sd,
                min_best_accuracy: accs.iter().copied().fold(f64::MAX, f64::min),
                max_best_accuracy: accs.iter().copied().fold(f64::MIN, f64::max),
                vs_plain: None,
                vs_hinton: None,
            };
            (row, plain)
        })
        .collect();
    // Each KD group against the plain student and Hinton's KD of its own network.
    let find = |of: &MethodRow, what: &dyn Fn(&MethodRow, bool) -> bool| {
        rows.iter()
            .position(|(r, p)| r.network == of.network && what(r, *p))
    };
    let deltas: Vec<(Option<Delta>, Option<Delta>)> = rows
        .iter()
        .enumerate()
        .map(|(i, (row, _))| {
            if row.method.is_none() {
                return (None, None);
            }
            let plain = find(row, &|_, plain| plain);
            let hinton = find(row, &|r, _| {
                r.method.as_deref() == Some(Method::default().name()) && r.settings.is_none()
            })
            .filter(|&h| h != i);
            (
                plain.map(|p| row.delta(&rows[p].0)),
                hinton.map(|h| row.delta(&rows[h].0)),
            )
        })
        .collect();
    for ((row, _), (vs_plain, vs_hinton)) in rows.iter_mut().zip(deltas) {
        row.vs_plain = vs_plain;
        row.vs_hinton = vs_hinton;
    }
    let mut rows: Vec<MethodRow> = rows.into_iter().map(|(r, _)| r).collect();
    rows.sort_by(|a, b| b.mean_best_accuracy.total_cmp(&a.mean_best_accuracy));
    rows
}

/// The methods as a markdown table, best first.
pub fn methods_table(rows: &[MethodRow]) -> String {
    let pct = |v: f64| format!("{:.2}", v * 100.0);
    let delta = |d: &Option<Delta>| match d {
        Some(d) => format!(
            "{:+.2}{}",
            d.difference * 100.0,
            if d.within_spread {
                " (within spread)"
            } else {
                ""
            }
        ),
        None => String::new(),
    };
    let mut s = String::from(
        "| rank | run | seeds | best val acc, mean ± sd | min–max | vs plain student | vs Hinton KD |\n\
         |---:|---|---:|---:|---:|---:|---:|\n",
    );
    for (i, r) in rows.iter().enumerate() {
        s += &format!(
            "| {} | {} | {} | {}% ± {} | {}–{}% | {} | {} |\n",
            i + 1,
            r.label,
            r.seeds.len(),
            pct(r.mean_best_accuracy),
            pct(r.std_best_accuracy),
            pct(r.min_best_accuracy),
            pct(r.max_best_accuracy),
            delta(&r.vs_plain),
            delta(&r.vs_hinton),
        );
    }
    s += "\nDifferences are of mean best validation accuracy in points; \"within spread\": the two \
          groups' min–max ranges over seeds overlap.\n";
    s
}

/// The mean over a group's runs of `f` at each epoch all of them reached, with the min–max
/// band.
pub fn mean_series(
    label: &str,
    histories: &[&[EpochMetrics]],
    f: fn(&EpochMetrics) -> f64,
) -> Series {
    let epochs = histories.iter().map(|h| h.len()).min().unwrap_or(0);
    let mut points = Vec::new();
    let mut band = Vec::new();
    for e in 0..epochs {
        let values: Vec<f64> = histories.iter().map(|h| f(&h[e])).collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let epoch = histories[0][e].epoch as u32;
        points.push((epoch, mean));
        // Over the finite values only; no band where there are none.
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let low = finite.clone().fold(f64::INFINITY, f64::min);
        let high = finite.fold(f64::NEG_INFINITY, f64::max);
        if low.is_finite() {
            band.push((epoch, low, high));
        }
    }
    Series {
        label: label.to_string(),
        points,
        band: (histories.len() > 1).then_some(band),
    }
}

/// Each named part of a distillation method's training loss (`kd`, `ce`, ...), per epoch,
/// averaged over `histories` (one run, or a group over seeds), labelled `label: part`.
pub fn parts_series(label: &str, histories: &[&[EpochMetrics]]) -> Vec<Series> {
    let Some(first) = histories.first().and_then(|h| h.first()) else {
        return Vec::new();
    };
    let epochs = histories.iter().map(|h| h.len()).min().unwrap_or(0);
    first
        .train_parts
        .keys()
        .map(|part| Series {
            label: format!("{label}: {part}"),
            points: (0..epochs)
                .map(|e| {
                    let sum: f64 = histories
                        .iter()
                        .map(|h| h[e].train_parts.get(part).copied().unwrap_or(f64::NAN))
                        .sum();
                    (histories[0][e].epoch as u32, sum / histories.len() as f64)
                })
                .collect(),
            band: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::TrainConfig;

    fn run(name: &str, seed: u64) -> Run {
        Run {
            dir: name.into(),
            config: TrainConfig {
                seed,
                split_seed: Some(42),
                ..TrainConfig::default()
            },
            classes: vec!["a".into(), "b".into()],
        }
    }

    /// Runs of one config group over their seeds; two of the same seed (a teacher and a
    /// student of the same network, say) are two groups, not "2 seeds".
    #[test]
    fn a_group_holds_each_seed_once() {
        let runs = [run("t", 42), run("s", 42), run("s2", 43)];
        assert_eq!(groups(&runs), vec![vec![0, 2], vec![1]]);
    }
}
