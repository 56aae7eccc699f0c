//! `objective = "simcse"`: sentence contrastive pretraining from any BERT folder (a Kindling
//! export or an HF folder such as all-MiniLM-L6-v2), as SimCSE (Gao et al., 2021) and
//! sentence-transformers' MultipleNegativesRankingLoss do it.
//!
//! ```text
//! sentences (text files split at sentence boundaries, or a table column)      unsupervised
//! (anchor, positive [, hard negative]) columns of a table                       supervised
//!   -> the folder's tokenizer (truncate to max_length)
//!   -> each batch: anchors ++ positives [++ negatives] through the encoder in train mode;
//!      unsupervised, the positive is the anchor itself and dropout makes the two views
//!   -> mean or `[CLS]` pooling -> cosine similarities / temperature -> InfoNCE over in-batch
//!      candidates, a candidate with the same text as the anchor's positive masked out
//!   -> GradCache (optional): the same loss and gradients in chunks, memory flat in the batch
//!   -> HF BertModel folder + sentence-transformers layout (modules.json, 1_Pooling/)
//! ```
//!
//! The evaluation is retrieval: each query (a review title) ranks every document (the review
//! texts) by cosine similarity; recall@k is the fraction whose own document is in the top k.
//! It runs on the starting model before training, so one run reports before and after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use kindling_core::rng::{self, derive_seed, domain, hash_str};
use kindling_core::Mode;
use kindling_data::tokenizer as tok;
use kindling_data::{read_table, Corpus, Cursor};
use kindling_models::bert::Pooling;
use kindling_models::export::{save_json, write_atomic};
use kindling_models::import;
use kindling_models::{Encoder, EncoderConfig};
use kindling_train::distributed::{gather_with_grad, Collective};
use kindling_train::{checkpoint, FitSummary, Objective, StepOutput, Trainer};

use crate::hf_folder::write_hf_folder;
use crate::recipe::{parse_recipe, Header};
use crate::run::{cursor_within, device, drive, Context, Experiment, Loader, Prepared, RunOf};
use crate::{RecipeError, RunOptions, RunReport};
use kindling_models::ops::l2_normalize;

mod data;
mod eval;
mod experiment;
mod export;
mod loss;
mod objective;

pub use data::*;
pub use eval::*;
pub use experiment::*;
pub use export::*;
pub use loss::*;
pub use objective::*;

/// A SimCSE recipe: `kindling pretrain recipes/simcse-NAME.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimcseRecipe {
    /// `"simcse"`.
    pub objective: String,
    /// The shared header (name, runs_dir, seed, device, precision, kernels, `[train]`,
    /// `[export]`). The seed fixes data order, the dropout views and the subset of
    /// `data.max_examples`; under mixed precision the encoder computes in bf16/f16, pooling and
    /// the loss in f32.
    pub header: Header,
    pub model: SimcseModel,
    pub data: SimcseData,
    #[serde(default)]
    pub loss: SimcseLoss,
    #[serde(default)]
    pub grad_cache: GradCache,
    #[serde(default)]
    pub eval: SimcseEval,
}

/// `[model]`: the starting encoder and how a sentence becomes one vector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimcseModel {
    /// A BERT folder: config.json, model.safetensors, tokenizer.json or vocab.txt.
    pub path: PathBuf,
    /// `mean` over non-padding tokens (sentence-transformers) or the raw `cls` hidden state
    /// (SimCSE's choice at test time).
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    /// Dropout is the augmentation of unsupervised SimCSE; unset: the folder's rates (an MLM
    /// export trained without dropout needs them set, or both views are the same).
    #[serde(default)]
    pub hidden_dropout_prob: Option<f64>,
    #[serde(default)]
    pub attention_probs_dropout_prob: Option<f64>,
    /// Tokens per sentence, `[CLS]` and `[SEP]` included; longer ones are truncated.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
}

fn default_pooling() -> Pooling {
    Pooling::Mean
}
fn default_max_length() -> usize {
    64
}

/// `[data]`: sentences from text files, or columns of a table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SimcseData {
    /// Text files (glob patterns): every sentence is an anchor and its own positive.
    #[serde(default)]
    pub corpus: Vec<String>,
    /// Sentences of fewer words are left out (headings).
    #[serde(default = "default_min_words")]
    pub min_words: usize,
    /// A table (`.tsv`, `.csv`, `.jsonl`, optionally `.gz`).
    #[serde(default)]
    pub table: Option<PathBuf>,
    #[serde(default)]
    pub format: Option<String>,
    /// The anchor sentences; alone, the unsupervised task.
    #[serde(default)]
    pub anchor_column: Option<String>,
    /// Supervised pairs: each anchor's positive.
    #[serde(default)]
    pub positive_column: Option<String>,
    /// And a hard negative per anchor (the triplets of SimCSE's NLI recipe).
    #[serde(default)]
    pub negative_column: Option<String>,
    /// A column naming each row's split; only rows of `split` are used.
    #[serde(default)]
    pub split_column: Option<String>,
    #[serde(default = "default_train_split")]
    pub split: String,
    /// Use at most this many examples (a seeded subset; 0 = all).
    #[serde(default)]
    pub max_examples: usize,
}

fn default_min_words() -> usize {
    3
}
fn default_train_split() -> String {
    "train".into()
}

/// `[loss]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimcseLoss {
    /// Softmax temperature of the cosine similarities (SimCSE: 0.05; sentence-transformers'
    /// MNRL scale 20 is the same).
    pub temperature: f64,
}

impl Default for SimcseLoss {
    fn default() -> Self {
        SimcseLoss { temperature: 0.05 }
    }
}

/// `[grad_cache]`: the batch goes through the encoder `chunk_size` sentences at a time (each
/// chunk with its own dropout seed, so the views are the same either way). With `enabled`,
/// GradCache (Gao et al., 2021): a first pass without a graph gives every embedding, the loss
/// over the whole batch gives its gradient with respect to them, and a second pass re-runs each
/// chunk and back-propagates that gradient. Memory then grows with the chunk, not the batch,
/// for one extra forward pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GradCache {
    pub enabled: bool,
    pub chunk_size: usize,
}

impl Default for GradCache {
    fn default() -> Self {
        GradCache {
            enabled: false,
            chunk_size: 64,
        }
    }
}

/// `[eval]`: `[eval.retrieval]` and `[eval.sts]` ([`crate::embedding_eval`]), at every
/// evaluation and on the starting model.
pub type SimcseEval = crate::embedding_eval::EmbeddingEval;
use crate::embedding_eval::default_ks;
pub use crate::embedding_eval::{Retrieval, Sts};

impl SimcseRecipe {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut r: SimcseRecipe = parse_recipe(&text, path, overrides)?;
        crate::recipe::name_from_file(&mut r.header, path);
        let bad = |key: &str, msg: &str| {
            Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: key.into(),
                msg: msg.into(),
            })
        };
        let d = &r.data;
        match (d.corpus.is_empty(), &d.table) {
            (true, None) => return bad("data", "give data.corpus (text files) or data.table"),
            (false, Some(_)) => return bad("data", "give data.corpus or data.table, not both"),
            (true, Some(_)) if d.anchor_column.is_none() => {
                return bad(
                    "data.anchor_column",
                    "a table needs its sentence column named",
                )
            }
            _ => {}
        }
        if d.negative_column.is_some() && d.positive_column.is_none() {
            return bad(
                "data.negative_column",
                "hard negatives need data.positive_column",
            );
        }
        if !(r.loss.temperature > 0.0) {
            return bad("loss.temperature", "must be positive");
        }
        if r.grad_cache.chunk_size == 0 {
            return bad("grad_cache.chunk_size", "must be positive");
        }
        if r.model.max_length < 2 {
            return bad("model.max_length", "must be at least 2 ([CLS] and [SEP])");
        }
        if r.header.train.batch_size < 2 {
            return bad(
                "train.batch_size",
                "in-batch negatives need at least 2 sentences",
            );
        }
        Ok(r)
    }

    pub fn name(&self) -> &str {
        self.header.name()
    }

    pub fn to_toml(&self) -> String {
        crate::recipe::recipe_toml(self)
    }

    fn supervised(&self) -> bool {
        self.data.positive_column.is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// Run

/// The eval metrics of a SimCSE run (`train.monitor.metric` names one).
pub const EVAL_METRICS: &[&str] = &[
    "loss",
    "recall_at_*",
    "mrr",
    "ndcg_at_10",
    "sts_spearman",
    "sts_pearson",
];

/// Rewrites a run's export folder from its newest checkpoint (`kindling export RUN`).
pub fn export_from_checkpoint(
    recipe: &SimcseRecipe,
    run_dir: &Path,
) -> Result<PathBuf, RecipeError> {
    let device = device(&recipe.header.device)?;
    let tokenizer = tok::load(&recipe.model.path)?;
    let obj = Simcse::build(recipe, tok::special_tokens(&tokenizer)?.pad, &device)?;
    let (found, _) = checkpoint::newest_valid(run_dir);
    let dir = found.ok_or_else(|| RecipeError::Run {
        path: run_dir.to_path_buf(),
        msg: "no valid checkpoint to export".into(),
    })?;
    let state = checkpoint::load(&dir, &obj.varmap, None, &device)?;
    let export_dir = recipe
        .header
        .export
        .dir
        .clone()
        .unwrap_or_else(|| run_dir.join("export"));
    export(
        &obj,
        &tokenizer,
        recipe,
        &export_dir,
        &BTreeMap::new(),
        &BTreeMap::new(),
        state.step,
    )?;
    Ok(export_dir)
}

#[cfg(test)]
mod tests;
