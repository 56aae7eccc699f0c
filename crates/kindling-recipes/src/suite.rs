//! `kindling evaluate SUITE.toml MODEL_DIR...`: several downstream tasks for each model, one
//! GLUE-style table (task rows, model columns, each task's main metric), as users compare
//! pretrained checkpoints. A task is a fine-tuning recipe (`kind = "finetune"`) or a frozen
//! linear probe (`kind = "probe"`) with the model's folder put in `model.path`; with
//! `--compare-random`, every model is also run from a randomly initialised twin of its shape
//! (the baseline pretraining must beat). `kind = "embeddings"` scores the frozen encoder on a
//! recipe's `[eval.sts]`/`[eval.retrieval]` sections instead (`kindling evaluate-embeddings`).
//!
//! Each fine-tune is an ordinary run in `<runs_dir>/<suite>/`, named `<task>-<model>[-random]`,
//! started with `--resume auto`: running the suite again finishes interrupted runs and re-scores
//! finished ones from their checkpoints instead of training again. The table is saved as
//! `results.json` and `results.md` there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::finetune::{FinetuneRecipe, Init};
use crate::{RecipeError, Resume, RunOptions};

/// A suite file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// Default: the file's stem.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_runs_dir")]
    pub runs_dir: PathBuf,
    /// Settings applied to every task (`KEY=VALUE`, as `--set`), before the task's own.
    #[serde(default)]
    pub set: Vec<String>,
    /// The random twin's initialisation in embedding tasks (fine-tunes use their recipe's).
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(rename = "task")]
    pub tasks: Vec<SuiteTask>,
}

fn default_seed() -> u64 {
    17
}

fn default_runs_dir() -> PathBuf {
    "runs/suites".into()
}

/// `[[task]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SuiteTask {
    pub name: String,
    #[serde(default)]
    pub kind: TaskKind,
    /// A fine-tuning recipe (its `[model] path` is replaced by each model's folder).
    pub recipe: PathBuf,
    /// The task's own settings (`KEY=VALUE`).
    #[serde(default)]
    pub set: Vec<String>,
    /// The metric of the table (default: the problem type's main metric; accuracy for a
    /// probe).
    #[serde(default)]
    pub metric: Option<String>,
    /// Further test metrics reported beside it in results.json and the Markdown table.
    #[serde(default)]
    pub also: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    #[default]
    Finetune,
    Probe,
    /// STS and retrieval scores of the frozen encoder (the recipe's `[eval]`).
    Embeddings,
}

/// A task's recipe, loaded and checked before anything runs.
enum Loaded {
    Finetune(Box<FinetuneRecipe>),
    Embeddings(crate::embedding_eval::EmbeddingEvalRecipe),
}

/// One cell of the table: a task on a model (or its random twin).
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub task: String,
    pub model: String,
    pub init: &'static str,
    /// The table's metric.
    pub metric: String,
    /// It and the task's `also` metrics, from the test split.
    pub scores: BTreeMap<String, f64>,
    pub run_dir: Option<PathBuf>,
    pub seconds: f64,
}

/// The suite's results.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    pub suite: String,
    pub tasks: Vec<(String, String)>,
    pub columns: Vec<String>,
    pub cells: Vec<Cell>,
    pub dir: PathBuf,
}

impl Suite {
    pub fn load(path: &Path) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut s: Suite = crate::recipe::parse_toml(&text, path, &[])?;
        if s.name.is_none() {
            s.name = path.file_stem().map(|n| n.to_string_lossy().into_owned());
        }
        if s.tasks.is_empty() {
            return Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: "task".into(),
                msg: "a suite needs at least one [[task]]".into(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &s.tasks {
            if !seen.insert(t.name.as_str()) || t.name.is_empty() {
                return Err(RecipeError::Key {
                    path: path.to_path_buf(),
                    key: "task.name".into(),
                    msg: format!("`{}`: task names must be distinct and non-empty", t.name),
                });
            }
        }
        Ok(s)
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("suite")
    }
}

/// A short name for a model folder: `runs/bert-mini-mlm/export` -> `bert-mini-mlm`.
pub fn model_label(dir: &Path) -> String {
    let last = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    match last.as_deref() {
        Some("export") | Some("model") | None => dir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
        Some(n) => n.to_string(),
    }
}

/// The recipe of `task` on `model` (`init`), its run named and placed in the suite's folder.
fn task_recipe(
    suite: &Suite,
    task: &SuiteTask,
    model: &Path,
    label: &str,
    init: Init,
) -> Result<FinetuneRecipe, RecipeError> {
    let mut overrides = suite.set.clone();
    overrides.extend(task.set.iter().cloned());
    let mut r = FinetuneRecipe::load(&task.recipe, &overrides)?;
    r.model.path = model.to_path_buf();
    r.model.init = init;
    r.header.runs_dir = suite.runs_dir.join(suite.name());
    r.header.name = Some(format!(
        "{}-{label}{}",
        task.name,
        if init == Init::Random { "-random" } else { "" }
    ));
    r.header.export.dir = None;
    Ok(r)
}

/// The task's recipe, and the metrics it can report with its default first.
fn load_suite_task(
    suite: &Suite,
    task: &SuiteTask,
    model: &Path,
    label: &str,
    init: Init,
) -> Result<(Loaded, Vec<String>), RecipeError> {
    if task.kind == TaskKind::Embeddings {
        let mut overrides = suite.set.clone();
        overrides.extend(task.set.iter().cloned());
        let r = crate::embedding_eval::EmbeddingEvalRecipe::load(&task.recipe, &overrides)?;
        let mut metrics = vec![r.main_metric().to_string()];
        metrics.extend(r.metrics());
        return Ok((Loaded::Embeddings(r), metrics));
    }
    let r = task_recipe(suite, task, model, label, init)?;
    let metrics: Vec<String> = match task.kind {
        TaskKind::Probe => vec!["accuracy".into(), "macro_f1".into()],
        _ => {
            let p = r.data.problem_type;
            std::iter::once(p.main_metric())
                .chain(p.metrics().iter().copied())
                .map(String::from)
                .collect()
        }
    };
    Ok((Loaded::Finetune(Box::new(r)), metrics))
}

/// Runs every task on every model (and, with `compare_random`, on each model's random twin);
/// every recipe is loaded and checked before the first run starts.
pub fn evaluate(
    suite: &Suite,
    models: &[PathBuf],
    compare_random: bool,
    opts: &RunOptions,
) -> Result<SuiteReport, RecipeError> {
    let inits: &[Init] = if compare_random {
        &[Init::Pretrained, Init::Random]
    } else {
        &[Init::Pretrained]
    };
    let mut plan = Vec::new();
    let mut labels = Vec::new();
    for model in models {
        // A folder that is not an encoder is an error before any task runs.
        if !model.join("config.json").is_file() {
            return Err(RecipeError::Invalid {
                key: "MODEL_DIR".into(),
                msg: format!(
                    "{}: no config.json (expected a model folder: an export, an HF folder)",
                    model.display()
                ),
            });
        }
        kindling_models::import::read_encoder_config(model)?;
        kindling_data::tokenizer::load(model)?;
        let mut label = model_label(model);
        while labels.contains(&label) {
            label.push('_');
        }
        labels.push(label.clone());
        for &init in inits {
            for task in &suite.tasks {
                let (recipe, known) = load_suite_task(suite, task, model, &label, init)?;
                let metric = task.metric.clone().unwrap_or_else(|| known[0].clone());
                for m in std::iter::once(&metric).chain(&task.also) {
                    if !known.contains(m) {
                        return Err(RecipeError::Invalid {
                            key: format!("task `{}` metric", task.name),
                            msg: format!(
                                "`{m}` is not a test metric of this task (its metrics: {})",
                                known[1..].join(", ")
                            ),
                        });
                    }
                }
                plan.push((task, recipe, metric, label.clone(), init, model.clone()));
            }
        }
    }
    let columns: Vec<String> = labels
        .iter()
        .flat_map(|l| {
            inits.iter().map(move |i| match i {
                Init::Pretrained => l.clone(),
                Init::Random => format!("{l} (random init)"),
            })
        })
        .collect();
    let dir = suite.runs_dir.join(suite.name());
    let mut cells = Vec::new();
    let total = plan.len();
    for (k, (task, loaded, metric, label, init, model)) in plan.into_iter().enumerate() {
        eprintln!(
            "suite {}: [{}/{total}] {} on {label}{}",
            suite.name(),
            k + 1,
            task.name,
            if init == Init::Random {
                " (random init)"
            } else {
                ""
            }
        );
        let started = std::time::Instant::now();
        let (test, run_dir) = match (task.kind, loaded) {
            (_, Loaded::Embeddings(r)) => {
                let random = (init == Init::Random).then_some(suite.seed);
                (
                    crate::embedding_eval::evaluate_embeddings(&model, &r, 64, random)?,
                    None,
                )
            }
            (TaskKind::Probe, Loaded::Finetune(recipe)) => {
                let p = crate::probe::probe(&recipe)?;
                (
                    BTreeMap::from([
                        ("accuracy".to_string(), p.accuracy),
                        ("macro_f1".to_string(), p.macro_f1),
                    ]),
                    None,
                )
            }
            (_, Loaded::Finetune(recipe)) => {
                let mut o = opts.clone();
                o.resume = Some(Resume::Auto);
                let r = crate::finetune::finetune(&recipe, &o)?;
                if o.stop_flag
                    .as_ref()
                    .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
                {
                    return Err(RecipeError::Invalid {
                        key: "suite".into(),
                        msg: "interrupted: run the same command again to go on".into(),
                    });
                }
                (r.test, Some(dir.join(recipe.name())))
            }
        };
        let scores = std::iter::once(&metric)
            .chain(&task.also)
            .map(|m| (m.clone(), test.get(m).copied().unwrap_or(f64::NAN)))
            .collect();
        cells.push(Cell {
            task: task.name.clone(),
            metric: metric.clone(),
            model: label,
            init: match init {
                Init::Pretrained => "pretrained",
                Init::Random => "random",
            },
            scores,
            run_dir,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let tasks = suite
        .tasks
        .iter()
        .map(|t| {
            let m = cells
                .iter()
                .find(|c| c.task == t.name)
                .map(|c| c.metric.clone())
                .unwrap_or_default();
            (t.name.clone(), m)
        })
        .collect();
    let report = SuiteReport {
        suite: suite.name().to_string(),
        tasks,
        columns,
        cells,
        dir,
    };
    std::fs::create_dir_all(&report.dir).map_err(|e| RecipeError::Run {
        path: report.dir.clone(),
        msg: e.to_string(),
    })?;
    kindling_models::export::save_json(
        &report.dir.join("results.json"),
        &serde_json::to_value(&report).expect("serialises"),
    )?;
    kindling_models::export::write_atomic(
        &report.dir.join("results.md"),
        report.markdown().as_bytes(),
    )?;
    Ok(report)
}

impl SuiteReport {
    /// Task rows (with their metric), model columns; the task's metric, then its `also`
    /// metrics in parentheses.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "| task | metric | {} |\n|---|---|",
            self.columns.join(" | ")
        );
        s += &"---|".repeat(self.columns.len());
        s += "\n";
        for (task, _) in &self.tasks {
            let cells: Vec<&Cell> = self.cells.iter().filter(|c| &c.task == task).collect();
            let names: Vec<&String> = cells
                .first()
                .map_or(Vec::new(), |c| c.scores.keys().collect());
            // The table's metric first (scores is a sorted map: find it by the task's order).
            let first = self
                .tasks
                .iter()
                .find(|(t, _)| t == task)
                .map(|(_, m)| m.clone())
                .unwrap_or_default();
            let others: Vec<&String> = names.into_iter().filter(|n| **n != first).collect();
            let metric = if others.is_empty() {
                first.clone()
            } else {
                format!(
                    "{first} ({})",
                    others
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            s += &format!("| {task} | {metric} |");
            for c in &cells {
                let main = c.scores.get(&first).copied().unwrap_or(f64::NAN);
                let rest: Vec<String> = others
                    .iter()
                    .map(|n| format!("{:.3}", c.scores.get(*n).copied().unwrap_or(f64::NAN)))
                    .collect();
                if rest.is_empty() {
                    s += &format!(" {main:.3} |");
                } else {
                    s += &format!(" {main:.3} ({}) |", rest.join(", "));
                }
            }
            s += "\n";
        }
        s
    }
}
