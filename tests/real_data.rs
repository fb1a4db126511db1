//! Learning on real data: a small ResNet on 1,000 MNIST digits at 32x32, then `kd eval`
//! and `kd predict` on the run agree with what training reported.

mod common;

use common::*;

#[test]
fn small_resnet_learns_mnist_and_eval_predict_agree() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("digits");
    mnist_subset(&src, 10, 100);
    let data = dir.path().join("split");
    kd_ok(&[
        "split",
        src.to_str().unwrap(),
        data.to_str().unwrap(),
        "--val-fraction",
        "0.3",
    ]);
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    kd_ok(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        "resnet18",
        "--width",
        "16",
        "--stem",
        "small",
        "--image-size",
        "32",
        "--epochs",
        "6",
        "--batch-size",
        "32",
        "--lr",
        "2e-3",
        "--no-augment",
        "--out",
        r,
        "--quiet",
    ]);
    for f in [
        "config.json",
        "classes.json",
        "metrics.json",
        "metrics.csv",
        "checkpoints/best.bpk",
        "checkpoints/final.bpk",
    ] {
        assert!(run.join(f).is_file(), "{f} written");
    }
    let metrics: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics.len(), 6);
    let first = metrics[0]["train_loss"].as_f64().unwrap();
    let last = metrics[5]["train_loss"].as_f64().unwrap();
    assert!(last < first * 0.5, "training loss falls: {first} -> {last}");
    let best = metrics
        .iter()
        .map(|m| m["val_accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(best >= 0.90, "best validation accuracy {best} < 90%");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7);
    // Device memory is a GPU allocator's figure: a column, empty on the CPU.
    assert!(csv.lines().next().unwrap().ends_with(",peak_device_mib"));
    assert!(metrics.iter().all(|m| m["peak_device_mib"].is_null()));

    // kd eval reproduces the best epoch's validation accuracy.
    let eval: serde_json::Value =
        serde_json::from_str(&kd_ok(&["eval", "--run", r, "--json"])).unwrap();
    let acc = eval["accuracy"].as_f64().unwrap();
    assert!((acc - best).abs() < 1e-9, "eval {acc} vs training {best}");
    assert_eq!(eval["images"], 300);
    assert_eq!(eval["confusion"].as_array().unwrap().len(), 10);
    assert!(run.join("eval/confusion-best.png").is_file());
    image::open(run.join("eval/confusion-best.png")).expect("readable PNG");
    // It says what it evaluated: the checkpoint, its epoch, the validation split.
    let best_epoch = metrics
        .iter()
        .find(|m| m["val_accuracy"].as_f64().unwrap() == best)
        .unwrap()["epoch"]
        .clone();
    assert_eq!(
        (
            &eval["checkpoint"],
            &eval["epoch"],
            &eval["validation_split"]
        ),
        (&"best".into(), &best_epoch, &true.into())
    );
    // Other images are evaluated into their own files; the run's evaluation is kept.
    let own = std::fs::read(run.join("eval/eval-best.json")).unwrap();
    let text = kd_ok(&[
        "eval",
        "--run",
        r,
        "--data",
        data.join("train").to_str().unwrap(),
    ]);
    assert!(
        text.contains("checkpoint best (epoch") && text.contains("the images of"),
        "{text}"
    );
    let other: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("eval/eval-best-on-train.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&other["images"], &other["validation_split"]),
        (&700.into(), &false.into())
    );
    assert!(run.join("eval/confusion-best-on-train.png").is_file());
    assert_eq!(std::fs::read(run.join("eval/eval-best.json")).unwrap(), own);
    // Another folder of the same name is not written over it (the same folder is).
    let twin = dir.path().join("elsewhere/train");
    copy_dir(&data.join("val"), &twin);
    let err = kd_err(&["eval", "--run", r, "--data", twin.to_str().unwrap()]);
    assert!(err.contains("pass --out"), "{err}");
    kd_ok(&[
        "eval",
        "--run",
        r,
        "--data",
        data.join("train").to_str().unwrap(),
    ]);

    // kd predict's top-1 over the validation folder gives the same accuracy.
    let csv_path = dir.path().join("predictions/val.csv");
    let preds: Vec<serde_json::Value> = serde_json::from_str(&kd_ok(&[
        "predict",
        "--run",
        r,
        data.join("val").to_str().unwrap(),
        "--json",
        "--csv",
        csv_path.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(preds.len(), 300);
    // The CSV holds the same top-1, named relative to the folder given (class/file.png).
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("file,class,probability"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 300);
    for (row, p) in rows.iter().zip(&preds) {
        let path = std::path::Path::new(p["path"].as_str().unwrap());
        assert_eq!(
            std::path::Path::new(row[0]),
            path.strip_prefix(data.join("val")).unwrap()
        );
        assert_eq!(row[1], p["top"][0]["class"].as_str().unwrap());
        let prob: f64 = row[2].parse().unwrap();
        assert!((prob - p["top"][0]["probability"].as_f64().unwrap()).abs() < 1e-6);
    }
    // An image given twice (itself and inside its folder) is predicted once; two images
    // that would share a CSV name are refused.
    let one = preds[0]["path"].as_str().unwrap();
    let val = data.join("val");
    // Any batch size streams the same predictions, and a throughput line ends the run.
    let out = kd(&[
        "predict",
        "--run",
        r,
        val.to_str().unwrap(),
        "--json",
        "--batch-size",
        "7",
    ]);
    let batched: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(batched.len(), preds.len());
    for (a, b) in batched.iter().zip(&preds) {
        assert_eq!(a["path"], b["path"]);
        assert_eq!(a["top"][0]["class"], b["top"][0]["class"]);
        let (pa, pb) = (
            a["top"][0]["probability"].as_f64(),
            b["top"][0]["probability"].as_f64(),
        );
        assert!((pa.unwrap() - pb.unwrap()).abs() < 1e-5);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("predicted 300 images") && stderr.contains("images/s"),
        "{stderr}"
    );
    // On the CPU in f32, the ResNet goes through kd's inference plan (BatchNorm folded);
    // the accuracy check below compares it with `kd eval`'s forward.
    assert!(stderr.contains("kd's inference plan"), "{stderr}");
    let twice = kd_ok(&["predict", "--run", r, val.to_str().unwrap(), one]);
    assert_eq!(twice.lines().count(), 300);
    let copy = dir
        .path()
        .join("other")
        .join(std::path::Path::new(one).file_name().unwrap());
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(one, &copy).unwrap();
    let csv_arg = csv_path.to_str().unwrap();
    let err = kd_err(&[
        "predict",
        "--run",
        r,
        one,
        copy.to_str().unwrap(),
        "--csv",
        csv_arg,
    ]);
    assert!(err.contains("would both be named"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&csv_path).unwrap(),
        csv,
        "left as it was"
    );
    let correct = preds
        .iter()
        .filter(|p| {
            let path = std::path::Path::new(p["path"].as_str().unwrap());
            let truth = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            p["top"][0]["class"] == truth
        })
        .count();
    assert!(
        (correct as f64 / 300.0 - acc).abs() < 1e-9,
        "predict {correct}/300 vs eval {acc}"
    );

    // kd export writes PyTorch-named weights that load back to identical logits.
    let exported = dir.path().join("deploy/new/student.safetensors"); // folders made
    kd_ok(&["export", "--run", r, "--out", exported.to_str().unwrap()]);
    let device = burn::tensor::Device::flex();
    let run = kd::run::Run::open(&run).unwrap();
    let original = run
        .load_network(kd::run::Checkpoint::Best, &device)
        .unwrap();
    let mut reloaded = run.config.model.build(10, 32, &device).unwrap();
    kd::models::weights::load_pytorch(&mut reloaded, &exported).unwrap();
    let loader = kd::data::Loader::new(
        kd::data::ImageFolder::scan(&data.join("val"))
            .unwrap()
            .samples,
        run.eval_transform(),
        16,
        false,
        0,
    );
    let batch = loader.epoch(0, 0).next().unwrap().unwrap();
    let a = kd::data::tensors::rows(
        original.forward(kd::data::tensors::images_tensor(&batch, &device), &cx()),
    )
    .unwrap();
    let b = kd::data::tensors::rows(
        reloaded.forward(kd::data::tensors::images_tensor(&batch, &device), &cx()),
    )
    .unwrap();
    assert_eq!(a, b, "exported weights give identical logits");
    let bytes = std::fs::read(&exported).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0, "tensor data stays 8-byte aligned");
    // The file carries what deployment needs: class order, input size, normalization.
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let meta = &header["__metadata__"];
    assert_eq!(meta["format"], "pt");
    let classes: Vec<String> = serde_json::from_str(meta["kd.classes"].as_str().unwrap()).unwrap();
    assert_eq!(classes, run.classes);
    assert_eq!(meta["kd.image_size"], "32");
    let mean: [f32; 3] = serde_json::from_str(meta["kd.mean"].as_str().unwrap()).unwrap();
    assert_eq!(Some(mean), run.config.mean);
    // Exporting again gives the same bytes.
    kd_ok(&["export", "--run", r, "--out", exported.to_str().unwrap()]);
    assert!(std::fs::read(&exported).unwrap() == bytes);
    let keys = read_safetensors(&exported);
    assert!(
        keys.contains_key("layer2.0.downsample.0.weight") && keys.contains_key("bn1.running_var")
    );
    assert_eq!(
        keys["fc.weight"].shape,
        vec![10, 128],
        "PyTorch [out, in] layout"
    );

    // kd export --format onnx (picked by the extension): the graph tract runs gives kd's
    // logits on the real batch, the metadata carries the classes, and the bytes repeat.
    let onnx = dir.path().join("deploy/student.onnx");
    kd_ok(&["export", "--run", r, "--out", onnx.to_str().unwrap()]);
    let bytes = std::fs::read(&onnx).unwrap();
    let images = kd::data::tensors::images_tensor(&batch, &device);
    let logits = kd::run::onnx::run_onnx(&bytes, &images).unwrap();
    let expected: Vec<f32> = a.iter().flatten().copied().collect();
    let diff = kd::run::onnx::max_difference(&expected, &logits);
    assert!(diff < 1e-4, "ONNX logits differ by {diff}");
    let model = <tract_onnx::pb::ModelProto as prost::Message>::decode(&bytes[..]).unwrap();
    let meta: std::collections::HashMap<_, _> = model
        .metadata_props
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_str()))
        .collect();
    let classes: Vec<String> = serde_json::from_str(meta["kd.classes"]).unwrap();
    assert_eq!(classes, run.classes);
    assert_eq!(meta["kd.image_size"], "32");
    kd_ok(&["export", "--run", r, "--out", onnx.to_str().unwrap()]);
    assert!(
        std::fs::read(&onnx).unwrap() == bytes,
        "same checkpoint, same bytes"
    );
    // A file named otherwise needs --format; an unknown format is refused.
    let other = dir.path().join("deploy/student.bin");
    let err = kd_err(&["export", "--run", r, "--out", other.to_str().unwrap()]);
    assert!(err.contains("--format"), "{err}");
    kd_ok(&[
        "export",
        "--run",
        r,
        "--out",
        other.to_str().unwrap(),
        "--format",
        "onnx",
    ]);
    let err = kd_err(&[
        "export",
        "--run",
        r,
        "--out",
        onnx.to_str().unwrap(),
        "--format",
        "tflite",
    ]);
    assert!(err.contains("tflite"), "{err}");
    // An output that cannot be written (its folder is a file) and a run without the
    // checkpoint asked for: one line, nothing written.
    let blocked = onnx.join("x.onnx");
    kd_err(&["export", "--run", r, "--out", blocked.to_str().unwrap()]);
    let bare = dir.path().join("bare");
    copy_dir(&run.dir, &bare);
    std::fs::remove_file(bare.join("checkpoints/best.bpk")).unwrap();
    let err = kd_err(&[
        "export",
        "--run",
        bare.to_str().unwrap(),
        "--out",
        dir.path().join("none.onnx").to_str().unwrap(),
    ]);
    assert!(!dir.path().join("none.onnx").exists(), "{err}");
}
