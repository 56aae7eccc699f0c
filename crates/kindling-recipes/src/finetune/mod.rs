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
use kindling_data::labelled::{
    read_examples_with, Example, LabelSet, OnInvalid, Skipped, TableSpec,
};
use kindling_data::tokenizer as tok;
use kindling_models::bert::Pooling;
use kindling_models::export::{save_json, write_atomic};
use kindling_models::import;
use kindling_models::{EncoderConfig, SequenceClassifier};
use kindling_train::{
    checkpoint, FitSummary, Goal, Monitor, Objective, Optimizer, StepOutput, TrainConfig, Trainer,
};

use crate::hf_folder::write_hf_folder;
pub use crate::metrics::{accuracy_and_macro_f1, format_confusion, matthews_corrcoef};
use crate::recipe::{parse_recipe, Header};
use crate::run::{drive, Context, Experiment, Loader, Prepared, RunOf};
use crate::{RecipeError, RunOptions};

mod data;
mod experiment;
mod export;
mod objective;

pub use data::*;
pub use experiment::*;
pub use export::*;
pub use objective::*;

/// A fine-tuning (and probing) recipe: `kindling finetune recipes/NAME.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRecipe {
    /// `sequence-classification` (the only task so far).
    #[serde(default = "default_task")]
    pub task: String,
    /// The shared header (name, runs_dir, seed, device, precision, kernels, `[train]`,
    /// `[export]`). The seed fixes data order, dropout, the classifier's initialisation and
    /// (with `init = "random"`) the whole model's; under mixed precision the encoder computes
    /// in bf16/f16, pooling and the loss in f32.
    pub header: Header,
    pub model: FtModel,
    pub data: FtData,
    #[serde(default)]
    pub probe: ProbeSection,
}

fn default_task() -> String {
    "sequence-classification".into()
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
    /// `cls` (HF's pooler over `[CLS]`; what transformers' BertForSequenceClassification computes)
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
    /// The text: one column; two columns are a sentence pair (segment A, segment B: token
    /// types for BERT, separators for RoBERTa/ModernBERT, truncated longest-first as HF's
    /// `tokenizer(a, b, truncation="longest_first")`) unless `join_text_columns`; three or
    /// more are joined with a space.
    #[serde(default)]
    pub text_columns: Vec<String>,
    /// The pair spelled out (instead of `text_columns`): `text_pair = ["question", "passage"]`.
    #[serde(default)]
    pub text_pair: Option<Vec<String>>,
    /// Join two `text_columns` into one text with a space (no pair).
    #[serde(default)]
    pub join_text_columns: bool,
    /// The label column (unset only for a `matching` task, which makes its own labels).
    #[serde(default)]
    pub label_column: String,
    /// A pair task built from two columns of the table: does this `b` belong to this `a`?
    /// Each row gives its own pair (label `1`) and `negatives` pairs of its `a` with the `b` of
    /// another row of the same split (label `0`), drawn with the seed.
    #[serde(default)]
    pub matching: Option<Matching>,
    /// HF's `problem_type`: `single_label_classification` (one class per row; the default),
    /// `multi_label_classification` (a cell holds any number of classes separated by
    /// `label_separator`; sigmoid + binary cross-entropy; a class is predicted above
    /// `threshold`) or `regression` (a number per row; one output, mean squared error).
    #[serde(default)]
    pub problem_type: ProblemType,
    #[serde(default = "default_label_separator")]
    pub label_separator: String,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
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
    /// Tokens per example, `[CLS]` and `[SEP]` included; longer texts are truncated.
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
    /// A row without a label or text, or with a split or class the recipe does not know:
    /// `"error"` (the default) stops before anything is written, naming `file:line`;
    /// `"skip"` leaves it out, and the log, the model card and test_results.json count it and
    /// name the first few. A split left empty by skipping is still an error.
    #[serde(default)]
    pub on_invalid: OnInvalid,
}

/// `[data.matching]`: a binary pair task made from two columns (e.g. title and review).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Matching {
    pub a: String,
    pub b: String,
    #[serde(default = "one_negative")]
    pub negatives: usize,
}

fn one_negative() -> usize {
    1
}

/// What a row's label is (HF's `PretrainedConfig.problem_type`, whose names these are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemType {
    #[default]
    SingleLabelClassification,
    MultiLabelClassification,
    Regression,
}

impl ProblemType {
    pub fn hf_name(self) -> &'static str {
        match self {
            ProblemType::SingleLabelClassification => "single_label_classification",
            ProblemType::MultiLabelClassification => "multi_label_classification",
            ProblemType::Regression => "regression",
        }
    }

    /// The evaluation metrics (what `train.monitor.metric` may name).
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            // `f1` (the second class's) for two classes only.
            ProblemType::SingleLabelClassification => {
                &["loss", "accuracy", "macro_f1", "mcc", "f1"]
            }
            ProblemType::MultiLabelClassification => {
                &["loss", "micro_f1", "macro_f1", "exact_match"]
            }
            ProblemType::Regression => &["loss", "mse", "pearson", "spearman"],
        }
    }

    /// The metric the best checkpoint is chosen by unless `train.monitor` says otherwise:
    /// accuracy, micro-F1, and for regression the validation loss (HF Trainer's default
    /// `metric_for_best_model`: a rank correlation ties on coarse scores and stops moving
    /// long before the fit does).
    pub fn monitor(self) -> (&'static str, Goal) {
        match self {
            ProblemType::Regression => ("loss", Goal::Min),
            p => (p.main_metric(), Goal::Max),
        }
    }

    /// The metric a suite reports for this kind of task (GLUE's: accuracy, micro-F1 for
    /// multi-label, Spearman for regression); higher is better.
    pub fn main_metric(self) -> &'static str {
        match self {
            ProblemType::SingleLabelClassification => "accuracy",
            ProblemType::MultiLabelClassification => "micro_f1",
            ProblemType::Regression => "spearman",
        }
    }
}

fn default_label_separator() -> String {
    "|".into()
}
fn default_threshold() -> f64 {
    0.5
}

impl FtData {
    /// The text columns and whether they are a pair.
    pub fn columns(&self) -> (Vec<String>, bool) {
        if let Some(m) = &self.matching {
            return (vec![m.a.clone(), m.b.clone()], true);
        }
        match &self.text_pair {
            Some(p) => (p.clone(), true),
            None => (
                self.text_columns.clone(),
                self.text_columns.len() == 2 && !self.join_text_columns,
            ),
        }
    }
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
        let mut r: FinetuneRecipe = parse_recipe(&text, path, overrides)?;
        crate::recipe::name_from_file(&mut r.header, path);
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
        let d = &self.data;
        if let Some(m) = &d.matching {
            if !d.text_columns.is_empty() || d.text_pair.is_some() || !d.label_column.is_empty() {
                return bad(
                    "data.matching",
                    "a matching task makes its own pairs and labels: leave text_columns, \
                     text_pair and label_column out"
                        .into(),
                );
            }
            if m.negatives == 0 || m.a == m.b {
                return bad(
                    "data.matching",
                    "needs two different columns and at least one negative per row".into(),
                );
            }
            if d.problem_type != ProblemType::SingleLabelClassification {
                return bad(
                    "data.problem_type",
                    "a matching task is single-label (1: the pair belongs together, 0: not)".into(),
                );
            }
        } else if d.label_column.is_empty() {
            return bad("data.label_column", "name the label column".into());
        }
        match (&d.text_pair, d.text_columns.is_empty()) {
            _ if d.matching.is_some() => {}
            (Some(_), false) => {
                return bad(
                    "data.text_pair",
                    "give text_columns or text_pair, not both".into(),
                )
            }
            (Some(p), true) if p.len() != 2 => {
                return bad(
                    "data.text_pair",
                    format!("a pair is two columns, got {p:?}"),
                )
            }
            (None, true) => {
                return bad(
                    "data.text_columns",
                    "name the text column(s) (or data.text_pair = [a, b])".into(),
                )
            }
            _ => {}
        }
        if d.join_text_columns && d.text_pair.is_some() {
            return bad(
                "data.join_text_columns",
                "a text_pair is never joined: use text_columns".into(),
            );
        }
        if d.problem_type == ProblemType::MultiLabelClassification {
            if d.label_separator.is_empty() {
                return bad("data.label_separator", "must not be empty".into());
            }
            if !(d.threshold > 0.0 && d.threshold < 1.0) {
                return bad(
                    "data.threshold",
                    format!("{}: expected 0 < x < 1", d.threshold),
                );
            }
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
        if self.header.train.batch_size == 0 {
            return bad("train.batch_size", "must be positive".into());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        self.header.name()
    }

    pub fn to_toml(&self) -> String {
        crate::recipe::recipe_toml(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Run

/// What a fine-tuning run reports.
#[derive(Debug, Clone)]
pub struct FinetuneReport {
    pub name: String,
    pub init: Init,
    pub problem: ProblemType,
    pub steps: u64,
    pub elapsed_secs: f64,
    pub best_validation: Option<(u64, f64)>,
    pub test: BTreeMap<String, f64>,
    pub test_majority: f64,
    pub export_dir: PathBuf,
}

/// The eval metrics of a fine-tuning run, every problem type's (`train.monitor.metric` names
/// one of its problem type's: [`ProblemType::metrics`]).
pub const EVAL_METRICS: &[&str] = &[
    "loss",
    "accuracy",
    "macro_f1",
    "mcc",
    "cm.*",
    "micro_f1",
    "exact_match",
    "mse",
    "pearson",
    "spearman",
];

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
    random.header.name = Some(format!("{}-random", recipe.name()));
    random.header.export.dir = None;
    compare_runs(&pre, &random, opts, finetune)
}

/// `--compare-random` for any fine-tuning recipe: `pre` (the export's weights), then `random`
/// (its random twin, in its own folder), unless the first was interrupted (then its report
/// twice: nothing to compare yet).
pub fn compare_runs<R>(
    pre: &R,
    random: &R,
    opts: &RunOptions,
    run: impl Fn(&R, &RunOptions) -> Result<FinetuneReport, RecipeError>,
) -> Result<(FinetuneReport, FinetuneReport), RecipeError> {
    let a = run(pre, opts)?;
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
    let b = run(random, &random_opts)?;
    Ok((a, b))
}

/// The side-by-side table of [`compare_with_random`]: the problem type's test metrics.
pub fn comparison_table(a: &FinetuneReport, b: &FinetuneReport) -> String {
    let get = |r: &FinetuneReport, k: &str| r.test.get(k).copied().unwrap_or(f64::NAN);
    let metrics: Vec<&str> = a.problem.metrics()[1..]
        .iter()
        .copied()
        .filter(|m| a.test.contains_key(*m) || b.test.contains_key(*m))
        .collect();
    let mut s = String::from("| run | init | steps | time |");
    for m in &metrics {
        s += &format!(" test {m} |");
    }
    s += " best validation |\n|---|---|---|---|";
    s += &"---|".repeat(metrics.len() + 1);
    s += "\n";
    for r in [a, b] {
        s += &format!(
            "| {} | {:?} | {} | {:.0} s |",
            r.name, r.init, r.steps, r.elapsed_secs
        );
        for m in &metrics {
            s += &format!(" {:.4} |", get(r, m));
        }
        s += &format!(
            " {} |\n",
            r.best_validation
                .map(|(s, v)| format!("{v:.4} @ {s}"))
                .unwrap_or_default()
        );
    }
    let main = a.problem.main_metric();
    s += &format!(
        "\npretrained - random: {:+.4} test {main}",
        get(a, main) - get(b, main)
    );
    if a.problem == ProblemType::SingleLabelClassification {
        s += &format!(
            ", {:+.4} macro-F1 (majority class: {:.2}%)",
            get(a, "macro_f1") - get(b, "macro_f1"),
            100.0 * a.test_majority
        );
    }
    s += "\n";
    s
}

#[cfg(test)]
mod tests;
