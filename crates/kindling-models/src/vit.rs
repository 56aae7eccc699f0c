//! The Vision Transformer (Dosovitskiy et al., 2021, <https://arxiv.org/abs/2010.11929>),
//! trainable, with the parameter names of HF `transformers`' `modeling_vit.py`, so
//! `model.safetensors` moves both ways and an export loads as `ViTModel`.
//!
//! Images are split into `patch_size` squares, each projected to `hidden_size` (HF's stride-p
//! convolution, computed here as the product it equals: the patches flattened in (channel, row,
//! column) order times the kernel flattened the same way), a learned `[CLS]` vector is put in
//! front, learned positions are added, and pre-norm encoder blocks (LayerNorm, attention,
//! residual; LayerNorm, GELU MLP, residual) end in a final LayerNorm. Images come in as
//! Kindling's vision models take them, (batch, height, width, channels).
//!
//! The blocks compose the crate's fused ops (linear with bias, LayerNorm, self-attention, GELU,
//! seeded dropout), each its own autograd node; the text encoders' one-node layers are
//! post-norm (BERT) or rotary with GeGLU (ModernBERT), neither ViT's block.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::import::KeyReport;
use crate::nn::{Dropout, LayerNorm, Linear};
use crate::ops::Kernels;
use crate::{ModelError, Result};
use kindling_core::Mode;

fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_init() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-12
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    16
}
fn d_channels() -> usize {
    3
}
fn d_true() -> bool {
    true
}
fn d_model_type() -> String {
    "vit".into()
}

/// HF `ViTConfig`: the fields of `config.json` (unknown ones are ignored, as HF does). Defaults
/// are ViT-B/16's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViTConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    /// Only "gelu" (exact) is supported.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// The side of the square images the position table is for.
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default = "d_patch")]
    pub encoder_stride: usize,
    #[serde(default = "d_model_type")]
    pub model_type: String,
    /// The kernel path every op takes (see [`crate::bert::BertConfig::kernels`]).
    #[serde(skip)]
    pub kernels: Kernels,
}

impl Default for ViTConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl ViTConfig {
    pub fn validate(&self) -> Result<()> {
        let field = |field: &'static str, msg: String| Err(ModelError::Setting { field, msg });
        crate::check_sizes(
            &[
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
                ("image_size", self.image_size),
                ("patch_size", self.patch_size),
                ("num_channels", self.num_channels),
            ],
            1 << 20,
        )?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return field(
                "num_attention_heads",
                format!(
                    "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        if self.image_size % self.patch_size != 0 {
            return field(
                "patch_size",
                format!(
                    "image_size ({}) must be a multiple of patch_size ({})",
                    self.image_size, self.patch_size
                ),
            );
        }
        crate::check_dropouts(&[
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ])?;
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return field(
                "layer_norm_eps",
                format!("must be a finite number > 0, got {}", self.layer_norm_eps),
            );
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return field(
                "initializer_range",
                format!(
                    "must be a finite number >= 0, got {}",
                    self.initializer_range
                ),
            );
        }
        if self.hidden_act != "gelu" {
            return field(
                "hidden_act",
                format!("`{}` is not supported (gelu)", self.hidden_act),
            );
        }
        Ok(())
    }

    /// Patches along one side of a `image_size` image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The sequence length: the patches and `[CLS]`.
    pub fn seq_len(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// The `config.json` of an export, naming `architecture` (`ViTModel`, ...).
    pub fn hf_json(&self, architecture: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v["architectures"] = serde_json::json!([architecture]);
        v["torch_dtype"] = "float32".into();
        v
    }

    /// Matmul FLOPs of one forward pass over one image: the patch projection, each block's four
    /// projections and MLP at every position, and attention's two products.
    pub fn forward_flops(&self) -> f64 {
        self.forward_flops_at(self.image_size, self.image_size)
    }

    /// [`ViTConfig::forward_flops`] for an `h` x `w` image (interpolated positions).
    pub fn forward_flops_at(&self, height: usize, width: usize) -> f64 {
        let (h, i, l) = (
            self.hidden_size as f64,
            self.intermediate_size as f64,
            self.num_hidden_layers as f64,
        );
        let patches = ((height / self.patch_size) * (width / self.patch_size)) as f64;
        let t = patches + 1.0;
        let patch = (self.num_channels * self.patch_size * self.patch_size) as f64;
        2.0 * patches * patch * h + l * (2.0 * t * (4.0 * h * h + 2.0 * h * i) + 4.0 * t * t * h)
    }
}

/// PyTorch's `interpolate(mode="bicubic", align_corners=False)` along one axis from `from` to
/// `to` samples as a (to, from) matrix: output `i` reads the four inputs around
/// `(i + 0.5) * from / to - 0.5` with Keys' cubic weights (a = -0.75), indices clamped to the
/// edge. A matrix rather than a kernel because it is tiny (grid x grid) and autograd then
/// carries the positions' gradient through the product for free.
fn bicubic_matrix(from: usize, to: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = from as f64 / to as f64;
    let mut m = vec![0f32; to * from];
    for i in 0..to {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let base = src.floor();
        let t = src - base;
        let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, w) in weights.iter().enumerate() {
            let j = (base as i64 - 1 + k as i64).clamp(0, from as i64 - 1) as usize;
            m[i * from + j] += *w as f32;
        }
    }
    m
}

/// `encoder.layer.N`: pre-norm attention and MLP, each with a residual.
#[derive(Debug, Clone)]
pub(crate) struct ViTLayer {
    layernorm_before: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    probs_dropout: Dropout,
    attention_output_dropout: Dropout,
    output_dropout: Dropout,
    heads: usize,
    kernels: Kernels,
}

/// A linear layer (its bias optional, `qkv_bias`) on `cfg`'s kernel path.
pub(crate) fn linear(
    cfg: &ViTConfig,
    vb: VarBuilder,
    inp: usize,
    out: usize,
    bias: bool,
) -> candle_core::Result<Linear> {
    Linear::optional_bias(vb, (inp, out), bias, cfg.kernels)
}

pub(crate) fn norm(cfg: &ViTConfig, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm::load(cfg.hidden_size, cfg.layer_norm_eps, vb)?.with_kernels(cfg.kernels))
}

impl ViTLayer {
    pub(crate) fn load(vb: VarBuilder, cfg: &ViTConfig, index: usize) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let site = 1 + 3 * index as u64;
        let attn = vb.pp("attention");
        let own = attn.pp("attention");
        let dropout = |p: f64, site| Dropout::new(p as f32, site).with_kernels(cfg.kernels);
        Ok(ViTLayer {
            layernorm_before: norm(cfg, vb.pp("layernorm_before"))?,
            query: linear(cfg, own.pp("query"), h, h, cfg.qkv_bias)?,
            key: linear(cfg, own.pp("key"), h, h, cfg.qkv_bias)?,
            value: linear(cfg, own.pp("value"), h, h, cfg.qkv_bias)?,
            attention_output: linear(cfg, attn.pp("output").pp("dense"), h, h, true)?,
            layernorm_after: norm(cfg, vb.pp("layernorm_after"))?,
            intermediate: linear(cfg, vb.pp("intermediate").pp("dense"), h, i, true)?,
            output: linear(cfg, vb.pp("output").pp("dense"), i, h, true)?,
            probs_dropout: dropout(cfg.attention_probs_dropout_prob, site),
            attention_output_dropout: dropout(cfg.hidden_dropout_prob, site + 1),
            output_dropout: dropout(cfg.hidden_dropout_prob, site + 2),
            heads: cfg.num_attention_heads,
            kernels: cfg.kernels,
        })
    }

    /// (b*t, h) -> (b*t, h).
    pub(crate) fn forward_t(
        &self,
        xs: &Tensor,
        (b, t): (usize, usize),
        mask: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let normed = self.layernorm_before.forward(xs)?;
        let (q, k, v) = (
            self.query.forward(&normed)?,
            self.key.forward(&normed)?,
            self.value.forward(&normed)?,
        );
        let ctx = self.kernels.self_attention_windowed(
            &q,
            &k,
            &v,
            (b, t, self.heads),
            mask,
            None,
            self.probs_dropout.stream(mode),
        )?;
        let attn = self
            .attention_output_dropout
            .forward_t(&self.attention_output.forward(&ctx)?, mode)?;
        let xs = (xs + attn)?;
        let inner = self.kernels.gelu_erf(
            &self
                .intermediate
                .forward(&self.layernorm_after.forward(&xs)?)?,
        )?;
        let out = self
            .output_dropout
            .forward_t(&self.output.forward(&inner)?, mode)?;
        xs + out
    }
}

/// HF `ViTModel`: embeddings (patch projection, `[CLS]`, positions, dropout), the encoder, the
/// final LayerNorm and the pooler (dense + tanh over `[CLS]`, HF's default `add_pooling_layer`;
/// Kindling's objectives read `[CLS]` after the final norm, as DINO and MAE do, so the pooler is
/// exported as initialised and transformers loads the folder with no missing keys).
#[derive(Debug, Clone)]
pub struct ViTModel {
    cls_token: Tensor,
    position_embeddings: Tensor,
    /// (hidden, channels, patch, patch), HF's convolution kernel
    patch_weight: Tensor,
    patch_bias: Tensor,
    embeddings_dropout: Dropout,
    layers: Vec<ViTLayer>,
    layernorm: LayerNorm,
    pooler: Linear,
    pub config: ViTConfig,
}

impl ViTModel {
    pub fn load(vb: VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        cfg.validate()?;
        let (h, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let e = vb.pp("embeddings");
        let projection = e.pp("patch_embeddings").pp("projection");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ViTLayer::load(vb.pp("encoder").pp("layer").pp(i), cfg, i))
            .collect::<candle_core::Result<_>>()?;
        let zeros = candle_nn::Init::Const(0.0);
        Ok(ViTModel {
            cls_token: e.get_with_hints((1, 1, h), "cls_token", zeros)?,
            position_embeddings: e.get_with_hints(
                (1, cfg.seq_len(), h),
                "position_embeddings",
                zeros,
            )?,
            patch_weight: projection.get_with_hints(
                (h, c, p, p),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            patch_bias: projection.get_with_hints(h, "bias", zeros)?,
            embeddings_dropout: Dropout::new(cfg.hidden_dropout_prob as f32, 0)
                .with_kernels(cfg.kernels),
            layers,
            layernorm: norm(cfg, vb.pp("layernorm"))?,
            pooler: linear(cfg, vb.pp("pooler").pp("dense"), h, h, true)?,
            config: cfg.clone(),
        })
    }

    /// Whether `name` is one of the tensors the encoder's objectives leave untrained.
    pub fn is_pooler_tensor(name: &str) -> bool {
        name.starts_with("pooler.")
    }

    /// Checks `images` against the config: (batch, height, width, num_channels), each side a
    /// multiple of `patch_size`; the patch grid (batch, rows, columns). Another size than
    /// `image_size` reads interpolated positions ([`ViTModel::positions`]), as HF's
    /// `interpolate_pos_encoding=True` does (DINO's small local crops).
    fn check_images(&self, images: &Tensor) -> Result<(usize, usize, usize)> {
        let c = &self.config;
        let (b, ih, iw, ch) = images.dims4()?;
        let p = c.patch_size;
        if ih % p != 0 || iw % p != 0 || ih == 0 || iw == 0 || ch != c.num_channels {
            return Err(ModelError::Config(format!(
                "images of {ih}x{iw}x{ch}, the model takes {s}x{s}x{} (image_size, \
                 num_channels), or other sides that are multiples of patch_size ({p})",
                c.num_channels,
                s = c.image_size
            )));
        }
        Ok((b, ih / p, iw / p))
    }

    /// The patches' positions for a `rows` x `columns` grid, (rows * columns, hidden): the
    /// learned table at its own grid, otherwise the table resized bicubically (HF's
    /// `interpolate_pos_encoding`; its gradient flows back to the table).
    fn positions(&self, (rows, columns): (usize, usize)) -> Result<Tensor> {
        let g = self.config.grid();
        let table = self.position_embeddings.narrow(1, 1, g * g)?.squeeze(0)?;
        if (rows, columns) == (g, g) {
            return Ok(table);
        }
        let (my, mx) = (bicubic_matrix(g, rows), bicubic_matrix(g, columns));
        // The 2-D resize is separable: weight (y, x) <- (i, j) is my[y, i] * mx[x, j].
        let mut m = Vec::with_capacity(rows * columns * g * g);
        for y in 0..rows {
            for x in 0..columns {
                for i in 0..g {
                    for j in 0..g {
                        m.push(my[y * g + i] * mx[x * g + j]);
                    }
                }
            }
        }
        let m = Tensor::from_vec(m, (rows * columns, g * g), table.device())?;
        Ok(m.matmul(&table)?)
    }

    /// The patches of `images`, projected and with their positions: (batch, patches, hidden),
    /// in row-major patch order.
    fn patch_tokens(&self, images: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, gy, gx) = self.check_images(images)?;
        let (p, h, ch) = (c.patch_size, c.hidden_size, c.num_channels);
        // (b, gy, py, gx, px, ch) -> (b, gy, gx, ch, py, px): each patch's values in the
        // kernel's (channel, row, column) order.
        let patches = images
            .reshape((b, gy, p, gx, p, ch))?
            .permute((0, 1, 3, 5, 2, 4))?
            .contiguous()?
            .reshape((b * gy * gx, ch * p * p))?;
        let weight = self.patch_weight.reshape((h, ch * p * p))?;
        let projected = c
            .kernels
            .linear(&patches, &weight, &self.patch_bias)?
            .reshape((b, gy * gx, h))?;
        let positions = self.positions((gy, gx))?.to_dtype(projected.dtype())?;
        Ok(projected.broadcast_add(&positions)?)
    }

    /// `[CLS]` with its position, then `tokens` (batch, n, hidden): (batch * (n + 1), hidden)
    /// after the embeddings' dropout.
    fn with_cls(&self, tokens: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, n, h) = tokens.dims3()?;
        let cls = (&self.cls_token + self.position_embeddings.narrow(1, 0, 1)?)?
            .to_dtype(tokens.dtype())?
            .broadcast_as((b, 1, h))?;
        let xs = Tensor::cat(&[&cls, tokens], 1)?.reshape((b * (n + 1), h))?;
        Ok(self.embeddings_dropout.forward_t(&xs, mode)?)
    }

    /// The embeddings' output for `images`, (batch * seq, hidden), and seq.
    fn embed(&self, images: &Tensor, mode: Mode) -> Result<(Tensor, usize)> {
        let tokens = self.patch_tokens(images)?;
        let t = tokens.dim(1)? + 1;
        Ok((self.with_cls(&tokens, mode)?, t))
    }

    /// The encoder and the final LayerNorm over (batch * t, hidden).
    fn encode(&self, mut xs: Tensor, (b, t): (usize, usize), mode: Mode) -> Result<Tensor> {
        let mask = Tensor::zeros((b, t), DType::F32, xs.device())?;
        for layer in &self.layers {
            xs = layer.forward_t(&xs, (b, t), &mask, mode)?;
        }
        Ok(self.layernorm.forward(&xs)?)
    }

    /// HF's `last_hidden_state`, flat: (batch * seq, hidden), after the final LayerNorm.
    pub fn forward_t(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let (xs, t) = self.embed(images, mode)?;
        self.encode(xs, (images.dim(0)?, t), mode)
    }

    /// The encoder over `[CLS]` and `keep` patches of each image only (MAE's visible ones):
    /// `keep` holds, image after image, `k` flat indices `image * patches + patch` (u32). Each
    /// patch keeps its own position. (batch * (k + 1), hidden).
    pub fn forward_visible(
        &self,
        images: &Tensor,
        keep: &Tensor,
        k: usize,
        mode: Mode,
    ) -> Result<Tensor> {
        let tokens = self.patch_tokens(images)?;
        let (b, n, h) = tokens.dims3()?;
        if keep.elem_count() != b * k || k > n {
            return Err(ModelError::Config(format!(
                "{} kept patches for {b} images of {n} patches, {k} each",
                keep.elem_count()
            )));
        }
        let visible = tokens
            .reshape((b * n, h))?
            .index_select(keep, 0)?
            .reshape((b, k, h))?;
        let xs = self.with_cls(&visible, mode)?;
        self.encode(xs, (b, k + 1), mode)
    }

    /// Each image's patches as pixel rows, (batch * patches, patch * patch * channels), each in
    /// (row, column, channel) order as HF's `ViTMAEForPreTraining.patchify`: MAE's targets.
    pub fn patchify(&self, images: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, gy, gx) = self.check_images(images)?;
        let (p, ch) = (c.patch_size, c.num_channels);
        Ok(images
            .reshape((b, gy, p, gx, p, ch))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b * gy * gx, p * p * ch))?)
    }

    /// The `[CLS]` vector of each image after the final LayerNorm: (batch, hidden), the
    /// features the self-supervised objectives and probes read.
    pub fn features(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let b = images.dim(0)?;
        let h = self.config.hidden_size;
        let hidden = self.forward_t(images, mode)?;
        let t = hidden.dim(0)? / b.max(1);
        Ok(hidden
            .reshape((b, t, h))?
            .narrow(1, 0, 1)?
            .reshape((b, h))?)
    }

    /// HF's `pooler_output`: tanh(dense(`[CLS]`)), (batch, hidden).
    pub fn pooler_output(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.pooler.forward(features)?.tanh()?)
    }
}

/// A ViT loaded from a folder, trainable: HF's `ViTModel`, the `vit.` encoder of
/// `ViTForImageClassification`, or a Kindling export.
pub struct ImportedViT {
    pub model: ViTModel,
    pub varmap: VarMap,
    pub report: KeyReport,
}

/// Reads `dir/config.json` as a ViT config (`model_type` "vit").
pub fn read_config(dir: &Path) -> Result<ViTConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
        path: path.clone(),
        source: e,
    })?;
    let file = |msg: String| ModelError::File {
        path: path.clone(),
        msg,
    };
    let cfg: ViTConfig =
        serde_json::from_str(&text).map_err(|e| file(format!("not a ViT config: {e}")))?;
    if cfg.model_type != "vit" {
        return Err(file(format!(
            "`model_type` is `{}`, a ViT folder has `vit`",
            cfg.model_type
        )));
    }
    cfg.validate()
        .map_err(|e| file(format!("invalid ViT config: {e}")))?;
    Ok(cfg)
}

/// Loads `dir` (config.json + model.safetensors) into a fresh, trainable `ViTModel`; a tensor of
/// the wrong shape is an error, and the report names the model's tensors the file lacks and
/// the file's the model does not use.
pub fn load_folder(dir: &Path, device: &Device) -> Result<ImportedViT> {
    let cfg = read_config(dir)?;
    let (path, mut tensors) = crate::import::read_weights(dir, device)?;
    // Task models (`ViTForImageClassification`, `ViTForMaskedImageModeling`) hold the encoder
    // as `vit.`.
    tensors = tensors
        .into_iter()
        .map(|(n, t)| match n.strip_prefix("vit.") {
            Some(bare) => (bare.to_string(), t),
            None => (n, t),
        })
        .collect();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = ViTModel::load(vb, &cfg)?;
    let report = crate::import::copy_tensors(&varmap, &tensors, &path)?;
    Ok(ImportedViT {
        model,
        varmap,
        report,
    })
}

/// Writes `dir/model.safetensors` and `dir/config.json`: the tensors of `varmap` under
/// `prefix` (`""` for a bare model, `"backbone."` inside a self-supervised one) as HF's
/// `ViTModel`.
pub fn save_folder(dir: &Path, varmap: &VarMap, prefix: &str, cfg: &ViTConfig) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = crate::export::varmap_tensors(varmap)
        .into_iter()
        .filter_map(|(n, t)| Some((n.strip_prefix(prefix)?.to_string(), t)))
        .collect();
    crate::export::save_safetensors(&dir.join("model.safetensors"), &tensors, &[])?;
    crate::export::save_json(&dir.join("config.json"), &cfg.hf_json("ViTModel"))
}

/// HF's ViT initialisation (`ViTPreTrainedModel._init_weights`), seeded per name: truncated
/// normals (at 2 standard deviations, PyTorch's `trunc_normal_` default bounds of +-2 for std
/// 1, scaled) with `initializer_range` for linear and patch kernels, the positions and
/// `[CLS]`; biases 0, norms 1.
pub fn init(varmap: &VarMap, seed: u64, cfg: &ViTConfig) -> Result<()> {
    init_under(varmap, "", seed, cfg)
}

/// [`init`] for the variables whose names start with `prefix` (a ViT inside a larger model,
/// `backbone.`); each draws from its stream `(seed, full name)`.
pub fn init_under(varmap: &VarMap, prefix: &str, seed: u64, cfg: &ViTConfig) -> Result<()> {
    let std = cfg.initializer_range as f32;
    crate::init::reinit(varmap, prefix, |name, dims| {
        crate::init::truncated_normal(seed, name, std, 2.0 * std, dims.iter().product())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(dropout: f64) -> (ViTModel, VarMap) {
        let cfg: ViTConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 24, "image_size": 8, "patch_size": 4, "num_channels": 1,
            "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
        }))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = ViTModel::load(vb, &cfg).unwrap();
        init(&varmap, 3, &cfg).unwrap();
        (model, varmap)
    }

    /// sum(f * r) for a fixed random r: a loss whose gradient reaches every feature (the sum
    /// of squares of LayerNorm outputs is constant, so its gradient is zero).
    fn weighted_sum(f: &Tensor) -> Tensor {
        let r = crate::test_util::uniform(f.dims(), 5, 1.0);
        (f * r).unwrap().sum_all().unwrap()
    }

    fn images(n: usize) -> Tensor {
        crate::test_util::uniform(&[n, 8, 8, 1], 9, 1.0)
    }

    /// HF's initialisation: every norm weight 1, biases 0, weights within two standard
    /// deviations.
    #[test]
    fn init_sets_norms_to_one_and_truncates_weights() {
        let (_, varmap) = tiny(0.0);
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let v: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
            if name.contains("norm") && name.ends_with("weight") {
                assert!(v.iter().all(|&x| x == 1.0), "{name}");
            } else if name.ends_with("bias") {
                assert!(v.iter().all(|&x| x == 0.0), "{name}");
            } else {
                assert!(v.iter().all(|x| x.abs() <= 0.04 + 1e-6), "{name}");
                assert!(v.iter().any(|&x| x != 0.0), "{name}");
            }
        }
    }

    /// The patch projection as a product equals HF's stride-p convolution (candle's conv2d on
    /// the channels-first image), for a three-channel image.
    #[test]
    fn the_patch_product_is_the_strided_convolution() {
        let cfg: ViTConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 8, "image_size": 6, "patch_size": 3, "num_channels": 3,
            "initializer_range": 0.5,
        }))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let m = ViTModel::load(vb, &cfg).unwrap();
        init(&varmap, 1, &cfg).unwrap();
        let x = crate::test_util::uniform(&[2, 6, 6, 3], 4, 1.0);
        let (ours, t) = m.embed(&x, Mode::Eval).unwrap();
        assert_eq!(t, 5);
        let conv = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
            .conv2d(&m.patch_weight, 0, 3, 1, 1)
            .unwrap()
            .broadcast_add(&m.patch_bias.reshape((1, 8, 1, 1)).unwrap())
            .unwrap() // (2, 8, 2, 2)
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap(); // (2, 4, 8)
        let pos = m.position_embeddings.narrow(1, 1, 4).unwrap();
        let expected = conv.broadcast_add(&pos).unwrap();
        let got = ours.reshape((2, 5, 8)).unwrap().narrow(1, 1, 4).unwrap();
        let d = crate::test_util::max_rel_diff(&got, &expected);
        assert!(d < 1e-5, "patch embeddings differ by {d}");
    }

    /// Every parameter but the pooler gets a gradient from the `[CLS]` features; dropout
    /// applies in training only and follows the seed.
    #[test]
    fn every_parameter_trains_and_dropout_follows_the_mode() {
        let (m, varmap) = tiny(0.1);
        let x = images(3);
        let f = m.features(&x, Mode::Train { seed: 1 }).unwrap();
        assert_eq!(f.dims(), &[3, 16]);
        let grads = weighted_sum(&f).backward().unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if ViTModel::is_pooler_tensor(name) {
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}"));
            assert!(
                crate::test_util::abs_sum(g) > 0.0,
                "{name} gets a zero gradient"
            );
        }
        let v = |mode| -> Vec<f32> {
            m.features(&x, mode)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(v(Mode::Eval), v(Mode::Eval));
        assert_eq!(v(Mode::Train { seed: 1 }), v(Mode::Train { seed: 1 }));
        assert_ne!(v(Mode::Train { seed: 1 }), v(Mode::Train { seed: 2 }));
        assert_ne!(v(Mode::Train { seed: 1 }), v(Mode::Eval));
    }

    /// The fused and composed kernel paths compute the same features and gradients.
    #[test]
    fn fused_and_composed_paths_agree() {
        let (fused, varmap) = tiny(0.1);
        let mut cfg = fused.config.clone();
        cfg.kernels = Kernels::Composed;
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let composed = ViTModel::load(vb, &cfg).unwrap();
        let x = images(2);
        let run = |m: &ViTModel| {
            let f = m.features(&x, Mode::Train { seed: 4 }).unwrap();
            let g = weighted_sum(&f).backward().unwrap();
            let w = g.get(&m.patch_weight).unwrap().clone();
            (f, w)
        };
        let ((f1, w1), (f2, w2)) = (run(&fused), run(&composed));
        let (df, dw) = (
            crate::test_util::max_rel_diff(&f1, &f2),
            crate::test_util::max_rel_diff(&w1, &w2),
        );
        assert!(
            df < 1e-5 && dw < 1e-4,
            "features {df}, patch kernel gradient {dw}"
        );
    }

    /// At its own grid the resize is the identity (the table as it is); other grids read
    /// resized positions whose gradient reaches the table.
    #[test]
    fn other_image_sizes_read_resized_positions() {
        for n in 1..6 {
            let m = bicubic_matrix(n, n);
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(m[i * n + j], if i == j { 1.0 } else { 0.0 });
                }
            }
        }
        // Each output row's weights sum to 1 (a constant table stays constant).
        for (from, to) in [(7, 3), (2, 5), (3, 2)] {
            for row in bicubic_matrix(from, to).chunks(from) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            }
        }
        let (m, _) = tiny(0.0);
        let small = crate::test_util::uniform(&[2, 4, 12, 1], 2, 1.0);
        let f = m.features(&small, Mode::Eval).unwrap();
        assert_eq!(f.dims(), &[2, 16]);
        let grads = weighted_sum(&f).backward().unwrap();
        let g = grads.get(&m.position_embeddings).unwrap();
        assert!(crate::test_util::abs_sum(&g.narrow(1, 1, 4).unwrap()) > 0.0);
    }

    #[test]
    fn a_bad_shape_is_named() {
        let mut cfg = ViTConfig::default();
        cfg.patch_size = 15;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("patch_size") && e.contains("224"), "{e}");
        let (m, _) = tiny(0.0);
        let wrong = crate::test_util::uniform(&[1, 9, 9, 1], 1, 1.0);
        let e = m.features(&wrong, Mode::Eval).unwrap_err().to_string();
        assert!(e.contains("9x9x1") && e.contains("8x8x1"), "{e}");
    }
}
