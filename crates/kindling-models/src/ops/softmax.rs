//! The attention probabilities (scale, padding mask, softmax, dropout) and a softmax over the
//! last dimension, each as one op with its backward.

#[allow(unused_imports)]
use super::*;

/// The attention probabilities in one op: dropout(softmax(scores * scale + mask)), where scores
/// is (batch, heads, queries, keys) and mask (batch, keys) is added to every row of its batch.
/// The backward pass recomputes the softmax from the scores and the dropout mask from its seed
/// rather than storing either.
pub(super) struct AttentionProbs {
    pub(super) scale: f32,
    /// heads * queries: the number of score rows per batch element.
    pub(super) rows_per_batch: usize,
    pub(super) dropout: Option<(f32, u64)>,
}

impl AttentionProbs {
    /// Softmax of one row of scaled, masked scores into `out`.
    #[inline]
    pub(super) fn softmax_row(&self, out: &mut [f32], scores: &[f32], mask: &[f32]) {
        for ((o, s), m) in out.iter_mut().zip(scores).zip(mask) {
            *o = s * self.scale + m;
        }
        let max = max_of(out);
        for o in out.iter_mut() {
            *o = fast_exp(*o - max);
        }
        let inv = 1.0 / sum_by(out.len(), |i| out[i]);
        out.iter_mut().for_each(|o| *o *= inv);
    }

    /// Visits the rows of a (rows, keys) buffer with the row's batch mask and its flat offset.
    pub(super) fn rows<'a>(
        &self,
        out: &'a mut [f32],
        keys: usize,
        mask: &'a [f32],
        f: impl Fn(usize, &mut [f32], &[f32]) + Sync,
    ) {
        let rows_per_task = rows_per_task(keys);
        out.par_chunks_mut(keys * rows_per_task)
            .enumerate()
            .for_each(|(c, chunk)| {
                vectorised(|| {
                    for (j, orow) in chunk.chunks_mut(keys).enumerate() {
                        let r = c * rows_per_task + j;
                        let batch = r / self.rows_per_batch;
                        f(r, orow, &mask[batch * keys..(batch + 1) * keys]);
                    }
                })
            });
    }
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "kindling-attention-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let scores = contiguous_f32(s1, l1, self.name())?;
        let mask = contiguous_f32(s2, l2, self.name())?;
        let keys = l1.dims()[l1.dims().len() - 1];
        let mut out = vec![0f32; scores.len()];
        self.rows(&mut out, keys, mask, |r, orow, mrow| {
            let srow = &scores[r * keys..(r + 1) * keys];
            self.softmax_row(orow, srow, mrow);
            if let Some((p, seed)) = self.dropout {
                dropout_in_place(seed, (r * keys) as u64, p, orow);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        scores: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = scores.contiguous()?.apply_op3(
            &mask.contiguous()?,
            &grad.contiguous()?,
            AttentionProbsGrad {
                fwd: AttentionProbs {
                    scale: self.scale,
                    rows_per_batch: self.rows_per_batch,
                    dropout: self.dropout,
                },
            },
        )?;
        Ok((Some(d), None))
    }
}

/// (scores, mask, dL/dprobs) -> dL/dscores: with y the softmax and g' = dropout(g),
/// dscores = scale * y * (g' - sum(y * g')).
pub(super) struct AttentionProbsGrad {
    pub(super) fwd: AttentionProbs,
}

impl CustomOp3 for AttentionProbsGrad {
    fn name(&self) -> &'static str {
        "kindling-attention-probs-grad"
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
        let scores = contiguous_f32(s1, l1, self.name())?;
        let mask = contiguous_f32(s2, l2, self.name())?;
        let grad = contiguous_f32(s3, l3, self.name())?;
        let keys = l1.dims()[l1.dims().len() - 1];
        let fwd = &self.fwd;
        let mut out = vec![0f32; scores.len()];
        fwd.rows(&mut out, keys, mask, |r, orow, mrow| {
            let (srow, grow) = (
                &scores[r * keys..(r + 1) * keys],
                &grad[r * keys..(r + 1) * keys],
            );
            let mut y = [0f32; 1024];
            let y = if keys <= y.len() {
                &mut y[..keys]
            } else {
                // Longer rows than any BERT uses: a heap row.
                return long_row_grad(fwd, orow, srow, mrow, grow, r * keys);
            };
            fwd.softmax_row(y, srow, mrow);
            attention_row_grad(fwd, orow, y, grow, r * keys);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

pub(super) fn long_row_grad(
    fwd: &AttentionProbs,
    orow: &mut [f32],
    srow: &[f32],
    mrow: &[f32],
    grow: &[f32],
    offset: usize,
) {
    let mut y = vec![0f32; srow.len()];
    fwd.softmax_row(&mut y, srow, mrow);
    attention_row_grad(fwd, orow, &y, grow, offset);
}

/// One row of the attention-probs gradient, `orow` from the recomputed softmax `y`.
#[inline]
pub(super) fn attention_row_grad(
    fwd: &AttentionProbs,
    orow: &mut [f32],
    y: &[f32],
    grow: &[f32],
    offset: usize,
) {
    // g' = dropout(g), written into orow first.
    orow.copy_from_slice(grow);
    if let Some((p, seed)) = fwd.dropout {
        dropout_in_place(seed, offset as u64, p, orow);
    }
    let dot = sum_by(y.len(), |i| y[i] * orow[i]);
    for (o, yv) in orow.iter_mut().zip(y) {
        *o = fwd.scale * yv * (*o - dot);
    }
}

/// `dropout(softmax(scores * scale + mask))` on the fused path (see
/// [`Kernels::attention_probs`]).
pub fn attention_probs(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    Kernels::Fused.attention_probs(scores, mask, scale, dropout)
}

impl Kernels {
    /// `dropout(softmax(scores * scale + mask))` with scores (batch, heads, queries, keys) and an
    /// additive mask (batch, keys); `dropout` is (p, seed) in training. Fused on CPU f32; elsewhere
    /// the composed ops, which drop the same elements.
    pub fn attention_probs(
        self,
        scores: &Tensor,
        mask: &Tensor,
        scale: f64,
        dropout: Option<(f32, u64)>,
    ) -> Result<Tensor> {
        let (b, heads, queries, keys) = scores.dims4()?;
        if !self.fuses(scores) {
            // The softmax runs in the mask's dtype (f32 under mixed precision, as autocast does)
            // and the probabilities come back in the scores' dtype.
            // On CUDA the fused softmax kernel accumulates in f32 itself, so the scores stay in
            // their dtype.
            let dtype = if self.attaches(scores) {
                scores.dtype()
            } else {
                mask.dtype()
            };
            let scaled = (scores.to_dtype(dtype)? * scale)?;
            let mask = mask.to_dtype(dtype)?.reshape((b, 1, 1, keys))?;
            let probs = self
                .softmax_last_dim(&scaled.broadcast_add(&mask)?)?
                .to_dtype(scores.dtype())?;
            return match dropout {
                Some((p, seed)) => self.seeded_dropout(&probs, p, seed),
                None => Ok(probs),
            };
        }
        scores.contiguous()?.apply_op2(
            &mask.contiguous()?,
            AttentionProbs {
                scale: scale as f32,
                rows_per_batch: heads * queries,
                dropout,
            },
        )
    }
}

/// Softmax over the last dimension.
pub(super) struct Softmax;

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
                *ov = fast_exp(xv - max);
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
pub(super) struct SoftmaxGrad;

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

/// Softmax over the last dimension, differentiable, on the fused path (see
/// [`Kernels::softmax_last_dim`]).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Kernels::Fused.softmax_last_dim(x)
}

impl Kernels {
    /// Softmax over the last dimension, differentiable: fused on CPU f32, candle_nn's fused
    /// kernel with this crate's backward attached on CUDA, the composition elsewhere.
    pub fn softmax_last_dim(self, x: &Tensor) -> Result<Tensor> {
        if self.attaches(x) {
            return softmax_attached(x);
        }
        if !self.fuses(x) {
            return softmax_composed(x);
        }
        x.contiguous()?.apply_op1(Softmax)
    }
}
