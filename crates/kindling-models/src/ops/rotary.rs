//! Rotary position embedding (Su et al., 2021) as one op: HF's `x * cos + rotate_half(x) * sin`
//! over each head, whose composition is eight candle ops (two narrows, a negation, a
//! concatenation, two products, a sum, a reshape), each a pass over (tokens, hidden) and a node
//! of the graph, for the queries and the keys of every layer.

#[allow(unused_imports)]
use super::*;
use std::sync::Arc;

/// Rotates each head of `x` (tokens, heads * head_dim; row r at position r % seq) by its
/// position's angles; `transpose` applies the transposed rotation (the backward pass).
#[derive(Clone)]
pub(super) struct Rotary {
    /// (seq, head_dim) each, both halves of a row HF's `cat((freqs, freqs))` or any other.
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    seq: usize,
    head_dim: usize,
    transpose: bool,
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "kindling-rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let hidden = l.dims()[l.dims().len() - 1];
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let rows = rows_per_task(hidden);
        let out = par_new(x.len(), hidden * rows, |c, o| {
            for (k, orow) in o.chunks_mut(hidden).enumerate() {
                let r = c * rows + k;
                let xrow = &x[r * hidden..(r + 1) * hidden];
                let p = (r % self.seq) * d;
                let (cos, sin) = (&self.cos[p..p + d], &self.sin[p..p + d]);
                for (oh, xh) in orow.chunks_mut(d).zip(xrow.chunks(d)) {
                    for i in 0..half {
                        let (x1, x2) = (xh[i], xh[i + half]);
                        if self.transpose {
                            oh[i] = x1 * cos[i] + x2 * sin[i + half];
                            oh[i + half] = x2 * cos[i + half] - x1 * sin[i];
                        } else {
                            oh[i] = x1 * cos[i] - x2 * sin[i];
                            oh[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// A rotation is linear: its gradient is the transposed rotation of the output's.
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let t = Rotary {
            transpose: !self.transpose,
            ..self.clone()
        };
        Ok(Some(grad.contiguous()?.apply_op1(t)?))
    }
}

impl Kernels {
    /// `x` (batch * seq, heads * head_dim) with each head rotated by the angles of its row's
    /// position: `x * cos + rotate_half(x) * sin` per head, `cos` and `sin` (1, seq, 1,
    /// head_dim). One op on CPU f32; candle's composition elsewhere.
    pub fn rotary(
        self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        (b, t, heads): (usize, usize, usize),
    ) -> Result<Tensor> {
        let d = x.dim(1)? / heads;
        if self.fuses(x) && d % 2 == 0 {
            let table = |v: &Tensor| -> Result<Arc<[f32]>> {
                Ok(v.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into())
            };
            let op = Rotary {
                cos: table(cos)?,
                sin: table(sin)?,
                seq: t,
                head_dim: d,
                transpose: false,
            };
            return x.contiguous()?.apply_op1(op);
        }
        let x4 = x.reshape((b, t, heads, d))?;
        let (x1, x2) = (x4.narrow(3, 0, d / 2)?, x4.narrow(3, d / 2, d / 2)?);
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        (x4.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?.reshape((b * t, heads * d))
    }
}
