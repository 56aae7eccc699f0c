//! ModernBERT (Warner et al., 2024, <https://arxiv.org/abs/2412.13663>), trainable, with the
//! parameter names of HF `transformers`' `modeling_modernbert.py`, so `model.safetensors` moves
//! both ways and an export loads as `ModernBertForMaskedLM`.
//!
//! What differs from BERT: no position table but rotary positions (RoPE) on queries and keys,
//! with one base for global layers and another for local ones; every third layer (by default)
//! attends globally and the others within a sliding window of `local_attention` tokens
//! (|i - j| <= local_attention / 2); pre-norm blocks (the first layer's attention norm is the
//! embeddings' own) and a final norm; a GeGLU feed-forward block (`Wi` gives the input and the
//! gate, `gelu(input) * gate`); no biases (unless `attention_bias`, `mlp_bias`, `norm_bias`,
//! `classifier_bias` ask for them); the MLM decoder tied to the embeddings, with a bias.
//!
//! On CPU f32 a layer is one autograd node (`crate::fused_modernbert`), as BERT's is, and the
//! last layer of an MLM step runs its queries, attention output and feed-forward block at the
//! masked rows only (its keys and values still come from every row, as a window needs). Other
//! devices and dtypes (mixed precision: `ModernBertModel::compute_dtype`) compose the separate
//! ops (`crate::ops`): the attention kernel with the window, linear, LayerNorm, rotary, GeGLU.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::fused_modernbert::{modernbert_layer, ModernBertLayerArgs};
use crate::nn::{Dropout, LayerNorm, Linear};
use crate::ops::{rows_can_query, Kernels, RotaryTable};
use crate::{ModelError, Result};
use kindling_core::Mode;

fn d_vocab() -> usize {
    50368
}
fn d_hidden() -> usize {
    768
}
fn d_inter() -> usize {
    1152
}
fn d_layers() -> usize {
    22
}
fn d_heads() -> usize {
    12
}
fn d_act() -> String {
    "gelu".into()
}
fn d_max_pos() -> usize {
    8192
}
fn d_init() -> f64 {
    0.02
}
fn d_cutoff() -> f64 {
    2.0
}
fn d_eps() -> f64 {
    1e-5
}
fn d_every() -> usize {
    3
}
fn d_local() -> usize {
    128
}
fn d_global_theta() -> f64 {
    160_000.0
}
fn d_local_theta() -> f64 {
    10_000.0
}
fn d_true() -> bool {
    true
}
fn d_pooling() -> String {
    "cls".into()
}
fn d_model_type() -> String {
    "modernbert".into()
}

/// HF `ModernBertConfig`: the fields of `config.json` (unknown ones are ignored, as HF does).
/// Defaults are ModernBERT-base's. Older configs give `global_attn_every_n_layers` and
/// `global_rope_theta`/`local_rope_theta`; transformers 5 writes `layer_types` and
/// `rope_parameters`: both are read, and both are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModernBertConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// The GeGLU's activation; only "gelu" (exact) is supported.
    #[serde(default = "d_act")]
    pub hidden_activation: String,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    #[serde(default = "d_cutoff")]
    pub initializer_cutoff_factor: f64,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cls_token_id: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sep_token_id: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub embedding_dropout: f64,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub mlp_dropout: f64,
    #[serde(default = "d_true")]
    pub decoder_bias: bool,
    #[serde(default = "d_pooling")]
    pub classifier_pooling: String,
    #[serde(default)]
    pub classifier_dropout: f64,
    #[serde(default)]
    pub classifier_bias: bool,
    #[serde(default = "d_act")]
    pub classifier_activation: String,
    /// Every n-th layer (0, n, 2n, ...) attends globally, the others locally.
    #[serde(default = "d_every")]
    pub global_attn_every_n_layers: usize,
    /// The local layers' window: a token attends to those within `local_attention / 2`.
    #[serde(default = "d_local")]
    pub local_attention: usize,
    #[serde(default = "d_global_theta")]
    pub global_rope_theta: f64,
    #[serde(default = "d_local_theta")]
    pub local_rope_theta: f64,
    /// transformers 5's per-layer list ("full_attention" / "sliding_attention"); when given it
    /// decides over `global_attn_every_n_layers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// transformers 5's rope bases (`{"full_attention": {"rope_theta": ..}, ...}`); when given
    /// they decide over `global_rope_theta`/`local_rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "d_model_type")]
    pub model_type: String,
    /// The kernel path every layer takes (see [`crate::bert::BertConfig::kernels`]).
    #[serde(skip)]
    pub kernels: crate::ops::Kernels,
}

impl ModernBertConfig {
    pub fn validate(&self) -> Result<()> {
        let field = |field: &'static str, msg: String| Err(ModelError::Setting { field, msg });
        crate::check_sizes(
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
                ("max_position_embeddings", self.max_position_embeddings),
                (
                    "global_attn_every_n_layers",
                    self.global_attn_every_n_layers,
                ),
                ("local_attention", self.local_attention),
            ],
            1 << 24,
        )?;
        crate::check_dropouts(&[
            ("attention_dropout", self.attention_dropout),
            ("embedding_dropout", self.embedding_dropout),
            ("mlp_dropout", self.mlp_dropout),
            ("classifier_dropout", self.classifier_dropout),
        ])?;
        for (name, v) in [
            ("initializer_range", self.initializer_range),
            ("initializer_cutoff_factor", self.initializer_cutoff_factor),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return field(name, format!("must be a finite number >= 0, got {v}"));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return field(
                "norm_eps",
                format!("must be a finite number > 0, got {}", self.norm_eps),
            );
        }
        for (name, t) in [
            ("global_rope_theta", self.rope_theta(true)),
            ("local_rope_theta", self.rope_theta(false)),
        ] {
            if !(t.is_finite() && t > 1.0) {
                return field(
                    name,
                    format!("a rotary base must be a finite number > 1, got {t}"),
                );
            }
        }
        if self.pad_token_id >= self.vocab_size {
            return field(
                "pad_token_id",
                format!(
                    "{} is not below vocab_size {}",
                    self.pad_token_id, self.vocab_size
                ),
            );
        }
        if self.hidden_size % self.num_attention_heads != 0
            || (self.hidden_size / self.num_attention_heads) % 2 != 0
        {
            return field(
                "num_attention_heads",
                format!(
                    "hidden_size ({}) must be a multiple of num_attention_heads ({}) with an even \
                     head size (rotary positions rotate pairs)",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        for (name, act) in [
            ("hidden_activation", &self.hidden_activation),
            ("classifier_activation", &self.classifier_activation),
        ] {
            if act != "gelu" {
                return field(name, format!("`{act}` is not supported (gelu)"));
            }
        }
        if !["cls", "mean"].contains(&self.classifier_pooling.as_str()) {
            return field(
                "classifier_pooling",
                format!("`{}` is not one of cls, mean", self.classifier_pooling),
            );
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return field(
                    "layer_types",
                    format!(
                        "{} entries for {} layers",
                        types.len(),
                        self.num_hidden_layers
                    ),
                );
            }
            if let Some(t) = types
                .iter()
                .find(|t| *t != "full_attention" && *t != "sliding_attention")
            {
                return field(
                    "layer_types",
                    format!("`{t}` is not full_attention or sliding_attention"),
                );
            }
        }
        Ok(())
    }

    /// Whether layer `i` attends globally.
    pub fn is_global(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "full_attention"),
            None => i % self.global_attn_every_n_layers.max(1) == 0,
        }
    }

    /// The rotary base of global (`true`) or local layers.
    pub fn rope_theta(&self, global: bool) -> f64 {
        let key = if global {
            "full_attention"
        } else {
            "sliding_attention"
        };
        self.rope_parameters
            .as_ref()
            .and_then(|p| p[key]["rope_theta"].as_f64())
            .unwrap_or(if global {
                self.global_rope_theta
            } else {
                self.local_rope_theta
            })
    }

    /// The longest sequence (rotary positions have no table; this is the trained length).
    pub fn max_seq_len(&self) -> usize {
        self.max_position_embeddings
    }

    /// The `config.json` of an export: both the old and the transformers-5 forms of the layer
    /// pattern and the rotary bases, so older and newer transformers read the same model.
    pub fn hf_json(&self, architecture: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let types: Vec<&str> = (0..self.num_hidden_layers)
            .map(|i| {
                if self.is_global(i) {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect();
        v["layer_types"] = serde_json::json!(types);
        v["global_rope_theta"] = self.rope_theta(true).into();
        v["local_rope_theta"] = self.rope_theta(false).into();
        v["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "default", "rope_theta": self.rope_theta(true)},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_theta(false)},
        });
        v["architectures"] = serde_json::json!([architecture]);
        v["tie_word_embeddings"] = true.into();
        v["torch_dtype"] = "float32".into();
        v
    }

    /// Parameters of the encoder's linear layers (Wqkv, Wo, Wi, Wo): the FLOP count's base.
    pub fn encoder_linear_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        self.num_hidden_layers * (4 * h * h + 3 * h * i)
    }

    /// Matmul FLOPs of one MLM training step (forward + backward = 3 x forward): the encoder at
    /// every token (attention over the whole sequence, the window included: the kernel computes
    /// full rows), the head and decoder at `predicted` rows.
    pub fn train_flops(&self, tokens: usize, seq: usize, predicted: usize, rows: bool) -> f64 {
        let (h, v, l) = (
            self.hidden_size as f64,
            self.vocab_size as f64,
            self.num_hidden_layers as f64,
        );
        let (t, p, s) = (tokens as f64, predicted as f64, seq as f64);
        let enc = if rows && l > 0.0 {
            // The last layer's Wqkv at every token, its Wo and feed-forward block at `predicted`.
            let per_layer = self.encoder_linear_params() as f64 / l;
            let qkv = 3.0 * h * h;
            6.0 * ((l - 1.0) * per_layer * t + qkv * t + (per_layer - qkv) * p)
        } else {
            6.0 * self.encoder_linear_params() as f64 * t
        };
        enc + 12.0 * l * s * h * t + 6.0 * (h * h + h * v) * p
    }
}

/// A linear layer whose bias may be absent, on `cfg`'s kernel path (see
/// [`Linear::optional_bias`]).
fn dense(
    cfg: &ModernBertConfig,
    vb: VarBuilder,
    inp: usize,
    out: usize,
    bias: bool,
) -> candle_core::Result<Linear> {
    Linear::optional_bias(vb, (inp, out), bias, cfg.kernels)
}

/// A LayerNorm over the hidden size whose bias may be absent (`norm_bias`, false in
/// ModernBERT's default), as [`dense`].
fn norm(cfg: &ModernBertConfig, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    let size = cfg.hidden_size;
    let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
    let bias = if cfg.norm_bias {
        vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?
    } else {
        Tensor::zeros(size, DType::F32, vb.device())?
    };
    Ok(LayerNorm {
        weight,
        bias,
        eps: cfg.norm_eps,
        kernels: cfg.kernels,
    })
}

/// Dropout of rate `p` at `site`, on `cfg`'s kernel path.
fn dropout(cfg: &ModernBertConfig, p: f64, site: u64) -> Dropout {
    Dropout::new(p as f32, site).with_kernels(cfg.kernels)
}

/// Rotary position embedding (Su et al., 2021) as HF applies it: the head's two halves are
/// the pairs, `x * cos + rotate_half(x) * sin`.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    /// the same angles as slices, for the one-node layer
    table: RotaryTable,
}

impl Rotary {
    /// The tables for positions `0..seq` with base `theta`: (1, seq, 1, head_dim) each.
    fn new(seq: usize, head_dim: usize, theta: f64, device: &Device) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(seq * head_dim);
        let mut sin = Vec::with_capacity(seq * head_dim);
        // As HF: the inverse frequencies and their products with positions in f32.
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta.powf((2 * i) as f64 / head_dim as f64) as f32))
            .collect();
        for pos in 0..seq {
            // Both halves of a head see the same angles (HF's `cat((freqs, freqs))`).
            for _half in 0..2 {
                for f in &inv {
                    let a = pos as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let shape = (1, seq, 1, head_dim);
        Ok(Rotary {
            cos: Tensor::from_slice(&cos, shape, device)?,
            sin: Tensor::from_slice(&sin, shape, device)?,
            table: RotaryTable::new(cos.into(), sin.into(), seq, head_dim),
        })
    }
}

/// `model.layers.N`: pre-norm attention (global or windowed) and a pre-norm GeGLU block.
#[derive(Debug, Clone)]
struct ModernBertLayer {
    /// `None` for layer 0, whose input is the embeddings' norm already.
    attn_norm: Option<LayerNorm>,
    wqkv: Linear,
    attn_wo: Linear,
    mlp_norm: LayerNorm,
    wi: Linear,
    mlp_wo: Linear,
    probs_dropout: Dropout,
    attn_out_dropout: Dropout,
    mlp_dropout: Dropout,
    heads: usize,
    /// `None`: global; else the half-window.
    window: Option<usize>,
    kernels: Kernels,
}

impl ModernBertLayer {
    fn load(vb: VarBuilder, cfg: &ModernBertConfig, i: usize) -> candle_core::Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let site = 1 + 3 * i as u64;
        let attn = vb.pp("attn");
        let mlp = vb.pp("mlp");
        Ok(ModernBertLayer {
            attn_norm: if i == 0 {
                None
            } else {
                Some(norm(cfg, vb.pp("attn_norm"))?)
            },
            wqkv: dense(cfg, attn.pp("Wqkv"), h, 3 * h, cfg.attention_bias)?,
            attn_wo: dense(cfg, attn.pp("Wo"), h, h, cfg.attention_bias)?,
            mlp_norm: norm(cfg, vb.pp("mlp_norm"))?,
            wi: dense(cfg, mlp.pp("Wi"), h, 2 * inter, cfg.mlp_bias)?,
            mlp_wo: dense(cfg, mlp.pp("Wo"), inter, h, cfg.mlp_bias)?,
            probs_dropout: dropout(cfg, cfg.attention_dropout, site),
            attn_out_dropout: dropout(cfg, cfg.attention_dropout, site + 1),
            mlp_dropout: dropout(cfg, cfg.mlp_dropout, site + 2),
            heads: cfg.num_attention_heads,
            window: (!cfg.is_global(i)).then_some(cfg.local_attention / 2),
            kernels: cfg.kernels,
        })
    }

    /// (b*t, h) -> (b*t, h), or with `rows` (flat indices, u32) just those rows: attention still
    /// reads every row's keys and values, but the output projection and the feed-forward block
    /// run at `rows` only. One node on CPU f32 on the fused path (`crate::fused_modernbert`,
    /// which also runs queries at the rows only when they are increasing); the composition of
    /// the separate ops otherwise.
    fn forward_t(
        &self,
        xs: &Tensor,
        (b, t): (usize, usize),
        mask_bias: &Tensor,
        rotary: &Rotary,
        mode: Mode,
        rows: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if !(self.kernels.fuses(xs) && mask_bias.dtype() == DType::F32) {
            return self.forward_composed(xs, (b, t), mask_bias, rotary, mode, rows);
        }
        let list = match rows {
            Some(r) => Some(r.to_dtype(DType::U32)?.to_vec1::<u32>()?),
            None => None,
        };
        match list {
            Some(list) if !rows_can_query(&list, b * t) => self
                .forward_fused(xs, (b, t), mask_bias, rotary, mode, None)?
                .index_select(rows.expect("a row list came from rows"), 0),
            list => self.forward_fused(xs, (b, t), mask_bias, rotary, mode, list.as_deref()),
        }
    }

    /// The layer as one autograd node (CPU f32); `rows` strictly increasing.
    fn forward_fused(
        &self,
        xs: &Tensor,
        (b, t): (usize, usize),
        mask_bias: &Tensor,
        rotary: &Rotary,
        mode: Mode,
        rows: Option<&[u32]>,
    ) -> candle_core::Result<Tensor> {
        let mut params = Vec::with_capacity(12);
        if let Some(n) = &self.attn_norm {
            params.extend([&n.weight, &n.bias]);
        }
        params.extend([
            &self.wqkv.weight,
            &self.wqkv.bias,
            &self.attn_wo.weight,
            &self.attn_wo.bias,
            &self.mlp_norm.weight,
            &self.mlp_norm.bias,
            &self.wi.weight,
            &self.wi.bias,
            &self.mlp_wo.weight,
            &self.mlp_wo.bias,
        ]);
        let args = ModernBertLayerArgs {
            params,
            dims: (b, t, self.heads),
            intermediate: self.mlp_wo.weight.dim(1)?,
            eps: self.mlp_norm.eps,
            window: self.window,
            rotary: &rotary.table,
            dropout: [
                self.probs_dropout.stream(mode),
                self.attn_out_dropout.stream(mode),
                self.mlp_dropout.stream(mode),
            ],
        };
        modernbert_layer(xs, args, mask_bias, rows)
    }

    /// The same layer from the separate ops (each its own autograd node); with `rows`, the
    /// output projection and the feed-forward block at those rows.
    fn forward_composed(
        &self,
        xs: &Tensor,
        (b, t): (usize, usize),
        mask_bias: &Tensor,
        rotary: &Rotary,
        mode: Mode,
        rows: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let normed = match &self.attn_norm {
            Some(n) => n.forward(xs)?,
            None => xs.clone(),
        };
        let qkv = self.wqkv.forward(&normed)?; // (b*t, 3h): q | k | v, heads side by side
        let h = xs.dim(1)?;
        let dims = (b, t, self.heads);
        let (cos, sin) = (&rotary.cos, &rotary.sin);
        let q = self.kernels.rotary(&qkv.narrow(1, 0, h)?, cos, sin, dims)?;
        let k = self.kernels.rotary(&qkv.narrow(1, h, h)?, cos, sin, dims)?;
        let v = qkv.narrow(1, 2 * h, h)?;
        let ctx = self.kernels.self_attention_windowed(
            &q,
            &k,
            &v,
            (b, t, self.heads),
            mask_bias,
            self.window,
            self.probs_dropout.stream(mode),
        )?;
        let (ctx, xs) = match rows {
            Some(r) => (ctx.index_select(r, 0)?, xs.index_select(r, 0)?),
            None => (ctx, xs.clone()),
        };
        let attn = self
            .attn_out_dropout
            .forward_t(&self.attn_wo.forward(&ctx)?, mode)?;
        let xs = (xs + attn)?;
        let up = self.wi.forward(&self.mlp_norm.forward(&xs)?)?; // (b*t, 2i): input | gate
        let gated = self.kernels.geglu(&up)?;
        let out = self
            .mlp_wo
            .forward(&self.mlp_dropout.forward_t(&gated, mode)?)?;
        xs + out
    }
}

/// `model`: embeddings (token table, norm, dropout), the layers, the final norm.
#[derive(Debug, Clone)]
pub struct ModernBertModel {
    pub tok_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    embeddings_dropout: Dropout,
    layers: Vec<ModernBertLayer>,
    final_norm: LayerNorm,
    pub config: ModernBertConfig,
    /// Mixed precision: the dtype the layers compute in (bf16/f16 on a GPU) while the
    /// parameters stay in their own (f32 master weights); `None`: the parameters' dtype. The
    /// embeddings' norm runs in f32 and the final norm normalises in f32 (as autocast keeps
    /// layer_norm in f32), as BERT's (`crate::bert::BertModel::compute_dtype`).
    pub compute_dtype: Option<DType>,
}

impl ModernBertModel {
    pub fn load(vb: VarBuilder, cfg: &ModernBertConfig) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ModernBertLayer::load(vb.pp("layers").pp(i), cfg, i))
            .collect::<candle_core::Result<_>>()?;
        Ok(ModernBertModel {
            tok_embeddings: candle_nn::embedding(cfg.vocab_size, h, e.pp("tok_embeddings"))?,
            embeddings_norm: norm(cfg, e.pp("norm"))?,
            embeddings_dropout: dropout(cfg, cfg.embedding_dropout, 0),
            layers,
            final_norm: norm(cfg, vb.pp("final_norm"))?,
            config: cfg.clone(),
            compute_dtype: None,
        })
    }

    /// `input_ids` (batch, seq) u32; `attention_mask` (batch, seq), 1 = attend, 0 = padding.
    /// The last hidden states after the final norm, flat: (batch * seq, hidden).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        self.forward_rows_t(input_ids, attention_mask, None, mode)
    }

    /// Whether [`ModernBertModel::forward_rows_t`] runs the last layer's output projection and
    /// feed-forward block at the rows only: on the fused path, on CPU f32 (the one-node layer,
    /// whose dropout draws each element as at its place in the full layer) or without dropout
    /// in the layers (ModernBERT's default; the composed ops would draw other masks over a
    /// subset).
    pub fn last_layer_at_rows(&self) -> bool {
        let c = &self.config;
        let w = self.tok_embeddings.embeddings();
        let one_node = matches!(w.device(), Device::Cpu)
            && self.compute_dtype.unwrap_or(w.dtype()) == DType::F32;
        c.kernels == Kernels::Fused
            && (one_node || (c.attention_dropout == 0.0 && c.mlp_dropout == 0.0))
    }

    /// [`ModernBertModel::forward_t`] at `rows` only (flat `b * seq + t` indices, u32): (rows,
    /// hidden), equal to selecting those rows of the full output. Where
    /// [`ModernBertModel::last_layer_at_rows`] holds, the last layer computes the attention
    /// output and the feed-forward block at those rows only: an MLM step, whose loss reads ~15%
    /// of the rows, skips most of its last layer.
    pub fn forward_rows_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        rows: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.config.max_seq_len() {
            return Err(ModelError::Config(format!(
                "sequence length {t} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let device = input_ids.device();
        let mask_bias = match attention_mask {
            Some(m) => ((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * -1e9)?).reshape((b, t))?,
            None => Tensor::zeros((b, t), DType::F32, device)?,
        };
        let xs = self.tok_embeddings.forward(&input_ids.flatten_all()?)?;
        let mut xs = self
            .embeddings_dropout
            .forward_t(&self.embeddings_norm.forward(&xs)?, mode)?;
        if let Some(d) = self.compute_dtype {
            xs = xs.to_dtype(d)?;
        }
        let head_dim = self.config.hidden_size / self.config.num_attention_heads;
        let global = Rotary::new(t, head_dim, self.config.rope_theta(true), device)?;
        let local = Rotary::new(t, head_dim, self.config.rope_theta(false), device)?;
        let at_rows = rows.filter(|_| self.last_layer_at_rows());
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let rotary = if layer.window.is_some() {
                &local
            } else {
                &global
            };
            let layer_rows = if i == last { at_rows } else { None };
            xs = layer.forward_t(&xs, (b, t), &mask_bias, rotary, mode, layer_rows)?;
        }
        if let (Some(r), true) = (rows, at_rows.is_none() || self.layers.is_empty()) {
            xs = xs.index_select(r, 0)?;
        }
        Ok(self.final_norm.forward(&xs)?)
    }
}

/// HF `ModernBertForMaskedLM`: `model`, `head` (dense, GELU, norm) and `decoder` (tied to the
/// token embeddings, with `decoder.bias`).
#[derive(Debug, Clone)]
pub struct ModernBertForMaskedLM {
    pub model: ModernBertModel,
    head_dense: Linear,
    head_norm: LayerNorm,
    decoder_bias: Tensor,
}

impl ModernBertForMaskedLM {
    pub fn load(vb: VarBuilder, cfg: &ModernBertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let model = ModernBertModel::load(vb.pp("model"), cfg)?;
        let decoder_bias = if cfg.decoder_bias {
            vb.pp("decoder")
                .get_with_hints(cfg.vocab_size, "bias", candle_nn::Init::Const(0.0))?
        } else {
            Tensor::zeros(cfg.vocab_size, DType::F32, vb.device())?
        };
        Ok(ModernBertForMaskedLM {
            head_dense: dense(cfg, vb.pp("head").pp("dense"), h, h, cfg.classifier_bias)?,
            head_norm: norm(cfg, vb.pp("head").pp("norm"))?,
            decoder_bias,
            model,
        })
    }

    /// Whether `name` belongs to the MLM head (what a base-model folder lacks).
    pub fn is_head_tensor(name: &str) -> bool {
        name.starts_with("head.") || name.starts_with("decoder.")
    }

    /// Vocabulary logits at `positions` (flat `b * seq + t`, u32) or at every position.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let hidden = self
            .model
            .forward_rows_t(input_ids, attention_mask, positions, mode)?;
        let kernels = self.model.config.kernels;
        let xs = kernels.gelu_erf(&self.head_dense.forward(&hidden)?)?;
        let xs = self.head_norm.forward(&xs)?;
        let table = self.model.tok_embeddings.embeddings();
        Ok(kernels.linear(&xs, table, &self.decoder_bias)?)
    }
}

/// HF `ModernBertForSequenceClassification`: `model`, then the `[CLS]` vector or the mean over
/// non-padding tokens (`classifier_pooling`), `head` (dense, GELU, norm), dropout and
/// `classifier` (with a bias).
#[derive(Debug, Clone)]
pub struct ModernBertForSequenceClassification {
    pub model: ModernBertModel,
    head_dense: Linear,
    head_norm: LayerNorm,
    dropout: Dropout,
    classifier: Linear,
    mean: bool,
}

impl ModernBertForSequenceClassification {
    /// `mean`: mean pooling (else `[CLS]`); `classifier_dropout` as HF's config field.
    pub fn load(
        vb: VarBuilder,
        cfg: &ModernBertConfig,
        num_labels: usize,
        mean: bool,
        classifier_dropout: f64,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(ModernBertForSequenceClassification {
            model: ModernBertModel::load(vb.pp("model"), cfg)?,
            head_dense: dense(cfg, vb.pp("head").pp("dense"), h, h, cfg.classifier_bias)?,
            head_norm: norm(cfg, vb.pp("head").pp("norm"))?,
            dropout: dropout(cfg, classifier_dropout, 1 << 32),
            classifier: dense(cfg, vb.pp("classifier"), h, num_labels, true)?,
            mean,
        })
    }

    /// The names of the tensors a backbone folder lacks.
    pub fn is_head_tensor(name: &str) -> bool {
        name.starts_with("head.") || name.starts_with("classifier.")
    }

    /// Class logits, (batch, num_labels).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let hidden = self
            .model
            .forward_t(input_ids, Some(attention_mask), mode)?;
        let pooled = pool(&hidden, attention_mask, (b, t), self.mean)?;
        let xs = self
            .model
            .config
            .kernels
            .gelu_erf(&self.head_dense.forward(&pooled)?)?;
        let xs = self
            .dropout
            .forward_t(&self.head_norm.forward(&xs)?, mode)?;
        Ok(self.classifier.forward(&xs)?)
    }
}

/// (batch * seq, hidden) hidden states -> (batch, hidden): the first token's, or the mean over
/// the tokens `mask` keeps.
pub fn pool(hidden: &Tensor, mask: &Tensor, (b, t): (usize, usize), mean: bool) -> Result<Tensor> {
    let h = hidden.dim(1)?;
    let pooling = if mean {
        crate::bert::Pooling::Mean
    } else {
        crate::bert::Pooling::Cls
    };
    Ok(pooling.apply(&hidden.reshape((b, t, h))?, mask)?)
}

/// ModernBERT's initialisation (`ModernBertPreTrainedModel._init_weights`), seeded per name:
/// truncated normals (at `initializer_cutoff_factor` standard deviations) with
/// `initializer_range` for the embeddings, `Wqkv` and `Wi`, and `initializer_range /
/// sqrt(2 * layers)` for the output projections (`Wo`) and the head's dense layer; norms 1,
/// biases 0.
pub fn init(varmap: &candle_nn::VarMap, seed: u64, cfg: &ModernBertConfig) -> Result<()> {
    let out_std = cfg.initializer_range / (2.0 * cfg.num_hidden_layers as f64).sqrt();
    crate::init::reinit(varmap, "", |name, dims| {
        let std = if name.ends_with("Wo.weight") || name.ends_with("head.dense.weight") {
            out_std
        } else {
            cfg.initializer_range
        };
        let cut = (cfg.initializer_cutoff_factor * std) as f32;
        crate::init::truncated_normal(seed, name, std as f32, cut, dims.iter().product())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny(dropout: f64) -> (ModernBertForMaskedLM, VarMap) {
        let cfg: ModernBertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3,
            "num_attention_heads": 2, "max_position_embeddings": 32, "local_attention": 4,
            "attention_dropout": dropout, "mlp_dropout": dropout, "embedding_dropout": dropout,
        }))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = ModernBertForMaskedLM::load(vb, &cfg).unwrap();
        init(&varmap, 3, &cfg).unwrap();
        (model, varmap)
    }

    fn logits(m: &ModernBertForMaskedLM, mode: Mode) -> Vec<f32> {
        let ids = Tensor::from_vec(
            (0..24u32).map(|i| (i * 7) % 50).collect(),
            (2, 12),
            &Device::Cpu,
        )
        .unwrap();
        m.forward_t(&ids, None, None, mode)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn dropout_applies_in_training_only_and_follows_the_seed() {
        let (m, _) = tiny(0.2);
        assert_eq!(logits(&m, Mode::Eval), logits(&m, Mode::Eval));
        let a = logits(&m, Mode::Train { seed: 1 });
        assert_eq!(
            a,
            logits(&m, Mode::Train { seed: 1 }),
            "same seed, same masks"
        );
        assert_ne!(a, logits(&m, Mode::Train { seed: 2 }));
        assert_ne!(a, logits(&m, Mode::Eval));
        let (m0, _) = tiny(0.0);
        assert_eq!(
            logits(&m0, Mode::Train { seed: 1 }),
            logits(&m0, Mode::Eval)
        );
    }

    #[test]
    fn the_last_layer_at_the_predicted_rows_equals_selecting_them_forward_and_backward() {
        let (m, varmap) = tiny(0.0);
        assert!(m.model.last_layer_at_rows());
        let ids = Tensor::from_vec(
            (0..24u32).map(|i| (i * 7) % 50).collect(),
            (2, 12),
            &Device::Cpu,
        )
        .unwrap();
        let rows = Tensor::new(&[1u32, 4, 13, 22], &Device::Cpu).unwrap();
        let run = |at_rows: bool| {
            let logits = if at_rows {
                m.forward_t(&ids, None, Some(&rows), Mode::Eval).unwrap()
            } else {
                let all = m.forward_t(&ids, None, None, Mode::Eval).unwrap();
                all.index_select(&rows, 0).unwrap()
            };
            let g = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let data = varmap.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            let grads: Vec<Vec<f32>> = names
                .iter()
                .map(|n| {
                    let t = g
                        .get(data[*n].as_tensor())
                        .expect("every parameter has a gradient");
                    t.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect();
            (
                logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                grads,
            )
        };
        let ((l1, g1), (l2, g2)) = (run(true), run(false));
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5);
        assert!(close(&l1, &l2), "logits differ");
        assert!(
            g1.iter().zip(&g2).all(|(a, b)| close(a, b)),
            "gradients differ"
        );
    }

    /// The one-node layer (`crate::fused_modernbert`) computes what the composed layer
    /// computes: output, dL/dx and every parameter's gradient to 1e-5 relative, for the first
    /// layer (no attention norm, global) and a local one, with and without biases, dropout on
    /// all three sites in training and off in evaluation, a padded batch element, at every row
    /// and at some rows (a batch element with none; each dropout element drawn as at its place
    /// in the full layer).
    #[test]
    fn the_one_node_layer_matches_the_composed_layer_forward_and_backward() {
        use crate::test_util::{max_rel_diff, uniform};
        use candle_core::Var;
        for biases in [false, true] {
            let cfg: ModernBertConfig = serde_json::from_value(serde_json::json!({
                "vocab_size": 50, "hidden_size": 32, "intermediate_size": 40,
                "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
                "local_attention": 6, "global_attn_every_n_layers": 2,
                "attention_dropout": 0.1, "mlp_dropout": 0.1,
                "attention_bias": biases, "mlp_bias": biases, "norm_bias": biases,
            }))
            .unwrap();
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let layers: Vec<ModernBertLayer> = (0..2)
                .map(|i| ModernBertLayer::load(vb.pp(i), &cfg, i).unwrap())
                .collect();
            // Non-trivial norms and biases, so that their gradients are tested too.
            for (name, var) in varmap.data().lock().unwrap().iter() {
                let noise = uniform(var.dims(), name.len() as u64, 0.3);
                var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
            }
            let (b, t) = (3, 11);
            let rotary = Rotary::new(t, 8, 10_000.0, &Device::Cpu).unwrap();
            let x = Var::from_tensor(&uniform(&[b * t, 32], 1, 2.0)).unwrap();
            let mut mask = vec![0f32; b * t];
            mask[2 * t + 7..].fill(-1e9);
            let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
            let list = [0u32, 3, 4, 10, 22, 25, 31];
            let index = Tensor::new(&list, &Device::Cpu).unwrap();
            for (layer, mode, rows) in [
                (0, Mode::Train { seed: 5 }, false),
                (1, Mode::Train { seed: 5 }, false),
                (1, Mode::Eval, false),
                (0, Mode::Train { seed: 6 }, true),
                (1, Mode::Train { seed: 6 }, true),
            ] {
                let l = &layers[layer];
                assert_eq!(l.attn_norm.is_none(), layer == 0);
                assert_eq!(l.window, (layer == 1).then_some(3));
                let r = uniform(&[if rows { list.len() } else { b * t }, 32], 2, 1.0);
                let at = rows.then_some(&index);
                let run = |fused: bool| {
                    let xs = x.as_tensor();
                    let y = if fused {
                        l.forward_fused(xs, (b, t), &mask, &rotary, mode, rows.then_some(&list))
                    } else {
                        // The full composed layer, then the rows.
                        let all = l.forward_composed(xs, (b, t), &mask, &rotary, mode, None);
                        match at {
                            Some(index) => all.unwrap().index_select(index, 0),
                            None => all,
                        }
                    }
                    .unwrap();
                    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, grads)
                };
                let ((y1, g1), (y2, g2)) = (run(true), run(false));
                let case = format!("biases {biases}, layer {layer}, {mode:?}, rows {rows}");
                assert!(max_rel_diff(&y1, &y2) < 1e-5, "{case}: output");
                let dx =
                    |g: &candle_core::backprop::GradStore| g.get(x.as_tensor()).unwrap().clone();
                assert!(max_rel_diff(&dx(&g1), &dx(&g2)) < 1e-5, "{case}: dx");
                for (name, var) in varmap.data().lock().unwrap().iter() {
                    if !name.starts_with(&format!("{layer}.")) {
                        continue;
                    }
                    let (a, c) = (g1.get(var.as_tensor()), g2.get(var.as_tensor()));
                    let (a, c) = (a.expect(name), c.expect(name));
                    let d = max_rel_diff(a, c);
                    assert!(d < 1e-5, "{case}: {name}: relative difference {d}");
                    assert!(crate::test_util::abs_sum(a) > 0.0, "{case}: {name} is zero");
                }
            }
        }
    }

    /// bf16 mixed precision (the GPU path, here on CPU): the model computes in bf16 from f32
    /// master weights, its logits follow the f32 model's, and every parameter gets an f32
    /// gradient close to the f32 model's. Dropout is on: both draw the same masks.
    #[test]
    fn bf16_mixed_precision_follows_f32_and_trains_every_parameter() {
        let (mut m, varmap) = tiny(0.1);
        let ids = Tensor::from_vec(
            (0..24u32).map(|i| (i * 7) % 50).collect(),
            (2, 12),
            &Device::Cpu,
        )
        .unwrap();
        let positions = Tensor::new(&[1u32, 4, 13, 22], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[5u32, 9, 33, 48], &Device::Cpu).unwrap();
        let mode = Mode::Train { seed: 11 };
        let mut run = |dtype: Option<DType>| {
            m.model.compute_dtype = dtype;
            let logits = m.forward_t(&ids, None, Some(&positions), mode).unwrap();
            assert_eq!(logits.dtype(), dtype.unwrap_or(DType::F32));
            let loss = crate::ops::cross_entropy(&logits, &labels).unwrap();
            (
                logits.to_dtype(DType::F32).unwrap(),
                loss.backward().unwrap(),
            )
        };
        let (l32, g32) = run(None);
        let (l16, g16) = run(Some(DType::BF16));
        let d = crate::test_util::max_rel_diff(&l16, &l32);
        assert!(d < 3e-2, "logits differ by {d}");
        let vars = varmap.data().lock().unwrap();
        assert!(vars.len() > 20);
        for (name, var) in vars.iter() {
            let g = g16.get(var.as_tensor()).expect(name);
            assert_eq!(g.dtype(), DType::F32, "{name}");
            let d = crate::test_util::max_rel_diff(g, g32.get(var.as_tensor()).expect(name));
            assert!(d < 0.1, "{name}: bf16 gradient differs by {d}");
            assert!(
                crate::test_util::abs_sum(g) > 0.0,
                "{name}: zero gradient in bf16"
            );
        }
    }

    #[test]
    fn the_layer_pattern_and_window_follow_the_config() {
        let (m, _) = tiny(0.0);
        let windows: Vec<Option<usize>> = m.model.layers.iter().map(|l| l.window).collect();
        assert_eq!(windows, [None, Some(2), Some(2)]);
        let mut cfg = m.model.config.clone();
        cfg.layer_types = Some(vec![
            "sliding_attention".into(),
            "full_attention".into(),
            "sliding_attention".into(),
        ]);
        assert!(!cfg.is_global(0) && cfg.is_global(1));
        cfg.rope_parameters = Some(serde_json::json!({"full_attention": {"rope_theta": 5e5}}));
        assert_eq!(
            (cfg.rope_theta(true), cfg.rope_theta(false)),
            (5e5, 10_000.0)
        );
    }

    #[test]
    fn init_draws_truncated_normals_with_smaller_output_projections() {
        let (_, varmap) = tiny(0.0);
        let data = varmap.data().lock().unwrap();
        let std = |name: &str| {
            let v: Vec<f32> = data[name].flatten_all().unwrap().to_vec1().unwrap();
            let max = v.iter().fold(0f32, |a, x| a.max(x.abs()));
            let s = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
            (s, max)
        };
        let (wi, wi_max) = std("model.layers.1.mlp.Wi.weight");
        let (wo, wo_max) = std("model.layers.1.mlp.Wo.weight");
        assert!(wo < wi, "Wo {wo} is drawn narrower than Wi {wi}");
        assert!(wi_max <= 2.0 * 0.02 + 1e-6 && wo_max <= 2.0 * 0.02 / 6f32.sqrt() + 1e-6);
        let norm: Vec<f32> = data["model.final_norm.weight"].to_vec1().unwrap();
        assert!(norm.iter().all(|&x| x == 1.0));
    }
}
