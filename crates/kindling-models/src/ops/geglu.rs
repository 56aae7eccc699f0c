//! The GeGLU feed-forward gate (Shazeer, 2020) as one op: `gelu(a) * g` for `[a | g]`, the two
//! halves of one projection, as ModernBERT's MLP computes it. Composed, it is two narrows (each a
//! copy, GELU needs contiguous input), the GELU and a product: four nodes and passes over
//! (tokens, intermediate) forward, more backward.

#[allow(unused_imports)]
use super::*;

/// `gelu(a) * g` for each row `[a | g]` of `up` (rows, 2i): (rows, i).
pub(crate) fn geglu_rows(up: &[f32], i: usize) -> Vec<f32> {
    let two_i = 2 * i;
    let per = rows_per_task(two_i);
    par_new(up.len() / 2, i * per, |c, o| {
        vectorised(|| {
            for (k, orow) in o.chunks_mut(i).enumerate() {
                let r = c * per + k;
                let (a, g) = up[r * two_i..(r + 1) * two_i].split_at(i);
                for ((ov, &av), &gv) in orow.iter_mut().zip(a).zip(g) {
                    *ov = gelu(av) * gv;
                }
            }
        })
    })
}

/// The gradient of [`geglu_rows`]: from `up` = `[a | g]` and dL/dy (rows, i), `[dL/da | dL/dg]`
/// = `[dy * g * gelu'(a) | dy * gelu(a)]` (rows, 2i).
pub(crate) fn geglu_grad_rows(up: &[f32], dy: &[f32], i: usize) -> Vec<f32> {
    let two_i = 2 * i;
    let per = rows_per_task(two_i);
    par_new(up.len(), two_i * per, |c, o| {
        vectorised(|| {
            for (k, orow) in o.chunks_mut(two_i).enumerate() {
                let r = c * per + k;
                let (a, g) = up[r * two_i..(r + 1) * two_i].split_at(i);
                let dyr = &dy[r * i..(r + 1) * i];
                let (da, dg) = orow.split_at_mut(i);
                for j in 0..i {
                    let (y, dy_da) = gelu_and_derivative(a[j]);
                    da[j] = dyr[j] * g[j] * dy_da;
                    dg[j] = dyr[j] * y;
                }
            }
        })
    })
}

/// `[a | g]` (rows, 2i) -> gelu(a) * g (rows, i).
pub(super) struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "kindling-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let up = contiguous_f32(s, l, self.name())?;
        let (rows, two_i) = l.shape().dims2()?;
        let out = geglu_rows(up, two_i / 2);
        Ok((CpuStorage::F32(out), Shape::from((rows, two_i / 2))))
    }

    fn bwd(&self, up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            up.contiguous()?.apply_op2(&grad.contiguous()?, GegluGrad)?,
        ))
    }
}

/// (`[a | g]`, dL/dy) -> `[dL/da | dL/dg]` (see [`geglu_grad_rows`]).
pub(super) struct GegluGrad;

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "kindling-geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let up = contiguous_f32(s1, l1, self.name())?;
        let dy = contiguous_f32(s2, l2, self.name())?;
        let two_i = l1.shape().dims2()?.1;
        let out = geglu_grad_rows(up, dy, two_i / 2);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

impl Kernels {
    /// `gelu(a) * g` (exact GELU) for `up` = `[a | g]` (rows, 2 * i): (rows, i). One op on CPU
    /// f32; candle's composition elsewhere.
    pub fn geglu(self, up: &Tensor) -> Result<Tensor> {
        let i = up.dim(D::Minus1)? / 2;
        if self.fuses(up) && up.rank() == 2 {
            return up.contiguous()?.apply_op1(Geglu);
        }
        self.gelu_erf(&up.narrow(D::Minus1, 0, i)?)?
            .mul(&up.narrow(D::Minus1, i, i)?)
    }
}
