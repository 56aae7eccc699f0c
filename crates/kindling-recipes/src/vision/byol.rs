//! BYOL (Grill et al., 2020): the online network's prediction of one view regresses the target
//! network's projection of the other. The target is an exponential moving average of the
//! online encoder and projector (the trainer's `after_update` hook moves it, with the momentum
//! raised from `ema_base` to `ema_final` on a cosine schedule); no negatives.

use candle_core::{Result, Tensor};

use super::{l2_normalize, Outputs, SslLoss};

pub struct Byol;

/// 2 - 2 cos(p, t), averaged over the batch (BYOL's normalised MSE).
fn regression(p: &Tensor, t: &Tensor) -> Result<Tensor> {
    let cos = (l2_normalize(p)? * l2_normalize(t)?)?.sum(1)?;
    (cos.mean_all()? * -2.0)? + 2.0
}

impl SslLoss for Byol {
    fn predictor(&self) -> bool {
        true
    }

    fn target(&self) -> bool {
        true
    }

    fn loss(&self, o: &Outputs) -> Result<Tensor> {
        let p = o.p.as_ref().expect("BYOL builds a predictor");
        let t = o.t.as_ref().expect("BYOL builds a target network");
        regression(&p[0], &t[1])? + regression(&p[1], &t[0])?
    }
}
