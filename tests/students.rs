//! The MobileNetV3 and EfficientNet students: parity with torchvision (tiny configs' logits
//! in eval and train mode, loss, gradients and BatchNorm updates; parameter counts and
//! state-dict names and shapes of the full-size models), their randomness in training, and
//! every command that takes a model name.

mod common;

use std::collections::HashMap;

use burn::module::Module;
use burn::store::KeyRemapper;
use burn::tensor::{Device, Distribution, Tensor};
use common::*;
use kd::models::efficientnet::{EfficientNet, EfficientNetConfig};
use kd::models::mobilenet_v3::{MobileNetV3, MobileNetV3Config};
use kd::models::{Architecture, ModelSpec, Network, param_count, weights};
use kd::ops::{Ctx, Precision};

/// torchvision's `mobilenet_v3_small(width_mult=0.5, num_classes=12)`, the fixture's weights,
/// dropout off (the fixture's train-mode logits were taken with p = 0).
fn tiny_mobilenet(device: &Device) -> Network {
    let config = MobileNetV3Config {
        large: false,
        width_mult: 0.5,
        dropout: 0.0,
        num_classes: 12,
    };
    let mut net = Network::MobileNetV3(config.init(device));
    weights::load_pytorch(&mut net, &fixture("mobilenet_v3_tiny.safetensors")).unwrap();
    net
}

/// torchvision's EfficientNet with the B0 table at width 0.25, depth 0.5; dropout and
/// stochastic depth off, as in the fixture's train-mode logits.
fn tiny_efficientnet(device: &Device) -> Network {
    let config = EfficientNetConfig {
        width_mult: 0.25,
        depth_mult: 0.5,
        dropout: 0.0,
        stochastic_depth: 0.0,
        num_classes: 12,
    };
    let mut net = Network::EfficientNet(config.init(device));
    weights::load_pytorch(&mut net, &fixture("efficientnet_tiny.safetensors")).unwrap();
    net
}

/// kd's path of a PyTorch parameter name (the family's key renames, BatchNorm's
/// gamma/beta) and whether it is a Linear weight (transposed in Burn).
fn kd_name<A: Architecture>(torch: &str) -> (String, bool) {
    let remaps = KeyRemapper::from_patterns(A::FROM_TORCH.to_vec()).unwrap();
    let mut name = torch.to_string();
    for (pattern, replacement) in remaps.to_regex_pairs() {
        name = pattern
            .replace_all(&name, replacement.as_str())
            .into_owned();
    }
    let name = if let Some(bn) = name.strip_suffix(".bn.weight") {
        format!("{bn}.bn.gamma")
    } else if let Some(bn) = name.strip_suffix(".bn.bias") {
        format!("{bn}.bn.beta")
    } else {
        name
    };
    let linear = name.starts_with("classifier") && name.ends_with(".weight");
    (name, linear)
}

/// The running statistics after one train-mode forward from the stored ones equal
/// torchvision's (its momentum and the unbiased batch variance).
fn check_batch_norm_updates(file: &str, build: impl Fn(&Device) -> Network) {
    let fx = read_safetensors(&fixture(file));
    let ad = Device::flex().autodiff();
    let net = build(&ad);
    let (x, _) = fixture_input(&fx, &ad);
    let _ = net.forward(x, &cx());
    let dir = tempfile::tempdir().unwrap();
    let exported = dir.path().join("after.safetensors");
    std::fs::write(
        &exported,
        weights::to_pytorch_safetensors(&net.valid()).unwrap(),
    )
    .unwrap();
    let ours = read_safetensors(&exported);
    let mut checked = 0;
    for (key, expected) in fx.iter().filter(|(k, _)| k.starts_with("after_train.")) {
        let name = &key["after_train.".len()..];
        let err = rel_err(&ours[name].data, &expected.data);
        assert!(
            err < 1e-4,
            "{file}: {name} after a train step, rel err {err}"
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "{file}: the listed running statistics");
}

#[test]
fn mobilenet_v3_tiny_matches_torchvision() {
    assert_eq!(param_count(&tiny_mobilenet(&Device::flex())), 410_420);
    let checked = check_fixture_parity(
        "mobilenet_v3_tiny.safetensors",
        tiny_mobilenet,
        kd_name::<MobileNetV3>,
    );
    assert_eq!(checked, 9, "all listed gradients checked");
    check_batch_norm_updates("mobilenet_v3_tiny.safetensors", tiny_mobilenet);
}

#[test]
fn efficientnet_tiny_matches_torchvision() {
    assert_eq!(param_count(&tiny_efficientnet(&Device::flex())), 202_674);
    let checked = check_fixture_parity(
        "efficientnet_tiny.safetensors",
        tiny_efficientnet,
        kd_name::<EfficientNet>,
    );
    assert_eq!(checked, 9, "all listed gradients checked");
    check_batch_norm_updates("efficientnet_tiny.safetensors", tiny_efficientnet);
}

/// Key -> shape of a `*.keys.json` fixture, without BatchNorm's `num_batches_tracked`
/// counters (not exported; PyTorch fills them in).
fn reference_shapes(file: &str) -> HashMap<String, Vec<usize>> {
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
    // The tiny models' files wrap the shapes with their parameter count.
    let shapes = keys.get("state_dict_shapes").unwrap_or(&keys);
    shapes
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).unwrap()))
        .collect()
}

/// Key -> shape of an export.
fn exported_shapes(net: &Network) -> HashMap<String, Vec<usize>> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.safetensors");
    std::fs::write(&file, weights::to_pytorch_safetensors(net).unwrap()).unwrap();
    read_safetensors(&file)
        .into_iter()
        .map(|(k, t)| (k, t.shape))
        .collect()
}

#[test]
fn exports_have_torchvisions_names_and_shapes() {
    let device = Device::flex();
    let large = ModelSpec::named("mobilenet_v3_large")
        .build(12, 224, &device)
        .unwrap();
    assert_eq!(
        exported_shapes(&large),
        reference_shapes("mobilenet_v3_large_12.keys.json")
    );
    assert_eq!(
        exported_shapes(&tiny_mobilenet(&device)),
        reference_shapes("mobilenet_v3_tiny.keys.json")
    );
    assert_eq!(
        exported_shapes(&tiny_efficientnet(&device)),
        reference_shapes("efficientnet_tiny.keys.json")
    );
}

#[test]
fn reference_parameter_counts() {
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("param_counts.json")).unwrap())
            .unwrap();
    let device = Device::flex();
    for name in [
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "efficientnet_b1",
    ] {
        for classes in [12, 1000] {
            let net = ModelSpec::named(name).build(classes, 224, &device).unwrap();
            assert_eq!(
                param_count(&net) as u64,
                counts[format!("{name}_{classes}")].as_u64().unwrap(),
                "{name} with {classes} classes"
            );
        }
    }
}

/// In training, dropout and stochastic depth draw from the context's seed: the same seed
/// gives the same logits (a resumed run replays them), another seed others; in inference
/// they are off.
#[test]
fn training_randomness_follows_the_seed_and_is_off_in_inference() {
    let ad = Device::flex().autodiff();
    for name in ["mobilenet_v3_small", "efficientnet_b0"] {
        let spec = ModelSpec {
            name: name.into(),
            width: Some(8),
            stem: None,
        };
        let net = spec.build(5, 32, &ad).unwrap();
        let x = Tensor::<4>::random([4, 3, 32, 32], Distribution::Normal(0.0, 1.0), &ad);
        let run = |seed| {
            values(
                net.forward(x.clone(), &Ctx::seeded(Precision::F32, seed))
                    .inner(),
            )
        };
        assert_eq!(run(1), run(1), "{name}: same seed");
        assert_ne!(run(1), run(2), "{name}: other seed");
        let plain = net.valid();
        let x = x.inner();
        let eval = |seed| values(plain.forward(x.clone(), &Ctx::seeded(Precision::F32, seed)));
        assert_eq!(eval(1), eval(2), "{name}: no randomness in inference");
        let err = spec.validate(16).unwrap_err().to_string();
        assert!(err.contains("at least 32"), "{err}");
        let err = ModelSpec {
            stem: Some(kd::models::Stem::Small),
            ..spec
        }
        .validate(32)
        .unwrap_err()
        .to_string();
        assert!(err.contains("ResNet models only"), "{err}");
    }
}

fn metrics_of(run: &std::path::Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap()
}

/// Train, distill (each family as teacher and as student), eval, predict, export, bench and
/// run take the new students by name.
#[test]
fn new_students_work_wherever_a_model_name_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("digits");
    mnist_subset(&data, 3, 20);
    let d = data.to_str().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let tiny = [
        "--width",
        "8",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--no-augment",
        "--lr",
        "3e-3",
        "--quiet",
    ];
    let mnv3 = path("mnv3");
    let train = [
        &[
            "train",
            "--data",
            d,
            "--model",
            "mobilenet_v3_small",
            "--epochs",
            "3",
            "--out",
            &mnv3,
        ][..],
        &tiny,
    ]
    .concat();
    kd_ok(&train);
    let m = metrics_of(tmp.path().join("mnv3").as_path());
    let first = m[0]["train_loss"].as_f64().unwrap();
    let last = m[2]["train_loss"].as_f64().unwrap();
    assert!(last < first, "MobileNetV3 learns: {first} -> {last}");

    let eff = path("eff");
    let distill = [
        &[
            "distill",
            "--data",
            d,
            "--teacher",
            &mnv3,
            "--student",
            "efficientnet_b0",
            "--epochs",
            "1",
            "--out",
            &eff,
        ][..],
        &tiny,
    ]
    .concat();
    kd_ok(&distill);
    let m = metrics_of(tmp.path().join("eff").as_path());
    assert!(m[0]["train_parts"]["kd"].as_f64().unwrap() > 0.0);
    let back = path("back");
    let distill = [
        &[
            "distill",
            "--data",
            d,
            "--teacher",
            &eff,
            "--student",
            "mobilenet_v3_large",
            "--epochs",
            "1",
            "--out",
            &back,
        ][..],
        &tiny,
    ]
    .concat();
    kd_ok(&distill);

    let report: serde_json::Value =
        serde_json::from_str(&kd_ok(&["eval", "--run", &eff, "--json"])).unwrap();
    assert_eq!(report["images"], 18);
    let preds: serde_json::Value = serde_json::from_str(&kd_ok(&[
        "predict",
        "--run",
        &mnv3,
        data.join("1").to_str().unwrap(),
        "--top-k",
        "2",
        "--json",
    ]))
    .unwrap();
    assert_eq!(preds.as_array().unwrap().len(), 20);
    let exported = path("eff.safetensors");
    kd_ok(&["export", "--run", &eff, "--out", &exported]);
    let weights = read_safetensors(std::path::Path::new(&exported));
    assert_eq!(weights["classifier.1.weight"].shape[0], 3);
    assert!(weights.contains_key("features.1.0.block.0.0.weight"));

    let bench: serde_json::Value = serde_json::from_str(&kd_ok(&[
        "bench",
        "--mode",
        "distill",
        "--model",
        "mobilenet_v3_large",
        "--width",
        "8",
        "--teacher",
        "efficientnet_b1",
        "--teacher-width",
        "8",
        "--image-size",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
        "--json",
    ]))
    .unwrap();
    assert!(bench["images_per_second"].as_f64().unwrap() > 0.0);
    let listed = kd_ok(&["models", "--classes", "12"]);
    assert!(
        listed.contains("efficientnet_b1") && listed.contains("6528556"),
        "{listed}"
    );

    let study = tmp.path().join("study.toml");
    std::fs::write(
        &study,
        format!(
            "out = '{}'\n[data]\npath = '{d}'\n[recipe]\nimage_size = 32\nbatch_size = 8\nepochs = 1\n\
             [recipe.augment]\nrotation_degrees = 0.0\nblur_kernel = 0\n\
             [teacher]\nmodel = 'efficientnet_b1'\nwidth = 8\n[student]\nmodel = 'mobilenet_v3_small'\nwidth = 8\n",
            path("study")
        ),
    )
    .unwrap();
    let out = kd_ok(&["run", study.to_str().unwrap(), "--quiet"]);
    assert!(
        out.contains("student with KD (mobilenet_v3_small)"),
        "{out}"
    );
}

/// The exported ONNX graphs compute the tiny students' logits, every BatchNorm folded.
#[test]
fn students_export_to_onnx() {
    let device = Device::flex();
    assert_eq!(check_onnx_round_trip(&tiny_mobilenet(&device), 12, 64), 0);
    assert_eq!(
        check_onnx_round_trip(&tiny_efficientnet(&device), 12, 64),
        0
    );
}

/// kd's inference plan computes the tiny students' logits: depthwise convolutions, squeeze
/// and excitation, hardswish and SiLU fused into the convolutions.
#[test]
fn students_inference_plan_matches() {
    let device = Device::flex();
    check_inference_plan(&tiny_mobilenet(&device), 64);
    check_inference_plan(&tiny_efficientnet(&device), 64);
}
