//! BYOL (Grill et al., 2020): the online network's prediction of one view regresses the target
//! network's projection of the other. The target is an exponential moving average of the
//! online encoder and projector (the trainer's `after_update` hook moves it, with the momentum
//! raised from `ema_base` to `ema_final` on a cosine schedule); no negatives.

use candle_core::{Result, Tensor};

use serde::{Deserialize, Serialize};

use super::{l2_normalize, Outputs, SslLoss};

pub struct Byol;

/// `[loss]` of a BYOL recipe.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Target momentum, raised from `ema_base` to `ema_final` on a cosine schedule.
    pub ema_base: f64,
    pub ema_final: f64,
    /// Train the predictor at the peak learning rate throughout (SimSiam's `fix_pred_lr`).
    pub fix_predictor_lr: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ema_base: 0.99,
            ema_final: 1.0,
            fix_predictor_lr: false,
        }
    }
}

impl Settings {
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        super::momentum(self.ema_base, self.ema_final)
    }
}

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
