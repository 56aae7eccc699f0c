//! ViT with HF's names, both ways: a Kindling ViT's folder loads in transformers as `ViTModel`
//! with no missing or unexpected keys and the same outputs, and a folder transformers saved
//! (`ViTForImageClassification`, its encoder under `vit.`) loads in Kindling with the same
//! last hidden states.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use kindling_core::Mode;
use kindling_models::vit::{self, ViTConfig, ViTModel};

use crate::common::python_reference;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kindling-vit-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `t` as nested JSON arrays (what the reference scripts read as tensors).
pub(crate) fn nested(t: &Tensor) -> serde_json::Value {
    let dims = t.dims().to_vec();
    let flat = t.flat();
    fn build(v: &[f32], dims: &[usize]) -> serde_json::Value {
        match dims {
            [] => serde_json::json!(v[0]),
            [_] => serde_json::json!(v),
            [n, rest @ ..] => {
                let step = v.len() / n;
                serde_json::Value::Array(v.chunks(step).map(|c| build(c, rest)).collect())
            }
        }
    }
    build(&flat, &dims)
}

/// A tensor's values, flat.
trait Flat {
    fn flat(&self) -> Vec<f32>;
}

impl Flat for Tensor {
    fn flat(&self) -> Vec<f32> {
        self.flatten_all().unwrap().to_vec1().unwrap()
    }
}

fn flat_f32(v: &serde_json::Value, out: &mut Vec<f32>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| flat_f32(x, out)),
        x => out.push(x.as_f64().unwrap() as f32),
    }
}

/// A seeded ViT (3 channels, 8x8 images of 4x4 patches, two layers) saved as `ViTModel`: it
/// loads in transformers as that class with no missing or unexpected keys (the pooler
/// included), and its last hidden states and pooler output equal Kindling's to 1e-4.
#[test]
fn a_vit_folder_loads_in_transformers_as_vit_model_with_the_same_outputs() {
    let cfg: ViTConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "image_size": 8, "patch_size": 4, "num_channels": 3,
        "initializer_range": 0.2,
    }))
    .unwrap();
    let varmap = VarMap::new();
    let model = ViTModel::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    vit::init(&varmap, 7, &cfg).unwrap();
    let dir = scratch("export");
    vit::save_folder(&dir, &varmap, "", &cfg).unwrap();

    // Fixed pixel values in [0, 1).
    let pixels: Vec<f32> = (0..2 * 8 * 8 * 3)
        .map(|i| ((i * 37) % 101) as f32 / 101.0)
        .collect();
    let nhwc = Tensor::from_vec(pixels, (2, 8, 8, 3), &Device::Cpu).unwrap();
    let hidden = model
        .forward_t(&nhwc, Mode::Eval)
        .unwrap()
        .reshape((2, cfg.seq_len(), 32))
        .unwrap();
    let features = model.features(&nhwc, Mode::Eval).unwrap();
    let pooled = model.pooler_output(&features).unwrap();
    let out = dir.join("kindling-outputs.json");
    let json = serde_json::json!({
        "pixel_values": nested(&nhwc.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()),
        "last_hidden_state": nested(&hidden),
        "pooler_output": nested(&pooled),
    });
    std::fs::write(&out, json.to_string()).unwrap();
    if let Some(text) = python_reference(
        "hf_vit_outputs.py",
        &["check".as_ref(), dir.as_os_str(), out.as_os_str()],
    ) {
        assert!(text.contains("\"class\": \"ViTModel\""), "{text}");
    }
}

/// transformers' `ViTForImageClassification`, saved by tests/reference/hf_vit_outputs.py,
/// loads in Kindling: every encoder tensor found under `vit.` (the classifier left over; the
/// pooler, which that class has not, missing, as transformers reports it too), and the last
/// hidden states equal transformers' to 1e-4 on the same images, and on images of other sizes
/// (4x4, 12x12, 8x12: fewer, more and non-square patches) with its `interpolate_pos_encoding`.
#[test]
fn a_folder_transformers_saved_loads_with_its_outputs() {
    let dir = scratch("import");
    let out = dir.join("hf-outputs.json");
    let Some(_) = python_reference(
        "hf_vit_outputs.py",
        &[
            "make".as_ref(),
            dir.join("model").as_os_str(),
            out.as_os_str(),
        ],
    ) else {
        return;
    };
    let imported = vit::load_folder(&dir.join("model"), &Device::Cpu).unwrap();
    assert_eq!(
        imported.report.missing,
        ["pooler.dense.bias", "pooler.dense.weight"]
    );
    assert_eq!(
        imported.report.unused,
        ["classifier.bias", "classifier.weight"]
    );
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let mut pixels = Vec::new();
    flat_f32(&reference["pixel_values"], &mut pixels);
    let nchw = Tensor::from_vec(pixels, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let nhwc = nchw.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    let ours: Vec<f32> = imported.model.forward_t(&nhwc, Mode::Eval).unwrap().flat();
    assert_close(&ours, &reference["last_hidden_state"], "8x8");

    // As a source for `kindling probe` / `finetune`: the eval view is the folder's image
    // processor (resize to 8, its mean and std), and the encoder is the same (under `vit.`, the
    // pooler, absent, at its init).
    let model_dir = dir.join("model");
    let (_, view) = kindling_recipes::vision::probe::read_export(&model_dir).unwrap();
    let want: kindling_data::ViewPipeline = serde_json::from_value(serde_json::json!({"stages": [
        {"kind": "resize", "size": 8},
        {"kind": "normalize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    ]}))
    .unwrap();
    assert_eq!(view, want);
    let (encoder, _) =
        kindling_recipes::vision::probe::load_encoder(&model_dir, &Device::Cpu).unwrap();
    let theirs: Vec<f32> = encoder.forward_t(&nhwc, Mode::Eval).unwrap().flat();
    let cls: Vec<f32> = imported.model.features(&nhwc, Mode::Eval).unwrap().flat();
    assert_eq!(theirs, cls, "the probe's encoder is the imported one");

    // Images of other sizes: positions resized as transformers' `interpolate_pos_encoding`.
    let resized = reference["interpolated"].as_array().unwrap();
    assert_eq!(resized.len(), 3);
    for case in resized {
        let mut pixels = Vec::new();
        flat_f32(&case["pixel_values"], &mut pixels);
        let dims: Vec<usize> = [2usize, 3]
            .into_iter()
            .chain(
                [&case["pixel_values"][0][0], &case["pixel_values"][0][0][0]]
                    .map(|v| v.as_array().unwrap().len()),
            )
            .collect();
        let nchw = Tensor::from_vec(pixels, dims.as_slice(), &Device::Cpu).unwrap();
        let nhwc = nchw.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        let ours: Vec<f32> = imported.model.forward_t(&nhwc, Mode::Eval).unwrap().flat();
        let size = format!("{}x{}", dims[2], dims[3]);
        assert_close(&ours, &case["last_hidden_state"], &size);
    }
}

/// `ours` equals the reference's nested `theirs` to 1e-4.
fn assert_close(ours: &[f32], theirs: &serde_json::Value, what: &str) {
    let mut flat = Vec::new();
    flat_f32(theirs, &mut flat);
    assert_eq!(ours.len(), flat.len(), "{what}: sizes");
    let diff = ours
        .iter()
        .zip(&flat)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4, "{what}: last hidden states differ by {diff}");
}
