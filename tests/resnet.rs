//! ResNet exports other tools load, through the `kindling` binary: a standard-stem ResNet
//! (7x7 stride 2 and a max-pool, bottleneck blocks) exports as HF's `ResNetModel`, which
//! transformers loads with no missing or unexpected keys and Kindling's features; fine-tuned,
//! as `ResNetForImageClassification` with Kindling's logits; `kindling push` accepts it. The
//! small-image ResNet, which transformers cannot express, loads in torchvision's ResNet-18 by
//! the three lines of its model card.

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use kindling_core::Mode;

use crate::common::{kindling, python_reference, stderr};

/// `kindling pretrain` of the tiny SimCLR recipe into `runs/name` with `extra` settings.
fn pretrain(runs: &Path, name: &str, extra: &[&str]) -> Command {
    let mut cmd = kindling();
    cmd.args(["pretrain", "recipes/tiny/simclr-tiny.toml"]);
    cmd.args(["--set", &format!("runs_dir=\"{}\"", runs.display())]);
    cmd.args(["--set", &format!("name=\"{name}\"")]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd
}

/// Raw 8-bit 28x28 grey images and the export's preprocessing of them: (raw NHWC, pixels NHWC).
fn images(export: &Path, n: usize) -> (Tensor, Tensor) {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    let pre: kindling_data::ViewPipeline =
        serde_json::from_value(config["preprocessing"].clone()).unwrap();
    let raw: Vec<u8> = (0..n * 28 * 28).map(|i| ((i * 37) % 256) as u8).collect();
    let mut pixels = Vec::new();
    for im in raw.chunks(28 * 28) {
        let img = kindling_data::augment::Image::from_u8(im, 28, 28, 1);
        pixels.extend(pre.apply(img, &mut kindling_core::rng::rng(&[0])).data);
    }
    let dev = Device::Cpu;
    let raw = raw.iter().map(|&v| v as f32).collect::<Vec<_>>();
    (
        Tensor::from_vec(raw, (n, 28, 28, 1), &dev).unwrap(),
        Tensor::from_vec(pixels, (n, 28, 28, 1), &dev).unwrap(),
    )
}

/// Kindling's features of `pixels` (NHWC) with the export's encoder.
fn features(export: &Path, pixels: &Tensor) -> Tensor {
    let (encoder, _) = kindling_recipes::vision::probe::load_encoder(export, &Device::Cpu).unwrap();
    encoder.forward_t(pixels, Mode::Eval).unwrap()
}

fn nchw(t: &Tensor) -> serde_json::Value {
    crate::vit::nested(&t.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap())
}

fn config(export: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap()).unwrap()
}

#[test]
fn a_standard_stem_bottleneck_resnet_exports_as_hf_resnet_model_and_fine_tunes_to_hf_logits() {
    let runs = tempfile::tempdir().unwrap();
    let out = pretrain(
        runs.path(),
        "hf",
        &[
            "model.backbone.embedder_kernel_size=7",
            "model.backbone.embedder_stride=2",
            "model.backbone.embedder_max_pool=true",
            "model.backbone.layer_type=\"bottleneck\"",
            "model.backbone.embedding_size=8",
            "model.backbone.hidden_sizes=[16, 32]",
            "model.backbone.depths=[1, 2]",
            "train.steps=4",
            "export.license=\"apache-2.0\"",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let export = runs.path().join("hf/export");
    let c = config(&export);
    assert_eq!(c["model_type"], "resnet");
    assert_eq!(c["architectures"], serde_json::json!(["ResNetModel"]));
    assert_eq!(c["layer_type"], "bottleneck");
    assert!(export.join("preprocessor_config.json").is_file());

    let (raw, pixels) = images(&export, 3);
    let f = features(&export, &pixels);
    assert_eq!(f.dims(), &[3, 32]);
    let json = serde_json::json!({
        "pixel_values": nchw(&pixels),
        "features": crate::vit::nested(&f),
        "raw_pixels": crate::vit::nested(&raw),
    });
    let out_json = runs.path().join("features.json");
    std::fs::write(&out_json, json.to_string()).unwrap();
    if let Some(text) = python_reference(
        "hf_resnet_outputs.py",
        &["check".as_ref(), export.as_os_str(), out_json.as_os_str()],
    ) {
        assert!(text.contains("\"class\": \"ResNetModel\""), "{text}");
    }

    // `kindling push`'s checks accept the folder and the test Hub gets it.
    crate::vision::push_to_test_hub(&export, "kindling/resnet-tiny");

    // Fine-tuned: HF's ResNetForImageClassification with Kindling's logits.
    let out = kindling()
        .args(["finetune", "recipes/tiny/finetune-vit-tiny.toml"])
        .args(["--set", &format!("model.path=\"{}\"", export.display())])
        .args(["--set", &format!("runs_dir=\"{}\"", runs.path().display())])
        .args(["--set", "name=\"ft\""])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let ft = runs.path().join("ft/export");
    assert_eq!(
        config(&ft)["architectures"],
        serde_json::json!(["ResNetForImageClassification"])
    );
    let st = candle_core::safetensors::load(ft.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(st.contains_key("resnet.embedder.embedder.convolution.weight"));
    // Kindling's logits: the pretrained encoder's tensors as fine-tuned, then the classifier.
    let encoder_dir = runs.path().join("ft-encoder");
    std::fs::create_dir_all(&encoder_dir).unwrap();
    let encoder: Vec<(String, Tensor)> = st
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("resnet.")
                .map(|k| (k.to_string(), t.clone()))
        })
        .collect();
    kindling_models::export::save_safetensors(
        &encoder_dir.join("model.safetensors"),
        &encoder,
        &[],
    )
    .unwrap();
    std::fs::copy(export.join("config.json"), encoder_dir.join("config.json")).unwrap();
    let f = features(&encoder_dir, &pixels);
    let logits = f
        .matmul(&st["classifier.1.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&st["classifier.1.bias"])
        .unwrap();
    let json = serde_json::json!({
        "pixel_values": nchw(&pixels),
        "logits": crate::vit::nested(&logits),
    });
    std::fs::write(&out_json, json.to_string()).unwrap();
    if let Some(text) = python_reference(
        "hf_resnet_outputs.py",
        &["check".as_ref(), ft.as_os_str(), out_json.as_os_str()],
    ) {
        assert!(
            text.contains("\"class\": \"ResNetForImageClassification\""),
            "{text}"
        );
    }
}

/// The small-image stem at ResNet-18's shape (64-channel 3x3 stem, four stages of two basic
/// blocks, 64 to 512 channels): `torchvision.safetensors` and the card's Python lines load it
/// into torchvision's ResNet (strict `load_state_dict`), which gives Kindling's features.
#[test]
fn a_small_stem_resnet18_export_loads_in_torchvision_by_its_model_card() {
    let runs = tempfile::tempdir().unwrap();
    let out = pretrain(
        runs.path(),
        "r18",
        &[
            "model.backbone.embedding_size=64",
            "model.backbone.hidden_sizes=[64, 128, 256, 512]",
            "model.backbone.depths=[2, 2, 2, 2]",
            "model.backbone.downsample_in_first_stage=false",
            "data.max_train_images=64",
            "data.max_test_images=64",
            "train.batch_size=16",
            "train.steps=1",
            "train.eval_every=0",
            "train.save_every=0",
            "probe.enabled=false",
            "eval.knn_k=0",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let export = runs.path().join("r18/export");
    let c = config(&export);
    assert_eq!(c["model_type"], "kindling-resnet");
    assert_eq!(
        c["architectures"],
        serde_json::json!(["KindlingResNetModel"])
    );
    let card = std::fs::read_to_string(export.join("README.md")).unwrap();
    for line in [
        "m.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)",
        "m.maxpool = torch.nn.Identity()",
        "m.fc = torch.nn.Identity()",
    ] {
        assert!(card.contains(line), "{line} in\n{card}");
    }
    let tv = candle_core::safetensors::load(export.join("torchvision.safetensors"), &Device::Cpu)
        .unwrap();
    for k in [
        "conv1.weight",
        "bn1.running_var",
        "layer2.0.downsample.0.weight",
        "layer4.1.bn2.bias",
    ] {
        assert!(tv.contains_key(k), "{k}");
    }
    let (_, pixels) = images(&export, 2);
    let f = features(&export, &pixels);
    let json = serde_json::json!({
        "pixel_values": nchw(&pixels),
        "features": crate::vit::nested(&f),
    });
    let out_json = runs.path().join("features.json");
    std::fs::write(&out_json, json.to_string()).unwrap();
    if let Some(text) = python_reference(
        "hf_resnet_outputs.py",
        &["check".as_ref(), export.as_os_str(), out_json.as_os_str()],
    ) {
        assert!(text.contains("torchvision.models.resnet.ResNet"), "{text}");
    }
}
