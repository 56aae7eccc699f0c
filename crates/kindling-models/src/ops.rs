//! Fused CPU kernels with real backward passes, for the two element-wise hot spots of a BERT
//! step: LayerNorm's normalisation and the attention softmax.
//!
//! candle_nn's fused `layer_norm` and `softmax_last_dim` have no backward (they silently cut the
//! gradient); their differentiable compositions (`layer_norm_slow`, `ops::softmax`) cost five to
//! ten passes over memory forward and more backward, mostly on one thread. Here each direction is
//! one pass per row, rows shared out with rayon. Other devices and dtypes fall back to the
//! compositions. Gradients are checked against the compositions in the tests below.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// Rows per rayon task: small rows are cheap, so hand out enough work per task.
fn rows_per_task(row: usize) -> usize {
    (16_384 / row.max(1)).max(1)
}

/// `out[row] = f(x[row])` over rows of length `n` (an element-wise map may pick any `n`).
fn map_rows(x: &[f32], n: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let chunk = n * rows_per_task(n);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_mut(n).zip(xs.chunks(n)) {
                f(orow, xrow);
            }
        });
    out
}

/// `out[row] = f(a[row], b[row])` over rows of length `n`.
fn map_rows2(
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    let chunk = n * rows_per_task(n);
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
        .for_each(|(o, (xs, ys))| {
            for ((orow, arow), brow) in o.chunks_mut(n).zip(xs.chunks(n)).zip(ys.chunks(n)) {
                f(orow, arow, brow);
            }
        });
    out
}

/// Row length used for element-wise maps.
const ELEMENTWISE_ROW: usize = 1024;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn fused_ok(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// x -> (x - mean) / sqrt(var + eps) over the last dimension.
struct Normalize {
    eps: f32,
}

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "kindling-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let h = l.dims()[l.dims().len() - 1];
        let out = map_rows(x, h, |orow, xrow| {
            let (mean, rstd) = row_stats(xrow, self.eps);
            for (ov, xv) in orow.iter_mut().zip(xrow) {
                *ov = (xv - mean) * rstd;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(
            x.contiguous()?
                .apply_op2(&g, NormalizeGrad { eps: self.eps })?,
        ))
    }
}

/// (x, dL/dy) -> dL/dx for y = Normalize(x): rstd * (g - mean(g) - y * mean(g * y)).
struct NormalizeGrad {
    eps: f32,
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "kindling-normalize-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let h = l1.dims()[l1.dims().len() - 1];
        let n = h as f32;
        let out = map_rows2(x, g, h, |orow, xrow, grow| {
            let (mean, rstd) = row_stats(xrow, self.eps);
            let (mut sg, mut sgy) = (0f32, 0f32);
            for (xv, gv) in xrow.iter().zip(grow) {
                sg += gv;
                sgy += gv * (xv - mean) * rstd;
            }
            let (mg, mgy) = (sg / n, sgy / n);
            for ((ov, xv), gv) in orow.iter_mut().zip(xrow).zip(grow) {
                let y = (xv - mean) * rstd;
                *ov = rstd * (gv - mg - y * mgy);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// LayerNorm over the last dimension: normalise (fused, with backward), then scale and shift.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused_ok(x) {
        return candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32);
    }
    x.contiguous()?
        .apply_op1(Normalize { eps: eps as f32 })?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "kindling-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let n = l.dims()[l.dims().len() - 1];
        let out = map_rows(x, n, |orow, xrow| {
            let max = xrow.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (ov, xv) in orow.iter_mut().zip(xrow) {
                *ov = (xv - max).exp();
                sum += *ov;
            }
            let inv = 1.0 / sum;
            orow.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            y.contiguous()?
                .apply_op2(&grad.contiguous()?, SoftmaxGrad)?,
        ))
    }
}

/// (y, dL/dy) -> dL/dx for y = softmax(x): y * (g - sum(g * y)).
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "kindling-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let n = l1.dims()[l1.dims().len() - 1];
        let out = map_rows2(y, g, n, |orow, yrow, grow| {
            let dot: f32 = yrow.iter().zip(grow).map(|(a, b)| a * b).sum();
            for ((ov, yv), gv) in orow.iter_mut().zip(yrow).zip(grow) {
                *ov = yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fused_ok(x) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// Exact (erf) GELU, HF's "gelu": x * Phi(x).
struct Gelu;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "kindling-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let out = map_rows(x, ELEMENTWISE_ROW, |o, xs| {
            for (ov, &v) in o.iter_mut().zip(xs) {
                *ov = 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f32(v * FRAC_1_SQRT_2));
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.contiguous()?.apply_op2(&grad.contiguous()?, GeluGrad)?,
        ))
    }
}

/// (x, dL/dy) -> dL/dx for y = GELU(x): g * (Phi(x) + x * phi(x)).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "kindling-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let out = map_rows2(x, g, ELEMENTWISE_ROW, |o, xs, gs| {
            for ((ov, &xv), &gv) in o.iter_mut().zip(xs).zip(gs) {
                let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(xv * FRAC_1_SQRT_2));
                let pdf = INV_SQRT_2PI * (-0.5 * xv * xv).exp();
                *ov = gv * (cdf + xv * pdf);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Exact GELU, differentiable; fused on CPU f32.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused_ok(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

/// Inverted dropout whose keep-mask is `uniform_at(seed, i) >= p`, recomputed rather than stored:
/// the backward pass is the same masking applied to the gradient.
struct SeededDropout {
    p: f32,
    seed: u64,
}

impl CustomOp1 for SeededDropout {
    fn name(&self) -> &'static str {
        "kindling-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let scale = 1.0 / (1.0 - self.p);
        let mut out = vec![0f32; x.len()];
        const CHUNK: usize = 16_384;
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (o, xs))| {
                for (j, (ov, &xv)) in o.iter_mut().zip(xs).enumerate() {
                    let keep =
                        kindling_core::rng::uniform_at(self.seed, (c * CHUNK + j) as u64) >= self.p;
                    *ov = if keep { xv * scale } else { 0.0 };
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(SeededDropout {
            p: self.p,
            seed: self.seed,
        })?))
    }
}

/// Inverted dropout with the mask stream `seed`; fused on CPU f32 (the mask is never stored).
pub fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if fused_ok(x) {
        return x.contiguous()?.apply_op1(SeededDropout { p, seed });
    }
    let n = x.elem_count();
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..n as u64)
        .map(|i| {
            if kindling_core::rng::uniform_at(seed, i) >= p {
                scale
            } else {
                0.0
            }
        })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn randn(shape: (usize, usize, usize), seed: u64) -> Tensor {
        use rand::Rng;
        let mut r = kindling_core::rng::rng(&[seed]);
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n).map(|_| r.random_range(-3.0f32..3.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-12);
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / scale
    }

    /// Gradients of sum(f(x) * r) for the fused op and the composed one.
    fn grads(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor());
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    }

    #[test]
    fn fused_softmax_matches_the_composed_ops_forward_and_backward() {
        let x = randn((4, 7, 33), 1);
        let r = randn((4, 7, 33), 2);
        let (y1, g1) = grads(|t| softmax_last_dim(t).unwrap(), &x, &r);
        let (y2, g2) = grads(|t| candle_nn::ops::softmax(t, D::Minus1).unwrap(), &x, &r);
        assert!(max_rel_diff(&y1, &y2) < 1e-5);
        assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
    }

    #[test]
    fn fused_gelu_matches_candles_gelu_erf_forward_and_backward() {
        let x = randn((2, 9, 50), 7);
        let r = randn((2, 9, 50), 8);
        let (y1, g1) = grads(|t| gelu_erf(t).unwrap(), &x, &r);
        let (y2, g2) = grads(|t| t.gelu_erf().unwrap(), &x, &r);
        assert!(max_rel_diff(&y1, &y2) < 1e-5);
        assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
    }

    #[test]
    fn fused_dropout_masks_forward_and_backward_alike() {
        let x = randn((2, 8, 300), 9);
        let r = randn((2, 8, 300), 10);
        let (y, g) = grads(|t| seeded_dropout(t, 0.25, 42).unwrap(), &x, &r);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (xs, rs) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let mut dropped = 0;
        for i in 0..y.len() {
            if y[i] == 0.0 {
                dropped += 1;
                assert_eq!(g[i], 0.0, "a dropped element passes no gradient");
            } else {
                assert!((y[i] - xs[i] / 0.75).abs() < 1e-5);
                assert!((g[i] - rs[i] / 0.75).abs() < 1e-5);
            }
        }
        let rate = dropped as f64 / y.len() as f64;
        assert!((rate - 0.25).abs() < 0.03, "drop rate {rate}");
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_ops_forward_and_backward() {
        let x = randn((3, 5, 64), 3);
        let r = randn((3, 5, 64), 4);
        let w = Var::from_tensor(&randn((1, 1, 64), 5).flatten_all().unwrap()).unwrap();
        let b = Var::from_tensor(&randn((1, 1, 64), 6).flatten_all().unwrap()).unwrap();
        let run = |fused: bool| {
            let v = Var::from_tensor(&x).unwrap();
            let y = if fused {
                layer_norm(v.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap()
            } else {
                candle_nn::ops::layer_norm_slow(v.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)
                    .unwrap()
            };
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = g.get(v.as_tensor()).unwrap().clone();
            let gw = g.get(w.as_tensor()).unwrap().clone();
            let gb = g.get(b.as_tensor()).unwrap().clone();
            (y, gx, gw, gb)
        };
        let (y1, gx1, gw1, gb1) = run(true);
        let (y2, gx2, gw2, gb2) = run(false);
        assert!(max_rel_diff(&y1, &y2) < 1e-5);
        assert!(
            max_rel_diff(&gx1, &gx2) < 1e-5,
            "dx {}",
            max_rel_diff(&gx1, &gx2)
        );
        assert!(max_rel_diff(&gw1, &gw2) < 1e-5);
        assert!(max_rel_diff(&gb1, &gb2) < 1e-5);
    }
}
