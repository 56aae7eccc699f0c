//! Sharing rows out to rayon in fixed-size chunks (sums do not depend on the thread count), and
//! the AVX2 + FMA dispatch the element-wise loops run under.

#[allow(unused_imports)]
use super::*;

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
pub(super) fn map_rows(x: &[f32], n: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
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
pub(super) fn map_rows2(
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
pub(super) const ELEMENTWISE_ROW: usize = 1024;
