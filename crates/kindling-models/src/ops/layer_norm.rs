//! LayerNorm as one op each way (row statistics, normalise, scale and shift; the gradient of
//! the input and both parameters).

#[allow(unused_imports)]
use super::*;

/// LayerNorm of each row of `x` (rows of `w.len()`), scaled by `w` and shifted by `b`.
pub(crate) fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    map_rows(x, w.len(), |orow, xrow| {
        let (mean, rstd) = row_stats(xrow, eps);
        for (((ov, xv), wv), bv) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
            *ov = (xv - mean) * rstd * wv + bv;
        }
    })
}

/// LayerNorm over the last dimension, scale and shift included: (x, weight, bias) -> y.
pub(super) struct LayerNormOp {
    pub(super) eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "kindling-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        Ok((
            CpuStorage::F32(layer_norm_rows(x, w, b, self.eps)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let rows = x.elem_count() / h;
        // One pass gives all three gradients, packed as rows + 2 rows: dx, then dw, then db.
        let packed = x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &grad.contiguous()?,
            LayerNormGrad { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(h)?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(h)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (x, weight, dL/dy) -> [dL/dx rows; dL/dweight; dL/dbias] for y = LayerNorm(x) * w + b:
/// with x^ = (x - mean) * rstd and gy = g * w, dx = rstd * (gy - mean(gy) - x^ * mean(gy * x^)),
/// dw = sum over rows of g * x^, db = sum over rows of g.
pub(super) struct LayerNormGrad {
    pub(super) eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "kindling-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; x.len() + 2 * h];
        let (dx, params) = out.split_at_mut(x.len());
        layer_norm_grad_rows(x, w, g, self.eps, dx, params);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, h))))
    }
}

/// The LayerNorm backward of [`LayerNormGrad`] on slices: dL/dx into `dx`, and dL/dweight then
/// dL/dbias added into `params` (2 * h).
pub(crate) fn layer_norm_grad_rows(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    params: &mut [f32],
) {
    let h = w.len();
    let n = h as f32;
    let chunk = h * rows_per_task(h);
    // Each chunk of rows also returns its partial dw and db; they are added in chunk order.
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .map(|(dxs, (xs, gs))| {
            vectorised(|| {
                let mut acc = vec![0f32; 2 * h];
                let (dw, db) = acc.split_at_mut(h);
                for ((orow, xrow), grow) in dxs.chunks_mut(h).zip(xs.chunks(h)).zip(gs.chunks(h)) {
                    let (mean, rstd) = row_stats(xrow, eps);
                    // x^ goes through orow, which is overwritten with dx below.
                    for (((o, xv), gv), (dwv, dbv)) in orow
                        .iter_mut()
                        .zip(xrow)
                        .zip(grow)
                        .zip(dw.iter_mut().zip(db.iter_mut()))
                    {
                        *o = (xv - mean) * rstd;
                        *dwv += gv * *o;
                        *dbv += gv;
                    }
                    let mg = sum_by(h, |k| grow[k] * w[k]) / n;
                    let mgx = sum_by(h, |k| grow[k] * w[k] * orow[k]) / n;
                    for ((o, gv), wv) in orow.iter_mut().zip(grow).zip(w) {
                        *o = rstd * (gv * wv - mg - *o * mgx);
                    }
                }
                acc
            })
        })
        .collect();
    for p in partials {
        params.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
}

/// LayerNorm over the last dimension with scale and shift, on the fused path (see
/// [`Kernels::layer_norm`]).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    Kernels::Fused.layer_norm(x, weight, bias, eps)
}

impl Kernels {
    /// LayerNorm over the last dimension with scale and shift: one fused op (with backward) on
    /// CPU f32, candle_nn's kernel with the backward attached on CUDA, the differentiable
    /// composition elsewhere (and everywhere when composed).
    pub fn layer_norm(
        self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        if self.attaches(x) {
            // candle_nn's kernel normalises (in f32 inside); scale and shift in x's dtype.
            return normalize_attached(x, eps)?
                .broadcast_mul(&weight.to_dtype(x.dtype())?)?
                .broadcast_add(&bias.to_dtype(x.dtype())?);
        }
        if !self.fuses(x) {
            // Mixed precision: bf16/f16 activations are normalised in the weights' dtype (f32
            // master weights), as PyTorch's autocast runs layer_norm in f32, and come back in
            // their own dtype.
            if x.dtype() != weight.dtype() {
                return candle_nn::ops::layer_norm_slow(
                    &x.to_dtype(weight.dtype())?,
                    weight,
                    bias,
                    eps as f32,
                )?
                .to_dtype(x.dtype());
            }
            return candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32);
        }
        x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp { eps: eps as f32 },
        )
    }
}
