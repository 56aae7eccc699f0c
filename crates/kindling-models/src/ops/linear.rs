//! A linear layer with its bias as one op: the product and the bias row forward; dx, dW and db
//! backward.

#[allow(unused_imports)]
use super::*;

/// `x (rows, k) @ w^T + b` for w (n, k) as HF stores it: the output starts as the bias rows.
pub(crate) fn linear_fwd(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (n, k) = (b.len(), w.len() / b.len());
    let rows = x.len() / k;
    let mut out = par_new(rows * n, n * rows_per_task(n), |_, c| {
        c.chunks_mut(n).for_each(|row| row.copy_from_slice(b))
    });
    gemm_into((rows, n, k), &mut out, true, mat(x, k), mat_t(w, k));
    out
}

/// Backward of [`linear_fwd`] given dL/dout `g` (rows, n): writes dL/dw and dL/db into `dw`,
/// `db`, and sets (or adds to) `dx` (rows, k).
pub(crate) fn linear_bwd(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (dx, dx_accumulate): (&mut [f32], bool),
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (n, k) = (db.len(), dw.len() / db.len());
    let rows = x.len() / k;
    gemm_into((n, k, rows), dw, false, mat_t(g, n), mat(x, k));
    db.copy_from_slice(&column_sums(g, n));
    gemm_into((rows, k, n), dx, dx_accumulate, mat(g, n), mat(w, k));
}

/// `x @ weight^T + bias` for x (rows, in), weight (out, in), bias (out): one gemm whose
/// destination starts as the bias rows, so the bias costs no extra pass. The backward pass is
/// two gemms and a column sum, returned together.
pub(super) struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "kindling-linear"
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
        let (rows, k) = l1.shape().dims2()?;
        let (m, k2) = l2.shape().dims2()?;
        if k != k2 || b.len() != m {
            candle_core::bail!(
                "{}: x {:?}, weight {:?}, bias {:?} do not fit",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        Ok((CpuStorage::F32(linear_fwd(x, w, b)), Shape::from((rows, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let ((sx, lx), (sw, lw), (sg, lg)) = (
            x.storage_and_layout(),
            w.storage_and_layout(),
            g.storage_and_layout(),
        );
        let (xs, ws, gs) = (cpu_f32(&sx, lx)?, cpu_f32(&sw, lw)?, cpu_f32(&sg, lg)?);
        let (mut dx, mut dw, mut db) = (
            vec![0f32; xs.len()],
            vec![0f32; ws.len()],
            vec![0f32; b.elem_count()],
        );
        linear_bwd(xs, ws, gs, (&mut dx, false), &mut dw, &mut db);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// A linear layer on the fused path (see [`Kernels::linear`]).
pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Kernels::Fused.linear(xs, weight, bias)
}

impl Kernels {
    /// A linear layer, `xs @ weight^T + bias`, over the last dimension of `xs`; fused on CPU f32.
    pub fn linear(self, xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        if !self.fuses(xs) {
            // Mixed precision: f32 master weights are cast to the activations' dtype (bf16/f16)
            // for the product; the cast's backward brings their gradient back in f32.
            let (w, b) = (weight.to_dtype(xs.dtype())?, bias.to_dtype(xs.dtype())?);
            return xs.broadcast_matmul(&w.t()?)?.broadcast_add(&b);
        }
        let dims = xs.dims();
        let k = dims[dims.len() - 1];
        let rows = xs.elem_count() / k;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("xs has a last dimension") = weight.dim(0)?;
        xs.contiguous()?
            .reshape((rows, k))?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearOp)?
            .reshape(out_dims)
    }
}
