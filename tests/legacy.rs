//! Run folders written by the kd before the redesign (`tests/fixtures/legacy`, made with that
//! release: two ResNet runs of 2 epochs, the second distilled with `--kd-loss seed`, and a
//! CoAtNet run) still evaluate, export, compare and resume, and a resumed run continues as
//! that kd did (its 3-epoch runs are in `reference/`).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Runs `kd` in `dir` (the runs record paths relative to it) and asserts success.
fn kd_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kd"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run kd");
    assert!(
        out.status.success(),
        "kd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn metrics(path: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Epochs the old kd recorded are kept as they were; the epoch trained now equals the old
/// kd's to rounding (bit for bit on the machine that made the fixture; other CPUs may round
/// the GEMMs differently).
fn assert_continues(resumed: &Path, reference: &Path) {
    let (new, old) = (metrics(resumed), metrics(reference));
    assert_eq!(new.len(), 3);
    for (n, o) in new.iter().zip(&old) {
        for key in ["train_loss", "val_loss", "val_accuracy", "lr"] {
            let (a, b) = (n[key].as_f64().unwrap(), o[key].as_f64().unwrap());
            let tol = if n["epoch"] == 3 { 1e-5 * b.abs() } else { 0.0 };
            assert!(
                (a - b).abs() <= tol,
                "epoch {}: {key} {a} vs {b}",
                n["epoch"]
            );
        }
        if o.get("train_kd_loss").is_some_and(|v| !v.is_null()) {
            for part in ["kd", "ce"] {
                let a = n["train_parts"][part].as_f64().unwrap();
                let b = o[format!("train_{part}_loss")].as_f64().unwrap();
                assert!((a - b).abs() <= 1e-5 * b.abs(), "{part}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn runs_of_the_previous_kd_evaluate_export_compare_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_dir(&fixture("legacy"), dir);

    for run in ["runs/teacher", "runs/kd", "runs/coatnet"] {
        let out = kd_in(dir, &["eval", "--run", run, "--json"]);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["images"], 6, "{run}: {out}");
        assert_eq!(report["epoch"], 1, "{run}");
    }
    kd_in(
        dir,
        &["export", "--run", "runs/kd", "--out", "kd.safetensors"],
    );
    let exported = read_safetensors(&dir.join("kd.safetensors"));
    assert_eq!(exported["fc.weight"].shape, [3, 16]);
    assert!(exported.contains_key("layer4.1.bn2.running_var"));
    kd_in(
        dir,
        &["export", "--run", "runs/coatnet", "--out", "c.safetensors"],
    );
    assert!(
        read_safetensors(&dir.join("c.safetensors")).contains_key("s3.0.attn.1.fn.relative_index")
    );

    let table = kd_in(
        dir,
        &[
            "compare",
            "runs/teacher",
            "runs/kd",
            "runs/coatnet",
            "--out",
            "report",
        ],
    );
    assert!(
        table.contains("student with KD (resnet18, tutorial)"),
        "{table}"
    );
    let chart = std::fs::read(dir.join("report/train_loss.png")).unwrap();
    assert!(chart.starts_with(b"\x89PNG"));

    // The KD run first (its teacher's best checkpoint is the one it learnt from), then the
    // teacher, each resumed for a third epoch.
    kd_in(
        dir,
        &[
            "distill",
            "--resume",
            "--out",
            "runs/kd",
            "--teacher",
            "runs/teacher",
            "--epochs",
            "3",
            "--quiet",
        ],
    );
    assert_continues(
        &dir.join("runs/kd/metrics.json"),
        &dir.join("reference/kd-3-epochs.json"),
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("runs/kd/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["teacher"]["kd"]["method"], "tutorial",
        "`seed` is the tutorial's loss"
    );
    kd_in(
        dir,
        &[
            "train",
            "--resume",
            "--out",
            "runs/teacher",
            "--epochs",
            "3",
            "--quiet",
        ],
    );
    assert_continues(
        &dir.join("runs/teacher/metrics.json"),
        &dir.join("reference/teacher-3-epochs.json"),
    );
}
