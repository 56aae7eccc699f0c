//! The recipe file: plain TOML deserialised into serde structs with `deny_unknown_fields` and
//! defaults, after `--set a.b=value` overrides are applied to the parsed document.
//!
//! Errors name the file and the key (`train.steps`) or, for syntax errors, the line and column.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use kindling_data::{MaskConfig, TokenizerConfig};
use kindling_train::{Monitor, OptimizerConfig, Schedule};

use crate::RecipeError;

/// The header every recipe shares, MLM, SimCSE, the vision methods and fine-tuning alike, with
/// one set of defaults: where the run goes, how it computes, `[train]` and `[export]`. Its keys
/// sit at the top level of the file beside `objective` (or `task`); each recipe type holds it
/// as its `header` and its own sections after it ([`parse_recipe`] splits the two).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Run name: the run folder is `<runs_dir>/<name>`. Defaults to the recipe file's stem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Parent folder of run folders.
    #[serde(default = "crate::recipe::default_runs_dir")]
    pub runs_dir: PathBuf,
    /// Fixes initialisation, data order, masks, augmentations and dropout.
    #[serde(default = "crate::recipe::default_seed")]
    pub seed: u64,
    /// `"auto"` (the best device this build supports), `"cpu"`, `"cuda:N"` or `"metal"`.
    #[serde(default)]
    pub device: crate::run::DeviceSetting,
    /// `"f32"`, or mixed precision `"bf16"` / `"f16"` on a GPU (f32 master weights and optimizer
    /// state, low-precision compute; f16 with dynamic loss scaling). f32 on CPU: candle has no
    /// bf16 gemm there, so bf16 would only be slower.
    #[serde(default)]
    pub precision: crate::run::Precision,
    /// `"fused"` (Kindling's fused kernels: one autograd node per encoder layer on CPU f32,
    /// candle's fused softmax and LayerNorm on CUDA) or `"composed"` (candle's compositions, op
    /// by op: the reference to compare against; slower). Chosen when the model is built.
    #[serde(default)]
    pub kernels: kindling_models::ops::Kernels,
    /// Fine-tuning and SimCSE: run the encoder on the real tokens of each padded batch only
    /// (MosaicBERT's and ModernBERT's unpadding), so pad tokens cost nothing. Applies where the
    /// layers take Kindling's CUDA kernels (BERT/RoBERTa on a GPU); elsewhere batches stay
    /// padded. The numbers do not change either way (dropout draws by padded place); `false`
    /// pads everywhere, to compare.
    #[serde(default = "crate::recipe::default_unpad")]
    pub unpad: bool,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub export: ExportSection,
}

impl Header {
    /// The header's keys, as a recipe file spells them.
    pub const KEYS: [&'static str; 9] = [
        "name",
        "runs_dir",
        "seed",
        "device",
        "precision",
        "kernels",
        "unpad",
        "train",
        "export",
    ];

    /// The run's name (`"run"` when neither the recipe nor its file gave one).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("run")
    }

    /// `export.dir`, else `run_dir/export`.
    pub fn export_dir(&self, run_dir: &Path) -> PathBuf {
        self.export
            .dir
            .clone()
            .unwrap_or_else(|| run_dir.join("export"))
    }
}

/// A masked-LM recipe (`objective = "bert-mlm"`): the shared header, then the model and data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Which objective trains (`"bert-mlm"`).
    pub objective: String,
    pub header: Header,
    #[serde(default)]
    pub model: ModelSection,
    pub data: DataSection,
}

// The header's defaults, for every recipe.

/// `runs_dir` unset: `runs/` in the working directory.
pub fn default_runs_dir() -> PathBuf {
    "runs".into()
}

/// `seed` unset. Every recipe shares it (and the shipped ones write it out).
pub fn default_seed() -> u64 {
    17
}

pub fn default_unpad() -> bool {
    true
}

/// `[model]`: the encoder to train. Either its shape, with HF config names, for a model trained
/// from scratch (the vocabulary size comes from the tokenizer; unset keys are bert-mini's), or
/// `path`, a folder (a Kindling export, any HF BERT, RoBERTa or ModernBERT folder) to continue
/// pretraining:
/// the shape and the vocabulary are then the folder's, and only the dropout rates and the
/// initialiser range (for a head the folder lacks) may be set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Continue pretraining this folder's weights (`hf://NS/NAME[@REV]` is pulled first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `"bert"`, `"roberta"` or `"modernbert"`. Unset: BERT, or with `path` the folder's
    /// `model_type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<kindling_models::Architecture>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_hidden_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<kindling_models::bert::HiddenAct>,
    /// Unset: 512 positions (RoBERTa: 512 + pad_token_id + 1, as roberta-base's 514).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// Unset: 2 (RoBERTa: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_vocab_size: Option<usize>,
    /// Unset: 1e-12 (RoBERTa: 1e-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm_eps: Option<f64>,
    /// Unset: 0.1 (with `path`: the folder's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_dropout_prob: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_probs_dropout_prob: Option<f64>,
    /// Unset: 0.02 (with `path`: the folder's; it initialises a head the folder lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer_range: Option<f64>,
    /// ModernBERT: every n-th layer attends globally (unset: 3), the others within a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_attn_every_n_layers: Option<usize>,
    /// ModernBERT: the local layers' window (unset: 128; a token sees those within half).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_attention: Option<usize>,
    /// ModernBERT: the rotary bases of global (unset: 160000) and local (10000) layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rope_theta: Option<f64>,
}

impl DataSection {
    /// `[data.tokenizer]`, or the default (a trained WordPiece vocabulary) when unset.
    pub fn tokenizer_config(&self) -> TokenizerConfig {
        self.tokenizer.clone().unwrap_or_default()
    }
}

impl ModelSection {
    /// The keys set that describe the shape: with `path` they come from the folder.
    pub fn shape_keys(&self) -> Vec<&'static str> {
        let set = [
            self.hidden_size.is_some(),
            self.num_hidden_layers.is_some(),
            self.num_attention_heads.is_some(),
            self.intermediate_size.is_some(),
            self.hidden_act.is_some(),
            self.max_position_embeddings.is_some(),
            self.type_vocab_size.is_some(),
            self.layer_norm_eps.is_some(),
            self.global_attn_every_n_layers.is_some(),
            self.local_attention.is_some(),
            self.global_rope_theta.is_some(),
            self.local_rope_theta.is_some(),
        ];
        SHAPE_KEYS
            .into_iter()
            .zip(set)
            .filter_map(|(k, set)| set.then_some(k))
            .collect()
    }
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Glob patterns of text files (`.gz` is decompressed), relative to the working directory.
    #[serde(default)]
    pub corpus: Vec<String>,
    /// Text columns of tables, e.g. the training split of a labelled dataset's reviews for
    /// domain-adaptive pretraining: `[{ path = "...tsv.gz", text_columns = ["title", "text"],
    /// split_column = "split", split = "train" }]`. Read after the `corpus` files; packed in
    /// memory only (not with `[data.prepare]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<kindling_data::TextTable>,
    /// Unset: train a WordPiece vocabulary (`TokenizerConfig::default`); with `model.path`,
    /// the folder's tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerConfig>,
    /// Tokens per block, `[CLS]` and `[SEP]` included.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// The last fraction of blocks held out for evaluation.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub mask: MaskConfig,
    /// Masks of the held-out evaluation, when they differ from the training masks: a recipe
    /// may train with a higher rate (more predictions per step; Wettig et al., 2023) and still
    /// report the standard 15% task. Unset: the same as `mask`.
    #[serde(default)]
    pub eval_mask: Option<MaskConfig>,
    /// Batches prepared ahead of the trainer.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Stream from token shards instead of packing the corpus in memory: the corpus (text,
    /// `.gz`, JSONL and parquet files) is tokenised once into `prepare.dir` (reused while the
    /// sources and tokenizer are unchanged), and `eval_fraction` of its documents, picked by a
    /// hash of their text, are held out. See `kindling_data::shards`.
    #[serde(default)]
    pub prepare: Option<kindling_data::PrepareConfig>,
}

fn default_seq_len() -> usize {
    128
}
fn default_eval_fraction() -> f64 {
    0.05
}
fn default_prefetch() -> usize {
    4
}

/// `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Evaluate on at most this many held-out batches (0: all).
    pub max_eval_batches: usize,
    pub steps: u64,
    pub grad_accum: u32,
    /// Clip the global gradient norm (0: no clipping).
    pub max_grad_norm: f64,
    pub eval_every: u64,
    pub save_every: u64,
    pub keep_last: usize,
    pub log_every: u64,
    /// Stop after this many passes over the training split (0: no limit besides `steps`).
    pub max_epochs: u64,
    /// Stop after this much training time, over all sessions of a resumed run: "90s", "45m",
    /// "2h 30m" (humantime syntax). The run then evaluates, checkpoints and exports as usual.
    pub max_time: Option<String>,
    /// Also checkpoint when this much time has passed since the last checkpoint ("30m").
    pub save_interval: Option<String>,
    /// A non-finite loss or gradient: "stop" (an error naming the step) or "skip" the update.
    pub on_nonfinite: OnNonFinite,
    /// The eval metric whose best checkpoint is kept; `patience > 0` stops early on it.
    pub monitor: Monitor,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
}

/// What the trainer does with a non-finite loss or gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    #[default]
    Stop,
    Skip,
}

pub(crate) fn duration(
    key: &str,
    value: Option<&str>,
) -> Result<Option<std::time::Duration>, RecipeError> {
    value
        .map(|t| {
            humantime::parse_duration(t).map_err(|e| RecipeError::Invalid {
                key: key.into(),
                msg: format!("`{t}` is not a duration like \"90s\", \"45m\" or \"2h\": {e}"),
            })
        })
        .transpose()
}

impl TrainSection {
    /// `max_time` parsed, or an error naming the key.
    pub fn max_time(&self) -> Result<Option<std::time::Duration>, RecipeError> {
        duration("train.max_time", self.max_time.as_deref())
    }

    /// `save_interval` parsed, or an error naming the key.
    /// The trainer's configuration from this section: `steps` capped by `max_epochs` (of
    /// `steps_per_epoch` steps), everything else as written. Callers set what only they know
    /// (checkpoint extras; finetune's per-epoch defaults).
    pub fn train_config(
        &self,
        seed: u64,
        steps_per_epoch: u64,
    ) -> Result<kindling_train::TrainConfig, RecipeError> {
        let mut steps = self.steps;
        if self.max_epochs > 0 {
            steps = steps.min(self.max_epochs * steps_per_epoch.max(1));
        }
        Ok(kindling_train::TrainConfig {
            steps,
            grad_accum: self.grad_accum,
            optimizer: self.optimizer.clone(),
            schedule: self.schedule.clone(),
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            eval_every: self.eval_every,
            save_every: self.save_every,
            keep_last: self.keep_last,
            seed,
            max_time: self.max_time()?,
            save_interval: self.save_interval()?,
            skip_nonfinite: self.on_nonfinite == OnNonFinite::Skip,
            checkpoint_extras: Vec::new(),
            monitor: self.monitor.clone(),
            loss_scale: None,
        })
    }

    pub fn save_interval(&self) -> Result<Option<std::time::Duration>, RecipeError> {
        duration("train.save_interval", self.save_interval.as_deref())
    }

    /// Checks every value of the section before a run starts: batch sizes, the optimiser's and
    /// schedule's ranges (see [`kindling_train::TrainConfig::validate`]), the durations, and
    /// that `monitor.metric` is one of `metrics`, the eval metrics the recipe reports (an entry
    /// ending in `*` stands for every name it starts: `recall_at_*`).
    pub fn validate(&self, metrics: &[&str]) -> Result<(), RecipeError> {
        let invalid = |key: &str, msg: String| {
            Err(RecipeError::Invalid {
                key: key.into(),
                msg,
            })
        };
        if self.batch_size == 0 {
            return invalid("train.batch_size", "must be at least 1".into());
        }
        if self.eval_batch_size == 0 {
            return invalid("train.eval_batch_size", "must be at least 1".into());
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return invalid(
                "train.max_grad_norm",
                format!(
                    "must be a finite number >= 0 (0: no clipping), got {}",
                    self.max_grad_norm
                ),
            );
        }
        let cfg = self.train_config(0, 1)?;
        if let Err(kindling_train::TrainError::Config { key, msg }) = cfg.validate() {
            return invalid(key, msg);
        }
        let known = |m: &str| {
            metrics.iter().any(|k| match k.strip_suffix('*') {
                Some(prefix) => m.starts_with(prefix),
                None => *k == m,
            })
        };
        if !known(&self.monitor.metric) {
            return invalid(
                "train.monitor.metric",
                format!(
                    "`{}` is not an eval metric of this recipe; expected one of: {}",
                    self.monitor.metric,
                    metrics.join(", ")
                ),
            );
        }
        Ok(())
    }
}

/// Checks a run name: the run folder is `<runs_dir>/<name>`, so the name is one folder name
/// (not empty, `.` or `..`, no `/`, `\` or NUL).
pub fn check_name(name: &str) -> Result<(), RecipeError> {
    let bad = matches!(name.trim(), "" | "." | "..") || name.contains(['/', '\\', '\0']);
    if bad {
        return Err(RecipeError::Invalid {
            key: "name".into(),
            msg: format!(
                "{name:?} is not a run name: the run folder is runs_dir/name, so give one folder \
                 name (letters, digits, `-`, `_`, `.`)"
            ),
        });
    }
    Ok(())
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            batch_size: 32,
            eval_batch_size: 64,
            max_eval_batches: 0,
            steps: 1000,
            grad_accum: 1,
            max_grad_norm: 1.0,
            eval_every: 0,
            save_every: 0,
            keep_last: 2,
            log_every: 10,
            max_epochs: 0,
            max_time: None,
            save_interval: None,
            on_nonfinite: OnNonFinite::Stop,
            monitor: Monitor::default(),
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::default(),
        }
    }
}

/// `[export]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSection {
    /// Export folder (default: `<run folder>/export`).
    pub dir: Option<PathBuf>,
    /// Licence named in the model card's front matter.
    pub license: Option<String>,
}

impl Recipe {
    /// Reads a recipe file and applies `key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut recipe = Self::parse(&text, path, overrides)?;
        name_from_file(&mut recipe.header, path);
        Ok(recipe)
    }

    /// Parses recipe text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = continued_by_override(text, path, overrides)?;
        let r: Self = parse_recipe(&text, path, overrides)?;
        let bad = |msg: &str| {
            Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: "data".into(),
                msg: msg.into(),
            })
        };
        if r.data.corpus.is_empty() && r.data.tables.is_empty() {
            return bad("give data.corpus (glob patterns of text files) or data.tables");
        }
        if !r.data.tables.is_empty() && r.data.prepare.is_some() {
            return bad(
                "data.tables are packed in memory: drop [data.prepare] or convert the \
                 tables to JSONL files in data.corpus",
            );
        }
        Ok(r)
    }

    /// The recipe's text: the `corpus` files, then the `tables`.
    pub fn read_corpus(&self) -> Result<kindling_data::Corpus, RecipeError> {
        Ok(kindling_data::Corpus::from_sources(
            &self.data.corpus,
            &self.data.tables,
            Path::new("."),
        )?)
    }

    pub fn name(&self) -> &str {
        self.header.name()
    }

    /// Everything about the recipe that can be checked before reading any data: the run name,
    /// the `[train]` section (with `metrics`, the eval metrics of the objective) and the data
    /// section's ranges. Writes nothing.
    pub fn validate(&self, metrics: &[&str]) -> Result<(), RecipeError> {
        check_name(self.name())?;
        self.header.train.validate(metrics)?;
        let d = &self.data;
        if d.seq_len < 3 {
            return Err(RecipeError::Invalid {
                key: "data.seq_len".into(),
                msg: format!(
                    "{} leaves no room for a token between [CLS] and [SEP]",
                    d.seq_len
                ),
            });
        }
        if !(d.eval_fraction.is_finite() && (0.0..1.0).contains(&d.eval_fraction)) {
            return Err(RecipeError::Invalid {
                key: "data.eval_fraction".into(),
                msg: format!("must be in [0, 1), got {}", d.eval_fraction),
            });
        }
        Ok(())
    }

    /// The resolved recipe as TOML, as saved in the run folder.
    pub fn to_toml(&self) -> String {
        recipe_toml(self)
    }
}

/// `header.name` unset: the recipe file's stem.
pub fn name_from_file(header: &mut Header, path: &Path) {
    if header.name.is_none() {
        header.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    }
}

/// Parses recipe text into a recipe type `T` whose field `header` is a [`Header`]: the header's
/// keys are taken from the top level into it, the rest goes to `T`'s own fields; both refuse
/// keys they do not know. Errors as [`parse_toml`]'s, with keys as the file spells them.
pub fn parse_recipe<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    overrides: &[String],
) -> Result<T, RecipeError> {
    parse_recipe_document(parse_document(text, path, overrides)?, path)
}

/// [`parse_recipe`] of a document already read (overrides applied).
pub fn parse_recipe_document<T: serde::de::DeserializeOwned>(
    mut doc: toml::Table,
    path: &Path,
) -> Result<T, RecipeError> {
    if doc.contains_key("header") {
        return Err(RecipeError::Key {
            path: path.to_path_buf(),
            key: "header".into(),
            msg: format!(
                "unknown key: the header's keys ({}) sit at the top level",
                Header::KEYS.join(", ")
            ),
        });
    }
    let mut header = toml::Table::new();
    for k in Header::KEYS {
        if let Some(v) = doc.remove(k) {
            header.insert(k.to_string(), v);
        }
    }
    doc.insert("header".into(), toml::Value::Table(header));
    deserialize_document(doc, path, Some("header."))
}

/// The text of a recipe of type `T` (see [`parse_recipe`]), as a file would give it: `objective`
/// or `task` first, then the header's keys, then `T`'s own sections.
pub fn recipe_toml<T: Serialize>(recipe: &T) -> String {
    let mut doc = toml::Table::try_from(recipe).expect("a recipe serialises");
    let header = match doc.remove("header") {
        Some(toml::Value::Table(h)) => h,
        _ => toml::Table::new(),
    };
    let mut out = toml::Table::new();
    for k in ["objective", "task"] {
        if let Some(v) = doc.remove(k) {
            out.insert(k.into(), v);
        }
    }
    out.extend(header);
    out.extend(doc);
    toml::to_string_pretty(&out).expect("a recipe serialises")
}

/// Parses TOML text into any recipe type after applying `key=value` overrides; errors name the
/// file and the key (or the line, for syntax errors). `path` is only used in messages.
/// `--set model.path=DIR` turns any from-scratch MLM recipe into continued pretraining of DIR:
/// the file's `[model]` shape and `[data.tokenizer]` describe the model the folder replaces,
/// so they are dropped (and the log says so). A recipe *file* that gives `model.path` together
/// with a shape or a tokenizer is still an error (`folder_config`): there the two disagree.
fn continued_by_override(
    text: &str,
    path: &Path,
    overrides: &[String],
) -> Result<String, RecipeError> {
    let sets_path = overrides.iter().any(|o| {
        o.split_once('=')
            .is_some_and(|(k, _)| k.trim() == "model.path")
    });
    if !sets_path {
        return Ok(text.to_string());
    }
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| RecipeError::Syntax {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    let mut dropped = Vec::new();
    if let Some(toml::Value::Table(model)) = doc.get_mut("model") {
        if model.contains_key("path") {
            return Ok(text.to_string());
        }
        for key in SHAPE_KEYS.iter().chain(&["architecture"]) {
            if model.remove(*key).is_some() {
                dropped.push(format!("model.{key}"));
            }
        }
    }
    if let Some(toml::Value::Table(data)) = doc.get_mut("data") {
        if data.remove("tokenizer").is_some() {
            dropped.push("data.tokenizer".into());
        }
    }
    if !dropped.is_empty() {
        eprintln!(
            "note: --set model.path continues that folder's model with its own tokenizer; the \
             recipe's {} are not used",
            dropped.join(", ")
        );
    }
    Ok(doc.to_string())
}

/// `[model]` keys that describe a shape: with `model.path` the folder's config.json gives them.
const SHAPE_KEYS: [&str; 12] = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "global_attn_every_n_layers",
    "local_attention",
    "global_rope_theta",
    "local_rope_theta",
];

pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    overrides: &[String],
) -> Result<T, RecipeError> {
    deserialize_document(parse_document(text, path, overrides)?, path, None)
}

/// The TOML document of `text` with the overrides applied.
fn parse_document(
    text: &str,
    path: &Path,
    overrides: &[String],
) -> Result<toml::Table, RecipeError> {
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| RecipeError::Syntax {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    for o in overrides {
        apply_override(&mut doc, o)?;
    }
    Ok(doc)
}

/// `doc` as a `T`; an error names the key's path, less `hidden` (a table the parser made up).
pub(crate) fn deserialize_document<T: serde::de::DeserializeOwned>(
    doc: toml::Table,
    path: &Path,
    hidden: Option<&str>,
) -> Result<T, RecipeError> {
    serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
        let mut key = e.path().to_string();
        if let Some(k) = hidden.and_then(|h| key.strip_prefix(h)) {
            key = k.to_string();
        }
        let mut msg = e.into_inner().to_string();
        if let Some(h) = hidden {
            // The made-up table is the header: its keys are what a file may give.
            let keys: Vec<String> = Header::KEYS.iter().map(|k| format!("`{k}`")).collect();
            msg = msg
                .replace(&format!("`{}`", h.trim_end_matches('.')), &keys.join(", "))
                .replace(&format!("`{h}"), "`");
        }
        RecipeError::Key {
            path: path.to_path_buf(),
            key: if key == "." || hidden.is_some_and(|h| key == h.trim_end_matches('.')) {
                "(top level)".into()
            } else {
                key
            },
            msg,
        }
    })
}

/// Applies `a.b.c=value` to a TOML document. The value is read as a TOML value (`3`, `1e-3`,
/// `true`, `"x"`, `[1, 2]`), and as a plain string if it is not one (`kind=cosine`).
fn apply_override(doc: &mut toml::Table, arg: &str) -> Result<(), RecipeError> {
    let bad = |msg: &str| RecipeError::Override {
        arg: arg.to_string(),
        msg: msg.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.trim().is_empty()) {
        return Err(bad("the key has an empty part"));
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    let mut table = doc;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            table.insert(part.to_string(), value);
            return Ok(());
        }
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| bad(&format!("`{}` is not a table", parts[..=i].join("."))))?;
    }
    unreachable!("the loop returns at the last part")
}
