//! SimCLR (Chen et al., 2020): NT-Xent over the 2N projections of a batch. Each view's positive
//! is the other view of its image; the other 2N - 2 projections are its negatives, so the loss
//! pays for negatives with batch size (the cost the non-contrastive methods avoid).

use std::sync::Arc;

use candle_core::{Result, Tensor, D};
use kindling_train::distributed::{gather_with_grad, Collective};

use serde::{Deserialize, Serialize};

use super::{l2_normalize, Outputs, SslLoss};

pub struct SimClr {
    pub temperature: f64,
}

/// `[loss]` of a SimCLR recipe.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Softmax temperature of NT-Xent.
    pub temperature: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { temperature: 0.2 }
    }
}

impl Settings {
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        super::positive("temperature", self.temperature)
    }
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
        let simclr = SimClr { temperature: 0.2 };
        super::super::group_test::assert_group_loss_is_global(&|o| simclr.loss(o), (4, 3, 5));
    }
}
