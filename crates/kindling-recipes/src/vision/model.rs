//! The SSL model: seeded PyTorch-style initialisation, the encoder, projector and predictor heads, the method's loss, the kNN and collapse monitors, and its training step.

#[allow(unused_imports)]
use super::*;

/// PyTorch's initialisation, seeded per parameter name (the same weights on any thread count
/// and whatever the creation order): convolutions Kaiming-normal (fan_out, ReLU), linear layers
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, BatchNorm 1 and 0, buffers at their
/// start values (DINO's centre and update count 0), MoCo's queue random unit rows.
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
        } else if name == "queue_ptr" || dino::Dino::is_state(name) {
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
                data.get(&w)
                    .and_then(|w| w.dims().get(1).copied())
                    .unwrap_or(n)
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
    cfg: &BackboneConfig,
    seed: u64,
    device: &Device,
) -> Result<Backbone, RecipeError> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let net = Backbone::new(cfg, vb.pp("backbone"))?;
    init_encoder(&varmap, cfg, seed)?;
    Ok(net)
}

/// The whole model's PyTorch-style initialisation ([`seeded_init`]), then, for a ViT, HF's ViT
/// initialisation of the encoder (truncated normals; a target copies it) and MAE's decoder.
pub(super) fn init_encoder(
    varmap: &VarMap,
    cfg: &BackboneConfig,
    seed: u64,
) -> Result<(), RecipeError> {
    seeded_init(varmap, seed)?;
    if let BackboneConfig::ViT(c) = cfg {
        // MAE's decoder (`decoder.`) is ViT blocks too, initialised the same way.
        for prefix in ["backbone.", "decoder."] {
            kindling_models::vit::init_under(varmap, prefix, seed, c)?;
        }
    }
    Ok(())
}

/// The size the encoder sees: `eval_view`'s output for the data's images. A ViT learns its
/// positions for that grid; training views of other sizes (DINO's local crops) read them
/// resized, so their sides must be multiples of `patch_size`; MAE masks patches of that grid,
/// so its view must give eval_view's size.
fn view_shape(
    recipe: &VisionRecipe,
    (h, w, c): (usize, usize, usize),
) -> Result<(usize, usize, usize), RecipeError> {
    let invalid = |key: &str, msg: String| RecipeError::Invalid {
        key: key.into(),
        msg,
    };
    let eval = recipe
        .data
        .eval_view
        .output_shape(h, w, c)
        .map_err(|e| invalid("data.eval_view", e.to_string()))?;
    if let BackboneConfig::ViT(vit) = &recipe.model.backbone {
        let p = vit.patch_size;
        for (i, pipe) in recipe.pipelines().iter().enumerate() {
            let s = pipe
                .output_shape(h, w, c)
                .map_err(|e| invalid("data.views", e.to_string()))?;
            let mae = recipe.loss.mae().is_some();
            if mae && (s.0, s.1) != (eval.0, eval.1) {
                return Err(invalid(
                    "data.views",
                    format!(
                        "the view gives {}x{} images and eval_view {}x{}: MAE masks the \
                         patches of the ViT's one grid, so its view must give eval_view's \
                         size (e.g. random_resized_crop size = {})",
                        s.0, s.1, eval.0, eval.1, eval.0
                    ),
                ));
            }
            if s.0 % p != 0 || s.1 % p != 0 {
                return Err(invalid(
                    "data.views",
                    format!(
                        "view {} gives {}x{} images: a ViT backbone needs sides that are \
                         multiples of its patch_size ({p})",
                        i + 1,
                        s.0,
                        s.1
                    ),
                ));
            }
        }
    }
    Ok(eval)
}

/// Biases, norm parameters and a ViT's positions and `[CLS]`: no weight decay and no LARS
/// adaptation (solo-learn's `exclude_bias_n_norm`; timm's ViTs skip the last two too).
pub(super) fn no_decay(name: &str) -> bool {
    name.ends_with("bias")
        || name.contains("normalization.")
        || name.contains("norm.")
        || name.contains("norm_before.")
        || name.contains("norm_after.")
        || name.ends_with("position_embeddings")
        || name.ends_with("cls_token")
}

/// The kNN monitor's bank: training images seen through the eval view.
pub(super) struct KnnBank {
    pub(super) images: Arc<ImageSet>,
    pub(super) pipeline: ViewPipeline,
}

/// What the encoder's features go through: the two-view methods' heads and loss, or MAE's
/// decoder.
pub(super) enum Heads {
    TwoView {
        projector: Mlp,
        predictor: Option<Mlp>,
        target: Option<(Backbone, Mlp)>,
        loss: Box<dyn SslLoss>,
    },
    Mae(mae::MaeHead),
}

/// The model of every method: encoder, the method's heads (projector, optional predictor and
/// target network and the loss, or MAE's decoder), optional online probe.
pub struct SslModel {
    pub varmap: VarMap,
    pub backbone: Backbone,
    pub(super) heads: Heads,
    /// Training views per image (the eval batches add a clean one after them).
    pub(super) train_views: usize,
    /// (online, target) pairs the EMA moves: parameters only; the target's BatchNorm buffers
    /// follow its own forward passes, as in BYOL's and MoCo's code.
    pub(super) ema_pairs: Vec<(Var, Var)>,
    pub(super) ema: (f64, f64),
    pub(super) probe: Option<Linear>,
    pub(super) device: Device,
    pub(super) eval_cfg: VisionEval,
    pub(super) knn: Option<KnnBank>,
    /// Clean-view features and labels of the current evaluation, for the kNN and collapse
    /// monitors in `finish_eval`.
    pub(super) eval_features: Mutex<(Vec<f32>, Vec<u32>)>,
    pub(super) flops_per_image: f64,
    /// The side of the images the encoder sees in evaluation (`eval_view`'s output).
    pub image_side: usize,
    /// Mixed precision: the encoder's compute dtype (`None`: f32).
    pub compute: Option<DType>,
    pub(super) fix_predictor_lr: bool,
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
        let eval_shape = view_shape(recipe, in_shape)?;
        let backbone_cfg = m
            .backbone
            .for_input(eval_shape, recipe.header.kernels)
            .map_err(|e| RecipeError::Invalid {
                key: "model.backbone".into(),
                msg: e.to_string(),
            })?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let backbone = Backbone::new(&backbone_cfg, vb.pp("backbone"))?;
        let feat = backbone_cfg.feature_dim();
        let (h, w, c) = in_shape;
        let encoder_flops = backbone_cfg.forward_flops(h, w);
        // Each training view at its own size (multi-crop's local views cost less).
        let view_flops: Vec<f64> = recipe
            .pipelines()
            .iter()
            .map(|p| {
                let (vh, vw, _) = p.output_shape(h, w, c).unwrap_or((h, w, c));
                backbone_cfg.forward_flops(vh, vw)
            })
            .collect();
        let (heads, head_flops) = match (recipe.loss.mae(), &backbone_cfg) {
            (Some(settings), BackboneConfig::ViT(vit)) => {
                let head = mae::MaeHead::new(vit, settings, vb.pp("decoder")).map_err(|e| {
                    RecipeError::Invalid {
                        key: "loss".into(),
                        msg: e.to_string(),
                    }
                })?;
                // The encoder at the visible patches: the head counts it.
                let flops = head.forward_flops(vit) - encoder_flops;
                (Heads::Mae(head), flops)
            }
            (Some(_), _) => {
                return Err(RecipeError::Invalid {
                    key: "model.backbone.architecture".into(),
                    msg: "MAE masks patches: it needs architecture = \"vit\"".into(),
                })
            }
            (None, _) => {
                let projector = Mlp::new(feat, &m.projector, vb.pp("projector"))?;
                let proj_dim = *m.projector.dims.last().expect("validated by Mlp::new");
                let loss = recipe
                    .loss
                    .build(proj_dim, vb.clone())?
                    .expect("a two-view method has a loss");
                let predictor = if loss.predictor() {
                    Some(Mlp::new(proj_dim, &m.predictor, vb.pp("predictor"))?)
                } else {
                    None
                };
                let target = if loss.target() {
                    let t = vb.pp("target");
                    Some((
                        Backbone::new(&backbone_cfg, t.pp("backbone"))?,
                        Mlp::new(feat, &m.projector, t.pp("projector"))?,
                    ))
                } else {
                    None
                };
                let mut flops = Mlp::forward_flops(feat, &m.projector);
                if predictor.is_some() {
                    flops += Mlp::forward_flops(proj_dim, &m.predictor);
                }
                let heads = Heads::TwoView {
                    projector,
                    predictor,
                    target,
                    loss,
                };
                (heads, flops)
            }
        };
        let probe = if recipe.eval.online_probe && classes > 1 {
            Some(Linear::load(feat, classes, vb.pp("online_probe"))?)
        } else {
            None
        };
        init_encoder(&varmap, &backbone_cfg, recipe.header.seed)?;
        // The target starts as a copy of the online network (parameters and buffers).
        let mut ema_pairs = Vec::new();
        if matches!(
            &heads,
            Heads::TwoView {
                target: Some(_),
                ..
            }
        ) {
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
        let train_views = recipe.pipelines().len();
        Ok(SslModel {
            varmap,
            backbone,
            heads,
            train_views,
            ema_pairs,
            ema: recipe.loss.ema(),
            probe,
            device: device.clone(),
            eval_cfg: recipe.eval.clone(),
            knn: None,
            eval_features: Mutex::new((Vec::new(), Vec::new())),
            // Forward + backward (2x) for each view.
            flops_per_image: 3.0 * view_flops.iter().map(|f| f + head_flops).sum::<f64>(),
            image_side: eval_shape.0,
            compute: None,
            fix_predictor_lr: recipe.loss.fix_predictor_lr(),
            group: None,
        })
    }

    /// A view's images on the device, in the encoder's compute dtype.
    pub(super) fn images(&self, batch: &ViewBatch, view: usize) -> candle_core::Result<Tensor> {
        let (h, w, c) = batch.shapes[view];
        let x = Tensor::from_slice(&batch.views[view], (batch.n, h, w, c), &self.device)?;
        match self.compute {
            Some(d) => x.to_dtype(d),
            None => Ok(x),
        }
    }

    /// Encoder features in f32, whatever the encoder computes in: heads and losses run in f32.
    pub(super) fn encode(
        &self,
        net: &Backbone,
        x: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        net.forward_t(x, mode)?.to_dtype(DType::F32)
    }

    /// Encoder features of clean images, eval mode, in batches.
    pub fn features(
        backbone: &Backbone,
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

    pub(super) fn ema_momentum(&self, step: u64, total: u64) -> f64 {
        let (base, fin) = self.ema;
        let progress = step as f64 / total.max(1) as f64;
        fin - (fin - base) * ((std::f64::consts::PI * progress).cos() + 1.0) / 2.0
    }
}

impl Objective for SslModel {
    type Batch = ViewBatch;

    fn step(&self, batch: &ViewBatch, mode: Mode) -> candle_core::Result<StepOutput> {
        // The method's loss, and the features of the first view the online probe trains on.
        let (ssl, f0) = match &self.heads {
            Heads::TwoView {
                projector,
                predictor,
                target,
                loss,
            } => {
                // Each view through the encoder on its own: views may differ in size
                // (multi-crop), and BatchNorm's statistics stay per view, as two-view
                // methods have always computed them.
                let x = (0..self.train_views)
                    .map(|v| self.images(batch, v))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let f = x
                    .iter()
                    .map(|xi| self.encode(&self.backbone, xi, mode))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let z = f
                    .iter()
                    .map(|fi| projector.forward_t(fi, mode))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let p = match predictor {
                    Some(pred) => Some(
                        z.iter()
                            .map(|zi| pred.forward_t(zi, mode))
                            .collect::<candle_core::Result<Vec<_>>>()?,
                    ),
                    None => None,
                };
                let t = match target {
                    Some((tb, tp)) => {
                        let seen = loss.target_views().unwrap_or(x.len()).min(x.len());
                        let mut out = Vec::with_capacity(seen);
                        for xi in &x[..seen] {
                            out.push(
                                tp.forward_t(&self.encode(tb, xi, mode)?.detach(), mode)?
                                    .detach(),
                            );
                        }
                        Some(out)
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
                let f0 = f.into_iter().next().expect("at least one view");
                (loss.loss(&outputs)?, f0)
            }
            // In training the probe reads `[CLS]` over the visible patches (a full pass more
            // would cost more than the masked step); evaluation reads the clean view's.
            Heads::Mae(head) => {
                let (loss, cls) = head.loss(&self.backbone, &self.images(batch, 0)?, mode)?;
                (loss, cls.to_dtype(DType::F32)?)
            }
        };
        let mut metrics = BTreeMap::new();
        metrics.insert("ssl_loss".to_string(), ssl.to_scalar::<f32>()? as f64);
        let mut loss = ssl;
        if let (Some(probe), Some(labels)) = (&self.probe, &batch.labels) {
            // Eval: the clean view (after the training views) if the batch has one; training:
            // the first view.
            let feats = if !mode.is_train() && batch.views.len() > self.train_views {
                self.encode(&self.backbone, &self.images(batch, self.train_views)?, mode)?
            } else {
                f0
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

    /// Not the target (moved by the EMA), the loss's state (MoCo's queue, DINO's centre),
    /// BatchNorm's buffers or a ViT's pooler
    /// (exported for transformers' `ViTModel`, read by no objective).
    fn trainable(&self, name: &str) -> bool {
        let state = match &self.heads {
            Heads::TwoView { loss, .. } => loss.is_state(name),
            Heads::Mae(_) => false,
        };
        !name.starts_with("target.")
            && !state
            && !is_norm_buffer(name)
            && !name.starts_with("backbone.pooler.")
    }

    fn fixed_lr(&self, name: &str) -> bool {
        self.fix_predictor_lr && name.starts_with("predictor.")
    }

    fn no_decay(&self, name: &str) -> bool {
        no_decay(name)
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
        match &self.heads {
            Heads::TwoView { loss, .. } => loss.after_update(),
            Heads::Mae(_) => Ok(()),
        }
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
