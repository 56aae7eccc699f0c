//! Rotary position embedding (Su et al., 2021) as one op: HF's `x * cos + rotate_half(x) * sin`
//! over each head, whose composition is eight candle ops (two narrows, a negation, a
//! concatenation, two products, a sum, a reshape), each a pass over (tokens, hidden) and a node
//! of the graph, for the queries and the keys of every layer.

#[allow(unused_imports)]
use super::*;
use std::sync::Arc;

/// The angles of positions `0..seq` for heads of `head_dim`: (seq, head_dim) each, both halves
/// of a row HF's `cat((freqs, freqs))` or any other.
#[derive(Clone, Debug)]
pub(crate) struct RotaryTable {
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    seq: usize,
    head_dim: usize,
}

impl RotaryTable {
    pub(crate) fn new(cos: Arc<[f32]>, sin: Arc<[f32]>, seq: usize, head_dim: usize) -> Self {
        debug_assert!(cos.len() == seq * head_dim && sin.len() == cos.len() && head_dim % 2 == 0);
        RotaryTable {
            cos,
            sin,
            seq,
            head_dim,
        }
    }

    /// Rotates each head of one row in place by the angles of sequence position `pos`;
    /// `transpose`: the transposed (inverse) rotation, the backward pass.
    #[inline(always)]
    fn rotate_row(&self, row: &mut [f32], pos: usize, transpose: bool) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let p = pos * d;
        let (cos, sin) = (&self.cos[p..p + d], &self.sin[p..p + d]);
        for head in row.chunks_mut(d) {
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                if transpose {
                    head[i] = x1 * cos[i] + x2 * sin[i + half];
                    head[i + half] = x2 * cos[i + half] - x1 * sin[i];
                } else {
                    head[i] = x1 * cos[i] - x2 * sin[i];
                    head[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
                }
            }
        }
    }

    /// Rotates every row of `x` (rows of `hidden`, heads side by side) in place; row r sits at
    /// flat position `rows[r]` (all rows when `None`: r), sequence position that mod `seq`.
    pub(crate) fn rotate(
        &self,
        x: &mut [f32],
        hidden: usize,
        rows: Option<&[u32]>,
        transpose: bool,
    ) {
        let per = rows_per_task(hidden);
        x.par_chunks_mut(per * hidden)
            .enumerate()
            .for_each(|(c, chunk)| {
                vectorised(|| {
                    for (k, row) in chunk.chunks_mut(hidden).enumerate() {
                        let r = c * per + k;
                        let flat = rows.map_or(r, |rows| rows[r] as usize);
                        self.rotate_row(row, flat % self.seq, transpose);
                    }
                })
            });
    }
}

/// Rotates each head of `x` (tokens, heads * head_dim; row r at position r % seq) by its
/// position's angles; `transpose` applies the transposed rotation (the backward pass).
#[derive(Clone)]
pub(super) struct Rotary {
    table: RotaryTable,
    transpose: bool,
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "kindling-rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let hidden = l.dims()[l.dims().len() - 1];
        let mut out = x.to_vec();
        self.table.rotate(&mut out, hidden, None, self.transpose);
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
                table: RotaryTable::new(table(cos)?, table(sin)?, t, d),
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
