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
//!   -> mean or [CLS] pooling -> cosine similarities / temperature -> InfoNCE over in-batch
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
use kindling_models::bert::{BertConfig, BertModel, Pooling};
use kindling_models::export::{save_json, write_atomic};
use kindling_models::import;
use kindling_train::distributed::{gather_with_grad, Collective};
use kindling_train::{checkpoint, Objective, StepOutput, Trainer};

use crate::bert_mlm::write_hf_folder;
use crate::recipe::{parse_toml, ExportSection, TrainSection};
use crate::run::{device, first_loadable, group_trainer, load_checked, plan_run, standard_trainer};
use crate::vision::l2_normalize;
use crate::{RecipeError, RunOptions, RunReport};

/// A SimCSE recipe: `kindling pretrain recipes/simcse-NAME.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimcseRecipe {
    /// `"simcse"`.
    pub objective: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_runs_dir")]
    pub runs_dir: PathBuf,
    /// Fixes data order, the dropout views and the subset of `data.max_examples`.
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: String,
    pub model: SimcseModel,
    pub data: SimcseData,
    #[serde(default)]
    pub loss: SimcseLoss,
    #[serde(default)]
    pub grad_cache: GradCache,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub eval: SimcseEval,
    #[serde(default)]
    pub export: ExportSection,
}

fn default_runs_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_seed() -> u64 {
    17
}
fn default_device() -> String {
    "auto".into()
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
    /// Tokens per sentence, [CLS] and [SEP] included; longer ones are truncated.
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

/// `[eval]`: retrieval from one column to another of a table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SimcseEval {
    pub retrieval: Option<Retrieval>,
}

/// Each row's `query_column` should find the same row's `doc_column` among all the rows' docs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retrieval {
    pub table: PathBuf,
    #[serde(default)]
    pub format: Option<String>,
    pub query_column: String,
    pub doc_column: String,
    #[serde(default)]
    pub split_column: Option<String>,
    #[serde(default = "default_test_split")]
    pub split: String,
    /// The first N rows with both cells non-empty (0 = all).
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    #[serde(default = "default_ks")]
    pub k: Vec<usize>,
}

fn default_test_split() -> String {
    "test".into()
}
fn default_max_rows() -> usize {
    2000
}
fn default_ks() -> Vec<usize> {
    vec![1, 5, 10]
}

impl SimcseRecipe {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut r: SimcseRecipe = parse_toml(&text, path, overrides)?;
        if r.name.is_none() {
            r.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
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
        if r.train.batch_size < 2 {
            return bad(
                "train.batch_size",
                "in-batch negatives need at least 2 sentences",
            );
        }
        Ok(r)
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("simcse")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(self.name())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a recipe serialises")
    }

    fn supervised(&self) -> bool {
        self.data.positive_column.is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// Data

/// One training example as token ids, with the hash of each text (equal hashes: equal texts).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub anchor: Vec<u32>,
    pub positive: Vec<u32>,
    pub negative: Option<Vec<u32>>,
    pub keys: [u64; 3],
}

/// The texts of the recipe's data: (anchor, positive, negative) per example, rows of a table
/// with an empty cell left out. Unsupervised, the positive is the anchor.
pub fn read_texts(recipe: &SimcseRecipe) -> Result<Vec<[Option<String>; 3]>, RecipeError> {
    let d = &recipe.data;
    let mut texts: Vec<[Option<String>; 3]> = match &d.table {
        None => Corpus::from_patterns(&d.corpus, Path::new("."))?
            .documents
            .iter()
            .flat_map(|doc| doc.sentences(d.min_words))
            .map(|s| [Some(s.clone()), Some(s), None])
            .collect(),
        Some(path) => {
            let mut columns: Vec<String> =
                [&d.anchor_column, &d.positive_column, &d.negative_column]
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect();
            let n = columns.len();
            columns.extend(d.split_column.iter().cloned());
            let rows = read_table(path, d.format.as_deref(), &columns)?;
            rows.into_iter()
                .filter(|r| d.split_column.is_none() || r.cells[n].trim() == d.split)
                .filter(|r| r.cells[..n].iter().all(|c| !c.trim().is_empty()))
                .map(|r| {
                    let c: Vec<String> =
                        r.cells[..n].iter().map(|s| s.trim().to_string()).collect();
                    let positive = c.get(1).cloned().unwrap_or_else(|| c[0].clone());
                    [Some(c[0].clone()), Some(positive), c.get(2).cloned()]
                })
                .collect()
        }
    };
    if d.max_examples > 0 && texts.len() > d.max_examples {
        texts.shuffle(&mut rng::rng(&[domain::SPLIT, recipe.seed]));
        texts.truncate(d.max_examples);
    }
    if texts.len() < recipe.train.batch_size {
        return Err(RecipeError::Invalid {
            key: "data".into(),
            msg: format!(
                "{} examples (rows with an empty cell are left out), fewer than one batch of {}",
                texts.len(),
                recipe.train.batch_size
            ),
        });
    }
    Ok(texts)
}

/// Token ids of `text`: [CLS] ... [SEP], at most `max_length` (truncated, [SEP] kept).
pub fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    max_length: usize,
    sep: u32,
) -> Result<Vec<u32>, RecipeError> {
    let enc = tokenizer
        .encode(text, true)
        .map_err(|e| RecipeError::Invalid {
            key: "data".into(),
            msg: format!("cannot tokenise {text:?}: {e}"),
        })?;
    let mut ids = enc.get_ids().to_vec();
    if ids.len() > max_length {
        ids.truncate(max_length - 1);
        ids.push(sep);
    }
    Ok(ids)
}

/// Tokenises the examples in parallel.
pub fn encode_examples(
    texts: &[[Option<String>; 3]],
    tokenizer: &Tokenizer,
    max_length: usize,
) -> Result<Vec<Example>, RecipeError> {
    let sep = tok::special_tokens(tokenizer)?.sep;
    texts
        .par_iter()
        .map(|t| {
            let a = t[0].as_deref().unwrap_or_default();
            let p = t[1].as_deref().unwrap_or(a);
            let anchor = encode(tokenizer, a, max_length, sep)?;
            let positive = if p == a {
                anchor.clone()
            } else {
                encode(tokenizer, p, max_length, sep)?
            };
            let negative = t[2]
                .as_deref()
                .map(|n| encode(tokenizer, n, max_length, sep))
                .transpose()?;
            Ok(Example {
                anchor,
                positive,
                negative,
                keys: [
                    hash_str(a),
                    hash_str(p),
                    t[2].as_deref().map_or(0, hash_str),
                ],
            })
        })
        .collect()
}

/// One batch: the examples' token ids by role, their text hashes, and the cursor after it.
#[derive(Debug, Clone)]
pub struct SimcseBatch {
    /// Anchors, then positives, then (if any) hard negatives: one row per sentence.
    pub rows: Vec<Vec<u32>>,
    /// Examples in the batch (anchors).
    pub n: usize,
    /// Text hashes of anchors, positives and negatives, as `rows`.
    pub keys: Vec<u64>,
    pub cursor_after: Cursor,
}

impl SimcseBatch {
    pub fn from_examples(examples: &[&Example], cursor_after: Cursor) -> Self {
        let n = examples.len();
        let mut rows = Vec::with_capacity(3 * n);
        let mut keys = Vec::with_capacity(3 * n);
        for e in examples {
            rows.push(e.anchor.clone());
            keys.push(e.keys[0]);
        }
        for e in examples {
            rows.push(e.positive.clone());
            keys.push(e.keys[1]);
        }
        if examples.iter().all(|e| e.negative.is_some()) {
            for e in examples {
                rows.push(e.negative.clone().unwrap_or_default());
                keys.push(e.keys[2]);
            }
        }
        SimcseBatch {
            rows,
            n,
            keys,
            cursor_after,
        }
    }
}

/// Endless training batches: a seeded permutation per epoch (the last partial batch of an
/// epoch is dropped, so every batch has the same number of negatives); the resume cursor is
/// (epoch, batches done in it).
pub struct SimcseLoader {
    data: Arc<Vec<Example>>,
    batch_size: usize,
    seed: u64,
    cursor: Cursor,
}

impl SimcseLoader {
    pub fn new(data: Arc<Vec<Example>>, batch_size: usize, seed: u64) -> Self {
        SimcseLoader {
            data,
            batch_size,
            seed,
            cursor: Cursor::default(),
        }
    }

    pub fn seek(&mut self, cursor: Cursor) {
        self.cursor = cursor;
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.data.len() / self.batch_size
    }

    /// The examples an epoch visits.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        order.shuffle(&mut rng::rng(&[domain::DATA_ORDER, self.seed, epoch]));
        order
    }
}

impl Iterator for SimcseLoader {
    type Item = SimcseBatch;
    fn next(&mut self) -> Option<SimcseBatch> {
        if self.cursor.position as usize >= self.batches_per_epoch() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
        }
        let order = self.order(self.cursor.epoch);
        let start = self.cursor.position as usize * self.batch_size;
        let examples: Vec<&Example> = order[start..start + self.batch_size]
            .iter()
            .map(|&i| &self.data[i])
            .collect();
        self.cursor.position += 1;
        Some(SimcseBatch::from_examples(&examples, self.cursor))
    }
}

// ---------------------------------------------------------------------------------------------
// Loss

/// InfoNCE of `n` anchors against the in-batch candidates (`n` positives, then any hard
/// negatives): row `i` of `reps` is anchor `i`, row `n + i` its positive. A candidate whose text
/// is the anchor's or its positive's (a duplicate sentence in the batch) is not a negative: it
/// is masked out, so the loss never pushes a sentence away from itself.
pub fn info_nce(
    reps: &Tensor,
    n: usize,
    keys: &[u64],
    temperature: f64,
) -> candle_core::Result<Tensor> {
    info_nce_in_group(reps, n, keys, temperature, None)
}

/// [`info_nce`] over a data-parallel group's whole batch: this rank's anchors against every
/// rank's candidates, gathered with their gradient (in-batch negatives from all ranks, as
/// sentence-transformers' gathered losses; without the gradient, the Bolts #179 bug), the
/// positive of anchor `i` at this rank's offset into the gathered candidates, and duplicates
/// masked across ranks too (their text keys are gathered alongside). Every rank's batch has the
/// same shape. With gradients averaged over ranks, the update is that of InfoNCE on the global
/// batch in one process.
pub fn info_nce_in_group(
    reps: &Tensor,
    n: usize,
    keys: &[u64],
    temperature: f64,
    group: Option<&Arc<dyn Collective>>,
) -> candle_core::Result<Tensor> {
    let rows = reps.dim(0)?;
    let z = l2_normalize(reps)?;
    let anchors = z.narrow(0, 0, n)?;
    let local = z.narrow(0, n, rows - n)?;
    let (candidates, offset, candidate_keys) = match group {
        Some(g) => (
            gather_with_grad(&local, g.clone())?,
            g.rank() * (rows - n),
            gather_keys(&keys[n..], g.as_ref(), reps.device())?,
        ),
        None => (local, 0, keys[n..].to_vec()),
    };
    let sim = (anchors.matmul(&candidates.t()?)? / temperature)?;
    let m = candidate_keys.len();
    let mut mask = vec![0f32; n * m];
    for i in 0..n {
        for (j, &k) in candidate_keys.iter().enumerate() {
            if j != offset + i && (k == keys[n + i] || k == keys[i]) {
                // Not -inf: 0 * inf would make the backward pass NaN.
                mask[i * m + j] = -1e9;
            }
        }
    }
    let sim = (sim + Tensor::from_vec(mask, (n, m), reps.device())?)?;
    let logp = candle_nn::ops::log_softmax(&sim, D::Minus1)?;
    let targets: Vec<u32> = (0..n).map(|i| (offset + i) as u32).collect();
    let targets = Tensor::from_vec(targets, (n, 1), reps.device())?;
    logp.gather(&targets, 1)?.mean_all()?.neg()
}

/// Every rank's text keys, in rank order. A key travels as two 32-bit halves in f64 (exact),
/// since the collectives move floating-point tensors.
fn gather_keys(
    keys: &[u64],
    group: &dyn Collective,
    device: &Device,
) -> candle_core::Result<Vec<u64>> {
    let halves: Vec<f64> = keys
        .iter()
        .flat_map(|k| [(k >> 32) as f64, (k & 0xffff_ffff) as f64])
        .collect();
    let all = group.all_gather(&Tensor::from_vec(halves, (keys.len(), 2), device)?)?;
    Ok(all
        .to_vec2::<f64>()?
        .iter()
        .map(|h| ((h[0] as u64) << 32) | h[1] as u64)
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Objective

/// The encoder being trained, the loss, and (in eval) the retrieval embeddings collected batch
/// by batch.
pub struct Simcse {
    pub model: BertModel,
    pub varmap: VarMap,
    pub config: BertConfig,
    pub pooling: Pooling,
    pub temperature: f64,
    pub grad_cache: GradCache,
    pub pad: u32,
    pub ks: Vec<usize>,
    device: Device,
    /// (batch index, query embeddings, doc embeddings) of the evaluation under way.
    collected: Mutex<Vec<(usize, Vec<Vec<f32>>, Vec<Vec<f32>>)>>,
    /// The data-parallel group (`None`: one process); training batches gather over it.
    pub group: Option<Arc<dyn Collective>>,
}

impl Simcse {
    /// The encoder of `recipe.model.path` (any BERT folder; a `bert.` prefix is dropped, so
    /// the export has base-model names as sentence-transformers saves them).
    pub fn build(recipe: &SimcseRecipe, pad: u32, device: &Device) -> Result<Self, RecipeError> {
        let m = &recipe.model;
        let mut config = import::read_config(&m.path)?;
        if let Some(p) = m.hidden_dropout_prob {
            config.hidden_dropout_prob = p;
        }
        if let Some(p) = m.attention_probs_dropout_prob {
            config.attention_probs_dropout_prob = p;
        }
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = BertModel::load(vb, &config)?;
        let (path, tensors) = import::read_weights(&m.path, device)?;
        // copy_tensors matches `bert.`-prefixed model names to plain file names; here the
        // model is plain and the file may carry the prefix.
        let tensors: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("bert.").map(String::from).unwrap_or(k), v))
            .collect();
        let report = import::copy_tensors(&varmap, &tensors, &path)?;
        if !report.missing.is_empty() {
            return Err(RecipeError::Run {
                path,
                msg: format!(
                    "the encoder's tensors {:?} are missing (not a BERT folder?)",
                    &report.missing[..report.missing.len().min(5)]
                ),
            });
        }
        let mut obj = Simcse::new(model, varmap, m.pooling, recipe.loss.temperature, pad);
        obj.grad_cache = recipe.grad_cache.clone();
        if let Some(r) = &recipe.eval.retrieval {
            obj.ks = r.k.clone();
        }
        Ok(obj)
    }

    /// An objective around `model` (whose parameters live in `varmap`), without GradCache.
    pub fn new(
        model: BertModel,
        varmap: VarMap,
        pooling: Pooling,
        temperature: f64,
        pad: u32,
    ) -> Self {
        let device = model
            .embeddings
            .word_embeddings
            .embeddings()
            .device()
            .clone();
        Simcse {
            config: model.config.clone(),
            model,
            varmap,
            pooling,
            temperature,
            grad_cache: GradCache::default(),
            pad,
            ks: default_ks(),
            device,
            collected: Mutex::new(Vec::new()),
            group: None,
        }
    }

    /// Pooled embeddings `(rows, hidden)` of token-id rows, padded to their longest.
    pub fn embed(&self, rows: &[Vec<u32>], mode: Mode) -> candle_core::Result<Tensor> {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(self.pad, seq - r.len()));
            mask.extend(std::iter::repeat_n(1u32, r.len()));
            mask.extend(std::iter::repeat_n(0u32, seq - r.len()));
        }
        let ids = Tensor::from_vec(ids, (rows.len(), seq), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows.len(), seq), &self.device)?;
        let hidden = self
            .model
            .forward_t(&ids, None, Some(&mask), mode)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let hidden = hidden.reshape((rows.len(), seq, self.config.hidden_size))?;
        match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean => {
                let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let count = m.sum(1)?.clamp(1.0, f64::MAX)?;
                hidden.broadcast_mul(&m)?.sum(1)?.broadcast_div(&count)
            }
        }
    }

    /// The chunks of a batch and the mode of each: in training, chunk `c` draws its dropout
    /// from `(step seed, c)`, so both GradCache passes (and the plain path) see the same views.
    fn chunks<'a>(&self, b: &'a SimcseBatch, mode: Mode) -> Vec<(&'a [Vec<u32>], Mode)> {
        b.rows
            .chunks(self.grad_cache.chunk_size)
            .enumerate()
            .map(|(c, rows)| {
                let m = match mode {
                    Mode::Train { seed } => Mode::Train {
                        seed: derive_seed(&[seed, c as u64]),
                    },
                    Mode::Eval => Mode::Eval,
                };
                (rows, m)
            })
            .collect()
    }

    /// InfoNCE of a batch: over the data-parallel group in training, this process's batch
    /// alone in eval (every rank evaluates the same batches).
    fn loss(&self, reps: &Tensor, b: &SimcseBatch, mode: Mode) -> candle_core::Result<Tensor> {
        let group = self.group.as_ref().filter(|_| mode.is_train());
        info_nce_in_group(reps, b.n, &b.keys, self.temperature, group)
    }

    fn output(&self, loss: Tensor, b: &SimcseBatch) -> StepOutput {
        StepOutput {
            loss,
            weight: b.n as f64,
            units: b.rows.iter().map(Vec::len).sum(),
            metrics: BTreeMap::new(),
        }
    }

    /// Retrieval metrics over everything collected since the last call: recall@k and MRR of
    /// each query's own document among all documents.
    fn retrieval_metrics(&self) -> BTreeMap<String, f64> {
        let mut got = std::mem::take(&mut *self.collected.lock().expect("lock"));
        got.sort_by_key(|(i, _, _)| *i);
        let queries: Vec<Vec<f32>> = got.iter().flat_map(|(_, q, _)| q.clone()).collect();
        let docs: Vec<Vec<f32>> = got.into_iter().flat_map(|(_, _, d)| d).collect();
        recall_at(&queries, &docs, &self.ks)
    }
}

/// Recall@k (for each k) and mean reciprocal rank of query `i` finding doc `i` by cosine
/// similarity among all docs (a tie counts against the query).
pub fn recall_at(queries: &[Vec<f32>], docs: &[Vec<f32>], ks: &[usize]) -> BTreeMap<String, f64> {
    let unit = |v: &Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let q: Vec<Vec<f32>> = queries.iter().map(unit).collect();
    let d: Vec<Vec<f32>> = docs.iter().map(unit).collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let ranks: Vec<usize> = q
        .par_iter()
        .enumerate()
        .map(|(i, qi)| {
            let own = dot(qi, &d[i]);
            d.iter()
                .enumerate()
                .filter(|&(j, dj)| j != i && dot(qi, dj) >= own)
                .count()
        })
        .collect();
    let n = ranks.len().max(1) as f64;
    let mut m = BTreeMap::new();
    for &k in ks {
        let hits = ranks.iter().filter(|&&r| r < k).count();
        m.insert(format!("recall_at_{k}"), hits as f64 / n);
    }
    m.insert(
        "mrr".into(),
        ranks.iter().map(|&r| 1.0 / (r + 1) as f64).sum::<f64>() / n,
    );
    m
}

impl Objective for Simcse {
    type Batch = SimcseBatch;

    /// The plain path: every chunk's graph is kept until the trainer's backward pass.
    /// In eval (a retrieval batch: queries as anchors, their docs as positives) the embeddings
    /// are also kept for `finish_eval`.
    fn step(&self, b: &SimcseBatch, mode: Mode) -> candle_core::Result<StepOutput> {
        let parts = self
            .chunks(b, mode)
            .into_iter()
            .map(|(rows, m)| self.embed(rows, m))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let reps = Tensor::cat(&parts, 0)?;
        if !mode.is_train() {
            let q = reps.narrow(0, 0, b.n)?.to_vec2::<f32>()?;
            let d = reps.narrow(0, b.n, b.n)?.to_vec2::<f32>()?;
            self.collected
                .lock()
                .expect("lock")
                .push((b.cursor_after.position as usize, q, d));
        }
        let loss = self.loss(&reps, b, mode)?;
        Ok(self.output(loss, b))
    }

    /// GradCache: embeddings without a graph, the loss's gradient with respect to them, then
    /// each chunk again with its graph, back-propagating its slice of that gradient.
    fn step_with_grads(
        &self,
        b: &SimcseBatch,
        mode: Mode,
    ) -> candle_core::Result<Option<(StepOutput, GradStore)>> {
        if !self.grad_cache.enabled || !mode.is_train() {
            return Ok(None);
        }
        let chunks = self.chunks(b, mode);
        let parts = chunks
            .iter()
            .map(|(rows, m)| self.embed(rows, *m).map(|t| t.detach()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let reps = Var::from_tensor(&Tensor::cat(&parts, 0)?)?;
        let loss = self.loss(reps.as_tensor(), b, mode)?;
        let d_reps = loss
            .backward()?
            .get(reps.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient for the embeddings".into()))?;
        // Only the parameters' gradients are kept, detached: a gradient candle returns still
        // references the graph it came from (so the chunk's activations), and keeping whole
        // GradStores would keep every chunk's activations alive, which is what GradCache avoids.
        let vars = self.varmap.all_vars();
        let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut offset = 0;
        for (rows, m) in chunks {
            let e = self.embed(rows, m)?;
            let g = d_reps.narrow(0, offset, rows.len())?;
            offset += rows.len();
            let grads = (e * g)?.sum_all()?.backward()?;
            for (v, sum) in vars.iter().zip(sums.iter_mut()) {
                if let Some(gv) = grads.get(v.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(prev) => (prev + gv)?.detach(),
                        None => gv.detach(),
                    });
                }
            }
        }
        let mut grads = GradStore::default();
        for (v, sum) in vars.iter().zip(sums) {
            if let Some(g) = sum {
                grads.insert(v.as_tensor(), g);
            }
        }
        Ok(Some((self.output(loss.detach(), b), grads)))
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn finish_eval(&self, m: &mut BTreeMap<String, f64>) {
        m.extend(self.retrieval_metrics());
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation data

/// The retrieval set as eval batches: queries as anchors, docs as positives (keys distinct per
/// row, so the eval loss is title -> text InfoNCE within each batch).
pub fn retrieval_batches(
    r: &Retrieval,
    tokenizer: &Tokenizer,
    max_length: usize,
    batch_size: usize,
) -> Result<(Vec<SimcseBatch>, usize), RecipeError> {
    let mut columns = vec![r.query_column.clone(), r.doc_column.clone()];
    columns.extend(r.split_column.iter().cloned());
    let rows = read_table(&r.table, r.format.as_deref(), &columns)?;
    let mut pairs: Vec<[Option<String>; 3]> = rows
        .into_iter()
        .filter(|row| r.split_column.is_none() || row.cells[2].trim() == r.split)
        .filter(|row| !row.cells[0].trim().is_empty() && !row.cells[1].trim().is_empty())
        .map(|row| {
            [
                Some(row.cells[0].trim().to_string()),
                Some(row.cells[1].trim().to_string()),
                None,
            ]
        })
        .collect();
    if r.max_rows > 0 {
        pairs.truncate(r.max_rows);
    }
    if pairs.len() < 2 {
        return Err(RecipeError::Invalid {
            key: "eval.retrieval".into(),
            msg: format!(
                "{}: {} rows with both `{}` and `{}` in split `{}`; retrieval needs at least 2",
                r.table.display(),
                pairs.len(),
                r.query_column,
                r.doc_column,
                r.split
            ),
        });
    }
    let mut examples = encode_examples(&pairs, tokenizer, max_length)?;
    // Keys by row, not by text: two rows with the same title are still two queries.
    for (i, e) in examples.iter_mut().enumerate() {
        e.keys = [2 * i as u64, 2 * i as u64 + 1, 0];
    }
    let n = examples.len();
    let batches = examples
        .chunks(batch_size.max(2))
        .enumerate()
        .map(|(k, c)| {
            let refs: Vec<&Example> = c.iter().collect();
            SimcseBatch::from_examples(
                &refs,
                Cursor {
                    epoch: 0,
                    position: k as u64,
                },
            )
        })
        .collect();
    Ok((batches, n))
}

// ---------------------------------------------------------------------------------------------
// Export

/// sentence-transformers' `1_Pooling/config.json` for `pooling`.
pub fn pooling_config(hidden: usize, pooling: Pooling) -> serde_json::Value {
    serde_json::json!({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == Pooling::Cls,
        "pooling_mode_mean_tokens": pooling == Pooling::Mean,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
        "pooling_mode_weightedmean_tokens": false,
        "pooling_mode_lasttoken": false,
        "include_prompt": true
    })
}

/// Writes an HF `BertModel` folder that is also a sentence-transformers model: modules.json
/// (Transformer -> Pooling -> Normalize), 1_Pooling/config.json, sentence_bert_config.json.
pub fn export(
    obj: &Simcse,
    tokenizer: &Tokenizer,
    recipe: &SimcseRecipe,
    dir: &Path,
    eval: &BTreeMap<String, f64>,
    initial: &BTreeMap<String, f64>,
    steps: u64,
) -> Result<(), RecipeError> {
    let mut config = serde_json::to_value(&obj.config).expect("config serialises");
    config["architectures"] = serde_json::json!(["BertModel"]);
    config["torch_dtype"] = "float32".into();
    write_hf_folder(dir, &config, &obj.varmap, tokenizer, &obj.config)?;
    save_json(
        &dir.join("modules.json"),
        &serde_json::json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        ]),
    )?;
    let pooling_dir = dir.join("1_Pooling");
    std::fs::create_dir_all(&pooling_dir).map_err(|e| RecipeError::Run {
        path: pooling_dir.clone(),
        msg: e.to_string(),
    })?;
    save_json(
        &pooling_dir.join("config.json"),
        &pooling_config(obj.config.hidden_size, obj.pooling),
    )?;
    let normalize_dir = dir.join("2_Normalize");
    std::fs::create_dir_all(&normalize_dir).map_err(|e| RecipeError::Run {
        path: normalize_dir.clone(),
        msg: e.to_string(),
    })?;
    save_json(
        &dir.join("sentence_bert_config.json"),
        &serde_json::json!({"max_seq_length": recipe.model.max_length, "do_lower_case": false}),
    )?;
    save_json(
        &dir.join("config_sentence_transformers.json"),
        &serde_json::json!({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": null}),
    )?;
    let mut card = String::from("---\n");
    card += &format!(
        "license: {}\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags:\n  - kindling\n  - sentence-transformers\n  - simcse\n---\n\n",
        serde_json::to_string(recipe.export.license.as_deref().unwrap_or("apache-2.0"))
            .expect("strings serialise")
    );
    card += &format!(
        "# {}\n\nA sentence encoder trained by Kindling with {} SimCSE for {steps} steps from \
         `{}` ({} pooling, temperature {}). It loads with \
         `sentence_transformers.SentenceTransformer(dir)` (cosine similarity) and with \
         `transformers.AutoModel.from_pretrained(dir)`.\n\n",
        recipe.name(),
        if recipe.supervised() {
            "supervised"
        } else {
            "unsupervised"
        },
        recipe.model.path.display(),
        match obj.pooling {
            Pooling::Cls => "[CLS]",
            Pooling::Mean => "mean",
        },
        recipe.loss.temperature
    );
    if !eval.is_empty() {
        card +=
            "## Retrieval (before and after training)\n\n| metric | start | end |\n|---|---|---|\n";
        for (k, v) in eval {
            let before = initial.get(k).map_or("".into(), |b| format!("{b:.4}"));
            card += &format!("| {k} | {before} | {v:.4} |\n");
        }
        card += "\n";
    }
    card += "## Recipe\n\n```toml\n";
    card += &recipe.to_toml();
    card += "```\n";
    write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Run

/// The eval metrics of a SimCSE run (`train.monitor.metric` names one).
pub const EVAL_METRICS: &[&str] = &["loss", "recall_at_*", "mrr"];

/// Runs the recipe: evaluate the starting encoder, train (resumable), evaluate, export.
pub fn pretrain(recipe: &SimcseRecipe, opts: &RunOptions) -> Result<RunReport, RecipeError> {
    crate::recipe::check_name(recipe.name())?;
    recipe.train.validate(EVAL_METRICS)?;
    let device = crate::run::rank_device(&recipe.device, opts.dist.as_ref())?;
    let group = crate::run::join_group(opts, &device)?;
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let t = &recipe.train;
    let tokenizer = tok::load(&recipe.model.path)?;
    let specials = tok::special_tokens(&tokenizer)?;
    let texts = read_texts(recipe)?;
    let examples = encode_examples(&texts, &tokenizer, recipe.model.max_length)?;
    let distinct = {
        let mut k: Vec<u64> = examples.iter().map(|e| e.keys[0]).collect();
        k.sort_unstable();
        k.dedup();
        k.len()
    };
    eprintln!(
        "data: {} {} ({} distinct anchors), mean {:.1} tokens",
        examples.len(),
        match (recipe.supervised(), recipe.data.negative_column.is_some()) {
            (false, _) => "sentences (unsupervised: dropout makes the two views)",
            (true, false) => "(anchor, positive) pairs",
            (true, true) => "(anchor, positive, hard negative) triplets",
        },
        distinct,
        examples.iter().map(|e| e.anchor.len()).sum::<usize>() as f64 / examples.len() as f64
    );
    // Nothing in the run folder changes until the checkpoint is picked (run/folder.rs).
    let plan = plan_run(recipe.run_dir(), opts, rank)?;
    let run_dir = plan.dir.clone();
    let mut obj = Simcse::build(recipe, specials.pad, &device)?;
    obj.group = group.clone();
    eprintln!(
        "model: {} (h{} L{}), {} pooling, dropout {}/{}; temperature {}; {}",
        recipe.model.path.display(),
        obj.config.hidden_size,
        obj.config.num_hidden_layers,
        match obj.pooling {
            Pooling::Cls => "[CLS]",
            Pooling::Mean => "mean",
        },
        obj.config.hidden_dropout_prob,
        obj.config.attention_probs_dropout_prob,
        recipe.loss.temperature,
        if recipe.grad_cache.enabled {
            format!("GradCache in chunks of {}", recipe.grad_cache.chunk_size)
        } else {
            "no GradCache".into()
        }
    );
    let eval = match &recipe.eval.retrieval {
        Some(r) => {
            let (b, n) =
                retrieval_batches(r, &tokenizer, recipe.model.max_length, t.eval_batch_size)?;
            eprintln!(
                "eval: {} -> {} retrieval over {n} rows of {} (split `{}`)",
                r.query_column,
                r.doc_column,
                r.table.display(),
                r.split
            );
            b
        }
        None => Vec::new(),
    };
    let mut loader = SimcseLoader::new(Arc::new(examples), t.batch_size, recipe.seed);
    let per_epoch =
        loader.batches_per_epoch() as u64 / group.as_ref().map_or(1, |g| g.world()) as u64;
    let mut cfg = t.train_config(recipe.seed, per_epoch)?;
    cfg.checkpoint_extras = vec![run_dir.join("recipe.toml")];
    let mut opt = Trainer::build_optimizer(&cfg.optimizer, &obj)?;
    let examples_n = loader.len() as u64;
    let resumed = first_loadable(&plan.candidates, |dir| {
        load_checked(dir, &obj.varmap, opt.as_mut(), &device, |c: &Cursor| {
            if c.position > examples_n {
                return Err(format!("is past the end of the {examples_n} examples"));
            }
            Ok(())
        })
    })?;
    let resume_from = resumed.as_ref().map(|(dir, _)| dir.clone());
    let _lock = plan.commit(&recipe.to_toml(), opts, resume_from.is_some())?;
    let initial_path = run_dir.join("initial_eval.json");
    // The starting encoder's scores, once per run (a resumed run reads them back).
    let initial: BTreeMap<String, f64> = match (&resume_from, eval.is_empty()) {
        // (Rank 0 reports; the other ranks need not evaluate.)
        _ if rank > 0 => BTreeMap::new(),
        (_, true) => BTreeMap::new(),
        (Some(_), false) if initial_path.is_file() => std::fs::read_to_string(&initial_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
        _ => {
            let m = Trainer::evaluate(&obj, &eval)?;
            save_json(
                &initial_path,
                &serde_json::to_value(&m).expect("serialises"),
            )?;
            m
        }
    };
    if !initial.is_empty() {
        eprintln!("before training: {}", format_metrics(&initial));
    }
    let mut trainer = group_trainer(group.as_ref(), cfg.clone(), &run_dir, opts, |cfg| {
        standard_trainer(
            cfg,
            &run_dir,
            t.log_every,
            "tok",
            &["recall_at_1", "recall_at_10", "mrr"],
            resume_from.as_deref(),
            opts,
        )
    })?;
    let start = resumed.map(|(_, (state, cursor))| {
        loader.seek(cursor);
        state
    });
    eprintln!(
        "train: {} steps of {} examples ({per_epoch} per epoch), eval every {}",
        cfg.steps, t.batch_size, cfg.eval_every
    );
    let summary = trainer.fit(&obj, &mut loader, &eval, opt, start, &|b: &SimcseBatch| {
        serde_json::to_value(b.cursor_after).expect("cursor serialises")
    })?;
    let export_dir = recipe
        .export
        .dir
        .clone()
        .unwrap_or_else(|| run_dir.join("export"));
    if summary.stop != kindling_train::StopReason::Interrupted && rank == 0 {
        let final_eval = if summary.final_eval.is_empty() && !eval.is_empty() {
            Trainer::evaluate(&obj, &eval)?
        } else {
            summary.final_eval.clone()
        };
        if !final_eval.is_empty() {
            eprintln!("after training:  {}", format_metrics(&final_eval));
            save_json(
                &run_dir.join("eval_results.json"),
                &serde_json::json!({"initial": initial, "final": final_eval, "steps": summary.steps}),
            )?;
        }
        export(
            &obj,
            &tokenizer,
            recipe,
            &export_dir,
            &final_eval,
            &initial,
            summary.steps,
        )?;
        eprintln!("export: {}", export_dir.display());
    }
    Ok(RunReport {
        run_dir,
        export_dir,
        final_eval: summary.final_eval,
        baseline: initial
            .get("recall_at_10")
            .map(|v| ("initial recall_at_10".to_string(), *v)),
        steps: summary.steps,
        elapsed_secs: summary.elapsed_secs,
        stop: summary.stop,
    })
}

fn format_metrics(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rewrites a run's export folder from its newest checkpoint (`kindling export RUN`).
pub fn export_from_checkpoint(
    recipe: &SimcseRecipe,
    run_dir: &Path,
) -> Result<PathBuf, RecipeError> {
    let device = device(&recipe.device)?;
    let tokenizer = tok::load(&recipe.model.path)?;
    let obj = Simcse::build(recipe, tok::special_tokens(&tokenizer)?.pad, &device)?;
    let (found, _) = checkpoint::newest_valid(run_dir);
    let dir = found.ok_or_else(|| RecipeError::Run {
        path: run_dir.to_path_buf(),
        msg: "no valid checkpoint to export".into(),
    })?;
    let state = checkpoint::load(&dir, &obj.varmap, None, &device)?;
    let export_dir = recipe
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
mod tests {
    use super::*;
    use kindling_models::init::hf_init;

    fn tiny_model(dropout: f64) -> (BertModel, VarMap) {
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32,
            "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
            "max_position_embeddings": 32
        }))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = BertModel::load(vb, &config).unwrap();
        hf_init(&varmap, 3, 0.02, Some(0)).unwrap();
        (model, varmap)
    }

    /// Six examples of 3-9 tokens; examples 1 and 4 are the same sentence.
    fn examples() -> Vec<Example> {
        (0..6u32)
            .map(|i| {
                let j = if i == 4 { 1 } else { i };
                let ids: Vec<u32> = std::iter::once(2)
                    .chain((0..3 + j).map(|k| 5 + (7 * j + 3 * k) % 40))
                    .chain(std::iter::once(3))
                    .collect();
                Example {
                    anchor: ids.clone(),
                    positive: ids,
                    negative: None,
                    keys: [j as u64, j as u64, 0],
                }
            })
            .collect()
    }

    fn batch() -> SimcseBatch {
        let ex = examples();
        SimcseBatch::from_examples(&ex.iter().collect::<Vec<_>>(), Cursor::default())
    }

    fn grads_of(obj: &Simcse, mode: Mode) -> (f32, Vec<(String, Vec<f32>)>) {
        let b = batch();
        let (loss, grads) = match obj.step_with_grads(&b, mode).unwrap() {
            Some((out, g)) => (out.loss, g),
            None => {
                let out = obj.step(&b, mode).unwrap();
                let g = out.loss.backward().unwrap();
                (out.loss, g)
            }
        };
        let data = obj.varmap.data().lock().unwrap();
        let mut named: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(n, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .expect("every parameter gets a gradient");
                (n.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        (loss.to_scalar().unwrap(), named)
    }

    /// GradCache changes memory, not mathematics: with dropout on (the views are drawn per
    /// chunk, the same in both passes), the loss and every parameter's gradient equal those of
    /// the plain in-batch loss back-propagated through one graph.
    #[test]
    fn grad_cache_gives_the_plain_loss_and_gradients() {
        let (model, varmap) = tiny_model(0.1);
        let mut obj = Simcse::new(model, varmap, Pooling::Mean, 0.05, 0);
        obj.grad_cache.chunk_size = 5; // chunks straddle anchors and positives
        let mode = Mode::Train { seed: 11 };
        let (plain_loss, plain) = grads_of(&obj, mode);
        obj.grad_cache.enabled = true;
        let (cached_loss, cached) = grads_of(&obj, mode);
        assert!(
            (plain_loss - cached_loss).abs() < 1e-5,
            "{plain_loss} vs {cached_loss}"
        );
        assert_eq!(plain.len(), cached.len());
        for ((name, a), (_, b)) in plain.iter().zip(&cached) {
            let scale = a.iter().map(|x| x.abs()).fold(1e-6f32, f32::max);
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5 * scale.max(1.0), "{name}: {x} vs {y}");
            }
            assert!(
                a.iter().any(|x| *x != 0.0),
                "{name} gets a non-zero gradient"
            );
        }
    }

    /// Dropout makes the two views of a sentence differ in training and agree in eval.
    #[test]
    fn dropout_views_differ_in_training_only() {
        let (model, varmap) = tiny_model(0.1);
        let obj = Simcse::new(model, varmap, Pooling::Cls, 0.05, 0);
        let rows = vec![batch().rows[0].clone(); 2];
        let train = obj
            .embed(&rows, Mode::Train { seed: 1 })
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_ne!(train[0], train[1]);
        let eval = obj
            .embed(&rows, Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(eval[0], eval[1]);
    }

    /// The loss against its definition, row by row; a duplicate sentence in the batch is not
    /// used as a negative.
    #[test]
    fn info_nce_matches_the_formula_and_masks_duplicates() {
        let reps = Tensor::new(
            &[
                [1f32, 0.0],
                [0.6, 0.8],
                [0.0, 1.0],
                [0.8, 0.6],
                [0.6, 0.8],
                [-1.0, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let t = 0.5;
        // Anchors 0, 1, 2; positives 3, 4, 5. Anchor 0 and 2 share a text (key 7).
        let keys = [7, 8, 7, 7, 8, 7];
        let got: f32 = info_nce(&reps, 3, &keys, t).unwrap().to_scalar().unwrap();
        let v = reps.to_vec2::<f32>().unwrap();
        let cos = |a: &[f32], b: &[f32]| {
            let n = |x: &[f32]| x.iter().map(|y| y * y).sum::<f32>().sqrt();
            a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (n(a) * n(b))
        };
        let mut want = 0.0;
        for i in 0..3 {
            let mut denom = 0.0;
            for j in 0..3 {
                let masked = j != i && (keys[3 + j] == keys[3 + i] || keys[3 + j] == keys[i]);
                if !masked {
                    denom += (cos(&v[i], &v[3 + j]) / t as f32).exp();
                }
            }
            want -= ((cos(&v[i], &v[3 + i]) / t as f32).exp() / denom).ln();
        }
        want /= 3.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Without the duplicate, candidate 5 counts against anchor 0: a larger loss.
        let distinct = [7, 8, 9, 7, 8, 9];
        let plain: f32 = info_nce(&reps, 3, &distinct, t)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(plain > got);
    }

    /// Three ranks of 2 (anchor, positive, hard negative) triplets, InfoNCE gathered over the
    /// group: loss and gradients are those of InfoNCE on the 6 triplets in one process, with a
    /// duplicate text across ranks (anchor 0's text is rank 2's first negative) masked there too.
    #[test]
    fn gathered_info_nce_over_ranks_is_info_nce_of_the_global_batch() {
        use kindling_train::distributed::LocalGroup;
        let (world, n, d) = (3usize, 2usize, 4usize);
        let row = |i: usize| -> Vec<f32> {
            (0..d)
                .map(|j| ((i * 31 + j * 17) % 13) as f32 / 6.0 - 1.0)
                .collect()
        };
        // Global rows: 6 anchors, 6 positives, 6 negatives; keys likewise.
        let global: Vec<Vec<f32>> = (0..3 * world * n).map(row).collect();
        let mut keys: Vec<u64> = (0..(3 * world * n) as u64).map(|i| 1000 + i).collect();
        keys[2 * world * n + 2 * n] = keys[0]; // rank 2's first negative repeats anchor 0
        keys[1] = u64::MAX - 5; // a key above 2^53: exact through the gather
        let flat = |rows: &[Vec<f32>]| rows.concat();
        let g = Var::from_vec(flat(&global), (3 * world * n, d), &Device::Cpu).unwrap();
        let single = info_nce(g.as_tensor(), world * n, &keys, 0.3).unwrap();
        let want = single.to_scalar::<f32>().unwrap();
        let want_grad = single
            .backward()
            .unwrap()
            .get(g.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Rank r's local rows and keys: its anchors, positives and negatives.
        let part = |r: usize| -> Vec<usize> {
            (0..3)
                .flat_map(|block| (0..n).map(move |i| block * world * n + r * n + i))
                .collect()
        };
        let ranks: Vec<(f32, Vec<(usize, Vec<f32>)>)> = LocalGroup::run(world, |grp| {
            let (global, keys) = (&global, &keys);

            let idx = part(grp.rank());
            let rows: Vec<Vec<f32>> = idx.iter().map(|&i| global[i].clone()).collect();
            let local_keys: Vec<u64> = idx.iter().map(|&i| keys[i]).collect();
            let v = Var::from_vec(flat(&rows), (3 * n, d), &Device::Cpu).unwrap();
            let loss = info_nce_in_group(v.as_tensor(), n, &local_keys, 0.3, Some(&grp)).unwrap();
            let grads = loss.backward().unwrap();
            let mean = grp
                .all_reduce_sum(&loss)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                / world as f32;
            let gv = (grads.get(v.as_tensor()).unwrap() / world as f64)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            (mean, idx.into_iter().zip(gv).collect())
        });
        for (r, (loss, rows)) in ranks.iter().enumerate() {
            assert!(
                (loss - want).abs() < 1e-5,
                "rank {r}: loss {loss} vs {want}"
            );
            for (i, grad) in rows {
                for (x, y) in grad.iter().zip(&want_grad[*i]) {
                    assert!((x - y).abs() < 1e-5, "rank {r}, global row {i}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn recall_counts_the_rank_of_each_querys_own_document() {
        let q = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![1.0, 1.0]];
        // Query 0 finds doc 0 first; query 1's doc comes second (after doc 2); query 2's first.
        let d = vec![vec![1.0, 0.0], vec![-1.0, 0.2], vec![1.0, 0.9]];
        let m = recall_at(&q, &d, &[1, 2]);
        assert_eq!(m["recall_at_1"], 2.0 / 3.0);
        assert_eq!(m["recall_at_2"], 1.0);
        assert!((m["mrr"] - (1.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
    }

    /// The loader's cursor is the whole resume state: seeking to it continues the same
    /// sequence of batches, across an epoch boundary.
    #[test]
    fn loader_resumes_from_its_cursor() {
        let data = Arc::new(examples());
        let straight: Vec<SimcseBatch> = SimcseLoader::new(data.clone(), 2, 5).take(7).collect();
        assert_eq!(
            straight[3].cursor_after,
            Cursor {
                epoch: 1,
                position: 1
            }
        );
        let mut resumed = SimcseLoader::new(data, 2, 5);
        resumed.seek(straight[2].cursor_after);
        for (a, b) in resumed.take(4).zip(&straight[3..]) {
            assert_eq!(a.rows, b.rows);
            assert_eq!(a.keys, b.keys);
        }
        // Different epochs draw different orders.
        assert_ne!(straight[0].rows, straight[3].rows);
    }
}
