//! SimCLR (Chen et al., 2020): NT-Xent over the 2N projections of a batch. Each view's positive
//! is the other view of its image; the other 2N - 2 projections are its negatives, so the loss
//! pays for negatives with batch size (the cost the non-contrastive methods avoid).

use candle_core::{Result, Tensor, D};

use super::{l2_normalize, Outputs, SslLoss};

pub struct SimClr {
    pub temperature: f64,
}

/// NT-Xent of two (n, d) batches of projections: cross-entropy over cosine similarities / T,
/// each row's own similarity excluded.
pub fn nt_xent(z1: &Tensor, z2: &Tensor, temperature: f64) -> Result<Tensor> {
    let n = z1.dim(0)?;
    let z = l2_normalize(&Tensor::cat(&[z1, z2], 0)?)?;
    let sim = (z.matmul(&z.t()?)? / temperature)?;
    // A row must not pick itself: a large negative on the diagonal (not -inf, which would make
    // 0 * inf = NaN in the backward pass of the masked entries).
    let eye = Tensor::eye(2 * n, sim.dtype(), sim.device())?;
    let sim = (sim - (eye * 1e9)?)?;
    let logp = candle_nn::ops::log_softmax(&sim, D::Minus1)?;
    let targets: Vec<u32> = (0..2 * n as u32)
        .map(|i| (i + n as u32) % (2 * n as u32))
        .collect();
    let targets = Tensor::from_vec(targets, (2 * n, 1), sim.device())?;
    logp.gather(&targets, 1)?.mean_all()?.neg()
}

impl SslLoss for SimClr {
    fn loss(&self, o: &Outputs) -> Result<Tensor> {
        nt_xent(&o.z[0], &o.z[1], self.temperature)
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
}
