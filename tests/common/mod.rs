//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// A forward context in f32 (what the parity fixtures were computed in).
pub fn cx() -> kd::ops::Ctx {
    kd::ops::Ctx::new(kd::ops::Precision::F32)
}

/// Path of a fixture copied from the PyTorch references (`tests/fixtures`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The bundled MNIST subset.
pub fn mnist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist5k")
}

/// A tensor read from a safetensors file, as f64.
pub struct Tensor64 {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Minimal safetensors reader (F32 and I64) so tests need no extra crate.
pub fn read_safetensors(path: &Path) -> HashMap<String, Tensor64> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let body = &bytes[8 + n..];
    let mut out = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone()).unwrap();
        let [a, b]: [usize; 2] = serde_json::from_value(info["data_offsets"].clone()).unwrap();
        let raw = &body[a..b];
        let data = match info["dtype"].as_str().unwrap() {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            "I64" => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unsupported dtype {other}"),
        };
        out.insert(name.clone(), Tensor64 { shape, data });
    }
    out
}

/// Asserts that each of `ours` is within relative error `tol` ([`rel_err`]) of the matching
/// `expected` result, naming the quantity (`names`, one per result) and the `case` if not.
pub fn assert_all_close(
    names: &[&str],
    expected: &[Vec<f64>],
    ours: &[Vec<f64>],
    tol: f64,
    case: &str,
) {
    assert_eq!(
        expected.len(),
        ours.len(),
        "result counts differ for {case}"
    );
    assert!(
        names.len() >= ours.len(),
        "a result without a name for {case}"
    );
    for ((what, expected), ours) in names.iter().zip(expected).zip(ours) {
        let err = rel_err(ours, expected);
        assert!(
            err < tol,
            "{what} differs (rel. error {err:.1e}) for {case}"
        );
    }
}

/// Max absolute difference relative to the largest expected magnitude.
pub fn rel_err(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let scale = expected
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    actual
        .iter()
        .zip(expected)
        .fold(0.0f64, |m, (a, e)| m.max((a - e).abs()))
        / scale
}

/// Values of a float tensor as f64.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Gradients of every parameter of a module, by Burn path (`layer1.0.conv1.weight`), without
/// the names of enum variants (`Network`'s, a block's), as PyTorch names leave them out.
pub fn named_grads<M: Module>(
    module: &M,
    grads: &GradientsParams,
) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    struct V<'a> {
        path: Vec<String>,
        grads: &'a GradientsParams,
        out: HashMap<String, (Vec<usize>, Vec<f64>)>,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            let variant = container.starts_with("Enum:");
            self.path.push(if variant {
                String::new()
            } else {
                name.to_string()
            });
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let shape = g.dims().to_vec();
                let path: Vec<&str> = self
                    .path
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(String::as_str)
                    .collect();
                self.out.insert(path.join("."), (shape, values(g)));
            }
        }
    }
    let mut v = V {
        path: Vec::new(),
        grads,
        out: HashMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Runs the `kd` binary.
pub fn kd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kd"))
        .args(args)
        .output()
        .expect("run kd")
}

/// Runs `kd` and asserts success, returning stdout.
pub fn kd_ok(args: &[&str]) -> String {
    let out = kd(args);
    assert!(
        out.status.success(),
        "kd {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Borrows owned arguments for [`kd`], [`kd_ok`] and [`kd_err`].
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs `kd`, asserts a clean failure (non-zero exit, one-line error, no panic) and
/// returns stderr.
pub fn kd_err(args: &[&str]) -> String {
    let out = kd(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "kd {args:?} should fail");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal failure"),
        "panic: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "no clear error: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "error should be one line: {stderr}"
    );
    stderr
}

/// Copies the first `per_class` images of each of the first `classes` MNIST classes.
pub fn mnist_subset(dst: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        let src = mnist().join(c.to_string());
        let to = dst.join(c.to_string());
        std::fs::create_dir_all(&to).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&src)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files.into_iter().take(per_class) {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
}

/// The fixture's `input` images and `labels` as tensors on `device`.
pub fn fixture_input(
    fx: &HashMap<String, Tensor64>,
    device: &burn::tensor::Device,
) -> (Tensor<4>, Tensor<1, burn::tensor::Int>) {
    use burn::tensor::TensorData;
    let x = &fx["input"];
    let data: Vec<f32> = x.data.iter().map(|&v| v as f32).collect();
    let images = Tensor::from_data(TensorData::new(data, x.shape.clone()), device);
    let labels: Vec<i64> = fx["labels"].data.iter().map(|&v| v as i64).collect();
    let n = labels.len();
    (
        images,
        Tensor::from_data(TensorData::new(labels, [n]), device),
    )
}

/// Checks a network against a PyTorch parity fixture: eval-mode logits (plain device,
/// BatchNorm running statistics), train-mode logits, the loss and every `grad.*` tensor,
/// each within 1e-4 relative error. `build` makes the network with the fixture's weights on
/// a device; `kd_name` maps a PyTorch parameter name to kd's path and whether it is a Linear
/// weight (stored transposed, [in, out], in Burn). Returns the number of gradients checked.
pub fn check_fixture_parity(
    file: &str,
    build: impl Fn(&burn::tensor::Device) -> kd::models::Network,
    kd_name: impl Fn(&str) -> (String, bool),
) -> usize {
    let fx = read_safetensors(&fixture(file));
    let device = burn::tensor::Device::flex();
    let (x, _) = fixture_input(&fx, &device);
    let err = rel_err(
        &values(build(&device).forward(x, &cx())),
        &fx["expected_logits_eval"].data,
    );
    assert!(err < 1e-4, "{file}: eval logits rel err {err}");

    let ad = device.autodiff();
    let net = build(&ad);
    let (x, y) = fixture_input(&fx, &ad);
    let logits = net.forward(x, &cx());
    let err = rel_err(&values(logits.clone()), &fx["expected_logits_train"].data);
    assert!(err < 1e-4, "{file}: train logits rel err {err}");
    let loss = kd::losses::cross_entropy(logits, y);
    let err = rel_err(&values(loss.clone()), &fx["expected_loss_train"].data);
    assert!(err < 1e-4, "{file}: loss rel err {err}");

    let grads = GradientsParams::from_grads(loss.backward(), &net);
    let named = named_grads(&net, &grads);
    let mut checked = 0;
    for (key, expected) in fx.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let torch = &key["grad.".len()..];
        let (name, transposed) = kd_name(torch);
        let (shape, actual) = named
            .iter()
            // Paths start with the `Network` variant: "ResNet.conv1.weight".
            .find(|(k, _)| *k == &name || k.split_once('.').map(|(_, rest)| rest) == Some(&name))
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{file}: no gradient for {name}"));
        let actual: Vec<f64> = if transposed {
            let (i, o) = (shape[0], shape[1]);
            (0..o * i).map(|k| actual[(k % i) * o + k / i]).collect()
        } else {
            actual.clone()
        };
        let err = rel_err(&actual, &expected.data);
        assert!(err < 1e-4, "{file}: grad {torch} rel err {err}");
        checked += 1;
    }
    checked
}

/// Copies a folder tree (files and folders only), e.g. a run folder.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// The tests' small ResNet-18 (`stem = small`, `width`) on `data` at 32x32, batch 32, without
/// augmentation, for `epochs` (learning rate and schedule the recipe's until a test sets them).
pub fn small_resnet(data: &Path, width: usize, epochs: usize) -> kd::run::TrainConfig {
    let mut c = kd::run::TrainConfig::recipe(
        data.to_path_buf(),
        kd::models::ModelSpec {
            name: "resnet18".into(),
            width: Some(width),
            stem: Some(kd::models::Stem::Small),
        },
    );
    (c.image_size, c.batch_size, c.epochs) = (32, 32, epochs);
    c.augment = kd::data::AugmentConfig::none();
    c
}

/// Training without progress output.
pub fn quiet() -> kd::train::TrainOptions {
    kd::train::TrainOptions {
        quiet: true,
        ..Default::default()
    }
}

/// `batch` random normal images of side `size` on the CPU, and `net`'s logits for them.
pub fn random_images_and_logits(
    net: &kd::models::Network,
    batch: usize,
    size: usize,
) -> (Tensor<4>, Vec<f32>) {
    let x = Tensor::<4>::random(
        [batch, 3, size, size],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &burn::tensor::Device::flex(),
    );
    let logits = values(net.forward(x.clone(), &cx()))
        .into_iter()
        .map(|v| v as f32)
        .collect();
    (x, logits)
}

/// Exports `net` (for `classes` classes, images of side `size`) to ONNX and runs the graph
/// in tract at batch 1 and 5: its logits equal kd's within 1e-4 (relative to the largest);
/// exporting again gives the same bytes. Returns how many `BatchNormalization` nodes the
/// graph kept (the ones that follow no convolution).
pub fn check_onnx_round_trip(net: &kd::models::Network, classes: usize, size: usize) -> usize {
    use prost::Message;
    let bytes = kd::run::onnx::to_onnx(net, classes, size, &[]).unwrap();
    assert!(
        kd::run::onnx::to_onnx(net, classes, size, &[]).unwrap() == bytes,
        "the same network gives the same ONNX bytes"
    );
    for batch in [1, 5] {
        let (x, expected) = random_images_and_logits(net, batch, size);
        let actual = kd::run::onnx::run_onnx(&bytes, &x).unwrap();
        assert_eq!(actual.len(), batch * classes);
        let diff = kd::run::onnx::max_difference(&expected, &actual);
        assert!(diff < 1e-4, "batch {batch}: ONNX logits differ by {diff}");
    }
    let model = tract_onnx::pb::ModelProto::decode(&bytes[..]).unwrap();
    let graph = model.graph.unwrap();
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "BatchNormalization")
        .count()
}

/// kd's inference plan of `net` (BatchNorm folded into the convolutions, fused NHWC kernels,
/// reused buffers) at batch 1, 5 and 1 again: its logits equal the module's forward within
/// 1e-5 relative to the largest (at least 1); an empty batch gives none.
pub fn check_inference_plan(net: &kd::models::Network, size: usize) {
    let mut plan = kd::infer::Plan::new(net, size).unwrap();
    let batches: Vec<_> = [1, 5]
        .into_iter()
        .map(|batch| random_images_and_logits(net, batch, size))
        .collect();
    // One thread runs a batch whole; more run a batch's images in parallel chunks (one
    // image, or two, per chunk here).
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        // A batch of one after one of five: buffers reused at a smaller size.
        for (i, (x, expected)) in [&batches[0], &batches[1], &batches[0]]
            .into_iter()
            .enumerate()
        {
            let batch = x.dims()[0];
            let actual = pool.install(|| values(plan.forward(x.clone()).unwrap()));
            assert_eq!(actual.len(), batch * plan.classes());
            let actual: Vec<f32> = actual.into_iter().map(|v| v as f32).collect();
            let diff = kd::run::onnx::max_difference(expected, &actual);
            assert!(
                diff < 1e-5,
                "{threads} threads, run {i} (batch {batch}): the plan's logits differ by {diff} \
                 (relative)"
            );
        }
    }
    assert!(plan.run(&[], 0).is_empty(), "an empty batch, no logits");
}
