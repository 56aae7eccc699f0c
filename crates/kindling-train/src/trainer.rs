//! The training loop: micro-batches are accumulated into one update, the gradient is clipped
//! by its global norm, AdamW applies the scheduled learning rate, callbacks observe, and the
//! held-out split is evaluated every `eval_every` steps and at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use kindling_core::rng::derive_seed;
use kindling_core::Mode;

use crate::callbacks::{Callback, EvalRecord, StepRecord};
use crate::checkpoint::{self, Best, TrainerState};
use crate::distributed::{all_reduce_mean, Collective};
use crate::objective::Objective;
use crate::optim::{grad_norm, scale_grads, Optimizer, OptimizerConfig};
use crate::schedule::Schedule;
use crate::{Result, TrainError};

/// How to train; built from a recipe's `[train]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimiser updates.
    pub steps: u64,
    /// Micro-batches per update.
    pub grad_accum: u32,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    /// Clip the global gradient norm to this value (None: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Evaluate every N updates (0: only at the end).
    pub eval_every: u64,
    /// Save a checkpoint every N updates (0: only at the end).
    pub save_every: u64,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Seeds dropout (and anything else the objective draws per step).
    pub seed: u64,
    /// Stop (checkpoint, evaluate, export) once training has run this long, over all sessions.
    pub max_time: Option<Duration>,
    /// Also save a checkpoint when this much time has passed since the last one.
    pub save_interval: Option<Duration>,
    /// On a non-finite loss or gradient: stop with an error (false), or skip the update and go on
    /// (true; the step is counted in `skipped_steps`).
    pub skip_nonfinite: bool,
    /// Files copied into every checkpoint (the run's recipe, tokenizer, metrics so far).
    pub checkpoint_extras: Vec<PathBuf>,
    /// The eval metric whose best checkpoint is kept, and when to stop early on it.
    pub monitor: Monitor,
    /// Dynamic loss scaling, for f16 mixed precision (whose gradients would underflow): the
    /// initial scale. The loss is multiplied by the scale before the backward pass and the
    /// gradients divided by it before clipping; an update whose gradients overflow is skipped
    /// and the scale halved, and after [`LOSS_SCALE_WINDOW`] clean updates it doubles, as
    /// PyTorch's `GradScaler`. `None`: no scaling (f32, bf16).
    pub loss_scale: Option<f64>,
}

impl TrainConfig {
    /// Checks every value range before a run starts (so that a bad setting is an error naming
    /// its key before anything is written, not a failure at the first step): at least one
    /// micro-batch per update; finite, non-negative rates, decay and clipping; moment decay
    /// rates and momentum in [0, 1); a positive epsilon; schedule fractions in [0, 1].
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &'static str, msg: String| Err(TrainError::Config { key, msg });
        let o = &self.optimizer;
        let s = &self.schedule;
        if self.grad_accum == 0 {
            return bad("train.grad_accum", "must be at least 1".into());
        }
        let finite_at_least = |key, v: f64, min: f64| {
            if v.is_finite() && v >= min {
                Ok(())
            } else {
                bad(key, format!("must be a finite number >= {min}, got {v}"))
            }
        };
        let unit = |key, v: f64, open_top: bool| {
            let ok = v.is_finite() && v >= 0.0 && if open_top { v < 1.0 } else { v <= 1.0 };
            if ok {
                Ok(())
            } else {
                let range = if open_top { "[0, 1)" } else { "[0, 1]" };
                bad(key, format!("must be in {range}, got {v}"))
            }
        };
        finite_at_least("train.optimizer.lr", o.lr, 0.0)?;
        finite_at_least("train.optimizer.weight_decay", o.weight_decay, 0.0)?;
        finite_at_least(
            "train.optimizer.trust_coefficient",
            o.trust_coefficient,
            0.0,
        )?;
        unit("train.optimizer.beta1", o.beta1, true)?;
        unit("train.optimizer.beta2", o.beta2, true)?;
        unit("train.optimizer.momentum", o.momentum, true)?;
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return bad(
                "train.optimizer.eps",
                format!("must be a finite number > 0, got {}", o.eps),
            );
        }
        unit("train.schedule.min_lr_ratio", s.min_lr_ratio, false)?;
        unit("train.schedule.decay_fraction", s.decay_fraction, false)?;
        if let Some(n) = self.max_grad_norm {
            finite_at_least("train.max_grad_norm", n, 0.0)?;
        }
        finite_at_least("train.monitor.min_delta", self.monitor.min_delta, 0.0)?;
        if self.monitor.metric.trim().is_empty() {
            return bad("train.monitor.metric", "must name an eval metric".into());
        }
        if let Some(scale) = self.loss_scale {
            finite_at_least("precision", scale, 1.0)?;
        }
        Ok(())
    }
}

/// Clean updates after which a dynamic loss scale doubles (PyTorch's `growth_interval`).
pub const LOSS_SCALE_WINDOW: u64 = 2000;

/// Whether smaller or larger values of a metric are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    Min,
    Max,
}

/// The eval metric to watch (`train.monitor` in a recipe): the checkpoint with its best value
/// is kept besides the newest `keep_last`, and with `patience > 0` the run stops after that
/// many evaluations in a row that did not improve it by more than `min_delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Monitor {
    pub metric: String,
    pub goal: Goal,
    pub patience: u32,
    pub min_delta: f64,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            metric: "loss".into(),
            goal: Goal::Min,
            patience: 0,
            min_delta: 0.0,
        }
    }
}

impl Monitor {
    /// Updates `best` with a new eval; returns whether it improved.
    fn update(&self, best: &mut Option<Best>, step: u64, metrics: &BTreeMap<String, f64>) -> bool {
        let Some(&value) = metrics.get(&self.metric) else {
            return false;
        };
        let better = match best {
            None => true,
            Some(b) => match self.goal {
                Goal::Min => value < b.value - self.min_delta,
                Goal::Max => value > b.value + self.min_delta,
            },
        };
        if better {
            *best = Some(Best {
                metric: self.metric.clone(),
                value,
                step,
                evals_without_improvement: 0,
            });
        } else if let Some(b) = best {
            b.evals_without_improvement += 1;
        }
        better
    }
}

/// Why `fit` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// All `steps` done.
    Completed,
    /// `max_time` reached.
    MaxTime,
    /// The monitored metric stopped improving (`monitor.patience`).
    EarlyStopped,
    /// The stop flag was raised (SIGINT/SIGTERM): a checkpoint was written, nothing evaluated.
    Interrupted,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            grad_accum: 1,
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::default(),
            max_grad_norm: Some(1.0),
            eval_every: 0,
            save_every: 0,
            keep_last: 2,
            seed: 0,
            max_time: None,
            save_interval: None,
            skip_nonfinite: false,
            checkpoint_extras: Vec::new(),
            monitor: Monitor::default(),
            loss_scale: None,
        }
    }
}

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct FitSummary {
    pub steps: u64,
    pub elapsed_secs: f64,
    pub units: u64,
    pub final_eval: BTreeMap<String, f64>,
    pub last_checkpoint: Option<PathBuf>,
    pub stop: StopReason,
    pub best: Option<Best>,
}

pub struct Trainer {
    cfg: TrainConfig,
    run_dir: PathBuf,
    callbacks: Vec<Box<dyn Callback>>,
    stop_flag: Option<Arc<AtomicBool>>,
    comm: Option<Arc<dyn Collective>>,
}

/// Values per gradient all-reduce call in data-parallel runs: 25 MB of f32, DDP's default
/// bucket (fewer, larger calls amortise NCCL's per-call latency).
const BUCKET: usize = 25 * 1024 * 1024 / 4;

impl Trainer {
    pub fn new(cfg: TrainConfig, run_dir: &Path) -> Self {
        Trainer {
            cfg,
            run_dir: run_dir.to_path_buf(),
            callbacks: Vec::new(),
            stop_flag: None,
            comm: None,
        }
    }

    /// Trains data-parallel in `comm`'s group: of every `world` consecutive batches the data
    /// iterator yields, rank r trains on the r-th (so the ranks see disjoint shards and the
    /// checkpoint's cursor is the whole group's); gradients are averaged over ranks before
    /// clipping and the update; dropout seeds count micro-batches over the whole group. The
    /// update then equals one process's with `grad_accum` times `world` micro-batches. Every
    /// rank must make the same calls (same data, steps and settings); only rank 0 writes
    /// checkpoints, and callbacks belong on rank 0 alone.
    pub fn with_collective(mut self, comm: Arc<dyn Collective>) -> Self {
        self.comm = Some(comm);
        self
    }

    /// A flag that, once raised (by a signal handler, say), makes `fit` write a checkpoint after
    /// the current step and return [`StopReason::Interrupted`].
    pub fn with_stop_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop_flag = Some(flag);
        self
    }

    pub fn with_callback(mut self, cb: impl Callback + 'static) -> Self {
        self.callbacks.push(Box::new(cb));
        self
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The parameters the optimiser updates, by name (state such as BatchNorm statistics or a
    /// momentum encoder lives in the same VarMap, so it is checkpointed, but is not trained).
    fn params<O: Objective>(obj: &O) -> Vec<(String, Var)> {
        let data = obj.varmap().data().lock().expect("varmap lock poisoned");
        let mut v: Vec<(String, Var)> = data
            .iter()
            .filter(|(n, _)| obj.trainable(n))
            .map(|(n, var)| (n.clone(), var.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The optimiser this trainer would use for `obj` (exposed so a resume can load its state).
    pub fn optimizer<O: Objective>(&self, obj: &O) -> Result<Box<dyn Optimizer>> {
        Self::build_optimizer(&self.cfg.optimizer, obj)
    }

    /// The optimiser `cfg` builds over `obj`'s trainable parameters, before any trainer exists:
    /// a resume loads its state to check a checkpoint before the run folder changes.
    pub fn build_optimizer<O: Objective>(
        cfg: &crate::OptimizerConfig,
        obj: &O,
    ) -> Result<Box<dyn Optimizer>> {
        let params = Self::params(obj)
            .into_iter()
            .map(|(n, v)| {
                let decay = !obj.no_decay(&n);
                (n, v, decay)
            })
            .collect();
        cfg.build(params)
    }

    /// Averages the objective's loss and metrics over `batches` in eval mode, weighted by each
    /// batch's `weight`.
    pub fn evaluate<O: Objective>(obj: &O, batches: &[O::Batch]) -> Result<BTreeMap<String, f64>> {
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut total = 0.0;
        for b in batches {
            let out = obj.step(b, Mode::Eval)?;
            let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            *sums.entry("loss".into()).or_default() += loss * out.weight;
            for (k, v) in out.metrics {
                *sums.entry(k).or_default() += v * out.weight;
            }
            total += out.weight;
        }
        let mut avg: BTreeMap<String, f64> = sums
            .into_iter()
            .map(|(k, v)| (k, v / total.max(1e-12)))
            .collect();
        obj.finish_eval(&mut avg);
        Ok(avg)
    }

    /// Trains `obj` on `train` for the configured steps, from `start` (a fresh run: `None`).
    pub fn fit<O: Objective>(
        &mut self,
        obj: &O,
        train: &mut dyn Iterator<Item = O::Batch>,
        eval: &[O::Batch],
        mut opt: Box<dyn Optimizer>,
        start: Option<TrainerState>,
        cursor_of: &dyn Fn(&O::Batch) -> serde_json::Value,
    ) -> Result<FitSummary> {
        let cfg = self.cfg.clone();
        cfg.validate()?;
        let params = Self::params(obj);
        let (rank, world) = self.comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
        // Where the ranks' small exchanges (losses, flags) live: the parameters' device, which
        // is where NCCL can reach them.
        let device = params
            .first()
            .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
        let any_fixed = params.iter().any(|(n, _)| obj.fixed_lr(n));
        let vars: Vec<Var> = params.into_iter().map(|(_, v)| v).collect();
        let mut step = start.as_ref().map_or(0, |s| s.step);
        let mut cursor = start
            .as_ref()
            .map_or(serde_json::Value::Null, |s| s.data_cursor.clone());
        let elapsed_before = start.as_ref().map_or(0.0, |s| s.elapsed_secs);
        let mut best = start.as_ref().and_then(|s| s.best.clone());
        // (scale, clean updates since it last changed); a resumed run goes on with its own.
        let mut scaler = match start.as_ref().and_then(|s| s.loss_scale) {
            Some(saved) => Some(saved),
            None => cfg.loss_scale.map(|s| (s, 0u64)),
        };
        let mut last_eval = start.and_then(|s| s.last_eval).unwrap_or_default();
        let mut last_checkpoint = None;
        let mut stop = StopReason::Completed;
        let mut units_total = 0u64;
        for cb in &mut self.callbacks {
            cb.on_train_start(step, cfg.steps)?;
        }
        let t0 = Instant::now();
        let first_step = step;
        let mut skipped = 0u64;
        let mut last_save = Instant::now();
        while step < cfg.steps {
            // (Data parallel: every rank takes its first step and the ranks then stop together,
            // after agreeing below.)
            if world == 1
                && step == first_step
                && self
                    .stop_flag
                    .as_ref()
                    .is_some_and(|f| f.load(Ordering::SeqCst))
            {
                // Stopped before any step of this session: nothing new to save.
                stop = StopReason::Interrupted;
                break;
            }
            let t_step = Instant::now();
            let lr = cfg.schedule.lr(step, cfg.steps, cfg.optimizer.lr);
            let mut acc: Option<GradStore> = None;
            let (mut loss_sum, mut units, mut flops) = (0.0, 0usize, Some(0.0));
            let mut metric_sums: BTreeMap<String, f64> = BTreeMap::new();
            let mut nonfinite = false;
            for micro in 0..cfg.grad_accum {
                let mut mine = None;
                for r in 0..world {
                    let batch = train.next().ok_or(TrainError::DataExhausted { step })?;
                    cursor = cursor_of(&batch);
                    if r == rank {
                        mine = Some(batch);
                    }
                }
                let batch = mine.expect("rank < world");
                if nonfinite {
                    // This update is skipped: consume its micro-batches, compute nothing.
                    continue;
                }
                let global_micro = micro as u64 * world as u64 + rank as u64;
                let mode = Mode::Train {
                    seed: derive_seed(&[cfg.seed, step, global_micro]),
                };
                let (out, own_grads) = match obj.step_with_grads(&batch, mode)? {
                    Some((out, grads)) => (out, Some(grads)),
                    None => (obj.step(&batch, mode)?, None),
                };
                // Each micro-batch contributes 1/k of the update, as one big batch would. The
                // backward pass is queued before the loss is read: on a GPU, reading it first
                // would leave the device idle while the host queues the backward kernels.
                let grads = match own_grads {
                    Some(mut g) => {
                        let s = scaler.map_or(1.0, |(s, _)| s);
                        if cfg.grad_accum > 1 || s != 1.0 {
                            scale_grads(&mut g, &vars, s / cfg.grad_accum as f64)?;
                        }
                        g
                    }
                    None => {
                        let s = scaler.map_or(1.0, |(s, _)| s);
                        (&out.loss * (s / cfg.grad_accum as f64))?.backward()?
                    }
                };
                let loss_val = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !loss_val.is_finite() {
                    // (Data parallel: the ranks first agree, below, then skip or stop together.)
                    if cfg.skip_nonfinite || world > 1 {
                        if cfg.skip_nonfinite {
                            tracing::warn!(
                                step = step + 1,
                                loss = loss_val,
                                "non-finite loss: update skipped"
                            );
                        }
                        nonfinite = true;
                        continue;
                    }
                    return Err(TrainError::NonFiniteLoss {
                        step: step + 1,
                        loss: loss_val,
                    });
                }
                // Only the parameters' gradients are kept, detached: a GradStore also holds the
                // gradient of every intermediate, and a gradient still references the graph it
                // came from, so keeping either would keep this micro-batch's activations alive
                // through the next ones (accumulation would then save no memory).
                let mut a = acc.take().unwrap_or_default();
                for v in &vars {
                    if let Some(g) = grads.get(v.as_tensor()) {
                        let sum = match a.get(v.as_tensor()) {
                            Some(prev) => (prev + g)?.detach(),
                            None => g.detach(),
                        };
                        a.insert(v.as_tensor(), sum);
                    }
                }
                acc = Some(a);
                loss_sum += loss_val;
                units += out.units;
                flops = match (flops, obj.train_flops(&batch)) {
                    (Some(f), Some(g)) => Some(f + g),
                    _ => None,
                };
                for (k, v) in out.metrics {
                    *metric_sums.entry(k).or_default() += v / cfg.grad_accum as f64;
                }
            }
            if let Some(comm) = &self.comm {
                // The ranks agree on skipping (any rank's non-finite loss) and log the group's
                // mean loss and metrics and its total throughput.
                let stats = [f64::from(u8::from(nonfinite)), loss_sum, units as f64];
                let stats = comm.all_reduce_sum(&Tensor::new(&stats, &device)?)?;
                let stats = stats.to_vec1::<f64>()?;
                nonfinite = stats[0] > 0.0;
                loss_sum = stats[1] / world as f64;
                units = stats[2] as usize;
                flops = flops.map(|f| f * world as f64);
                if nonfinite && !cfg.skip_nonfinite {
                    return Err(TrainError::NonFiniteLoss {
                        step: step + 1,
                        loss: f64::NAN,
                    });
                }
                if !nonfinite {
                    let keys: Vec<String> = metric_sums.keys().cloned().collect();
                    let vals: Vec<f64> = metric_sums.values().copied().collect();
                    if !vals.is_empty() {
                        let sums = comm.all_reduce_sum(&Tensor::new(vals.as_slice(), &device)?)?;
                        for (k, v) in keys.into_iter().zip(sums.to_vec1::<f64>()?) {
                            metric_sums.insert(k, v / world as f64);
                        }
                    }
                    let grads = acc.as_mut().expect("grad_accum >= 1");
                    all_reduce_mean(grads, &vars, comm.as_ref(), BUCKET)?;
                }
            }
            let mut norm = f64::NAN;
            if !nonfinite {
                let mut grads = acc.expect("grad_accum >= 1");
                let scale = scaler.map_or(1.0, |(s, _)| s);
                norm = grad_norm(&grads, &vars)? / scale;
                if let (Some((s, clean)), false) = (scaler.as_mut(), norm.is_finite()) {
                    // Overflow of the scaled gradients: skip this update at half the scale.
                    tracing::debug!(step = step + 1, scale = *s, "loss-scale overflow");
                    *s /= 2.0;
                    *clean = 0;
                    metric_sums.insert("loss_scale_overflow".into(), 1.0);
                } else if norm.is_finite() {
                    // One pass over the gradients: unscale and clip together.
                    let clip = match cfg.max_grad_norm {
                        Some(max) if norm > max => max / (norm + 1e-6),
                        _ => 1.0,
                    };
                    if clip / scale != 1.0 {
                        scale_grads(&mut grads, &vars, clip / scale)?;
                    }
                    if any_fixed && lr > 0.0 {
                        // The schedule's rate times this scale is the peak rate.
                        let hold = cfg.optimizer.lr / lr;
                        opt.set_lr_scales(&|n| if obj.fixed_lr(n) { hold } else { 1.0 });
                    }
                    opt.step(&grads, lr)?;
                    obj.after_update(step + 1, cfg.steps)?;
                    if let Some((s, clean)) = scaler.as_mut() {
                        *clean += 1;
                        if *clean == LOSS_SCALE_WINDOW {
                            *s *= 2.0;
                            *clean = 0;
                        }
                    }
                } else if cfg.skip_nonfinite {
                    tracing::warn!(step = step + 1, "non-finite gradient: update skipped");
                    nonfinite = true;
                } else {
                    return Err(TrainError::NonFiniteGrad { step: step + 1 });
                }
            }
            if nonfinite {
                skipped += 1;
                loss_sum = f64::NAN;
            }
            if skipped > 0 {
                metric_sums.insert("skipped_steps".into(), skipped as f64);
            }
            if let Some((s, _)) = scaler {
                metric_sums.insert("loss_scale".into(), s);
            }
            step += 1;
            units_total += units as u64;
            let step_secs = t_step.elapsed().as_secs_f64();
            let rec = StepRecord {
                step,
                total_steps: cfg.steps,
                loss: loss_sum / cfg.grad_accum as f64,
                lr,
                grad_norm: norm,
                units,
                step_secs,
                elapsed_secs: elapsed_before + t0.elapsed().as_secs_f64(),
                gflops_per_s: flops.map(|f| f / step_secs / 1e9),
                metrics: &metric_sums,
            };
            for cb in &mut self.callbacks {
                cb.on_step_end(&rec)?;
            }
            let mut interrupted = self
                .stop_flag
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst));
            let mut time_up = cfg
                .max_time
                .is_some_and(|m| elapsed_before + t0.elapsed().as_secs_f64() >= m.as_secs_f64());
            if let Some(comm) = &self.comm {
                // One rank's signal or clock stops them all at this step.
                let flags = [
                    f64::from(u8::from(interrupted)),
                    f64::from(u8::from(time_up)),
                ];
                let any = comm.all_reduce_sum(&Tensor::new(&flags, &device)?)?;
                let any = any.to_vec1::<f64>()?;
                (interrupted, time_up) = (any[0] > 0.0, any[1] > 0.0);
            }
            if interrupted {
                stop = StopReason::Interrupted;
            } else if time_up && step < cfg.steps {
                stop = StopReason::MaxTime;
            }
            let mut last = step == cfg.steps || interrupted || time_up;
            let mut improved = false;
            // An interrupted run still evaluates when this step's evaluation was due, so that
            // resuming gives the metrics, best checkpoint and early stop of a run straight
            // through (the signal only costs the wait for that evaluation); it adds none that
            // was not due.
            let scheduled =
                step == cfg.steps || (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every));
            let eval_due = scheduled || (last && !interrupted);
            if !eval.is_empty() && eval_due {
                last_eval = Self::evaluate(obj, eval)?;
                if let Some(comm) = &self.comm {
                    // Every rank evaluates the whole held-out split; rank 0's figures decide
                    // (best checkpoint, early stopping) on every rank, so they stop together.
                    let keys: Vec<String> = last_eval.keys().cloned().collect();
                    let mine: Vec<f64> = last_eval
                        .values()
                        .map(|v| if rank == 0 { *v } else { 0.0 })
                        .collect();
                    let theirs = comm.all_reduce_sum(&Tensor::new(mine.as_slice(), &device)?)?;
                    last_eval = keys.into_iter().zip(theirs.to_vec1::<f64>()?).collect();
                }
                let rec = EvalRecord {
                    step,
                    elapsed_secs: elapsed_before + t0.elapsed().as_secs_f64(),
                    metrics: &last_eval,
                };
                for cb in &mut self.callbacks {
                    cb.on_eval_end(&rec)?;
                }
                improved = cfg.monitor.update(&mut best, step, &last_eval);
                let patience = cfg.monitor.patience;
                // (An interruption at this step stops as the run straight through would.)
                if (!last || (interrupted && step < cfg.steps))
                    && patience > 0
                    && best
                        .as_ref()
                        .is_some_and(|b| b.evals_without_improvement >= patience)
                {
                    stop = StopReason::EarlyStopped;
                    last = true;
                }
            }
            let interval_due = cfg.save_interval.is_some_and(|i| last_save.elapsed() >= i);
            let save_due = last
                || improved
                || interval_due
                || (cfg.save_every > 0 && step.is_multiple_of(cfg.save_every));
            if save_due && rank == 0 {
                last_save = Instant::now();
                let state = TrainerState {
                    step,
                    data_cursor: cursor.clone(),
                    seed: cfg.seed,
                    last_eval: (!last_eval.is_empty()).then(|| last_eval.clone()),
                    elapsed_secs: elapsed_before + t0.elapsed().as_secs_f64(),
                    best: best.clone(),
                    loss_scale: scaler,
                };
                last_checkpoint = Some(checkpoint::save_with(
                    &self.run_dir,
                    obj.varmap(),
                    opt.as_ref(),
                    &state,
                    cfg.keep_last,
                    &cfg.checkpoint_extras,
                )?);
            }
            if last {
                break;
            }
        }
        for cb in &mut self.callbacks {
            cb.on_train_end()?;
        }
        Ok(FitSummary {
            steps: step,
            elapsed_secs: t0.elapsed().as_secs_f64(),
            units: units_total,
            final_eval: last_eval,
            last_checkpoint,
            stop,
            best,
        })
    }
}

#[cfg(test)]
mod tests {
    //! The engine on a boring objective: a linear layer fitting y = x . w* with a mean-squared
    //! loss. Nothing here is a real model.

    use super::*;
    use crate::objective::StepOutput;
    use candle_core::{Device, Tensor};
    use candle_nn::{Init, VarBuilder, VarMap};

    struct Boring {
        varmap: VarMap,
        w: Tensor,
    }

    /// A batch: rows of x (n, 4) and targets (n,).
    #[derive(Clone)]
    struct Batch {
        x: Vec<f32>,
        y: Vec<f32>,
    }

    impl Boring {
        fn new() -> Self {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let w = vb
                .get_with_hints((4, 1), "linear.weight", Init::Const(0.0))
                .unwrap();
            Boring { varmap, w }
        }
    }

    impl Objective for Boring {
        type Batch = Batch;
        fn step(&self, b: &Batch, _mode: Mode) -> candle_core::Result<StepOutput> {
            let n = b.y.len();
            let x = Tensor::from_slice(&b.x, (n, 4), &Device::Cpu)?;
            let y = Tensor::from_slice(&b.y, (n, 1), &Device::Cpu)?;
            let loss = (x.matmul(&self.w)? - y)?.sqr()?.mean_all()?;
            Ok(StepOutput {
                loss,
                weight: n as f64,
                units: n,
                metrics: BTreeMap::new(),
            })
        }
        fn varmap(&self) -> &VarMap {
            &self.varmap
        }
    }

    fn batch(seed: u64, n: usize) -> Batch {
        let w_star = [1.0f32, -2.0, 0.5, 3.0];
        let mut r = kindling_core::rng::rng(&[seed]);
        use rand::Rng;
        let x: Vec<f32> = (0..n * 4).map(|_| r.random_range(-1.0..1.0)).collect();
        let y = x
            .chunks(4)
            .map(|row| row.iter().zip(w_star).map(|(a, b)| a * b).sum())
            .collect();
        Batch { x, y }
    }

    fn weights(obj: &Boring) -> Vec<f32> {
        obj.w.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn fit(obj: &Boring, cfg: TrainConfig, data: Vec<Batch>, dir: &Path) -> FitSummary {
        let mut t = Trainer::new(cfg, dir);
        let opt = t.optimizer(obj).unwrap();
        let eval = vec![batch(999, 64)];
        t.fit(obj, &mut data.into_iter(), &eval, opt, None, &|_| {
            serde_json::Value::Null
        })
        .unwrap()
    }

    fn cfg(steps: u64, accum: u32) -> TrainConfig {
        TrainConfig {
            steps,
            grad_accum: accum,
            optimizer: OptimizerConfig {
                lr: 0.05,
                weight_decay: 0.0,
                ..Default::default()
            },
            max_grad_norm: Some(1.0),
            ..Default::default()
        }
    }

    #[test]
    fn the_boring_model_learns_its_weights() {
        let dir = tempfile::tempdir().unwrap();
        let obj = Boring::new();
        let data = (0..300).map(|i| batch(i, 32)).collect();
        let summary = fit(&obj, cfg(300, 1), data, dir.path());
        assert!(
            summary.final_eval["loss"] < 1e-3,
            "eval loss {:?}",
            summary.final_eval
        );
        let w = weights(&obj);
        for (got, want) in w.iter().zip([1.0, -2.0, 0.5, 3.0]) {
            assert!((got - want).abs() < 0.05, "{w:?}");
        }
        assert!(summary
            .last_checkpoint
            .unwrap()
            .join("optimizer.safetensors")
            .is_file());
    }

    /// Scaling by a power of two is exact in floating point, so a run with a loss scale that
    /// never overflows takes exactly the updates of a run without one.
    #[test]
    fn a_loss_scale_that_fits_changes_no_update() {
        let data: Vec<Batch> = (0..40).map(|i| batch(i, 16)).collect();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (Boring::new(), Boring::new());
        fit(&a, cfg(20, 2), data.clone(), d1.path());
        let mut scaled = cfg(20, 2);
        scaled.loss_scale = Some(1024.0);
        fit(&b, scaled, data, d2.path());
        assert_eq!(weights(&a), weights(&b));
    }

    /// An overflowing scale (2^140 times the loss is past f32's range) skips the update and
    /// halves, step after step, until the scaled gradients fit; then the run learns as usual.
    /// The scale is saved with the checkpoint.
    #[test]
    fn an_overflowing_loss_scale_skips_updates_and_halves_until_it_fits() {
        let start = 2f64.powi(140);
        let run = |steps: u64| {
            let dir = tempfile::tempdir().unwrap();
            let obj = Boring::new();
            let mut c = cfg(steps, 1);
            c.loss_scale = Some(start);
            let data = (0..steps).map(|i| batch(i, 32)).collect();
            let summary = fit(&obj, c, data, dir.path());
            let ckpt = summary.last_checkpoint.clone().unwrap();
            let state = checkpoint::read_verified_state(&ckpt).unwrap();
            (weights(&obj), state.loss_scale.unwrap().0, summary)
        };
        let (w, scale, _) = run(1);
        assert_eq!(w, vec![0.0; 4], "the overflowing update was applied");
        assert_eq!(scale, start / 2.0);
        let (w, scale, summary) = run(300);
        assert!(scale < 2f64.powi(128) && scale > 1.0, "scale {scale}");
        assert_eq!(scale.log2().fract(), 0.0, "halving keeps a power of two");
        assert!(
            summary.final_eval["loss"] < 1e-2,
            "{:?}",
            summary.final_eval
        );
        for (got, want) in w.iter().zip([1.0, -2.0, 0.5, 3.0]) {
            assert!((got - want).abs() < 0.1, "{w:?}");
        }
    }

    /// The boring model with every parameter held at the peak rate (`Objective::fixed_lr`).
    struct Fixed(Boring);

    impl Objective for Fixed {
        type Batch = Batch;
        fn step(&self, b: &Batch, mode: Mode) -> candle_core::Result<StepOutput> {
            self.0.step(b, mode)
        }
        fn varmap(&self) -> &VarMap {
            &self.0.varmap
        }
        fn fixed_lr(&self, name: &str) -> bool {
            name == "linear.weight"
        }
    }

    /// A parameter with a fixed rate ignores the schedule: under a linear decay it takes the
    /// updates of a constant schedule at the peak rate.
    #[test]
    fn a_fixed_lr_parameter_trains_at_the_peak_rate_whatever_the_schedule() {
        let data: Vec<Batch> = (0..30).map(|i| batch(i, 16)).collect();
        let run = |obj: &dyn Fn(&Path, TrainConfig) -> Vec<f32>, kind| {
            let dir = tempfile::tempdir().unwrap();
            let mut c = cfg(30, 1);
            c.schedule = Schedule {
                kind,
                warmup_steps: 0,
                ..Default::default()
            };
            obj(dir.path(), c)
        };
        let fixed = |dir: &Path, c: TrainConfig| {
            let obj = Fixed(Boring::new());
            let mut t = Trainer::new(c, dir);
            let opt = t.optimizer(&obj).unwrap();
            let eval = vec![batch(999, 8)];
            t.fit(
                &obj,
                &mut data.clone().into_iter(),
                &eval,
                opt,
                None,
                &|_| serde_json::Value::Null,
            )
            .unwrap();
            weights(&obj.0)
        };
        let plain = |dir: &Path, c: TrainConfig| {
            let obj = Boring::new();
            fit(&obj, c, data.clone(), dir);
            weights(&obj)
        };
        let held = run(&fixed, crate::ScheduleKind::Linear);
        let constant = run(&plain, crate::ScheduleKind::Constant);
        let decayed = run(&plain, crate::ScheduleKind::Linear);
        for (a, b) in held.iter().zip(&constant) {
            assert!((a - b).abs() < 1e-6, "{held:?} vs {constant:?}");
        }
        assert_ne!(held, decayed, "the decay would have changed the updates");
    }

    #[test]
    fn two_accumulated_half_batches_equal_one_full_batch() {
        let full: Vec<Batch> = (0..5).map(|i| batch(i, 16)).collect();
        let halves: Vec<Batch> = full
            .iter()
            .flat_map(|b| {
                [
                    Batch {
                        x: b.x[..32].to_vec(),
                        y: b.y[..8].to_vec(),
                    },
                    Batch {
                        x: b.x[32..].to_vec(),
                        y: b.y[8..].to_vec(),
                    },
                ]
            })
            .collect();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (Boring::new(), Boring::new());
        fit(&a, cfg(5, 1), full, d1.path());
        fit(&b, cfg(5, 2), halves, d2.path());
        for (x, y) in weights(&a).iter().zip(weights(&b)) {
            assert!(
                (x - y).abs() < 1e-6,
                "{:?} vs {:?}",
                weights(&a),
                weights(&b)
            );
        }
    }

    /// Trains `world` ranks in threads (an in-process group), each on the same batch stream
    /// with `accum` micro-batches per update; returns each rank's weights, final eval and
    /// whether it wrote a checkpoint.
    fn fit_parallel(
        world: usize,
        accum: u32,
        data: &[Batch],
    ) -> Vec<(Vec<f32>, BTreeMap<String, f64>, bool)> {
        use crate::distributed::LocalGroup;
        LocalGroup::run(world, |comm| {
            let dir = tempfile::tempdir().unwrap();
            let obj = Boring::new();
            let mut t = Trainer::new(cfg(5, accum), dir.path()).with_collective(comm);
            let opt = t.optimizer(&obj).unwrap();
            let eval = vec![batch(999, 64)];
            let s = t
                .fit(
                    &obj,
                    &mut data.to_vec().into_iter(),
                    &eval,
                    opt,
                    None,
                    &|_| serde_json::Value::Null,
                )
                .unwrap();
            (weights(&obj), s.final_eval, s.last_checkpoint.is_some())
        })
    }

    /// Data parallelism is gradient accumulation spread over processes: `world` ranks of
    /// `accum` micro-batches make the update one process makes with `world * accum`
    /// micro-batches, taken in the same order; every rank ends with the same weights and eval.
    /// Only rank 0 writes checkpoints.
    #[test]
    fn data_parallel_ranks_update_as_one_process_accumulating_their_batches() {
        let data: Vec<Batch> = (0..20).map(|i| batch(i, 8)).collect();
        for (world, accum) in [(2, 1), (2, 2), (4, 1)] {
            let single = Boring::new();
            let dir = tempfile::tempdir().unwrap();
            fit(
                &single,
                cfg(5, world as u32 * accum),
                data.clone(),
                dir.path(),
            );
            let ranks = fit_parallel(world, accum, &data);
            for (r, (w, eval, wrote)) in ranks.iter().enumerate() {
                // Equal up to the order of the sums (one rounding in the last place).
                let diff = w
                    .iter()
                    .zip(weights(&single))
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff < 1e-6,
                    "{world} ranks x {accum}: rank {r}'s weights differ by {diff}"
                );
                assert_eq!(w, &ranks[0].0, "rank {r}'s weights equal rank 0's");
                assert_eq!(eval, &ranks[0].1, "rank {r}'s final eval");
                assert_eq!(*wrote, r == 0, "rank {r} wrote a checkpoint: {wrote}");
            }
        }
    }

    #[test]
    fn with_skip_nonfinite_a_bad_batch_skips_one_update_and_the_run_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let obj = Boring::new();
        let mut data: Vec<Batch> = (0..200).map(|i| batch(i, 32)).collect();
        data[3].y[0] = f32::NAN;
        let mut c = cfg(200, 1);
        c.skip_nonfinite = true;
        let summary = fit(&obj, c, data, dir.path());
        assert_eq!(summary.steps, 200);
        assert!(
            summary.final_eval["loss"] < 1e-2,
            "{:?}",
            summary.final_eval
        );
        assert!(weights(&obj).iter().all(|w| w.is_finite()));
    }

    #[test]
    fn a_non_finite_loss_stops_the_run_naming_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let obj = Boring::new();
        let mut data: Vec<Batch> = (0..5).map(|i| batch(i, 8)).collect();
        data[3].y[0] = f32::NAN;
        let mut t = Trainer::new(cfg(5, 1), dir.path());
        let opt = t.optimizer(&obj).unwrap();
        let err = t
            .fit(&obj, &mut data.into_iter(), &[], opt, None, &|_| {
                serde_json::Value::Null
            })
            .unwrap_err();
        assert!(err.to_string().contains("step 4"), "{err}");
    }

    fn fit_with(
        obj: &Boring,
        cfg: TrainConfig,
        data: Vec<Batch>,
        dir: &Path,
        start: Option<TrainerState>,
    ) -> FitSummary {
        let mut t = Trainer::new(cfg, dir);
        let mut opt = t.optimizer(obj).unwrap();
        if let Some(s) = &start {
            let ckpt = checkpoint::checkpoint_dir(dir, s.step);
            checkpoint::load(&ckpt, &obj.varmap, Some(opt.as_mut()), &Device::Cpu).unwrap();
        }
        let eval = vec![batch(999, 64)];
        let skip = start.as_ref().map_or(0, |s| s.step as usize);
        t.fit(
            obj,
            &mut data.into_iter().skip(skip),
            &eval,
            opt,
            start,
            &|_| serde_json::Value::Null,
        )
        .unwrap()
    }

    #[test]
    fn max_time_stops_the_run_with_a_checkpoint_and_an_eval() {
        let dir = tempfile::tempdir().unwrap();
        let obj = Boring::new();
        let mut c = cfg(1_000_000, 1);
        c.max_time = Some(Duration::from_millis(200));
        let data = (0..1_000_000).map(|i| batch(i, 8));
        let mut t = Trainer::new(c, dir.path());
        let opt = t.optimizer(&obj).unwrap();
        let eval = vec![batch(999, 64)];
        let s = t
            .fit(&obj, &mut data.into_iter(), &eval, opt, None, &|_| {
                serde_json::Value::Null
            })
            .unwrap();
        assert_eq!(s.stop, StopReason::MaxTime);
        assert!(s.steps > 0 && s.steps < 1_000_000);
        assert!(s.final_eval.contains_key("loss"));
        let state = checkpoint::load_state(&s.last_checkpoint.unwrap()).unwrap();
        assert_eq!(state.step, s.steps);
        assert!(state.elapsed_secs >= 0.2);
    }

    #[test]
    fn early_stopping_ends_the_run_after_patience_evals_without_improvement() {
        let dir = tempfile::tempdir().unwrap();
        let obj = Boring::new();
        let mut c = cfg(100, 1);
        c.eval_every = 5;
        // The loss falls, so "bigger is better" never improves after the first eval.
        c.monitor = Monitor {
            metric: "loss".into(),
            goal: Goal::Max,
            patience: 3,
            min_delta: 0.0,
        };
        c.keep_last = 1;
        let data = (0..100).map(|i| batch(i, 16)).collect();
        let s = fit_with(&obj, c, data, dir.path(), None);
        assert_eq!(s.stop, StopReason::EarlyStopped);
        assert_eq!(
            s.steps, 20,
            "evals at 5 (best), 10, 15, 20 (third without improvement)"
        );
        let best = s.best.unwrap();
        assert_eq!((best.step, best.evals_without_improvement), (5, 3));
        // The best checkpoint is kept beside the newest one.
        let kept: Vec<_> = checkpoint::list(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(kept, ["step-00000005", "step-00000020"]);
    }

    /// Raises the stop flag at the end of step `at`, as a signal arriving during that step.
    struct SignalAt {
        at: u64,
        flag: Arc<AtomicBool>,
    }

    impl crate::Callback for SignalAt {
        fn on_step_end(&mut self, rec: &StepRecord) -> Result<()> {
            if rec.step == self.at {
                self.flag.store(true, Ordering::SeqCst);
            }
            Ok(())
        }
    }

    /// Every eval's (step, loss) a run reports, in order.
    struct Evals(Arc<std::sync::Mutex<Vec<(u64, f64)>>>);

    impl crate::Callback for Evals {
        fn on_eval_end(&mut self, rec: &EvalRecord) -> Result<()> {
            self.0.lock().unwrap().push((rec.step, rec.metrics["loss"]));
            Ok(())
        }
    }

    #[test]
    fn an_interrupt_at_an_eval_step_evaluates_then_resumes_as_a_run_straight_through() {
        let data: Vec<Batch> = (0..20).map(|i| batch(i, 16)).collect();
        let mut c = cfg(20, 1);
        c.eval_every = 5;
        c.keep_last = 10;
        c.monitor = Monitor {
            metric: "loss".into(),
            goal: Goal::Min,
            patience: 0,
            min_delta: 0.0,
        };
        let run = |start: Option<TrainerState>, signal_at: Option<u64>, dir: &Path| {
            let obj = Boring::new();
            let evals = Arc::new(std::sync::Mutex::new(Vec::new()));
            let flag = Arc::new(AtomicBool::new(false));
            let mut t = Trainer::new(c.clone(), dir)
                .with_callback(Evals(evals.clone()))
                .with_stop_flag(flag.clone());
            if let Some(at) = signal_at {
                t = t.with_callback(SignalAt {
                    at,
                    flag: flag.clone(),
                });
            }
            let mut opt = t.optimizer(&obj).unwrap();
            if let Some(s) = &start {
                let ckpt = checkpoint::checkpoint_dir(dir, s.step);
                checkpoint::load(&ckpt, &obj.varmap, Some(opt.as_mut()), &Device::Cpu).unwrap();
            }
            let skip = start.as_ref().map_or(0, |s| s.step as usize);
            let eval = vec![batch(999, 64)];
            let s = t
                .fit(
                    &obj,
                    &mut data.clone().into_iter().skip(skip),
                    &eval,
                    opt,
                    start,
                    &|_| serde_json::Value::Null,
                )
                .unwrap();
            let evals = evals.lock().unwrap().clone();
            (s, evals, weights(&obj))
        };
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (straight, straight_evals, straight_w) = run(None, None, d1.path());

        // Interrupted at step 10, where an evaluation is due: it still happens.
        let (cut, cut_evals, _) = run(None, Some(10), d2.path());
        assert_eq!(cut.stop, StopReason::Interrupted);
        assert_eq!(cut.steps, 10);
        assert_eq!(
            cut_evals,
            straight_evals[..2],
            "the evals at 5 and 10, none skipped"
        );
        let state = checkpoint::load_state(&cut.last_checkpoint.unwrap()).unwrap();
        assert_eq!(state.last_eval.as_ref().unwrap()["loss"], cut_evals[1].1);
        let (resumed, resumed_evals, resumed_w) = run(Some(state), None, d2.path());
        assert_eq!(
            resumed_evals,
            straight_evals[2..],
            "15 and 20 as straight through"
        );
        assert_eq!(resumed_w, straight_w);
        assert_eq!(
            resumed.best.map(|b| (b.step, b.value)),
            straight.best.map(|b| (b.step, b.value))
        );

        // Interrupted at step 7, between evaluations: none is added.
        let d3 = tempfile::tempdir().unwrap();
        let (_, evals, _) = run(None, Some(7), d3.path());
        assert_eq!(evals, straight_evals[..1]);
    }

    #[test]
    fn resuming_from_a_checkpoint_gives_the_same_weights_as_running_straight_through() {
        let data: Vec<Batch> = (0..12).map(|i| batch(i, 16)).collect();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let straight = Boring::new();
        fit_with(&straight, cfg(12, 1), data.clone(), d1.path(), None);

        // A run of the same length that keeps its step-5 checkpoint.
        let mut c = cfg(12, 1);
        c.save_every = 5;
        c.keep_last = 10;
        let first = Boring::new();
        fit_with(&first, c, data.clone(), d2.path(), None);
        let state = checkpoint::load_state(&checkpoint::checkpoint_dir(d2.path(), 5)).unwrap();
        let resumed = Boring::new(); // fresh weights: the checkpoint must restore everything
        fit_with(&resumed, cfg(12, 1), data, d2.path(), Some(state));
        assert_eq!(weights(&resumed), weights(&straight));
    }
}
