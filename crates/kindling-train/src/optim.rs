//! Optimisers whose state can be saved (candle_nn's AdamW keeps its moments private and its SGD
//! has no momentum, so a run using them cannot resume exactly): AdamW (Loshchilov & Hutter,
//! 2019) with decoupled weight decay, SGD with (Nesterov) momentum as PyTorch defines it, and
//! LARS (You et al., 2017) as the vision SSL papers use it (SimCLR, BYOL, Barlow Twins); Muon
//! for hidden matrices is in `muon.rs`.

use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// Which update rule `[train.optimizer]` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    AdamW,
    Sgd,
    Lars,
    /// Muon on the hidden weight matrices, AdamW on the rest (`muon.rs`).
    Muon,
}

/// `[train.optimizer]`: one flat table for every kind, as a recipe writes it
/// (`optimizer = { kind = "lars", lr = 0.3, momentum = 0.9, weight_decay = 1e-6 }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    /// AdamW's moment decay rates and epsilon.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// AdamW: decoupled weight decay. SGD, LARS: L2 added to the gradient (PyTorch's
    /// `weight_decay`). Applied to the parameters the objective does not exempt.
    pub weight_decay: f64,
    /// SGD, LARS: momentum of the update buffer, and whether to use Nesterov's form.
    pub momentum: f64,
    pub nesterov: bool,
    /// LARS: the trust coefficient eta; a parameter's rate is scaled by
    /// `eta * |w| / (|g| + weight_decay * |w|)`. Exempt parameters (biases, norms) are not scaled.
    pub trust_coefficient: f64,
    /// Muon: parameters whose names contain one of these stay on AdamW even when they are
    /// matrices (embeddings are looked up, not multiplied; output heads as Muon's authors advise).
    /// Muon also takes `momentum` (0.95 in its paper) and `nesterov`.
    pub muon_skip: Vec<String>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        // HF TrainingArguments' defaults, with BERT's customary weight decay; the SGD/LARS
        // momentum and eta are the SimCLR/solo-learn values.
        OptimizerConfig {
            kind: OptimizerKind::AdamW,
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            momentum: 0.9,
            nesterov: false,
            trust_coefficient: 0.02,
            muon_skip: vec!["embeddings".into(), "classifier".into(), "decoder".into()],
        }
    }
}

/// An update rule with state that goes into checkpoints.
pub trait Optimizer {
    /// Applies one update with learning rate `lr` to every parameter that has a gradient.
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()>;
    /// Updates applied so far.
    fn steps_done(&self) -> u64;
    /// The state as named tensors, for checkpoints.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Restores state saved by `state_tensors` after `t` updates; every parameter must be present.
    fn load_state(
        &mut self,
        t: u64,
        get: &mut dyn FnMut(&str) -> Option<Tensor>,
    ) -> std::result::Result<(), String>;
    /// Sets each parameter's learning-rate multiplier from its name (layer-wise lr decay). Not
    /// saved: the recipe sets it again on resume.
    fn set_lr_scales(&mut self, scale: &dyn Fn(&str) -> f64);
}

impl OptimizerConfig {
    /// Builds the optimiser over `params`: (name, var, apply weight decay / LARS adaptation).
    pub fn build(&self, params: Vec<(String, Var, bool)>) -> Result<Box<dyn Optimizer>> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(TrainError::Config {
                key: "train.optimizer.lr",
                msg: format!("must be a finite rate >= 0, got {}", self.lr),
            });
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(TrainError::Config {
                key: "train.optimizer.momentum",
                msg: format!("must be in [0, 1), got {}", self.momentum),
            });
        }
        Ok(match self.kind {
            OptimizerKind::AdamW => Box::new(AdamW::new(self.clone(), params)?),
            OptimizerKind::Sgd | OptimizerKind::Lars => Box::new(Sgd::new(self.clone(), params)?),
            OptimizerKind::Muon => Box::new(crate::muon::Muon::new(self.clone(), params)?),
        })
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
    /// Multiplies the schedule's rate for this parameter (layer-wise lr decay); 1 by default.
    lr_scale: f64,
}

/// AdamW over a fixed, named set of parameters.
pub struct AdamW {
    cfg: OptimizerConfig,
    slots: Vec<Slot>,
    /// Updates applied so far (the bias-correction exponent).
    pub t: u64,
}

impl AdamW {
    /// `params`: (name, var, apply weight decay).
    pub fn new(cfg: OptimizerConfig, params: Vec<(String, Var, bool)>) -> Result<Self> {
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
                    lr_scale: 1.0,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW { cfg, slots, t: 0 })
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }
}

impl Optimizer for AdamW {
    fn steps_done(&self) -> u64 {
        self.t
    }

    fn set_lr_scales(&mut self, scale: &dyn Fn(&str) -> f64) {
        for s in &mut self.slots {
            s.lr_scale = scale(&s.name);
        }
    }

    /// Parameters without a gradient are skipped (their moments are not advanced), as PyTorch
    /// does.
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        // CUDA tensors: (slot, gradient, lr, decay), for one multi-tensor launch.
        #[cfg(feature = "cuda")]
        let mut on_gpu: Vec<(usize, Tensor, f32, f32)> = Vec::new();
        for (k, s) in self.slots.iter_mut().enumerate() {
            #[cfg(not(feature = "cuda"))]
            let _ = k;
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let lr = lr * s.lr_scale;
            let lr_decay = if s.decay {
                1.0 - lr * self.cfg.weight_decay
            } else {
                1.0
            };
            #[cfg(feature = "cuda")]
            if s.var.device().is_cuda()
                && s.var.dtype() == candle_core::DType::F32
                && g.dtype() == candle_core::DType::F32
                && s.m.is_contiguous()
                && s.v.is_contiguous()
                && s.var.as_tensor().is_contiguous()
            {
                // Updated below, with every other CUDA tensor, in one kernel launch.
                on_gpu.push((k, g.contiguous()?, lr as f32, lr_decay as f32));
                continue;
            }
            if fused::applies(s.var.as_tensor()) {
                // Three in-place passes instead of about a dozen allocating tensor ops.
                let g = g.contiguous()?;
                s.m.inplace_op2(
                    &g,
                    &fused::Moment {
                        beta: b1 as f32,
                        square: false,
                    },
                )?;
                s.v.inplace_op2(
                    &g,
                    &fused::Moment {
                        beta: b2 as f32,
                        square: true,
                    },
                )?;
                let update = fused::Update {
                    lr: lr as f32,
                    decay: lr_decay as f32,
                    bc1: bc1 as f32,
                    bc2: bc2 as f32,
                    eps: self.cfg.eps as f32,
                };
                s.var.as_tensor().inplace_op3(&s.m, &s.v, &update)?;
                continue;
            }
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&s.v / bc2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&s.m / bc1)? / denom)?;
            let theta = s.var.as_tensor().detach();
            let theta = if lr_decay != 1.0 {
                (theta * lr_decay)?
            } else {
                theta
            };
            s.var.set(&(theta - (update * lr)?)?)?;
        }
        #[cfg(feature = "cuda")]
        if !on_gpu.is_empty() {
            // `kindling-kernels`' adamw_multi: one pass over theta, m, v and g per chunk, the
            // CPU's formula, one launch for all tensors (202 for BERT-base) in place of about a
            // dozen allocating ops per tensor.
            let slots: Vec<kindling_kernels::AdamWSlot> = on_gpu
                .iter()
                .map(|(k, g, lr, decay)| kindling_kernels::AdamWSlot {
                    theta: self.slots[*k].var.as_tensor(),
                    m: &self.slots[*k].m,
                    v: &self.slots[*k].v,
                    g,
                    lr: *lr,
                    decay: *decay,
                })
                .collect();
            let shared = kindling_kernels::AdamWStep {
                beta1: b1 as f32,
                beta2: b2 as f32,
                lr: 0.0,
                decay: 1.0,
                bc1: bc1 as f32,
                bc2: bc2 as f32,
                eps: self.cfg.eps as f32,
            };
            kindling_kernels::adamw_multi(&slots, shared)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`), PyTorch's names.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
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

    fn load_state(
        &mut self,
        t: u64,
        get: &mut dyn FnMut(&str) -> Option<Tensor>,
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

/// SGD with momentum (PyTorch's rule: `b = momentum * b + g`, step `b`, or `g + momentum * b`
/// with Nesterov), with L2 weight decay added to the gradient; with `kind = "lars"` each
/// non-exempt parameter's step is first scaled by its trust ratio (You et al., 2017, in the form
/// solo-learn and the BYOL/Barlow Twins code use; biases and norms are neither decayed nor scaled).
pub struct Sgd {
    cfg: OptimizerConfig,
    slots: Vec<SgdSlot>,
    t: u64,
}

struct SgdSlot {
    name: String,
    var: Var,
    /// Weight decay and (LARS) adaptation apply.
    decay: bool,
    buf: Option<Tensor>,
    lr_scale: f64,
}

impl Sgd {
    pub fn new(cfg: OptimizerConfig, params: Vec<(String, Var, bool)>) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var, decay)| SgdSlot {
                name,
                var,
                decay,
                buf: None,
                lr_scale: 1.0,
            })
            .collect();
        Ok(Sgd { cfg, slots, t: 0 })
    }
}

impl Optimizer for Sgd {
    fn steps_done(&self) -> u64 {
        self.t
    }

    fn set_lr_scales(&mut self, scale: &dyn Fn(&str) -> f64) {
        for s in &mut self.slots {
            s.lr_scale = scale(&s.name);
        }
    }

    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let theta = s.var.as_tensor().detach();
            let mut g = g.detach();
            if s.decay && c.weight_decay != 0.0 {
                g = (g + (&theta * c.weight_decay)?)?;
            }
            if c.kind == OptimizerKind::Lars && s.decay {
                // |g| here already includes the decay term, which is the denominator LARS uses.
                let (w_norm, g_norm) = (sq_norm(&theta)?.sqrt(), sq_norm(&g)?.sqrt());
                if w_norm > 0.0 && g_norm > 0.0 {
                    g = (g * (c.trust_coefficient * w_norm / g_norm))?;
                }
            }
            let d = if c.momentum > 0.0 {
                let buf = match &s.buf {
                    Some(b) => ((b * c.momentum)? + &g)?,
                    None => g.clone(),
                };
                let d = if c.nesterov {
                    (&g + (&buf * c.momentum)?)?
                } else {
                    buf.clone()
                };
                s.buf = Some(buf);
                d
            } else {
                g
            };
            s.var.set(&(theta - (d * (lr * s.lr_scale))?)?)?;
        }
        Ok(())
    }

    /// The momentum buffers (`momentum_buffer.NAME`, PyTorch's name); a parameter that never
    /// had a gradient has none yet and is saved as zeros (the same update follows).
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .filter_map(|s| {
                let b = match &s.buf {
                    Some(b) => b.clone(),
                    None => s.var.as_tensor().zeros_like().ok()?,
                };
                Some((format!("momentum_buffer.{}", s.name), b))
            })
            .collect()
    }

    fn load_state(
        &mut self,
        t: u64,
        get: &mut dyn FnMut(&str) -> Option<Tensor>,
    ) -> std::result::Result<(), String> {
        for s in &mut self.slots {
            let b = get(&format!("momentum_buffer.{}", s.name))
                .ok_or_else(|| format!("missing momentum_buffer.{}", s.name))?;
            if b.shape() != s.var.shape() {
                return Err(format!(
                    "momentum buffer shape of {} does not match the parameter",
                    s.name
                ));
            }
            // A zero buffer and no buffer give the same next update (b = 0 * m + g).
            s.buf = Some(b);
        }
        self.t = t;
        Ok(())
    }
}

/// The AdamW update as in-place CPU kernels over contiguous f32 storage.
mod fused {
    use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
    use rayon::prelude::*;

    const CHUNK: usize = 32_768;

    pub fn applies(t: &Tensor) -> bool {
        matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && t.is_contiguous()
    }

    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: not contiguous".into()))?;
        Ok(&s.as_slice::<f32>()?[a..b])
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: not contiguous".into()))?;
        match s {
            CpuStorage::F32(v) => Ok(&mut v[a..b]),
            _ => Err(candle_core::Error::Msg("adamw: f32 only".into())),
        }
    }

    /// m <- beta * m + (1 - beta) * g   (or g^2 for the second moment).
    pub struct Moment {
        pub beta: f32,
        pub square: bool,
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "kindling-adamw-moment"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let g = slice(s2, l2)?;
            let m = slice_mut(s1, l1)?;
            let (b, c) = (self.beta, 1.0 - self.beta);
            m.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(m, g)| {
                    for (mv, &gv) in m.iter_mut().zip(g) {
                        let x = if self.square { gv * gv } else { gv };
                        *mv = b * *mv + c * x;
                    }
                });
            Ok(())
        }
    }

    /// theta <- decay * theta - lr * (m / bc1) / (sqrt(v / bc2) + eps)
    pub struct Update {
        pub lr: f32,
        pub decay: f32,
        pub bc1: f32,
        pub bc2: f32,
        pub eps: f32,
    }

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "kindling-adamw-update"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            let (m, v) = (slice(s2, l2)?, slice(s3, l3)?);
            let theta = slice_mut(s1, l1)?;
            theta
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .for_each(|(t, (m, v))| {
                    for ((tv, &mv), &vv) in t.iter_mut().zip(m).zip(v) {
                        let update = (mv / self.bc1) / ((vv / self.bc2).sqrt() + self.eps);
                        *tv = self.decay * *tv - self.lr * update;
                    }
                });
            Ok(())
        }
    }
}

/// Sum of squares of a tensor's elements, in f64.
fn sq_norm(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
}

/// Global L2 norm of the gradients of `vars`. Each tensor's sum of squares is added in f64 on
/// the gradients' device and read back once: on a GPU, a read per tensor would wait for the
/// device a few hundred times per step.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    {
        // On a GPU, one kernel launch over every gradient (`kindling-kernels`' multi-tensor
        // sum of squares) where they are all contiguous f32 CUDA tensors.
        let gs: Vec<&Tensor> = vars
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()))
            .collect();
        let kernel = |t: &&Tensor| {
            t.device().is_cuda() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
        };
        if !gs.is_empty() && gs.iter().all(kernel) {
            return Ok(kindling_kernels::sum_of_squares(&gs)?.sqrt());
        }
    }
    let mut sq: Option<Tensor> = None;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let s = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?;
            sq = Some(match sq {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
    }
    Ok(match sq {
        Some(t) => t.to_scalar::<f64>()?.sqrt(),
        None => 0.0,
    })
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A `rows x cols` f32 matrix of seeded uniform values in [-1, 1) (the optimiser tests'
    /// parameters and targets).
    pub(crate) fn uniform(rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::Rng;
        let mut r = kindling_core::rng::rng(&[seed]);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| r.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn setup(device_f64: bool) -> (AdamW, Var, Tensor) {
        let dtype = if device_f64 {
            candle_core::DType::F64
        } else {
            candle_core::DType::F32
        };
        let var = Var::from_tensor(&uniform(20, 30, 5).to_dtype(dtype).unwrap()).unwrap();
        let cfg = OptimizerConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        };
        let opt = AdamW::new(cfg, vec![("w".into(), var.clone(), true)]).unwrap();
        let target = Tensor::ones((20, 30), dtype, &Device::Cpu).unwrap();
        (opt, var, target)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn fused_adamw_matches_the_tensor_op_path() {
        // The f64 parameter takes the tensor-op path, the f32 one the fused kernels.
        let (mut fast, wf, tf) = setup(false);
        let (mut slow, ws, ts) = setup(true);
        for step in 0..5 {
            for (opt, w, t) in [(&mut fast, &wf, &tf), (&mut slow, &ws, &ts)] {
                let loss = (w.as_tensor() - t)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                opt.step(&grads, 1e-2 * (step + 1) as f64).unwrap();
            }
        }
        let a = wf.as_tensor().to_dtype(candle_core::DType::F64).unwrap();
        let d = max_abs_diff(&a, ws.as_tensor());
        assert!(d < 1e-5, "max diff {d}");
        let moved = max_abs_diff(ws.as_tensor(), setup(true).1.as_tensor());
        assert!(moved > 1e-2, "the parameters moved");
    }

    /// One scalar parameter w = 2 minimising (w - 0)^2 / 2 (gradient w), by hand.
    fn sgd_on_scalar(cfg: OptimizerConfig, steps: usize) -> Vec<f64> {
        let var = Var::from_tensor(&Tensor::new(&[2f64], &Device::Cpu).unwrap()).unwrap();
        let mut opt = cfg.build(vec![("w".into(), var.clone(), true)]).unwrap();
        (0..steps)
            .map(|_| {
                let loss = (var.as_tensor().sqr().unwrap() * 0.5)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                opt.step(&loss.backward().unwrap(), 0.1).unwrap();
                var.as_tensor().to_vec1::<f64>().unwrap()[0]
            })
            .collect()
    }

    #[test]
    fn sgd_momentum_follows_pytorch_rule() {
        let cfg = OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 0.0,
            ..Default::default()
        };
        let w = sgd_on_scalar(cfg, 2);
        // b1 = g0 = 2, w1 = 2 - 0.1*2 = 1.8; b2 = 0.9*2 + 1.8 = 3.6, w2 = 1.8 - 0.36 = 1.44.
        assert!(
            (w[0] - 1.8).abs() < 1e-12 && (w[1] - 1.44).abs() < 1e-12,
            "{w:?}"
        );
        let nesterov = OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
            ..Default::default()
        };
        // step 1: d = g + 0.9 * b = 2 + 1.8 = 3.8, w1 = 2 - 0.38 = 1.62.
        assert!((sgd_on_scalar(nesterov, 1)[0] - 1.62).abs() < 1e-12);
    }

    #[test]
    fn lars_scales_each_step_by_the_trust_ratio() {
        // g = w + wd*w; trust = eta*|w|/|g| so the step is eta*|w|*lr whatever the gradient size.
        let cfg = OptimizerConfig {
            kind: OptimizerKind::Lars,
            momentum: 0.0,
            weight_decay: 0.5,
            trust_coefficient: 0.01,
            ..Default::default()
        };
        let w = sgd_on_scalar(cfg, 1);
        assert!((w[0] - (2.0 - 0.1 * 0.01 * 2.0)).abs() < 1e-12, "{w:?}");
    }

    #[test]
    fn sgd_state_round_trips() {
        let make = || {
            let var = Var::from_tensor(&Tensor::new(&[2f64, -1.0], &Device::Cpu).unwrap()).unwrap();
            let cfg = OptimizerConfig {
                kind: OptimizerKind::Sgd,
                ..Default::default()
            };
            (
                cfg.build(vec![("w".into(), var.clone(), true)]).unwrap(),
                var,
            )
        };
        let step = |opt: &mut Box<dyn Optimizer>, var: &Var| {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        };
        let (mut a, va) = make();
        step(&mut a, &va);
        let saved: std::collections::HashMap<String, Tensor> =
            a.state_tensors().into_iter().collect();
        let (mut b, vb) = make();
        vb.set(va.as_tensor()).unwrap();
        b.load_state(a.steps_done(), &mut |n| saved.get(n).cloned())
            .unwrap();
        step(&mut a, &va);
        step(&mut b, &vb);
        assert_eq!(
            va.as_tensor().to_vec1::<f64>().unwrap(),
            vb.as_tensor().to_vec1::<f64>().unwrap()
        );
        assert!(b.load_state(1, &mut |_| None).is_err());
    }
}
