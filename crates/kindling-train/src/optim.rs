//! AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay, per-parameter decay groups,
//! and state that can be saved: candle_nn's AdamW keeps its moments private, so a run using it
//! cannot resume exactly.

use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::Result;

/// `[train.optimizer]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to parameters the objective does not exempt.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // HF TrainingArguments' defaults, with BERT's customary weight decay.
        AdamWConfig {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a fixed, named set of parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Updates applied so far (the bias-correction exponent).
    pub t: u64,
}

impl AdamW {
    /// `params`: (name, var, apply weight decay).
    pub fn new(cfg: AdamWConfig, params: Vec<(String, Var, bool)>) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var, decay)| {
                let m = var.zeros_like()?;
                let v = var.zeros_like()?;
                Ok(Slot {
                    name,
                    var,
                    decay,
                    m,
                    v,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW { cfg, slots, t: 0 })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Applies one update with learning rate `lr`. Parameters without a gradient are skipped
    /// (their moments are not advanced), as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&s.v / bc2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&s.m / bc1)? / denom)?;
            let theta = s.var.as_tensor().detach();
            let theta = if s.decay && self.cfg.weight_decay > 0.0 {
                (theta * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                theta
            };
            s.var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`), for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("exp_avg.{}", s.name), s.m.clone()),
                    (format!("exp_avg_sq.{}", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by [`AdamW::state_tensors`]; every parameter must be present.
    pub fn load_state(
        &mut self,
        t: u64,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> std::result::Result<(), String> {
        for s in &mut self.slots {
            let m = get(&format!("exp_avg.{}", s.name))
                .ok_or_else(|| format!("missing exp_avg.{}", s.name))?;
            let v = get(&format!("exp_avg_sq.{}", s.name))
                .ok_or_else(|| format!("missing exp_avg_sq.{}", s.name))?;
            if m.shape() != s.var.shape() || v.shape() != s.var.shape() {
                return Err(format!(
                    "moment shapes of {} do not match the parameter",
                    s.name
                ));
            }
            s.m = m;
            s.v = v;
        }
        self.t = t;
        Ok(())
    }
}

/// Global L2 norm of the gradients of `vars`.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}

/// Scales every gradient of `vars` by `factor` in place (gradient clipping).
pub fn scale_grads(grads: &mut GradStore, vars: &[Var], factor: f64) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * factor)?);
        }
    }
    Ok(())
}
