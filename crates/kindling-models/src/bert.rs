//! BERT (Devlin et al., 2019, <https://arxiv.org/abs/1810.04805>), trainable, with the parameter
//! names of HF `transformers`' `modeling_bert.py`, so `model.safetensors` files move both ways.
//!
//! Modules go bottom-up as in HF: embeddings, self-attention, attention output, intermediate,
//! output, layer, encoder, model, and the masked-LM head. Inside the encoder, hidden states are
//! kept flat, `(batch * seq, hidden)`, so every linear layer is one plain gemm.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::fused_layer::{LayerArgs, LayerDropout, LayerParams};
use crate::nn::{Dropout, LayerNorm, Linear};
use crate::ops::Kernels;
use crate::{ModelError, Result};
use kindling_core::Mode;

/// HF `hidden_act`: the feed-forward activation. A name outside these is an error naming
/// them, as the config is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// The exact, erf-based GELU (HF's "gelu").
    #[default]
    Gelu,
    /// The tanh approximation of GELU, under HF's two names for it.
    GeluNew,
    GeluPytorchTanh,
    Relu,
}
fn default_model_type() -> String {
    "bert".into()
}

/// The members of the BERT family this encoder computes. RoBERTa (Liu et al., 2019,
/// <https://arxiv.org/abs/1907.11692>) is BERT's encoder under other names (`roberta.*`,
/// `lm_head.*`, `classifier.{dense,out_proj}`), with positions counted from `pad_token_id + 1`
/// (HF's `create_position_ids_from_input_ids`; equal for right-padded rows, the only kind
/// Kindling builds) and one token type. Read from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    Bert,
    Roberta,
}

impl Flavour {
    /// The `model_type`s this file reads.
    pub const NAMES: [&'static str; 2] = ["bert", "roberta"];

    /// The name of the encoder inside HF's task models (`bert.encoder...`).
    pub fn prefix(self) -> &'static str {
        match self {
            Flavour::Bert => "bert",
            Flavour::Roberta => "roberta",
        }
    }

    /// HF's class name for the encoder with `task` after it (`"ForMaskedLM"`, `"Model"`).
    pub fn class(self, task: &str) -> String {
        match self {
            Flavour::Bert => format!("Bert{task}"),
            Flavour::Roberta => format!("Roberta{task}"),
        }
    }
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

/// HF `BertConfig`: the fields of `config.json`. Unknown fields are ignored, as HF does, so
/// any BERT-family `config.json` parses. Defaults are bert-base's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default)]
    pub hidden_act: HiddenAct,
    #[serde(default = "d01")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "d01")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d512")]
    pub max_position_embeddings: usize,
    #[serde(default = "d2")]
    pub type_vocab_size: usize,
    #[serde(default = "d002")]
    pub initializer_range: f64,
    #[serde(default = "d1e12")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// RoBERTa's `<s>` and `</s>` ids (HF's RobertaConfig carries them; BERT's does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<usize>,
    /// The kernel path every layer of a model built from this config takes. Not a
    /// `config.json` field (never read or written there): a recipe's `kernels`.
    #[serde(skip)]
    pub kernels: crate::ops::Kernels,
    /// Run the encoder on the real tokens of padded batches only (a recipe's `unpad`), where
    /// the layers take the CUDA kernel path (`cuda_layer.rs`); elsewhere it changes nothing.
    /// Not a `config.json` field.
    #[serde(skip)]
    pub unpad: bool,
}

fn d768() -> usize {
    768
}
fn d12() -> usize {
    12
}
fn d3072() -> usize {
    3072
}
fn d512() -> usize {
    512
}
fn d2() -> usize {
    2
}
fn d01() -> f64 {
    0.1
}
fn d002() -> f64 {
    0.02
}
fn d1e12() -> f64 {
    1e-12
}

impl BertConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        let field = |field: &'static str, msg: String| Err(ModelError::Setting { field, msg });
        crate::check_sizes(
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
                ("max_position_embeddings", self.max_position_embeddings),
                ("type_vocab_size", self.type_vocab_size),
            ],
            1 << 24,
        )?;
        crate::check_dropouts(&[
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ])?;
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return field(
                "initializer_range",
                format!(
                    "must be a finite number >= 0, got {}",
                    self.initializer_range
                ),
            );
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return field(
                "layer_norm_eps",
                format!("must be a finite number > 0, got {}", self.layer_norm_eps),
            );
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
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !Flavour::NAMES.contains(&self.model_type.as_str()) {
            return field(
                "model_type",
                format!(
                    "`{}` is not a supported architecture (one of {:?})",
                    self.model_type,
                    Flavour::NAMES
                ),
            );
        }
        if self.max_position_embeddings <= self.position_offset() {
            return field(
                "max_position_embeddings",
                format!(
                    "{} leaves no position for a token: RoBERTa counts positions from \
                     pad_token_id + 1 = {}",
                    self.max_position_embeddings,
                    self.position_offset()
                ),
            );
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type `{}` is not supported (absolute)",
                self.position_embedding_type
            ));
        }
        Ok(())
    }

    /// Which member of the BERT family (from `model_type`; see [`Flavour`]).
    pub fn flavour(&self) -> Flavour {
        match self.model_type.as_str() {
            "roberta" => Flavour::Roberta,
            _ => Flavour::Bert,
        }
    }

    /// The position-table row of a sequence's first token: 0 for BERT, `pad_token_id + 1` for
    /// RoBERTa.
    pub fn position_offset(&self) -> usize {
        match self.flavour() {
            Flavour::Bert => 0,
            Flavour::Roberta => self.pad_token_id + 1,
        }
    }

    /// The longest sequence the position table holds.
    pub fn max_seq_len(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// Parameters of the encoder's linear layers: the "non-embedding" count used for FLOPs.
    pub fn encoder_linear_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        self.num_hidden_layers * (4 * h * h + 2 * h * i)
    }

    /// Parameters of a `BertForMaskedLM` of this shape (the decoder is tied).
    pub fn mlm_params(&self) -> usize {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let emb = (v + self.max_position_embeddings + self.type_vocab_size + 2) * h;
        let per_layer = 4 * h * h + 2 * h * self.intermediate_size + 9 * h + self.intermediate_size;
        emb + self.num_hidden_layers * per_layer + h * h + 3 * h + v
    }

    /// A rough upper estimate of the memory one MLM training step needs, in bytes: weights,
    /// gradients and AdamW moments (16 bytes per parameter), the activations kept for the
    /// backward pass (about 13 hidden-sized and 2 intermediate-sized vectors per token and
    /// layer) doubled for the backward's temporaries, and the logits at `predicted` positions.
    /// Used to refuse a batch that cannot fit before allocating it.
    pub fn mlm_train_bytes(&self, tokens: usize, predicted: usize) -> f64 {
        let (h, i) = (self.hidden_size as f64, self.intermediate_size as f64);
        let state = 16.0 * self.mlm_params() as f64;
        let acts = 2.0 * 4.0 * self.num_hidden_layers as f64 * tokens as f64 * (13.0 * h + 2.0 * i);
        let logits = 3.0 * 4.0 * predicted as f64 * self.vocab_size as f64;
        state + acts + logits
    }

    /// Matmul FLOPs of one training step (forward + backward = 3 x forward) for `tokens` tokens
    /// of length `seq`, with the vocabulary projection at `predicted` positions only, and with
    /// `last_layer_at_predicted` the last layer's queries, attention output and feed-forward
    /// block there too (`BertModel::forward_rows_t` on CPU f32): the FLOPs actually done.
    pub fn train_flops(
        &self,
        tokens: usize,
        seq: usize,
        predicted: usize,
        last_layer_at_predicted: bool,
    ) -> f64 {
        let (h, i, v, l) = (
            self.hidden_size as f64,
            self.intermediate_size as f64,
            self.vocab_size as f64,
            self.num_hidden_layers as f64,
        );
        let (t, p, s) = (tokens as f64, predicted as f64, seq as f64);
        let per_layer = 4.0 * h * h + 2.0 * h * i;
        let (enc, attn) = if last_layer_at_predicted && l > 0.0 {
            (
                6.0 * ((l - 1.0) * per_layer * t + 2.0 * h * h * t + (per_layer - 2.0 * h * h) * p),
                12.0 * s * h * ((l - 1.0) * t + p),
            )
        } else {
            (6.0 * per_layer * l * t, 12.0 * l * s * h * t)
        };
        let head = 6.0 * (h * h + h * v) * p;
        enc + attn + head
    }
}

fn activation(kernels: Kernels, act: HiddenAct, xs: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        HiddenAct::Gelu => kernels.gelu_erf(xs),
        HiddenAct::GeluNew | HiddenAct::GeluPytorchTanh => xs.gelu(),
        HiddenAct::Relu => xs.relu(),
    }
}

// The building blocks on the config's kernel path, which every layer keeps.
fn new_linear(
    cfg: &BertConfig,
    inp: usize,
    out: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    Ok(Linear::load(inp, out, vb)?.with_kernels(cfg.kernels))
}
fn new_norm(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm::load(cfg.hidden_size, cfg.layer_norm_eps, vb)?.with_kernels(cfg.kernels))
}
fn new_dropout(cfg: &BertConfig, p: f64, site: u64) -> Dropout {
    Dropout::new(p as f32, site).with_kernels(cfg.kernels)
}

/// `bert.embeddings`: word + position + token-type embeddings, LayerNorm, dropout.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    position_embeddings: Tensor,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: Dropout,
    hidden_size: usize,
    /// [`BertConfig::position_offset`].
    position_offset: usize,
    kernels: Kernels,
}

impl BertEmbeddings {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(BertEmbeddings {
            word_embeddings: candle_nn::embedding(cfg.vocab_size, h, vb.pp("word_embeddings"))?,
            position_embeddings: vb.pp("position_embeddings").get_with_hints(
                (cfg.max_position_embeddings, h),
                "weight",
                candle_nn::Init::Const(0.0),
            )?,
            token_type_embeddings: candle_nn::embedding(
                cfg.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: new_norm(cfg, vb.pp("LayerNorm"))?,
            dropout: new_dropout(cfg, cfg.hidden_dropout_prob, 0),
            hidden_size: h,
            position_offset: cfg.position_offset(),
            kernels: cfg.kernels,
        })
    }

    /// (batch, seq) ids -> (batch * seq, hidden).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let table = self.word_embeddings.embeddings();
        if self.kernels.fuses(table) && input_ids.dtype() == DType::U32 {
            // One node on CPU f32 (`crate::fused_embeddings`).
            let (rows, off) = (self.position_embeddings.dim(0)?, self.position_offset);
            let positions = self.position_embeddings.narrow(0, off, rows - off)?;
            let tables = crate::fused_embeddings::EmbeddingTables {
                word: table,
                position: &positions,
                token_type: self.token_type_embeddings.embeddings(),
                ln_weight: &self.layer_norm.weight,
                ln_bias: &self.layer_norm.bias,
            };
            let stream = self.dropout.stream(mode);
            let eps = self.layer_norm.eps;
            return crate::fused_embeddings::embeddings(
                input_ids,
                token_type_ids,
                tables,
                eps,
                stream,
            );
        }
        self.forward_composed(input_ids, token_type_ids, mode)
    }

    /// [`BertEmbeddings::forward_t`] from the separate ops (each its own autograd node).
    fn forward_composed(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let words = self
            .kernels
            .embedding(self.word_embeddings.embeddings(), &input_ids.flatten_all()?)?; // (b*t, h)
        let positions = self
            .position_embeddings
            .narrow(0, self.position_offset, t)?; // (t, h)
        let types = match token_type_ids {
            Some(tt) => self.token_type_embeddings.forward(&tt.flatten_all()?)?,
            // All zeros: row 0, broadcast.
            None => self.token_type_embeddings.embeddings().narrow(0, 0, 1)?,
        };
        let xs = words
            .reshape((b, t, self.hidden_size))?
            .broadcast_add(&positions)?
            .reshape((b * t, self.hidden_size))?
            .broadcast_add(&types)?;
        let xs = self.layer_norm.forward(&xs)?;
        self.dropout.forward_t(&xs, mode)
    }
}

/// `attention.self` + `attention.output`: multi-head self-attention with its residual block.
#[derive(Debug, Clone)]
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
    probs_dropout: Dropout,
    output_dropout: Dropout,
    heads: usize,
    kernels: Kernels,
}

impl BertAttention {
    fn load(vb: VarBuilder, cfg: &BertConfig, site: u64) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let s = vb.pp("self");
        let o = vb.pp("output");
        Ok(BertAttention {
            query: new_linear(cfg, h, h, s.pp("query"))?,
            key: new_linear(cfg, h, h, s.pp("key"))?,
            value: new_linear(cfg, h, h, s.pp("value"))?,
            output_dense: new_linear(cfg, h, h, o.pp("dense"))?,
            output_layer_norm: new_norm(cfg, o.pp("LayerNorm"))?,
            probs_dropout: new_dropout(cfg, cfg.attention_probs_dropout_prob, site),
            output_dropout: new_dropout(cfg, cfg.hidden_dropout_prob, site + 1),
            heads: cfg.num_attention_heads,
            kernels: cfg.kernels,
        })
    }

    /// (b*t, h) -> (b*t, h). `mask_bias`: additive (b, t), 0 to attend, very negative not to.
    fn forward_t(
        &self,
        xs: &Tensor,
        b: usize,
        t: usize,
        mask_bias: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let ctx = self.kernels.self_attention_windowed(
            &self.query.forward(xs)?,
            &self.key.forward(xs)?,
            &self.value.forward(xs)?,
            (b, t, self.heads),
            mask_bias,
            None,
            self.probs_dropout.stream(mode),
        )?;
        let out = self
            .output_dropout
            .forward_t(&self.output_dense.forward(&ctx)?, mode)?;
        self.output_layer_norm.forward(&(out + xs)?)
    }
}

/// `encoder.layer.N`: attention, then the feed-forward block (`intermediate` + `output`).
#[derive(Debug, Clone)]
struct BertLayer {
    attention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_layer_norm: LayerNorm,
    output_dropout: Dropout,
    act: HiddenAct,
    kernels: Kernels,
}

impl BertLayer {
    fn load(vb: VarBuilder, cfg: &BertConfig, index: usize) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let site = 1 + 3 * index as u64;
        Ok(BertLayer {
            attention: BertAttention::load(vb.pp("attention"), cfg, site)?,
            intermediate: new_linear(cfg, h, i, vb.pp("intermediate").pp("dense"))?,
            output: new_linear(cfg, i, h, vb.pp("output").pp("dense"))?,
            output_layer_norm: new_norm(cfg, vb.pp("output").pp("LayerNorm"))?,
            output_dropout: new_dropout(cfg, cfg.hidden_dropout_prob, site + 2),
            act: cfg.hidden_act,
            kernels: cfg.kernels,
        })
    }

    /// Whether [`BertLayer::forward_t`] runs as one fused op (CPU f32 with the exact GELU, on
    /// the fused path).
    fn fuses(&self, xs: &Tensor, mask_bias: &Tensor) -> bool {
        self.kernels.fuses(xs) && self.act == HiddenAct::Gelu && mask_bias.dtype() == DType::F32
    }

    /// (b*t, h) -> (b*t, h), or with `rows` (flat indices, u32) just those rows: (rows, h). One
    /// fused op on CPU f32 with the exact GELU (`crate::fused_layer`), which computes only what
    /// the rows need when they are increasing; the composition of the separate ops otherwise
    /// (every row, then the selection).
    fn forward_t(
        &self,
        xs: &Tensor,
        b: usize,
        t: usize,
        mask_bias: &Tensor,
        mode: Mode,
        rows: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let fuses = self.fuses(xs, mask_bias);
        if fuses {
            if let Some(r) = rows {
                let list = r.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                if crate::ops::rows_can_query(&list, b * t) {
                    return self.forward_fused(xs, b, t, mask_bias, mode, Some(&list));
                }
            }
        }
        let all = if fuses {
            self.forward_fused(xs, b, t, mask_bias, mode, None)?
        } else if self.act == HiddenAct::Gelu && self.kernels == Kernels::Fused {
            self.forward_explicit(xs, b, t, mask_bias, mode)?
        } else {
            self.forward_composed(xs, b, t, mask_bias, mode)?
        };
        match rows {
            Some(r) => all.index_select(r, 0),
            None => Ok(all),
        }
    }

    /// What the one-node layers take: the parameters (in their flat tensor's order), shape,
    /// LayerNorm epsilon and dropout streams.
    fn args(&self, b: usize, t: usize, mode: Mode) -> candle_core::Result<LayerArgs<'_>> {
        let a = &self.attention;
        Ok(LayerArgs {
            params: LayerParams([
                &a.query.weight,
                &a.query.bias,
                &a.key.weight,
                &a.key.bias,
                &a.value.weight,
                &a.value.bias,
                &a.output_dense.weight,
                &a.output_dense.bias,
                &a.output_layer_norm.weight,
                &a.output_layer_norm.bias,
                &self.intermediate.weight,
                &self.intermediate.bias,
                &self.output.weight,
                &self.output.bias,
                &self.output_layer_norm.weight,
                &self.output_layer_norm.bias,
            ]),
            dims: (b, t, a.heads),
            intermediate: self.intermediate.bias.dim(0)?,
            eps: self.output_layer_norm.eps,
            dropout: LayerDropout {
                probs: a.probs_dropout.stream(mode),
                attention_output: a.output_dropout.stream(mode),
                output: self.output_dropout.stream(mode),
            },
        })
    }

    /// The layer as one autograd node of candle's ops (`crate::explicit_layer`): GPUs and
    /// bf16/f16 activations, with the exact GELU.
    fn forward_explicit(
        &self,
        xs: &Tensor,
        b: usize,
        t: usize,
        mask_bias: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        crate::explicit_layer::encoder_layer(xs, self.args(b, t, mode)?, mask_bias)
    }

    fn forward_fused(
        &self,
        xs: &Tensor,
        b: usize,
        t: usize,
        mask_bias: &Tensor,
        mode: Mode,
        rows: Option<&[u32]>,
    ) -> candle_core::Result<Tensor> {
        crate::fused_layer::encoder_layer(xs, self.args(b, t, mode)?, mask_bias, rows)
    }

    /// The layer on unpadded rows (CUDA kernel path): `xs` (rows, h) the real tokens, `map`
    /// their places in the padded (b, t) batch.
    #[cfg(any(feature = "cuda", test))]
    fn forward_unpadded(
        &self,
        xs: &Tensor,
        (b, t): (usize, usize),
        mask_bias: &Tensor,
        mode: Mode,
        map: &Tensor,
    ) -> candle_core::Result<Tensor> {
        crate::cuda_layer::encoder_layer_rows(xs, self.args(b, t, mode)?, mask_bias, Some(map))
    }

    /// The same layer from the separate ops (each its own autograd node).
    fn forward_composed(
        &self,
        xs: &Tensor,
        b: usize,
        t: usize,
        mask_bias: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let attn = self.attention.forward_t(xs, b, t, mask_bias, mode)?;
        let inner = activation(self.kernels, self.act, &self.intermediate.forward(&attn)?)?;
        let out = self
            .output_dropout
            .forward_t(&self.output.forward(&inner)?, mode)?;
        self.output_layer_norm.forward(&(out + attn)?)
    }
}

/// `bert`: embeddings and encoder (no pooler, as in HF `BertForMaskedLM`).
#[derive(Debug, Clone)]
pub struct BertModel {
    pub embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pub config: BertConfig,
    /// Mixed precision: the dtype the encoder layers compute in (bf16/f16 on a GPU) while the
    /// parameters stay in their own dtype (f32 master weights). `None`: the parameters' dtype.
    pub compute_dtype: Option<DType>,
}

impl BertModel {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        cfg.validate()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp("encoder").pp("layer").pp(i), cfg, i))
            .collect::<candle_core::Result<_>>()?;
        Ok(BertModel {
            embeddings: BertEmbeddings::load(vb.pp("embeddings"), cfg)?,
            layers,
            config: cfg.clone(),
            compute_dtype: None,
        })
    }

    /// `input_ids` (batch, seq) u32; `attention_mask` (batch, seq), 1 = attend, 0 = padding.
    /// Returns the last hidden states, flat: (batch * seq, hidden).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        self.forward_rows_t(input_ids, token_type_ids, attention_mask, None, mode)
    }

    /// Whether [`BertModel::forward_rows_t`] computes the last layer at the rows only (the fused
    /// CPU f32 layer), rather than in full and then selecting.
    pub fn last_layer_at_rows(&self) -> bool {
        let w = self.embeddings.word_embeddings.embeddings();
        self.config.kernels == Kernels::Fused
            && matches!(w.device(), Device::Cpu)
            && self.compute_dtype.unwrap_or(w.dtype()) == DType::F32
            && self.config.hidden_act == HiddenAct::Gelu
    }

    /// [`BertModel::forward_t`] at `rows` only (flat `b * seq + t` indices, u32): (rows,
    /// hidden), equal to selecting those rows of the full output. On CPU f32 the last layer
    /// then computes queries, the attention output and the feed-forward block at those rows
    /// only (keys and values still at every row): a masked-LM step, whose loss reads ~15% of
    /// the rows, skips ~70% of its last layer. Earlier layers feed every row's keys and values,
    /// so they run in full.
    pub fn forward_rows_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        rows: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.config.max_seq_len() {
            return Err(ModelError::Config(format!(
                "sequence length {t} exceeds the {} positions of max_position_embeddings {}",
                self.config.max_seq_len(),
                self.config.max_position_embeddings
            )));
        }
        let dtype = self.embeddings.word_embeddings.embeddings().dtype();
        let mask_bias = match attention_mask {
            // (1 - mask) * -1e4 would overflow f16; HF uses the dtype's min. -1e9 is safe in f32.
            Some(m) => ((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * -1e9)?)
                .reshape((b, t))?
                .to_dtype(dtype)?,
            None => Tensor::zeros((b, t), dtype, input_ids.device())?,
        };
        let mut xs = self.embeddings.forward_t(input_ids, token_type_ids, mode)?;
        if let Some(d) = self.compute_dtype {
            // The embeddings' LayerNorm ran in f32; the layers take it from here in `d`.
            xs = xs.to_dtype(d)?;
        }
        #[cfg(any(feature = "cuda", test))]
        if let (None, Some(m)) = (rows, attention_mask) {
            if self.unpads(&xs) {
                let keep: Vec<u32> = m
                    .to_dtype(DType::U32)?
                    .flatten_all()?
                    .to_vec1::<u32>()?
                    .iter()
                    .enumerate()
                    .filter(|(_, &v)| v != 0)
                    .map(|(i, _)| i as u32)
                    .collect();
                if keep.len() < b * t {
                    return self.forward_unpadded(xs, (b, t), &mask_bias, mode, &keep);
                }
            }
        }
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let rows = if i == last { rows } else { None };
            xs = layer.forward_t(&xs, b, t, &mask_bias, mode, rows)?;
        }
        if self.layers.is_empty() {
            if let Some(r) = rows {
                xs = xs.index_select(r, 0)?;
            }
        }
        Ok(xs)
    }
}

impl BertModel {
    /// Whether a padded batch runs unpadded: `unpad` on and every layer on the CUDA kernel path.
    #[cfg(any(feature = "cuda", test))]
    fn unpads(&self, xs: &Tensor) -> bool {
        self.config.unpad
            && self.config.kernels == Kernels::Fused
            && self.config.hidden_act == HiddenAct::Gelu
            && crate::cuda_layer::serves(xs, self.config.hidden_size)
    }

    /// The layers on the real tokens only (`keep`: their flat places `b * t + s`), the output
    /// scattered back to (b * t, hidden) with zero rows at padding (what pooling skips; the
    /// padded path leaves its own values there, which nothing reads).
    #[cfg(any(feature = "cuda", test))]
    fn forward_unpadded(
        &self,
        xs: Tensor,
        (b, t): (usize, usize),
        mask_bias: &Tensor,
        mode: Mode,
        keep: &[u32],
    ) -> Result<Tensor> {
        let map = Tensor::new(keep, xs.device())?;
        let mut x = crate::ops::gather_rows(&xs, &map)?;
        for layer in &self.layers {
            x = layer.forward_unpadded(&x, (b, t), mask_bias, mode, &map)?;
        }
        Ok(crate::ops::scatter_rows(&x, b * t, &map)?)
    }
}

/// HF `BertForMaskedLM`: `bert` + `cls.predictions` (transform dense + GELU + LayerNorm, then the
/// decoder tied to the word embeddings, plus `cls.predictions.bias`). For RoBERTa, HF's
/// `RobertaForMaskedLM`: `roberta` + `lm_head` (`dense`, exact GELU, `layer_norm`, the tied
/// decoder and `lm_head.bias`): the same computation under other names.
#[derive(Debug, Clone)]
pub struct BertForMaskedLM {
    pub bert: BertModel,
    transform_dense: Linear,
    transform_layer_norm: LayerNorm,
    decoder_bias: Tensor,
    /// The head's activation: `hidden_act` for BERT, always the exact GELU for RoBERTa.
    head_act: HiddenAct,
}

impl BertForMaskedLM {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let flavour = cfg.flavour();
        let bert = BertModel::load(vb.pp(flavour.prefix()), cfg)?;
        let h = cfg.hidden_size;
        let (dense, norm, bias, p, head_act) = match flavour {
            Flavour::Bert => {
                let p = vb.pp("cls").pp("predictions");
                (
                    p.pp("transform").pp("dense"),
                    p.pp("transform").pp("LayerNorm"),
                    "bias",
                    p,
                    cfg.hidden_act,
                )
            }
            Flavour::Roberta => {
                let p = vb.pp("lm_head");
                (
                    p.pp("dense"),
                    p.pp("layer_norm"),
                    "bias",
                    p,
                    HiddenAct::Gelu,
                )
            }
        };
        Ok(BertForMaskedLM {
            transform_dense: new_linear(cfg, h, h, dense)?,
            transform_layer_norm: new_norm(cfg, norm)?,
            decoder_bias: p.get_with_hints(cfg.vocab_size, bias, candle_nn::Init::Const(0.0))?,
            head_act,
            bert,
        })
    }

    /// The names of the head's tensors (what a folder without an MLM head lacks).
    pub fn is_head_tensor(cfg: &BertConfig, name: &str) -> bool {
        match cfg.flavour() {
            Flavour::Bert => name.starts_with("cls."),
            Flavour::Roberta => name.starts_with("lm_head."),
        }
    }

    /// Vocabulary logits. With `positions` (flat `b * seq + t` indices, u32) only those rows are
    /// projected: (n_positions, vocab). Without, every position: (batch * seq, vocab).
    /// Projecting only the ~15% masked positions cuts the head's cost by ~85%; for a small model
    /// with an 8k vocabulary that head is most of the step.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        // (m, h) at the positions, else (b*t, h)
        let hidden = self
            .bert
            .forward_rows_t(input_ids, None, attention_mask, positions, mode)?;
        let kernels = self.bert.config.kernels;
        let xs = activation(
            kernels,
            self.head_act,
            &self.transform_dense.forward(&hidden)?,
        )?;
        let xs = self.transform_layer_norm.forward(&xs)?;
        let decoder = self.bert.embeddings.word_embeddings.embeddings(); // (vocab, h), tied
        Ok(kernels.linear(&xs, decoder, &self.decoder_bias)?)
    }
}

/// How a sequence becomes one vector for a classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// HF's `BertPooler`: `tanh(dense([CLS]))`. What `BertForSequenceClassification` does, so an
    /// export loads in transformers with the same logits.
    Cls,
    /// The mean of the hidden states over non-padding tokens (sentence-transformers' pooling).
    /// transformers' `BertForSequenceClassification` has no such option: exports made with it
    /// load there but compute different logits.
    Mean,
}

impl Pooling {
    /// Hidden states (batch, seq, hidden) -> (batch, hidden): the first token's vector, or the
    /// mean over the tokens `mask` (batch, seq; 1 = token, 0 = padding) keeps, in the hidden
    /// states' dtype. (For [`Pooling::Cls`] this is the raw vector; BERT's pooler dense layer
    /// is the classifier's business.)
    pub fn apply(self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean => {
                let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?; // (b, t, 1)
                let count = m.sum(1)?.clamp(1.0, f64::MAX)?; // (b, 1): all-padding rows give 0
                hidden.broadcast_mul(&m)?.sum(1)?.broadcast_div(&count)
            }
        }
    }
}

/// HF `BertForSequenceClassification`: `bert` (+ `bert.pooler.dense` with `[CLS]` pooling),
/// dropout, and `classifier` (hidden -> classes). For RoBERTa, HF's
/// `RobertaForSequenceClassification`: `roberta` and `classifier.dense` (the pooler's place)
/// then `classifier.out_proj`, with dropout before the dense layer too.
#[derive(Debug, Clone)]
pub struct BertForSequenceClassification {
    pub bert: BertModel,
    pooler: Option<Linear>,
    /// RoBERTa's dropout of the `<s>` vector before `classifier.dense`.
    pooler_dropout: Option<Dropout>,
    dropout: Dropout,
    classifier: Linear,
    pub pooling: Pooling,
}

/// Dropout site of the classifier, apart from the encoder's `0 ..= 3 * layers`.
const CLASSIFIER_DROPOUT_SITE: u64 = 1 << 32;

impl BertForSequenceClassification {
    /// `classifier_dropout`: HF's `config.classifier_dropout`, which defaults to
    /// `hidden_dropout_prob`.
    pub fn load(
        vb: VarBuilder,
        cfg: &BertConfig,
        num_labels: usize,
        pooling: Pooling,
        classifier_dropout: f64,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let flavour = cfg.flavour();
        let bert = BertModel::load(vb.pp(flavour.prefix()), cfg)?;
        let (pooler, classifier) = match flavour {
            Flavour::Bert => (vb.pp("bert").pp("pooler").pp("dense"), vb.pp("classifier")),
            Flavour::Roberta => (
                vb.pp("classifier").pp("dense"),
                vb.pp("classifier").pp("out_proj"),
            ),
        };
        let pooler = match pooling {
            Pooling::Cls => Some(new_linear(cfg, h, h, pooler)?),
            Pooling::Mean => None,
        };
        Ok(BertForSequenceClassification {
            bert,
            pooler,
            pooler_dropout: (flavour == Flavour::Roberta)
                .then(|| new_dropout(cfg, classifier_dropout, CLASSIFIER_DROPOUT_SITE + 1)),
            dropout: new_dropout(cfg, classifier_dropout, CLASSIFIER_DROPOUT_SITE),
            classifier: new_linear(cfg, h, num_labels, classifier)?,
            pooling,
        })
    }

    /// The names of the tensors a backbone folder lacks (the pooler and the classifier).
    pub fn is_head_tensor(cfg: &BertConfig, name: &str) -> bool {
        name.starts_with("classifier.")
            || (cfg.flavour() == Flavour::Bert && name.starts_with("bert.pooler."))
    }

    /// The pooled vectors, (batch, hidden), before dropout and the classifier.
    pub fn pooled(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let hidden = self
            .bert
            .forward_t(input_ids, token_type_ids, Some(attention_mask), mode)?;
        let h = hidden.dim(1)?;
        let hidden = hidden.reshape((b, t, h))?;
        Ok(match &self.pooler {
            Some(dense) => {
                let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
                let first = match &self.pooler_dropout {
                    Some(d) => d.forward_t(&first, mode)?,
                    None => first,
                };
                dense.forward(&first)?.tanh()?
            }
            None => Pooling::Mean.apply(&hidden, attention_mask)?,
        })
    }

    /// Class logits, (batch, num_labels); `token_type_ids` unset: all segment 0.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let pooled = self.pooled(input_ids, token_type_ids, attention_mask, mode)?;
        Ok(self
            .classifier
            .forward(&self.dropout.forward_t(&pooled, mode)?)?)
    }
}

/// Builds a `(batch, seq)` u32 tensor from flat ids.
pub fn ids_tensor(ids: &[u32], batch: usize, seq: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(ids, (batch, seq), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_rel_diff;
    use candle_core::Var;
    use candle_nn::VarMap;

    fn random((rows, cols): (usize, usize), seed: u64, scale: f32) -> Tensor {
        crate::test_util::uniform(&[rows, cols], seed, scale)
    }

    /// Adds uniform noise of `scale` to every variable: non-trivial LayerNorm parameters and
    /// biases, so that their gradients are tested too.
    fn perturb(varmap: &VarMap, scale: f32) {
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let noise = random((1, var.elem_count()), name.len() as u64, scale)
                .reshape(var.shape())
                .unwrap();
            var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
        }
    }

    /// A 2-layer masked LM (hidden 32, 4 heads) with HF initialisation at `std`, and its
    /// variables.
    fn test_mlm(vocab: usize, std: f64) -> (VarMap, BertForMaskedLM) {
        let cfg: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64,
        }))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = BertForMaskedLM::load(vb, &cfg).unwrap();
        crate::init::hf_init(&varmap, 3, std, None).unwrap();
        (varmap, model)
    }

    /// One perturbed encoder layer (hidden 32, 4 heads, intermediate 72, dropout 0.1 at all
    /// three sites) and its variables.
    fn test_layer() -> (VarMap, BertLayer) {
        let cfg: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 72,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        }))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let layer = BertLayer::load(vb.pp("layer"), &cfg, 0).unwrap();
        perturb(&varmap, 0.3);
        (varmap, layer)
    }

    /// bf16 mixed precision (the GPU path, here on CPU): the model computes in bf16 from f32
    /// master weights, its logits follow the f32 model's, and every parameter gets an f32
    /// gradient close to the f32 model's. Dropout is on: both draw the same masks.
    #[test]
    fn bf16_mixed_precision_follows_f32_and_trains_every_parameter() {
        let (varmap, mut model) = test_mlm(60, 0.1);
        let (b, t) = (2, 9);
        let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7 + 3) % 60).collect();
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let positions = Tensor::new(&[1u32, 4, 10, 17], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[5u32, 9, 33, 58], &Device::Cpu).unwrap();
        let mode = Mode::Train { seed: 11 };
        let mut run = |dtype: Option<DType>| {
            model.bert.compute_dtype = dtype;
            let logits = model.forward_t(&ids, None, Some(&positions), mode).unwrap();
            assert_eq!(logits.dtype(), dtype.unwrap_or(DType::F32));
            let loss = crate::ops::cross_entropy(&logits, &labels).unwrap();
            let grads = loss.backward().unwrap();
            (logits.to_dtype(DType::F32).unwrap(), grads)
        };
        let (l32, g32) = run(None);
        let (l16, g16) = run(Some(DType::BF16));
        let d = max_rel_diff(&l16, &l32);
        assert!(d < 3e-2, "logits differ by {d}");
        let vars = varmap.data().lock().unwrap();
        assert!(vars.len() > 30);
        for (name, var) in vars.iter() {
            let g = g16.get(var.as_tensor()).expect(name);
            assert_eq!(g.dtype(), DType::F32, "{name}");
            // The key bias's exact gradient is zero (it shifts a whole softmax row), so both
            // are rounding noise there; it must still be non-zero, as below.
            if !name.ends_with("key.bias") {
                let d = max_rel_diff(g, g32.get(var.as_tensor()).expect(name));
                assert!(d < 0.1, "{name}: bf16 gradient differs by {d}");
            }
            let norm = crate::test_util::abs_sum(g);
            assert!(norm > 0.0, "{name} gets a zero gradient in bf16");
        }
    }

    /// Checks a one-node layer (`one_node(layer, xs, mask, mode)`) against the layer composed
    /// of the separate ops, for each `(dtype, tolerance)`: output, dL/dx and every parameter's
    /// (f32) gradient, relative to the largest, with dropout on at all three sites and in eval
    /// mode, on a batch with a padded element.
    fn assert_matches_composed(
        one_node: impl Fn(&BertLayer, &Tensor, &Tensor, Mode) -> Tensor,
        dtypes: &[(DType, f32)],
    ) {
        let (varmap, layer) = test_layer();
        let (b, t) = (3, 11);
        let x = Var::from_tensor(&random((b * t, 32), 1, 2.0)).unwrap();
        let r = random((b * t, 32), 2, 1.0);
        // Batch element 1 has its last four positions padded.
        let mut mask = vec![0f32; b * t];
        mask[t + 7..2 * t].fill(-1e9);
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
        for &(dtype, tol) in dtypes {
            for mode in [Mode::Train { seed: 5 }, Mode::Eval] {
                let run = |node: bool| {
                    let xs = x.as_tensor().to_dtype(dtype).unwrap();
                    let y = if node {
                        one_node(&layer, &xs, &mask, mode)
                    } else {
                        layer.forward_composed(&xs, b, t, &mask, mode).unwrap()
                    };
                    assert_eq!(y.dtype(), dtype);
                    let y = y.to_dtype(DType::F32).unwrap();
                    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, grads)
                };
                let ((y1, g1), (y2, g2)) = (run(true), run(false));
                let d = max_rel_diff(&y1, &y2);
                assert!(d < tol, "{dtype:?} {mode:?} output: {d}");
                let dx =
                    |g: &candle_core::backprop::GradStore| g.get(x.as_tensor()).unwrap().clone();
                let d = max_rel_diff(&dx(&g1), &dx(&g2));
                assert!(d < tol, "{dtype:?} {mode:?} dx: {d}");
                let vars = varmap.data().lock().unwrap();
                assert_eq!(vars.len(), 16);
                for (name, var) in vars.iter() {
                    let (a, c) = (g1.get(var.as_tensor()), g2.get(var.as_tensor()));
                    let (a, c) = (a.expect(name), c.expect(name));
                    assert_eq!(a.dtype(), DType::F32, "{name}");
                    // The key bias's exact gradient is zero (it shifts whole softmax rows):
                    // both sides hold rounding noise, which differs with the summation order.
                    if !name.ends_with("key.bias") {
                        let d = max_rel_diff(a, c);
                        assert!(
                            d < tol,
                            "{dtype:?} {mode:?} {name}: relative difference {d}"
                        );
                    }
                    assert!(
                        crate::test_util::abs_sum(a) > 0.0,
                        "{dtype:?} {mode:?} {name}: zero gradient"
                    );
                }
            }
        }
    }

    /// The fused layer (one autograd node, hand-written CPU kernels) computes what the composed
    /// layer computes, to 1e-5 relative.
    #[test]
    fn fused_encoder_layer_matches_the_composed_layer_forward_and_backward() {
        assert_matches_composed(
            |layer, xs, mask, mode| layer.forward_fused(xs, 3, 11, mask, mode, None).unwrap(),
            &[(DType::F32, 1e-5)],
        );
    }

    /// The explicit layer (one autograd node of candle's ops, the GPU path) computes what the
    /// composed layer computes: to 1e-5 relative in f32, and in bf16 mixed precision (bf16
    /// activations, f32 master weights and gradients) to bf16's rounding.
    #[test]
    fn explicit_encoder_layer_matches_the_composed_layer_forward_and_backward() {
        assert_matches_composed(
            |layer, xs, mask, mode| layer.forward_explicit(xs, 3, 11, mask, mode).unwrap(),
            &[(DType::F32, 1e-5), (DType::BF16, 5e-2)],
        );
    }

    /// The CUDA layer (`cuda_layer.rs`: Kindling's kernels between the products, its own
    /// backward composition) computes what the composed layer computes, here on the kernels' CPU
    /// emulation (`kindling-kernels`' `emulate` backend): to 1e-5 relative in f32 and to bf16's
    /// rounding in bf16 mixed precision, dropout on at all three sites with the CPU's masks.
    #[test]
    fn cuda_encoder_layer_matches_the_composed_layer_forward_and_backward() {
        assert_eq!(kindling_kernels::BACKEND, Some("emulated"));
        assert_matches_composed(
            |layer, xs, mask, mode| {
                let args = layer.args(3, 11, mode).unwrap();
                crate::cuda_layer::encoder_layer(xs, args, mask).unwrap()
            },
            &[(DType::F32, 1e-5), (DType::BF16, 5e-2)],
        );
    }

    /// Unpadded batches (`unpad`, the CUDA kernel path, here on the kernels' CPU emulation):
    /// the encoder on the real tokens only gives every real token the hidden state the padded
    /// batch gives it, and every parameter the same gradient, with dropout on at every site
    /// (draws by padded place); padding rows come out zero. In train and eval mode.
    #[test]
    fn unpadded_batches_compute_what_padded_batches_compute() {
        crate::cuda_layer::tests::ON_THE_CPU.with(|on| on.set(true));
        let cfg: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        }))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mut model = BertModel::load(vb, &cfg).unwrap();
        perturb(&varmap, 0.3);
        // Lengths 9, 4 and 6 of 9.
        let (b, t) = (3, 9);
        let lengths = [9, 4, 6];
        let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7 + 3) % 40).collect();
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let mask: Vec<u32> = (0..b * t)
            .map(|i| u32::from(i % t < lengths[i / t]))
            .collect();
        let mask = Tensor::from_vec(mask.clone(), (b, t), &Device::Cpu).unwrap();
        let real: Vec<u32> = (0..(b * t) as u32)
            .filter(|&i| (i as usize % t) < lengths[i as usize / t])
            .collect();
        let real = Tensor::new(real.as_slice(), &Device::Cpu).unwrap();
        let r = random((real.dim(0).unwrap(), 32), 4, 1.0);
        for mode in [Mode::Train { seed: 3 }, Mode::Eval] {
            let run = |model: &BertModel| {
                let y = model.forward_t(&ids, None, Some(&mask), mode).unwrap();
                let at_real = y.index_select(&real, 0).unwrap();
                let g = (&at_real * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (y, at_real, g)
            };
            model.config.unpad = false;
            let (_, padded, g1) = run(&model);
            model.config.unpad = true;
            let (full, unpadded, g2) = run(&model);
            let d = max_rel_diff(&unpadded, &padded);
            assert!(d < 1e-5, "{mode:?}: hidden states differ by {d}");
            let pad_rows = (full
                .sqr()
                .unwrap()
                .sum(1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap())
            .iter()
            .enumerate()
            .filter(|(i, _)| i % t >= lengths[i / t])
            .all(|(_, &v)| v == 0.0);
            assert!(pad_rows, "padding rows are not zero");
            let vars = varmap.data().lock().unwrap();
            for (name, var) in vars.iter() {
                let (a, c) = (g2.get(var.as_tensor()), g1.get(var.as_tensor()));
                let (a, c) = (a.expect(name), c.expect(name));
                if !name.ends_with("key.bias") {
                    let d = max_rel_diff(a, c);
                    assert!(d < 1e-4, "{mode:?} {name}: gradient differs by {d}");
                }
            }
        }
        crate::cuda_layer::tests::ON_THE_CPU.with(|on| on.set(false));
    }

    /// The last layer of a masked-LM step at the masked rows only: its output and every
    /// gradient (dL/dx at all rows, each parameter's) equal the full layer's followed by the
    /// selection, to 1e-5 relative, with dropout on all three sites (each element draws as at
    /// its place in the full tensors), a padded batch element and one with no rows at all. A
    /// row list that is not increasing takes the full path and selects.
    #[test]
    fn encoder_layer_at_rows_equals_the_full_layer_then_the_rows() {
        let (varmap, layer) = test_layer();
        let (b, t) = (3, 11);
        let x = Var::from_tensor(&random((b * t, 32), 1, 2.0)).unwrap();
        // Batch element 1 has no rows; element 2 has its last four positions padded.
        let rows = [0u32, 3, 4, 10, 22, 25, 31];
        let r = random((rows.len(), 32), 2, 1.0);
        let mut mask = vec![0f32; b * t];
        mask[2 * t + 7..].fill(-1e9);
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
        let index = Tensor::new(&rows, &Device::Cpu).unwrap();
        for mode in [Mode::Train { seed: 5 }, Mode::Eval] {
            let run = |at_rows: bool| {
                let y = if at_rows {
                    layer.forward_fused(x.as_tensor(), b, t, &mask, mode, Some(&rows))
                } else {
                    let all = layer.forward_fused(x.as_tensor(), b, t, &mask, mode, None);
                    all.unwrap().index_select(&index, 0)
                }
                .unwrap();
                assert_eq!(y.dims(), &[rows.len(), 32]);
                let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                (y, grads)
            };
            let ((y1, g1), (y2, g2)) = (run(true), run(false));
            assert!(max_rel_diff(&y1, &y2) < 1e-5, "{mode:?} output");
            let dx = |g: &candle_core::backprop::GradStore| g.get(x.as_tensor()).unwrap().clone();
            assert!(max_rel_diff(&dx(&g1), &dx(&g2)) < 1e-5, "{mode:?} dx");
            for (name, var) in varmap.data().lock().unwrap().iter() {
                let (a, c) = (g1.get(var.as_tensor()), g2.get(var.as_tensor()));
                let (a, c) = (a.expect(name), c.expect(name));
                if name.ends_with("key.bias") {
                    // Its exact gradient is zero (it shifts a whole softmax row): both sides
                    // are rounding noise, summed in different orders.
                    for g in [a, c] {
                        let biggest = g.abs().unwrap().max_all().unwrap();
                        assert!(biggest.to_scalar::<f32>().unwrap() < 1e-5, "{name}");
                    }
                    continue;
                }
                let d = max_rel_diff(a, c);
                assert!(d < 1e-5, "{mode:?} {name}: relative difference {d}");
            }
            // Through forward_t: increasing rows take the row path, the reversed list the
            // full one; the same rows come out in the list's order.
            let rev = Tensor::new(&[31u32, 25, 22, 10, 4, 3, 0], &Device::Cpu).unwrap();
            let sparse = layer.forward_t(x.as_tensor(), b, t, &mask, mode, Some(&index));
            let full = layer.forward_t(x.as_tensor(), b, t, &mask, mode, Some(&rev));
            let back = Tensor::new(&[6u32, 5, 4, 3, 2, 1, 0], &Device::Cpu).unwrap();
            let full = full.unwrap().index_select(&back, 0).unwrap();
            assert!(max_rel_diff(&sparse.unwrap(), &full) < 1e-5, "{mode:?}");
        }
    }

    /// The fused embeddings (one autograd node) compute what the composed ops compute: output
    /// and the gradient of every table and LayerNorm parameter, to 1e-5 relative, with dropout
    /// on and off, with and without token types, and with a repeated id (its rows' gradients
    /// add). An id outside the vocabulary, or a sequence longer than the position table, is an
    /// error saying so.
    #[test]
    fn fused_embeddings_match_the_composed_embeddings_forward_and_backward() {
        let cfg: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 72, "max_position_embeddings": 16,
            "hidden_dropout_prob": 0.1,
        }))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let emb = BertEmbeddings::load(vb.pp("embeddings"), &cfg).unwrap();
        perturb(&varmap, 0.5);
        let (b, t) = (3, 7);
        let mut ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 13 + 5) % 50).collect();
        ids[9] = ids[2]; // a repeated id
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let types: Vec<u32> = (0..(b * t) as u32).map(|i| u32::from(i % 7 > 3)).collect();
        let types = Tensor::from_vec(types, (b, t), &Device::Cpu).unwrap();
        let r = random((b * t, 32), 2, 1.0);
        for mode in [Mode::Train { seed: 5 }, Mode::Eval] {
            for tt in [None, Some(&types)] {
                let run = |fused: bool| {
                    let y = if fused {
                        emb.forward_t(&ids, tt, mode)
                    } else {
                        emb.forward_composed(&ids, tt, mode)
                    }
                    .unwrap();
                    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, grads)
                };
                let ((y1, g1), (y2, g2)) = (run(true), run(false));
                let what = format!("{mode:?}, types {}", tt.is_some());
                assert!(max_rel_diff(&y1, &y2) < 1e-5, "{what}: output");
                let vars = varmap.data().lock().unwrap();
                assert_eq!(vars.len(), 5);
                for (name, var) in vars.iter() {
                    let (a, c) = (g1.get(var.as_tensor()), g2.get(var.as_tensor()));
                    let (a, c) = (a.expect(name), c.expect(name));
                    let d = max_rel_diff(a, c);
                    assert!(d < 1e-5, "{what}: {name}: relative difference {d}");
                    assert!(crate::test_util::abs_sum(a) > 0.0, "{what}: {name}: zero");
                }
            }
        }
        let long = Tensor::zeros((1, 17), DType::U32, &Device::Cpu).unwrap();
        let err = emb
            .forward_t(&long, None, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sequence length 17"), "{err}");
        let bad = Tensor::new(&[[1u32, 50]], &Device::Cpu).unwrap();
        let err = emb
            .forward_t(&bad, None, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token id 50"), "{err}");
    }

    /// A masked-LM training step (dropout on, last layer at the masked rows) gives the same
    /// loss and the same gradient for every parameter, bit for bit, on one thread and on three:
    /// every parallel kernel splits its work in fixed chunks and adds partial sums in order.
    /// The shape is big enough for several chunks in each kernel (1024 tokens).
    #[test]
    fn an_mlm_step_is_the_same_on_one_thread_and_three() {
        let (varmap, model) = test_mlm(100, 0.02);
        let (b, t) = (8, 128);
        let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 37 + 11) % 100).collect();
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let rows: Vec<u32> = (0..(b * t) as u32).filter(|i| i % 7 == 2).collect();
        let labels: Vec<u32> = rows.iter().map(|r| (r * 13) % 100).collect();
        let positions = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mode = Mode::Train { seed: 9 };
                let logits = model.forward_t(&ids, None, Some(&positions), mode).unwrap();
                let loss = crate::ops::cross_entropy(&logits, &labels).unwrap();
                let grads = loss.backward().unwrap();
                let mut out = vec![("loss".to_string(), vec![loss.to_scalar::<f32>().unwrap()])];
                for (name, var) in varmap.data().lock().unwrap().iter() {
                    let g = grads.get(var.as_tensor()).expect(name);
                    out.push((name.clone(), g.flatten_all().unwrap().to_vec1().unwrap()));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                out
            })
        };
        let (one, three) = (run(1), run(3));
        assert_eq!(one.len(), three.len());
        for ((name, a), (_, c)) in one.iter().zip(&three) {
            let same = a.iter().zip(c).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name} differs between one and three threads");
        }
    }
}
