//! Barlow Twins (Zbontar et al., 2021): the cross-correlation matrix of the two views'
//! projections, each standardised over the batch, is pushed to the identity: 1 on the diagonal
//! (invariance), 0 off it (redundancy reduction, weighted by `lambda`). No negatives, no
//! asymmetry; the cost is a d x d matrix, so the projector width matters.

use candle_core::{Result, Tensor};

use serde::{Deserialize, Serialize};

use super::{group_views, Outputs, SslLoss};

/// `[loss]` of a Barlow Twins recipe.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Off-diagonal weight (default 1 / projector width).
    pub lambda: Option<f64>,
    /// Overall scale of the loss.
    pub scale: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lambda: None,
            scale: 0.1,
        }
    }
}

impl Settings {
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if let Some(l) = self.lambda {
            super::positive("lambda", l)?;
        }
        super::positive("scale", self.scale)
    }
}

pub struct BarlowTwins {
    /// Weight of the off-diagonal terms; the paper's 0.0051 is for d = 8192, about 1/d scales.
    pub lambda: f64,
    /// Multiplies the whole loss (solo-learn's `scale_loss`), to keep its size workable for the
    /// learning rate.
    pub scale: f64,
}

/// Columns standardised over the batch (BatchNorm without affine, biased variance).
fn standardise(z: &Tensor) -> Result<Tensor> {
    let mean = z.mean_keepdim(0)?;
    let zc = z.broadcast_sub(&mean)?;
    let std = (zc.sqr()?.mean_keepdim(0)? + 1e-5)?.sqrt()?;
    zc.broadcast_div(&std)
}

pub fn barlow_loss(z1: &Tensor, z2: &Tensor, lambda: f64) -> Result<Tensor> {
    let n = z1.dim(0)? as f64;
    let d = z1.dim(1)?;
    let c = (standardise(z1)?.t()?.matmul(&standardise(z2)?)? / n)?;
    let eye = Tensor::eye(d, c.dtype(), c.device())?;
    let on = ((&c * &eye)?.sum(1)? - 1.0)?.sqr()?.sum_all()?;
    let off = (c * (1.0 - eye)?)?.sqr()?.sum_all()?;
    on + (off * lambda)?
}

impl SslLoss for BarlowTwins {
    fn loss(&self, o: &Outputs) -> Result<Tensor> {
        let (z1, z2) = group_views(o)?;
        barlow_loss(&z1, &z2, self.lambda)? * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn identical_decorrelated_views_cost_nothing_and_redundancy_costs_lambda() {
        // Two standardised, uncorrelated columns: C = I, loss 0.
        let z = Tensor::new(
            &[[1f32, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let l = barlow_loss(&z, &z, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(l.abs() < 1e-3, "{l}");
        // Both columns equal: C is all ones, two off-diagonal ones cost 2 * lambda.
        let r = Tensor::new(
            &[[1f32, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let l = barlow_loss(&r, &r, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 1.0).abs() < 1e-3, "{l}");
    }

    /// Three ranks of 4 images: the cross-correlation of the gathered views is the global batch's, so are the loss and gradients.
    #[test]
    fn gathered_barlow_twins_over_ranks_is_the_global_batchs() {
        let method = BarlowTwins {
            lambda: 0.1,
            scale: 0.5,
        };
        super::super::group_test::assert_group_loss_is_global(&|o| method.loss(o), (3, 4, 6));
    }
}
