//! SimSiam (Chen & He, 2021): each view's prediction regresses the other view's projection,
//! which is held fixed (stop-gradient); no negatives, no momentum encoder. The stop-gradient is
//! what keeps it from collapsing.

use candle_core::{Result, Tensor};

use serde::{Deserialize, Serialize};

use super::{negative_cosine, Outputs, SslLoss};

pub struct SimSiam;

/// `[loss]` of a SimSiam recipe.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Train the predictor at the peak learning rate throughout (the paper's `fix_pred_lr`:
    /// the predictor keeps adapting to the representation while the encoder's rate decays).
    pub fix_predictor_lr: bool,
}

impl SslLoss for SimSiam {
    fn predictor(&self) -> bool {
        true
    }

    fn loss(&self, o: &Outputs) -> Result<Tensor> {
        let p = o.p.as_ref().expect("SimSiam builds a predictor");
        let a = negative_cosine(&p[0], &o.z[1].detach())?;
        let b = negative_cosine(&p[1], &o.z[0].detach())?;
        (a + b)? * 0.5
    }
}
