//! `--precision bf16` (autocast) trains for real on the CPU, is recorded in the run, and
//! `--device cuda` on a build without CUDA fails with a one-line fix.

mod common;

use common::*;

#[test]
fn bf16_autocast_learns_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("digits");
    mnist_subset(&src, 10, 60);
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    kd_ok(&[
        "train",
        "--data",
        src.to_str().unwrap(),
        "--model",
        "resnet18",
        "--width",
        "8",
        "--stem",
        "small",
        "--image-size",
        "32",
        "--epochs",
        "5",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--no-augment",
        "--precision",
        "bf16",
        "--out",
        r,
        "--quiet",
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["precision"], "bf16");
    // The recipe's Adam is PyTorch's: epsilon 1e-8 (Burn's default would be 1e-5).
    assert_eq!(config["adam_epsilon"].as_f64(), Some(1e-8));
    let metrics: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    let first = metrics[0]["train_loss"].as_f64().unwrap();
    let last = metrics.last().unwrap()["train_loss"].as_f64().unwrap();
    assert!(
        last < first * 0.6,
        "bf16 training loss falls: {first} -> {last}"
    );
    let best = metrics
        .iter()
        .map(|m| m["val_accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        best >= 0.6,
        "bf16 best validation accuracy {best} (chance 0.1)"
    );

    // The same weights evaluated in bf16 (the run's precision) and in f32 agree closely.
    let acc = |precision: &str| -> f64 {
        let out = kd_ok(&["eval", "--run", r, "--json", "--precision", precision]);
        let eval: serde_json::Value = serde_json::from_str(&out).unwrap();
        eval["accuracy"].as_f64().unwrap()
    };
    let (bf16, f32) = (acc("bf16"), acc("f32"));
    assert!(
        (bf16 - best).abs() < 1e-9,
        "eval in bf16 {bf16} vs training {best}"
    );
    assert!((bf16 - f32).abs() <= 0.05, "bf16 {bf16} vs f32 {f32}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_the_feature_says_how_to_rebuild() {
    let err = kd_err(&[
        "bench", "--model", "resnet18", "--device", "cuda:0", "--steps", "1",
    ]);
    assert!(err.contains("--features cuda"), "{err}");
    let err = kd_err(&[
        "bench",
        "--model",
        "resnet18",
        "--device",
        "cubecl-cpu",
        "--steps",
        "1",
    ]);
    assert!(err.contains("--features cubecl-cpu"), "{err}");
    let out = kd(&["bench", "--device", "tpu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown device 'tpu': use cpu, cuda or cuda:N"),
        "{err}"
    );
}
