//! Scalar helpers: a fast exp and erf, pairwise sums, row statistics, column sums.

#[allow(unused_imports)]
use super::*;

/// exp for f32 in straight-line code LLVM vectorises (libm's `expf` is a call per element):
/// Cephes' range reduction x = n ln2 + r and a degree-6 polynomial for e^r; relative error
/// about 2e-7. Inputs are clamped to [-87, 88] (the normal f32 range of e^x), and below -87 the
/// result is exactly 0, as libm's underflows: the clamped value, e^-87 = 1.6e-38, turns
/// subnormal once a softmax divides it by its sum, and subnormal operands slow the FMA units
/// down about 100-fold. Padding positions (mask -1e9) made SimCSE steps on padded batches 3-4x
/// slower before this. NaN stays NaN.
#[inline(always)]
pub(super) fn fast_exp(x: f32) -> f32 {
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
pub(super) fn fast_erf_and_gauss(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_72) * t
        + 0.254_829_6)
        * t;
    let gauss = fast_exp(-a * a);
    ((1.0 - poly * gauss).copysign(x), gauss)
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
pub(super) fn sum_by(n: usize, f: impl Fn(usize) -> f32) -> f32 {
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
pub(super) fn max_of(x: &[f32]) -> f32 {
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

pub(super) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum_by(x.len(), |i| x[i]) / n;
    let var = sum_by(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}
