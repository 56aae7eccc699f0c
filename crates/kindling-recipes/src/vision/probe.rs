//! `kindling probe` on an exported vision encoder: the linear evaluation of SSL papers, run on
//! the export folder alone (its `config.json` says the shape and the preprocessing), beside the
//! same probe on a random encoder of that shape and on raw pixels.
//!
//! ```toml
//! task = "image-classification"
//! [model]
//! path = "runs/simclr-fashion-mnist/export"
//! [data]
//! train = { idx = { images = "...", labels = "..." } }
//! test = { idx = { images = "...", labels = "..." } }
//! [probe]
//! l2 = [1e-4, 1e-3, 1e-2]
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use kindling_data::{ImageSet, ImageSource, ViewPipeline};
use kindling_models::{Backbone, BackboneConfig, ResNetConfig, ViTConfig};

use super::{initial_encoder, linear_probe, pixel_rows, rows, ProbeScore, SslModel, VisionProbe};
use crate::recipe::parse_toml;
use crate::run::device;
use crate::RecipeError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionProbeRecipe {
    /// `image-classification`.
    pub task: String,
    #[serde(default)]
    pub device: crate::run::DeviceSetting,
    /// Seeds the random encoder of the comparison: the same seed as the pretraining run gives
    /// exactly the weights that run started from.
    #[serde(default = "crate::recipe::default_seed")]
    pub seed: u64,
    pub model: ProbeModel,
    pub data: ProbeData,
    #[serde(default)]
    pub probe: VisionProbe,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeModel {
    /// An export folder of a vision SSL run.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeData {
    pub train: ImageSource,
    pub test: ImageSource,
    /// Use only the first N images (0: all).
    #[serde(default)]
    pub max_train_images: usize,
    #[serde(default)]
    pub max_test_images: usize,
}

impl VisionProbeRecipe {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        parse_toml(&text, path, overrides)
    }
}

/// The encoder config and eval preprocessing of an export folder (a small-stem Kindling ResNet,
/// a standard-stem one as HF's `ResNetModel` folder, or a ViT as HF's `ViTModel` folder).
pub fn read_export(dir: &Path) -> Result<(BackboneConfig, ViewPipeline), RecipeError> {
    let path = dir.join("config.json");
    // Pointing at the wrong folder is the user's to fix: errors name the key and the file.
    let bad = |msg: String| RecipeError::Invalid {
        key: "model.path".into(),
        msg: format!("{}: {msg}", path.display()),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let model_type = v["model_type"].as_str().unwrap_or_default().to_string();
    if !["kindling-resnet", "vit", "resnet"].contains(&model_type.as_str()) {
        return Err(bad(format!(
            "model_type {} is not a Kindling vision encoder (\"kindling-resnet\", \"resnet\" \
             or \"vit\")",
            v["model_type"]
        )));
    }
    // Kindling's exports say their eval view; a folder transformers saved says it in its image
    // processor's config.
    let pre: ViewPipeline = match v.get_mut("preprocessing").map(serde_json::Value::take) {
        Some(p) if !p.is_null() => {
            serde_json::from_value(p).map_err(|e| bad(format!("preprocessing: {e}")))?
        }
        _ => processor_view(dir)?,
    };
    let obj = v.as_object_mut().expect("checked above: an object");
    for k in [
        "model_type",
        "layout",
        "preprocessing",
        "pretraining",
        "architectures",
    ] {
        obj.remove(k);
    }
    // HF's configs carry more (torch_dtype, ...): ignored, as HF does.
    let cfg = match model_type.as_str() {
        "vit" => {
            let c: ViTConfig = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
            BackboneConfig::ViT(c)
        }
        "resnet" => {
            BackboneConfig::ResNet(ResNetConfig::from_hf_json(&v).map_err(|e| bad(e.to_string()))?)
        }
        _ => {
            let c: ResNetConfig = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
            BackboneConfig::ResNet(c)
        }
    };
    cfg.validate()?;
    Ok((cfg, pre))
}

/// The eval view of an HF image processor (`preprocessor_config.json`, e.g. `ViTImageProcessor`):
/// pixels scaled by 1/255 (as Kindling loads them), resized to its square `size`, normalised
/// with its mean and std. Processors that resize by the shortest edge and crop (ConvNext's, HF's
/// ResNets') are refused: Kindling's eval view cannot express them exactly.
pub(super) fn processor_view(dir: &Path) -> Result<ViewPipeline, RecipeError> {
    use kindling_data::augment::{Normalize, Resize, Stage};
    let path = dir.join("preprocessor_config.json");
    let bad = |msg: String| RecipeError::Invalid {
        key: "model.path".into(),
        msg: format!("{}: {msg}", path.display()),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        bad(format!(
            "config.json has no `preprocessing` and the image processor's config cannot be read ({e})"
        ))
    })?;
    let p: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let flag = |k: &str| p[k].as_bool().unwrap_or(true);
    if flag("do_rescale") {
        let f = p["rescale_factor"].as_f64().unwrap_or(1.0 / 255.0);
        if (f * 255.0 - 1.0).abs() > 1e-6 {
            return Err(bad(format!("rescale_factor {f}: only 1/255 is supported")));
        }
    } else {
        return Err(bad(
            "do_rescale = false: Kindling's pixels are always scaled to 0..1".into(),
        ));
    }
    let mut stages = Vec::new();
    if flag("do_resize") {
        let (h, w) = (p["size"]["height"].as_u64(), p["size"]["width"].as_u64());
        match (h, w) {
            (Some(h), Some(w)) if h == w && h > 0 => {
                stages.push(Stage::Resize(Resize { size: h as usize }))
            }
            _ => {
                return Err(bad(format!(
                    "size {}: only a square {{height, width}} resize is supported (shortest-edge \
                     resizes with crops are not)",
                    p["size"]
                )))
            }
        }
    }
    if flag("do_normalize") {
        let floats = |k: &str| -> Option<Vec<f32>> {
            p[k].as_array()?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect()
        };
        match (floats("image_mean"), floats("image_std")) {
            (Some(mean), Some(std)) => stages.push(Stage::Normalize(Normalize { mean, std })),
            _ => {
                return Err(bad(
                    "do_normalize needs image_mean and image_std lists".into()
                ))
            }
        }
    }
    Ok(ViewPipeline { stages, count: 1 })
}

/// Loads the export's encoder (every tensor must be there with its shape).
pub fn load_encoder(dir: &Path, device: &Device) -> Result<(Backbone, ViewPipeline), RecipeError> {
    let (cfg, pre) = read_export(dir)?;
    let varmap = VarMap::new();
    let net = Backbone::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    copy_export(&varmap, "", dir, device)?;
    Ok((net, pre))
}

/// Copies the export's tensors into the variables named `prefix` + the export's name (`""` for
/// a bare encoder, `backbone.` inside a classifier); every one must be there with its shape.
pub(super) fn copy_export(
    varmap: &VarMap,
    prefix: &str,
    dir: &Path,
    device: &Device,
) -> Result<(), RecipeError> {
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, device)?;
    let data = varmap.data().lock().expect("varmap lock poisoned");
    for (name, var) in data.iter() {
        let Some(key) = name.strip_prefix(prefix) else {
            continue;
        };
        // A task folder transformers saved holds the encoder under its base model's prefix,
        // and a ViT classifier has no pooler (which no objective reads: it keeps its init).
        let found = [
            key.to_string(),
            format!("vit.{key}"),
            format!("resnet.{key}"),
        ]
        .into_iter()
        .find_map(|k| tensors.get(&k));
        let t = match found {
            Some(t) => t,
            None if key.starts_with("pooler.") => continue,
            None => {
                return Err(RecipeError::Run {
                    path: path.clone(),
                    msg: format!("no tensor `{key}`"),
                })
            }
        };
        // PyTorch's 0-dim `num_batches_tracked` for Kindling's one-element buffer.
        let t = if t.dims().is_empty() && var.dims() == [1] {
            &t.reshape(1)?
        } else {
            t
        };
        if t.dims() != var.dims() {
            return Err(RecipeError::Run {
                path: path.clone(),
                msg: format!(
                    "`{key}` has shape {:?}, the config wants {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// Runs the probe: the export's encoder, a random one of its shape, raw pixels.
pub fn probe(recipe: &VisionProbeRecipe) -> Result<Vec<ProbeScore>, RecipeError> {
    if recipe.task != "image-classification" {
        return Err(RecipeError::Invalid {
            key: "task".into(),
            msg: format!("expected \"image-classification\", got {:?}", recipe.task),
        });
    }
    let device = device(&recipe.device)?;
    let (net, pre) = load_encoder(&recipe.model.path, &device)?;
    let mut train = recipe.data.train.load()?;
    if recipe.data.max_train_images > 0 {
        train = train.truncate(recipe.data.max_train_images);
    }
    let mut test = recipe.data.test.load()?;
    if recipe.data.max_test_images > 0 {
        test = test.truncate(recipe.data.max_test_images);
    }
    let (tl, sl) = match (&train.labels, &test.labels) {
        (Some(a), Some(b)) => (a.clone(), b.clone()),
        _ => {
            return Err(RecipeError::Invalid {
                key: "data".into(),
                msg: "the probe needs labels for both the train and the test images".into(),
            })
        }
    };
    let classes = tl.iter().chain(&sl).max().map_or(0, |&m| m as usize + 1);
    let d = net.config().feature_dim();
    let feats = |n: &Backbone, set: &ImageSet| SslModel::features(n, set, &pre, 256, &device);
    let mut out = vec![linear_probe(
        &format!("encoder {}", recipe.model.path.display()),
        rows(feats(&net, &train)?, d),
        &tl,
        rows(feats(&net, &test)?, d),
        &sl,
        classes,
        &recipe.probe,
        &device,
    )?];
    if recipe.probe.compare_random {
        let random = initial_encoder(&net.config(), recipe.seed, &device)?;
        out.push(linear_probe(
            "random encoder (the initial weights of a run with this seed)",
            rows(feats(&random, &train)?, d),
            &tl,
            rows(feats(&random, &test)?, d),
            &sl,
            classes,
            &recipe.probe,
            &device,
        )?);
    }
    if recipe.probe.compare_pixels {
        out.push(linear_probe(
            "raw pixels",
            pixel_rows(&train, &pre)?,
            &tl,
            pixel_rows(&test, &pre)?,
            &sl,
            classes,
            &recipe.probe,
            &device,
        )?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindling_core::Mode;

    /// The export is the encoder: reloaded from the folder alone, it gives bit-identical features
    /// (BatchNorm statistics included, moved by a training step first).
    #[test]
    fn an_exported_encoder_reloads_with_identical_features() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/tiny/simclr-tiny.toml");
        let recipe = super::super::VisionRecipe::load(&path, &[]).unwrap();
        let device = Device::Cpu;
        let model = SslModel::build(&recipe, (20, 20, 1), 3, &device).unwrap();
        let images = |seed: u64| {
            use rand::Rng;
            let mut r = kindling_core::rng::rng(&[seed]);
            let v: Vec<f32> = (0..6 * 20 * 20)
                .map(|_| r.random_range(-1.0f32..1.0))
                .collect();
            candle_core::Tensor::from_vec(v, (6, 20, 20, 1), &device).unwrap()
        };
        model
            .backbone
            .forward_t(&images(1), Mode::Train { seed: 0 })
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        super::super::export(&recipe, &model, dir.path(), 1, &[]).unwrap();
        let (net, pre) = load_encoder(dir.path(), &device).unwrap();
        assert_eq!(pre, recipe.data.eval_view);
        let x = images(2);
        let a = model.backbone.forward_t(&x, Mode::Eval).unwrap();
        let b = net.forward_t(&x, Mode::Eval).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }
}
