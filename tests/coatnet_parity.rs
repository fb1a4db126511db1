//! Parity of the CoAtNet teachers with the reference PyTorch implementation: a tiny
//! config's logits (eval and train mode), loss and gradients; parameter counts and
//! state-dict names/shapes of the full-size models.

mod common;

use std::collections::HashMap;
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use common::*;
use kd::models::{CoAtNetConfig, ModelSpec, Network, param_count, weights};

/// The fixture's config: `coatnet_tiny.safetensors`.
fn tiny_config() -> CoAtNetConfig {
    CoAtNetConfig {
        num_blocks: [2, 2, 2, 2, 2],
        channels: [16, 16, 32, 64, 128],
        image_size: (64, 64),
        num_classes: 12,
        head_bias: true,
        heads: 8,
        dim_head: 32,
    }
}

fn tiny_coatnet(device: &Device) -> Network {
    let mut net = Network::CoAtNet(tiny_config().init(device));
    weights::load_pytorch(&mut net, &fixture("coatnet_tiny.safetensors")).unwrap();
    net
}

/// Key -> shape from a safetensors header.
fn safetensors_shapes(bytes: &[u8]) -> HashMap<String, (String, Vec<usize>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let dtype = v["dtype"].as_str().unwrap().to_string();
            let shape = serde_json::from_value(v["shape"].clone()).unwrap();
            (k.clone(), (dtype, shape))
        })
        .collect()
}

fn json_shapes(value: &serde_json::Value) -> HashMap<String, Vec<usize>> {
    value
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).unwrap()))
        .collect()
}

/// Compares exported key -> shape with the reference state dict, which also lists
/// BatchNorm's `num_batches_tracked` counters (not exported).
fn assert_same_keys(
    exported: &HashMap<String, (String, Vec<usize>)>,
    reference: &HashMap<String, Vec<usize>>,
) {
    let reference: HashMap<_, _> = reference
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .collect();
    let mut missing: Vec<_> = reference
        .keys()
        .filter(|k| !exported.contains_key(k.as_str()))
        .collect();
    missing.sort();
    let mut extra: Vec<_> = exported
        .keys()
        .filter(|k| !reference.contains_key(k))
        .collect();
    extra.sort();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (k, shape) in reference {
        assert_eq!(&exported[k].1, shape, "{k}");
        let want = if k.ends_with("relative_index") {
            "I64"
        } else {
            "F32"
        };
        assert_eq!(exported[k].0, want, "{k}");
    }
}

#[test]
fn coatnet_tiny_matches_reference_in_eval_and_train_mode() {
    assert_eq!(param_count(&tiny_coatnet(&Device::flex())), 608_252);
    // PyTorch name -> (kd name, Linear weight stored transposed in Burn).
    let names: HashMap<&str, (&str, bool)> = HashMap::from([
        ("fc.bias", ("fc.bias", false)),
        ("fc.weight", ("fc.weight", true)),
        ("s0.0.0.weight", ("s0.0.conv.weight", false)),
        (
            "s2.1.conv.fn.6.fc.0.weight",
            ("s2.1.se.reduce.weight", true),
        ),
        (
            "s3.0.attn.1.fn.relative_bias_table",
            ("s3.0.attn.relative_bias_table", false),
        ),
        (
            "s3.1.attn.1.fn.to_qkv.weight",
            ("s3.1.attn.to_qkv.weight", true),
        ),
    ]);
    let checked = check_fixture_parity("coatnet_tiny.safetensors", tiny_coatnet, |torch| {
        let (name, transposed) = names[torch];
        (name.to_string(), transposed)
    });
    assert_eq!(checked, names.len(), "all listed gradients checked");
}

#[test]
fn coatnet_tiny_exports_reference_names_and_round_trips() {
    let device = Device::flex();
    let net = tiny_coatnet(&device);
    let bytes = weights::to_pytorch_safetensors(&net).unwrap();
    // The same weights give the same bytes (checksums of exports hold).
    for _ in 0..4 {
        assert!(weights::to_pytorch_safetensors(&net).unwrap() == bytes);
    }
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("coatnet_tiny.keys.json")).unwrap())
            .unwrap();
    assert_same_keys(
        &safetensors_shapes(&bytes),
        &json_shapes(&keys["state_dict_shapes"]),
    );

    // kd computes relative_index itself: a fresh network's equals the reference's
    // buffer, value for value.
    let fx = read_safetensors(&fixture("coatnet_tiny.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let fresh = Network::CoAtNet(tiny_config().init(&device));
    let fresh_path = dir.path().join("fresh.safetensors");
    std::fs::write(
        &fresh_path,
        weights::to_pytorch_safetensors(&fresh).unwrap(),
    )
    .unwrap();
    let fresh = read_safetensors(&fresh_path);
    let mut compared = 0;
    for (k, t) in fresh.iter().filter(|(k, _)| k.ends_with("relative_index")) {
        let reference = &fx[&format!("model.{k}")];
        assert_eq!(t.shape, reference.shape, "{k}");
        assert_eq!(t.data, reference.data, "{k}");
        compared += 1;
    }
    assert_eq!(compared, 4);

    let path = dir.path().join("export.safetensors");
    std::fs::write(&path, &bytes).unwrap();

    // Loading the export gives the same network.
    let mut again = Network::CoAtNet(tiny_config().init(&device));
    weights::load_pytorch(&mut again, &path).unwrap();
    let (x, _) = fixture_input(&fx, &device);
    let a = values(net.forward(x.clone(), &cx()));
    let b = values(again.forward(x, &cx()));
    assert!(rel_err(&b, &a) < 1e-6);
}

#[test]
fn coatnet_reference_parameter_counts() {
    let t0 = Instant::now();
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("param_counts.json")).unwrap())
            .unwrap();
    let device = Device::flex();
    for v in 0..5 {
        let reference = CoAtNetConfig::variant(v).unwrap();
        let net = Network::CoAtNet(reference.init(&device));
        assert_eq!(
            param_count(&net) as u64,
            counts[format!("coatnet_{v}_1000")].as_u64().unwrap(),
            "coatnet_{v} 1000 classes"
        );
        // The tutorial's head: 12 classes with bias, via the model spec.
        let net = ModelSpec::named(&format!("coatnet_{v}"))
            .build(12, 224, &device)
            .unwrap();
        assert_eq!(
            param_count(&net) as u64,
            counts[format!("coatnet_{v}_seed12")].as_u64().unwrap(),
            "coatnet_{v} 12 classes"
        );
    }
    println!("param counts: {:.2?}", t0.elapsed());
}

#[test]
fn coatnet_2_exports_reference_state_dict_names_and_shapes() {
    let t0 = Instant::now();
    let device = Device::flex();
    let net = ModelSpec::named("coatnet_2")
        .build(12, 224, &device)
        .unwrap();
    let bytes = weights::to_pytorch_safetensors(&net).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("coatnet_2_seed12.keys.json")).unwrap(),
    )
    .unwrap();
    assert_same_keys(&safetensors_shapes(&bytes), &json_shapes(&reference));
    println!("coatnet_2 export: {:.2?}", t0.elapsed());
}

#[test]
fn coatnet_rejects_image_sizes_not_multiple_of_32() {
    let device = Device::flex();
    let spec = ModelSpec::named("coatnet_0");
    let err = spec.validate(100).unwrap_err().to_string();
    assert_eq!(err, "image size 100 is not a multiple of 32: use 96 or 128");
    let err = spec.build(12, 250, &device).err().unwrap().to_string();
    assert!(err.contains("use 224 or 256"), "{err}");
    let err = spec.validate(16).unwrap_err().to_string();
    assert!(err.contains("use 32"), "{err}");
    let err = tiny_config()
        .with_image_size(64, 80)
        .try_init(&device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("image width 80") && err.contains("use 64 or 96"),
        "{err}"
    );
    assert!(spec.validate(96).is_ok());

    // Non-square sizes follow the relative-position tables.
    let net = Network::CoAtNet(tiny_config().with_image_size(64, 96).init(&device));
    let x = Tensor::<4>::zeros([1, 3, 64, 96], &device);
    assert_eq!(net.forward(x, &cx()).dims(), [1, 12]);
}

#[test]
fn coatnet_width_override_and_stem_rejection() {
    let device = Device::flex();
    let spec = ModelSpec {
        name: "coatnet_0".into(),
        width: Some(8),
        stem: None,
    };
    let cfg = kd::models::coatnet::config(&spec, 3, 32).unwrap();
    assert_eq!(cfg.channels, [8, 8, 16, 32, 64]);
    let net = spec.build(3, 32, &device).unwrap();
    let x = Tensor::<4>::zeros([2, 3, 32, 32], &device);
    assert_eq!(net.forward(x, &cx()).dims(), [2, 3]);
    let spec = ModelSpec {
        stem: Some(kd::models::Stem::Small),
        ..spec
    };
    let err = spec.validate(64).unwrap_err().to_string();
    assert!(err.contains("ResNet models only"), "{err}");
}

#[test]
fn models_command_lists_coatnet_counts() {
    let out = kd_ok(&["models", "--classes", "12"]);
    for (name, count) in [("coatnet_0", "17030852"), ("coatnet_4", "202442812")] {
        assert!(out.contains(name) && out.contains(count), "{out}");
    }
}

#[test]
fn coatnet_checkpoint_bytes_round_trip() {
    let device = Device::flex();
    let net = tiny_coatnet(&device);
    let bytes = weights::to_bytes(&net).unwrap();
    let mut again = Network::CoAtNet(tiny_config().init(&device));
    weights::load_bytes(&mut again, bytes, std::path::Path::new("mem.bpk")).unwrap();
    let x = Tensor::<4>::ones([1, 3, 64, 64], &device);
    let err = rel_err(
        &values(again.forward(x.clone(), &cx())),
        &values(net.forward(x, &cx())),
    );
    assert!(err < 1e-6, "{err}");
}

#[test]
fn train_refuses_coatnet_image_size_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    mnist_subset(&data, 2, 3);
    let out = dir.path().join("run");
    let err = kd_err(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        "coatnet_0",
        "--image-size",
        "100",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("image size 100 is not a multiple of 32: use 96 or 128"),
        "{err}"
    );
    assert!(!out.exists(), "no output for a bad size");
}

/// The exported ONNX graph computes the tiny CoAtNet's logits, relative-position attention
/// included; only the MBConv blocks' pre-norms (which precede their convolution) stay
/// BatchNorm nodes.
#[test]
fn coatnet_tiny_exports_to_onnx() {
    let net = tiny_coatnet(&Device::flex());
    assert_eq!(
        check_onnx_round_trip(&net, 12, 64),
        4,
        "one per MBConv block"
    );
}

/// CoAtNet's attention is outside what the inference plan covers: it says which layer, and
/// `kd predict`'s inference keeps the network's forward for it.
#[test]
fn inference_plan_names_what_it_does_not_cover() {
    let device = Device::flex();
    let err = kd::infer::Plan::new(&tiny_coatnet(&device), 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not supported"), "{err}");
    let net = tiny_coatnet(&device);
    let (x, expected) = random_images_and_logits(&net, 2, 64);
    let mut inference = kd::infer::Inference::new(net, 64, &device, kd::ops::Precision::F32);
    assert!(!inference.uses_plan());
    let logits: Vec<f32> = values(inference.logits(x).unwrap())
        .into_iter()
        .map(|v| v as f32)
        .collect();
    assert_eq!(logits, expected, "the forward, unchanged");
}
