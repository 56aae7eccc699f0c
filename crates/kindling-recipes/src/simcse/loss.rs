//! InfoNCE over in-batch candidates (and hard negatives), gathered across ranks with their gradient.

#[allow(unused_imports)]
use super::*;

/// InfoNCE of `n` anchors against the in-batch candidates (`n` positives, then any hard
/// negatives): row `i` of `reps` is anchor `i`, row `n + i` its positive. A candidate whose text
/// is the anchor's or its positive's (a duplicate sentence in the batch) is not a negative: it
/// is masked out, so the loss never pushes a sentence away from itself.
pub fn info_nce(
    reps: &Tensor,
    n: usize,
    keys: &[u64],
    temperature: f64,
) -> candle_core::Result<Tensor> {
    info_nce_in_group(reps, n, keys, temperature, None)
}

/// [`info_nce`] over a data-parallel group's whole batch: this rank's anchors against every
/// rank's candidates, gathered with their gradient (in-batch negatives from all ranks, as
/// sentence-transformers' gathered losses; without the gradient, the Bolts #179 bug), the
/// positive of anchor `i` at this rank's offset into the gathered candidates, and duplicates
/// masked across ranks too (their text keys are gathered alongside). Every rank's batch has the
/// same shape. With gradients averaged over ranks, the update is that of InfoNCE on the global
/// batch in one process.
pub fn info_nce_in_group(
    reps: &Tensor,
    n: usize,
    keys: &[u64],
    temperature: f64,
    group: Option<&Arc<dyn Collective>>,
) -> candle_core::Result<Tensor> {
    let rows = reps.dim(0)?;
    let z = l2_normalize(reps)?;
    let anchors = z.narrow(0, 0, n)?;
    let local = z.narrow(0, n, rows - n)?;
    let (candidates, offset, candidate_keys) = match group {
        Some(g) => (
            gather_with_grad(&local, g.clone())?,
            g.rank() * (rows - n),
            gather_keys(&keys[n..], g.as_ref(), reps.device())?,
        ),
        None => (local, 0, keys[n..].to_vec()),
    };
    let sim = (anchors.matmul(&candidates.t()?)? / temperature)?;
    let m = candidate_keys.len();
    let mut mask = vec![0f32; n * m];
    for i in 0..n {
        for (j, &k) in candidate_keys.iter().enumerate() {
            if j != offset + i && (k == keys[n + i] || k == keys[i]) {
                // Not -inf: 0 * inf would make the backward pass NaN.
                mask[i * m + j] = -1e9;
            }
        }
    }
    let sim = (sim + Tensor::from_vec(mask, (n, m), reps.device())?)?;
    let logp = candle_nn::ops::log_softmax(&sim, D::Minus1)?;
    let targets: Vec<u32> = (0..n).map(|i| (offset + i) as u32).collect();
    let targets = Tensor::from_vec(targets, (n, 1), reps.device())?;
    logp.gather(&targets, 1)?.mean_all()?.neg()
}

/// Every rank's text keys, in rank order. A key travels as two 32-bit halves in f64 (exact),
/// since the collectives move floating-point tensors.
pub(super) fn gather_keys(
    keys: &[u64],
    group: &dyn Collective,
    device: &Device,
) -> candle_core::Result<Vec<u64>> {
    let halves: Vec<f64> = keys
        .iter()
        .flat_map(|k| [(k >> 32) as f64, (k & 0xffff_ffff) as f64])
        .collect();
    let all = group.all_gather(&Tensor::from_vec(halves, (keys.len(), 2), device)?)?;
    Ok(all
        .to_vec2::<f64>()?
        .iter()
        .map(|h| ((h[0] as u64) << 32) | h[1] as u64)
        .collect())
}
