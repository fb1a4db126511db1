//! Hostile input and interruptions: damaged checkpoints are named, byte-identical
//! checkpoints, first-epoch failures that restart, leftovers of killed processes removed,
//! `kd split`'s tiny classes, lock, Ctrl-C and leftovers, outputs that would overwrite an
//! input, empty paths, incomparable runs, damaged metrics, files that are not regular, sizes
//! beyond the machine's memory.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const TINY: &[&str] = &[
    "--model",
    "resnet18",
    "--stem",
    "small",
    "--width",
    "4",
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--no-augment",
    "--quiet",
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `kd train` of the tiny model on `data` into `out` with `extra` flags.
fn train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--data", s(data), "--out", s(out)];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    kd(&args)
}

fn ok(out: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// A temporary folder with two digit classes (`d`) and a tiny one-epoch run on them (`run`).
fn trained_run() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 12);
    let run = dir.path().join("run");
    ok(train(&data, &run, &["--epochs", "1"]));
    (dir, data, run)
}

/// A process that has ended: its id names nothing alive.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn checkpoints_are_reproducible_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 12);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(train(&data, &a, &["--epochs", "2"]));
    ok(train(&data, &b, &["--epochs", "2"]));
    // The same seed and config write the same bytes, so checkpoints can be hashed.
    for f in ["best.bpk", "final.bpk"] {
        let (x, y) = (
            std::fs::read(a.join("checkpoints").join(f)).unwrap(),
            std::fs::read(b.join("checkpoints").join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs between two identical runs");
    }

    // One flipped byte in a weight: evaluation, prediction and export name the file.
    let best = a.join("checkpoints/best.bpk");
    let len = std::fs::metadata(&best).unwrap().len() as usize;
    flip_byte(&best, len - 100);
    let image = std::fs::read_dir(data.join("0"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for args in [
        vec!["eval", "--run", s(&a)],
        vec!["predict", "--run", s(&a), s(&image)],
        vec![
            "export",
            "--run",
            s(&a),
            "--out",
            s(&dir.path().join("x.safetensors")),
        ],
    ] {
        let err = kd_err(&args);
        assert!(
            err.contains("best.bpk is damaged (its checksum does not match"),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.path().join("x.safetensors").exists());
    // ... and so does a resume from a damaged resume state.
    let last = b.join("checkpoints/last.kdc");
    flip_byte(&last, 40);
    let out = train(&data, &b, &["--epochs", "3", "--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("last.kdc is damaged"),
        "{stderr}"
    );
}

#[test]
fn leftovers_of_killed_writers_go_when_the_run_is_next_locked() {
    let (_dir, data, run) = trained_run();
    let stale = run
        .join("checkpoints")
        .join(format!(".best.bpk.tmp-{}", dead_pid()));
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    ok(train(&data, &run, &["--epochs", "2", "--resume"]));
    assert!(
        !stale.exists(),
        "the dead writer's temporary file is removed"
    );
}

#[test]
fn split_refuses_tiny_classes_races_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 3, 6);
    // A class of one image cannot give val/ an image.
    let one = data.join("2");
    for f in std::fs::read_dir(&one).unwrap().flatten().skip(1) {
        std::fs::remove_file(f.path()).unwrap();
    }
    let dst = dir.path().join("split");
    let err = kd_err(&["split", s(&data), s(&dst)]);
    assert!(
        err.contains("class '2' has 1 image") && err.contains("--keep-tiny-classes"),
        "{err}"
    );
    assert!(!dst.exists());
    // Kept in train/ only when asked; training then runs on it.
    kd_ok(&["split", s(&data), s(&dst), "--keep-tiny-classes"]);
    assert_eq!(std::fs::read_dir(dst.join("val/2")).unwrap().count(), 0);
    ok(train(&dst, &dir.path().join("run"), &["--epochs", "1"]));

    // A split killed earlier left its staging folder: the next split removes it.
    let leftover = dir.path().join(format!(".split2.partial-{}", dead_pid()));
    std::fs::create_dir_all(leftover.join("train")).unwrap();
    let dst2 = dir.path().join("split2");
    kd_ok(&["split", s(&data), s(&dst2), "--keep-tiny-classes"]);
    assert!(!leftover.exists());

    // Two splits into one destination: the second stops at once.
    let dst3 = dir.path().join("split3");
    // A slowed split into `dst3`, once its staging folder exists, and that folder's name.
    let slow_split = || {
        let child = Command::new(env!("CARGO_BIN_EXE_kd"))
            .args(["split", s(&data), s(&dst3), "--keep-tiny-classes"])
            .env("KD_FAULT_SLOW_SPLIT_MS", "300")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let staging = dir.path().join(format!(".split3.partial-{}", child.id()));
        while !staging.exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        (child, staging)
    };
    // Stopped by `signal`: promptly, removing what it wrote; exit 130.
    let stop = |child: std::process::Child, signal: &str| {
        Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        stderr
    };
    let (slow, staging) = slow_split();
    let err = kd_err(&["split", s(&data), s(&dst3), "--keep-tiny-classes"]);
    assert!(
        err.contains("is being written by another kd split"),
        "{err}"
    );
    // Ctrl-C stops the first.
    let stderr = stop(slow, "-INT");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!dst3.exists() && !staging.exists());
    // SIGTERM (a service manager, `timeout`) stops it the same way.
    let (slow, staging) = slow_split();
    stop(slow, "-TERM");
    assert!(!dst3.exists() && !staging.exists());
}

#[test]
fn a_first_epoch_killed_while_saving_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 12);
    // As a kill -9 while epoch 1's resume state was written leaves it: the config and the
    // epoch's metrics and best checkpoint, a temporary file, no resume state.
    let run = dir.path().join("run");
    ok(train(&data, &run, &["--epochs", "1"]));
    std::fs::remove_file(run.join("checkpoints/last.kdc")).unwrap();
    std::fs::remove_file(run.join("checkpoints/final.bpk")).unwrap();
    let stale = run
        .join("checkpoints")
        .join(format!(".last.kdc.tmp-{}", dead_pid()));
    std::fs::write(&stale, b"half").unwrap();
    let stderr = ok(train(&data, &run, &["--epochs", "1"]));
    assert!(stderr.contains("starting it again"), "{stderr}");
    assert!(run.join("checkpoints/final.bpk").is_file() && !stale.exists());
}

#[test]
fn outputs_never_overwrite_inputs_and_paths_are_not_empty() {
    let (dir, data, run) = trained_run();
    let images: Vec<_> = std::fs::read_dir(data.join("0"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .take(2)
        .collect();
    let before = std::fs::read(&images[0]).unwrap();
    // `--csv imgs/*.png` as the shell expands it.
    let err = kd_err(&[
        "predict",
        "--run",
        s(&run),
        "--csv",
        s(&images[0]),
        s(&images[1]),
    ]);
    assert!(err.contains("is an image path"), "{err}");
    let renamed = dir.path().join("input.csv");
    std::fs::copy(&images[1], &renamed).unwrap();
    let err = kd_err(&[
        "predict",
        "--run",
        s(&run),
        "--csv",
        s(&renamed),
        s(&renamed),
    ]);
    assert!(err.contains("is an input"), "{err}");
    let config = run.join("config.json");
    let err = kd_err(&[
        "predict",
        "--run",
        s(&run),
        "--csv",
        s(&config),
        s(&images[1]),
    ]);
    assert!(err.contains("is an input"), "{err}");
    assert_eq!(std::fs::read(&images[0]).unwrap(), before);

    // Empty paths would mean the working folder.
    let err = kd_err(&["train", "--data", s(&data), "--out", ""]);
    assert!(err.contains("an empty path"), "{err}");
    let toml = dir.path().join("study.toml");
    std::fs::write(
        &toml,
        format!(
            "out = ''\n[data]\npath = '{}'\n[teacher]\nmodel = 'resnet18'\n[student]\nmodel = 'resnet18'\n",
            data.display()
        ),
    )
    .unwrap();
    let err = kd_err(&["run", s(&toml)]);
    assert!(err.contains("out is empty"), "{err}");
}

#[test]
fn runs_of_other_classes_and_damaged_metrics_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (two, three) = (dir.path().join("two"), dir.path().join("three"));
    mnist_subset(&two, 2, 12);
    mnist_subset(&three, 3, 8);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(train(&two, &a, &["--epochs", "1"]));
    ok(train(&three, &b, &["--epochs", "1"]));
    let report = dir.path().join("report");
    let err = kd_err(&["compare", s(&a), s(&b), "--out", s(&report)]);
    assert!(err.contains("were trained on different classes"), "{err}");
    assert!(!report.exists());

    let metrics = a.join("metrics.json");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m[0]["val_accuracy"] = serde_json::json!(-5.0);
    std::fs::write(&metrics, m.to_string()).unwrap();
    let err = kd_err(&["compare", s(&a), "--out", s(&report)]);
    assert!(
        err.contains("metrics.json is damaged") && err.contains("val_accuracy -5"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn files_that_are_not_regular_are_named_so() {
    let (dir, data, run) = trained_run();
    let err = kd_err(&["predict", "--run", s(&run), "/dev/null"]);
    assert!(err.contains("is not a regular file"), "{err}");
    std::os::unix::fs::symlink("/dev/zero", data.join("0").join("zero.png")).unwrap();
    let out = train(&data, &dir.path().join("run2"), &["--epochs", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("zero.png is not a regular file"),
        "{stderr}"
    );
}

/// An allocation the system refuses ends with one clear line and exit 1, not Rust's abort
/// (exit 134, a backtrace): a step that passes the memory check (ResNet-18 at 224, batch 16,
/// under 1 GiB) on a process allowed only 64 MiB.
#[test]
fn running_out_of_memory_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_kd"))
        .args([
            "bench",
            "--model",
            "resnet18",
            "--batch",
            "16",
            "--image-size",
            "224",
            "--steps",
            "1",
        ])
        .env("KD_FAULT_MEMORY_MIB", "64")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: out of memory: ") && stderr.contains("lower --batch-size"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// Sizes the machine cannot hold are refused before anything of their size is allocated,
/// naming the estimate, what is available and what to lower, and leave no run folder;
/// counting parameters allocates nothing.
#[test]
fn steps_too_large_for_memory_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let data = mnist();
    // `kd train` of a ResNet-18 into `out` with `extra` flags, refused.
    let refused = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--data", s(&data), "--out", s(out)];
        args.extend_from_slice(&["--model", "resnet18"]);
        args.extend_from_slice(extra);
        kd_err(&args)
    };
    // Weights alone: a width-60000 ResNet-18 needs hundreds of TiB.
    let out = dir.path().join("wide");
    let err = refused(&out, &["--width", "60000"]);
    assert!(
        err.contains("the weights of resnet18") && err.contains("lower --width"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run left {}", out.display());
    // The batch: clamped to the digits' training images, at 4096 px it still needs far more
    // than any machine of this suite has; the line says how many images would fit.
    let out = dir.path().join("batch");
    let err = refused(
        &out,
        &[
            "--width",
            "8",
            "--image-size",
            "4096",
            "--batch-size",
            "1000000000",
        ],
    );
    assert!(
        err.contains("needs about")
            && !err.contains("batch 1000000000")
            && err.contains("is available: lower --batch-size"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run left {}", out.display());
    // Attention: CoAtNet's tables grow with the square of the pixels (n² per block for
    // n pixels: 65,536² at its third stage) before any image.
    let err = kd_err(&[
        "bench",
        "--model",
        "coatnet_0",
        "--width",
        "4",
        "--image-size",
        "4096",
        "--batch",
        "1",
    ]);
    assert!(err.contains("attention tables) need about"), "{err}");
    // Counting parameters at 4096 px builds nothing of that size.
    let listing = kd_ok(&["models", "--image-size", "4096"]);
    assert!(listing.contains("coatnet_0"), "{listing}");
}

/// Found by the red-team pass beyond the list: outputs over a run's own files or
/// inside image folders, `kd split --force` over a folder that is not a split, and sizes
/// that overflowed before any check.
#[test]
fn outputs_over_run_files_or_into_images_and_overflowing_sizes_are_refused() {
    let (dir, data, run) = trained_run();
    let image = std::fs::read_dir(data.join("0"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    // `--csv` over the run's resume state (a file predict does not read).
    let state = run.join("checkpoints/last.kdc");
    let before = std::fs::read(&state).unwrap();
    let err = kd_err(&["predict", "--run", s(&run), s(&image), "--csv", s(&state)]);
    assert!(err.contains("is a file of the run"), "{err}");
    assert!(std::fs::read(&state).unwrap() == before);
    // Evaluation outputs inside a class folder would be read as images of that class.
    let err = kd_err(&["eval", "--run", s(&run), "--out", s(&data.join("0"))]);
    assert!(err.contains("where images are read from"), "{err}");
    // `--force` replaces an earlier split, not a run folder (or anything else).
    let err = kd_err(&["split", s(&data), s(&run), "--force"]);
    assert!(err.contains("is not an earlier split"), "{err}");
    assert!(run.join("config.json").is_file());
    let split = dir.path().join("split");
    kd_ok(&["split", s(&data), s(&split)]);
    kd_ok(&["split", s(&data), s(&split), "--force"]);
    // Sizes that wrapped around or asked for terabytes before being checked.
    let huge = u64::MAX.to_string();
    for args in [
        vec!["models", "--width", &huge],
        vec!["models", "--width", "4294967296"],
        vec!["models", "--classes", &huge],
        vec![
            "bench", "--model", "resnet18", "--stem", "small", "--steps", &huge,
        ],
    ] {
        let err = kd_err(&args);
        assert!(err.contains("at most") || err.contains("too many"), "{err}");
    }
    let out = dir.path().join("blur");
    let err = kd_err(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--blur-kernel",
        "1000000001",
    ]);
    assert!(err.contains("blur_kernel"), "{err}");
}

/// A student resumed after its teacher was retrained in place would learn from another
/// teacher half-way: refused, as is distilling from a teacher still training.
#[test]
fn a_teacher_retrained_in_place_is_refused_on_resume() {
    let (dir, data, teacher) = trained_run();
    let student = dir.path().join("student");
    // `kd distill` of the tiny student into `out` with `extra` flags.
    let distill_into = |out: &Path, extra: &[&str]| {
        let mut args = vec!["distill", "--teacher", s(&teacher)];
        args.extend_from_slice(&["--data", s(&data), "--out", s(out)]);
        args.extend_from_slice(TINY);
        args.extend_from_slice(extra);
        kd(&args)
    };
    let distill = |extra: &[&str]| distill_into(&student, extra);
    ok(distill(&["--epochs", "1"]));
    // The same teacher: extending the student is fine.
    ok(distill(&["--epochs", "2", "--resume"]));
    std::fs::remove_dir_all(&teacher).unwrap();
    // Another seed, the same split: only the weights differ.
    ok(train(
        &data,
        &teacher,
        &["--epochs", "1", "--seed", "7", "--split-seed", "42"],
    ));
    let out = distill(&["--epochs", "3", "--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("changed since this run began"), "{stderr}");
    // A teacher whose folder is locked by a training process.
    let lock = std::fs::File::open(teacher.join(".kd-lock")).unwrap();
    lock.lock().unwrap();
    let out = distill_into(&dir.path().join("other"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is still training"), "{stderr}");
}

/// A long class list (a few hundred classes) trains and evaluates; the confusion matrix of
/// more than 200 classes is written to the JSON only, not as a picture too large to read
/// or to hold (2,000 classes made a 24,200-pixel PNG and 1.8 GB of memory).
#[test]
fn long_class_lists_evaluate_without_a_giant_picture() {
    let dir = tempfile::tempdir().unwrap();
    let digits = dir.path().join("digits");
    mnist_subset(&digits, 1, 4);
    let images: Vec<_> = std::fs::read_dir(digits.join("0"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let data = dir.path().join("many");
    for c in 0..201 {
        let class = data.join(format!("c{c:03}"));
        std::fs::create_dir_all(&class).unwrap();
        for (i, image) in images.iter().take(2).enumerate() {
            std::fs::copy(image, class.join(format!("{i}.png"))).unwrap();
        }
    }
    let run = dir.path().join("run");
    ok(train(
        &data,
        &run,
        &["--epochs", "1", "--val-fraction", "0.5"],
    ));
    let out = kd(&["eval", "--run", s(&run)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("201 classes"), "{stderr}");
    let eval = run.join("eval");
    assert!(eval.join("eval-best.json").is_file());
    assert!(!eval.join("confusion-best.png").exists());
}
