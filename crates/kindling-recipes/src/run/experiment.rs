//! Your own objective through Kindling's run lifecycle: the Lightning promise.
//!
//! A researcher writes three things: an [`Objective`] (the model and its loss, one `step`), a
//! [`Loader`] (batches in a seeded order that can continue from a saved cursor) and an
//! [`Experiment`] (what to build from the settings, and how to export). [`drive`] does the rest,
//! exactly as the shipped recipes: settings checked, the run folder planned without a write,
//! the resume checkpoint picked (weights, optimizer state and cursor checked against this run),
//! then the lock, the folder, the trainer (AdamW or another optimiser, schedule, accumulation,
//! clipping, evaluation, checksummed checkpoints, signals, metrics, plots) and the export.
//!
//! ```text
//! impl Objective for MyObjective   { fn step(&self, batch, mode) -> StepOutput { loss, ... } ... }
//! impl Loader for MyLoader         { fn cursor_after(batch) -> Value; fn seek(&mut self, &Value) }
//! impl Experiment for MySettings   { fn prepare(&self, device) -> Prepared { objective, train, eval }
//!                                    fn export(&self, objective, dir) ... }
//! let report = drive(&settings, &RunOptions::default())?;
//! ```
//!
//! `examples/denoising/` is a whole objective written this way (a denoising autoencoder on
//! Fashion-MNIST, ~150 lines), and `tests/example.rs` trains, resumes and exports it. See
//! docs/writing-an-objective.md.

use std::path::{Path, PathBuf};

use candle_core::Device;
use kindling_train::{Objective, StopReason, Trainer};

use super::{first_loadable, load_checked, plan_run, standard_trainer};
use crate::recipe::{check_name, TrainSection};
use crate::{RecipeError, RunOptions, RunReport};

/// The batches of a run: an endless iterator in a seeded order, which can say where the run
/// stands after a batch and continue from there. Both must be pure functions of the seed and
/// the data, so that a resumed run sees exactly the batches a run straight through would.
pub trait Loader: Iterator {
    /// Where the run continues after `batch` (saved in every checkpoint as JSON).
    fn cursor_after(batch: &Self::Item) -> serde_json::Value;

    /// Continues from a saved cursor; an error says why it does not fit this data (a position
    /// past its end), and the checkpoint is then refused before anything is written.
    fn seek(&mut self, cursor: &serde_json::Value) -> Result<(), String>;
}

/// What [`Experiment::prepare`] builds: the objective and its data.
pub struct Prepared<O: Objective, L> {
    pub objective: O,
    pub train: L,
    /// Held-out batches, evaluated every `train.eval_every` steps and at the end.
    pub eval: Vec<O::Batch>,
    /// What a batch's `units` count, for the progress bar ("ex", "tok", "img").
    pub unit: &'static str,
}

/// An experiment: settings in, an objective and its data out, and an export at the end.
pub trait Experiment {
    type Objective: Objective;
    type Loader: Loader<Item = <Self::Objective as Objective>::Batch>;

    /// The run folder is `runs_dir/name`.
    fn name(&self) -> &str;
    fn runs_dir(&self) -> &Path;
    /// Fixes initialisation, data order and dropout (the trainer seeds dropout from it).
    fn seed(&self) -> u64;
    /// The `[train]` section: steps, batch, optimiser, schedule, evaluation, checkpoints.
    fn train(&self) -> &TrainSection;
    /// The settings as saved in the run folder (`recipe.toml`) and in every checkpoint.
    fn settings_toml(&self) -> String;

    /// The eval metrics the objective reports besides `loss` (`train.monitor.metric` must be
    /// one of them).
    fn eval_metrics(&self) -> Vec<&'static str> {
        vec!["loss"]
    }

    /// Builds the objective and its data. Reads only: nothing may be written here (the run
    /// folder is not the run's yet).
    fn prepare(
        &self,
        device: &Device,
    ) -> Result<Prepared<Self::Objective, Self::Loader>, RecipeError>;

    /// Writes the trained objective into `dir` (created by the caller).
    fn export(&self, objective: &Self::Objective, dir: &Path) -> Result<(), RecipeError>;
}

/// Runs `exp` on the CPU through the whole lifecycle; see the module documentation. An
/// interrupted run (`opts.stop_flag`) returns with [`StopReason::Interrupted`] after its
/// checkpoint, and no export.
pub fn drive<E: Experiment>(exp: &E, opts: &RunOptions) -> Result<RunReport, RecipeError> {
    check_name(exp.name())?;
    let mut metrics = exp.eval_metrics();
    if !metrics.contains(&"loss") {
        metrics.push("loss");
    }
    exp.train().validate(&metrics)?;
    let device = Device::Cpu;
    let plan = plan_run(exp.runs_dir().join(exp.name()), opts, 0)?;
    let run_dir = plan.dir.clone();
    let Prepared {
        objective,
        mut train,
        eval,
        unit,
    } = exp.prepare(&device)?;
    let t = exp.train();
    let mut cfg = t.train_config(exp.seed(), 0)?;
    cfg.checkpoint_extras = vec![run_dir.join("recipe.toml")];
    let mut opt = Trainer::build_optimizer(&cfg.optimizer, &objective)?;
    let resumed = first_loadable(&plan.candidates, |dir| {
        let (state, cursor) = load_checked(
            dir,
            objective.varmap(),
            opt.as_mut(),
            &device,
            |_: &serde_json::Value| Ok(()),
        )?;
        train.seek(&cursor).map_err(|m| RecipeError::Resume {
            path: dir.to_path_buf(),
            msg: format!("its data cursor {cursor} {m}"),
        })?;
        Ok(state)
    })?;
    let resume_from: Option<PathBuf> = resumed.as_ref().map(|(d, _)| d.clone());
    let _lock = plan.commit(&exp.settings_toml(), opts, resume_from.is_some())?;
    let metric_refs: Vec<&str> = metrics.iter().copied().filter(|m| *m != "loss").collect();
    let mut trainer = standard_trainer(
        cfg,
        &run_dir,
        t.log_every,
        unit,
        &metric_refs,
        resume_from.as_deref(),
        opts,
    )?;
    let start = resumed.map(|(_, state)| state);
    let summary = trainer.fit(&objective, &mut train, &eval, opt, start, &|b| {
        E::Loader::cursor_after(b)
    })?;
    let export_dir = run_dir.join("export");
    if summary.stop != StopReason::Interrupted {
        std::fs::create_dir_all(&export_dir).map_err(super::io(&export_dir))?;
        exp.export(&objective, &export_dir)?;
    }
    Ok(RunReport {
        run_dir,
        export_dir,
        final_eval: summary.final_eval,
        baseline: None,
        steps: summary.steps,
        elapsed_secs: summary.elapsed_secs,
        stop: summary.stop,
    })
}
