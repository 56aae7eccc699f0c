//! DINO (Caron et al., 2021): self-distillation with no labels. A student (encoder, projector
//! MLP, l2 normalisation, a weight-normalised last layer) sees every view of an image, the
//! global crops and the small local ones; a teacher, the EMA of the student, sees the global
//! crops only. The student's softmax over `out_dim` prototypes regresses (cross-entropy) the
//! teacher's of every other view. Collapse is avoided by centring the teacher's logits (a
//! running mean over batches, `center_momentum`) and sharpening them (a low teacher
//! temperature, warmed up from `warmup_teacher_temperature`).
//!
//! ```text
//! views 0..global_views (large) + the rest (small) -> encoder -> projector MLP -> l2 -> last layer
//!   student: every view / student_temperature -> log-softmax
//!   teacher: global views -> (logits - center) / teacher_temperature(step) -> softmax (detached)
//!   loss: mean over (teacher view g, student view v != g) of H(teacher_g, student_v)
//! ```
//!
//! The centre and the count of updates (which sets the teacher temperature) are VarMap entries
//! the optimiser does not touch, so checkpoints carry them and resume is exact; the centre moves
//! after each update (`after_update`), as MoCo's queue does. Data parallel, every rank moves it
//! by the whole group's teacher logits, so the centres stay equal.
//!
//! The last layer is `dino.last_layer.weight` (the teacher's `target.dino.last_layer.weight`,
//! moved by the EMA with the rest of the target). With `norm_last_layer` its rows are
//! normalised in the forward pass, as DINO's weight norm with the gain fixed at 1; without it
//! the layer is a plain linear map (DINO's trainable gain is not modelled). For its first
//! `freeze_last_layer_steps` updates the student's last layer gets no gradient (DINO's
//! `cancel_gradients_last_layer`): the optimiser skips it, as PyTorch does a `None` gradient.

use std::sync::Mutex;

use candle_core::{Result, Tensor, Var, D};
use candle_nn::VarBuilder;

use serde::{Deserialize, Serialize};

use super::{l2_normalize, Outputs, SslLoss};

/// `[loss]` of a DINO recipe (the names of DINO's own arguments).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The prototypes of the last layer (DINO: 65536).
    pub out_dim: usize,
    pub student_temperature: f64,
    /// The teacher's temperature after the warmup.
    pub teacher_temperature: f64,
    /// The teacher's temperature at step 0, moved linearly to `teacher_temperature` over
    /// `warmup_teacher_temperature_steps` optimiser updates.
    pub warmup_teacher_temperature: f64,
    pub warmup_teacher_temperature_steps: u64,
    /// The centre's momentum: centre <- m centre + (1 - m) batch mean of the teacher's logits.
    pub center_momentum: f64,
    /// The first `global_views` views of `[[data.views]]` are the global crops the teacher
    /// sees; the rest are local crops (the student only).
    pub global_views: usize,
    /// Teacher momentum, raised from `ema_base` to `ema_final` on a cosine schedule.
    pub ema_base: f64,
    pub ema_final: f64,
    pub norm_last_layer: bool,
    pub freeze_last_layer_steps: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            out_dim: 65536,
            student_temperature: 0.1,
            teacher_temperature: 0.04,
            warmup_teacher_temperature: 0.04,
            warmup_teacher_temperature_steps: 0,
            center_momentum: 0.9,
            global_views: 2,
            ema_base: 0.996,
            ema_final: 1.0,
            norm_last_layer: true,
            freeze_last_layer_steps: 0,
        }
    }
}

impl Settings {
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.out_dim == 0 || self.out_dim > 1 << 20 {
            return Err((
                "out_dim",
                format!("must be between 1 and 2^20, got {}", self.out_dim),
            ));
        }
        super::positive("student_temperature", self.student_temperature)?;
        super::positive("teacher_temperature", self.teacher_temperature)?;
        super::positive(
            "warmup_teacher_temperature",
            self.warmup_teacher_temperature,
        )?;
        if !(0.0..=1.0).contains(&self.center_momentum) {
            return Err((
                "center_momentum",
                format!("must be in [0, 1], got {}", self.center_momentum),
            ));
        }
        if self.global_views == 0 {
            return Err(("global_views", "must be at least 1".into()));
        }
        super::momentum(self.ema_base, self.ema_final)
    }

    /// The teacher's temperature after `updates` optimiser updates: linear from the warmup
    /// value to the final one, then constant.
    pub fn teacher_temperature_at(&self, updates: u64) -> f64 {
        let w = self.warmup_teacher_temperature_steps;
        if updates >= w {
            return self.teacher_temperature;
        }
        let f = updates as f64 / w as f64;
        self.warmup_teacher_temperature
            + (self.teacher_temperature - self.warmup_teacher_temperature) * f
    }
}

pub struct Dino {
    s: Settings,
    /// (out_dim, bottleneck): the student's and the teacher's last layers.
    last_layer: Var,
    target_last_layer: Var,
    /// (1, out_dim) running mean of the teacher's logits.
    center: Var,
    /// Optimiser updates so far (one element): the teacher temperature's clock.
    updates: Var,
    /// The training steps' teacher logits since the last update: (row sum, rows).
    pending: Mutex<Option<(Tensor, usize)>>,
}

impl Dino {
    pub fn new(s: Settings, bottleneck: usize, vb: VarBuilder) -> Result<Self> {
        let zeros = candle_nn::Init::Const(0.0);
        let layer = |vb: VarBuilder| {
            vb.pp("dino").pp("last_layer").get_with_hints(
                (s.out_dim, bottleneck),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )
        };
        let last_layer = layer(vb.clone())?;
        let target_last_layer = layer(vb.pp("target"))?;
        let center = vb
            .pp("dino")
            .get_with_hints((1, s.out_dim), "center", zeros)?;
        let updates = vb.pp("dino").get_with_hints(1, "updates", zeros)?;
        Ok(Dino {
            s,
            last_layer: Var::from_tensor(&last_layer)?,
            target_last_layer: Var::from_tensor(&target_last_layer)?,
            center: Var::from_tensor(&center)?,
            updates: Var::from_tensor(&updates)?,
            pending: Mutex::new(None),
        })
    }

    /// The VarMap entries that are state, not parameters.
    pub fn is_state(name: &str) -> bool {
        name == "dino.center" || name == "dino.updates"
    }

    fn updates(&self) -> Result<u64> {
        Ok(self.updates.as_tensor().to_vec1::<f32>()?[0] as u64)
    }

    /// The last layer's logits of projections `z` (rows).
    fn logits(&self, z: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let w = if self.s.norm_last_layer {
            l2_normalize(weight)?
        } else {
            weight.clone()
        };
        l2_normalize(z)?.matmul(&w.t()?)
    }
}

impl SslLoss for Dino {
    fn target(&self) -> bool {
        true
    }

    fn target_views(&self) -> Option<usize> {
        Some(self.s.global_views)
    }

    fn is_state(&self, name: &str) -> bool {
        Dino::is_state(name)
    }

    fn loss(&self, o: &Outputs) -> Result<Tensor> {
        let teacher = o.t.as_ref().expect("DINO builds a teacher network");
        let updates = self.updates()?;
        let student_w = if o.train && updates < self.s.freeze_last_layer_steps {
            self.last_layer.as_tensor().detach()
        } else {
            self.last_layer.as_tensor().clone()
        };
        let target_w = self.target_last_layer.as_tensor().detach();
        // A copy: the centre is rewritten after the update, while this graph may live on.
        let center = self.center.as_tensor().copy()?.detach();
        let tt = self.s.teacher_temperature_at(updates);
        let teacher_logits = teacher
            .iter()
            .map(|t| self.logits(&t.detach(), &target_w))
            .collect::<Result<Vec<_>>>()?;
        let targets = teacher_logits
            .iter()
            .map(|l| candle_nn::ops::softmax_last_dim(&(l.broadcast_sub(&center)? / tt)?))
            .collect::<Result<Vec<_>>>()?;
        let log_student =
            o.z.iter()
                .map(|z| {
                    let l = (self.logits(z, &student_w)? / self.s.student_temperature)?;
                    candle_nn::ops::log_softmax(&l, D::Minus1)
                })
                .collect::<Result<Vec<_>>>()?;
        let mut terms = Vec::new();
        for (g, q) in targets.iter().enumerate() {
            for (v, log_p) in log_student.iter().enumerate() {
                if v != g {
                    terms.push((q * log_p)?.sum(D::Minus1)?.mean_all()?.neg()?);
                }
            }
        }
        if terms.is_empty() {
            candle_core::bail!("DINO needs at least two views (a global one and another)");
        }
        let n = terms.len() as f64;
        let loss = (Tensor::stack(&terms, 0)?.sum_all()? / n)?;
        if o.train {
            let all = Tensor::cat(&teacher_logits, 0)?;
            let mut rows = all.dim(0)?;
            let mut sum = all.sum_keepdim(0)?;
            if let Some(g) = &o.group {
                sum = g.all_reduce_sum(&sum)?;
                rows *= g.world();
            }
            let mut pending = self.pending.lock().expect("centre lock");
            *pending = Some(match pending.take() {
                Some((s, r)) => ((s + sum)?, r + rows),
                None => (sum, rows),
            });
        }
        Ok(loss)
    }

    fn after_update(&self) -> Result<()> {
        if let Some((sum, rows)) = self.pending.lock().expect("centre lock").take() {
            let m = self.s.center_momentum;
            let batch = (sum / rows as f64)?;
            let next = ((self.center.as_tensor() * m)? + (batch * (1.0 - m))?)?;
            self.center.set(&next)?;
        }
        let next = self.updates()? + 1;
        self.updates
            .set(&Tensor::new(&[next as f32], self.updates.device())?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn dino(s: Settings) -> (Dino, VarMap) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let d = Dino::new(s, 4, vb).unwrap();
        super::super::seeded_init(&varmap, 3).unwrap();
        // The teacher starts as the student.
        d.target_last_layer.set(d.last_layer.as_tensor()).unwrap();
        (d, varmap)
    }

    /// Fixed values in (-scale, scale).
    fn values(shape: (usize, usize), seed: u64, scale: f32) -> Tensor {
        let v = (0..shape.0 * shape.1)
            .map(|i| ((i as u64 * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
            .map(|x| x * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn center(d: &Dino) -> Vec<f32> {
        d.center
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn rows(n: usize, seed: u64) -> Tensor {
        values((n, 4), seed, 1.0)
    }

    fn outputs(z: Vec<Tensor>, t: Vec<Tensor>, train: bool) -> Outputs {
        Outputs {
            z,
            p: None,
            t: Some(t),
            train,
            group: None,
        }
    }

    /// The loss written out for two global and one local view: H(teacher_0, student_1),
    /// H(teacher_0, student_2), H(teacher_1, student_0), H(teacher_1, student_2), averaged,
    /// with the teacher centred and sharpened and the rows of the last layer normalised.
    #[test]
    fn the_loss_is_the_mean_cross_entropy_over_the_other_views() {
        let s = Settings {
            out_dim: 6,
            ..Default::default()
        };
        let (d, _) = dino(s);
        d.center.set(&values((1, 6), 9, 0.5)).unwrap();
        let z: Vec<Tensor> = (0..3).map(|i| rows(5, i)).collect();
        let t: Vec<Tensor> = (0..2).map(|i| rows(5, 10 + i)).collect();
        let got = d
            .loss(&outputs(z.clone(), t.clone(), false))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();

        let w: Vec<Vec<f32>> = d.last_layer.as_tensor().to_vec2().unwrap();
        let c = center(&d);
        let unit = |v: &[f32]| -> Vec<f32> {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter().map(|x| x / n).collect()
        };
        let logits = |x: &[f32]| -> Vec<f32> {
            let x = unit(x);
            w.iter()
                .map(|r| unit(r).iter().zip(&x).map(|(a, b)| a * b).sum())
                .collect()
        };
        let softmax = |l: Vec<f32>| -> Vec<f32> {
            let m = l.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = l.iter().map(|x| (x - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        let zs: Vec<Vec<Vec<f32>>> = z.iter().map(|t| t.to_vec2().unwrap()).collect();
        let ts: Vec<Vec<Vec<f32>>> = t.iter().map(|t| t.to_vec2().unwrap()).collect();
        let mut total = 0.0;
        for (g, tv) in ts.iter().enumerate() {
            for (_, zv) in zs.iter().enumerate().filter(|(v, _)| *v != g) {
                let mut h = 0.0;
                for (tr, zr) in tv.iter().zip(zv) {
                    let centred: Vec<f32> = logits(tr)
                        .iter()
                        .zip(&c)
                        .map(|(a, b)| (a - b) / 0.04)
                        .collect();
                    let q = softmax(centred);
                    let p = softmax(logits(zr).iter().map(|a| a / 0.1).collect());
                    h -= q.iter().zip(&p).map(|(q, p)| q * p.ln()).sum::<f32>();
                }
                total += h / 5.0;
            }
        }
        let want = total / 4.0;
        assert!((got - want).abs() < 1e-4 * want.abs(), "{got} vs {want}");
    }

    /// Only the student gets gradients (the teacher is detached); the centre moves by the
    /// training steps' teacher logits after the update and evaluation leaves it alone; the
    /// update count drives the temperature warmup and the last layer's freeze.
    #[test]
    fn the_centre_the_clock_and_the_freeze_move_after_updates() {
        let s = Settings {
            out_dim: 6,
            center_momentum: 0.5,
            warmup_teacher_temperature: 0.02,
            teacher_temperature: 0.06,
            warmup_teacher_temperature_steps: 4,
            freeze_last_layer_steps: 1,
            ..Default::default()
        };
        assert_eq!(s.teacher_temperature_at(0), 0.02);
        assert!((s.teacher_temperature_at(2) - 0.04).abs() < 1e-12);
        assert_eq!(s.teacher_temperature_at(9), 0.06);
        let (d, _) = dino(s);
        let z: Vec<Tensor> = (0..3)
            .map(|i| Var::from_tensor(&rows(5, i)).unwrap().as_tensor().clone())
            .collect();
        let t: Vec<Tensor> = (0..2).map(|i| rows(5, 10 + i)).collect();
        let loss = d.loss(&outputs(z.clone(), t.clone(), false)).unwrap();
        d.after_update().unwrap();
        let c = center(&d);
        assert!(c.iter().all(|&x| x == 0.0), "evaluation moved the centre");
        let grads = loss.backward().unwrap();
        assert!(grads.get(d.last_layer.as_tensor()).is_some());
        assert!(grads.get(d.target_last_layer.as_tensor()).is_none());
        assert!(grads.get(&z[0]).is_some());

        // Update 1 of a frozen last layer: no gradient there, the projections still get one.
        d.updates
            .set(&Tensor::new(&[0f32], &Device::Cpu).unwrap())
            .unwrap();
        let loss = d.loss(&outputs(z.clone(), t.clone(), true)).unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(d.last_layer.as_tensor()).is_none());
        assert!(grads.get(&z[1]).is_some());
        d.after_update().unwrap();
        assert_eq!(d.updates().unwrap(), 1);
        // centre = 0.5 * 0 + 0.5 * mean of the 10 teacher rows' logits.
        let w = d.target_last_layer.as_tensor();
        let all = Tensor::cat(&t, 0).unwrap();
        let want: Vec<f32> = (d.logits(&all, w).unwrap().mean(0).unwrap() * 0.5)
            .unwrap()
            .to_vec1()
            .unwrap();
        let c = center(&d);
        for (a, b) in c.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{c:?} vs {want:?}");
        }
        let loss = d.loss(&outputs(z, t, true)).unwrap();
        assert!(loss
            .backward()
            .unwrap()
            .get(d.last_layer.as_tensor())
            .is_some());
    }
}
