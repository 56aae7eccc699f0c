//! Counter-based dropout: a mask element is a function of (seed, index), so masks are the same
//! on any thread count and after a resume; the seeded dropout op.

#[allow(unused_imports)]
use super::*;

/// Dropout's keep test for element `i` of the mask stream `seed`, shared by the fused kernels
/// and the composed fallback so both drop the same elements. One SplitMix64 output gives the
/// 16-bit draws of four consecutive elements (p is resolved to 1/65536).
#[inline(always)]
pub fn keep_at(seed: u64, i: u64, p: f32) -> bool {
    lane(dropout_word(seed, i >> 2), i) >= dropout_threshold(p)
}

#[inline(always)]
pub(super) fn dropout_word(seed: u64, word: u64) -> u64 {
    kindling_core::rng::mix64(seed ^ word.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

#[inline(always)]
pub(super) fn lane(word: u64, i: u64) -> u32 {
    ((word >> ((i & 3) * 16)) & 0xffff) as u32
}

pub(super) fn dropout_threshold(p: f32) -> u32 {
    (p * 65536.0).round() as u32
}

/// Inverted dropout in place on `xs`, which holds elements `offset..` of the stream `seed`:
/// kept elements are scaled by 1 / (1 - p), dropped ones zeroed. Same draws as [`keep_at`].
pub fn dropout_in_place(seed: u64, offset: u64, p: f32, xs: &mut [f32]) {
    let (threshold, scale) = (dropout_threshold(p), 1.0 / (1.0 - p));
    let mut word = (offset >> 2, dropout_word(seed, offset >> 2));
    for (j, x) in xs.iter_mut().enumerate() {
        let i = offset + j as u64;
        if i >> 2 != word.0 {
            word = (i >> 2, dropout_word(seed, i >> 2));
        }
        *x = if lane(word.1, i) >= threshold {
            *x * scale
        } else {
            0.0
        };
    }
}

/// [`dropout_in_place`] over a whole buffer (stream offset 0), in parallel chunks.
pub(crate) fn dropout_par(seed: u64, p: f32, xs: &mut [f32]) {
    const CHUNK: usize = 16_384;
    xs.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, o)| vectorised(|| dropout_in_place(seed, (c * CHUNK) as u64, p, o)));
}

/// Dropout on rows `first..` of a chunk of `xs` rows (of width `h`), each element drawing as at
/// its place in the full (rows, h) tensor: `rows` maps the chunk's rows to their rows there,
/// when a kernel keeps only some (the last encoder layer of a masked-LM step).
pub(crate) fn drop_rows(
    (p, seed): (f32, u64),
    chunk: &mut [f32],
    first: usize,
    h: usize,
    rows: Option<&[u32]>,
) {
    for (j, row) in chunk.chunks_mut(h).enumerate() {
        let r = rows.map_or(first + j, |rows| rows[first + j] as usize);
        dropout_in_place(seed, (r * h) as u64, p, row);
    }
}

/// `dropout(g)` (rows of width `h`, see [`drop_rows`]) as a new buffer, built in parallel: the
/// backward pass's copy of a gradient whose undropped form flows on too (through a residual)
/// or is not the caller's to change.
pub(crate) fn dropped(
    dropout: Option<(f32, u64)>,
    g: &[f32],
    h: usize,
    rows: Option<&[u32]>,
) -> Vec<f32> {
    let per = rows_per_task(h);
    par_new(g.len(), per * h, |c, out| {
        out.copy_from_slice(&g[c * per * h..c * per * h + out.len()]);
        if let Some(d) = dropout {
            vectorised(|| drop_rows(d, out, c * per, h, rows));
        }
    })
}

/// Inverted dropout whose keep-mask is [`keep_at`]`(seed, i, p)`, recomputed rather than stored:
/// the backward pass is the same masking applied to the gradient.
pub(super) struct SeededDropout {
    pub(super) p: f32,
    pub(super) seed: u64,
}

impl CustomOp1 for SeededDropout {
    fn name(&self) -> &'static str {
        "kindling-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let mut out = x.to_vec();
        dropout_par(self.seed, self.p, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(SeededDropout {
            p: self.p,
            seed: self.seed,
        })?))
    }
}

/// Seeded inverted dropout on the fused path (see [`Kernels::seeded_dropout`]).
pub fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    Kernels::Fused.seeded_dropout(x, p, seed)
}

impl Kernels {
    /// Inverted dropout with the mask stream `seed`; fused on CPU f32 (the mask is never
    /// stored), a product with the mask elsewhere (the same elements dropped on CPU).
    pub fn seeded_dropout(self, x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
        if self.fuses(x) {
            return x.contiguous()?.apply_op1(SeededDropout { p, seed });
        }
        x * dropout_mask(x, p, seed)?
    }
}

/// The scaled keep-mask of inverted dropout over a tensor shaped as `x`, in its dtype: 1 / (1 -
/// p) where [`keep_at`]`(seed, i, p)` keeps element i, 0 elsewhere.
pub(crate) fn dropout_mask(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let scale = 1.0 / (1.0 - p);
    #[cfg(feature = "cuda")]
    if cuda::serves(x) {
        // The CPU's draws, made on the device by a kernel: GPU runs drop what CPU runs drop.
        return cuda::dropout_mask(x, p, seed);
    }
    if !x.device().is_cpu() {
        // On other GPUs the keep-mask comes from the device's generator (seeded once per run, see
        // `Device::set_seed`): a host-made mask would cost a transfer of the whole tensor per
        // dropout site. Runs repeat from the same seed, but masks differ from the CPU's.
        let keep = Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(p as f64)?;
        return keep.to_dtype(x.dtype())? * scale as f64;
    }
    let n = x.elem_count();
    let mask: Vec<f32> = (0..n as u64)
        .map(|i| if keep_at(seed, i, p) { scale } else { 0.0 })
        .collect();
    Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
}
