//! VICReg (Bardes et al., 2022): invariance (MSE between the views' projections), variance (a
//! hinge keeping each dimension's standard deviation over the batch above 1) and covariance
//! (off-diagonal covariances pushed to 0), weighted 25 / 25 / 1 as in the paper. No negatives,
//! no asymmetry, no normalisation layer needed at the end of the projector.

use candle_core::{Result, Tensor};

use serde::{Deserialize, Serialize};

use super::{group_views, Outputs, SslLoss};

/// `[loss]` of a VICReg recipe: the invariance, variance and covariance weights.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub sim_weight: f64,
    pub var_weight: f64,
    pub cov_weight: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sim_weight: 25.0,
            var_weight: 25.0,
            cov_weight: 1.0,
        }
    }
}

impl Settings {
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        for (key, w) in [
            ("sim_weight", self.sim_weight),
            ("var_weight", self.var_weight),
            ("cov_weight", self.cov_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err((key, format!("must be finite and at least 0, got {w}")));
            }
        }
        Ok(())
    }
}

pub struct VicReg {
    pub sim_weight: f64,
    pub var_weight: f64,
    pub cov_weight: f64,
}

fn variance(z: &Tensor) -> Result<Tensor> {
    let n = z.dim(0)? as f64;
    let zc = z.broadcast_sub(&z.mean_keepdim(0)?)?;
    let std = ((zc.sqr()?.sum(0)? / (n - 1.0))? + 1e-4)?.sqrt()?;
    (1.0 - std)?.relu()?.mean_all()
}

fn covariance(z: &Tensor) -> Result<Tensor> {
    let (n, d) = z.dims2()?;
    let zc = z.broadcast_sub(&z.mean_keepdim(0)?)?;
    let cov = (zc.t()?.matmul(&zc)? / (n as f64 - 1.0))?;
    let off = (cov * (1.0 - Tensor::eye(d, z.dtype(), z.device())?)?)?;
    off.sqr()?.sum_all()? / d as f64
}

pub fn vicreg_loss(z1: &Tensor, z2: &Tensor, w: (f64, f64, f64)) -> Result<Tensor> {
    let sim = (z1 - z2)?.sqr()?.mean_all()?;
    let var = (variance(z1)? + variance(z2)?)?;
    let cov = (covariance(z1)? + covariance(z2)?)?;
    ((sim * w.0)? + (var * w.1)?)? + (cov * w.2)?
}

impl SslLoss for VicReg {
    fn loss(&self, o: &Outputs) -> Result<Tensor> {
        let (z1, z2) = group_views(o)?;
        vicreg_loss(
            &z1,
            &z2,
            (self.sim_weight, self.var_weight, self.cov_weight),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_collapsed_batch_pays_the_variance_hinge() {
        let z = Tensor::new(&[[0.5f32, 0.5], [0.5, 0.5], [0.5, 0.5]], &Device::Cpu).unwrap();
        let l = vicreg_loss(&z, &z, (25.0, 25.0, 1.0))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // std 0.01 (the epsilon) per dimension: hinge 0.99 per view, 25 * 2 * 0.99.
        assert!((l - 49.5).abs() < 1e-2, "{l}");
        let spread = Tensor::new(
            &[[2f32, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let l = vicreg_loss(&spread, &spread, (25.0, 25.0, 1.0))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(l.abs() < 1e-4, "wide, decorrelated and invariant: {l}");
    }

    /// Three ranks of 4 images: variance and covariance over the gathered views are the global batch's, so are the loss and gradients.
    #[test]
    fn gathered_vicreg_over_ranks_is_the_global_batchs() {
        let method = VicReg {
            sim_weight: 25.0,
            var_weight: 25.0,
            cov_weight: 1.0,
        };
        super::super::group_test::assert_group_loss_is_global(&|o| method.loss(o), (3, 4, 6));
    }
}
