//! Parity with the PyTorch references: torchvision ResNet, CosineAnnealingLR, KD losses.

mod common;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use common::*;
use kd::losses::{Method, Step};
use kd::models::{ModelSpec, Network, Outputs, param_count, weights};
use kd::train::CosineSchedule;

fn tiny_resnet(device: &Device) -> Network {
    let spec = ModelSpec {
        name: "resnet18".into(),
        width: Some(8),
        stem: None,
    };
    let mut net = spec.build(12, 64, device).unwrap();
    weights::load_pytorch(&mut net, &fixture("resnet_tiny.safetensors")).unwrap();
    net
}

#[test]
fn resnet_tiny_matches_torchvision_in_eval_and_train_mode() {
    assert_eq!(param_count(&tiny_resnet(&Device::flex())), 177_492);
    let checked = check_fixture_parity("resnet_tiny.safetensors", tiny_resnet, |torch| {
        let name = torch
            .replace("downsample.0", "downsample.conv")
            .replace("downsample.1", "downsample.bn")
            .replace("bn2.weight", "bn2.gamma");
        (name, torch == "fc.weight")
    });
    assert_eq!(checked, 5, "all listed gradients checked");
}

#[test]
fn resnet_minimum_image_size_follows_the_stem() {
    let spec = |stem| ModelSpec {
        name: "resnet18".into(),
        width: Some(4),
        stem,
    };
    let err = spec(None).validate(28).unwrap_err().to_string();
    assert!(
        err.contains("imagenet stem")
            && err.contains("at least 32")
            && err.contains("--stem small"),
        "{err}"
    );
    assert!(spec(None).validate(32).is_ok());
    let small = spec(Some(kd::models::Stem::Small));
    let err = small.validate(7).unwrap_err().to_string();
    assert!(
        err.contains("small stem") && err.contains("at least 8"),
        "{err}"
    );

    // MNIST's own 28x28 and the 8x8 floor train: a forward and backward in train mode.
    let device = Device::flex().autodiff();
    for size in [8, 28] {
        small.validate(size).unwrap();
        let net = small.build(10, size, &device).unwrap();
        let x: Tensor<4> = Tensor::ones([2, 3, size, size], &device).require_grad();
        let logits = net.forward(x.clone(), &cx());
        assert_eq!(logits.dims(), [2, 10]);
        let grads = logits.sum().backward();
        assert!(x.grad(&grads).is_some(), "no input gradient at {size}");
    }
}

#[test]
fn reference_parameter_counts() {
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("param_counts.json")).unwrap())
            .unwrap();
    let device = Device::flex();
    for name in ["resnet18", "resnet34", "resnet50"] {
        let net = ModelSpec::named(name).build(12, 224, &device).unwrap();
        assert_eq!(
            param_count(&net) as u64,
            counts[format!("{name}_12")].as_u64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn cosine_schedule_matches_pytorch() {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cosine_lr_seed.json")).unwrap())
            .unwrap();
    let s = CosineSchedule {
        base_lr: fx["base_lr"].as_f64().unwrap(),
        t_max: fx["T_max"].as_u64().unwrap() as usize,
        eta_min: fx["eta_min"].as_f64().unwrap(),
    };
    let expected = fx["lr_used_in_epoch"].as_array().unwrap();
    assert_eq!(expected.len(), 50);
    for (epoch, e) in expected.iter().enumerate() {
        let e = e.as_f64().unwrap();
        let got = s.lr(epoch);
        assert!(
            (got - e).abs() <= 1e-9 * e.abs().max(1e-9) + 1e-15,
            "epoch {epoch}: {got} vs {e}"
        );
    }
}

fn logits_only(logits: Tensor<2>) -> Outputs {
    Outputs {
        logits,
        features: None,
    }
}

#[test]
fn kd_losses_match_pytorch_values_and_gradients() {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("kd_loss_vectors.json")).unwrap())
            .unwrap();
    let ad = Device::flex().autodiff();
    let cases = fx["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let b = case["batch"].as_u64().unwrap() as usize;
        let c = case["num_classes"].as_u64().unwrap() as usize;
        let flat = |k: &str| -> Vec<f32> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                })
                .collect()
        };
        let labels: Vec<i64> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        for (method, loss_key, grad_key) in [
            ("hinton", "loss_hinton", "grad_hinton"),
            ("tutorial", "loss_seed", "grad_seed"),
        ] {
            let cfg = Method::from_table(&serde_json::json!({
                "method": method,
                "temperature": case["T"].as_f64().unwrap(),
                "alpha": case["alpha"].as_f64().unwrap(),
            }))
            .unwrap();
            let s = Tensor::<2>::from_data(TensorData::new(flat("student_logits"), [b, c]), &ad)
                .require_grad();
            let t = Tensor::<2>::from_data(TensorData::new(flat("teacher_logits"), [b, c]), &ad);
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [b]), &ad);
            let (student, teacher) = (logits_only(s.clone()), logits_only(t));
            let parts = cfg.build(0.0).loss(&Step {
                student: &student,
                teacher: &teacher,
                targets: &y,
                epoch: 1,
                projection: None,
            });
            let total = values(parts.total.clone())[0];
            let expected = case[loss_key].as_f64().unwrap();
            let name = case["name"].as_str().unwrap();
            assert!(
                (total - expected).abs() <= 1e-5 * expected.abs().max(1e-6),
                "{name} {loss_key}: {total} vs {expected}"
            );
            let grads = parts.total.backward();
            let g = values(s.grad(&grads).unwrap());
            let eg: Vec<f64> = flat(grad_key).into_iter().map(f64::from).collect();
            let err = rel_err(&g, &eg);
            assert!(err < 1e-5, "{name} {grad_key} rel err {err}");
        }
    }
}

#[test]
fn pytorch_pth_state_dict_loads_and_a_pickled_module_is_refused_clearly() {
    // Written by `torch.save(state_dict)` from the same weights as resnet_tiny.safetensors.
    let fx = read_safetensors(&fixture("resnet_tiny.safetensors"));
    let device = Device::flex();
    let spec = ModelSpec {
        name: "resnet18".into(),
        width: Some(8),
        stem: None,
    };
    let mut net = spec.build(12, 64, &device).unwrap();
    weights::load_pytorch(&mut net, &fixture("resnet_tiny_state_dict.pth")).unwrap();
    let (x, _) = fixture_input(&fx, &device);
    let err = rel_err(
        &values(net.forward(x, &cx())),
        &fx["expected_logits_eval"].data,
    );
    assert!(err < 1e-4, "eval logits from .pth rel err {err}");

    // Fine-tuning on other classes: everything but the head `fc` is loaded, the head is
    // fresh. Another width does not fit, and the error names a weight and both shapes.
    let five = spec.build(5, 64, &device).unwrap();
    let mut tuned = five.clone();
    weights::load_pytorch(&mut tuned, &fixture("resnet_tiny.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let weights_of = |n: &Network, key: &str| {
        let file = dir.path().join("w.safetensors");
        std::fs::write(&file, weights::to_pytorch_safetensors(n).unwrap()).unwrap();
        read_safetensors(&file)[key].data.clone()
    };
    let reference = weights_of(&tiny_resnet(&device), "conv1.weight");
    assert_eq!(weights_of(&tuned, "conv1.weight"), reference, "body loaded");
    assert_eq!(
        weights_of(&tuned, "fc.weight"),
        weights_of(&five, "fc.weight"),
        "head left as initialised"
    );
    let mut wider = ModelSpec {
        width: Some(16),
        ..spec.clone()
    }
    .build(12, 64, &device)
    .unwrap();
    let msg = format!(
        "{:#}",
        weights::load_pytorch(&mut wider, &fixture("resnet_tiny.safetensors")).unwrap_err()
    );
    assert!(
        msg.contains("does not fit this model")
            && msg.contains("' is [")
            && msg.contains("] in this model"),
        "{msg}"
    );

    // A missing weight is named as the state dict names it (not Burn's `downsample.bn.gamma`).
    let gap = dir.path().join("gap.safetensors");
    let dropped = "layer2.0.downsample.1.weight";
    write_without(
        &fixture("resnet_tiny.safetensors"),
        &format!("model.{dropped}"),
        &gap,
    );
    let mut net = spec.build(12, 64, &device).unwrap();
    let msg = format!("{:#}", weights::load_pytorch(&mut net, &gap).unwrap_err());
    assert!(msg.contains(&format!("lacks weight '{dropped}'")), "{msg}");
    // A Linear weight that does not fit is shown in PyTorch's [out, in] layout.
    let narrow = dir.path().join("narrow.safetensors");
    rewrite(
        &fixture("resnet_tiny.safetensors"),
        "model.fc.weight",
        Some(&[12, 32]),
        &narrow,
    );
    let mut net = spec.build(12, 64, &device).unwrap();
    let msg = format!(
        "{:#}",
        weights::load_pytorch(&mut net, &narrow).unwrap_err()
    );
    assert!(
        msg.contains("'fc.weight' is [12, 32] there but [12, 64] in this model"),
        "{msg}"
    );

    // `torch.save(model)` pickles the whole module: refused with the fix.
    let mut net = spec.build(12, 64, &device).unwrap();
    let err = weights::load_pytorch(&mut net, &fixture("whole_tiny_module.pth")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("whole_tiny_module.pth") && msg.contains("state_dict"),
        "{msg}"
    );
}

/// Copies a safetensors file without tensor `key`, or with it replaced by zeros of
/// `zeros_shape` (f32); the others keep their bytes.
fn write_without(from: &std::path::Path, key: &str, to: &std::path::Path) {
    rewrite(from, key, None, to)
}

fn rewrite(from: &std::path::Path, key: &str, zeros_shape: Option<&[usize]>, to: &std::path::Path) {
    let bytes = std::fs::read(from).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert!(header.contains_key(key), "{key} not in {}", from.display());
    let body = &bytes[8 + n..];
    let mut entries: Vec<(String, serde_json::Value)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .collect();
    entries.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap());
    let (mut out_header, mut out_body) = (serde_json::Map::new(), Vec::new());
    for (k, mut v) in entries {
        let [a, b]: [usize; 2] = serde_json::from_value(v["data_offsets"].clone()).unwrap();
        let start = out_body.len();
        if k == key {
            let Some(shape) = zeros_shape else { continue };
            out_body.resize(start + 4 * shape.iter().product::<usize>(), 0);
            v["shape"] = serde_json::json!(shape);
            v["dtype"] = "F32".into();
        } else {
            out_body.extend_from_slice(&body[a..b]);
        }
        v["data_offsets"] = serde_json::json!([start, out_body.len()]);
        out_header.insert(k, v);
    }
    let header = serde_json::to_vec(&out_header).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(out_body);
    std::fs::write(to, file).unwrap();
}

/// The exported ONNX graph computes the tiny ResNet's logits, every BatchNorm folded.
#[test]
fn resnet_tiny_exports_to_onnx() {
    let net = tiny_resnet(&Device::flex());
    assert_eq!(check_onnx_round_trip(&net, 12, 64), 0, "all folded");
}

/// kd's inference plan (BatchNorm folded, convolutions fused with their residual and ReLU,
/// NHWC, Winograd) computes the tiny ResNet's logits, and a narrow ResNet-50's (bottlenecks,
/// 1x1 downsampling with stride 2, odd feature maps at 96 px) with non-trivial BatchNorm
/// statistics.
#[test]
fn inference_plan_matches_resnets() {
    let device = Device::flex();
    check_inference_plan(&tiny_resnet(&device), 64);
    let spec = ModelSpec {
        name: "resnet50".into(),
        width: Some(8),
        stem: None,
    };
    // A few training-mode forwards move the running statistics away from (0, 1).
    let net = spec.build(12, 96, &device.clone().autodiff()).unwrap();
    for _ in 0..3 {
        let x = Tensor::<4>::random([4, 3, 96, 96], Distribution::Normal(0.0, 1.0), &device);
        let _ = net.forward(x.autodiff(), &cx());
    }
    check_inference_plan(&net.valid(), 96);
}
