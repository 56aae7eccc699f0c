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

mod data;
mod eval;
mod export;
mod loss;
mod objective;

pub use data::*;
pub use eval::*;
pub use export::*;
pub use loss::*;
pub use objective::*;

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
    let within = crate::run::position_within(loader.len() as u64, "examples");
    let resumed = first_loadable(&plan.candidates, |dir| {
        load_checked(dir, &obj.varmap, opt.as_mut(), &device, &within)
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
mod tests;
