//! Muon (Jordan et al., 2024: "MomentUm Orthogonalized by Newton-Schulz") for the hidden weight
//! matrices, AdamW for everything else, as Muon is meant to be used.
//!
//! Each matrix's update is its Nesterov momentum replaced by the nearest semi-orthogonal matrix
//! (five Newton-Schulz iterations of Jordan's quintic), so every direction of the weight moves by
//! about the same amount instead of the few that dominate the gradient. The update is scaled by
//! `0.2 * sqrt(max(rows, cols))` (Liu et al., 2025, "Muon is scalable for LLM training"), which
//! gives it the RMS of a typical AdamW update: the recipe's AdamW learning rate and weight decay
//! then suit both groups, and one schedule drives them.
//!
//! Embeddings (their rows are looked up, not multiplied), output projections named in
//! `muon_skip`, vectors and exempt parameters (biases, norms) stay on AdamW.
//!
//! Cost: three products of each matrix's shorter side per iteration; for a 256 x 1024 matrix
//! about 1.5 GFLOP per step, which is noticeable next to a small batch's forward and backward.

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::optim::{AdamW, Optimizer, OptimizerConfig};
use crate::Result;

/// Jordan's quintic Newton-Schulz coefficients: fast rather than exact convergence, leaving the
/// singular values in about [0.7, 1.2], which trains as well as an exact polar factor.
const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);
const NS_STEPS: usize = 5;

struct Slot {
    name: String,
    var: Var,
    buf: Tensor,
    lr_scale: f64,
}

/// Muon over the hidden matrices plus AdamW over the rest.
pub struct Muon {
    cfg: OptimizerConfig,
    slots: Vec<Slot>,
    adamw: AdamW,
    t: u64,
}

/// Whether a parameter goes to Muon: a matrix the objective decays and whose name contains none
/// of `skip` (embeddings, output heads).
pub fn takes(name: &str, var: &Var, decay: bool, skip: &[String]) -> bool {
    decay && var.as_tensor().rank() == 2 && !skip.iter().any(|s| name.contains(s.as_str()))
}

impl Muon {
    /// `params`: (name, var, apply weight decay). The matrices `takes` selects get Muon.
    pub fn new(cfg: OptimizerConfig, params: Vec<(String, Var, bool)>) -> Result<Self> {
        let (matrices, rest): (Vec<_>, Vec<_>) = params
            .into_iter()
            .partition(|(n, v, d)| takes(n, v, *d, &cfg.muon_skip));
        let slots = matrices
            .into_iter()
            // `takes` only selects parameters the objective decays.
            .map(|(name, var, _decay)| {
                let buf = var.zeros_like()?;
                Ok(Slot {
                    name,
                    var,
                    buf,
                    lr_scale: 1.0,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let adamw = AdamW::new(cfg.clone(), rest)?;
        Ok(Muon {
            cfg,
            slots,
            adamw,
            t: 0,
        })
    }

    /// Names of the parameters Muon updates (the rest go to AdamW).
    pub fn muon_params(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }
}

/// The semi-orthogonal factor of `g` (its SVD's U V^T), approximately, by Newton-Schulz
/// iterations on the wide orientation so that the Gram matrix is the small one.
pub fn orthogonalize(g: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, cols) = g.dims2()?;
    let tall = rows > cols;
    let x = if tall {
        g.t()?.contiguous()?
    } else {
        g.clone()
    };
    let x = x.to_dtype(DType::F32)?;
    let norm = x.sqr()?.sum_all()?.sqrt()?;
    let mut x = x.broadcast_div(&(norm + 1e-7)?)?;
    let (a, b, c) = NS_COEFFS;
    for _ in 0..NS_STEPS {
        let gram = x.matmul(&x.t()?)?;
        let poly = ((&gram * b)? + (gram.matmul(&gram)? * c)?)?;
        x = ((&x * a)? + poly.matmul(&x)?)?;
    }
    let x = x.to_dtype(g.dtype())?;
    if tall {
        x.t()?.contiguous()
    } else {
        Ok(x)
    }
}

impl Optimizer for Muon {
    fn steps_done(&self) -> u64 {
        self.t
    }

    fn set_lr_scales(&mut self, scale: &dyn Fn(&str) -> f64) {
        for s in &mut self.slots {
            s.lr_scale = scale(&s.name);
        }
        self.adamw.set_lr_scales(scale);
    }

    /// Momentum `b = beta b + (1 - beta) g`; Nesterov's direction `(1 - beta) g + beta b` (or
    /// `b`); theta <- (1 - lr wd) theta - lr * 0.2 sqrt(max(r, c)) * orth(direction).
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let beta = self.cfg.momentum;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            s.buf = ((&s.buf * beta)? + (&g * (1.0 - beta))?)?;
            let dir = if self.cfg.nesterov {
                ((&g * (1.0 - beta))? + (&s.buf * beta)?)?
            } else {
                s.buf.clone()
            };
            let (r, c) = dir.dims2()?;
            let lr = lr * s.lr_scale;
            let scale = 0.2 * (r.max(c) as f64).sqrt();
            let theta = s.var.as_tensor().detach();
            let theta = if self.cfg.weight_decay != 0.0 {
                (theta * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                theta
            };
            s.var
                .set(&(theta - (orthogonalize(&dir)? * (lr * scale))?)?)?;
        }
        self.adamw.step(grads, lr)
    }

    /// AdamW's moments for its parameters, `muon_momentum.NAME` for the matrices.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = self.adamw.state_tensors();
        v.extend(
            self.slots
                .iter()
                .map(|s| (format!("muon_momentum.{}", s.name), s.buf.clone())),
        );
        v
    }

    fn load_state(
        &mut self,
        t: u64,
        get: &mut dyn FnMut(&str) -> Option<Tensor>,
    ) -> std::result::Result<(), String> {
        for s in &mut self.slots {
            let b = get(&format!("muon_momentum.{}", s.name)).ok_or_else(|| {
                format!(
                    "missing muon_momentum.{} (was the checkpoint written by another optimizer?)",
                    s.name
                )
            })?;
            if b.shape() != s.var.shape() {
                return Err(format!(
                    "Muon momentum shape of {} does not match the parameter",
                    s.name
                ));
            }
            s.buf = b;
        }
        self.adamw.load_state(t, get)?;
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::tests::uniform as random;
    use crate::optim::OptimizerKind;

    /// The Gram matrix of a semi-orthogonal factor (O O^T for a wide one) is the identity.
    #[test]
    fn newton_schulz_gives_a_near_orthogonal_factor_of_any_orientation() {
        for (r, c) in [(16, 48), (48, 16), (32, 32)] {
            let o = orthogonalize(&random(r, c, 3)).unwrap();
            assert_eq!(o.dims2().unwrap(), (r, c));
            let k = r.min(c);
            let gram = if r <= c {
                o.matmul(&o.t().unwrap()).unwrap()
            } else {
                o.t().unwrap().matmul(&o).unwrap()
            };
            let g = gram.to_vec2::<f32>().unwrap();
            for i in 0..k {
                // Jordan's quintic leaves singular values in about [0.7, 1.2].
                assert!(
                    (0.45..1.45).contains(&g[i][i]),
                    "{r}x{c}: diag {i} = {}",
                    g[i][i]
                );
                for j in 0..k {
                    if i != j {
                        assert!(g[i][j].abs() < 0.3, "{r}x{c}: off-diagonal {}", g[i][j]);
                    }
                }
            }
        }
    }

    #[test]
    fn orthogonalizing_flattens_the_spectrum_of_a_rank_dominated_gradient() {
        // A gradient with one huge direction: plain SGD would move almost only along it; the
        // orthogonal factor moves every direction of the row space by about the same amount.
        let u = random(24, 1, 1);
        let v = random(1, 40, 2);
        let g = ((u.matmul(&v).unwrap() * 100.0).unwrap() + random(24, 40, 4)).unwrap();
        let o = orthogonalize(&g).unwrap();
        let gram = o.matmul(&o.t().unwrap()).unwrap();
        let trace: f32 = (0..24)
            .map(|i| {
                gram.get(i)
                    .unwrap()
                    .get(i)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum();
        let frob = gram
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // For eigenvalues l_i of the Gram: (sum l)^2 / sum l^2 is the effective rank (24 if flat,
        // 1 if one direction dominates).
        let eff_rank = trace * trace / frob;
        assert!(eff_rank > 18.0, "effective rank {eff_rank}");
    }

    fn problem(kind_muon: bool) -> (Box<dyn Optimizer>, Var, Var, Tensor) {
        let w = Var::from_tensor(&random(8, 12, 7)).unwrap();
        let b = Var::from_tensor(&random(1, 8, 8).flatten_all().unwrap()).unwrap();
        let cfg = OptimizerConfig {
            kind: if kind_muon {
                OptimizerKind::Muon
            } else {
                OptimizerKind::AdamW
            },
            lr: 2e-2,
            momentum: 0.95,
            nesterov: true,
            weight_decay: 0.0,
            ..Default::default()
        };
        let opt = cfg
            .build(vec![
                ("layer.weight".into(), w.clone(), true),
                ("layer.bias".into(), b.clone(), false),
            ])
            .unwrap();
        (opt, w, b, random(8, 12, 9))
    }

    fn loss(w: &Var, b: &Var, target: &Tensor) -> Tensor {
        (w.as_tensor()
            .broadcast_add(&b.as_tensor().unsqueeze(1).unwrap())
            .unwrap()
            - target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    }

    #[test]
    fn muon_minimises_a_quadratic_and_routes_vectors_to_adamw() {
        let (mut opt, w, b, target) = problem(true);
        let b0 = b.as_tensor().to_vec1::<f32>().unwrap();
        let first = loss(&w, &b, &target).to_scalar::<f32>().unwrap();
        for _ in 0..200 {
            let grads = loss(&w, &b, &target).backward().unwrap();
            opt.step(&grads, 2e-2).unwrap();
        }
        let last = loss(&w, &b, &target).to_scalar::<f32>().unwrap();
        assert!(last < 0.05 * first, "loss {first} -> {last}");
        assert_ne!(
            b.as_tensor().to_vec1::<f32>().unwrap(),
            b0,
            "the bias trained"
        );
        let names: Vec<String> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"muon_momentum.layer.weight".to_string()));
        assert!(names.contains(&"exp_avg.layer.bias".to_string()));
        assert!(!names.iter().any(|n| n == "exp_avg.layer.weight"));
    }

    #[test]
    fn muon_state_round_trips_to_the_same_next_update() {
        let (mut a, wa, ba, target) = problem(true);
        for _ in 0..3 {
            a.step(&loss(&wa, &ba, &target).backward().unwrap(), 2e-2)
                .unwrap();
        }
        let saved: std::collections::HashMap<String, Tensor> =
            a.state_tensors().into_iter().collect();
        let (mut b, wb, bb, _) = problem(true);
        wb.set(wa.as_tensor()).unwrap();
        bb.set(ba.as_tensor()).unwrap();
        b.load_state(a.steps_done(), &mut |n| saved.get(n).cloned())
            .unwrap();
        a.step(&loss(&wa, &ba, &target).backward().unwrap(), 2e-2)
            .unwrap();
        b.step(&loss(&wb, &bb, &target).backward().unwrap(), 2e-2)
            .unwrap();
        assert_eq!(
            wa.as_tensor().to_vec2::<f32>().unwrap(),
            wb.as_tensor().to_vec2::<f32>().unwrap()
        );
        let (mut adam, _, _, _) = problem(false);
        let err = adam
            .load_state(3, &mut |n| saved.get(n).cloned())
            .unwrap_err();
        assert!(err.contains("exp_avg.layer.weight"), "{err}");
        let err = b.load_state(3, &mut |_| None).unwrap_err();
        assert!(err.contains("muon_momentum.layer.weight"), "{err}");
    }

    #[test]
    fn embeddings_and_named_heads_stay_on_adamw() {
        let m = Var::from_tensor(&random(4, 4, 1)).unwrap();
        let skip = OptimizerConfig::default().muon_skip;
        assert!(takes(
            "bert.encoder.layer.0.attention.self.query.weight",
            &m,
            true,
            &skip
        ));
        assert!(!takes(
            "bert.embeddings.word_embeddings.weight",
            &m,
            true,
            &skip
        ));
        assert!(!takes("classifier.weight", &m, true, &skip));
        assert!(!takes(
            "bert.encoder.layer.0.attention.self.query.weight",
            &m,
            false,
            &skip
        ));
    }
}
