//! `kindling finetune`: sequence classification from any BERT folder (a Kindling export or an HF
//! folder such as all-MiniLM-L6-v2), as HF's `run_glue` / `Trainer` does it.
//!
//! ```text
//! table (TSV/CSV/JSONL) -> examples (file:line) -> train / validation (by text hash) / test
//!   -> the folder's tokenizer (truncate to max_length) -> length-grouped, padded batches
//!   -> BertForSequenceClassification (backbone by name + fresh pooler/classifier)
//!   -> trainer (AdamW, warmup/decay, optional layer-wise lr decay, eval each epoch)
//!   -> best checkpoint by validation metric -> test metrics -> HF folder with id2label
//! ```
//!
//! The validation split is carved from the training rows by a hash of the text, so the
//! checkpoint is chosen without looking at the test rows, and the same row lands on the same side
//! whatever the seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use kindling_core::rng::{self, domain, hash_str};
use kindling_core::Mode;
use kindling_data::labelled::{read_examples, Example, LabelSet, TableSpec};
use kindling_data::tokenizer as tok;
use kindling_models::bert::{BertConfig, BertForSequenceClassification, Pooling};
use kindling_models::export::{save_json, write_atomic};
use kindling_models::import;
use kindling_models::init::hf_init;
use kindling_train::{checkpoint, Goal, Monitor, Objective, StepOutput, Trainer};

use crate::bert_mlm::write_hf_folder;
use crate::recipe::{parse_toml, ExportSection, TrainSection};
use crate::run::{device, first_loadable, load_checked, plan_run, standard_trainer};
use crate::{RecipeError, RunOptions};

/// A fine-tuning (and probing) recipe: `kindling finetune recipes/NAME.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRecipe {
    /// `sequence-classification` (the only task so far).
    #[serde(default = "default_task")]
    pub task: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_runs_dir")]
    pub runs_dir: PathBuf,
    /// Fixes data order, dropout, the classifier's initialisation and (with `init = "random"`)
    /// the whole model's.
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: String,
    pub model: FtModel,
    pub data: FtData,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub probe: ProbeSection,
    #[serde(default)]
    pub export: ExportSection,
}

fn default_task() -> String {
    "sequence-classification".into()
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

/// How the backbone starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The folder's weights (the point of pretraining).
    Pretrained,
    /// The folder's shape only, initialised as HF does: the baseline pretraining must beat.
    Random,
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FtModel {
    /// A BERT folder: config.json, model.safetensors, tokenizer.json or vocab.txt.
    pub path: PathBuf,
    #[serde(default = "default_init")]
    pub init: Init,
    /// `cls` (HF's pooler over [CLS]; what transformers' BertForSequenceClassification computes)
    /// or `mean` (over non-padding tokens).
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    /// Dropout before the classifier; unset: the folder's `hidden_dropout_prob` (HF's rule).
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Override the folder's dropout rates for fine-tuning (HF config names).
    #[serde(default)]
    pub hidden_dropout_prob: Option<f64>,
    #[serde(default)]
    pub attention_probs_dropout_prob: Option<f64>,
    /// Layer-wise lr decay: layer `i` of `L` trains at `lr * decay^(L - i)`, the embeddings at
    /// `lr * decay^(L + 1)`, the pooler and classifier at `lr`. 1 = off.
    #[serde(default = "one")]
    pub layerwise_lr_decay: f64,
    /// Backbone tensors allowed to be missing from the folder (names as in the model, e.g.
    /// `bert.pooler.dense.weight`); the pooler and classifier are always allowed.
    #[serde(default)]
    pub allow_missing: Vec<String>,
}

fn default_init() -> Init {
    Init::Pretrained
}
fn default_pooling() -> Pooling {
    Pooling::Cls
}
fn one() -> f64 {
    1.0
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FtData {
    /// The table: `.tsv`, `.csv` or `.jsonl`, optionally `.gz`.
    pub path: PathBuf,
    #[serde(default)]
    pub format: Option<String>,
    pub text_columns: Vec<String>,
    pub label_column: String,
    /// Column naming each row's split; unset: all rows train, and `test_fraction` of them
    /// (by text hash) are the test split.
    #[serde(default)]
    pub split_column: Option<String>,
    #[serde(default = "default_train_split")]
    pub train_split: String,
    #[serde(default = "default_test_split")]
    pub test_split: String,
    /// Used only without a split column.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Fraction of the training rows held out (by text hash) to pick the best checkpoint.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// The classes in output order; unset: those of the training rows (numbers numerically).
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Tokens per example, [CLS] and [SEP] included; longer texts are truncated.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Use at most this many training rows (a seeded subset; 0 = all).
    #[serde(default)]
    pub max_train_examples: usize,
    /// Batch examples of similar length (HF's `group_by_length`): less padding, so faster
    /// steps, at the price of batches less mixed (where length goes with the label, a batch
    /// may hold one class only). Off by default, as in HF.
    #[serde(default)]
    pub group_by_length: bool,
}

fn default_train_split() -> String {
    "train".into()
}
fn default_test_split() -> String {
    "test".into()
}
fn default_test_fraction() -> f64 {
    0.2
}
fn default_validation_fraction() -> f64 {
    0.1
}
fn default_max_length() -> usize {
    128
}

/// `[probe]`: the frozen-embedding linear probe (`kindling probe`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSection {
    /// `mean` over tokens or the raw `cls` hidden state (no pooler: an MLM export's is untrained).
    pub pooling: Pooling,
    /// L2 strengths tried; the one with the best validation accuracy is kept.
    pub l2: Vec<f64>,
    /// Full-batch optimisation steps per strength.
    pub steps: usize,
    pub lr: f64,
}

impl Default for ProbeSection {
    fn default() -> Self {
        ProbeSection {
            pooling: Pooling::Mean,
            l2: vec![1e-4, 1e-3, 1e-2],
            steps: 300,
            lr: 0.05,
        }
    }
}

impl FinetuneRecipe {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut r: FinetuneRecipe = parse_toml(&text, path, overrides)?;
        if r.name.is_none() {
            r.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        r.validate()?;
        Ok(r)
    }

    fn validate(&self) -> Result<(), RecipeError> {
        let bad = |key: &str, msg: String| {
            Err(RecipeError::Invalid {
                key: key.into(),
                msg,
            })
        };
        use crate::registry::{lookup, Family, Kind};
        if lookup(Kind::Task, &self.task)?.family != Family::TextClassification {
            return bad(
                "task",
                format!(
                    "`{}` is not a text task: expected \"sequence-classification\"",
                    self.task
                ),
            );
        }
        let f = self.data.validation_fraction;
        if !(0.0..1.0).contains(&f) {
            return bad(
                "data.validation_fraction",
                format!("{f}: expected 0 <= x < 1"),
            );
        }
        if self.data.max_length < 2 {
            return bad(
                "data.max_length",
                "must be at least 2 ([CLS] and [SEP])".into(),
            );
        }
        if !(self.model.layerwise_lr_decay > 0.0 && self.model.layerwise_lr_decay <= 1.0) {
            return bad(
                "model.layerwise_lr_decay",
                format!("{}: expected 0 < x <= 1", self.model.layerwise_lr_decay),
            );
        }
        if self.train.batch_size == 0 {
            return bad("train.batch_size", "must be positive".into());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("finetune")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(self.name())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a recipe serialises")
    }
}

// ---------------------------------------------------------------------------------------------
// Data

/// Tokenised, labelled splits.
pub struct TaskData {
    pub labels: LabelSet,
    pub train: Encoded,
    pub validation: Encoded,
    pub test: Encoded,
    pub pad_id: u32,
}

/// Token ids (truncated, with [CLS]/[SEP]) and class indices.
#[derive(Default)]
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// The fraction of examples in the most frequent class.
    pub fn majority_fraction(&self, classes: usize) -> f64 {
        let mut counts = vec![0usize; classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        *counts.iter().max().unwrap_or(&0) as f64 / self.len().max(1) as f64
    }
}

/// Reads, splits, labels and tokenises the recipe's table with `tokenizer`.
pub fn load_task(recipe: &FinetuneRecipe, tokenizer: &Tokenizer) -> Result<TaskData, RecipeError> {
    let d = &recipe.data;
    let spec = TableSpec {
        path: d.path.clone(),
        format: d.format.clone(),
        text_columns: d.text_columns.clone(),
        label_column: d.label_column.clone(),
        split_column: d.split_column.clone(),
    };
    let rows = read_examples(&spec)?;
    let hashed = |e: &Example, salt: u64| {
        (rng::mix64(hash_str(&e.text) ^ salt) >> 11) as f64 / (1u64 << 53) as f64
    };
    let (mut train, test): (Vec<Example>, Vec<Example>) = match &d.split_column {
        Some(col) => {
            let known = [d.train_split.as_str(), d.test_split.as_str()];
            if let Some(e) = rows
                .iter()
                .find(|e| !known.contains(&e.split.as_deref().unwrap_or("")))
            {
                return Err(RecipeError::Data(kindling_data::DataError::Row {
                    path: d.path.clone(),
                    line: e.line,
                    msg: format!(
                        "split `{}` in column `{col}` is neither data.train_split `{}` nor \
                         data.test_split `{}`",
                        e.split.as_deref().unwrap_or(""),
                        d.train_split,
                        d.test_split
                    ),
                }));
            }
            rows.into_iter()
                .partition(|e| e.split.as_deref() == Some(d.train_split.as_str()))
        }
        None => rows
            .into_iter()
            .partition(|e| hashed(e, domain::SPLIT) >= d.test_fraction),
    };
    if d.max_train_examples > 0 && train.len() > d.max_train_examples {
        let mut r = rng::rng(&[domain::SPLIT, recipe.seed]);
        train.shuffle(&mut r);
        train.truncate(d.max_train_examples);
        train.sort_by_key(|e| e.line);
    }
    let (train, validation): (Vec<Example>, Vec<Example>) = train
        .into_iter()
        .partition(|e| hashed(e, domain::SPLIT + 1) >= d.validation_fraction);
    if train.is_empty() || test.is_empty() {
        return Err(RecipeError::Invalid {
            key: "data".into(),
            msg: format!(
                "{}: {} training and {} test rows; both splits need rows",
                d.path.display(),
                train.len(),
                test.len()
            ),
        });
    }
    let labels = match &d.labels {
        Some(names) => LabelSet {
            names: names.clone(),
        },
        None => LabelSet::infer(&train),
    };
    if labels.len() < 2 {
        return Err(RecipeError::Invalid {
            key: "data.labels".into(),
            msg: format!(
                "{:?}: a classifier needs at least two classes",
                labels.names
            ),
        });
    }
    let specials = tok::special_tokens(tokenizer)?;
    let encode = |rows: &[Example]| -> Result<Encoded, RecipeError> {
        let ids = rows
            .par_iter()
            .map(|e| {
                let enc = tokenizer.encode(e.text.as_str(), true).map_err(|err| {
                    RecipeError::Data(kindling_data::DataError::Row {
                        path: d.path.clone(),
                        line: e.line,
                        msg: format!("cannot tokenise: {err}"),
                    })
                })?;
                let mut ids = enc.get_ids().to_vec();
                if ids.len() > d.max_length {
                    ids.truncate(d.max_length - 1);
                    ids.push(specials.sep);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>, RecipeError>>()?;
        Ok(Encoded {
            ids,
            labels: labels.encode(rows, &d.path)?,
        })
    };
    Ok(TaskData {
        train: encode(&train)?,
        validation: encode(&validation)?,
        test: encode(&test)?,
        pad_id: specials.pad,
        labels,
    })
}

/// A padded batch: `(batch, seq)` ids and attention mask, class labels, and where it came from.
#[derive(Debug, Clone)]
pub struct ClsBatch {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub labels: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
    pub epoch: u64,
    pub index: usize,
}

/// Pads the examples `idx` of `data` to their longest.
pub fn make_batch(data: &Encoded, idx: &[usize], pad: u32, epoch: u64, index: usize) -> ClsBatch {
    let seq_len = idx.iter().map(|&i| data.ids[i].len()).max().unwrap_or(1);
    let mut input_ids = Vec::with_capacity(idx.len() * seq_len);
    let mut attention_mask = Vec::with_capacity(idx.len() * seq_len);
    for &i in idx {
        let ids = &data.ids[i];
        input_ids.extend_from_slice(ids);
        input_ids.extend(std::iter::repeat_n(pad, seq_len - ids.len()));
        attention_mask.extend(std::iter::repeat_n(1, ids.len()));
        attention_mask.extend(std::iter::repeat_n(0, seq_len - ids.len()));
    }
    ClsBatch {
        input_ids,
        attention_mask,
        labels: idx.iter().map(|&i| data.labels[i]).collect(),
        batch_size: idx.len(),
        seq_len,
        epoch,
        index,
    }
}

/// Evaluation batches in length order (less padding; the order does not change the metrics).
pub fn eval_batches(data: &Encoded, batch_size: usize, pad: u32) -> Vec<ClsBatch> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(data.ids[i].len()));
    order
        .chunks(batch_size.max(1))
        .enumerate()
        .map(|(k, c)| make_batch(data, c, pad, 0, k))
        .collect()
}

/// The batches of one epoch: a seeded permutation; with `lengths` (HF's `group_by_length`),
/// sorted by length inside mega-batches of 50 batches, so a batch pads to similar lengths while
/// the data order stays random at the scale of an epoch.
pub fn epoch_batches(
    n: usize,
    lengths: Option<&[usize]>,
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng::rng(&[domain::DATA_ORDER, seed, epoch]));
    let Some(lengths) = lengths else {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    let mut out = Vec::with_capacity(n.div_ceil(batch_size));
    for mega in order.chunks(batch_size * 50) {
        let mut mega = mega.to_vec();
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        out.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    out
}

/// Endless training batches, epoch after epoch; `(epoch, index)` is the resume cursor.
pub struct ClsLoader {
    data: Arc<Encoded>,
    /// Set when batches group examples by length.
    lengths: Option<Vec<usize>>,
    batch_size: usize,
    seed: u64,
    pad: u32,
    epoch: u64,
    index: usize,
    plan: Vec<Vec<usize>>,
}

impl ClsLoader {
    pub fn new(
        data: Arc<Encoded>,
        batch_size: usize,
        seed: u64,
        pad: u32,
        group_by_length: bool,
    ) -> Self {
        let lengths = group_by_length.then(|| data.ids.iter().map(Vec::len).collect());
        let mut l = ClsLoader {
            data,
            lengths,
            batch_size,
            seed,
            pad,
            epoch: 0,
            index: 0,
            plan: Vec::new(),
        };
        l.plan = l.plan_for(0);
        l
    }

    fn plan_for(&self, epoch: u64) -> Vec<Vec<usize>> {
        epoch_batches(
            self.data.len(),
            self.lengths.as_deref(),
            self.batch_size,
            self.seed,
            epoch,
        )
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }

    /// Continues after batch `index` of `epoch` (the cursor a checkpoint saved).
    pub fn seek_after(&mut self, epoch: u64, index: usize) {
        self.epoch = epoch;
        self.plan = self.plan_for(epoch);
        self.index = index + 1;
    }
}

impl Iterator for ClsLoader {
    type Item = ClsBatch;
    fn next(&mut self) -> Option<ClsBatch> {
        if self.index == self.plan.len() {
            self.epoch += 1;
            self.index = 0;
            self.plan = self.plan_for(self.epoch);
        }
        let b = make_batch(
            &self.data,
            &self.plan[self.index],
            self.pad,
            self.epoch,
            self.index,
        );
        self.index += 1;
        Some(b)
    }
}

// ---------------------------------------------------------------------------------------------
// Objective

/// Cross-entropy over classes; in eval, accuracy and the confusion matrix (as fractions of the
/// eval set, so the trainer's weighted average over batches sums them), from which
/// `finish_eval` derives macro-F1.
pub struct Classifier {
    pub model: BertForSequenceClassification,
    pub varmap: VarMap,
    pub config: BertConfig,
    pub labels: LabelSet,
    device: Device,
    /// The confusion matrix (rows: true class, columns: predicted) of the last evaluation, as
    /// fractions; `finish_eval` moves it here from the metrics.
    last_confusion: Mutex<Option<Vec<Vec<f64>>>>,
}

/// Accuracy and macro-F1 from a confusion matrix (rows: true, columns: predicted).
pub fn accuracy_and_macro_f1(cm: &[Vec<f64>]) -> (f64, f64) {
    let c = cm.len();
    let total: f64 = cm.iter().flatten().sum();
    let correct: f64 = (0..c).map(|i| cm[i][i]).sum();
    let f1: f64 = (0..c)
        .map(|i| {
            let tp = cm[i][i];
            let predicted: f64 = (0..c).map(|r| cm[r][i]).sum();
            let actual: f64 = cm[i].iter().sum();
            if predicted + actual == 0.0 {
                0.0
            } else {
                2.0 * tp / (predicted + actual)
            }
        })
        .sum::<f64>()
        / c as f64;
    (correct / total.max(1e-12), f1)
}

impl Classifier {
    /// The model for `recipe`, from the folder's weights or (`init = "random"`) its shape only.
    /// Everything starts from HF's seeded initialisation; pretrained tensors then overwrite it.
    pub fn build(
        recipe: &FinetuneRecipe,
        labels: LabelSet,
        device: &Device,
    ) -> Result<(Self, Option<import::KeyReport>), RecipeError> {
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
        let model = BertForSequenceClassification::load(
            vb,
            &config,
            labels.len(),
            m.pooling,
            m.classifier_dropout.unwrap_or(config.hidden_dropout_prob),
        )?;
        hf_init(
            &varmap,
            recipe.seed,
            config.initializer_range,
            Some(config.pad_token_id),
        )?;
        let report = match m.init {
            Init::Random => None,
            Init::Pretrained => {
                let (path, tensors) = import::read_weights(&m.path, device)?;
                let report = import::copy_tensors(&varmap, &tensors, &path)?;
                let fresh = |n: &str| {
                    n.starts_with("classifier.")
                        || n.starts_with("bert.pooler.")
                        || m.allow_missing.iter().any(|a| a == n)
                };
                let bad: Vec<&String> = report.missing.iter().filter(|n| !fresh(n)).collect();
                if !bad.is_empty() {
                    return Err(RecipeError::Run {
                        path,
                        msg: format!(
                            "the backbone's tensors {:?} are missing (a BERT folder whose names \
                             do not match?); list them in model.allow_missing to train them from \
                             scratch",
                            &bad[..bad.len().min(5)]
                        ),
                    });
                }
                Some(report)
            }
        };
        Ok((
            Classifier {
                model,
                varmap,
                config,
                labels,
                device: device.clone(),
                last_confusion: Mutex::new(None),
            },
            report,
        ))
    }

    pub fn param_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    pub fn logits(&self, b: &ClsBatch, mode: Mode) -> candle_core::Result<Tensor> {
        let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &self.device)?;
        let mask = Tensor::from_slice(&b.attention_mask, (b.batch_size, b.seq_len), &self.device)?;
        self.model
            .forward_t(&ids, &mask, mode)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// The layer-wise lr multiplier of a parameter (see `FtModel::layerwise_lr_decay`).
    pub fn lr_scale(&self, name: &str, decay: f64) -> f64 {
        let layers = self.config.num_hidden_layers as i32;
        let depth = if name.starts_with("bert.embeddings.") {
            0
        } else if let Some(rest) = name.strip_prefix("bert.encoder.layer.") {
            1 + rest
                .split('.')
                .next()
                .and_then(|i| i.parse::<i32>().ok())
                .unwrap_or(0)
        } else {
            layers + 1
        };
        decay.powi(layers + 1 - depth)
    }

    /// The confusion matrix of the last evaluation, in counts of `n` examples.
    pub fn confusion_counts(&self, n: usize) -> Option<Vec<Vec<u64>>> {
        self.last_confusion
            .lock()
            .expect("lock")
            .as_ref()
            .map(|cm| {
                cm.iter()
                    .map(|r| r.iter().map(|f| (f * n as f64).round() as u64).collect())
                    .collect()
            })
    }
}

impl Objective for Classifier {
    type Batch = ClsBatch;

    fn step(&self, b: &ClsBatch, mode: Mode) -> candle_core::Result<StepOutput> {
        let logits = self.logits(b, mode)?;
        let labels = Tensor::from_slice(&b.labels, b.labels.len(), &self.device)?;
        let loss = kindling_models::ops::cross_entropy(&logits, &labels)?;
        let mut metrics = BTreeMap::new();
        if !mode.is_train() {
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let c = self.labels.len();
            let mut cm = vec![0usize; c * c];
            for (&t, &p) in b.labels.iter().zip(&pred) {
                cm[t as usize * c + p as usize] += 1;
            }
            let n = b.labels.len() as f64;
            let hits: usize = (0..c).map(|i| cm[i * c + i]).sum();
            metrics.insert("accuracy".into(), hits as f64 / n);
            for (k, &v) in cm.iter().enumerate() {
                metrics.insert(format!("cm.{}.{}", k / c, k % c), v as f64 / n);
            }
        }
        Ok(StepOutput {
            loss,
            weight: b.labels.len() as f64,
            units: b.labels.len(),
            metrics,
        })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn finish_eval(&self, m: &mut BTreeMap<String, f64>) {
        let c = self.labels.len();
        let mut cm = vec![vec![0.0; c]; c];
        let keys: Vec<String> = m.keys().filter(|k| k.starts_with("cm.")).cloned().collect();
        if keys.is_empty() {
            return;
        }
        for k in keys {
            let v = m.remove(&k).unwrap_or(0.0);
            let mut parts = k[3..].split('.').map(|s| s.parse::<usize>().unwrap_or(0));
            let (i, j) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            cm[i][j] = v;
        }
        let (_, f1) = accuracy_and_macro_f1(&cm);
        m.insert("macro_f1".into(), f1);
        *self.last_confusion.lock().expect("lock") = Some(cm);
    }
}

/// The confusion matrix as a table a person reads: rows are true classes.
pub fn format_confusion(labels: &LabelSet, cm: &[Vec<u64>]) -> String {
    let w = labels
        .names
        .iter()
        .map(|n| n.len())
        .chain(cm.iter().flatten().map(|v| v.to_string().len()))
        .max()
        .unwrap_or(1)
        .max(4);
    let mut s = format!("{:>w$}  predicted ->\n", "true");
    s += &format!("{:>w$}", "");
    for n in &labels.names {
        s += &format!(" {n:>w$}");
    }
    s += "\n";
    for (i, row) in cm.iter().enumerate() {
        s += &format!("{:>w$}", labels.names[i]);
        for v in row {
            s += &format!(" {v:>w$}");
        }
        s += "\n";
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Run

/// What a fine-tuning run reports.
#[derive(Debug, Clone)]
pub struct FinetuneReport {
    pub name: String,
    pub init: Init,
    pub steps: u64,
    pub elapsed_secs: f64,
    pub best_validation: Option<(u64, f64)>,
    pub test: BTreeMap<String, f64>,
    pub test_majority: f64,
    pub export_dir: PathBuf,
}

/// The eval metrics of a fine-tuning run (`train.monitor.metric` names one).
pub const EVAL_METRICS: &[&str] = &["loss", "accuracy", "macro_f1", "cm.*"];

/// Runs the recipe: train with evaluation on the validation split, reload the best checkpoint,
/// score the test split, export.
pub fn finetune(recipe: &FinetuneRecipe, opts: &RunOptions) -> Result<FinetuneReport, RecipeError> {
    let device = device(&recipe.device)?;
    let t = &recipe.train;
    crate::recipe::check_name(recipe.name())?;
    recipe.train.validate(EVAL_METRICS)?;
    let tokenizer = tok::load(&recipe.model.path)?;
    let task = load_task(recipe, &tokenizer)?;
    // Nothing in the run folder changes until the checkpoint is picked (run/folder.rs).
    let plan = plan_run(recipe.run_dir(), opts, 0)?;
    let run_dir = plan.dir.clone();
    eprintln!(
        "data: {} classes {:?}; {} train, {} validation, {} test rows (test majority class {:.1}%)",
        task.labels.len(),
        task.labels.names,
        task.train.len(),
        task.validation.len(),
        task.test.len(),
        100.0 * task.test.majority_fraction(task.labels.len())
    );
    let (obj, report) = Classifier::build(recipe, task.labels.clone(), &device)?;
    match &report {
        Some(r) => eprintln!(
            "model: {} ({:?} init, {} pooling): fresh (not in the folder): {:?}; unused from the \
             folder: {} tensors{}",
            recipe.model.path.display(),
            recipe.model.init,
            pooling_name(recipe.model.pooling),
            r.missing,
            r.unused.len(),
            if r.unused.is_empty() {
                String::new()
            } else {
                format!(" ({} ...)", r.unused[0])
            }
        ),
        None => eprintln!(
            "model: the shape of {}, randomly initialised (seed {})",
            recipe.model.path.display(),
            recipe.seed
        ),
    }
    let loader = ClsLoader::new(
        Arc::new(task.train),
        t.batch_size,
        recipe.seed,
        task.pad_id,
        recipe.data.group_by_length,
    );
    let per_epoch = loader.batches_per_epoch() as u64;
    let mut cfg = t.train_config(recipe.seed, per_epoch)?;
    // Unset eval/save cadence means once per epoch (and at the end), as HF's
    // `eval_strategy = "epoch"`; the default monitor is validation accuracy.
    if cfg.eval_every == 0 {
        cfg.eval_every = per_epoch;
    }
    if cfg.save_every == 0 {
        cfg.save_every = cfg.eval_every;
    }
    cfg.keep_last = cfg.keep_last.max(1);
    if cfg.monitor == Monitor::default() {
        cfg.monitor = Monitor {
            metric: "accuracy".into(),
            goal: Goal::Max,
            ..Monitor::default()
        };
    }
    cfg.checkpoint_extras = vec![run_dir.join("recipe.toml")];
    let (steps, eval_every, monitor_metric) =
        (cfg.steps, cfg.eval_every, cfg.monitor.metric.clone());
    let mut opt = Trainer::build_optimizer(&cfg.optimizer, &obj)?;
    let decay = recipe.model.layerwise_lr_decay;
    if decay != 1.0 {
        opt.set_lr_scales(&|name| obj.lr_scale(name, decay));
    }
    #[derive(serde::Deserialize)]
    struct At {
        epoch: u64,
        index: usize,
    }
    let batches = per_epoch as usize;
    let resumed = first_loadable(&plan.candidates, |dir| {
        load_checked(dir, &obj.varmap, opt.as_mut(), &device, |at: &At| {
            if at.index >= batches.max(1) {
                return Err(format!(
                    "is past the end of the {batches} batches of an epoch"
                ));
            }
            Ok(())
        })
    })?;
    let resume_from = resumed.as_ref().map(|(dir, _)| dir.clone());
    let _lock = plan.commit(&recipe.to_toml(), opts, resume_from.is_some())?;
    let mut trainer = standard_trainer(
        cfg,
        &run_dir,
        t.log_every,
        "ex",
        &["accuracy", "macro_f1"],
        resume_from.as_deref(),
        opts,
    )?;
    let validation = eval_batches(&task.validation, t.eval_batch_size, task.pad_id);
    eprintln!(
        "train: {steps} steps of {} ({per_epoch} per epoch), eval every {eval_every} steps on \
         {} validation rows",
        t.batch_size,
        task.validation.len()
    );
    let mut loader = loader;
    let start = resumed.map(|(_, (state, at))| {
        loader.seek_after(at.epoch, at.index);
        state
    });
    let summary = trainer.fit(
        &obj,
        &mut loader,
        &validation,
        opt,
        start,
        &|b: &ClsBatch| serde_json::json!({"epoch": b.epoch, "index": b.index}),
    )?;
    let export_dir = recipe
        .export
        .dir
        .clone()
        .unwrap_or_else(|| run_dir.join("export"));
    // The best checkpoint by the validation metric, if it is still on disk.
    let best = summary.best.as_ref().map(|b| (b.step, b.value));
    if summary.stop == kindling_train::StopReason::Interrupted {
        // Checkpointed; `--resume auto` finishes it. No test scores, no export.
        return Ok(FinetuneReport {
            name: recipe.name().to_string(),
            init: recipe.model.init,
            steps: summary.steps,
            elapsed_secs: summary.elapsed_secs,
            best_validation: best,
            test: BTreeMap::new(),
            test_majority: task.test.majority_fraction(obj.labels.len()),
            export_dir,
        });
    }
    if let Some((step, _)) = best {
        let dir = checkpoint::checkpoint_dir(&run_dir, step);
        if dir.is_dir() && step != summary.steps {
            checkpoint::load(&dir, &obj.varmap, None, &device)?;
            eprintln!("best checkpoint: step {step} (validation {monitor_metric})");
        }
    }
    let test_batches = eval_batches(&task.test, t.eval_batch_size, task.pad_id);
    let test = Trainer::evaluate(&obj, &test_batches)?;
    eprintln!(
        "test ({} rows): accuracy {:.4}, macro-F1 {:.4}, loss {:.4}",
        task.test.len(),
        test.get("accuracy").copied().unwrap_or(f64::NAN),
        test.get("macro_f1").copied().unwrap_or(f64::NAN),
        test.get("loss").copied().unwrap_or(f64::NAN),
    );
    if let Some(cm) = obj.confusion_counts(task.test.len()) {
        eprint!("{}", format_confusion(&obj.labels, &cm));
    }
    save_json(
        &run_dir.join("test_results.json"),
        &serde_json::json!({"test": test, "best_validation": best.map(|(s, v)| serde_json::json!({"step": s, "value": v})),
            "steps": summary.steps, "elapsed_s": summary.elapsed_secs,
            "confusion_matrix": obj.confusion_counts(task.test.len()), "labels": obj.labels.names}),
    )?;
    export(&obj, &tokenizer, recipe, &export_dir, &test, summary.steps)?;
    eprintln!("export: {}", export_dir.display());
    Ok(FinetuneReport {
        name: recipe.name().to_string(),
        init: recipe.model.init,
        steps: summary.steps,
        elapsed_secs: summary.elapsed_secs,
        best_validation: best,
        test,
        test_majority: task.test.majority_fraction(obj.labels.len()),
        export_dir,
    })
}

fn pooling_name(p: Pooling) -> &'static str {
    match p {
        Pooling::Cls => "cls",
        Pooling::Mean => "mean",
    }
}

/// The HF `config.json` of a `BertForSequenceClassification`.
pub fn classifier_config_json(
    cfg: &BertConfig,
    labels: &LabelSet,
    pooling: Pooling,
    classifier_dropout: f64,
) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("config serialises");
    v["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    v["torch_dtype"] = "float32".into();
    v["problem_type"] = "single_label_classification".into();
    v["classifier_dropout"] = classifier_dropout.into();
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), n.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i.into()))
        .collect();
    v["id2label"] = id2label.into();
    v["label2id"] = label2id.into();
    // Not an HF key (transformers ignores it): how Kindling pooled.
    v["kindling_pooling"] = pooling_name(pooling).into();
    v
}

/// Writes the HF folder: config.json (with id2label), model.safetensors, tokenizer files, card.
pub fn export(
    obj: &Classifier,
    tokenizer: &Tokenizer,
    recipe: &FinetuneRecipe,
    dir: &Path,
    test: &BTreeMap<String, f64>,
    steps: u64,
) -> Result<(), RecipeError> {
    let dropout = recipe
        .model
        .classifier_dropout
        .unwrap_or(obj.config.hidden_dropout_prob);
    write_hf_folder(
        dir,
        &classifier_config_json(&obj.config, &obj.labels, recipe.model.pooling, dropout),
        &obj.varmap,
        tokenizer,
        &obj.config,
    )?;
    let mut card = String::from("---\n");
    card += &format!(
        "license: {}\nlibrary_name: transformers\npipeline_tag: text-classification\ntags:\n  - kindling\n  - bert\n---\n\n",
        serde_json::to_string(recipe.export.license.as_deref().unwrap_or("apache-2.0"))
            .expect("strings serialise")
    );
    card += &format!(
        "# {}\n\nA BERT sequence classifier ({} classes: {}) fine-tuned by Kindling for {steps} \
         steps from `{}` ({} initialisation) on `{}` (label column `{}`). It loads with \
         `transformers.AutoModelForSequenceClassification.from_pretrained(dir)`.\n\n",
        recipe.name(),
        obj.labels.len(),
        obj.labels.names.join(", "),
        recipe.model.path.display(),
        match recipe.model.init {
            Init::Pretrained => "pretrained",
            Init::Random => "random",
        },
        recipe.data.path.display(),
        recipe.data.label_column
    );
    card += "## Test results\n\n| metric | value |\n|---|---|\n";
    for (k, v) in test {
        card += &format!("| {k} | {v:.4} |\n");
    }
    card += "\n## Recipe\n\n```toml\n";
    card += &recipe.to_toml();
    card += "```\n";
    write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}

/// `kindling finetune --compare-random`: the recipe as written, then the same recipe with a
/// randomly initialised backbone of the same shape (run `<name>-random`), side by side.
pub fn compare_with_random(
    recipe: &FinetuneRecipe,
    opts: &RunOptions,
) -> Result<(FinetuneReport, FinetuneReport), RecipeError> {
    let mut pre = recipe.clone();
    pre.model.init = Init::Pretrained;
    let mut random = recipe.clone();
    random.model.init = Init::Random;
    random.name = Some(format!("{}-random", recipe.name()));
    random.export.dir = None;
    let a = finetune(&pre, opts)?;
    if opts
        .stop_flag
        .as_ref()
        .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    {
        return Ok((a.clone(), a));
    }
    // A resume continues each run in its own folder.
    let mut random_opts = opts.clone();
    if random_opts.resume.is_some() {
        random_opts.resume = Some(crate::Resume::Auto);
    }
    let b = finetune(&random, &random_opts)?;
    Ok((a, b))
}

/// The side-by-side table of [`compare_with_random`].
pub fn comparison_table(a: &FinetuneReport, b: &FinetuneReport) -> String {
    let get = |r: &FinetuneReport, k: &str| r.test.get(k).copied().unwrap_or(f64::NAN);
    let mut s = String::from(
        "| run | init | steps | time | test accuracy | test macro-F1 | best validation |\n|---|---|---|---|---|---|---|\n",
    );
    for r in [a, b] {
        s += &format!(
            "| {} | {:?} | {} | {:.0} s | {:.2}% | {:.4} | {} |\n",
            r.name,
            r.init,
            r.steps,
            r.elapsed_secs,
            100.0 * get(r, "accuracy"),
            get(r, "macro_f1"),
            r.best_validation
                .map(|(s, v)| format!("{v:.4} @ {s}"))
                .unwrap_or_default()
        );
    }
    s += &format!(
        "\npretrained - random: {:+.2} points of test accuracy, {:+.4} macro-F1 (majority class: {:.2}%)\n",
        100.0 * (get(a, "accuracy") - get(b, "accuracy")),
        get(a, "macro_f1") - get(b, "macro_f1"),
        100.0 * a.test_majority
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_of_a_known_matrix() {
        // true 0: 3 right, 1 called 1; true 1: 2 right.
        let cm = vec![vec![3.0, 1.0], vec![0.0, 2.0]];
        let (acc, f1) = accuracy_and_macro_f1(&cm);
        assert!((acc - 5.0 / 6.0).abs() < 1e-12);
        // class 0: p 3/3, r 3/4 -> 6/7; class 1: p 2/3, r 1 -> 4/5.
        assert!((f1 - (6.0 / 7.0 + 0.8) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn epochs_cover_every_example_once_in_a_seeded_order() {
        let lengths: Vec<usize> = (0..103).map(|i| 5 + i % 17).collect();
        for grouped in [None, Some(&lengths[..])] {
            let a = epoch_batches(103, grouped, 8, 1, 0);
            let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
            seen.sort();
            assert_eq!(seen, (0..103).collect::<Vec<_>>());
            assert_eq!(a, epoch_batches(103, grouped, 8, 1, 0));
            assert_ne!(a, epoch_batches(103, grouped, 8, 1, 1));
            assert_ne!(a, epoch_batches(103, grouped, 8, 2, 0));
        }
        // Grouped: each batch spans a narrower range of lengths than a random one.
        let spread = |b: &Vec<usize>| {
            let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
            l.iter().max().unwrap() - l.iter().min().unwrap()
        };
        let grouped: usize = epoch_batches(103, Some(&lengths), 8, 1, 0)
            .iter()
            .map(spread)
            .sum();
        let random: usize = epoch_batches(103, None, 8, 1, 0).iter().map(spread).sum();
        assert!(grouped < random / 2, "{grouped} vs {random}");
    }

    #[test]
    fn batches_pad_to_their_longest_with_a_zero_mask() {
        let data = Encoded {
            ids: vec![vec![1, 5, 2], vec![1, 2]],
            labels: vec![0, 1],
        };
        let b = make_batch(&data, &[0, 1], 0, 0, 0);
        assert_eq!(b.seq_len, 3);
        assert_eq!(b.input_ids, [1, 5, 2, 1, 2, 0]);
        assert_eq!(b.attention_mask, [1, 1, 1, 1, 1, 0]);
        assert_eq!(b.labels, [0, 1]);
    }
}
