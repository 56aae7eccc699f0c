//! Fused CPU kernels with real backward passes for the hot spots of a BERT step: linear layers
//! with their bias, LayerNorm, the attention probabilities (scale, mask, softmax, dropout), GELU
//! and dropout.
//!
//! candle_nn's fused `layer_norm` and `softmax_last_dim` have no backward (they silently cut the
//! gradient); their differentiable compositions (`layer_norm_slow`, `ops::softmax`) cost five to
//! ten passes over memory forward and more backward, mostly on one thread. Every op candle
//! records also costs a zero-filled gradient buffer and an add in the backward pass, so fewer,
//! larger ops are faster even when the arithmetic is the same. Here each direction is one pass
//! per row, rows shared out with rayon in fixed-size chunks (so sums do not depend on the thread
//! count). Other devices and dtypes fall back to the compositions. The tests below check every
//! fused op against its composition, forward and backward.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D,
};
use kindling_core::attach::{attach_grad, ValueGrad};
use rayon::prelude::*;
use std::sync::Mutex;

/// Runs `f` compiled for AVX2 + FMA where the CPU has them (checked once, then cached by std).
/// The crate is built for baseline x86-64 (SSE2) so that one binary runs on any x86-64; the
/// element-wise loops of these kernels (exp, GELU, LayerNorm, dropout) were 20% of a bert-mini
/// step at 4 lanes. `f` is inlined into the feature-enabled function and vectorised with 8.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `with_avx2` is compiled for (checked above).
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// Rows per rayon task: small rows are cheap, so hand out enough work per task.
pub(crate) fn rows_per_task(row: usize) -> usize {
    (16_384 / row.max(1)).max(1)
}

/// A new buffer of `len` floats, built in parallel chunks of `chunk` elements: each rayon task
/// zero-fills its chunk and hands it to `f` with the chunk's index.
///
/// Why not `vec![0f32; len]`: for a buffer the allocator serves from its heap (most of a
/// step's, once the first step has freed its buffers) that is one thread's memset over the
/// whole buffer while the other threads wait, then a second pass to write it; the profile of
/// the small MLM step had the main thread zero-filling alone for ~4% of the step. Here the
/// fill is shared out and lands in the cache the task then writes from.
pub(crate) fn par_new(len: usize, chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    par_new_with(len, chunk, f).0
}

/// [`par_new`] whose tasks also return a value each, collected in chunk order (partial sums
/// a caller adds in a fixed order).
pub(crate) fn par_new_with<R: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> (Vec<f32>, Vec<R>) {
    let mut out = Vec::with_capacity(len);
    let results = out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, c)| {
            c.fill(std::mem::MaybeUninit::new(0.0));
            // SAFETY: every element of `c` was initialised on the line above.
            let c = unsafe { &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            f(i, c)
        })
        .collect();
    // SAFETY: the chunks cover `..len`, and every chunk was initialised above.
    unsafe { out.set_len(len) };
    (out, results)
}

/// `vec![0f32; len]`, zero-filled by every thread (see [`par_new`]).
pub(crate) fn zeros_par(len: usize) -> Vec<f32> {
    par_new(len, 1 << 16, |_, _| {})
}

/// `out[row] = f(x[row])` over rows of length `n` (an element-wise map may pick any `n`).
fn map_rows(x: &[f32], n: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let chunk = n * rows_per_task(n);
    par_new(x.len(), chunk, |c, o| {
        let xs = &x[c * chunk..c * chunk + o.len()];
        vectorised(|| {
            for (orow, xrow) in o.chunks_mut(n).zip(xs.chunks(n)) {
                f(orow, xrow);
            }
        })
    })
}

/// `out[row] = f(a[row], b[row])` over rows of length `n`.
fn map_rows2(
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    let chunk = n * rows_per_task(n);
    par_new(a.len(), chunk, |c, o| {
        let (xs, ys) = (
            &a[c * chunk..c * chunk + o.len()],
            &b[c * chunk..c * chunk + o.len()],
        );
        vectorised(|| {
            for ((orow, arow), brow) in o.chunks_mut(n).zip(xs.chunks(n)).zip(ys.chunks(n)) {
                f(orow, arow, brow);
            }
        })
    })
}

/// Row length used for element-wise maps.
const ELEMENTWISE_ROW: usize = 1024;

/// The f32 slice of a contiguous CPU tensor's storage; an error naming `op` otherwise.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// The activations a one-node op's forward pass kept for its backward pass (see
/// `fused_layer.rs`, `fused_resnet.rs`), or an error naming the op when none were kept.
pub(crate) fn saved_activations<'a, T>(slot: &'a Option<T>, op: &str) -> Result<&'a T> {
    slot.as_ref()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: backward without saved activations")))
}

pub(crate) fn fused_ok(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// exp for f32 in straight-line code LLVM vectorises (libm's `expf` is a call per element):
/// Cephes' range reduction x = n ln2 + r and a degree-6 polynomial for e^r; relative error
/// about 2e-7. Inputs are clamped to [-87, 88] (the normal f32 range of e^x), and below -87 the
/// result is exactly 0, as libm's underflows: the clamped value, e^-87 = 1.6e-38, turns
/// subnormal once a softmax divides it by its sum, and subnormal operands slow the FMA units
/// down about 100-fold. Padding positions (mask -1e9) made SimCSE steps on padded batches 3-4x
/// slower before this. NaN stays NaN.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    if x < -87.0 {
        return 0.0;
    }
    let x = if x > 88.0 { 88.0 } else { x }; // not `min`: NaN must stay NaN
                                             // Round to nearest with an add instead of `round()` (a libm call without SSE4.1).
    const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23
    let n = (x * std::f32::consts::LOG2_E + SHIFTER) - SHIFTER;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), with `fast_exp`.
/// Returns (erf(x), e^{-x^2}); the GELU gradient needs the second too.
#[inline(always)]
fn fast_erf_and_gauss(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_72) * t
        + 0.254_829_6)
        * t;
    let gauss = fast_exp(-a * a);
    ((1.0 - poly * gauss).copysign(x), gauss)
}

/// Dropout's keep test for element `i` of the mask stream `seed`, shared by the fused kernels
/// and the composed fallback so both drop the same elements. One SplitMix64 output gives the
/// 16-bit draws of four consecutive elements (p is resolved to 1/65536).
#[inline(always)]
pub fn keep_at(seed: u64, i: u64, p: f32) -> bool {
    lane(dropout_word(seed, i >> 2), i) >= dropout_threshold(p)
}

#[inline(always)]
fn dropout_word(seed: u64, word: u64) -> u64 {
    kindling_core::rng::mix64(seed ^ word.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

#[inline(always)]
fn lane(word: u64, i: u64) -> u32 {
    ((word >> ((i & 3) * 16)) & 0xffff) as u32
}

fn dropout_threshold(p: f32) -> u32 {
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

/// Sums the columns of a row-major `(rows, n)` matrix. Rows are summed in fixed chunks and the
/// partial sums added in order, so the result is the same on any thread count.
pub(crate) fn column_sums(x: &[f32], n: usize) -> Vec<f32> {
    const ROWS: usize = 64;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(n * ROWS)
        .map(|c| {
            vectorised(|| {
                let mut acc = vec![0f32; n];
                for row in c.chunks(n) {
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
                acc
            })
        })
        .collect();
    let mut out = vec![0f32; n];
    for p in partials {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// Eight running sums (one vector register of AVX2), added at the end in a fixed order. A
/// single running sum fixes the order of every addition, which keeps LLVM from vectorising the
/// loop (float addition is not associative); this order is as deterministic and vectorises.
#[inline(always)]
fn sum_by(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
    }
    let mut total =
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in whole..n {
        total += f(i);
    }
    total
}

/// The largest element (NEG_INFINITY for an empty slice), eight lanes at a time.
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    m
}

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum_by(x.len(), |i| x[i]) / n;
    let var = sum_by(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

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
struct LayerNormOp {
    eps: f32,
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
struct LayerNormGrad {
    eps: f32,
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

/// LayerNorm over the last dimension with scale and shift; one fused op (with backward) on CPU
/// f32, the differentiable composition elsewhere.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if attach_kernels(x) {
        // candle_nn's kernel normalises (in f32 inside); scale and shift in x's dtype.
        return normalize_attached(x, eps)?
            .broadcast_mul(&weight.to_dtype(x.dtype())?)?
            .broadcast_add(&bias.to_dtype(x.dtype())?);
    }
    if !fused_ok(x) {
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

/// A row-major matrix operand: data with its row and column strides (a transpose swaps them).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

pub(crate) fn mat(data: &[f32], cols: usize) -> Mat<'_> {
    Mat {
        data,
        rs: cols,
        cs: 1,
    }
}

pub(crate) fn mat_t(data: &[f32], cols: usize) -> Mat<'_> {
    Mat {
        data,
        rs: 1,
        cs: cols,
    }
}

/// `dst (m, n) = [dst +] lhs (m, k) @ rhs (k, n)`, dst row-major and dense; gemm's own threads.
pub(crate) fn gemm_into(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    gemm_dense(dims, dst, accumulate, lhs, rhs, true)
}

/// [`gemm_into`] on the calling thread only: for many small products run as rayon tasks.
pub(crate) fn gemm_serial_into(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    gemm_dense(dims, dst, accumulate, lhs, rhs, false)
}

/// [`gemm_serial_into`] without accumulation into a buffer that need not be initialised: gemm
/// writes every element of `dst[..m * n]` without reading it, so the zero fill a `Vec<f32>`
/// would need (a memory pass over every convolution's output) is skipped. Returns the written
/// elements.
pub(crate) fn gemm_serial_uninit<'a>(
    (m, n, k): (usize, usize, usize),
    dst: &'a mut [std::mem::MaybeUninit<f32>],
    lhs: Mat,
    rhs: Mat,
) -> &'a mut [f32] {
    assert!(dst.len() >= m * n);
    let dst = &mut dst[..m * n];
    if m == 0 || n == 0 || k == 0 {
        dst.iter_mut().for_each(|v| {
            v.write(0.0);
        });
    } else {
        // SAFETY: with `accumulate` false gemm only writes `dst`, every element of it.
        unsafe { gemm_raw((m, n, k), dst.as_mut_ptr().cast(), false, lhs, rhs, false) };
    }
    // SAFETY: every element was written above.
    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// gemm on candle's thread count if `parallel`, else on the calling thread.
fn gemm_dense(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallel: bool,
) {
    assert!(dst.len() >= m * n);
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: `dst` holds m * n initialised elements (asserted above).
    unsafe { gemm_raw((m, n, k), dst.as_mut_ptr(), accumulate, lhs, rhs, parallel) }
}

/// The gemm call behind [`gemm_dense`] and [`gemm_serial_uninit`]: `dst` (m, n) row-major
/// (+)= lhs (m, k) @ rhs (k, n).
///
/// # Safety
/// `dst` must be valid for writes of m * n elements, and initialised if `accumulate`; m, n, k
/// must be non-zero.
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallel: bool,
) {
    assert!(lhs.data.len() > (m - 1) * lhs.rs + (k - 1) * lhs.cs);
    assert!(rhs.data.len() > (k - 1) * rhs.rs + (n - 1) * rhs.cs);
    let threads = if parallel {
        candle_core::utils::get_num_threads()
    } else {
        1
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every element the strides address; the caller vouches
    // for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

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
struct LinearOp;

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

/// A linear layer, `xs @ weight^T + bias`, over the last dimension of `xs`; fused on CPU f32.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !fused_ok(xs) {
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

/// The attention probabilities in one op: dropout(softmax(scores * scale + mask)), where scores
/// is (batch, heads, queries, keys) and mask (batch, keys) is added to every row of its batch.
/// The backward pass recomputes the softmax from the scores and the dropout mask from its seed
/// rather than storing either.
struct AttentionProbs {
    scale: f32,
    /// heads * queries: the number of score rows per batch element.
    rows_per_batch: usize,
    dropout: Option<(f32, u64)>,
}

impl AttentionProbs {
    /// Softmax of one row of scaled, masked scores into `out`.
    #[inline]
    fn softmax_row(&self, out: &mut [f32], scores: &[f32], mask: &[f32]) {
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
    fn rows<'a>(
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
struct AttentionProbsGrad {
    fwd: AttentionProbs,
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

fn long_row_grad(
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
fn attention_row_grad(
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

/// `dropout(softmax(scores * scale + mask))` with scores (batch, heads, queries, keys) and an
/// additive mask (batch, keys); `dropout` is (p, seed) in training. Fused on CPU f32; elsewhere
/// the composed ops, which drop the same elements.
pub fn attention_probs(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let (b, heads, queries, keys) = scores.dims4()?;
    if !fused_ok(scores) {
        // The softmax runs in the mask's dtype (f32 under mixed precision, as autocast does)
        // and the probabilities come back in the scores' dtype.
        // On CUDA the fused softmax kernel accumulates in f32 itself, so the scores stay in
        // their dtype.
        let dtype = if attach_kernels(scores) {
            scores.dtype()
        } else {
            mask.dtype()
        };
        let scaled = (scores.to_dtype(dtype)? * scale)?;
        let mask = mask.to_dtype(dtype)?.reshape((b, 1, 1, keys))?;
        let probs = softmax_last_dim(&scaled.broadcast_add(&mask)?)?.to_dtype(scores.dtype())?;
        return match dropout {
            Some((p, seed)) => seeded_dropout(&probs, p, seed),
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

/// Softmax over the last dimension.
struct Softmax;

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
struct SoftmaxGrad;

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

/// Softmax over the last dimension, differentiable: fused on CPU f32, candle_nn's fused kernel
/// with [`AttachGrad`]'s backward on CUDA, the composition elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if attach_kernels(x) {
        return softmax_attached(x);
    }
    if !fused_ok(x) {
        return softmax_composed(x);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// Whether `x`'s softmax and LayerNorm use candle_nn's fused kernels with [`AttachGrad`]'s
/// backward: on CUDA, unless [`composed_requested`].
pub(crate) fn attach_kernels(x: &Tensor) -> bool {
    x.device().is_cuda() && !composed_requested()
}

/// `KINDLING_GPU_COMPOSED=1`: off the CPU f32 path, every op as candle's composition, each its
/// own autograd node (the encoder layer too: see `crate::explicit_layer`), to compare against.
pub(crate) fn composed_requested() -> bool {
    static COMPOSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *COMPOSED.get_or_init(|| std::env::var("KINDLING_GPU_COMPOSED").is_ok_and(|v| v == "1"))
}

/// Softmax from candle's ops with the row maximum detached: the result does not depend on the
/// shift, so its gradient through the maximum is zero, which candle would otherwise compute
/// with an equality mask, a product and a sum the size of the input.
fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let e = x
        .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log_softmax` over the last dimension, with the row maximum detached (see
/// [`softmax_composed`]).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// candle_nn's fused softmax kernel (one pass, f32 accumulation for bf16/f16; no backward of
/// its own) with the softmax gradient attached.
pub(crate) fn softmax_attached(x: &Tensor) -> Result<Tensor> {
    attach_grad(x, &softmax_value(x)?, AttachGrad::Softmax)
}

/// Softmax over the last dimension as a value (no graph): candle_nn's fused kernel where
/// [`attach_kernels`] holds, the composition elsewhere.
pub(crate) fn softmax_value(x: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    if attach_kernels(&x) {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    softmax_composed(&x)
}

/// LayerNorm without scale and shift, `(x - mean) / sqrt(var + eps)` over the last dimension:
/// candle_nn's fused kernel (f32 arithmetic inside for bf16/f16) with the gradient attached.
pub(crate) fn normalize_attached(x: &Tensor, eps: f64) -> Result<Tensor> {
    attach_grad(x, &normalize_value(x, eps)?, AttachGrad::Normalize { eps })
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension as a value (no graph), in f32
/// arithmetic and `x`'s dtype: candle_nn's fused kernel where [`attach_kernels`] holds, the
/// composition elsewhere.
pub(crate) fn normalize_value(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.detach();
    if attach_kernels(&x) {
        let h = x.dim(D::Minus1)?;
        let (one, zero) = (
            Tensor::ones(h, x.dtype(), x.device())?,
            Tensor::zeros(h, x.dtype(), x.device())?,
        );
        return candle_nn::ops::layer_norm(&x.contiguous()?, &one, &zero, eps as f32);
    }
    normalized_f32(&x, eps)?.0.to_dtype(x.dtype())
}

/// `(x^, r)` of LayerNorm over the last dimension in f32: x^ = (x - mean) * r, r = 1 /
/// sqrt(var + eps) (one per row).
fn normalized_f32(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let xf = x.to_dtype(DType::F32)?;
    let xc = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((xc.broadcast_mul(&r)?, r))
}

/// The gradient of a kernel that has no backward pass (candle_nn's fused GPU softmax and
/// LayerNorm), attached to its output with [`attach_grad`]: from candle's ops, so it runs on any
/// device; one autograd node instead of the five to fifteen of the composed function.
pub(crate) enum AttachGrad {
    /// value = softmax(input) over the last dimension.
    Softmax,
    /// value = (input - mean) / sqrt(var + eps) over the last dimension.
    Normalize { eps: f64 },
}

impl ValueGrad for AttachGrad {
    fn name(&self) -> &'static str {
        "kindling-attach-grad"
    }

    fn grad(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let dx = match self {
            // dx = y * (g - sum(g * y))
            AttachGrad::Softmax => {
                let gy = (g * y)?;
                (&gy - y.broadcast_mul(&gy.sum_keepdim(D::Minus1)?)?)?
            }
            // With x^ = (x - mean) * r, r = 1 / sqrt(var + eps), over n features:
            // dx = r * (g - mean(g) - x^ * mean(g * x^)). In f32 from x (x^ recomputed: the
            // value may be bf16).
            AttachGrad::Normalize { eps } => {
                let (xh, r) = normalized_f32(x, *eps)?;
                let gf = g.to_dtype(DType::F32)?;
                let inner = (gf.broadcast_sub(&gf.mean_keepdim(D::Minus1)?)?
                    - xh.broadcast_mul(&(&gf * &xh)?.mean_keepdim(D::Minus1)?)?)?;
                inner.broadcast_mul(&r)?.to_dtype(x.dtype())?
            }
        };
        Ok(dx)
    }
}

/// The most a layer's attention probabilities may take to be kept from the forward pass to
/// the backward pass (see [`SelfAttention::can_keep_probs`]).
const KEEP_PROBS_BYTES: usize = 64 << 20;

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
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    /// (batch, seq) additive mask.
    mask: Vec<f32>,
    probs: AttentionProbs,
    /// The querying rows (flat `b * seq + t`, strictly increasing) when not every position
    /// queries, and where each batch element's rows start among them (batch + 1 entries).
    query_rows: Option<(Vec<u32>, Vec<usize>)>,
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
fn split_chunks<'a>(mut buf: &'a mut [f32], lens: &[usize], width: usize) -> Vec<&'a mut [f32]> {
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
        }
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
    fn queries_of(&self, bi: usize) -> std::ops::Range<usize> {
        match &self.query_rows {
            Some((_, starts)) => starts[bi]..starts[bi + 1],
            None => bi * self.seq..(bi + 1) * self.seq,
        }
    }

    /// The sequence position of q's row `j`.
    fn position_of(&self, j: usize) -> usize {
        match &self.query_rows {
            Some((rows, _)) => rows[j] as usize % self.seq,
            None => j % self.seq,
        }
    }

    /// Query counts of every batch element.
    fn query_counts(&self) -> Vec<usize> {
        (0..self.batch).map(|b| self.queries_of(b).len()).collect()
    }

    /// Offset of (batch `bi`, head `hd`, query position `pos`)'s row in the dropout stream of
    /// a (batch, heads, seq, seq) tensor.
    fn stream_offset(&self, bi: usize, hd: usize, pos: usize) -> u64 {
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
    fn head_probs(
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
        for i in 0..mb {
            row.copy_from_slice(&y[i * t..(i + 1) * t]);
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

/// Multi-head self-attention context from projected `q`, `k`, `v` (each (batch * seq, hidden),
/// heads side by side): `dropout(softmax(q k^T / sqrt(head_dim) + mask)) v`, flat the same way.
/// `mask` is additive, (batch, seq). Fused on CPU f32 (see `SelfAttention`), composed elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (batch, seq, heads): (usize, usize, usize),
    mask: &Tensor,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let hidden = q.dim(1)?;
    let head_dim = hidden / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if !fused_ok(q) {
        let split = |x: &Tensor| -> Result<Tensor> {
            x.reshape((batch, seq, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
        let probs = attention_probs(&qh.matmul(&kh.t()?)?, mask, scale, dropout)?;
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
    );
    debug_assert_eq!(op.batch * op.seq, q.dim(0)?);
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Exact (erf) GELU, HF's "gelu": x * Phi(x).
struct Gelu;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

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
struct GeluGrad;

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
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + fast_erf_and_gauss(v * FRAC_1_SQRT_2).0)
}

/// dL/dx of GELU at `x` given dL/dy `g`: g * (Phi(x) + x * phi(x)).
pub(crate) fn gelu_grad_rows(x: &[f32], g: &[f32]) -> Vec<f32> {
    map_rows2(x, g, ELEMENTWISE_ROW, |o, xs, gs| {
        for ((ov, &xv), &gv) in o.iter_mut().zip(xs).zip(gs) {
            // e^{-(x/sqrt 2)^2} = e^{-x^2/2}: erf's Gaussian factor is the pdf's too.
            let (erf, gauss) = fast_erf_and_gauss(xv * FRAC_1_SQRT_2);
            let cdf = 0.5 * (1.0 + erf);
            let pdf = INV_SQRT_2PI * gauss;
            *ov = gv * (cdf + xv * pdf);
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

/// Exact GELU, differentiable; fused on CPU f32.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused_ok(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

/// Inverted dropout whose keep-mask is [`keep_at`]`(seed, i, p)`, recomputed rather than stored:
/// the backward pass is the same masking applied to the gradient.
struct SeededDropout {
    p: f32,
    seed: u64,
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

/// Inverted dropout with the mask stream `seed`; fused on CPU f32 (the mask is never stored).
pub fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if fused_ok(x) {
        return x.contiguous()?.apply_op1(SeededDropout { p, seed });
    }
    x * dropout_mask(x, p, seed)?
}

/// The scaled keep-mask of inverted dropout over a tensor shaped as `x`, in its dtype: 1 / (1 -
/// p) where [`keep_at`]`(seed, i, p)` keeps element i, 0 elsewhere.
pub(crate) fn dropout_mask(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let scale = 1.0 / (1.0 - p);
    if !x.device().is_cpu() {
        // On a GPU the keep-mask comes from the device's generator (seeded once per run, see
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

/// Mean cross-entropy of logits (n, classes) against class ids (n): one op whose backward is
/// `(softmax - onehot) / n`. candle_nn's `cross_entropy` is a log-softmax of five nodes, a
/// gather and a mean, each of which costs the backward pass a zero-filled buffer and an add the
/// size of the logits; with an 8k vocabulary at 800 masked positions that is 26 MB per node per
/// step. A forward pass that a backward pass can follow keeps each row's softmax, written in the
/// pass that takes the row's log-sum-exp, so the backward pass scales it in place instead of
/// taking the exp of every logit again (the two exp passes were ~2% of the small MLM step).
struct CrossEntropy {
    /// Whether to keep the softmax for a backward pass.
    keep: bool,
    softmax: Mutex<Option<Vec<f32>>>,
}

/// Rows per rayon task in the cross-entropy kernels (fixed, so sums do not depend on threads).
const CE_ROWS: usize = 64;

impl CrossEntropy {
    /// One row's loss, log-sum-exp minus the label's logit; with `probs` the row's softmax is
    /// written there.
    #[inline(always)]
    fn row_loss(row: &[f32], label: usize, probs: Option<&mut [f32]>) -> f32 {
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

fn labels_u32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
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
/// candle_nn's `cross_entropy` elsewhere.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_rel_diff;
    use candle_core::Var;

    fn randn((a, b, c): (usize, usize, usize), seed: u64) -> Tensor {
        crate::test_util::uniform(&[a, b, c], seed, 3.0)
    }

    /// Gradients of sum(f(x) * r) for the fused op and the composed one.
    fn grads(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor());
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    }

    /// The GPU paths, run here on the CPU: candle_nn's softmax and LayerNorm kernels with the
    /// attached backward passes, the composed softmax and cross-entropy with the maximum
    /// detached; each against the CPU op or candle's composition, forward and backward.
    #[test]
    fn attached_and_detached_max_paths_match_forward_and_backward() {
        let x = randn((4, 7, 33), 1);
        let r = randn((4, 7, 33), 2);
        let close = |(y1, g1): (Tensor, Tensor), (y2, g2): (Tensor, Tensor), what: &str| {
            let (dy, dg) = (max_rel_diff(&y1, &y2), max_rel_diff(&g1, &g2));
            assert!(dy < 1e-5 && dg < 1e-5, "{what}: value {dy}, gradient {dg}");
        };
        close(
            grads(|t| softmax_attached(t).unwrap(), &x, &r),
            grads(|t| t.apply_op1(Softmax).unwrap(), &x, &r),
            "attached softmax",
        );
        let x64 = x.to_dtype(DType::F64).unwrap();
        let r64 = r.to_dtype(DType::F64).unwrap();
        let f32s = |(a, b): (Tensor, Tensor)| {
            (
                a.to_dtype(DType::F32).unwrap(),
                b.to_dtype(DType::F32).unwrap(),
            )
        };
        close(
            f32s(grads(|t| softmax_composed(t).unwrap(), &x64, &r64)),
            f32s(grads(
                |t| candle_nn::ops::softmax(t, D::Minus1).unwrap(),
                &x64,
                &r64,
            )),
            "softmax, max detached",
        );
        // LayerNorm: the attached normalisation with scale and shift, against the CPU op, for
        // the input and both parameters.
        let (w, b) = (
            Var::from_tensor(&(randn((1, 1, 33), 3).flatten_all().unwrap() + 1.0).unwrap())
                .unwrap(),
            Var::from_tensor(&randn((1, 1, 33), 4).flatten_all().unwrap()).unwrap(),
        );
        let ln = |attached: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = if attached {
                normalize_attached(xv.as_tensor(), 1e-5)
                    .unwrap()
                    .broadcast_mul(w.as_tensor())
                    .unwrap()
                    .broadcast_add(b.as_tensor())
                    .unwrap()
            } else {
                layer_norm(xv.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap()
            };
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Tensor| g.get(v).unwrap().clone();
            (
                y,
                get(xv.as_tensor()),
                get(w.as_tensor()),
                get(b.as_tensor()),
            )
        };
        let (a, c) = (ln(true), ln(false));
        for (u, v, what) in [
            (&a.0, &c.0, "y"),
            (&a.1, &c.1, "dx"),
            (&a.2, &c.2, "dw"),
            (&a.3, &c.3, "db"),
        ] {
            let d = max_rel_diff(u, v);
            assert!(d < 1e-6, "attached LayerNorm {what}: {d}");
        }
        // Cross-entropy from the log_softmax with the maximum detached, against candle_nn's.
        let logits = randn((1, 9, 40), 5)
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let labels = Tensor::new(&[0u32, 3, 39, 7, 7, 12, 1, 30, 2], &Device::Cpu).unwrap();
        let one = Tensor::ones((), DType::F64, &Device::Cpu).unwrap();
        close(
            f32s(grads(|t| cross_entropy(t, &labels).unwrap(), &logits, &one)),
            f32s(grads(
                |t| candle_nn::loss::cross_entropy(t, &labels).unwrap(),
                &logits,
                &one,
            )),
            "cross-entropy, max detached",
        );
    }

    #[test]
    fn fused_softmax_matches_the_composed_ops_forward_and_backward() {
        let x = randn((4, 7, 33), 1);
        let r = randn((4, 7, 33), 2);
        let (y1, g1) = grads(|t| softmax_last_dim(t).unwrap(), &x, &r);
        let (y2, g2) = grads(|t| candle_nn::ops::softmax(t, D::Minus1).unwrap(), &x, &r);
        assert!(max_rel_diff(&y1, &y2) < 1e-5);
        assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
    }

    #[test]
    fn fused_cross_entropy_matches_candle_nn_forward_and_backward() {
        let x = randn((1, 37, 300), 11).reshape((37, 300)).unwrap();
        let x = (x * 4.0).unwrap(); // confident rows too
        let labels: Vec<u32> = (0..37u32).map(|i| (i * 97) % 300).collect();
        let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let v = Var::from_tensor(&x).unwrap();
            let loss = if fused {
                cross_entropy(v.as_tensor(), &labels).unwrap()
            } else {
                candle_nn::loss::cross_entropy(v.as_tensor(), &labels).unwrap()
            };
            // A scale on the loss, so the incoming gradient is not 1.
            let g = (&loss * 0.7).unwrap().backward().unwrap();
            let g = g.get(v.as_tensor()).unwrap().clone();
            if fused {
                // The forward pass kept its softmax for the first backward pass; a second one
                // over the same graph recomputes it, and gets the same gradient.
                let again = (&loss * 0.7).unwrap().backward().unwrap();
                let again = again.get(v.as_tensor()).unwrap();
                assert!(max_rel_diff(again, &g) < 1e-6, "second backward pass");
            }
            (loss, g)
        };
        let ((l1, g1), (l2, g2)) = (run(true), run(false));
        let (l1, l2) = (
            l1.to_scalar::<f32>().unwrap(),
            l2.to_scalar::<f32>().unwrap(),
        );
        assert!((l1 - l2).abs() / l2 < 1e-5, "{l1} vs {l2}");
        assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
    }

    #[test]
    fn fused_gelu_matches_candles_gelu_erf_forward_and_backward() {
        let x = randn((2, 9, 50), 7);
        let r = randn((2, 9, 50), 8);
        let (y1, g1) = grads(|t| gelu_erf(t).unwrap(), &x, &r);
        let (y2, g2) = grads(|t| t.gelu_erf().unwrap(), &x, &r);
        assert!(max_rel_diff(&y1, &y2) < 1e-5);
        assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
    }

    #[test]
    fn fused_dropout_masks_forward_and_backward_alike() {
        let x = randn((2, 8, 300), 9);
        let r = randn((2, 8, 300), 10);
        let (y, g) = grads(|t| seeded_dropout(t, 0.25, 42).unwrap(), &x, &r);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (xs, rs) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let mut dropped = 0;
        for i in 0..y.len() {
            if y[i] == 0.0 {
                dropped += 1;
                assert_eq!(g[i], 0.0, "a dropped element passes no gradient");
            } else {
                assert!((y[i] - xs[i] / 0.75).abs() < 1e-5);
                assert!((g[i] - rs[i] / 0.75).abs() < 1e-5);
            }
        }
        let rate = dropped as f64 / y.len() as f64;
        assert!((rate - 0.25).abs() < 0.03, "drop rate {rate}");
    }

    /// Runs `f(fused, a, b, c)` both ways and checks y and the gradients of sum(y * r) with
    /// respect to a, b and c agree to 1e-5 relative.
    fn assert_fused_matches_composed(
        what: &str,
        f: impl Fn(bool, &Tensor, &Tensor, &Tensor) -> Tensor,
        inputs: [&Tensor; 3],
        r: &Tensor,
    ) {
        let run = |fused: bool| {
            let vars = inputs.map(|t| Var::from_tensor(t).unwrap());
            let y = f(
                fused,
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![y];
            out.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
            out
        };
        let (fused, composed) = (run(true), run(false));
        for (i, (a, b)) in fused.iter().zip(&composed).enumerate() {
            assert_eq!(a.dims(), b.dims(), "{what}: output {i}");
            let diff = max_rel_diff(a, b);
            assert!(
                diff < 1e-5,
                "{what}: output {i} (0 = y, then grads) differs by {diff}"
            );
        }
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_ops_forward_and_backward() {
        let x = randn((3, 5, 64), 3);
        let w = randn((1, 1, 64), 5).flatten_all().unwrap();
        let b = randn((1, 1, 64), 6).flatten_all().unwrap();
        let f = |fused: bool, x: &Tensor, w: &Tensor, b: &Tensor| {
            if fused {
                layer_norm(x, w, b, 1e-12).unwrap()
            } else {
                candle_nn::ops::layer_norm_slow(x, w, b, 1e-12).unwrap()
            }
        };
        assert_fused_matches_composed("layer norm", f, [&x, &w, &b], &randn((3, 5, 64), 4));
    }

    #[test]
    fn fast_exp_and_erf_are_accurate_over_the_range_used() {
        for i in -8000..=8000 {
            let x = i as f32 * 0.01;
            let (e, want) = (fast_exp(x), x.exp());
            assert!(
                (e - want).abs() <= 3e-7 * want,
                "exp({x}) = {e}, want {want}"
            );
            let erf = fast_erf_and_gauss(x / 10.0).0;
            let want = candle_core::cpu::erf::erf_f32(x / 10.0);
            assert!(
                (erf - want).abs() < 5e-7,
                "erf({}) = {erf}, want {want}",
                x / 10.0
            );
        }
        assert!(fast_exp(f32::NAN).is_nan());
        assert_eq!(fast_exp(100.0), fast_exp(88.0));
        // A masked score (-1e9) gives exactly 0, never a subnormal (which would slow every
        // gemm that reads it).
        assert_eq!(fast_exp(-1e9), 0.0);
        assert_eq!(fast_exp(-87.5), 0.0);
        assert!(fast_exp(-87.0).is_normal());
    }

    #[test]
    fn fused_linear_matches_matmul_plus_bias_forward_and_backward() {
        let x = randn((2, 6, 40), 11);
        let w = randn((1, 24, 40), 13).squeeze(0).unwrap();
        let b = randn((1, 1, 24), 14).flatten_all().unwrap();
        let f = |fused: bool, x: &Tensor, w: &Tensor, b: &Tensor| {
            if fused {
                linear(x, w, b).unwrap()
            } else {
                let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                y.broadcast_add(b).unwrap()
            }
        };
        assert_fused_matches_composed("linear", f, [&x, &w, &b], &randn((2, 6, 24), 12));
    }

    #[test]
    fn fused_attention_probs_match_the_composed_ops_with_and_without_dropout() {
        let (b, heads, t) = (3, 2, 17);
        let scores = randn((b * heads, t, t), 15)
            .reshape((b, heads, t, t))
            .unwrap();
        let r = randn((b * heads, t, t), 16)
            .reshape((b, heads, t, t))
            .unwrap();
        // Batch 1 cannot see its last 5 keys.
        let mut m = vec![0f32; b * t];
        m[t + t - 5..2 * t].fill(-1e9);
        let mask = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
        for dropout in [None, Some((0.3f32, 99u64))] {
            let (y1, g1) = grads(
                |s| attention_probs(s, &mask, 0.25, dropout).unwrap(),
                &scores,
                &r,
            );
            let composed = |s: &Tensor| {
                let z = (s * 0.25)
                    .unwrap()
                    .broadcast_add(&mask.reshape((b, 1, 1, t)).unwrap())
                    .unwrap();
                let p = candle_nn::ops::softmax(&z, D::Minus1).unwrap();
                match dropout {
                    Some((p_drop, seed)) => {
                        let keep: Vec<f32> = (0..p.elem_count() as u64)
                            .map(|i| keep_at(seed, i, p_drop) as u8 as f32 / (1.0 - p_drop))
                            .collect();
                        (p * Tensor::from_vec(keep, s.shape(), &Device::Cpu).unwrap()).unwrap()
                    }
                    None => p,
                }
            };
            let (y2, g2) = grads(composed, &scores, &r);
            assert!(max_rel_diff(&y1, &y2) < 1e-5, "{dropout:?}");
            assert!(
                max_rel_diff(&g1, &g2) < 1e-5,
                "{dropout:?}: {}",
                max_rel_diff(&g1, &g2)
            );
            // Masked keys get (numerically) zero probability.
            let masked = y1.get(1).unwrap().narrow(2, t - 5, 5).unwrap();
            assert!(
                masked
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    < 1e-30
            );
        }
    }

    #[test]
    fn fused_self_attention_matches_the_composed_ops_forward_and_backward() {
        let (b, t, heads, h) = (3, 11, 2, 8);
        let qkv = [21, 22, 23].map(|seed| randn((1, b * t, h), seed).squeeze(0).unwrap());
        let r = randn((1, b * t, h), 24).squeeze(0).unwrap();
        let mut m = vec![0f32; b * t];
        m[2 * t - 3..2 * t].fill(-1e9);
        let mask = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
        for dropout in [None, Some((0.2f32, 5u64))] {
            let f = |fused: bool, q: &Tensor, k: &Tensor, v: &Tensor| {
                if fused {
                    return self_attention(q, k, v, (b, t, heads), &mask, dropout).unwrap();
                }
                // The composed path, as other devices run it.
                let split = |x: &Tensor| {
                    let x = x.reshape((b, t, heads, h / heads)).unwrap();
                    x.transpose(1, 2).unwrap().contiguous().unwrap()
                };
                let scores = split(q).matmul(&split(k).t().unwrap()).unwrap();
                let scaled = (scores * (1.0 / ((h / heads) as f64).sqrt())).unwrap();
                let masked = scaled
                    .broadcast_add(&mask.reshape((b, 1, 1, t)).unwrap())
                    .unwrap();
                let mut probs = candle_nn::ops::softmax(&masked, D::Minus1).unwrap();
                if let Some((p, seed)) = dropout {
                    probs = seeded_dropout(&probs, p, seed).unwrap();
                }
                let ctx = probs.matmul(&split(v)).unwrap().transpose(1, 2).unwrap();
                ctx.reshape((b * t, h)).unwrap()
            };
            let what = format!("self-attention, dropout {dropout:?}");
            assert_fused_matches_composed(&what, f, [&qkv[0], &qkv[1], &qkv[2]], &r);
        }
    }
}
