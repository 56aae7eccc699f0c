//! The trainer every recipe runs: progress, logs, plots, the stop flag, and the data-parallel
//! group.

use std::path::Path;
use std::sync::Arc;

use kindling_train::distributed::Collective;
use kindling_train::{checkpoint, MetricsLog, PlotCallback, ProgressCallback, Trainer};

use crate::{RecipeError, RunOptions};

/// The trainer every run has: a progress bar counting `unit`, the metrics log (continued from
/// the checkpoint's step when resuming from `resume_from`), TensorBoard events, the loss plot
/// (with the `baseline` line, if any) and a plot of the eval `metrics`, and the stop flag.
#[allow(clippy::too_many_arguments)]
pub(crate) fn standard_trainer(
    cfg: kindling_train::TrainConfig,
    run_dir: &Path,
    log_every: u64,
    unit: &'static str,
    metrics: &[&str],
    baseline: Option<(String, f64)>,
    resume_from: Option<&Path>,
    opts: &RunOptions,
) -> Result<kindling_train::Trainer, RecipeError> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let log = match resume_from {
        // A resumed run continues the log from its checkpoint: records after it are dropped.
        Some(dir) => MetricsLog::resume(&metrics_path, checkpoint::load_state(dir)?.step)?,
        None => MetricsLog::open(&metrics_path)?,
    };
    let mut trainer = kindling_train::Trainer::new(cfg, run_dir)
        .with_callback(ProgressCallback::new(log_every, unit))
        .with_callback(log)
        .with_callback(kindling_train::TensorBoard::create(run_dir)?)
        .with_callback(
            PlotCallback::new(
                run_dir.join("plots").join("loss.png"),
                baseline.into_iter().collect(),
            )
            .with_metric_plot(run_dir.join("plots").join("eval_metrics.png"), metrics)
            .with_history(&metrics_path),
        );
    if let Some(flag) = &opts.stop_flag {
        trainer = trainer.with_stop_flag(flag.clone());
    }
    Ok(trainer)
}

/// A data-parallel run's trainer for this rank, joined to `group`: rank 0's from `rank0` (with
/// its progress bar, logs and plots), the other ranks' from [`rank_trainer`]. One process
/// (`group` None): `rank0`'s.
pub(crate) fn group_trainer(
    group: Option<&Arc<dyn Collective>>,
    cfg: kindling_train::TrainConfig,
    run_dir: &Path,
    opts: &RunOptions,
    rank0: impl FnOnce(kindling_train::TrainConfig) -> Result<Trainer, RecipeError>,
) -> Result<Trainer, RecipeError> {
    let trainer = match group {
        Some(g) if g.rank() > 0 => rank_trainer(cfg, run_dir, opts),
        _ => rank0(cfg)?,
    };
    Ok(match group {
        Some(g) => trainer.with_collective(g.clone()),
        None => trainer,
    })
}

/// The trainer of a data-parallel rank other than 0: no progress bar, logs or plots (rank 0
/// shows the group's loss and throughput), the stop flag still heard.
pub(crate) fn rank_trainer(
    cfg: kindling_train::TrainConfig,
    run_dir: &Path,
    opts: &RunOptions,
) -> Trainer {
    let trainer = Trainer::new(cfg, run_dir);
    match &opts.stop_flag {
        Some(flag) => trainer.with_stop_flag(flag.clone()),
        None => trainer,
    }
}
