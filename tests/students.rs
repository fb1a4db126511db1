//! The MobileNetV3 students: parity with torchvision (a tiny config's logits in eval and
//! train mode, loss, gradients and BatchNorm updates; parameter counts and state-dict names
//! and shapes of the full-size models) and their randomness in training.

mod common;

use std::collections::HashMap;

use burn::module::Module;
use burn::store::KeyRemapper;
use burn::tensor::{Device, Distribution, Tensor};
use common::*;
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
}

#[test]
fn reference_parameter_counts() {
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("param_counts.json")).unwrap())
            .unwrap();
    let device = Device::flex();
    for name in ["mobilenet_v3_small", "mobilenet_v3_large"] {
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
    for name in ["mobilenet_v3_small"] {
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
