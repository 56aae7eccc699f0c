//! The text encoders Kindling trains, behind one seam: a config read from (and written to) HF's
//! `config.json` by its `model_type`, and the masked-LM model built from it. A new architecture
//! adds its file (`bert.rs`, `modernbert.rs`) and a variant here; the MLM recipe, its export and
//! continued pretraining then work over it unchanged.

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::bert::{
    BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, Flavour, Pooling,
};
use crate::modernbert::{
    ModernBertConfig, ModernBertForMaskedLM, ModernBertForSequenceClassification, ModernBertModel,
};
use crate::{ModelError, Result};
use kindling_core::Mode;

/// `[model] architecture` of a recipe, and HF's `model_type` of a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Bert,
    Roberta,
    Modernbert,
}

impl Architecture {
    /// The `model_type`s Kindling reads.
    pub const MODEL_TYPES: [&'static str; 3] = ["bert", "roberta", "modernbert"];

    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::Roberta => "roberta",
            Architecture::Modernbert => "modernbert",
        }
    }

    /// How people write it.
    pub fn display_name(self) -> &'static str {
        match self {
            Architecture::Bert => "BERT",
            Architecture::Roberta => "RoBERTa",
            Architecture::Modernbert => "ModernBERT",
        }
    }
}

/// An encoder's HF config.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderConfig {
    /// BERT and RoBERTa (one encoder, see [`Flavour`]).
    Bert(BertConfig),
    ModernBert(ModernBertConfig),
}

impl From<BertConfig> for EncoderConfig {
    fn from(c: BertConfig) -> Self {
        EncoderConfig::Bert(c)
    }
}

impl From<ModernBertConfig> for EncoderConfig {
    fn from(c: ModernBertConfig) -> Self {
        EncoderConfig::ModernBert(c)
    }
}

impl EncoderConfig {
    /// Parses a `config.json` by its `model_type` (unset: BERT, as HF's BERT configs of old).
    pub fn from_json(v: serde_json::Value) -> Result<Self> {
        let model_type = v["model_type"].as_str().unwrap_or("bert").to_string();
        let bad = |e: serde_json::Error| ModelError::Config(format!("{model_type} config: {e}"));
        let cfg = match model_type.as_str() {
            "bert" | "roberta" => EncoderConfig::Bert(serde_json::from_value(v).map_err(bad)?),
            "modernbert" => EncoderConfig::ModernBert(serde_json::from_value(v).map_err(bad)?),
            other => {
                return Err(ModelError::Setting {
                    field: "model_type",
                    msg: format!(
                        "`{other}` is not a supported architecture (one of {:?})",
                        Architecture::MODEL_TYPES
                    ),
                })
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Models built from this config take the kernel path `kernels` in every layer.
    pub fn set_kernels(&mut self, kernels: crate::ops::Kernels) {
        match self {
            EncoderConfig::Bert(c) => c.kernels = kernels,
            EncoderConfig::ModernBert(c) => c.kernels = kernels,
        }
    }

    /// Unpadded batches where the layers serve them (`BertConfig::unpad`; ModernBERT: no
    /// effect yet).
    pub fn set_unpad(&mut self, unpad: bool) {
        if let EncoderConfig::Bert(c) = self {
            c.unpad = unpad;
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            EncoderConfig::Bert(c) => c.validate(),
            EncoderConfig::ModernBert(c) => c.validate(),
        }
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            EncoderConfig::Bert(c) => match c.flavour() {
                Flavour::Bert => Architecture::Bert,
                Flavour::Roberta => Architecture::Roberta,
            },
            EncoderConfig::ModernBert(_) => Architecture::Modernbert,
        }
    }

    /// HF's class for this encoder with `task` after it (`"ForMaskedLM"`).
    pub fn class(&self, task: &str) -> String {
        match self {
            EncoderConfig::Bert(c) => c.flavour().class(task),
            EncoderConfig::ModernBert(_) => format!("ModernBert{task}"),
        }
    }

    /// The name of the encoder inside HF's task models (`bert`, `roberta`, `model`).
    pub fn prefix(&self) -> &'static str {
        match self {
            EncoderConfig::Bert(c) => c.flavour().prefix(),
            EncoderConfig::ModernBert(_) => "model",
        }
    }

    /// The word-embedding table's name in a task model's checkpoint.
    pub fn word_embeddings_name(&self) -> String {
        match self {
            EncoderConfig::Bert(c) => {
                format!("{}.embeddings.word_embeddings.weight", c.flavour().prefix())
            }
            EncoderConfig::ModernBert(_) => "model.embeddings.tok_embeddings.weight".into(),
        }
    }

    /// Whether segment ids (token types) reach the model: BERT with two or more token types.
    /// RoBERTa's single type and ModernBERT (no token-type embedding) take none, as their HF
    /// tokenizers' pair encodings give all zeros or no `token_type_ids`.
    pub fn uses_token_types(&self) -> bool {
        match self {
            EncoderConfig::Bert(c) => c.type_vocab_size >= 2,
            EncoderConfig::ModernBert(_) => false,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            EncoderConfig::Bert(c) => c.vocab_size,
            EncoderConfig::ModernBert(c) => c.vocab_size,
        }
    }

    /// (hidden size, layers, heads, intermediate size).
    pub fn shape(&self) -> (usize, usize, usize, usize) {
        match self {
            EncoderConfig::Bert(c) => (
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.intermediate_size,
            ),
            EncoderConfig::ModernBert(c) => (
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.intermediate_size,
            ),
        }
    }

    pub fn max_seq_len(&self) -> usize {
        match self {
            EncoderConfig::Bert(c) => c.max_seq_len(),
            EncoderConfig::ModernBert(c) => c.max_seq_len(),
        }
    }

    pub fn max_position_embeddings(&self) -> usize {
        match self {
            EncoderConfig::Bert(c) => c.max_position_embeddings,
            EncoderConfig::ModernBert(c) => c.max_position_embeddings,
        }
    }

    pub fn pad_token_id(&self) -> usize {
        match self {
            EncoderConfig::Bert(c) => c.pad_token_id,
            EncoderConfig::ModernBert(c) => c.pad_token_id,
        }
    }

    pub fn initializer_range(&self) -> f64 {
        match self {
            EncoderConfig::Bert(c) => c.initializer_range,
            EncoderConfig::ModernBert(c) => c.initializer_range,
        }
    }

    /// Sets the dropout rates by BERT's names: for ModernBERT `hidden` is the embedding and
    /// feed-forward dropout, `attention` the attention's (probabilities and output).
    pub fn set_dropout(&mut self, hidden: Option<f64>, attention: Option<f64>) {
        match self {
            EncoderConfig::Bert(c) => {
                if let Some(p) = hidden {
                    c.hidden_dropout_prob = p;
                }
                if let Some(p) = attention {
                    c.attention_probs_dropout_prob = p;
                }
            }
            EncoderConfig::ModernBert(c) => {
                if let Some(p) = hidden {
                    c.embedding_dropout = p;
                    c.mlp_dropout = p;
                }
                if let Some(p) = attention {
                    c.attention_dropout = p;
                }
            }
        }
    }

    pub fn set_initializer_range(&mut self, r: f64) {
        match self {
            EncoderConfig::Bert(c) => c.initializer_range = r,
            EncoderConfig::ModernBert(c) => c.initializer_range = r,
        }
    }

    /// The hidden dropout rate (BERT's `hidden_dropout_prob`; ModernBERT's MLP dropout): the
    /// default of a classifier's dropout.
    pub fn hidden_dropout(&self) -> f64 {
        self.dropouts().0
    }

    /// (hidden, attention) dropout rates, by BERT's names (see [`EncoderConfig::set_dropout`]).
    pub fn dropouts(&self) -> (f64, f64) {
        match self {
            EncoderConfig::Bert(c) => (c.hidden_dropout_prob, c.attention_probs_dropout_prob),
            EncoderConfig::ModernBert(c) => (c.mlp_dropout, c.attention_dropout),
        }
    }

    /// The `config.json` of an export as `{Class}{task}` (`"ForMaskedLM"`).
    pub fn hf_json(&self, task: &str) -> serde_json::Value {
        match self {
            EncoderConfig::Bert(c) => {
                let mut v = serde_json::to_value(c).expect("config serialises");
                v["architectures"] = serde_json::json!([c.flavour().class(task)]);
                v["torch_dtype"] = "float32".into();
                v["tie_word_embeddings"] = true.into();
                v["use_cache"] = true.into();
                v["classifier_dropout"] = serde_json::Value::Null;
                v
            }
            EncoderConfig::ModernBert(c) => c.hf_json(&self.class(task)),
        }
    }

    /// HF's initialisation of the architecture, seeded per parameter name.
    pub fn init(&self, varmap: &VarMap, seed: u64) -> Result<()> {
        match self {
            EncoderConfig::Bert(c) => {
                crate::init::hf_init(varmap, seed, c.initializer_range, Some(c.pad_token_id))
            }
            EncoderConfig::ModernBert(c) => crate::modernbert::init(varmap, seed, c),
        }
    }

    /// Matmul FLOPs of one MLM training step (see the architectures' own `train_flops`).
    pub fn train_flops(&self, tokens: usize, seq: usize, predicted: usize, rows: bool) -> f64 {
        match self {
            EncoderConfig::Bert(c) => c.train_flops(tokens, seq, predicted, rows),
            EncoderConfig::ModernBert(c) => c.train_flops(tokens, seq, predicted, rows),
        }
    }

    /// A rough upper estimate of one MLM training step's memory, in bytes (see
    /// [`BertConfig::mlm_train_bytes`]; ModernBERT's is sized by the same rule on its shape).
    pub fn mlm_train_bytes(&self, tokens: usize, predicted: usize) -> f64 {
        match self {
            EncoderConfig::Bert(c) => c.mlm_train_bytes(tokens, predicted),
            EncoderConfig::ModernBert(c) => {
                let (h, i, l) = (
                    c.hidden_size as f64,
                    c.intermediate_size as f64,
                    c.num_hidden_layers as f64,
                );
                let params = (c.vocab_size as f64) * h + c.encoder_linear_params() as f64;
                16.0 * params
                    + 2.0 * 4.0 * l * tokens as f64 * (16.0 * h + 4.0 * i)
                    + 3.0 * 4.0 * predicted as f64 * c.vocab_size as f64
            }
        }
    }
}

/// A masked LM of any supported architecture.
#[derive(Debug, Clone)]
pub enum MaskedLm {
    Bert(BertForMaskedLM),
    ModernBert(ModernBertForMaskedLM),
}

impl MaskedLm {
    pub fn load(vb: VarBuilder, cfg: &EncoderConfig) -> Result<Self> {
        Ok(match cfg {
            EncoderConfig::Bert(c) => MaskedLm::Bert(BertForMaskedLM::load(vb, c)?),
            EncoderConfig::ModernBert(c) => {
                MaskedLm::ModernBert(ModernBertForMaskedLM::load(vb, c)?)
            }
        })
    }

    /// Whether `name` belongs to the MLM head (what a base-model folder lacks).
    pub fn is_head_tensor(cfg: &EncoderConfig, name: &str) -> bool {
        match cfg {
            EncoderConfig::Bert(c) => BertForMaskedLM::is_head_tensor(c, name),
            EncoderConfig::ModernBert(_) => ModernBertForMaskedLM::is_head_tensor(name),
        }
    }

    /// Vocabulary logits at `positions` (flat `b * seq + t`, u32), or at every position.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        match self {
            MaskedLm::Bert(m) => m.forward_t(input_ids, attention_mask, positions, mode),
            MaskedLm::ModernBert(m) => m.forward_t(input_ids, attention_mask, positions, mode),
        }
    }

    /// Whether the last layer runs at the predicted rows only (the one-node CPU f32 layers;
    /// elsewhere ModernBERT's attention output and feed-forward block without dropout).
    pub fn last_layer_at_rows(&self) -> bool {
        match self {
            MaskedLm::Bert(m) => m.bert.last_layer_at_rows(),
            MaskedLm::ModernBert(m) => m.model.last_layer_at_rows(),
        }
    }

    /// Mixed precision: the dtype the encoder layers compute in.
    pub fn set_compute_dtype(&mut self, dtype: Option<DType>) {
        match self {
            MaskedLm::Bert(m) => m.bert.compute_dtype = dtype,
            MaskedLm::ModernBert(m) => m.model.compute_dtype = dtype,
        }
    }
}

/// A sequence classifier of any supported architecture (HF's `*ForSequenceClassification`).
#[derive(Debug, Clone)]
pub enum SequenceClassifier {
    Bert(BertForSequenceClassification),
    ModernBert(ModernBertForSequenceClassification),
}

impl SequenceClassifier {
    pub fn load(
        vb: VarBuilder,
        cfg: &EncoderConfig,
        num_labels: usize,
        pooling: Pooling,
        classifier_dropout: f64,
    ) -> Result<Self> {
        Ok(match cfg {
            EncoderConfig::Bert(c) => {
                SequenceClassifier::Bert(BertForSequenceClassification::load(
                    vb,
                    c,
                    num_labels,
                    pooling,
                    classifier_dropout,
                )?)
            }
            EncoderConfig::ModernBert(c) => {
                SequenceClassifier::ModernBert(ModernBertForSequenceClassification::load(
                    vb,
                    c,
                    num_labels,
                    pooling == Pooling::Mean,
                    classifier_dropout,
                )?)
            }
        })
    }

    /// The tensors a backbone folder lacks (pooler, head, classifier).
    pub fn is_head_tensor(cfg: &EncoderConfig, name: &str) -> bool {
        match cfg {
            EncoderConfig::Bert(c) => BertForSequenceClassification::is_head_tensor(c, name),
            EncoderConfig::ModernBert(_) => {
                ModernBertForSequenceClassification::is_head_tensor(name)
            }
        }
    }

    /// Class logits, (batch, num_labels). `token_type_ids` (segment A/B of a pair) feed BERT's
    /// token-type embeddings; RoBERTa has one token type and ModernBERT none, so there they
    /// are left out (see [`EncoderConfig::uses_token_types`]).
    pub fn forward_t(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        match self {
            SequenceClassifier::Bert(m) => m.forward_t(ids, token_type_ids, mask, mode),
            SequenceClassifier::ModernBert(m) => m.forward_t(ids, mask, mode),
        }
    }

    /// The encoder's last hidden states, (batch * seq, hidden) (ModernBERT's after its final
    /// norm): what a probe pools.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        match self {
            SequenceClassifier::Bert(m) => m.bert.forward_t(ids, token_type_ids, Some(mask), mode),
            SequenceClassifier::ModernBert(m) => m.model.forward_t(ids, Some(mask), mode),
        }
    }

    /// Mixed precision: the dtype the encoder layers compute in.
    pub fn set_compute_dtype(&mut self, dtype: Option<DType>) {
        match self {
            SequenceClassifier::Bert(m) => m.bert.compute_dtype = dtype,
            SequenceClassifier::ModernBert(m) => m.model.compute_dtype = dtype,
        }
    }
}

/// The encoder alone (HF's `*Model`): what embeddings are read from.
#[derive(Debug, Clone)]
pub enum Encoder {
    Bert(BertModel),
    ModernBert(ModernBertModel),
}

impl Encoder {
    pub fn load(vb: VarBuilder, cfg: &EncoderConfig) -> Result<Self> {
        Ok(match cfg {
            EncoderConfig::Bert(c) => Encoder::Bert(BertModel::load(vb, c)?),
            EncoderConfig::ModernBert(c) => Encoder::ModernBert(ModernBertModel::load(vb, c)?),
        })
    }

    /// The last hidden states, (batch * seq, hidden) (ModernBERT's after its final norm).
    pub fn forward_t(&self, ids: &Tensor, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        match self {
            Encoder::Bert(m) => m.forward_t(ids, None, mask, mode),
            Encoder::ModernBert(m) => m.forward_t(ids, mask, mode),
        }
    }

    pub fn config(&self) -> EncoderConfig {
        match self {
            Encoder::Bert(m) => m.config.clone().into(),
            Encoder::ModernBert(m) => m.config.clone().into(),
        }
    }

    /// The device the parameters live on.
    pub fn device(&self) -> candle_core::Device {
        match self {
            Encoder::Bert(m) => m.embeddings.word_embeddings.embeddings().device().clone(),
            Encoder::ModernBert(m) => m.tok_embeddings.embeddings().device().clone(),
        }
    }

    /// Mixed precision: the dtype the encoder layers compute in.
    pub fn set_compute_dtype(&mut self, dtype: Option<DType>) {
        match self {
            Encoder::Bert(m) => m.compute_dtype = dtype,
            Encoder::ModernBert(m) => m.compute_dtype = dtype,
        }
    }
}

impl From<BertModel> for Encoder {
    fn from(m: BertModel) -> Self {
        Encoder::Bert(m)
    }
}
