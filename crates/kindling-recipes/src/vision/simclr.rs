//! SimCLR (Chen et al., 2020): NT-Xent over the 2N projections of a batch. Each view's positive
//! is the other view of its image; the other 2N - 2 projections are its negatives, so the loss
//! pays for negatives with batch size (the cost the non-contrastive methods avoid).

use std::sync::Arc;

use candle_core::{Result, Tensor, D};
use kindling_train::distributed::{gather_with_grad, Collective};

use super::{l2_normalize, Outputs, SslLoss};

pub struct SimClr {
    pub temperature: f64,
}

/// NT-Xent of two (n, d) batches of projections: cross-entropy over cosine similarities / T,
/// each row's own similarity excluded.
pub fn nt_xent(z1: &Tensor, z2: &Tensor, temperature: f64) -> Result<Tensor> {
    nt_xent_in_group(z1, z2, temperature, None)
}

/// NT-Xent over a data-parallel group's whole batch: this rank's 2n projections are the
/// anchors and every rank's 2nW projections the candidates, gathered with their gradient (so
/// the negatives a rank draws from the others train their encoders too; without it, Lightning
/// Bolts #179). Rank r's rows sit at `r * 2n` in the gathered matrix, and the labels count from
/// there (forgetting that offset is lightly #1977). With gradients averaged over ranks, the
/// update is that of NT-Xent on the global batch in one process. `None`: this process alone.
pub fn nt_xent_in_group(
    z1: &Tensor,
    z2: &Tensor,
    temperature: f64,
    group: Option<&Arc<dyn Collective>>,
) -> Result<Tensor> {
    let n = z1.dim(0)?;
    let z = l2_normalize(&Tensor::cat(&[z1, z2], 0)?)?;
    let (all, offset) = match group {
        Some(g) => (gather_with_grad(&z, g.clone())?, g.rank() * 2 * n),
        None => (z.clone(), 0),
    };
    let cols = all.dim(0)?;
    let sim = (z.matmul(&all.t()?)? / temperature)?;
    // A row must not pick itself: a large negative at its own column (not -inf, which would
    // make 0 * inf = NaN in the backward pass of the masked entries).
    let mut own = vec![0f32; 2 * n * cols];
    for i in 0..2 * n {
        own[i * cols + offset + i] = 1e9;
    }
    let own = Tensor::from_vec(own, (2 * n, cols), sim.device())?.to_dtype(sim.dtype())?;
    let logp = candle_nn::ops::log_softmax(&(sim - own)?, D::Minus1)?;
    let targets: Vec<u32> = (0..2 * n)
        .map(|i| (offset + (i + n) % (2 * n)) as u32)
        .collect();
    let targets = Tensor::from_vec(targets, (2 * n, 1), logp.device())?;
    logp.gather(&targets, 1)?.mean_all()?.neg()
}

impl SslLoss for SimClr {
    fn loss(&self, o: &Outputs) -> Result<Tensor> {
        nt_xent_in_group(&o.z[0], &o.z[1], self.temperature, o.group.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the definition written out row by row.
    #[test]
    fn nt_xent_matches_the_formula() {
        let z1 = Tensor::new(&[[1f32, 0.0], [0.6, 0.8]], &Device::Cpu).unwrap();
        let z2 = Tensor::new(&[[0.8f32, 0.6], [0.0, 1.0]], &Device::Cpu).unwrap();
        let got = nt_xent(&z1, &z2, 0.5).unwrap().to_scalar::<f32>().unwrap();
        let z = [[1f64, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]];
        let dot = |a: [f64; 2], b: [f64; 2]| (a[0] * b[0] + a[1] * b[1]) / 0.5;
        let mut total = 0.0;
        for i in 0..4 {
            let pos = (i + 2) % 4;
            let denom: f64 = (0..4)
                .filter(|&j| j != i)
                .map(|j| dot(z[i], z[j]).exp())
                .sum();
            total += -(dot(z[i], z[pos]).exp() / denom).ln();
        }
        assert!(
            (got as f64 - total / 4.0).abs() < 1e-5,
            "{got} vs {}",
            total / 4.0
        );
    }

    /// Four ranks of 3 images each, NT-Xent gathered over the group, gradients divided by the
    /// world size as the trainer's average does: the loss and the projections' gradients are
    /// those of NT-Xent on all 12 images in one process.
    #[test]
    fn gathered_nt_xent_over_ranks_is_nt_xent_of_the_global_batch() {
        use candle_core::Var;
        use kindling_train::distributed::LocalGroup;
        let (world, n, d) = (4, 3, 5);
        let values = |seed: u64| -> Vec<f32> {
            (0..world * n * d)
                .map(|i| ((i as u64 * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let (a, b) = (values(1), values(2));
        let global = |v: &[f32]| Var::from_vec(v.to_vec(), (world * n, d), &Device::Cpu).unwrap();
        let (g1, g2) = (global(&a), global(&b));
        let single = nt_xent(g1.as_tensor(), g2.as_tensor(), 0.2).unwrap();
        let grads = single.backward().unwrap();
        let want1 = grads.get(g1.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let want = single.to_scalar::<f32>().unwrap();
        let ranks: Vec<(f32, Vec<Vec<f32>>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = LocalGroup::new(world)
                .into_iter()
                .map(|g| {
                    let (a, b) = (&a, &b);
                    scope.spawn(move || {
                        let g: Arc<dyn Collective> = Arc::new(g);
                        let r = g.rank();
                        let part = |v: &[f32]| {
                            Var::from_vec(
                                v[r * n * d..(r + 1) * n * d].to_vec(),
                                (n, d),
                                &Device::Cpu,
                            )
                            .unwrap()
                        };
                        let (z1, z2) = (part(a), part(b));
                        let loss = nt_xent_in_group(z1.as_tensor(), z2.as_tensor(), 0.2, Some(&g))
                            .unwrap();
                        let grads = loss.backward().unwrap();
                        // The global loss is the mean of the ranks' losses, and the trainer
                        // divides the gradients by the world size. Rank r's projections get the
                        // gradient of every rank's loss through the gather.
                        let l = g.all_reduce_sum(&loss).unwrap().to_scalar::<f32>().unwrap();
                        let g1 = (grads.get(z1.as_tensor()).unwrap() / world as f64).unwrap();
                        (l / world as f32, g1.to_vec2::<f32>().unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (loss, g1)) in ranks.iter().enumerate() {
            assert!(
                (loss - want).abs() < 1e-5,
                "rank {r}: loss {loss} vs {want}"
            );
            for (i, row) in g1.iter().enumerate() {
                for (x, y) in row.iter().zip(&want1[r * n + i]) {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "rank {r} row {i}: gradient {x} vs {y}"
                    );
                }
            }
        }
    }
}
