//! The vision SSL family: `kindling pretrain recipes/<method>-fashion-mnist.toml` with
//! `objective` one of simclr, moco, byol, simsiam, barlow, vicreg, mae, dino.
//!
//! ```text
//! images (IDX / folder / CSV) -> two augmented views per image (seeded, rayon)
//!   -> ResNet/CNN encoder -> projector [-> predictor] ; [momentum/EMA target network]
//!   -> the method's loss (one file each) -> trainer (AdamW / SGD / LARS, schedule, checkpoints)
//!   -> eval: online linear probe, kNN monitor, collapse monitor on the labelled test split
//!   -> export (encoder weights + config) -> linear probe vs random encoder vs raw pixels
//! ```
//!
//! Every method shares this module's model wrapper; a method is only its loss (and whether it
//! needs a predictor or a target network).

pub mod barlow;
pub mod byol;
pub mod dino;
pub mod finetune;
pub mod mae;
pub mod moco;
pub mod monitors;
pub mod probe;
pub mod simclr;
pub mod simsiam;
pub mod vicreg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use kindling_core::rng::{self, domain, hash_str};
use kindling_core::Mode;
use kindling_data::augment::build_views;
use kindling_data::loader::Cursor;
use kindling_data::{ImageSet, ImageSource, ViewBatch, ViewLoader, ViewPipeline};
use kindling_models::conv::is_norm_buffer;
use kindling_models::export::{save_json, write_atomic};
use kindling_models::nn::Linear;
use kindling_models::{Backbone, BackboneConfig, Mlp, MlpConfig};
use kindling_train::distributed::{gather_with_grad, Collective};
use kindling_train::{checkpoint, FitSummary, Objective, StepOutput};

use crate::probe::{standardise, Logistic};
use crate::recipe::{parse_recipe_document, parse_toml, Header};
use crate::run::{cursor_within, device, drive, Context, Experiment, Loader, Prepared, RunOf};
use crate::{RecipeError, RunOptions, RunReport};
pub use experiment::*;
pub use monitors::{collapse_metrics, knn_accuracy};

mod experiment;
mod export;
mod losses;
mod model;
mod probes;

pub use export::*;
pub use losses::*;
pub use model::*;
pub use probes::*;

/// The vision methods (the registry's [`crate::registry::Family::Vision`] entries).
pub fn objectives() -> Vec<&'static str> {
    crate::registry::names_of(crate::registry::Family::Vision)
}

/// A vision SSL recipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionRecipe {
    pub objective: String,
    /// The shared header (name, runs_dir, seed, device, precision, kernels, `[train]`,
    /// `[export]`). The seed fixes initialisation, data order and every augmentation; `bf16`
    /// (GPUs) runs the encoder in bf16 (f32 master weights, BatchNorm in f32), heads and losses
    /// in f32; `kernels = "fused"` trains the ResNet on CPU f32 as one autograd node.
    pub header: Header,
    #[serde(default)]
    pub model: VisionModel,
    /// `[loss]`, read by [`VisionRecipe::load`] into the `objective`'s own settings.
    #[serde(skip_deserializing)]
    pub loss: LossConfig,
    pub data: VisionData,
    #[serde(default)]
    pub eval: VisionEval,
    #[serde(default)]
    pub probe: VisionProbe,
}

/// `[model]`: the encoder and the heads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct VisionModel {
    pub backbone: BackboneConfig,
    pub projector: MlpConfig,
    /// BYOL and SimSiam only.
    pub predictor: MlpConfig,
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionData {
    /// The images pretraining sees (labels, if any, only feed the monitors).
    pub train: ImageSource,
    /// Labelled held-out images for the monitors and the probe.
    #[serde(default)]
    pub test: Option<ImageSource>,
    /// One pipeline per view; one pipeline given means both views use it.
    pub views: Vec<ViewPipeline>,
    /// What the encoder sees in evaluation, probing and export (normalisation, a resize).
    #[serde(default)]
    pub eval_view: ViewPipeline,
    /// Use only the first N training / test images (0: all).
    #[serde(default)]
    pub max_train_images: usize,
    #[serde(default)]
    pub max_test_images: usize,
}

/// `[eval]`: the monitors run at every evaluation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VisionEval {
    /// Train a linear classifier on detached features alongside (solo-learn's online probe).
    pub online_probe: bool,
    /// kNN monitor: neighbours and the temperature of their similarity-weighted vote (Wu et
    /// al., 2018); 0 neighbours turns it off.
    pub knn_k: usize,
    pub knn_temperature: f64,
    /// Training images in the kNN bank (0: all).
    pub knn_bank: usize,
}

impl Default for VisionEval {
    fn default() -> Self {
        VisionEval {
            online_probe: true,
            knn_k: 20,
            knn_temperature: 0.07,
            knn_bank: 0,
        }
    }
}

/// `[probe]`: the linear evaluation after training (frozen encoder, logistic regression),
/// beside the same probe on a randomly initialised encoder and on raw pixels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VisionProbe {
    pub enabled: bool,
    /// L2 strengths tried, chosen on the last 10% of the training images.
    pub l2: Vec<f64>,
    pub steps: usize,
    pub lr: f64,
    pub compare_random: bool,
    pub compare_pixels: bool,
}

impl Default for VisionProbe {
    fn default() -> Self {
        VisionProbe {
            enabled: true,
            l2: vec![1e-4, 1e-3, 1e-2],
            steps: 300,
            lr: 0.05,
            compare_random: true,
            compare_pixels: true,
        }
    }
}

impl VisionRecipe {
    /// The resolved recipe as saved in the run folder: `[loss]` holds the method's own keys.
    pub fn to_toml(&self) -> String {
        crate::recipe::recipe_toml(self)
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut doc: toml::Table = parse_toml(&text, path, overrides)?;
        let loss = match doc.remove("loss") {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                return Err(RecipeError::Key {
                    path: path.to_path_buf(),
                    key: "loss".into(),
                    msg: format!("expected a table, got {}", other.type_str()),
                })
            }
        };
        let mut r: VisionRecipe = parse_recipe_document(doc, path)?;
        crate::recipe::name_from_file(&mut r.header, path);
        let methods = crate::registry::names_of(crate::registry::Family::Vision);
        if !methods.contains(&r.objective.as_str()) {
            return Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: "objective".into(),
                msg: format!("`{}` is not one of {}", r.objective, methods.join(", ")),
            });
        }
        r.loss = LossConfig::from_table(&r.objective, loss, path)?;
        r.check_views(path)?;
        Ok(r)
    }

    pub fn name(&self) -> &str {
        self.header.name()
    }

    /// The training views of each image, each pipeline `count` times in order: two for the
    /// two-view methods (one pipeline given: both views use it), MAE's one, or DINO's global
    /// crops then local crops.
    pub fn pipelines(&self) -> Vec<ViewPipeline> {
        let mut out: Vec<ViewPipeline> = self
            .data
            .views
            .iter()
            .flat_map(|p| {
                let one = ViewPipeline {
                    count: 1,
                    ..p.clone()
                };
                std::iter::repeat_n(one, p.count)
            })
            .collect();
        if out.len() == 1 && self.loss.mae().is_none() && self.loss.dino().is_none() {
            out.push(out[0].clone());
        }
        out
    }

    /// `[[data.views]]` against the objective: each `count` at least 1; MAE one view, the
    /// two-view methods two, DINO its `global_views` and at least one view more.
    fn check_views(&self, path: &Path) -> Result<(), RecipeError> {
        let key = |key: &str, msg: String| RecipeError::Key {
            path: path.to_path_buf(),
            key: key.into(),
            msg,
        };
        if let Some(i) = self.data.views.iter().position(|p| p.count == 0) {
            return Err(key(
                "data.views.count",
                format!("view pipeline {} has count = 0: give at least 1", i + 1),
            ));
        }
        if self.data.eval_view.count != 1 {
            return Err(key(
                "data.eval_view.count",
                "the eval view is one view of each image: leave count out".into(),
            ));
        }
        let total: usize = self.data.views.iter().map(|p| p.count).sum();
        if total > 64 {
            return Err(key(
                "data.views",
                format!("at most 64 views of each image, got {total}"),
            ));
        }
        if let Some(d) = self.loss.dino() {
            if total < 2 || d.global_views > total {
                return Err(key(
                    "data.views",
                    format!(
                        "DINO compares views: give its {} global views (loss.global_views) \
                         first and any local views after them; the pipelines give {total} \
                         view(s) of each image{}",
                        d.global_views,
                        if total < 2 { ", at least 2 needed" } else { "" }
                    ),
                ));
            }
        } else if self.loss.mae().is_some() {
            if total != 1 {
                return Err(key(
                    "data.views",
                    format!("MAE sees one view of each image: give one pipeline, got {total}"),
                ));
            }
            if !matches!(self.model.backbone, BackboneConfig::ViT(_)) {
                return Err(key(
                    "model.backbone.architecture",
                    "MAE masks patches: it needs architecture = \"vit\"".into(),
                ));
            }
        } else if total > 2 || self.data.views.is_empty() {
            return Err(key(
                "data.views",
                format!(
                    "{} compares two views: give one or two view pipelines of one view \
                     each, got {total} views (multi-crop is DINO's: objective = \"dino\")",
                    self.objective
                ),
            ));
        }
        Ok(())
    }
}

/// The eval metrics of a vision run (`train.monitor.metric` names one).
pub const EVAL_METRICS: &[&str] = &[
    "loss",
    "ssl_loss",
    "probe_accuracy",
    "probe_loss",
    "feature_std",
    "effective_rank",
    "knn_accuracy",
];

/// Test support: a two-view loss over in-process ranks against the same loss on the global batch.
#[cfg(test)]
pub(crate) mod group_test {
    use super::*;
    use kindling_train::distributed::LocalGroup;

    /// `loss` over `world` ranks of `n` images with `d`-dimensional projections (each rank's
    /// loss seeing the group through `Outputs::group`), against `loss` on all `world * n`
    /// images in one process: the mean of the ranks' losses, and each rank's projections'
    /// gradients divided by the world size (the trainer's average), to 1e-5.
    pub(crate) fn assert_group_loss_is_global(
        loss: &(dyn Fn(&Outputs) -> candle_core::Result<Tensor> + Sync),
        (world, n, d): (usize, usize, usize),
    ) {
        let values = |seed: u64| -> Vec<f32> {
            (0..world * n * d)
                .map(|i| ((i as u64 * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let (a, b) = (values(1), values(2));
        // A target network's projections, for the methods that read them: detached, as
        // theirs are.
        let outputs = |z1: &Var, z2: &Var, group| Outputs {
            z: vec![z1.as_tensor().clone(), z2.as_tensor().clone()],
            p: None,
            t: Some(vec![
                z1.as_tensor().affine(0.7, 0.1).unwrap().detach(),
                z2.as_tensor().affine(0.7, -0.1).unwrap().detach(),
            ]),
            train: true,
            group,
        };
        let var = |v: &[f32], rows| Var::from_vec(v.to_vec(), (rows, d), &Device::Cpu).unwrap();
        let (g1, g2) = (var(&a, world * n), var(&b, world * n));
        let single = loss(&outputs(&g1, &g2, None)).unwrap();
        let want = single.to_scalar::<f32>().unwrap();
        let grads = single.backward().unwrap();
        let want1 = grads.get(g1.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let ranks: Vec<(f32, Vec<Vec<f32>>)> = LocalGroup::run(world, |g| {
            let (a, b) = (&a, &b);

            let r = g.rank();
            let part = |v: &[f32]| var(&v[r * n * d..(r + 1) * n * d], n);
            let (z1, z2) = (part(a), part(b));
            let l = loss(&outputs(&z1, &z2, Some(g.clone()))).unwrap();
            let grads = l.backward().unwrap();
            let mean = g.all_reduce_sum(&l).unwrap().to_scalar::<f32>().unwrap() / world as f32;
            let g1 = (grads.get(z1.as_tensor()).unwrap() / world as f64).unwrap();
            (mean, g1.to_vec2::<f32>().unwrap())
        });
        for (r, (l, g1)) in ranks.iter().enumerate() {
            assert!(
                (l - want).abs() < 1e-5 * want.abs().max(1.0),
                "rank {r}: loss {l} vs {want}"
            );
            for (i, row) in g1.iter().enumerate() {
                for (x, y) in row.iter().zip(&want1[r * n + i]) {
                    let tol = 1e-5 * y.abs().max(1e-2);
                    assert!((x - y).abs() < tol, "rank {r} row {i}: gradient {x} vs {y}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
