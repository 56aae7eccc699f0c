//! GELU (erf form) as one op, its derivative written once.

#[allow(unused_imports)]
use super::*;

/// Exact (erf) GELU, HF's "gelu": x * Phi(x).
pub(super) struct Gelu;

pub(super) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
pub(super) const INV_SQRT_2PI: f32 = 0.398_942_3;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "kindling-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        Ok((CpuStorage::F32(gelu_rows(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.contiguous()?.apply_op2(&grad.contiguous()?, GeluGrad)?,
        ))
    }
}

/// (x, dL/dy) -> dL/dx for y = GELU(x): g * (Phi(x) + x * phi(x)).
pub(super) struct GeluGrad;

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
        Ok((CpuStorage::F32(gelu_grad_rows(x, g)), l1.shape().clone()))
    }
}

/// Exact GELU of every element.
pub(crate) fn gelu_rows(x: &[f32]) -> Vec<f32> {
    map_rows(x, ELEMENTWISE_ROW, |o, xs| {
        o.iter_mut().zip(xs).for_each(|(ov, &v)| *ov = gelu(v))
    })
}

/// Exact GELU of one value, x * Phi(x).
#[inline(always)]
pub(super) fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + fast_erf_and_gauss(v * FRAC_1_SQRT_2).0)
}

/// GELU at `v` and its derivative there, `(v * Phi(v), Phi(v) + v * phi(v))`, from one erf.
#[inline(always)]
pub(super) fn gelu_and_derivative(v: f32) -> (f32, f32) {
    // e^{-(x/sqrt 2)^2} = e^{-x^2/2}: erf's Gaussian factor is the pdf's too.
    let (erf, gauss) = fast_erf_and_gauss(v * FRAC_1_SQRT_2);
    let cdf = 0.5 * (1.0 + erf);
    (v * cdf, cdf + v * (INV_SQRT_2PI * gauss))
}

/// dL/dx of GELU at `x` given dL/dy `g`: g * (Phi(x) + x * phi(x)).
pub(crate) fn gelu_grad_rows(x: &[f32], g: &[f32]) -> Vec<f32> {
    map_rows2(x, g, ELEMENTWISE_ROW, |o, xs, gs| {
        for ((ov, &xv), &gv) in o.iter_mut().zip(xs).zip(gs) {
            *ov = gv * gelu_and_derivative(xv).1;
        }
    })
}

/// GELU of `x` in place, returning its derivative at `x`, Phi(x) + x phi(x), computed in the
/// same pass. A training forward keeps the derivative instead of `x`, and the backward pass is
/// then one multiply ([`mul_in_place`]) instead of an erf and an exp per element (the GELU maps
/// were 6.7% of the small MLM step's profile). In place, because the pre-activation is not
/// needed afterwards: one fresh intermediate-sized buffer (32 MB on the small step) fewer per
/// layer, and the derivative's buffer is written once, never zero-filled. Same arithmetic as
/// [`gelu_rows`] and [`gelu_grad_rows`].
pub(crate) fn gelu_and_grad_in_place(x: &mut [f32]) -> Vec<f32> {
    let chunk = ELEMENTWISE_ROW * rows_per_task(ELEMENTWISE_ROW);
    let mut d = Vec::with_capacity(x.len());
    d.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(chunk)
        .zip(x.par_chunks_mut(chunk))
        .for_each(|(d, xs)| {
            vectorised(|| {
                for (dv, v) in d.iter_mut().zip(xs.iter_mut()) {
                    let (erf, gauss) = fast_erf_and_gauss(*v * FRAC_1_SQRT_2);
                    dv.write(0.5 * (1.0 + erf) + *v * (INV_SQRT_2PI * gauss));
                    *v = 0.5 * *v * (1.0 + erf);
                }
            })
        });
    // SAFETY: the chunks cover `..x.len()` and every element was written above.
    unsafe { d.set_len(x.len()) };
    d
}

/// GELU of `x` in place (an evaluation forward: no derivative kept).
pub(crate) fn gelu_in_place(x: &mut [f32]) {
    let chunk = ELEMENTWISE_ROW * rows_per_task(ELEMENTWISE_ROW);
    x.par_chunks_mut(chunk)
        .for_each(|xs| vectorised(|| xs.iter_mut().for_each(|v| *v = gelu(*v))));
}

/// `a *= b`, element-wise, in parallel.
pub(crate) fn mul_in_place(a: &mut [f32], b: &[f32]) {
    let chunk = ELEMENTWISE_ROW * rows_per_task(ELEMENTWISE_ROW);
    a.par_chunks_mut(chunk)
        .zip(b.par_chunks(chunk))
        .for_each(|(a, b)| vectorised(|| a.iter_mut().zip(b).for_each(|(x, y)| *x *= y)));
}

/// Exact GELU on the fused path (see [`Kernels::gelu_erf`]).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Kernels::Fused.gelu_erf(x)
}

impl Kernels {
    /// Exact GELU, differentiable; fused on CPU f32.
    pub fn gelu_erf(self, x: &Tensor) -> Result<Tensor> {
        if !self.fuses(x) {
            return x.gelu_erf();
        }
        x.contiguous()?.apply_op1(Gelu)
    }
}
