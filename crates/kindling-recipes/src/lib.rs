//! Recipes: the TOML format that declares an experiment, and one module per objective that
//! turns a recipe into a run (data, model, trainer, export).

pub mod bert_mlm;
pub mod card;
pub mod embed;
pub mod embedding_eval;
pub mod finetune;
pub mod hf_folder;
pub mod metrics;
pub mod model_path;
pub mod probe;
pub mod recipe;
pub mod registry;
pub mod run;
pub mod simcse;
pub mod suite;
pub mod vision;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use recipe::Recipe;
use registry::{Family, Kind};

/// Everything a recipe run can fail with, each naming the file, key or step involved.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Syntax { path: PathBuf, msg: String },
    #[error("{}: key `{key}`: {msg}", path.display())]
    Key {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("--set {arg}: {msg}")]
    Override { arg: String, msg: String },
    #[error("recipe key `{key}`: {msg}")]
    Invalid { key: String, msg: String },
    #[error("run folder {} already holds a run (checkpoints/); pass --resume auto to continue it or --overwrite to replace it", path.display())]
    RunExists { path: PathBuf },
    #[error(
        "run folder {} is in use by another kindling process{}: wait for it to finish or stop it, or give this run another name (--set name=...)",
        path.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    RunInUse { path: PathBuf, pid: Option<u32> },
    #[error("cannot resume {}: {msg}", path.display())]
    Resume { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Run { path: PathBuf, msg: String },
    #[error("data parallel: {msg}")]
    Distributed { msg: String },
    #[error(transparent)]
    Data(#[from] kindling_data::DataError),
    #[error(transparent)]
    Model(#[from] kindling_models::ModelError),
    #[error(transparent)]
    Train(#[from] kindling_train::TrainError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Options of `kindling pretrain` that are not part of the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run in the run folder.
    pub overwrite: bool,
    /// Continue a run from a checkpoint.
    pub resume: Option<Resume>,
    /// Raised by SIGINT/SIGTERM: checkpoint after the current step and return.
    pub stop_flag: Option<Arc<AtomicBool>>,
    /// This process's place in a data-parallel run (`RANK`, `WORLD_SIZE`, ...: set by
    /// `kindling pretrain --gpus`/`--nproc` or by torchrun-style launchers); `None`: one process.
    pub dist: Option<kindling_train::distributed::DistEnv>,
}

/// Where `--resume` continues from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest valid checkpoint of the recipe's run folder; a fresh start if there is none.
    Auto,
    /// A run folder (its newest valid checkpoint) or one checkpoint folder (exactly that one).
    Path(PathBuf),
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_dir: PathBuf,
    pub export_dir: PathBuf,
    pub final_eval: std::collections::BTreeMap<String, f64>,
    pub baseline: Option<(String, f64)>,
    pub steps: u64,
    pub elapsed_secs: f64,
    /// Why training ended; an interrupted run has a checkpoint but no export.
    pub stop: kindling_train::StopReason,
}

/// Where Kindling caches what it derives from inputs (trained tokenizers, keyed by a hash of the
/// corpus and the settings): `$KINDLING_CACHE`, else `$XDG_CACHE_HOME/kindling`, else
/// `~/.cache/kindling`, else `<runs_dir>/.cache`. One cache per machine, not per run folder, so
/// every run on the same corpus and settings gets the same tokenizer (the tokenizers crate's
/// WordPiece trainer breaks ties differently in each process).
pub fn cache_dir(recipe: &Recipe) -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("KINDLING_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("kindling")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("kindling")))
        .unwrap_or_else(|| recipe.header.runs_dir.join(".cache"))
}

/// A top-level string key of a recipe file (`task`, `objective`), if present: which recipe
/// type to parse it as.
pub fn recipe_key(path: &std::path::Path, key: &str) -> Result<Option<String>, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| RecipeError::Syntax {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    Ok(doc.get(key).and_then(|v| v.as_str()).map(String::from))
}

/// Reads the recipe at `path` (with `--set` overrides) and runs it with the module its
/// `objective` names in the [`registry`].
pub fn pretrain_file(
    path: &std::path::Path,
    overrides: &[String],
    opts: &RunOptions,
) -> Result<RunReport, RecipeError> {
    #[derive(serde::Deserialize)]
    struct Peek {
        objective: String,
    }
    let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    let peek: Peek = recipe::parse_toml(&text, path, overrides)?;
    match registry::lookup(Kind::Objective, &peek.objective)?.family {
        Family::Vision => vision::pretrain(&vision::VisionRecipe::load(path, overrides)?, opts),
        Family::Simcse => simcse::pretrain(&simcse::SimcseRecipe::load(path, overrides)?, opts),
        Family::MaskedLm => pretrain(&Recipe::load(path, overrides)?, opts),
        Family::TextClassification | Family::ImageProbe => {
            unreachable!("objectives are pretraining families")
        }
    }
}

/// Runs a masked-LM recipe.
pub fn pretrain(recipe: &Recipe, opts: &RunOptions) -> Result<RunReport, RecipeError> {
    match registry::lookup(Kind::Objective, &recipe.objective)?.family {
        Family::MaskedLm => bert_mlm::pretrain(recipe, opts),
        _ => Err(RecipeError::Invalid {
            key: "objective".into(),
            msg: format!(
                "`{}` is not a masked-LM objective; run the recipe file with `kindling pretrain`",
                recipe.objective
            ),
        }),
    }
}

/// Rewrites a run's export folder from its newest checkpoint.
pub fn export_run(run_dir: &std::path::Path) -> Result<PathBuf, RecipeError> {
    let recipe_path = run_dir.join("recipe.toml");
    // Read first: a folder without a recipe is no run folder, and gets no lock file.
    let objective = recipe_key(&recipe_path, "objective")?.unwrap_or_default();
    let family = registry::lookup(Kind::Objective, &objective)
        .map_err(|e| RecipeError::Run {
            path: recipe_path.clone(),
            msg: e.to_string(),
        })?
        .family;
    // Not while a run writes the folder (it exports at its end).
    let _lock = run::RunLock::acquire(run_dir)?;
    match family {
        Family::Vision => {
            vision::export_from_checkpoint(&vision::VisionRecipe::load(&recipe_path, &[])?, run_dir)
        }
        Family::Simcse => {
            simcse::export_from_checkpoint(&simcse::SimcseRecipe::load(&recipe_path, &[])?, run_dir)
        }
        Family::MaskedLm => {
            bert_mlm::export_from_checkpoint(&Recipe::load(&recipe_path, &[])?, run_dir)
        }
        Family::TextClassification | Family::ImageProbe => {
            unreachable!("objectives are pretraining families")
        }
    }
}
