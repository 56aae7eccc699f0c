//! Self-attention as one op on CPU: the query, key and value products, the probabilities and the
//! output product in one pass per head, optionally at a subset of query rows.

#[allow(unused_imports)]
use super::*;

/// The most a layer's attention probabilities may take to be kept from the forward pass to
/// the backward pass (see [`SelfAttention::can_keep_probs`]).
pub(super) const KEEP_PROBS_BYTES: usize = 64 << 20;

/// Multi-head self-attention from the projected q, k, v, each flat (batch * seq, hidden) with
/// head `n` in columns `n * head_dim..`: ctx = dropout(softmax(q k^T * scale + mask)) v, flat
/// the same way. One op with a hand-written backward: the per-head products are small gemms
/// run one per thread (over batch elements) and read heads in place through strides, so there
/// are no transposed copies. The backward pass uses the probabilities the forward pass kept
/// when they fit ([`SelfAttention::forward_keeping`]) and otherwise recomputes them (as
/// FlashAttention does). Dropout draws the same elements as [`attention_probs`] on a (batch,
/// heads, seq, seq) tensor.
///
/// With [`SelfAttention::with_query_rows`] only some positions query (`q` and the context then
/// hold just those rows, while `k` and `v` keep every position): the last encoder layer of a
/// masked-LM step needs its output only where the loss reads it.
pub(crate) struct SelfAttention {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
    /// (batch, seq) additive mask.
    pub(super) mask: Vec<f32>,
    pub(super) probs: AttentionProbs,
    /// The querying rows (flat `b * seq + t`, strictly increasing) when not every position
    /// queries, and where each batch element's rows start among them (batch + 1 entries).
    pub(super) query_rows: Option<(Vec<u32>, Vec<usize>)>,
    /// A sliding window: position i attends to j only when |i - j| <= window (ModernBERT's
    /// local layers). `None`: every position.
    pub(super) window: Option<usize>,
}

/// Whether `rows` can be [`SelfAttention::with_query_rows`]'s list for `n` rows: strictly
/// increasing and below `n`.
pub(crate) fn rows_can_query(rows: &[u32], n: usize) -> bool {
    rows.windows(2).all(|w| w[0] < w[1]) && rows.last().is_none_or(|&r| (r as usize) < n)
}

/// `dst (m, n) = lhs (m, k) @ rhs (k, n)`, single-threaded, every operand given by its pointer,
/// column stride and row stride.
///
/// SAFETY: the caller guarantees each pointer addresses a matrix of the given shape and strides.
#[allow(clippy::too_many_arguments)]
unsafe fn small_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_cs, dst_rs): (usize, usize),
    lhs: *const f32,
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: *const f32,
    (rhs_cs, rhs_rs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Splits `buf` into consecutive chunks of `lens[i] * width` elements.
pub(super) fn split_chunks<'a>(
    mut buf: &'a mut [f32],
    lens: &[usize],
    width: usize,
) -> Vec<&'a mut [f32]> {
    lens.iter()
        .map(|&n| {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut(n * width);
            buf = rest;
            head
        })
        .collect()
}

impl SelfAttention {
    /// `mask`: additive, (batch, seq) flat; `dropout`: (p, seed) of the probabilities.
    pub(crate) fn new(
        (batch, seq, heads): (usize, usize, usize),
        hidden: usize,
        mask: Vec<f32>,
        dropout: Option<(f32, u64)>,
    ) -> Self {
        let head_dim = hidden / heads;
        SelfAttention {
            batch,
            seq,
            heads,
            head_dim,
            mask,
            probs: AttentionProbs {
                scale: (1.0 / (head_dim as f64).sqrt()) as f32,
                rows_per_batch: heads * seq,
                dropout,
            },
            query_rows: None,
            window: None,
        }
    }

    /// Restricts attention to a sliding window (see [`SelfAttention::window`]).
    pub(crate) fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    /// Only `rows` (flat `b * seq + t`) query: `q`, the context and dq then have one row per
    /// entry. `None` unless the rows are strictly increasing and inside the batch (callers then
    /// compute every row and select).
    pub(crate) fn with_query_rows(mut self, rows: &[u32]) -> Option<Self> {
        if !rows_can_query(rows, self.batch * self.seq) {
            return None;
        }
        let starts = (0..=self.batch)
            .map(|b| rows.partition_point(|&r| (r as usize) < b * self.seq))
            .collect();
        self.query_rows = Some((rows.to_vec(), starts));
        Some(self)
    }

    /// How many rows query (q's rows).
    pub(crate) fn query_count(&self) -> usize {
        match &self.query_rows {
            Some((rows, _)) => rows.len(),
            None => self.batch * self.seq,
        }
    }

    /// Batch element `bi`'s querying rows, as indices into q's rows.
    pub(super) fn queries_of(&self, bi: usize) -> std::ops::Range<usize> {
        match &self.query_rows {
            Some((_, starts)) => starts[bi]..starts[bi + 1],
            None => bi * self.seq..(bi + 1) * self.seq,
        }
    }

    /// The sequence position of q's row `j`.
    pub(super) fn position_of(&self, j: usize) -> usize {
        match &self.query_rows {
            Some((rows, _)) => rows[j] as usize % self.seq,
            None => j % self.seq,
        }
    }

    /// Query counts of every batch element.
    pub(super) fn query_counts(&self) -> Vec<usize> {
        (0..self.batch).map(|b| self.queries_of(b).len()).collect()
    }

    /// Offset of (batch `bi`, head `hd`, query position `pos`)'s row in the dropout stream of
    /// a (batch, heads, seq, seq) tensor.
    pub(super) fn stream_offset(&self, bi: usize, hd: usize, pos: usize) -> u64 {
        (((bi * self.heads + hd) * self.seq + pos) * self.seq) as u64
    }

    /// The context (queries, hidden) from q (queries, hidden) and k, v (batch * seq, hidden).
    pub(crate) fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        self.forward_keeping(q, k, v, false).0
    }

    /// Whether a training forward keeps the probabilities for the backward pass: when they take
    /// at most [`KEEP_PROBS_BYTES`] (the small MLM step's 32 x 8 heads x 128^2 take 16.8 MB a
    /// layer; BERT-base at batch 128 would take 100 MB a layer and recomputes them).
    pub(crate) fn can_keep_probs(&self) -> bool {
        self.query_count() * self.heads * self.seq * 4 <= KEEP_PROBS_BYTES
    }

    /// The context, and with `keep` the softmax probabilities before dropout (per batch
    /// element, per head, (queries, seq)), for [`SelfAttention::backward`]: it then skips
    /// recomputing q k^T and the softmax.
    pub(crate) fn forward_keeping(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        keep: bool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let (t, d) = (self.seq, self.head_dim);
        let h = self.heads * d;
        let counts = self.query_counts();
        let m = self.query_count();
        let mut out = zeros_par(m * h);
        let mut kept = if keep {
            zeros_par(m * self.heads * t)
        } else {
            Vec::new()
        };
        let batch_ctx = |bi: usize, ctx: &mut [f32], mut ys: Option<&mut [f32]>| {
            let queries = self.queries_of(bi);
            let mb = queries.len();
            if mb == 0 {
                return;
            }
            vectorised(|| {
                let mut p = vec![0f32; mb * t];
                let mut scratch = if ys.is_none() {
                    vec![0f32; mb * t]
                } else {
                    Vec::new()
                };
                for hd in 0..self.heads {
                    let y = match ys.as_deref_mut() {
                        Some(all) => &mut all[hd * mb * t..(hd + 1) * mb * t],
                        None => &mut scratch[..],
                    };
                    let dropped = self.head_probs(bi, hd, queries.clone(), q, k, y, &mut p);
                    let p = if dropped { &p[..] } else { &y[..] };
                    // SAFETY: ctx is batch bi's (mb, h) block of the context; head hd is its
                    // (mb, d) sub-block at column hd*d with row stride h; v's head block is
                    // (t, d) with row stride h; p is (mb, t).
                    unsafe {
                        small_gemm(
                            (mb, d, t),
                            ctx[hd * d..].as_mut_ptr(),
                            (1, h),
                            p.as_ptr(),
                            (1, t),
                            v[bi * t * h + hd * d..].as_ptr(),
                            (1, h),
                        );
                    }
                }
            })
        };
        let ctxs = split_chunks(&mut out, &counts, h);
        if keep {
            ctxs.into_par_iter()
                .zip(split_chunks(&mut kept, &counts, self.heads * t))
                .enumerate()
                .for_each(|(bi, (ctx, ys))| batch_ctx(bi, ctx, Some(ys)));
        } else {
            ctxs.into_par_iter()
                .enumerate()
                .for_each(|(bi, ctx)| batch_ctx(bi, ctx, None));
        }
        (out, keep.then_some(kept))
    }

    /// (dq, dk, dv) from q, k, v and dL/dcontext; `probs`: what
    /// [`SelfAttention::forward_keeping`] kept, if it kept them (else they are recomputed).
    pub(crate) fn backward(
        &self,
        qs: &[f32],
        ks: &[f32],
        vs: &[f32],
        dout: &[f32],
        probs: Option<&[f32]>,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, d) = (self.seq, self.head_dim);
        let h = self.heads * d;
        let n = ks.len();
        let counts = self.query_counts();
        let (mut dq, mut dk, mut dv) = (zeros_par(qs.len()), zeros_par(n), zeros_par(n));
        let dqs = split_chunks(&mut dq, &counts, h);
        // Each batch element's kept probabilities: heads x (queries, seq).
        let kept_of: Vec<Option<&[f32]>> = match probs {
            Some(mut all) => counts
                .iter()
                .map(|&mb| {
                    let (head, rest) = all.split_at(mb * self.heads * t);
                    all = rest;
                    Some(head)
                })
                .collect(),
            None => vec![None; self.batch],
        };
        dqs.into_par_iter()
            .zip(dk.par_chunks_mut(t * h).zip(dv.par_chunks_mut(t * h)))
            .zip(kept_of)
            .enumerate()
            .for_each(|(bi, ((dq, (dk, dv)), kept))| {
                let queries = self.queries_of(bi);
                let (a, mb) = (queries.start, queries.len());
                if mb == 0 {
                    return;
                }
                vectorised(|| {
                    let (mut ybuf, mut pbuf, mut ds) =
                        (vec![0f32; mb * t], vec![0f32; mb * t], vec![0f32; mb * t]);
                    // dP of one row, read while the row is overwritten with dS.
                    let mut grow = vec![0f32; t];
                    for hd in 0..self.heads {
                        // y: the softmax; p: after dropout (y itself without dropout).
                        let (y, p): (&[f32], &[f32]) = match kept {
                            Some(all) => {
                                let y = &all[hd * mb * t..(hd + 1) * mb * t];
                                match self.probs.dropout {
                                    Some((drop, seed)) => {
                                        pbuf.copy_from_slice(y);
                                        for (i, row) in pbuf.chunks_mut(t).enumerate() {
                                            let pos = self.position_of(a + i);
                                            let at = self.stream_offset(bi, hd, pos);
                                            dropout_in_place(seed, at, drop, row);
                                        }
                                        (y, &pbuf)
                                    }
                                    None => (y, y),
                                }
                            }
                            None => {
                                let (y, p) = (&mut ybuf, &mut pbuf);
                                let dropped =
                                    self.head_probs(bi, hd, queries.clone(), qs, ks, y, p);
                                (&ybuf, if dropped { &pbuf } else { &ybuf })
                            }
                        };
                        let qbase = a * h + hd * d;
                        let kbase = bi * t * h + hd * d;
                        let col = hd * d;
                        // SAFETY (all four): q-side head blocks are (mb, d) with row stride h at
                        // qbase (q, dO) or at column col of this batch's dq block; k-side head
                        // blocks are (t, d) with row stride h at kbase (k, v) or at column col
                        // of this batch's dk, dv blocks; p, y, ds are (mb, t); transposes are
                        // read by swapping the two strides.
                        unsafe {
                            // dV = P^T dO
                            small_gemm(
                                (t, d, mb),
                                dv[col..].as_mut_ptr(),
                                (1, h),
                                p.as_ptr(),
                                (t, 1),
                                dout[qbase..].as_ptr(),
                                (1, h),
                            );
                            // dP = dO V^T, into ds
                            small_gemm(
                                (mb, t, d),
                                ds.as_mut_ptr(),
                                (1, t),
                                dout[qbase..].as_ptr(),
                                (1, h),
                                vs[kbase..].as_ptr(),
                                (h, 1),
                            );
                        }
                        // dS = scale * y * (dropout(dP) - rowsum(y * dropout(dP)))
                        for i in 0..mb {
                            let row = &mut ds[i * t..(i + 1) * t];
                            grow.copy_from_slice(row);
                            let offset = self.stream_offset(bi, hd, self.position_of(a + i));
                            attention_row_grad(
                                &self.probs,
                                row,
                                &y[i * t..(i + 1) * t],
                                &grow,
                                offset as usize,
                            );
                        }
                        unsafe {
                            // dQ = dS K
                            small_gemm(
                                (mb, d, t),
                                dq[col..].as_mut_ptr(),
                                (1, h),
                                ds.as_ptr(),
                                (1, t),
                                ks[kbase..].as_ptr(),
                                (1, h),
                            );
                            // dK = dS^T Q
                            small_gemm(
                                (t, d, mb),
                                dk[col..].as_mut_ptr(),
                                (1, h),
                                ds.as_ptr(),
                                (t, 1),
                                qs[qbase..].as_ptr(),
                                (1, h),
                            );
                        }
                    }
                })
            });
        (dq, dk, dv)
    }

    /// Probabilities of head `hd` of batch element `bi` for q's rows `queries` (mb of them):
    /// the softmax before dropout into `y` (mb, seq), and with dropout the probabilities after
    /// it into `p` (then returns true; without dropout `y` is both and `p` is not written).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn head_probs(
        &self,
        bi: usize,
        hd: usize,
        queries: std::ops::Range<usize>,
        q: &[f32],
        k: &[f32],
        y: &mut [f32],
        p: &mut [f32],
    ) -> bool {
        let (t, h, d) = (self.seq, self.heads * self.head_dim, self.head_dim);
        let mb = queries.len();
        // SAFETY: q is (queries, h) and k (batch * seq, h); head hd's blocks are (mb, d) at
        // row queries.start and (t, d) at row bi * t, column hd * d, row stride h; k^T is read
        // with column stride h and row stride 1. y is (mb, t).
        unsafe {
            small_gemm(
                (mb, t, d),
                y.as_mut_ptr(),
                (1, t),
                q[queries.start * h + hd * d..].as_ptr(),
                (1, h),
                k[bi * t * h + hd * d..].as_ptr(),
                (h, 1),
            );
        }
        let mask = &self.mask[bi * t..(bi + 1) * t];
        let mut row = vec![0f32; t];
        let mut banded = Vec::new();
        for i in 0..mb {
            row.copy_from_slice(&y[i * t..(i + 1) * t]);
            let mask = match self.window {
                None => mask,
                Some(w) => {
                    // The batch's key mask, and keys outside the window as padding.
                    let pos = self.position_of(queries.start + i);
                    banded.clear();
                    banded.extend(mask.iter().enumerate().map(|(j, &m)| {
                        if pos.abs_diff(j) > w {
                            m - 1e9
                        } else {
                            m
                        }
                    }));
                    &banded[..]
                }
            };
            self.probs
                .softmax_row(&mut y[i * t..(i + 1) * t], &row, mask);
        }
        let Some((drop, seed)) = self.probs.dropout else {
            return false;
        };
        p.copy_from_slice(y);
        for (i, row) in p.chunks_mut(t).enumerate() {
            let at = self.stream_offset(bi, hd, self.position_of(queries.start + i));
            dropout_in_place(seed, at, drop, row);
        }
        true
    }
}

/// The f32 slice of a contiguous tensor's storage in a backward pass (which gets tensors, not
/// storages); an error for other devices.
pub(crate) fn cpu_f32<'a>(s: &'a candle_core::Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(s) => contiguous_f32(s, l, "kindling backward"),
        _ => candle_core::bail!("kindling backward: expected CPU storage"),
    }
}

impl CustomOp3 for SelfAttention {
    fn name(&self) -> &'static str {
        "kindling-self-attention"
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
        let q = contiguous_f32(s1, l1, self.name())?;
        let k = contiguous_f32(s2, l2, self.name())?;
        let v = contiguous_f32(s3, l3, self.name())?;
        Ok((CpuStorage::F32(self.forward(q, k, v)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let ((sq, lq), (sk, lk), (sv, lv), (sg, lg)) = (
            q.storage_and_layout(),
            k.storage_and_layout(),
            v.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let (dq, dk, dv) = self.backward(
            cpu_f32(&sq, lq)?,
            cpu_f32(&sk, lk)?,
            cpu_f32(&sv, lv)?,
            cpu_f32(&sg, lg)?,
            None,
        );
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Multi-head self-attention on the fused path (see [`Kernels::self_attention_windowed`]).
pub fn self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: (usize, usize, usize),
    mask: &Tensor,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    Kernels::Fused.self_attention_windowed(q, k, v, dims, mask, None, dropout)
}

/// Windowed self-attention on the fused path (see [`Kernels::self_attention_windowed`]).
pub fn self_attention_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: (usize, usize, usize),
    mask: &Tensor,
    window: Option<usize>,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    Kernels::Fused.self_attention_windowed(q, k, v, dims, mask, window, dropout)
}

impl Kernels {
    /// Multi-head self-attention context from projected `q`, `k`, `v` (each (batch * seq, hidden),
    /// heads side by side): `dropout(softmax(q k^T / sqrt(head_dim) + mask)) v`, flat the same way;
    /// position i attends to j only when |i - j| <= `window` when there is one (ModernBERT's local
    /// layers; HF's `sliding_window_bidirectional_overlay`). `mask` is additive, (batch, seq).
    /// Fused on CPU f32 (see `SelfAttention`), composed elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub fn self_attention_windowed(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (batch, seq, heads): (usize, usize, usize),
        mask: &Tensor,
        window: Option<usize>,
        dropout: Option<(f32, u64)>,
    ) -> Result<Tensor> {
        let hidden = q.dim(1)?;
        let head_dim = hidden / heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        if !self.fuses(q) {
            let split = |x: &Tensor| -> Result<Tensor> {
                x.reshape((batch, seq, heads, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
            let mut scores = qh.matmul(&kh.t()?)?;
            if let Some(w) = window {
                // Outside the band as padding (before the scale, which keeps it very negative).
                let band: Vec<f32> = (0..seq * seq)
                    .map(|n| {
                        if (n / seq).abs_diff(n % seq) > w {
                            -1e9
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let band =
                    Tensor::from_vec(band, (seq, seq), q.device())?.to_dtype(scores.dtype())?;
                scores = scores.broadcast_add(&band)?;
            }
            let probs = self.attention_probs(&scores, mask, scale, dropout)?;
            return probs
                .matmul(&vh)?
                .transpose(1, 2)?
                .reshape((batch * seq, hidden));
        }
        let op = SelfAttention::new(
            (batch, seq, heads),
            hidden,
            mask.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            dropout,
        )
        .with_window(window);
        debug_assert_eq!(op.batch * op.seq, q.dim(0)?);
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    }
}
