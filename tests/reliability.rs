//! Reliability: bad input fails early and clearly, faults leave nothing half-written,
//! NaN handling, determinism, and kill -9 at any moment followed by --resume.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const TINY: &[&str] = &[
    "--model",
    "resnet18",
    "--stem",
    "small",
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--lr",
    "2e-3",
    "--no-augment",
    "--quiet",
];

fn train_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "--data", data, "--out", out];
    v.extend_from_slice(TINY);
    v.extend_from_slice(extra);
    if !extra.contains(&"--width") {
        v.extend(["--width", "4"]);
    }
    v
}

/// Runs `kd` with one fault-injection variable set.
fn kd_with_fault(args: &[&str], var: &str, value: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kd"))
        .args(args)
        .env(var, value)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn first_png(dir: &Path) -> PathBuf {
    let mut f: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    f.sort();
    f.remove(0)
}

#[test]
fn bad_images_fail_before_training_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    type Damage = Box<dyn Fn(&Path)>;
    let cases: [(&str, Damage, &str); 3] = [
        (
            "corrupt",
            Box::new(|p: &Path| {
                std::fs::write(p, b"\x89PNG\r\n\x1a\nthis is not a png body at all").unwrap()
            }),
            "cannot decode",
        ),
        (
            "truncated",
            Box::new(|p: &Path| {
                let bytes = std::fs::read(p).unwrap();
                std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
            }),
            "cannot decode",
        ),
        (
            "empty",
            Box::new(|p: &Path| std::fs::write(p, b"").unwrap()),
            "0-byte",
        ),
    ];
    for (name, damage, needle) in cases {
        let data = dir.path().join(name);
        mnist_subset(&data, 2, 8);
        let victim = first_png(&data.join("1"));
        damage(&victim);
        let err = kd_err(&train_args(s(&data), s(&out), &[]));
        assert!(
            err.contains(needle) && err.contains(victim.file_name().unwrap().to_str().unwrap()),
            "{name}: {err}"
        );
        assert!(!out.exists(), "{name}: nothing written");
    }
    // A bad training or validation image is found whether or not the training images are
    // decoded for their statistics (given --mean/--std skip that pass).
    let normalised: &[&str] = &["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"];
    for split in ["train", "val"] {
        for extra in [&[][..], normalised] {
            let data = dir.path().join(format!("split-{split}-{}", extra.len()));
            mnist_subset(&data.join("train"), 2, 6);
            mnist_subset(&data.join("val"), 2, 3);
            let victim = first_png(&data.join(split).join("1"));
            std::fs::write(&victim, b"").unwrap();
            let err = kd_err(&train_args(s(&data), s(&out), extra));
            assert!(
                err.contains("0-byte")
                    && err.contains(victim.file_name().unwrap().to_str().unwrap()),
                "{split} {extra:?}: {err}"
            );
            assert!(!out.exists(), "{split} {extra:?}: nothing written");
        }
    }
}

#[test]
fn non_image_files_are_skipped_with_a_warning_or_refused_under_strict() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 8);
    std::fs::write(data.join("0/notes.txt"), "not an image").unwrap();
    let out = dir.path().join("run");
    let err = kd_err(&train_args(
        s(&data),
        s(&out),
        &["--epochs", "1", "--strict"],
    ));
    assert!(
        err.contains("notes.txt") && err.contains("--strict"),
        "{err}"
    );
    let res = kd(&train_args(s(&data), s(&out), &["--epochs", "1"]));
    assert!(res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("skipped 1 non-image files"), "{stderr}");
    // The commands that read the same folder say so too (without a --strict they lack).
    for args in [
        vec!["stats", s(&data)],
        vec!["eval", "--run", s(&out), "--data", s(&data)],
        vec!["predict", "--run", s(&out), s(&data)],
    ] {
        let res = kd(&args);
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(res.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("skipped 1 non-image files") && !stderr.contains("--strict"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn folder_shapes_mixed_images_and_symlink_loops() {
    let dir = tempfile::tempdir().unwrap();
    // No class sub-folders.
    let flat = dir.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::write(flat.join("a.png"), b"x").unwrap();
    assert!(kd_err(&["stats", s(&flat)]).contains("no class sub-folders"));

    // train/ and val/ with different classes.
    let tv = dir.path().join("tv");
    mnist_subset(&tv.join("train"), 3, 4);
    mnist_subset(&tv.join("val"), 2, 4);
    let err = kd_err(&train_args(s(&tv), s(&dir.path().join("r1")), &[]));
    assert!(
        err.contains("different classes") && err.contains("\"2\""),
        "{err}"
    );

    // Mixed modes (RGBA, 16-bit grey, RGB JPEG, BMP) and sizes, plus a symlink loop.
    let mixed = dir.path().join("mixed");
    mnist_subset(&mixed, 2, 6);
    image::RgbaImage::from_pixel(40, 20, image::Rgba([200, 10, 10, 128]))
        .save(mixed.join("0/rgba.png"))
        .unwrap();
    image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(33, 47, image::Luma([40000u16]))
        .save(mixed.join("1/grey16.png"))
        .unwrap();
    image::RgbImage::from_pixel(50, 50, image::Rgb([1, 200, 3]))
        .save(mixed.join("0/photo.jpg"))
        .unwrap();
    image::RgbImage::from_pixel(9, 70, image::Rgb([9, 9, 9]))
        .save(mixed.join("1/old.bmp"))
        .unwrap();
    // Links back into the dataset: to the class itself, to the dataset folder (twice) and
    // to another class. None may add an image, or put one under a second class.
    #[cfg(unix)]
    for (target, link) in [
        (".", "0/loop"),
        ("..", "1/up"),
        ("..", "1/up2"),
        ("../1", "0/one"),
    ] {
        std::os::unix::fs::symlink(target, mixed.join(link)).unwrap();
    }
    let stats: serde_json::Value =
        serde_json::from_str(&kd_ok(&["stats", s(&mixed), "--json"])).unwrap();
    assert_eq!(stats["images"], 16, "each image once despite the links");
    let scanned = kd::data::ImageFolder::scan(&mixed).unwrap();
    let labels: Vec<usize> = scanned.samples.iter().map(|x| x.label).collect();
    assert_eq!(
        labels,
        [[0; 8], [1; 8]].concat(),
        "every image under its own class"
    );
    let run = dir.path().join("r2");
    kd_ok(&train_args(s(&mixed), s(&run), &["--epochs", "1"]));
    let predicted = kd_ok(&["predict", "--run", s(&run), s(&mixed.join("1"))]);
    assert_eq!(predicted.lines().count(), 8, "{predicted}");

    // A class name that is not UTF-8 cannot be recorded: named, with the fix.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = mixed.join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
        std::fs::create_dir(&odd).unwrap();
        let err = kd_err(&["stats", s(&mixed)]);
        assert!(err.contains("not valid UTF-8"), "{err}");
        std::fs::remove_dir(&odd).unwrap();
    }

    // A class folder that is itself a link to another class, or to the dataset, would
    // read images under two labels: refused, naming the folders.
    #[cfg(unix)]
    for (target, name, needle) in [
        ("1", "alias", "the same folder"),
        (".", "all", "whole dataset"),
    ] {
        let link = mixed.join(name);
        std::os::unix::fs::symlink(target, &link).unwrap();
        let err = kd_err(&["stats", s(&mixed)]);
        assert!(err.contains(name) && err.contains(needle), "{err}");
        std::fs::remove_file(&link).unwrap();
    }
}

#[test]
fn bad_checkpoints_configs_and_outputs_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 3, 10);
    let a = dir.path().join("a");
    kd_ok(&train_args(s(&data), s(&a), &["--epochs", "1"]));

    // A checkpoint of another architecture / class count.
    let b = dir.path().join("b");
    let mut args = vec![
        "train",
        "--data",
        s(&data),
        "--out",
        s(&b),
        "--model",
        "coatnet_0",
        "--width",
        "8",
    ];
    args.extend([
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--no-augment",
        "--quiet",
    ]);
    kd_ok(&args);
    std::fs::copy(
        a.join("checkpoints/best.bpk"),
        b.join("checkpoints/best.bpk"),
    )
    .unwrap();
    let err = kd_err(&["eval", "--run", s(&b)]);
    assert!(
        err.contains("best.bpk") && err.contains("another architecture"),
        "{err}"
    );

    // A truncated checkpoint.
    let best = a.join("checkpoints/best.bpk");
    let bytes = std::fs::read(&best).unwrap();
    std::fs::write(&best, &bytes[..bytes.len() / 3]).unwrap();
    let err = kd_err(&["eval", "--run", s(&a)]);
    assert!(err.contains("best.bpk") && err.contains("damaged"), "{err}");

    // --resume with another config.
    let err = kd_err(&["train", "--out", s(&a), "--resume", "--lr", "0.5"]);
    assert!(err.contains("differs") && err.contains("lr"), "{err}");
    // A truncated resume file.
    let last = a.join("checkpoints/last.kdc");
    let bytes = std::fs::read(&last).unwrap();
    std::fs::write(&last, &bytes[..bytes.len() - 10]).unwrap();
    let err = kd_err(&["train", "--out", s(&a), "--resume", "--epochs", "2"]);
    assert!(
        err.contains("last.kdc") && err.contains("truncated"),
        "{err}"
    );

    // An output folder that cannot be created.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let err = kd_err(&train_args(
        s(&data),
        s(&blocker.join("run")),
        &["--epochs", "1"],
    ));
    assert!(err.contains("file/run") || err.contains("file"), "{err}");

    // Distillation values.
    let kd_out = dir.path().join("kd");
    for (flag, value) in [
        ("--temperature", "0"),
        ("--temperature", "-2"),
        ("--alpha", "-0.1"),
    ] {
        let mut args = vec![
            "distill",
            "--data",
            s(&data),
            "--teacher",
            s(&a),
            "--out",
            s(&kd_out),
        ];
        args.extend(["--student", "resnet18", flag, value]);
        assert!(kd_err(&args).contains(flag));
    }
}

#[test]
fn disk_full_while_writing_a_checkpoint_leaves_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 8);
    // Trains for `epochs` with writes of `file` failing as on a full disk; the run must fail
    // naming the file.
    let train_on_full_disk = |out: &Path, epochs: &str, file: &str| {
        let res = kd_with_fault(
            &train_args(s(&data), s(out), &["--epochs", epochs]),
            "KD_FAULT_DISK_FULL",
            file,
        );
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success());
        assert!(
            stderr.contains(file) && stderr.contains("No space left"),
            "{stderr}"
        );
    };
    let out = dir.path().join("run");
    train_on_full_disk(&out, "1", "best.bpk");
    let left: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "no partial or temporary checkpoint: {left:?}"
    );

    // Written in the background while later epochs train, a failed metrics file still stops
    // the run, and the resume state (always written after it) never gets ahead of it.
    let out = dir.path().join("run3");
    train_on_full_disk(&out, "3", "metrics.json");
    assert!(!out.join("metrics.json").exists());
    assert!(!out.join("checkpoints/last.kdc").exists());
    assert!(!out.join("checkpoints/final.bpk").exists());

    // A full disk at the first epoch's resume state leaves its best checkpoint and metrics
    // but nothing to continue from: the same command starts again, and so does --resume.
    for resume in [false, true] {
        let out = dir.path().join(format!("first-{resume}"));
        train_on_full_disk(&out, "2", "last.kdc");
        assert!(out.join("metrics.json").is_file() && !out.join("checkpoints/last.kdc").exists());
        let extra: &[&str] = if resume {
            &["--epochs", "2", "--resume"]
        } else {
            &["--epochs", "2"]
        };
        let again = kd(&train_args(s(&data), s(&out), extra));
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(again.status.success(), "{stderr}");
        assert!(stderr.contains("starting it again"), "{stderr}");
        assert!(out.join("checkpoints/final.bpk").is_file());
    }
}

#[test]
fn nan_loss_stops_keeping_the_last_good_checkpoint_or_skips_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 24); // 34 training images: 3 batches of 16 per epoch
    let stop = dir.path().join("stop");
    let res = kd_with_fault(
        &train_args(s(&data), s(&stop), &["--epochs", "2"]),
        "KD_FAULT_NAN_AT_BATCH",
        "5",
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && stderr.contains("NaN at epoch 2 batch 2"),
        "{stderr}"
    );
    assert!(stop.join("checkpoints/best.bpk").is_file(), "epoch 1 kept");
    let m: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(stop.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m.len(), 1);
    assert!(stderr.contains("last good checkpoint is kept"), "{stderr}");
    // Resumed with as many epochs as it has finished, it ends there: the final checkpoint
    // is that epoch's (it had been left without one).
    kd_ok(&train_args(
        s(&data),
        s(&stop),
        &["--epochs", "1", "--resume"],
    ));
    let score = |checkpoint: &str| -> (serde_json::Value, serde_json::Value) {
        let out = kd_ok(&[
            "eval",
            "--run",
            s(&stop),
            "--checkpoint",
            checkpoint,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v["loss"].clone(), v["epoch"].clone())
    };
    assert_eq!(score("final"), score("best"), "epoch 1 is both");

    // A NaN before the first epoch is saved leaves nothing worth keeping: the same command
    // starts the run again in the same folder, and so does --resume.
    let early = dir.path().join("early");
    let args = train_args(s(&data), s(&early), &["--epochs", "1"]);
    let res = kd_with_fault(&args, "KD_FAULT_NAN_AT_BATCH", "2");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && stderr.contains("no epoch was saved"),
        "{stderr}"
    );
    assert!(early.join("config.json").is_file());
    let again = kd(&args);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("saved no epoch"), "says so: {stderr}");
    assert!(early.join("checkpoints/final.bpk").is_file());
    kd_err(&args); // now it holds a finished run

    // While a process trains in a folder (holding its lock), a second one is refused at
    // once and writes nothing there.
    let busy = dir.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    let lock = std::fs::File::create(busy.join(".kd-lock")).unwrap();
    lock.try_lock().unwrap();
    let err = kd_err(&train_args(s(&data), s(&busy), &["--epochs", "1"]));
    assert!(err.contains("in use by another kd process"), "{err}");
    assert!(!busy.join("config.json").exists());
    drop(lock);
    kd_ok(&train_args(s(&data), s(&busy), &["--epochs", "1"]));

    // Resuming after a class folder was added is refused before the run is touched.
    let grown = dir.path().join("grown");
    mnist_subset(&grown, 2, 12);
    let run = dir.path().join("grown-run");
    kd_ok(&train_args(s(&grown), s(&run), &["--epochs", "1"]));
    let classes_before = std::fs::read(run.join("classes.json")).unwrap();
    mnist_subset(&grown, 3, 12);
    let err = kd_err(&train_args(
        s(&grown),
        s(&run),
        &["--epochs", "2", "--resume"],
    ));
    assert!(
        err.contains("now has other classes") && err.contains("\"2\""),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("classes.json")).unwrap(),
        classes_before
    );
    // So is resuming after images were added to a class; restored, the run resumes.
    std::fs::remove_dir_all(grown.join("2")).unwrap();
    let extra = grown.join("0/extra.png");
    std::fs::copy(first_png(&grown.join("1")), &extra).unwrap();
    let resume = train_args(s(&grown), s(&run), &["--epochs", "2", "--resume"]);
    let err = kd_err(&resume);
    assert!(
        err.contains("images under") && err.contains("changed"),
        "{err}"
    );
    std::fs::remove_file(&extra).unwrap();
    kd_ok(&resume);
    // A larger --epochs extends a run (above: 1 -> 2); a smaller one is refused untouched.
    let config_before = std::fs::read(run.join("config.json")).unwrap();
    let err = kd_err(&train_args(
        s(&grown),
        s(&run),
        &["--epochs", "1", "--resume"],
    ));
    assert!(
        err.contains("with 1 epochs") && err.contains("ask for 2 or more"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("config.json")).unwrap(),
        config_before
    );
    let image = first_png(&grown.join("0"));
    kd_ok(&["predict", "--run", s(&run), s(&image)]);
    let err = kd_err(&["predict", "--run", s(&run), "--top-k", "0", s(&image)]);
    assert!(err.contains("--top-k 0"), "{err}");

    let skip = dir.path().join("skip");
    let res = kd_with_fault(
        &train_args(
            s(&data),
            s(&skip),
            &["--epochs", "2", "--nan-policy", "skip-batch"],
        ),
        "KD_FAULT_NAN_AT_BATCH",
        "5",
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let m: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(skip.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(
        (
            m[0]["skipped_batches"].as_u64(),
            m[1]["skipped_batches"].as_u64()
        ),
        (Some(0), Some(1))
    );

    // An epoch whose every batch is skipped stops the run: it learnt nothing and has no
    // training loss to record (it had been recorded as 0).
    let all = dir.path().join("skip-all");
    let args = [
        "--epochs",
        "2",
        "--train-limit",
        "16",
        "--nan-policy",
        "skip-batch",
    ];
    let res = kd_with_fault(
        &train_args(s(&data), s(&all), &args),
        "KD_FAULT_NAN_AT_BATCH",
        "2",
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        err.contains("every batch of epoch 2 (1) had a non-finite training loss")
            && err.contains("last good checkpoint is kept"),
        "{err}"
    );
    let m: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(all.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m.len(), 1, "only the good epoch is recorded");
}

/// Metrics without the timing fields, and the exported weights.
fn outcome(run: &Path, dir: &Path) -> (Vec<serde_json::Value>, Vec<(String, Vec<f64>)>) {
    let mut m: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    for e in &mut m {
        let o = e.as_object_mut().unwrap();
        o.remove("seconds");
        o.remove("images_per_second");
    }
    let file = dir.join(format!(
        "{}.safetensors",
        run.file_name().unwrap().to_str().unwrap()
    ));
    kd_ok(&[
        "export",
        "--run",
        s(run),
        "--checkpoint",
        "final",
        "--out",
        s(&file),
    ]);
    let mut w: Vec<(String, Vec<f64>)> = read_safetensors(&file)
        .into_iter()
        .map(|(k, t)| (k, t.data))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    (m, w)
}

#[test]
fn same_seed_is_bit_identical_and_kill_9_then_resume_ends_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 4, 100);
    let args = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = train_args(s(&data), s(out), &["--epochs", "3", "--width", "8"])
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.retain(|x| x != "--no-augment"); // keep augmentation: its randomness must replay too
        v
    };
    let reference = dir.path().join("reference");
    let t0 = std::time::Instant::now();
    assert!(
        Command::new(env!("CARGO_BIN_EXE_kd"))
            .args(args(&reference))
            .status()
            .unwrap()
            .success()
    );
    let full = t0.elapsed();
    let expected = outcome(&reference, dir.path());

    let again = dir.path().join("again");
    assert!(
        Command::new(env!("CARGO_BIN_EXE_kd"))
            .args(args(&again))
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        outcome(&again, dir.path()),
        expected,
        "same seed and config: bit-identical"
    );

    for (i, fraction) in [0.15, 0.45, 0.8].into_iter().enumerate() {
        let run = dir.path().join(format!("killed{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_kd"))
            .args(args(&run))
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(fraction));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let resumable = run.join("checkpoints/last.kdc").is_file();
        let status = if resumable {
            Command::new(env!("CARGO_BIN_EXE_kd"))
                .args(["train", "--out", s(&run), "--resume", "--quiet"])
                .status()
        } else {
            // Killed before the first epoch finished: nothing to resume, start over.
            let _ = std::fs::remove_dir_all(&run);
            Command::new(env!("CARGO_BIN_EXE_kd"))
                .args(args(&run))
                .status()
        };
        assert!(status.unwrap().success());
        assert_eq!(
            outcome(&run, dir.path()),
            expected,
            "killed at {fraction} of the run (resumable: {resumable})"
        );
    }

    // Ctrl-C (SIGINT): stops after the current batch with a resumable mid-epoch state.
    let run = dir.path().join("interrupted");
    let child = Command::new(env!("CARGO_BIN_EXE_kd"))
        .args(args(&run))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(full.mul_f64(0.6));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!("run finished before the interrupt arrived; nothing to resume");
    } else {
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        assert!(
            stderr.contains("interrupted at epoch") && stderr.contains("--resume"),
            "{stderr}"
        );
        let status = Command::new(env!("CARGO_BIN_EXE_kd"))
            .args(["train", "--out", s(&run), "--resume", "--quiet"])
            .status();
        assert!(status.unwrap().success());
    }
    assert_eq!(
        outcome(&run, dir.path()),
        expected,
        "interrupted with Ctrl-C, then resumed"
    );
}

#[test]
fn image_cache_runs_resume_bit_identical() {
    // A run stopped in its second epoch (injected NaN, --nan-policy stop) and resumed, with
    // the resized-image cache on (empty again after the restart), ends exactly like an
    // uninterrupted run: cached and freshly decoded images are the same pixels.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 24); // 34 training images: 3 batches of 16 per epoch
    let args = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = train_args(s(&data), s(out), &["--epochs", "3"])
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.retain(|x| x != "--no-augment");
        v.extend(["--cache-images", "resized"].map(String::from));
        v
    };
    let reference = dir.path().join("reference");
    let status = Command::new(env!("CARGO_BIN_EXE_kd"))
        .args(args(&reference))
        .status()
        .unwrap();
    assert!(status.success());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["cache_images"], "resized");

    let stopped = dir.path().join("stopped");
    let argv = args(&stopped);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let res = kd_with_fault(&argv, "KD_FAULT_NAN_AT_BATCH", "5");
    assert!(!res.status.success(), "the injected NaN stops the run");
    // A different memory budget cannot change results, so --resume accepts it.
    kd_ok(&[
        "train",
        "--out",
        s(&stopped),
        "--resume",
        "--quiet",
        "--cache-mib",
        "1",
    ]);
    assert_eq!(
        outcome(&stopped, dir.path()),
        outcome(&reference, dir.path())
    );
}
