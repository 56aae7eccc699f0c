//! Cross-entropy over rows of logits as one op: the log-sum-exp with the softmax kept for the
//! backward pass, which scales it in place.

#[allow(unused_imports)]
use super::*;

/// Mean cross-entropy of logits (n, classes) against class ids (n): one op whose backward is
/// `(softmax - onehot) / n`. candle_nn's `cross_entropy` is a log-softmax of five nodes, a
/// gather and a mean, each of which costs the backward pass a zero-filled buffer and an add the
/// size of the logits; with an 8k vocabulary at 800 masked positions that is 26 MB per node per
/// step. A forward pass that a backward pass can follow keeps each row's softmax, written in the
/// pass that takes the row's log-sum-exp, so the backward pass scales it in place instead of
/// taking the exp of every logit again (the two exp passes were ~2% of the small MLM step).
pub(super) struct CrossEntropy {
    /// Whether to keep the softmax for a backward pass.
    pub(super) keep: bool,
    pub(super) softmax: Mutex<Option<Vec<f32>>>,
}

/// Rows per rayon task in the cross-entropy kernels (fixed, so sums do not depend on threads).
pub(super) const CE_ROWS: usize = 64;

impl CrossEntropy {
    /// One row's loss, log-sum-exp minus the label's logit; with `probs` the row's softmax is
    /// written there.
    #[inline(always)]
    pub(super) fn row_loss(row: &[f32], label: usize, probs: Option<&mut [f32]>) -> f32 {
        let max = max_of(row);
        let lse = match probs {
            Some(p) => {
                for (pv, &v) in p.iter_mut().zip(row) {
                    *pv = fast_exp(v - max);
                }
                let sum = sum_by(p.len(), |i| p[i]);
                let inv = 1.0 / sum;
                p.iter_mut().for_each(|v| *v *= inv);
                max + sum.ln()
            }
            None => max + sum_by(row.len(), |i| fast_exp(row[i] - max)).ln(),
        };
        lse - row[label]
    }
}

pub(super) fn labels_u32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("kindling-cross-entropy: labels must be contiguous".into())
    })?;
    Ok(&s.as_slice::<u32>()?[start..end])
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kindling-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(s1, l1, self.name())?;
        let labels = labels_u32(s2, l2)?;
        let (n, classes) = l1.shape().dims2()?;
        if labels.len() != n {
            candle_core::bail!(
                "{}: {n} rows of logits, {} labels",
                self.name(),
                labels.len()
            )
        }
        if let Some(&bad) = labels.iter().find(|&&c| c as usize >= classes) {
            candle_core::bail!("{}: label {bad} out of {classes} classes", self.name())
        }
        // Rows in fixed chunks, partial sums added in order: the same on any thread count.
        let chunk_loss = |rows: &[f32], ls: &[u32], mut probs: Option<&mut [f32]>| {
            vectorised(|| {
                let mut total = 0f64;
                for (j, (row, &c)) in rows.chunks(classes).zip(ls).enumerate() {
                    let p = probs
                        .as_deref_mut()
                        .map(|p| &mut p[j * classes..(j + 1) * classes]);
                    total += Self::row_loss(row, c as usize, p) as f64;
                }
                total
            })
        };
        let partials: Vec<f64> = if self.keep {
            let rows = classes * CE_ROWS;
            let (probs, partials) = par_new_with(logits.len(), rows, |c, p| {
                let at = c * rows;
                let ls = &labels[c * CE_ROWS..(c * CE_ROWS + CE_ROWS).min(n)];
                chunk_loss(&logits[at..at + p.len()], ls, Some(p))
            });
            *self.softmax.lock().expect("cross-entropy softmax") = Some(probs);
            partials
        } else {
            logits
                .par_chunks(classes * CE_ROWS)
                .zip(labels.par_chunks(CE_ROWS))
                .map(|(rows, ls)| chunk_loss(rows, ls, None))
                .collect()
        };
        let mean = partials.iter().sum::<f64>() / n.max(1) as f64;
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let labels = labels.contiguous()?;
        let (sl, ll) = labels.storage_and_layout();
        let ls = match &*sl {
            candle_core::Storage::Cpu(s) => labels_u32(s, ll)?,
            _ => candle_core::bail!("{}: expected CPU labels", self.name()),
        };
        let (n, classes) = logits.dims2()?;
        let scale = g / n.max(1) as f32;
        // The kept softmax (taken: a second backward pass over the same graph recomputes it).
        let kept = self.softmax.lock().expect("cross-entropy softmax").take();
        let mut d = match kept {
            Some(p) => p,
            None => {
                let logits = logits.contiguous()?;
                let (sx, lx) = logits.storage_and_layout();
                let x = cpu_f32(&sx, lx)?;
                let mut p = zeros_par(x.len());
                p.par_chunks_mut(classes * CE_ROWS)
                    .zip(x.par_chunks(classes * CE_ROWS).zip(ls.par_chunks(CE_ROWS)))
                    .for_each(|(p, (rows, ls))| {
                        vectorised(|| {
                            for ((prow, row), &c) in
                                p.chunks_mut(classes).zip(rows.chunks(classes)).zip(ls)
                            {
                                Self::row_loss(row, c as usize, Some(prow));
                            }
                        })
                    });
                p
            }
        };
        // d = scale * (softmax - onehot(label))
        d.par_chunks_mut(classes * CE_ROWS)
            .zip(ls.par_chunks(CE_ROWS))
            .for_each(|(rows, ls)| {
                vectorised(|| {
                    for (drow, &c) in rows.chunks_mut(classes).zip(ls) {
                        drow.iter_mut().for_each(|v| *v *= scale);
                        drow[c as usize] -= scale;
                    }
                })
            });
        Ok((
            Some(Tensor::from_vec(d, logits.shape(), logits.device())?),
            None,
        ))
    }
}

/// Mean cross-entropy of `logits` (n, classes) against `labels` (n, u32); fused on CPU f32,
/// Kindling's kernel on CUDA (loss and gradient in one pass, in the logits' dtype with f32
/// sums), candle_nn's `cross_entropy` elsewhere.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::serves(logits) && labels.dtype() == DType::U32 && logits.rank() == 2 {
        return cuda::cross_entropy(logits, labels);
    }
    if !fused_ok(logits) || labels.dtype() != DType::U32 || logits.rank() != 2 {
        // Under mixed precision the loss is taken in f32, as autocast does.
        let logits = match logits.dtype() {
            DType::BF16 | DType::F16 => logits.to_dtype(DType::F32)?,
            _ => logits.clone(),
        };
        if labels.dtype() != DType::U32 || logits.rank() != 2 {
            return candle_nn::loss::cross_entropy(&logits, labels);
        }
        // candle_nn's cross_entropy less the gradient through the row maximum (log_softmax).
        let n = logits.dim(0)? as f64;
        return log_softmax(&logits)?
            .gather(&labels.unsqueeze(1)?, 1)?
            .sum_all()?
            .affine(-1.0 / n, 0.0);
    }
    logits.contiguous()?.apply_op2(
        &labels.contiguous()?,
        CrossEntropy {
            keep: logits.track_op(),
            softmax: Mutex::new(None),
        },
    )
}
