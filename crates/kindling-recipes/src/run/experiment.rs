//! The run lifecycle, written once: every recipe (and your own objective) is an [`Experiment`],
//! and [`drive`] runs it.
//!
//! A researcher writes three things: an [`Objective`] (the model and its loss, one `step`), a
//! [`Loader`] (batches in a seeded order that can continue from a saved cursor) and an
//! [`Experiment`] (what to build from the settings, and what to do with the trained model).
//! [`drive`] does the rest, in this order:
//!
//! 1. every setting checked ([`Experiment::validate`], the `[train]` section, the run name);
//! 2. the device, the precision and the data-parallel group;
//! 3. the run folder planned without a write: its lock, the checkpoints a `--resume` may
//!    continue from (checksums), and [`Experiment::check_resume`];
//! 4. [`Experiment::prepare`]: data, tokenizer, model, evaluation batches (reads only);
//! 5. the resume checkpoint picked: the newest whose weights (names and shapes), optimizer
//!    state and data cursor ([`Loader::seek`]) fit this run ([`Experiment::check_checkpoint`]
//!    first); an `auto` resume falls back past one that does not;
//! 6. only then the lock taken and the run folder created, replaced or continued, and
//!    [`Experiment::start`] (files of the run: a tokenizer, an initial evaluation);
//! 7. the trainer (optimiser, schedule, accumulation, clipping, evaluation, checksummed
//!    checkpoints, signals, metrics, plots), then [`Experiment::finish`] (test scores, probes,
//!    the export) unless the run was interrupted (its checkpoint resumes it).
//!
//! ```text
//! impl Objective for MyObjective   { fn step(&self, batch, mode) -> StepOutput { loss, ... } ... }
//! impl Loader for MyLoader         { fn cursor_after(batch) -> Value; fn seek(&mut self, &Value) }
//! impl Experiment for MySettings   { fn prepare(&self, ctx) -> Prepared { objective, train, eval }
//!                                    fn finish(&self, run, summary, ctx, export_dir) ... }
//! let ran = drive(&settings, &RunOptions::default())?;
//! ```
//!
//! `examples/denoising/` is a whole objective written this way (a denoising autoencoder on
//! Fashion-MNIST, ~150 lines), and `tests/example.rs` trains, resumes and exports it. The
//! shipped recipes are experiments too (`bert_mlm`, `simcse`, `vision`, `finetune`). See
//! docs/writing-an-objective.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use kindling_train::distributed::Collective;
use kindling_train::{FitSummary, Objective, Optimizer, StopReason, TrainConfig, Trainer};

use super::{
    compute_dtype, first_loadable, group_trainer, join_group, load_checked, loss_scale, plan_run,
    rank_device, standard_trainer, DeviceSetting, Precision,
};
use crate::recipe::{check_name, TrainSection};
use crate::{RecipeError, RunOptions, RunReport};

/// The batches of a run: an endless iterator in a seeded order, which can say where the run
/// stands after a batch and continue from there. Both must be pure functions of the seed and
/// the data, so that a resumed run sees exactly the batches a run straight through would.
pub trait Loader: Iterator {
    /// Where the run continues after `batch` (saved in every checkpoint as JSON).
    fn cursor_after(batch: &Self::Item) -> serde_json::Value;

    /// Continues from a saved cursor; an error says why it does not fit this data ("is past
    /// the end of the 600 images"), and the checkpoint is then refused before anything is
    /// written. Called before the first batch.
    fn seek(&mut self, cursor: &serde_json::Value) -> Result<(), String>;
}

/// Where a run stands while it is built: handed to the [`Experiment`]'s hooks.
pub struct Context {
    /// This process's device (`device` setting; a data-parallel rank's own GPU).
    pub device: Device,
    /// The low-precision compute dtype of `precision` (None: f32).
    pub compute: Option<DType>,
    /// The data-parallel group when this process is one of its ranks.
    pub group: Option<Arc<dyn Collective>>,
    pub rank: usize,
    pub world: usize,
    /// `runs_dir/name`. Nothing may be written there before [`Experiment::start`].
    pub run_dir: PathBuf,
    /// The run continues from a checkpoint of its folder (`--resume`).
    pub resuming: bool,
}

/// What [`Experiment::prepare`] builds: the objective, its data, and whatever else the
/// experiment keeps for later hooks (`state`: a tokenizer for the export, a test split).
pub struct Prepared<O: Objective, L, S = ()> {
    pub objective: O,
    pub train: L,
    /// Held-out batches, evaluated every `train.eval_every` steps and at the end.
    pub eval: Vec<O::Batch>,
    /// What a batch's `units` count, for the progress bar ("ex", "tok", "img").
    pub unit: &'static str,
    /// Training batches in one pass over the data (this rank's share): caps `steps` with
    /// `train.max_epochs`. 0: unknown.
    pub steps_per_epoch: u64,
    /// A reference value of the eval loss (a unigram model's), drawn on the loss plot and
    /// reported beside the final loss.
    pub baseline: Option<(String, f64)>,
    pub state: S,
}

impl<O: Objective, L> Prepared<O, L, ()> {
    /// An objective and its data, with no state of its own.
    pub fn new(objective: O, train: L, eval: Vec<O::Batch>, unit: &'static str) -> Self {
        Prepared {
            objective,
            train,
            eval,
            unit,
            steps_per_epoch: 0,
            baseline: None,
            state: (),
        }
    }
}

/// The prepared run of an experiment `E`.
pub type RunOf<E> =
    Prepared<<E as Experiment>::Objective, <E as Experiment>::Loader, <E as Experiment>::State>;

/// An experiment: settings in, an objective and its data out, and what happens once it has
/// trained. Hooks with a default do nothing.
pub trait Experiment {
    type Objective: Objective;
    type Loader: Loader<Item = <Self::Objective as Objective>::Batch>;
    /// What `prepare` keeps for the later hooks (`()` for none).
    type State;
    /// What `finish` returns (test scores, probe results; `()` for none).
    type Outcome;

    /// The run folder is `runs_dir/name`.
    fn name(&self) -> &str;
    fn runs_dir(&self) -> &Path;
    /// Fixes initialisation, data order and dropout (the trainer seeds dropout from it).
    fn seed(&self) -> u64;
    /// Where the run computes (default: the CPU).
    fn device(&self) -> DeviceSetting {
        DeviceSetting::Cpu
    }
    /// f32, or mixed precision on a GPU.
    fn precision(&self) -> Precision {
        Precision::F32
    }
    /// The `[train]` section: steps, batch, optimiser, schedule, evaluation, checkpoints.
    fn train(&self) -> &TrainSection;
    /// The settings as saved in the run folder (`recipe.toml`) and in every checkpoint.
    fn settings_toml(&self) -> String;
    /// The eval metrics the objective reports (`train.monitor.metric` must be one of them; an
    /// entry ending in `*` stands for every name it starts). `loss` is always one.
    fn eval_metrics(&self) -> Vec<&'static str> {
        vec!["loss"]
    }
    /// The eval metrics drawn in `plots/eval_metrics.png`.
    fn plotted_metrics(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Where the export goes.
    fn export_dir(&self, run_dir: &Path) -> PathBuf {
        run_dir.join("export")
    }
    /// Files of the run folder copied into every checkpoint, so that one describes its run on
    /// its own.
    fn checkpoint_files(&self) -> Vec<&'static str> {
        vec!["recipe.toml"]
    }

    /// Checks the experiment's own settings (the run name and `[train]` are checked by
    /// [`drive`]). Reads nothing.
    fn validate(&self) -> Result<(), RecipeError> {
        Ok(())
    }

    /// A resumed run folder belongs to this experiment (its saved settings agree).
    fn check_resume(&self, _run_dir: &Path) -> Result<(), RecipeError> {
        Ok(())
    }

    /// Builds the objective and its data. Reads only: nothing may be written here (the run
    /// folder is not the run's yet).
    fn prepare(&self, ctx: &Context) -> Result<RunOf<Self>, RecipeError>;

    /// The trainer's configuration: `[train]` as written, `steps` capped by `max_epochs`.
    fn train_config(&self, run: &RunOf<Self>) -> Result<TrainConfig, RecipeError> {
        self.train().train_config(self.seed(), run.steps_per_epoch)
    }

    /// Adjusts the optimizer before a checkpoint's state is loaded into it (per-parameter
    /// learning-rate scales).
    fn configure_optimizer(&self, _objective: &Self::Objective, _opt: &mut dyn Optimizer) {}

    /// Checks a resume checkpoint beyond its tensors and cursor (before they are loaded).
    fn check_checkpoint(&self, _run: &RunOf<Self>, _dir: &Path) -> Result<(), RecipeError> {
        Ok(())
    }

    /// The run folder is the run's now (locked, created or continued): write the run's own
    /// files, on rank 0 (the other ranks' `start` may wait for them).
    fn start(&self, _run: &mut RunOf<Self>, _ctx: &Context) -> Result<(), RecipeError> {
        Ok(())
    }

    /// After training that was not interrupted, on rank 0: final scores, probes, and the
    /// export into `export_dir` (created by [`drive`]).
    fn finish(
        &self,
        run: &mut RunOf<Self>,
        summary: &FitSummary,
        ctx: &Context,
        export_dir: &Path,
    ) -> Result<Self::Outcome, RecipeError>;
}

/// The header of an [`Experiment`] whose settings struct has the fields every recipe shares
/// (`runs_dir`, `seed`, `device`, `precision`, `train`, `export`), an inherent `name()` and a
/// `to_toml()`: the seven accessors, written once for the shipped recipes.
macro_rules! shared_header {
    () => {
        fn name(&self) -> &str {
            Self::name(self)
        }
        fn runs_dir(&self) -> &std::path::Path {
            &self.header.runs_dir
        }
        fn seed(&self) -> u64 {
            self.header.seed
        }
        fn device(&self) -> $crate::run::DeviceSetting {
            self.header.device
        }
        fn precision(&self) -> $crate::run::Precision {
            self.header.precision
        }
        fn train(&self) -> &$crate::recipe::TrainSection {
            &self.header.train
        }
        fn settings_toml(&self) -> String {
            self.to_toml()
        }
        fn export_dir(&self, run_dir: &std::path::Path) -> std::path::PathBuf {
            self.header.export_dir(run_dir)
        }
    };
}
pub(crate) use shared_header;

/// What [`drive`] returns: the run's report, the experiment's outcome (None when the run was
/// interrupted, or on a data-parallel rank other than 0), the best checkpoint by the monitored
/// metric, and the experiment's state.
pub struct Ran<E: Experiment> {
    pub report: RunReport,
    pub outcome: Option<E::Outcome>,
    /// (step, value) of the best evaluation by `train.monitor`.
    pub best: Option<(u64, f64)>,
    pub state: E::State,
}

/// Runs `exp` through the whole lifecycle; see the module documentation. An interrupted run
/// (`opts.stop_flag`) returns with [`StopReason::Interrupted`] after its checkpoint, and no
/// export.
pub fn drive<E: Experiment>(exp: &E, opts: &RunOptions) -> Result<Ran<E>, RecipeError> {
    // 1. Settings.
    check_name(exp.name())?;
    let mut metrics = exp.eval_metrics();
    if !metrics.contains(&"loss") {
        metrics.push("loss");
    }
    let t = exp.train();
    t.validate(&metrics)?;
    exp.validate()?;

    // 2. Device, precision, group.
    let device = rank_device(&exp.device(), opts.dist.as_ref())?;
    let compute = compute_dtype(exp.precision(), &device)?;
    let group = join_group(opts, &device)?;
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()));
    // Dropout masks on a GPU come from the device's generator (see `ops::seeded_dropout`);
    // each rank draws its own.
    if !device.is_cpu() {
        device.set_seed(exp.seed().wrapping_add(rank as u64))?;
    }

    // 3. The run folder, read only.
    let plan = plan_run(exp.runs_dir().join(exp.name()), opts, rank)?;
    let run_dir = plan.dir.clone();
    let resuming = !plan.candidates.dirs.is_empty();
    if resuming {
        exp.check_resume(&run_dir)?;
    }
    let ctx = Context {
        device,
        compute,
        group,
        rank,
        world,
        run_dir: run_dir.clone(),
        resuming,
    };

    // 4. Data and model.
    let mut run = exp.prepare(&ctx)?;
    let mut cfg = exp.train_config(&run)?;
    cfg.loss_scale = loss_scale(exp.precision());
    cfg.checkpoint_extras = exp
        .checkpoint_files()
        .iter()
        .map(|f| run_dir.join(f))
        .collect();
    let mut opt = Trainer::build_optimizer(&cfg.optimizer, &run.objective)?;
    exp.configure_optimizer(&run.objective, opt.as_mut());

    // 5. The checkpoint: the newest whose weights, optimizer state and cursor fit.
    let resumed = first_loadable(&plan.candidates, |dir| {
        exp.check_checkpoint(&run, dir)?;
        let train = &mut run.train;
        let (state, _) = load_checked(
            dir,
            run.objective.varmap(),
            opt.as_mut(),
            &ctx.device,
            |cursor: &serde_json::Value| train.seek(cursor),
        )?;
        Ok(state)
    })?;
    let resume_from: Option<PathBuf> = resumed.as_ref().map(|(d, _)| d.clone());

    // 6. Writes: the lock, the run folder, the experiment's own files.
    let _lock = plan.commit(&exp.settings_toml(), opts, resume_from.is_some())?;
    exp.start(&mut run, &ctx)?;

    // 7. Train, then finish.
    let plotted = exp.plotted_metrics();
    let mut trainer = group_trainer(ctx.group.as_ref(), cfg.clone(), &run_dir, opts, |cfg| {
        standard_trainer(
            cfg,
            &run_dir,
            t.log_every,
            run.unit,
            &plotted,
            run.baseline.clone(),
            resume_from.as_deref(),
            opts,
        )
    })?;
    if rank == 0 {
        let eval_units: usize = run.eval.len();
        eprintln!(
            "train: {} steps of {} x {} ({} per epoch), eval every {} steps on {eval_units} \
             held-out batches",
            cfg.steps,
            t.batch_size,
            t.grad_accum.max(1),
            run.steps_per_epoch,
            cfg.eval_every
        );
    }
    let start = resumed.map(|(_, state)| state);
    let summary = trainer.fit(
        &run.objective,
        &mut run.train,
        &run.eval,
        opt,
        start,
        &|b| E::Loader::cursor_after(b),
    )?;
    let export_dir = exp.export_dir(&run_dir);
    let outcome = if rank > 0 {
        None
    } else {
        match summary.stop {
            StopReason::Interrupted => {
                eprintln!(
                    "interrupted at step {}: checkpoint {}",
                    summary.steps,
                    summary
                        .last_checkpoint
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "(none: no step finished)".into())
                );
                None
            }
            stop => {
                match stop {
                    StopReason::MaxTime => {
                        eprintln!("train.max_time reached at step {}", summary.steps)
                    }
                    StopReason::EarlyStopped => eprintln!(
                        "early stop at step {}: `{}` did not improve for {} evaluations (best {:?})",
                        summary.steps,
                        t.monitor.metric,
                        t.monitor.patience,
                        summary.best.as_ref().map(|b| (b.step, b.value))
                    ),
                    _ => {}
                }
                std::fs::create_dir_all(&export_dir).map_err(super::io(&export_dir))?;
                let outcome = exp.finish(&mut run, &summary, &ctx, &export_dir)?;
                if let (Some((label, b)), Some(l)) = (&run.baseline, summary.final_eval.get("loss"))
                {
                    eprintln!("final eval loss {l:.4} vs {label} {b:.4} ({:+.4})", l - b);
                }
                eprintln!("export: {}", export_dir.display());
                Some(outcome)
            }
        }
    };
    let exported = outcome.is_some();
    Ok(Ran {
        report: RunReport {
            run_dir,
            export_dir: if exported { export_dir } else { PathBuf::new() },
            final_eval: summary.final_eval,
            baseline: run.baseline,
            steps: summary.steps,
            elapsed_secs: summary.elapsed_secs,
            stop: summary.stop,
        },
        outcome,
        best: summary.best.as_ref().map(|b| (b.step, b.value)),
        state: run.state,
    })
}

/// A [`Loader`] whose batches are built on a background thread ([`kindling_data::Prefetch`]),
/// `depth` ahead of the trainer. The thread starts at the first batch, after any
/// [`Loader::seek`].
pub struct Prefetched<L: Loader> {
    pending: Option<L>,
    running: Option<kindling_data::Prefetch<L::Item>>,
    depth: usize,
}

impl<L: Loader> Prefetched<L> {
    pub fn new(loader: L, depth: usize) -> Self {
        Prefetched {
            pending: Some(loader),
            running: None,
            depth,
        }
    }
}

impl<L> Iterator for Prefetched<L>
where
    L: Loader + Send + 'static,
    L::Item: Send + 'static,
{
    type Item = L::Item;

    fn next(&mut self) -> Option<L::Item> {
        if let Some(loader) = self.pending.take() {
            self.running = Some(kindling_data::Prefetch::new(loader, self.depth));
        }
        self.running.as_mut()?.next()
    }
}

impl<L> Loader for Prefetched<L>
where
    L: Loader + Send + 'static,
    L::Item: Send + 'static,
{
    fn cursor_after(batch: &L::Item) -> serde_json::Value {
        L::cursor_after(batch)
    }

    fn seek(&mut self, cursor: &serde_json::Value) -> Result<(), String> {
        match &mut self.pending {
            Some(loader) => loader.seek(cursor),
            None => Err("cannot be sought: the loader has started".into()),
        }
    }
}
