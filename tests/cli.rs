//! The command line: help texts, split, and clear errors on bad input.

mod common;

use common::*;

const COMMANDS: &[&str] = &[
    "split", "stats", "train", "distill", "eval", "predict", "models", "bench", "compare", "run",
    "demo", "export",
];

#[test]
fn every_command_has_help() {
    let top = kd_ok(&["--help"]);
    for c in COMMANDS {
        assert!(top.contains(c), "top-level help lists {c}");
        let help = kd_ok(&[c, "--help"]);
        assert!(help.contains("Usage: kd"), "{c} --help shows usage");
    }
    assert!(kd_ok(&["train", "--help"]).contains("--val-fraction"));
    assert!(kd_ok(&["distill", "--help"]).contains("--temperature"));
}

#[test]
fn bad_paths_give_one_clear_line() {
    let missing = "/nonexistent/kd-data";
    let err = kd_err(&["stats", missing]);
    assert!(
        err.contains(missing) && err.contains("does not exist"),
        "{err}"
    );
    let err = kd_err(&[
        "train",
        "--data",
        missing,
        "--model",
        "resnet18",
        "--out",
        "/tmp/kd-never-written",
    ]);
    assert!(err.contains(missing), "{err}");
    assert!(
        !std::path::Path::new("/tmp/kd-never-written").exists(),
        "no output for bad input"
    );
    let err = kd_err(&["eval", "--run", missing]);
    assert!(err.contains("not a kd run folder"), "{err}");
    let err = kd_err(&["predict", "--run", missing, "x.png"]);
    assert!(err.contains(missing), "{err}");
    let err = kd_err(&["split", missing, "/tmp/kd-split-never"]);
    assert!(err.contains(missing), "{err}");
}

#[test]
fn bad_values_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 3);
    let d = data.to_str().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    for (flags, needle) in [
        (vec!["--batch-size", "0"], "--batch-size"),
        (vec!["--lr", "-1"], "--lr"),
        (vec!["--lr", "NaN"], "--lr"),
        (vec!["--val-fraction", "1.5"], "--val-fraction"),
        (vec!["--epochs", "0"], "--epochs"),
        (vec!["--t-max", "0"], "--t-max"),
        (vec!["--train-limit", "0"], "--train-limit"),
        (vec!["--val-limit", "0"], "--val-limit"),
        (vec!["--image-size", "100000"], "image size 100000"),
    ] {
        let mut args = vec!["train", "--data", d, "--out", o, "--model", "resnet18"];
        args.extend(flags);
        let err = kd_err(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left output behind");
    }
    let err = kd_err(&["train", "--data", d, "--out", o, "--model", "resnet999"]);
    assert!(
        err.contains("unknown model 'resnet999'") && err.contains("resnet18"),
        "{err}"
    );
    let mut args = vec![
        "distill",
        "--data",
        d,
        "--out",
        o,
        "--model",
        "resnet18",
        "--teacher",
        d,
    ];
    args.extend(["--alpha", "1.5"]);
    assert!(kd_err(&args).contains("--alpha"));

    let tiny_bench = [
        "bench",
        "--model",
        "resnet18",
        "--width",
        "2",
        "--image-size",
        "32",
    ];
    let err = kd_err(&[&tiny_bench[..], &["--classes", "0"]].concat());
    assert!(err.contains("--classes 0"), "{err}");
    let err = kd_err(&["stats", d, "--size", "100000"]);
    assert!(err.contains("image size 100000"), "{err}");
}

#[test]
fn empty_class_folder_and_single_class_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 3);
    std::fs::create_dir_all(data.join("empty")).unwrap();
    let err = kd_err(&["stats", data.to_str().unwrap()]);
    assert!(err.contains("empty") && err.contains("no images"), "{err}");

    let one = dir.path().join("one");
    mnist_subset(&one, 1, 4);
    let out = dir.path().join("run");
    let err = kd_err(&[
        "train",
        "--data",
        one.to_str().unwrap(),
        "--model",
        "resnet18",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("only one class"), "{err}");

    // Kaggle's layout: train/<classes> next to test/, no val/.
    let kaggle = dir.path().join("kaggle");
    mnist_subset(&kaggle.join("train"), 2, 3);
    mnist_subset(&kaggle.join("test"), 1, 3);
    for args in [
        vec!["split", kaggle.to_str().unwrap(), out.to_str().unwrap()],
        vec![
            "train",
            "--data",
            kaggle.to_str().unwrap(),
            "--model",
            "resnet18",
            "--out",
            out.to_str().unwrap(),
        ],
    ] {
        let err = kd_err(&args);
        assert!(
            err.contains("looks like a dataset root") && err.contains("kaggle/train"),
            "{err}"
        );
    }
    let presplit = dir.path().join("presplit");
    mnist_subset(&presplit.join("train"), 2, 3);
    mnist_subset(&presplit.join("val"), 2, 3);
    let err = kd_err(&["split", presplit.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(err.contains("is already split"), "{err}");
    assert!(!out.exists());
    // A run folder next to train/ and val/ is not read, so it may live there.
    let beside = presplit.join("runs/r");
    kd_ok(&[
        "train",
        "--data",
        presplit.to_str().unwrap(),
        "--out",
        beside.to_str().unwrap(),
        "--model",
        "resnet18",
        "--width",
        "2",
        "--stem",
        "small",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--quiet",
    ]);

    // Outputs inside the data (they would be read as classes) or holding it (--force would
    // delete it) are refused, and the data stays whole.
    let clean = dir.path().join("clean");
    mnist_subset(&clean, 2, 3);
    let d = clean.to_str().unwrap();
    let inner = clean.join("runs/r");
    let parent = dir.path().to_str().unwrap();
    let refused = [
        (
            vec!["split", d, inner.to_str().unwrap()],
            "inside the source",
        ),
        (
            vec!["split", d, parent, "--force"],
            "inside the destination",
        ),
        (
            vec![
                "train",
                "--data",
                d,
                "--model",
                "resnet18",
                "--out",
                inner.to_str().unwrap(),
            ],
            "where images are read from",
        ),
    ];
    for (args, needle) in refused {
        let err = kd_err(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!clean.join("runs").exists());
    let scanned = kd::data::ImageFolder::scan(&clean).unwrap();
    assert_eq!(scanned.samples.len(), 6, "data intact");
}

#[test]
fn split_is_deterministic_stratified_disjoint_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    mnist_subset(&src, 3, 10);
    let list = |root: &std::path::Path| -> Vec<String> {
        let mut v = Vec::new();
        for part in ["train", "val"] {
            for class in ["0", "1", "2"] {
                let mut names: Vec<String> = std::fs::read_dir(root.join(part).join(class))
                    .unwrap()
                    .flatten()
                    .map(|e| format!("{part}/{class}/{}", e.file_name().to_string_lossy()))
                    .collect();
                names.sort();
                v.extend(names);
            }
        }
        v
    };
    let a = dir.path().join("a");
    let table = kd_ok(&[
        "split",
        src.to_str().unwrap(),
        a.to_str().unwrap(),
        "--val-fraction",
        "0.3",
        "--seed",
        "7",
    ]);
    assert!(table.contains("train") && table.contains("val"));
    let b = dir.path().join("b");
    kd_ok(&[
        "split",
        src.to_str().unwrap(),
        b.to_str().unwrap(),
        "--val-fraction",
        "0.3",
        "--seed",
        "7",
        "--link",
    ]);
    let c = dir.path().join("c");
    kd_ok(&[
        "split",
        src.to_str().unwrap(),
        c.to_str().unwrap(),
        "--val-fraction",
        "0.3",
        "--seed",
        "8",
    ]);
    let (la, lb, lc) = (list(&a), list(&b), list(&c));
    assert_eq!(la, lb, "same seed, same split");
    assert_ne!(la, lc, "another seed, another split");
    assert_eq!(la.len(), 30, "every image exactly once");
    for class in ["0", "1", "2"] {
        let val: Vec<_> = la
            .iter()
            .filter(|p| p.starts_with(&format!("val/{class}/")))
            .collect();
        let train: Vec<_> = la
            .iter()
            .filter(|p| p.starts_with(&format!("train/{class}/")))
            .collect();
        assert_eq!(
            (val.len(), train.len()),
            (3, 7),
            "stratified: 30% of each class"
        );
        for v in &val {
            let name = v.rsplit('/').next().unwrap();
            assert!(!train.iter().any(|t| t.ends_with(name)), "disjoint");
        }
    }
    let err = kd_err(&["split", src.to_str().unwrap(), a.to_str().unwrap()]);
    assert!(err.contains("--force"), "{err}");
    kd_ok(&[
        "split",
        src.to_str().unwrap(),
        a.to_str().unwrap(),
        "--seed",
        "8",
        "--force",
    ]);
    assert_eq!(list(&a), lc);
}

#[test]
fn models_lists_reference_parameter_counts() {
    let out = kd_ok(&["models", "--classes", "12"]);
    assert!(
        out.contains("resnet18") && out.contains("11182668"),
        "{out}"
    );
    assert!(
        out.contains("resnet50") && out.contains("23532620"),
        "{out}"
    );
    // CoAtNet's relative-position tables follow the image size; ResNet's count does not.
    let count = |out: &str, model: &str| -> u64 {
        let line = out.lines().find(|l| l.starts_with(model)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let small = kd_ok(&["models", "--classes", "12", "--image-size", "64"]);
    assert!(small.contains("12 classes, 64x64 images"), "{small}");
    assert_eq!(count(&small, "resnet18"), count(&out, "resnet18"));
    assert!(
        count(&small, "coatnet_0") < count(&out, "coatnet_0"),
        "{small}"
    );
    // Where CoAtNet cannot be built, its rows say so; ResNet's still count.
    let odd = kd_ok(&["models", "--classes", "12", "--image-size", "28"]);
    assert_eq!(count(&odd, "resnet18"), count(&out, "resnet18"));
    let coatnet = odd.lines().find(|l| l.starts_with("coatnet_0")).unwrap();
    assert_eq!(coatnet.split_whitespace().nth(1), Some("-"), "{odd}");
}

#[test]
fn stats_reports_mnist_statistics() {
    let dir = tempfile::tempdir().unwrap();
    mnist_subset(dir.path(), 10, 20);
    let out = kd_ok(&["stats", dir.path().to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mean = v["mean"][0].as_f64().unwrap();
    let std = v["std"][0].as_f64().unwrap();
    // MNIST's well-known statistics are mean 0.1307, std 0.3081.
    assert!((mean - 0.1307).abs() < 0.02, "{mean}");
    assert!((std - 0.3081).abs() < 0.02, "{std}");
    assert_eq!(v["images"], 200);
}

#[test]
fn shipped_experiments_parse_with_the_tutorial_recipe() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let plants =
        kd::experiment::load_experiment(&root.join("examples/plant-seedlings.toml")).unwrap();
    assert_eq!(plants.teacher.model.name, "coatnet_2");
    let (student, kd_student) = (
        plants.student("student").unwrap(),
        plants.student("kd_student").unwrap(),
    );
    assert_eq!(student.model.name, "resnet18");
    for c in [&plants.teacher, student, kd_student] {
        assert_eq!(
            (c.image_size, c.batch_size, c.epochs, c.t_max),
            (224, 16, 50, 20)
        );
        assert_eq!((c.lr, c.eta_min), (1e-4, 1e-9));
        assert_eq!(c.augment, kd::data::AugmentConfig::default());
    }
    let kd = kd_student.teacher.as_ref().unwrap();
    let settings = serde_json::to_value(&kd.kd).unwrap();
    assert_eq!(
        settings["method"], "tutorial",
        "`loss = \"seed\"` names the tutorial's loss"
    );
    assert_eq!(
        (settings["temperature"].as_f64(), settings["alpha"].as_f64()),
        (Some(7.0), Some(0.7))
    );
    assert!(plants.teacher.teacher.is_none() && student.teacher.is_none());

    let demo = kd::experiment::parse_experiment(kd::experiment::DEMO_TOML).unwrap();
    assert_eq!(demo.student("student").unwrap().image_size, 32);
    assert!(demo.teacher.model.name.starts_with("coatnet"));

    // A stage's own seed changes its initialisation, not the data every stage shares.
    let reseeded = kd::experiment::parse_experiment(
        "out = 'x'\n[data]\npath = 'd'\nseed = 5\n[teacher]\nmodel = 'resnet18'\n[student]\nmodel = 'resnet18'\nseed = 9\n",
    )
    .unwrap();
    assert_eq!(
        (reseeded.teacher.seed, reseeded.teacher.data_seed()),
        (5, 5)
    );
    for c in [
        reseeded.student("student").unwrap(),
        reseeded.student("kd_student").unwrap(),
    ] {
        assert_eq!((c.seed, c.data_seed()), (9, 5));
    }

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "out = 'x'\n[data\n").unwrap();
    let err = kd_err(&["run", broken.to_str().unwrap()]);
    assert!(err.contains("broken.toml: line 2: unclosed table"), "{err}");

    for width in ["'4'", "-4", "4.0"] {
        let text = format!(
            "out = 'x'\n[data]\npath = 'd'\n[teacher]\nmodel = 'resnet18'\n[student]\nmodel = 'resnet18'\nwidth = {width}\n"
        );
        let err = format!("{:#}", kd::experiment::parse_experiment(&text).unwrap_err());
        assert!(err.contains("[student] width"), "{width}: {err}");
    }

    let err = kd::experiment::parse_experiment("out = 'x'\n[data]\npath = 'd'\n[teacher]\nmodel = 'resnet18'\nlearning_rate = 1\n[student]\nmodel = 'resnet18'\n").unwrap_err();
    assert!(format!("{err:#}").contains("learning_rate"), "{err:#}");
    // [distill] names its own keys: the flag --kd-loss is the key `method` (or `loss`).
    let err = kd::experiment::parse_experiment("out = 'x'\n[data]\npath = 'd'\n[teacher]\nmodel = 'resnet18'\n[student]\nmodel = 'resnet18'\n[distill]\nkd_loss = 'seed'\n").unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("[distill] has an unknown key `kd_loss`")
            && err.contains("temperature, warmup, method, cache_teacher")
            && !err.contains(" teacher,"),
        "{err}"
    );
    let err = kd::experiment::parse_experiment("out = 'x'\n[data]\npath = 'd'\n[recipe]\ndata = 'e'\n[teacher]\nmodel = 'resnet18'\n[student]\nmodel = 'resnet18'\n").unwrap_err();
    assert!(format!("{err:#}").contains("[data] path"), "{err:#}");
}

/// A study file that would mix runs, hide a setting or write outside its own folders is
/// refused, naming the table.
#[test]
fn study_files_refuse_what_would_mix_runs() {
    let head = "out = 'x'\n[data]\npath = 'd'\n[teacher]\nmodel = 'resnet18'\n[student]\nmodel = 'resnet18'\n";
    let err = |tail: &str| {
        let text = format!("{head}{tail}");
        format!(
            "{:#}",
            kd::experiment::parse_experiment(&text).expect_err(&text)
        )
    };
    for name in [".", "..", ".hidden", "Report", "Teacher", "students"] {
        let e = err(&format!("[[methods]]\nname = '{name}'\nmethod = 'dkd'\n"));
        assert!(
            e.contains(&format!("name '{name}' cannot name a folder")),
            "{e}"
        );
    }
    let e = err("[[methods]]\nmethod = 'hinton'\n[[methods]]\nname = 'again'\nmethod = 'kd'\n");
    assert!(
        e.contains("'hinton' and 'again' train the same student"),
        "{e}"
    );
    // Without seeds = [...], an entry's seed is its own.
    let text = format!("{head}[[methods]]\nmethod = 'dkd'\nseed = 3\n");
    let exp = kd::experiment::parse_experiment(&text).unwrap();
    assert_eq!(exp.student("dkd").unwrap().seed, 3);
    let text = format!("seeds = [1, 2]\n{head}[[methods]]\nmethod = 'dkd'\nseed = 3\n");
    let e = format!("{:#}", kd::experiment::parse_experiment(&text).unwrap_err());
    assert!(
        e.contains("[[methods]] entry 'dkd' sets seed, but seeds = [...]"),
        "{e}"
    );
    let e = err("[distill]\ntemperature = nan\n");
    assert!(e.contains("[distill] temperature has no value"), "{e}");
    let e = err("[[methods]]\nmethod = 'dkd'\nbeta = -1.0\n");
    assert!(
        e.contains("in [[methods]] entry 'dkd'") && e.contains("beta -1"),
        "{e}"
    );
    let e = err("[distill]\ntemprature = 4.0\n");
    assert!(e.contains("did you mean `temperature`?"), "{e}");
}

/// Usage errors say what is missing or allowed; flags that do not apply are refused.
#[test]
fn usage_errors_carry_their_details() {
    let e = kd_err(&["train"]);
    assert!(e.contains("not provided: --out <OUT> (see --help)"), "{e}");
    let e = kd_err(&["train", "--out", "x", "--stem", "wide"]);
    assert!(e.contains("possible values: imagenet, small"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let e = kd_err(&[
        "distill",
        "--out",
        out.to_str().unwrap(),
        "--model",
        "resnet18",
    ]);
    assert!(e.contains("kd distill needs --teacher"), "{e}");
    assert!(!out.exists());
    let e = kd_err(&["bench", "--method", "dkd"]);
    assert!(e.contains("--method applies to distillation steps"), "{e}");
}

#[test]
fn bench_reports_speed_and_memory_for_every_mode() {
    let tiny = [
        "--model",
        "resnet18",
        "--width",
        "2",
        "--stem",
        "small",
        "--image-size",
        "32",
        "--batch",
        "4",
        "--steps",
        "2",
        "--json",
    ];
    for mode in [
        vec!["--mode", "train"],
        vec!["--mode", "eval"],
        vec![
            "--mode",
            "distill",
            "--teacher",
            "resnet18",
            "--teacher-width",
            "4",
        ],
    ] {
        let args: Vec<&str> = ["bench"]
            .iter()
            .chain(&tiny)
            .chain(&mode)
            .copied()
            .collect();
        let r: serde_json::Value = serde_json::from_str(&kd_ok(&args)).unwrap();
        assert_eq!(r["batch"], 4, "{r}");
        assert!(r["images_per_second"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_mib"].as_f64().unwrap() > 1.0, "{r}");
        // flex has no pool allocator to report; GPU backends fill this in.
        assert!(r["peak_device_mib"].is_null(), "{r}");
    }
    // --mode eval times kd's inference plan on the CPU, --engine forward the network's.
    for (engine, what) in [
        ("auto", "inference (kd's plan)"),
        ("forward", "inference (forward)"),
    ] {
        let args: Vec<&str> = ["bench"]
            .iter()
            .chain(&tiny)
            .chain(&["--mode", "eval", "--engine", engine])
            .copied()
            .collect();
        let r: serde_json::Value = serde_json::from_str(&kd_ok(&args)).unwrap();
        assert!(r["what"].as_str().unwrap().ends_with(what), "{r}");
        assert!(r["profile"].is_null(), "no profile unless asked: {r}");
    }
    // --profile: each step of the plan, with its time per batch; only where the plan runs.
    let args: Vec<&str> = ["bench"]
        .iter()
        .chain(&tiny)
        .chain(&["--mode", "eval", "--profile"])
        .copied()
        .collect();
    let r: serde_json::Value = serde_json::from_str(&kd_ok(&args)).unwrap();
    let steps = r["profile"]["steps"].as_array().unwrap();
    assert!(r["profile"]["workers"].as_u64().unwrap() >= 1, "{r}");
    let described = |s: &serde_json::Value| s["step"].as_str().unwrap().to_string();
    assert!(
        described(&steps[0]).starts_with("input NCHW->NHWC 3 32x32"),
        "the input's conversion first: {r}"
    );
    assert!(
        described(&steps[1]).starts_with("conv 3x3/1 3->2 32x32->32x32"),
        "then the small stem: {r}"
    );
    assert!(
        described(steps.last().unwrap()).starts_with("linear"),
        "{r}"
    );
    assert!(steps.iter().all(|s| s["seconds"].as_f64().unwrap() >= 0.0));
    assert!(
        steps
            .iter()
            .map(|s| s["seconds"].as_f64().unwrap())
            .sum::<f64>()
            > 0.0
    );
    for (extra, why) in [
        (
            vec!["--mode", "eval", "--engine", "forward"],
            "does not run here",
        ),
        (vec!["--mode", "train"], "it goes with --mode eval"),
    ] {
        let args: Vec<&str> = ["bench"]
            .iter()
            .chain(&tiny)
            .chain(&extra)
            .chain(&["--profile"])
            .copied()
            .collect();
        let err = kd_err(&args);
        assert!(err.contains("--profile") && err.contains(why), "{err}");
    }
}
