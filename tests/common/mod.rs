//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

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

/// Gradients of every parameter of a module, by Burn path (`layer1.0.conv1.weight`).
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
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let shape = g.dims().to_vec();
                self.out.insert(self.path.join("."), (shape, values(g)));
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
