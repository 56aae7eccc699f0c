//! Optional behaviour hooked into the loop: progress display, the metrics log, plots.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::plot::{draw_loss_plot, draw_metrics_plot, Curve};
use crate::{io_err, Result};

/// What the trainer reports after each optimiser update.
#[derive(Debug, Clone)]
pub struct StepRecord<'a> {
    /// Updates done so far (1 after the first).
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (or samples) processed in this update, over all micro-batches.
    pub units: usize,
    pub step_secs: f64,
    pub elapsed_secs: f64,
    /// Achieved matmul GFLOP/s, when the objective counts its FLOPs.
    pub gflops_per_s: Option<f64>,
    pub metrics: &'a BTreeMap<String, f64>,
}

/// What the trainer reports after each evaluation.
#[derive(Debug, Clone)]
pub struct EvalRecord<'a> {
    pub step: u64,
    pub elapsed_secs: f64,
    /// Averaged over the eval split; always holds `loss`.
    pub metrics: &'a BTreeMap<String, f64>,
}

/// A hook into the training loop. Every method has a default that does nothing.
pub trait Callback {
    fn on_train_start(&mut self, _start_step: u64, _total_steps: u64) -> Result<()> {
        Ok(())
    }
    fn on_step_end(&mut self, _rec: &StepRecord) -> Result<()> {
        Ok(())
    }
    fn on_eval_end(&mut self, _rec: &EvalRecord) -> Result<()> {
        Ok(())
    }
    fn on_train_end(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The progress bar: step, loss, lr, throughput, ETA. Without a terminal (CI, a log file) it
/// prints a line every `log_every` steps instead.
pub struct ProgressCallback {
    bar: Option<ProgressBar>,
    log_every: u64,
    unit: &'static str,
    smoothed: Option<f64>,
}

impl ProgressCallback {
    pub fn new(log_every: u64, unit: &'static str) -> Self {
        ProgressCallback {
            bar: None,
            log_every: log_every.max(1),
            unit,
            smoothed: None,
        }
    }

    fn say(&self, line: String) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

impl Callback for ProgressCallback {
    fn on_train_start(&mut self, start: u64, total: u64) -> Result<()> {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_position(start);
        self.bar = Some(bar);
        Ok(())
    }

    fn on_step_end(&mut self, r: &StepRecord) -> Result<()> {
        // An exponential moving average makes the displayed loss readable.
        let s = match self.smoothed {
            Some(s) => 0.9 * s + 0.1 * r.loss,
            None => r.loss,
        };
        self.smoothed = Some(s);
        let rate = r.units as f64 / r.step_secs.max(1e-9);
        let mut msg = format!(
            "loss {s:.4} lr {:.2e} {} {}/s",
            r.lr,
            human(rate),
            self.unit
        );
        if let Some(g) = r.gflops_per_s {
            msg.push_str(&format!(" {g:.1} GFLOP/s"));
        }
        if let Some(b) = &self.bar {
            b.set_position(r.step);
            b.set_message(msg.clone());
            if b.is_hidden() && (r.step.is_multiple_of(self.log_every) || r.step == r.total_steps) {
                eprintln!(
                    "step {}/{} {msg} elapsed {:.0}s",
                    r.step, r.total_steps, r.elapsed_secs
                );
            }
        }
        Ok(())
    }

    fn on_eval_end(&mut self, r: &EvalRecord) -> Result<()> {
        let parts: Vec<String> = r
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        self.say(format!("eval @ step {}: {}", r.step, parts.join(", ")));
        Ok(())
    }

    fn on_train_end(&mut self) -> Result<()> {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
        Ok(())
    }
}

/// Appends one JSON object per line to `metrics.jsonl` (`{"split": "train"|"eval", "step", ...}`)
/// and the same numbers in long form to `metrics.csv` beside it (`split,step,elapsed_s,metric,
/// value`: one row per number, so any objective's metrics fit one header; a spreadsheet or
/// `pandas.pivot` reads it).
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    csv_path: PathBuf,
    csv: std::fs::File,
}

fn append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

/// Keeps the lines of a log whose step is at most `step` (a resumed run rewinds its log to its
/// checkpoint); written to a temporary file and renamed.
fn rewind(path: &Path, step: u64, step_of: impl Fn(&str) -> Option<u64>) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| step_of(l).is_none_or(|s| s <= step))
        .flat_map(|l| [l, "\n"])
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, kept).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

impl MetricsLog {
    /// Opens `path` (`metrics.jsonl`) and `metrics.csv` beside it for appending.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let csv_path = path.with_extension("csv");
        let new_csv = !csv_path.exists();
        let mut csv = append(&csv_path)?;
        if new_csv {
            writeln!(csv, "split,step,elapsed_s,metric,value").map_err(io_err(&csv_path))?;
        }
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file: append(path)?,
            csv_path,
            csv,
        })
    }

    /// Opens the logs of a run resumed at `step`, dropping records written after it.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        rewind(path, step, |l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
        })?;
        rewind(&path.with_extension("csv"), step, |l| {
            l.split(',').nth(1).and_then(|s| s.parse().ok())
        })?;
        Self::open(path)
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(io_err(&self.path))?;
        let (split, step, elapsed) = (&v["split"], &v["step"], &v["elapsed_s"]);
        let split = split.as_str().unwrap_or("");
        for (k, x) in v.as_object().into_iter().flatten() {
            if let (false, Some(x)) = (
                matches!(k.as_str(), "split" | "step" | "elapsed_s"),
                x.as_f64(),
            ) {
                writeln!(self.csv, "{split},{step},{elapsed},{k},{x}")
                    .map_err(io_err(&self.csv_path))?;
            }
        }
        Ok(())
    }
}

impl Callback for MetricsLog {
    fn on_step_end(&mut self, r: &StepRecord) -> Result<()> {
        let mut v = serde_json::json!({
            "split": "train", "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
            "units_per_s": r.units as f64 / r.step_secs.max(1e-9), "step_s": r.step_secs,
            "elapsed_s": r.elapsed_secs,
        });
        if let Some(g) = r.gflops_per_s {
            v["gflops_per_s"] = g.into();
        }
        for (k, m) in r.metrics {
            v[k] = (*m).into();
        }
        self.write(v)
    }

    fn on_eval_end(&mut self, r: &EvalRecord) -> Result<()> {
        let mut v =
            serde_json::json!({"split": "eval", "step": r.step, "elapsed_s": r.elapsed_secs});
        for (k, m) in r.metrics {
            v[k] = (*m).into();
        }
        self.write(v)
    }
}

/// Draws `plots/loss.png` (train and eval loss against step, reference lines, and the learning
/// rate below) at every evaluation and at the end.
pub struct PlotCallback {
    path: PathBuf,
    train: Vec<(f64, f64)>,
    eval: Vec<(f64, f64)>,
    lr: Vec<(f64, f64)>,
    references: Vec<(String, f64)>,
    /// A second plot of named eval metrics (accuracies, monitors): its path, and the series.
    metrics: Option<(PathBuf, Vec<(String, Vec<(f64, f64)>)>)>,
}

impl PlotCallback {
    /// `references`: horizontal lines, e.g. `("unigram baseline", 6.83)`.
    pub fn new(path: PathBuf, references: Vec<(String, f64)>) -> Self {
        PlotCallback {
            path,
            train: Vec::new(),
            eval: Vec::new(),
            lr: Vec::new(),
            references,
            metrics: None,
        }
    }

    /// Also draws the eval metrics `names` (those an evaluation reports) against step in `path`,
    /// e.g. `plots/eval_metrics.png` with accuracy and macro-F1.
    pub fn with_metric_plot(mut self, path: PathBuf, names: &[&str]) -> Self {
        let series = names.iter().map(|n| (n.to_string(), Vec::new())).collect();
        self.metrics = Some((path, series));
        self
    }

    /// Starts from the curves already in a `metrics.jsonl` (a resumed run plots its whole
    /// history). A missing log is an empty history.
    pub fn with_history(mut self, metrics_jsonl: &Path) -> Self {
        let text = std::fs::read_to_string(metrics_jsonl).unwrap_or_default();
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let (Some(step), Some(loss)) = (v["step"].as_f64(), v["loss"].as_f64()) else {
                continue;
            };
            if v["split"] == "eval" {
                self.eval.push((step, loss));
                if let Some((_, series)) = &mut self.metrics {
                    for (name, points) in series.iter_mut() {
                        if let Some(x) = v[name.as_str()].as_f64() {
                            points.push((step, x));
                        }
                    }
                }
            } else {
                self.train.push((step, loss));
                if let Some(lr) = v["lr"].as_f64() {
                    self.lr.push((step, lr));
                }
            }
        }
        self
    }

    fn draw(&self) -> Result<()> {
        // Per-step losses are noisy at small batches: draw them faint, with an exponential
        // moving average (weight 0.95 on the past, bias-corrected as Adam's moments are, so it
        // does not lag at the start) on top.
        let (mut num, mut den) = (0.0, 0.0);
        let smoothed = self
            .train
            .iter()
            .filter(|p| p.1.is_finite()) // a skipped update logs NaN
            .map(|&(x, y)| {
                num = 0.95 * num + 0.05 * y;
                den = 0.95 * den + 0.05;
                (x, num / den)
            })
            .collect();
        let curves = [
            Curve {
                label: "train loss".into(),
                points: self.train.clone(),
                faint: true,
            },
            Curve {
                label: "eval loss".into(),
                points: self.eval.clone(),
                faint: false,
            },
            Curve {
                label: "train loss (EMA)".into(),
                points: smoothed,
                faint: false,
            },
        ];
        draw_loss_plot(&self.path, &curves, &self.references, &self.lr)?;
        if let Some((path, series)) = &self.metrics {
            let curves: Vec<Curve> = series
                .iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(name, p)| Curve {
                    label: name.clone(),
                    points: p.clone(),
                    faint: false,
                })
                .collect();
            draw_metrics_plot(path, "evaluation", &curves)?;
        }
        Ok(())
    }
}

impl Callback for PlotCallback {
    fn on_step_end(&mut self, r: &StepRecord) -> Result<()> {
        self.train.push((r.step as f64, r.loss));
        self.lr.push((r.step as f64, r.lr));
        Ok(())
    }

    fn on_eval_end(&mut self, r: &EvalRecord) -> Result<()> {
        if let Some(l) = r.metrics.get("loss") {
            self.eval.push((r.step as f64, *l));
        }
        if let Some((_, series)) = &mut self.metrics {
            for (name, points) in series.iter_mut() {
                if let Some(x) = r.metrics.get(name.as_str()) {
                    points.push((r.step as f64, *x));
                }
            }
        }
        self.draw()
    }

    fn on_train_end(&mut self) -> Result<()> {
        self.draw()
    }
}
