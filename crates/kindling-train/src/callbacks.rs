//! Optional behaviour hooked into the loop: progress display, the metrics log, plots.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::plot::{draw_loss_plot, Curve};
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
            if b.is_hidden() && (r.step % self.log_every == 0 || r.step == r.total_steps) {
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

/// Appends one JSON object per line to `metrics.jsonl`: `{"split": "train"|"eval", "step", ...}`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending (a resumed run continues the same log).
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(io_err(&self.path))
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
        }
    }

    fn draw(&self) -> Result<()> {
        let curves = [
            Curve {
                label: "train loss".into(),
                points: self.train.clone(),
            },
            Curve {
                label: "eval loss".into(),
                points: self.eval.clone(),
            },
        ];
        draw_loss_plot(&self.path, &curves, &self.references, &self.lr)
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
        self.draw()
    }

    fn on_train_end(&mut self) -> Result<()> {
        self.draw()
    }
}
