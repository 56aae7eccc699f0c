//! The vision SSL family: `kindling pretrain recipes/<method>-fashion-mnist.toml` with
//! `objective` one of simclr, moco, byol, simsiam, barlow, vicreg.
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
use kindling_models::{Mlp, MlpConfig, ResNet, ResNetConfig};
use kindling_train::distributed::{gather_with_grad, Collective};
use kindling_train::{checkpoint, Objective, StepOutput, Trainer};

use crate::probe::{standardise, Logistic};
use crate::recipe::{parse_toml, ExportSection, TrainSection};
use crate::run::{device, first_loadable, group_trainer, load_checked, plan_run, standard_trainer};
use crate::{RecipeError, RunOptions, RunReport};
pub use monitors::{collapse_metrics, knn_accuracy};

/// The vision methods (the registry's [`crate::registry::Family::Vision`] entries).
pub fn objectives() -> Vec<&'static str> {
    crate::registry::names_of(crate::registry::Family::Vision)
}

/// A vision SSL recipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionRecipe {
    pub objective: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_runs_dir")]
    pub runs_dir: PathBuf,
    /// Fixes initialisation, data order and every augmentation.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: String,
    /// `"f32"`, or `"bf16"` on a GPU: the encoder computes in bf16 (f32 master weights,
    /// BatchNorm in f32); heads and losses stay in f32.
    #[serde(default = "default_precision")]
    pub precision: String,
    #[serde(default)]
    pub model: VisionModel,
    #[serde(default)]
    pub loss: LossConfig,
    pub data: VisionData,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub eval: VisionEval,
    #[serde(default)]
    pub probe: VisionProbe,
    #[serde(default)]
    pub export: ExportSection,
}

fn default_runs_dir() -> PathBuf {
    "runs".into()
}
fn default_device() -> String {
    "auto".into()
}
fn default_precision() -> String {
    "f32".into()
}

/// `[model]`: the encoder and the heads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct VisionModel {
    pub backbone: ResNetConfig,
    pub projector: MlpConfig,
    /// BYOL and SimSiam only.
    pub predictor: MlpConfig,
}

/// `[loss]`: each method reads the keys it needs (listed per key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// simclr, moco: softmax temperature.
    pub temperature: f64,
    /// moco: negatives kept.
    pub queue_size: usize,
    /// byol, moco: target momentum, raised from `ema_base` to `ema_final` on a cosine schedule.
    pub ema_base: f64,
    pub ema_final: f64,
    /// barlow: off-diagonal weight (default 1 / projector width) and overall scale.
    pub lambda: Option<f64>,
    pub scale: f64,
    /// vicreg: invariance, variance and covariance weights.
    pub sim_weight: f64,
    pub var_weight: f64,
    pub cov_weight: f64,
    /// byol, simsiam: train the predictor at the peak learning rate throughout (SimSiam's
    /// `fix_pred_lr`: the predictor keeps adapting to the representation while the encoder's
    /// rate decays).
    pub fix_predictor_lr: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            temperature: 0.2,
            queue_size: 4096,
            ema_base: 0.99,
            ema_final: 1.0,
            lambda: None,
            scale: 0.1,
            sim_weight: 25.0,
            var_weight: 25.0,
            cov_weight: 1.0,
            fix_predictor_lr: false,
        }
    }
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
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut r: VisionRecipe = parse_toml(&text, path, overrides)?;
        if r.name.is_none() {
            r.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        let methods = crate::registry::names_of(crate::registry::Family::Vision);
        if !methods.contains(&r.objective.as_str()) {
            return Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: "objective".into(),
                msg: format!("`{}` is not one of {}", r.objective, methods.join(", ")),
            });
        }
        if r.data.views.is_empty() || r.data.views.len() > 2 {
            return Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: "data.views".into(),
                msg: format!("give one or two view pipelines, got {}", r.data.views.len()),
            });
        }
        Ok(r)
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("run")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(self.name())
    }

    /// The two view pipelines (one given: both views use it).
    pub fn pipelines(&self) -> Vec<ViewPipeline> {
        let v = &self.data.views;
        vec![v[0].clone(), v.get(1).unwrap_or(&v[0]).clone()]
    }
}

/// What a method's loss sees: the online projections `z`, the predictions `p` (BYOL, SimSiam),
/// and the target network's projections `t` (BYOL, MoCo; detached), one per view.
pub struct Outputs {
    pub z: [Tensor; 2],
    pub p: Option<[Tensor; 2]>,
    pub t: Option<[Tensor; 2]>,
    pub train: bool,
    /// The data-parallel group, in training steps of a run over several ranks (losses that
    /// compare samples across the batch gather over it).
    pub group: Option<Arc<dyn Collective>>,
}

/// A method: its loss, and which parts of the model it needs.
pub trait SslLoss: Send + Sync {
    fn predictor(&self) -> bool {
        false
    }
    fn target(&self) -> bool {
        false
    }
    fn loss(&self, o: &Outputs) -> candle_core::Result<Tensor>;
    /// After each optimiser update (MoCo's enqueue).
    fn after_update(&self) -> candle_core::Result<()> {
        Ok(())
    }
}

/// Both views' projections over the whole data-parallel group, gathered with their gradient,
/// for losses made of batch statistics (Barlow Twins' cross-correlation, VICReg's variance and
/// covariance): every rank then computes the global batch's loss, each rank's rows receive the
/// sum of the ranks' (equal) gradients, and the trainer's average over ranks leaves exactly the
/// global batch's gradient. One process: the views as they are.
pub fn group_views(o: &Outputs) -> candle_core::Result<(Tensor, Tensor)> {
    match &o.group {
        Some(g) => Ok((
            gather_with_grad(&o.z[0], g.clone())?,
            gather_with_grad(&o.z[1], g.clone())?,
        )),
        None => Ok((o.z[0].clone(), o.z[1].clone())),
    }
}

/// Rows scaled to unit length.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// -cos(p, z), averaged over the batch (SimSiam's D).
pub fn negative_cosine(p: &Tensor, z: &Tensor) -> candle_core::Result<Tensor> {
    (l2_normalize(p)? * l2_normalize(z)?)?
        .sum(1)?
        .mean_all()?
        .neg()
}

fn build_loss(
    recipe: &VisionRecipe,
    proj_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Box<dyn SslLoss>> {
    let l = &recipe.loss;
    Ok(match recipe.objective.as_str() {
        "simclr" => Box::new(simclr::SimClr {
            temperature: l.temperature,
        }),
        "moco" => Box::new(moco::MoCo::new(l.temperature, l.queue_size, proj_dim, vb)?),
        "byol" => Box::new(byol::Byol),
        "simsiam" => Box::new(simsiam::SimSiam),
        "barlow" => Box::new(barlow::BarlowTwins {
            lambda: l.lambda.unwrap_or(1.0 / proj_dim as f64),
            scale: l.scale,
        }),
        "vicreg" => Box::new(vicreg::VicReg {
            sim_weight: l.sim_weight,
            var_weight: l.var_weight,
            cov_weight: l.cov_weight,
        }),
        other => candle_core::bail!("unknown vision objective {other}"),
    })
}

/// PyTorch's initialisation, seeded per parameter name (the same weights on any thread count
/// and whatever the creation order): convolutions Kaiming-normal (fan_out, ReLU), linear layers
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, BatchNorm 1 and 0, buffers at their
/// start values, MoCo's queue random unit rows.
pub fn seeded_init(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let data = varmap.data().lock().expect("varmap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let mut r = rng::rng(&[domain::INIT, seed, hash_str(name)]);
        let normal = |std: f32, r: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
            let d = Normal::new(0.0f32, std).expect("finite std");
            (0..n).map(|_| d.sample(r)).collect()
        };
        let v: Vec<f32> = if name.ends_with("running_var") {
            vec![1.0; n]
        } else if name.ends_with("running_mean") || name.ends_with("num_batches_tracked") {
            vec![0.0; n]
        } else if name.ends_with("normalization.weight") || name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with("normalization.bias") || name.ends_with("norm.bias") {
            vec![0.0; n]
        } else if name == "queue_ptr" {
            vec![0.0; n]
        } else if name == "queue" {
            let mut v = normal(1.0, &mut r);
            for row in v.chunks_mut(dims[1]) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|x| *x /= norm);
            }
            v
        } else if dims.len() == 4 {
            let fan_out = (dims[0] * dims[2] * dims[3]) as f32;
            normal((2.0 / fan_out).sqrt(), &mut r)
        } else {
            // Linear weight (out, in) or bias (out): fan_in is the weight's second dimension;
            // a bias uses its weight's.
            let fan_in = if dims.len() == 2 {
                dims[1]
            } else {
                let w = name.trim_end_matches("bias").to_string() + "weight";
                data.get(&w).map_or(n, |w| w.dims()[1])
            };
            let bound = 1.0 / (fan_in as f32).sqrt();
            use rand::Rng;
            (0..n).map(|_| r.random_range(-bound..bound)).collect()
        };
        var.set(&Tensor::from_vec(v, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The encoder a run with `seed` starts from (its weights are seeded by name, so they do not
/// depend on the heads built beside it): the random baseline of the probes.
pub fn initial_encoder(
    cfg: &ResNetConfig,
    seed: u64,
    device: &Device,
) -> Result<ResNet, RecipeError> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let net = ResNet::new(cfg, vb.pp("backbone"))?;
    seeded_init(&varmap, seed)?;
    Ok(net)
}

/// The kNN monitor's bank: training images seen through the eval view.
struct KnnBank {
    images: Arc<ImageSet>,
    pipeline: ViewPipeline,
}

/// The model of every method: encoder, projector, optional predictor and target network,
/// optional online probe, and the method's loss.
pub struct SslModel {
    pub varmap: VarMap,
    pub backbone: ResNet,
    projector: Mlp,
    predictor: Option<Mlp>,
    target: Option<(ResNet, Mlp)>,
    /// (online, target) pairs the EMA moves: parameters only; the target's BatchNorm buffers
    /// follow its own forward passes, as in BYOL's and MoCo's code.
    ema_pairs: Vec<(Var, Var)>,
    ema: (f64, f64),
    probe: Option<Linear>,
    loss: Box<dyn SslLoss>,
    device: Device,
    eval_cfg: VisionEval,
    knn: Option<KnnBank>,
    /// Clean-view features and labels of the current evaluation, for the kNN and collapse
    /// monitors in `finish_eval`.
    eval_features: Mutex<(Vec<f32>, Vec<u32>)>,
    flops_per_image: f64,
    /// Mixed precision: the encoder's compute dtype (`None`: f32).
    pub compute: Option<DType>,
    fix_predictor_lr: bool,
    /// The data-parallel group (`None`: one process).
    pub group: Option<Arc<dyn Collective>>,
}

impl SslModel {
    pub fn build(
        recipe: &VisionRecipe,
        in_shape: (usize, usize, usize),
        classes: usize,
        device: &Device,
    ) -> Result<Self, RecipeError> {
        let m = &recipe.model;
        let mut backbone_cfg = m.backbone.clone();
        backbone_cfg.num_channels = in_shape.2;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let backbone = ResNet::new(&backbone_cfg, vb.pp("backbone"))?;
        let feat = backbone_cfg.feature_dim();
        let projector = Mlp::new(feat, &m.projector, vb.pp("projector"))?;
        let proj_dim = *m.projector.dims.last().expect("validated by Mlp::new");
        let loss = build_loss(recipe, proj_dim, vb.clone())?;
        let predictor = if loss.predictor() {
            Some(Mlp::new(proj_dim, &m.predictor, vb.pp("predictor"))?)
        } else {
            None
        };
        let target = if loss.target() {
            let t = vb.pp("target");
            Some((
                ResNet::new(&backbone_cfg, t.pp("backbone"))?,
                Mlp::new(feat, &m.projector, t.pp("projector"))?,
            ))
        } else {
            None
        };
        let probe = if recipe.eval.online_probe && classes > 1 {
            Some(Linear::load(feat, classes, vb.pp("online_probe"))?)
        } else {
            None
        };
        seeded_init(&varmap, recipe.seed)?;
        // The target starts as a copy of the online network (parameters and buffers).
        let mut ema_pairs = Vec::new();
        if target.is_some() {
            let data = varmap.data().lock().expect("varmap lock poisoned");
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for name in names {
                if let Some(online) = name.strip_prefix("target.") {
                    let (src, var) = (&data[online], &data[name]);
                    var.set(src.as_tensor())?;
                    if !is_norm_buffer(name) {
                        ema_pairs.push((src.clone(), var.clone()));
                    }
                }
            }
        }
        let (h, w, _) = in_shape;
        let mut flops = backbone_cfg.forward_flops(h, w) + Mlp::forward_flops(feat, &m.projector);
        if predictor.is_some() {
            flops += Mlp::forward_flops(proj_dim, &m.predictor);
        }
        Ok(SslModel {
            varmap,
            backbone,
            projector,
            predictor,
            target,
            ema_pairs,
            ema: (recipe.loss.ema_base, recipe.loss.ema_final),
            probe,
            loss,
            device: device.clone(),
            eval_cfg: recipe.eval.clone(),
            knn: None,
            eval_features: Mutex::new((Vec::new(), Vec::new())),
            // Forward + backward (2x) for both views.
            flops_per_image: 3.0 * 2.0 * flops,
            compute: None,
            fix_predictor_lr: recipe.loss.fix_predictor_lr,
            group: None,
        })
    }

    /// A view's images on the device, in the encoder's compute dtype.
    fn images(&self, batch: &ViewBatch, view: usize) -> candle_core::Result<Tensor> {
        let (h, w, c) = batch.shapes[view];
        let x = Tensor::from_slice(&batch.views[view], (batch.n, h, w, c), &self.device)?;
        match self.compute {
            Some(d) => x.to_dtype(d),
            None => Ok(x),
        }
    }

    /// Encoder features in f32, whatever the encoder computes in: heads and losses run in f32.
    fn encode(&self, net: &ResNet, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        net.forward_t(x, mode)?.to_dtype(DType::F32)
    }

    /// Encoder features of clean images, eval mode, in batches.
    pub fn features(
        backbone: &ResNet,
        images: &ImageSet,
        pipeline: &ViewPipeline,
        batch: usize,
        device: &Device,
    ) -> Result<Vec<f32>, RecipeError> {
        let mut out = Vec::new();
        let idx: Vec<u32> = (0..images.len() as u32).collect();
        for chunk in idx.chunks(batch.max(1)) {
            let b = build_views(
                images,
                std::slice::from_ref(pipeline),
                chunk,
                0,
                0,
                Cursor::default(),
            )?;
            let (h, w, c) = b.shapes[0];
            let x = Tensor::from_slice(&b.views[0], (b.n, h, w, c), device)?;
            out.extend(
                backbone
                    .forward_t(&x, Mode::Eval)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }

    fn ema_momentum(&self, step: u64, total: u64) -> f64 {
        let (base, fin) = self.ema;
        let progress = step as f64 / total.max(1) as f64;
        fin - (fin - base) * ((std::f64::consts::PI * progress).cos() + 1.0) / 2.0
    }
}

impl Objective for SslModel {
    type Batch = ViewBatch;

    fn step(&self, batch: &ViewBatch, mode: Mode) -> candle_core::Result<StepOutput> {
        let x = [self.images(batch, 0)?, self.images(batch, 1)?];
        let f = [
            self.encode(&self.backbone, &x[0], mode)?,
            self.encode(&self.backbone, &x[1], mode)?,
        ];
        let z = [
            self.projector.forward_t(&f[0], mode)?,
            self.projector.forward_t(&f[1], mode)?,
        ];
        let p = match &self.predictor {
            Some(pred) => Some([pred.forward_t(&z[0], mode)?, pred.forward_t(&z[1], mode)?]),
            None => None,
        };
        let t = match &self.target {
            Some((tb, tp)) => {
                let mut out = Vec::new();
                for xi in &x {
                    out.push(
                        tp.forward_t(&self.encode(tb, xi, mode)?.detach(), mode)?
                            .detach(),
                    );
                }
                let [a, b]: [Tensor; 2] = out.try_into().expect("two views");
                Some([a, b])
            }
            None => None,
        };
        let outputs = Outputs {
            z,
            p,
            t,
            train: mode.is_train(),
            // Eval batches are the same on every rank: no gathering there.
            group: self.group.clone().filter(|_| mode.is_train()),
        };
        let ssl = self.loss.loss(&outputs)?;
        let mut metrics = BTreeMap::new();
        metrics.insert("ssl_loss".to_string(), ssl.to_scalar::<f32>()? as f64);
        let mut loss = ssl;
        if let (Some(probe), Some(labels)) = (&self.probe, &batch.labels) {
            // Eval: the clean view (the third) if the batch has one; training: the first view.
            let feats = if !mode.is_train() && batch.views.len() > 2 {
                self.encode(&self.backbone, &self.images(batch, 2)?, mode)?
            } else {
                f[0].clone()
            };
            let y = Tensor::from_slice(labels, labels.len(), &self.device)?;
            let logits = probe.forward(&feats.detach())?;
            let ce = candle_nn::loss::cross_entropy(&logits, &y)?;
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let acc = pred.iter().zip(labels).filter(|(a, b)| a == b).count() as f64
                / labels.len() as f64;
            metrics.insert("probe_accuracy".into(), acc);
            metrics.insert("probe_loss".into(), ce.to_scalar::<f32>()? as f64);
            if !mode.is_train() {
                let mut cache = self.eval_features.lock().expect("feature cache");
                cache.0.extend(feats.flatten_all()?.to_vec1::<f32>()?);
                cache.1.extend_from_slice(labels);
            }
            loss = (loss + ce)?;
        }
        Ok(StepOutput {
            loss,
            weight: batch.n as f64,
            units: batch.n,
            metrics,
        })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn trainable(&self, name: &str) -> bool {
        !name.starts_with("target.") && !name.starts_with("queue") && !is_norm_buffer(name)
    }

    fn fixed_lr(&self, name: &str) -> bool {
        self.fix_predictor_lr && name.starts_with("predictor.")
    }

    /// Biases and BatchNorm parameters: no weight decay and no LARS adaptation (solo-learn's
    /// `exclude_bias_n_norm`).
    fn no_decay(&self, name: &str) -> bool {
        name.ends_with("bias") || name.contains("normalization.") || name.contains("norm.")
    }

    fn train_flops(&self, batch: &ViewBatch) -> Option<f64> {
        Some(self.flops_per_image * batch.n as f64)
    }

    fn after_update(&self, step: u64, total: u64) -> candle_core::Result<()> {
        if !self.ema_pairs.is_empty() {
            let m = self.ema_momentum(step, total);
            for (online, target) in &self.ema_pairs {
                let next = ((target.as_tensor() * m)? + (online.as_tensor() * (1.0 - m))?)?;
                target.set(&next)?;
            }
        }
        self.loss.after_update()
    }

    fn finish_eval(&self, metrics: &mut BTreeMap<String, f64>) {
        let (feats, labels) = std::mem::take(&mut *self.eval_features.lock().expect("cache"));
        if labels.is_empty() {
            return;
        }
        let d = feats.len() / labels.len();
        let (std, rank) = collapse_metrics(&feats, d);
        metrics.insert("feature_std".into(), std);
        metrics.insert("effective_rank".into(), rank);
        if let (Some(bank), true) = (&self.knn, self.eval_cfg.knn_k > 0) {
            let bank_feats = Self::features(
                &self.backbone,
                &bank.images,
                &bank.pipeline,
                256,
                &self.device,
            );
            if let (Ok(bf), Some(bl)) = (bank_feats, bank.images.labels.as_ref()) {
                let acc = knn_accuracy(
                    &bf,
                    bl,
                    &feats,
                    &labels,
                    d,
                    self.eval_cfg.knn_k,
                    self.eval_cfg.knn_temperature,
                );
                metrics.insert("knn_accuracy".into(), acc);
            }
        }
    }
}

/// Evaluation batches of the test images: the two training views (for the held-out loss) and
/// the clean eval view, seeded apart from training.
fn eval_batches(
    set: &ImageSet,
    recipe: &VisionRecipe,
    batch_size: usize,
) -> Result<Vec<ViewBatch>, RecipeError> {
    let mut pipes = recipe.pipelines();
    pipes.push(recipe.data.eval_view.clone());
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    // Batches smaller than 2 would make BatchNorm's statistics degenerate.
    idx.chunks(batch_size.max(2))
        .filter(|c| c.len() >= 2)
        .map(|c| {
            build_views(
                set,
                &pipes,
                c,
                recipe.seed ^ 0x6576_616c,
                u64::MAX,
                Cursor::default(),
            )
            .map_err(RecipeError::from)
        })
        .collect()
}

/// Classes seen in the training and test labels (the online probe's width).
fn class_count(train: &ImageSet, test: Option<&ImageSet>) -> usize {
    train
        .labels
        .iter()
        .flatten()
        .chain(test.iter().flat_map(|t| t.labels.iter().flatten()))
        .max()
        .map_or(0, |&m| m as usize + 1)
}

fn load_images(src: &ImageSource, max: usize) -> Result<ImageSet, RecipeError> {
    let set = src.load()?;
    Ok(if max > 0 { set.truncate(max) } else { set })
}

/// A probe result: test accuracy and macro-F1 of logistic regression on frozen features.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeScore {
    pub what: String,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub l2: f64,
    pub dims: usize,
}

/// Logistic regression on (train, test) feature rows, L2 chosen on the last 10% of train.
pub fn linear_probe(
    what: &str,
    mut train: Vec<Vec<f32>>,
    train_labels: &[u32],
    mut test: Vec<Vec<f32>>,
    test_labels: &[u32],
    classes: usize,
    cfg: &VisionProbe,
    device: &Device,
) -> Result<ProbeScore, RecipeError> {
    let reference = train.clone();
    standardise(&reference, &mut [&mut train, &mut test]);
    let cut = train.len() - train.len() / 10;
    let to_matrix = |rows: &[Vec<f32>]| -> candle_core::Result<Tensor> {
        let d = rows.first().map_or(0, Vec::len);
        Tensor::from_vec(
            rows.iter().flatten().copied().collect(),
            (rows.len(), d),
            device,
        )
    };
    let (xa, xv) = (to_matrix(&train[..cut])?, to_matrix(&train[cut..])?);
    let ya = Tensor::from_slice(&train_labels[..cut], cut, device)?;
    let accuracy = |m: &Logistic, x: &Tensor, y: &[u32]| -> candle_core::Result<Vec<Vec<f64>>> {
        let pred = m.predict(x)?;
        let mut cm = vec![vec![0.0; classes]; classes];
        for (&t, &p) in y.iter().zip(&pred) {
            cm[t as usize][p as usize] += 1.0;
        }
        Ok(cm)
    };
    let mut best: Option<(f64, f64)> = None;
    for &l2 in &cfg.l2 {
        let m = Logistic::fit(&xa, &ya, classes, l2, cfg.steps, cfg.lr)?;
        let (acc, _) =
            crate::finetune::accuracy_and_macro_f1(&accuracy(&m, &xv, &train_labels[cut..])?);
        if best.is_none_or(|(a, _)| acc > a) {
            best = Some((acc, l2));
        }
    }
    let (_, l2) = best.ok_or_else(|| RecipeError::Invalid {
        key: "probe.l2".into(),
        msg: "empty: name at least one L2 strength".into(),
    })?;
    // Refit on all training rows with the chosen strength.
    let x = to_matrix(&train)?;
    let y = Tensor::from_slice(train_labels, train.len(), device)?;
    let m = Logistic::fit(&x, &y, classes, l2, cfg.steps, cfg.lr)?;
    let cm = accuracy(&m, &to_matrix(&test)?, test_labels)?;
    let (accuracy, macro_f1) = crate::finetune::accuracy_and_macro_f1(&cm);
    Ok(ProbeScore {
        what: what.into(),
        accuracy,
        macro_f1,
        l2,
        dims: x.dim(1)?,
    })
}

fn rows(flat: Vec<f32>, d: usize) -> Vec<Vec<f32>> {
    flat.chunks(d).map(<[f32]>::to_vec).collect()
}

/// Every image through `pipe` (normally just the normalisation), flattened: the raw-pixel
/// baseline of the probe.
fn pixel_rows(set: &ImageSet, pipe: &ViewPipeline) -> Result<Vec<Vec<f32>>, RecipeError> {
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    let b = build_views(
        set,
        std::slice::from_ref(pipe),
        &idx,
        0,
        0,
        Cursor::default(),
    )?;
    let (h, w, c) = b.shapes[0];
    Ok(rows(b.views[0].clone(), h * w * c))
}

/// The linear evaluation of a finished run: the trained encoder, a random one of the same shape
/// and seed, and raw pixels through the eval view.
fn final_probes(
    recipe: &VisionRecipe,
    model: &SslModel,
    train: &ImageSet,
    test: &ImageSet,
    device: &Device,
) -> Result<Vec<ProbeScore>, RecipeError> {
    let cfg = &recipe.probe;
    let (tl, sl) = match (&train.labels, &test.labels) {
        (Some(a), Some(b)) => (a.clone(), b.clone()),
        _ => return Ok(Vec::new()),
    };
    let classes = tl.iter().chain(&sl).max().map_or(0, |&m| m as usize + 1);
    let pipe = &recipe.data.eval_view;
    let d = model.backbone.config.feature_dim();
    let mut out = Vec::new();
    let feats = |b: &ResNet, set: &ImageSet| SslModel::features(b, set, pipe, 256, device);
    let t0 = Instant::now();
    out.push(linear_probe(
        "pretrained encoder",
        rows(feats(&model.backbone, train)?, d),
        &tl,
        rows(feats(&model.backbone, test)?, d),
        &sl,
        classes,
        cfg,
        device,
    )?);
    eprintln!(
        "probe: pretrained encoder {:.4} ({:.0}s)",
        out[0].accuracy,
        t0.elapsed().as_secs_f64()
    );
    if cfg.compare_random {
        let random = initial_encoder(&model.backbone.config, recipe.seed, device)?;
        out.push(linear_probe(
            "random encoder (the run's initial weights)",
            rows(feats(&random, train)?, d),
            &tl,
            rows(feats(&random, test)?, d),
            &sl,
            classes,
            cfg,
            device,
        )?);
    }
    if cfg.compare_pixels {
        out.push(linear_probe(
            "raw pixels",
            pixel_rows(train, pipe)?,
            &tl,
            pixel_rows(test, pipe)?,
            &sl,
            classes,
            cfg,
            device,
        )?);
    }
    Ok(out)
}

/// Writes the encoder: `model.safetensors` (HF ResNet names), `config.json` (the shape and the
/// eval preprocessing), and a model card.
fn export(
    recipe: &VisionRecipe,
    model: &SslModel,
    dir: &Path,
    steps: u64,
    probes: &[ProbeScore],
) -> Result<(), RecipeError> {
    std::fs::create_dir_all(dir).map_err(|e| RecipeError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let tensors: Vec<(String, Tensor)> = {
        let data = model.varmap.data().lock().expect("varmap lock poisoned");
        let mut v: Vec<(String, Tensor)> = data
            .iter()
            .filter_map(|(n, var)| {
                n.strip_prefix("backbone.")
                    .map(|k| (k.to_string(), var.as_tensor().clone()))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors.into_iter().collect(), &tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors")).map_err(|e| RecipeError::Io {
        path: dir.join("model.safetensors"),
        source: e,
    })?;
    let mut config = serde_json::to_value(&model.backbone.config).expect("config serialises");
    config["model_type"] = "kindling-resnet".into();
    config["layout"] = "channels_last".into();
    config["preprocessing"] = serde_json::to_value(&recipe.data.eval_view).expect("serialises");
    config["pretraining"] =
        serde_json::json!({"objective": recipe.objective, "steps": steps, "seed": recipe.seed});
    save_json(&dir.join("config.json"), &config)?;
    let mut card = format!(
        "---\nlibrary_name: kindling\ntags: [self-supervised, {}, image-feature-extraction]\n{}---\n\n# {}\n\n\
         A {} encoder ({:?} channels, {:?} blocks) pretrained with {} for {steps} steps by Kindling \
         (`kindling pretrain`). Weights use HF ResNet parameter names; activations are channels-last \
         and the stem is the small-image one (3x3, no max-pool), which `transformers`' ResNet cannot express.\n",
        recipe.objective,
        recipe.export.license.as_ref().map(|l| format!("license: {l}\n")).unwrap_or_default(),
        recipe.name(),
        model.backbone.config.architecture,
        model.backbone.config.hidden_sizes,
        model.backbone.config.depths,
        recipe.objective,
    );
    if !probes.is_empty() {
        card += "\n## Linear probe (frozen features, logistic regression)\n\n| features | test accuracy | macro-F1 |\n|---|---|---|\n";
        for p in probes {
            card += &format!("| {} | {:.4} | {:.4} |\n", p.what, p.accuracy, p.macro_f1);
        }
    }
    write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}

/// Rewrites a run's export from its newest valid checkpoint (`kindling export RUN_DIR`), without
/// the probe table.
pub fn export_from_checkpoint(
    recipe: &VisionRecipe,
    run_dir: &Path,
) -> Result<PathBuf, RecipeError> {
    let device = device(&recipe.device)?;
    let (ckpt, _) = checkpoint::newest_valid(run_dir);
    let ckpt = ckpt.ok_or_else(|| RecipeError::Resume {
        path: run_dir.to_path_buf(),
        msg: "no valid checkpoint (checkpoints/step-*/) to export".into(),
    })?;
    let train = load_images(&recipe.data.train, recipe.data.max_train_images)?;
    let test = match &recipe.data.test {
        Some(s) => Some(load_images(s, recipe.data.max_test_images)?),
        None => None,
    };
    // The online probe's width must match the checkpoint's: count classes as the run did.
    let classes = class_count(&train, test.as_ref());
    let model = SslModel::build(
        recipe,
        (train.height, train.width, train.channels),
        classes,
        &device,
    )?;
    let state = checkpoint::load(&ckpt, &model.varmap, None, &device)?;
    let dir = recipe
        .export
        .dir
        .clone()
        .unwrap_or_else(|| run_dir.join("export"));
    export(recipe, &model, &dir, state.step, &[])?;
    Ok(dir)
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

/// Runs a vision SSL recipe, in one process or as one rank of a data-parallel group (every
/// method: SimCLR gathers its negatives, Barlow Twins and VICReg both views ([`group_views`]),
/// MoCo enqueues the whole group's keys; BYOL's and SimSiam's losses are means of per-image
/// terms, so the ranks' mean is the global batch's).
pub fn pretrain(recipe: &VisionRecipe, opts: &RunOptions) -> Result<RunReport, RecipeError> {
    crate::recipe::check_name(recipe.name())?;
    recipe.train.validate(EVAL_METRICS)?;
    let device = crate::run::rank_device(&recipe.device, opts.dist.as_ref())?;
    let group = crate::run::join_group(opts, &device)?;
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let compute = crate::run::compute_dtype(&recipe.precision, &device)?;
    let train_set = Arc::new(load_images(
        &recipe.data.train,
        recipe.data.max_train_images,
    )?);
    let test_set = match &recipe.data.test {
        Some(s) => Some(load_images(s, recipe.data.max_test_images)?),
        None => None,
    };
    let classes = class_count(&train_set, test_set.as_ref());
    eprintln!(
        "data: {} training images {}x{}x{}{}, {} test images, {classes} classes",
        train_set.len(),
        train_set.height,
        train_set.width,
        train_set.channels,
        if train_set.labels.is_some() {
            " (labels feed only the monitors)"
        } else {
            ""
        },
        test_set.as_ref().map_or(0, ImageSet::len),
    );
    // Nothing in the run folder changes until the checkpoint is picked (run/folder.rs).
    let plan = plan_run(recipe.run_dir(), opts, rank)?;
    let run_dir = plan.dir.clone();
    let in_shape = (train_set.height, train_set.width, train_set.channels);
    let mut model = SslModel::build(recipe, in_shape, classes, &device)?;
    model.compute = compute;
    model.group = group.clone();
    let bank = if recipe.eval.knn_bank > 0 {
        (*train_set).clone().truncate(recipe.eval.knn_bank)
    } else {
        (*train_set).clone()
    };
    if bank.labels.is_some() {
        model.knn = Some(KnnBank {
            images: Arc::new(bank),
            pipeline: recipe.data.eval_view.clone(),
        });
    }
    let n_params: usize = {
        let data = model.varmap.data().lock().expect("varmap lock poisoned");
        data.iter()
            .filter(|(n, _)| model.trainable(n))
            .map(|(_, v)| v.elem_count())
            .sum()
    };
    eprintln!(
        "model: {} encoder {:?}x{:?} ({} features), {}: {:.2}M trainable parameters",
        recipe.model.backbone.architecture,
        recipe.model.backbone.hidden_sizes,
        recipe.model.backbone.depths,
        recipe.model.backbone.feature_dim(),
        recipe.objective,
        n_params as f64 / 1e6
    );
    let t = &recipe.train;
    let mut loader = ViewLoader::new(
        train_set.clone(),
        recipe.pipelines(),
        t.batch_size,
        recipe.seed,
    )?;
    if let Some(g) = &group {
        // Each rank augments only the batches it trains on.
        loader = loader.for_rank(g.rank(), g.world());
    }
    let per_epoch =
        loader.batches_per_epoch() as u64 / group.as_ref().map_or(1, |g| g.world()) as u64;
    let mut cfg = t.train_config(recipe.seed, per_epoch)?;
    cfg.loss_scale = crate::run::loss_scale(&recipe.precision);
    cfg.checkpoint_extras = vec![run_dir.join("recipe.toml")];
    let mut opt = Trainer::build_optimizer(&cfg.optimizer, &model)?;
    let images = train_set.len() as u64;
    let resumed = first_loadable(&plan.candidates, |dir| {
        load_checked(dir, &model.varmap, opt.as_mut(), &device, |c: &Cursor| {
            if c.position > images {
                return Err(format!("is past the end of the {images} training images"));
            }
            Ok(())
        })
    })?;
    let resume_from = resumed.as_ref().map(|(dir, _)| dir.clone());
    // Data parallel: rank 0 prepares the run folder and writes every file.
    let toml = toml::to_string_pretty(recipe).expect("recipe serialises");
    let _lock = plan.commit(&toml, opts, resume_from.is_some())?;
    let mut trainer = group_trainer(group.as_ref(), cfg.clone(), &run_dir, opts, |cfg| {
        standard_trainer(
            cfg,
            &run_dir,
            t.log_every,
            "img",
            &["knn_accuracy", "probe_accuracy", "feature_std"],
            resume_from.as_deref(),
            opts,
        )
    })?;
    let start = resumed.map(|(_, (state, cursor))| {
        loader.seek(cursor);
        state
    });
    let mut eval = match &test_set {
        Some(s) => eval_batches(s, recipe, t.eval_batch_size)?,
        None => Vec::new(),
    };
    if t.max_eval_batches > 0 {
        eval.truncate(t.max_eval_batches);
    }
    eprintln!(
        "train: {} steps of {} images ({per_epoch} per epoch), eval every {} steps on {} test images",
        cfg.steps,
        t.batch_size,
        cfg.eval_every,
        eval.iter().map(|b| b.n).sum::<usize>()
    );
    let summary = trainer.fit(&model, &mut loader, &eval, opt, start, &|b: &ViewBatch| {
        serde_json::to_value(b.cursor_after).expect("cursor serialises")
    })?;
    let export_dir = recipe
        .export
        .dir
        .clone()
        .unwrap_or_else(|| run_dir.join("export"));
    if summary.stop == kindling_train::StopReason::Interrupted || rank > 0 {
        // (Rank 0 probes and exports.)
        return Ok(RunReport {
            run_dir,
            export_dir,
            final_eval: summary.final_eval,
            baseline: None,
            steps: summary.steps,
            elapsed_secs: summary.elapsed_secs,
            stop: summary.stop,
        });
    }
    let probes = match (&test_set, recipe.probe.enabled) {
        (Some(test), true) => final_probes(recipe, &model, &train_set, test, &device)?,
        _ => Vec::new(),
    };
    if !probes.is_empty() {
        eprintln!("\nlinear probe on frozen features (test split):");
        eprintln!("  {:<44} {:>9} {:>9}", "features", "accuracy", "macro-F1");
        for p in &probes {
            eprintln!("  {:<44} {:>9.4} {:>9.4}", p.what, p.accuracy, p.macro_f1);
        }
        save_json(
            &run_dir.join("probe_results.json"),
            &serde_json::to_value(&probes).expect("serialises"),
        )?;
    }
    export(recipe, &model, &export_dir, summary.steps, &probes)?;
    eprintln!("export: {}", export_dir.display());
    Ok(RunReport {
        run_dir,
        export_dir,
        final_eval: summary.final_eval,
        baseline: probes
            .get(1)
            .map(|p| (format!("probe: {}", p.what), p.accuracy)),
        steps: summary.steps,
        elapsed_secs: summary.elapsed_secs,
        stop: summary.stop,
    })
}

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
            z: [z1.as_tensor().clone(), z2.as_tensor().clone()],
            p: None,
            t: Some([
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
mod method_tests {
    //! Every method on the tiny recipe's shapes: each trainable parameter gets a gradient; the
    //! target network, MoCo's queue and BatchNorm buffers get none and are left to their hooks.

    use super::*;

    fn tiny(objective: &str) -> VisionRecipe {
        let text = include_str!("../../../../recipes/tiny/simclr-tiny.toml");
        parse_toml(
            text,
            Path::new("simclr-tiny.toml"),
            &[
                format!("objective=\"{objective}\""),
                "model.predictor.dims=[16, 8]".into(),
                "loss.queue_size=32".into(),
            ],
        )
        .unwrap()
    }

    fn batch(n: usize, seed: u64) -> ViewBatch {
        use rand::Rng;
        let mut r = rng::rng(&[seed]);
        let mut view = || {
            (0..n * 20 * 20)
                .map(|_| r.random_range(-1.0f32..1.0))
                .collect()
        };
        ViewBatch {
            n,
            shapes: vec![(20, 20, 1); 2],
            views: vec![view(), view()],
            labels: Some((0..n as u32).map(|i| i % 3).collect()),
            cursor_after: Cursor::default(),
        }
    }

    #[test]
    fn every_method_trains_every_parameter_and_only_those() {
        for objective in &objectives() {
            let recipe = tiny(objective);
            let model = SslModel::build(&recipe, (28, 28, 1), 3, &Device::Cpu).unwrap();
            let out = model.step(&batch(8, 1), Mode::Train { seed: 1 }).unwrap();
            let loss = out.loss.to_scalar::<f32>().unwrap();
            assert!(loss.is_finite(), "{objective}: loss {loss}");
            let grads = out.loss.backward().unwrap();
            let data = model.varmap.data().lock().unwrap();
            let mut trained = 0;
            for (name, var) in data.iter() {
                let g = grads.get(var.as_tensor());
                if model.trainable(name) {
                    let g = g.unwrap_or_else(|| panic!("{objective}: {name} gets no gradient"));
                    let norm = g
                        .abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(norm > 0.0, "{objective}: {name} gets a zero gradient");
                    trained += 1;
                } else {
                    assert!(g.is_none(), "{objective}: state {name} gets a gradient");
                }
            }
            assert!(trained > 20, "{objective}: {trained} parameters");
            let has_target = data.keys().any(|k| k.starts_with("target."));
            assert_eq!(
                has_target,
                ["byol", "moco"].contains(objective),
                "{objective}"
            );
            assert_eq!(data.contains_key("queue"), *objective == "moco");
            assert_eq!(
                data.keys().any(|k| k.starts_with("predictor.")),
                ["byol", "simsiam"].contains(objective)
            );
        }
    }

    #[test]
    fn the_target_starts_as_the_online_network_and_follows_it_by_ema() {
        let model = SslModel::build(&tiny("byol"), (28, 28, 1), 3, &Device::Cpu).unwrap();
        let get = |n: &str| {
            model.varmap.data().lock().unwrap()[n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let w = "backbone.embedder.embedder.convolution.weight";
        let tw = "target.backbone.embedder.embedder.convolution.weight";
        assert_eq!(get(w), get(tw));
        let (online, target) = model
            .ema_pairs
            .iter()
            .find(|(o, _)| {
                o.as_tensor().id() == model.varmap.data().lock().unwrap()[w].as_tensor().id()
            })
            .map(|(o, t)| (o.clone(), t.clone()))
            .unwrap();
        online.set(&(online.as_tensor() + 1.0).unwrap()).unwrap();
        let before = get(tw);
        // Step 0 of 10: momentum is ema_base = 0.99.
        model.after_update(0, 10).unwrap();
        let after = target
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in after.iter().zip(&before) {
            assert!((a - (b + 0.01)).abs() < 1e-5, "{a} vs {b} + 0.01");
        }
        assert!((model.ema_momentum(10, 10) - 1.0).abs() < 1e-12);
        assert!((model.ema_momentum(5, 10) - 0.995).abs() < 1e-12);
    }
}
