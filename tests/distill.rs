//! Distillation: a frozen teacher, students that move towards it, `kd run` and its checks.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use common::*;
use kd::data::tensors::{images_tensor, labels_tensor, rows};
use kd::data::{AugmentConfig, Loader, RunData};
use kd::losses::{Method, hinton::Hinton};
use kd::models::{Outputs, weights};
use kd::ops::{Ctx, Precision};
use kd::run::{Checkpoint, Run, TeacherConfig, TrainConfig};
use kd::train::{Teacher, train};

struct Shared {
    _dir: tempfile::TempDir,
    data: PathBuf,
    teacher: PathBuf,
}

fn config(data: &Path, width: usize, epochs: usize) -> TrainConfig {
    let mut c = small_resnet(data, width, epochs);
    (c.lr, c.t_max) = (2e-3, epochs);
    c
}

/// One teacher trained on 600 real digits, shared by the tests of this file.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("digits");
        mnist_subset(&data, 10, 60);
        let teacher = dir.path().join("teacher");
        train(&config(&data, 16, 4), &teacher, &quiet()).unwrap();
        Shared {
            _dir: dir,
            data,
            teacher,
        }
    })
}

fn kd_config(data: &Path, teacher: &Path, epochs: usize) -> TrainConfig {
    let mut c = config(data, 4, epochs);
    c.teacher = Some(TeacherConfig {
        run: teacher.to_path_buf(),
        checkpoint: Checkpoint::Best,
        kd: Method::Hinton(Hinton {
            temperature: 4.0,
            alpha: 0.9,
            standardize: false,
        }),
        cache_logits: false,
        feature_weight: 0.0,
        checkpoint_crc32: None,
    });
    c
}

#[test]
fn teacher_is_bit_identical_after_a_distillation_epoch() {
    let s = shared();
    let cfg = kd_config(&s.data, &s.teacher, 1);
    let data = RunData::resolve(&s.data, cfg.val_fraction, cfg.seed).unwrap();
    let device = Device::flex();
    let tc = cfg.teacher.clone().unwrap();
    let teacher_run = kd::train::teacher::open(&cfg, &tc, &data).unwrap();
    let cx = Ctx::new(Precision::F32);
    let teacher = Teacher::load(&teacher_run, &tc, &device, Ctx::new(Precision::F32)).unwrap();
    let before = weights::to_bytes(&teacher.net).unwrap();
    let file_before = std::fs::read(s.teacher.join("checkpoints/best.bpk")).unwrap();

    // One epoch of distillation steps, the teacher seeing every training batch.
    let run = Run::open(&s.teacher).unwrap();
    let loader = Loader::new(data.train.clone(), run.eval_transform(), 32, true, 1);
    let ad = device.clone().autodiff();
    let mut student = cfg.model.build(10, 32, &ad).unwrap();
    let mut optim = AdamConfig::new().init();
    for batch in loader.epoch(0, 0) {
        let batch = batch.unwrap();
        let t_logits = teacher.outputs(images_tensor(&batch, &device)).logits;
        let t_out = Outputs {
            logits: Tensor::<2>::from_data(t_logits.into_data(), &ad),
            features: None,
        };
        let s_out = Outputs {
            logits: student.forward(images_tensor(&batch, &ad), &cx),
            features: None,
        };
        let loss = teacher
            .method
            .loss(&kd::losses::Step {
                student: &s_out,
                teacher: &t_out,
                targets: &labels_tensor(&batch, &ad),
                epoch: 1,
                projection: None,
            })
            .total;
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        student = optim.step(1e-3, student, grads);
    }
    let after = weights::to_bytes(&teacher.net).unwrap();
    assert!(
        before == after,
        "teacher weights or BatchNorm statistics changed"
    );

    // And a real `kd distill` leaves the teacher's files untouched.
    let out = s._dir.path().join("kd-one-epoch");
    train(&kd_config(&s.data, &s.teacher, 1), &out, &quiet()).unwrap();
    assert!(std::fs::read(s.teacher.join("checkpoints/best.bpk")).unwrap() == file_before);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(
        m[0]["train_parts"]["kd"].as_f64().unwrap() > 0.0,
        "KD part logged"
    );
    assert!(
        m[0]["train_parts"]["ce"].as_f64().unwrap() > 0.0,
        "CE part logged"
    );
}

/// Mean KL(teacher || student) over the validation images.
fn mean_kl(teacher: &Path, student: &Path) -> f64 {
    let device = Device::flex();
    let t = Run::open(teacher).unwrap();
    let st = Run::open(student).unwrap();
    let (tn, sn) = (
        t.load_network(Checkpoint::Best, &device).unwrap(),
        st.load_network(Checkpoint::Best, &device).unwrap(),
    );
    let data = RunData::resolve(&t.config.data, t.config.val_fraction, t.config.seed).unwrap();
    let loader = Loader::new(data.val, t.eval_transform(), 64, false, 0);
    let (mut kl, mut n) = (0.0, 0);
    for batch in loader.epoch(0, 0) {
        let batch = batch.unwrap();
        let cx = Ctx::new(Precision::F32);
        let lt = rows(log_softmax(
            tn.forward(images_tensor(&batch, &device), &cx),
            1,
        ))
        .unwrap();
        let ls = rows(log_softmax(
            sn.forward(images_tensor(&batch, &device), &cx),
            1,
        ))
        .unwrap();
        for (a, b) in lt.iter().zip(&ls) {
            kl += a
                .iter()
                .zip(b)
                .map(|(p, q)| (p.exp() * (p - q)) as f64)
                .sum::<f64>();
            n += 1;
        }
    }
    kl / n as f64
}

#[test]
fn distilled_student_is_closer_to_the_teacher_than_a_plain_one() {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    let distilled = dir.path().join("distilled");
    train(&config(&s.data, 4, 3), &plain, &quiet()).unwrap();
    train(&kd_config(&s.data, &s.teacher, 3), &distilled, &quiet()).unwrap();
    let (kl_plain, kl_kd) = (mean_kl(&s.teacher, &plain), mean_kl(&s.teacher, &distilled));
    assert!(
        kl_kd < kl_plain,
        "KL to teacher: distilled {kl_kd} vs plain {kl_plain}"
    );
}

#[test]
fn teacher_logit_cache_gives_the_same_training() {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let cached = dir.path().join("cached");
    train(&kd_config(&s.data, &s.teacher, 1), &live, &quiet()).unwrap();
    let mut c = kd_config(&s.data, &s.teacher, 1);
    c.teacher.as_mut().unwrap().cache_logits = true;
    train(&c, &cached, &quiet()).unwrap();
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("metrics.json")).unwrap()).unwrap()
    };
    let (a, b) = (read(&live), read(&cached));
    for key in ["train_loss", "val_loss", "val_accuracy"] {
        let (x, y) = (a[0][key].as_f64().unwrap(), b[0][key].as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{key}: {x} vs {y}"
        );
    }
    // With random augmentation the cache is refused.
    let mut bad = c.clone();
    bad.augment = AugmentConfig::default();
    let err = train(&bad, &dir.path().join("bad"), &quiet()).unwrap_err();
    assert!(format!("{err:#}").contains("--cache-teacher"), "{err:#}");
}

/// `kd distill` of a width-4 ResNet-18 at 32x32 from `teacher` on `data` into `out`.
fn distill_args(data: &Path, teacher: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let paths = [data, teacher, out].map(|p| p.display().to_string());
    let mut args: Vec<String> = [
        "distill",
        "--data",
        &paths[0],
        "--teacher",
        &paths[1],
        "--out",
        &paths[2],
        "--student",
        "resnet18",
        "--width",
        "4",
        "--stem",
        "small",
        "--image-size",
        "32",
    ]
    .map(String::from)
    .into();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

#[test]
fn class_mismatch_between_teacher_and_data_is_a_clear_error() {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let three = dir.path().join("three");
    mnist_subset(&three, 3, 10);
    let out = dir.path().join("kd");
    let err = kd_err(&strs(&distill_args(&three, &s.teacher, &out, &[])));
    assert!(
        err.contains("other classes") && err.contains("teacher only"),
        "{err}"
    );
    assert!(err.contains("\"9\""), "names the differing classes: {err}");
    assert!(!out.join("checkpoints").exists(), "no training output");
}

/// A student split with another seed would validate on the teacher's training images.
#[test]
fn validating_on_the_teachers_training_images_is_refused() {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kd");
    let quick = ["--epochs", "1", "--no-augment", "--quiet"];
    let distill =
        |extra: &[&str]| distill_args(&s.data, &s.teacher, &out, &[&quick, extra].concat());
    let err = kd_err(&strs(&distill(&["--seed", "7"])));
    assert!(
        err.contains("are training images of teacher") && err.contains("--split-seed 42"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written: {err}");
    // Another initialisation on the teacher's split is what --split-seed is for.
    kd_ok(&strs(&distill(&["--seed", "7", "--split-seed", "42"])));
    let run = Run::open(&out).unwrap();
    assert_eq!((run.config.seed, run.config.data_seed()), (7, 42));
    // Copies of the teacher's images (as `kd split` makes) are caught too.
    let copy = dir.path().join("digits-copy");
    copy_dir(&s.data, &copy);
    let out = dir.path().join("kd-copy");
    let args = distill_args(
        &copy,
        &s.teacher,
        &out,
        &[&quick[..], &["--seed", "7"]].concat(),
    );
    let err = kd_err(&strs(&args));
    assert!(err.contains("or copies of them"), "{err}");
    assert!(!out.exists(), "nothing written: {err}");
}

#[test]
fn kd_run_completes_and_a_rerun_skips_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("digits");
    mnist_subset(&data, 4, 15);
    let out = dir.path().join("study");
    let toml = format!(
        r#"
out = "{out}"
[data]
path = "{data}"
split_to = "{split}"
[recipe]
image_size = 32
batch_size = 16
epochs = 1
lr = 2e-3
[recipe.augment]
blur_kernel = 0
[teacher]
model = "resnet18"
width = 8
stem = "small"
[student]
model = "resnet18"
width = 4
stem = "small"
[distill]
temperature = 4.0
alpha = 0.5
"#,
        out = out.display(),
        data = data.display(),
        split = dir.path().join("split").display()
    );
    let file = dir.path().join("exp.toml");
    std::fs::write(&file, toml).unwrap();
    let first = kd_ok(&["run", file.to_str().unwrap(), "--quiet"]);
    for stage in ["teacher", "student", "kd_student"] {
        assert!(
            out.join(stage).join("checkpoints/final.bpk").is_file(),
            "{stage} finished"
        );
    }
    assert!(first.contains("student with KD"), "{first}");
    for f in [
        "results.md",
        "results.json",
        "accuracy.png",
        "loss.png",
        "train_loss.png",
    ] {
        assert!(out.join("report").join(f).is_file(), "{f}");
    }
    image::open(out.join("report/accuracy.png")).expect("readable PNG");
    // The speed column says where and how it was measured: the study's device, each run's
    // precision.
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("report/results.json")).unwrap())
            .unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row["inference_device"], "flex (CPU)", "{row}");
        assert_eq!(row["inference_precision"], "f32", "{row}");
        assert!(row["inference_images_per_second"].as_f64().unwrap() > 0.0);
    }
    let table = std::fs::read_to_string(out.join("report/results.md")).unwrap();
    assert!(table.contains("on flex (CPU), f32"), "{table}");

    // kd compare measures in the precision asked for, and refuses a device this build lacks
    // before writing anything.
    let compare = |report: &Path, flag: &str, value: &str| -> Vec<String> {
        let mut args: Vec<String> = ["compare", "--out", report.to_str().unwrap(), flag, value]
            .map(String::from)
            .into();
        args.extend(
            ["teacher", "student", "kd_student"].map(|r| out.join(r).display().to_string()),
        );
        args
    };
    let bf16_out = dir.path().join("compare-bf16");
    let printed = kd_ok(&strs(&compare(&bf16_out, "--precision", "bf16")));
    assert!(printed.contains("on flex (CPU), bf16"), "{printed}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(bf16_out.join("results.json")).unwrap())
            .unwrap();
    assert!(rows.iter().all(|r| r["inference_precision"] == "bf16"));
    // Runs that share role and network are told apart by their folders' names.
    let copy = dir.path().join("student-seed2");
    copy_dir(&out.join("student"), &copy);
    let mut args = compare(&dir.path().join("compare-two"), "--precision", "f32");
    args.push(copy.display().to_string());
    let printed = kd_ok(&strs(&args));
    for label in [
        "| teacher (resnet18) |",
        "| student without KD (resnet18, student) |",
        "| student without KD (resnet18, student-seed2) |",
        "| student with KD (resnet18, hinton alpha=0.5 temperature=4.0) |",
    ] {
        assert!(printed.contains(label), "{label} in {printed}");
    }
    // Without a KD run there are no students or teachers to name.
    let plain: Vec<String> = ["teacher", "student"]
        .map(|r| out.join(r).display().to_string())
        .into();
    let report = dir.path().join("compare-plain").display().to_string();
    let mut args = vec!["compare".to_string(), "--out".into(), report];
    args.extend(plain);
    let printed = kd_ok(&strs(&args));
    assert!(
        printed.contains("| without KD (resnet18, teacher) |"),
        "{printed}"
    );
    let twice = format!("{}/../student", out.join("teacher").display());
    let mut args = compare(&dir.path().join("compare-twice"), "--precision", "f32");
    args.push(twice);
    let err = kd_err(&strs(&args));
    assert!(err.contains("is given twice"), "{err}");
    let cuda_out = dir.path().join("compare-cuda");
    let err = kd_err(&strs(&compare(&cuda_out, "--device", "cuda")));
    assert!(err.contains("--features cuda"), "{err}");
    assert!(!cuda_out.exists(), "no output on a refused device");

    let metrics_before = std::fs::read(out.join("student/metrics.json")).unwrap();
    let second = kd_ok(&["run", file.to_str().unwrap(), "--quiet"]);
    assert_eq!(
        second.matches("finished earlier, skipped").count(),
        3,
        "{second}"
    );
    assert!(
        second.contains("split:") && second.contains("skipped"),
        "{second}"
    );
    assert_eq!(
        std::fs::read(out.join("student/metrics.json")).unwrap(),
        metrics_before
    );

    // A stage that stopped with part of its first epoch's files written (no resume state)
    // is cleared and trained again; a stage being trained by another process is left alone.
    let kd_dir = out.join("kd_student");
    for f in ["checkpoints/final.bpk", "checkpoints/last.kdc"] {
        std::fs::remove_file(kd_dir.join(f)).unwrap();
    }
    let lock = std::fs::File::create(kd_dir.join(".kd-lock")).unwrap();
    lock.try_lock().unwrap();
    let err = kd_err(&["run", file.to_str().unwrap(), "--quiet"]);
    assert!(err.contains("in use by another kd process"), "{err}");
    assert!(kd_dir.join("checkpoints/best.bpk").is_file(), "left alone");
    drop(lock);
    let third = kd_ok(&["run", file.to_str().unwrap(), "--quiet"]);
    assert_eq!(
        third.matches("finished earlier, skipped").count(),
        2,
        "{third}"
    );
    assert!(kd_dir.join("checkpoints/final.bpk").is_file());

    // Editing a finished stage's recipe is refused rather than silently mixed.
    let edited = std::fs::read_to_string(&file)
        .unwrap()
        .replace("lr = 2e-3", "lr = 1e-3");
    std::fs::write(&file, edited).unwrap();
    let err = kd_err(&["run", file.to_str().unwrap(), "--quiet"]);
    assert!(
        err.contains("another config") && err.contains("lr"),
        "{err}"
    );
    // More epochs extend every finished stage; fewer are refused.
    let longer = std::fs::read_to_string(&file)
        .unwrap()
        .replace("lr = 1e-3", "lr = 2e-3")
        .replace("epochs = 1", "epochs = 2");
    std::fs::write(&file, &longer).unwrap();
    let fourth = kd_ok(&["run", file.to_str().unwrap(), "--quiet"]);
    assert_eq!(
        fourth.matches("finished earlier, skipped").count(),
        0,
        "{fourth}"
    );
    for stage in ["teacher", "student", "kd_student"] {
        let m: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(out.join(stage).join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(m.len(), 2, "{stage} extended to 2 epochs");
        assert!(out.join(stage).join("checkpoints/final.bpk").is_file());
    }
    std::fs::write(&file, longer.replace("epochs = 2", "epochs = 1")).unwrap();
    let err = kd_err(&["run", file.to_str().unwrap(), "--quiet"]);
    assert!(
        err.contains("trained for 2 epochs and the file asks for 1"),
        "{err}"
    );

    // The split folder records what it was made from; a file asking for another split of
    // it is refused rather than trained on the old one.
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("split/split.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&record["val_fraction"], &record["seed"]),
        (&0.3.into(), &42.into())
    );
    let resplit = std::fs::read_to_string(&file)
        .unwrap()
        .replace("[recipe]", "val_fraction = 0.4\n[recipe]");
    std::fs::write(&file, resplit).unwrap();
    let err = kd_err(&["run", file.to_str().unwrap(), "--quiet"]);
    assert!(
        err.contains("split with other settings") && err.contains("val_fraction: 0.3 vs 0.4"),
        "{err}"
    );
}
