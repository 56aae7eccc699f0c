//! Differentiable building blocks: LayerNorm and Dropout that actually train.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use kindling_core::rng::{derive_seed, domain};
use kindling_core::Mode;

/// LayerNorm that trains: candle_nn's `LayerNorm` calls a fused kernel with no backward, so
/// gradients would stop there. This one uses [`crate::ops::layer_norm`] (fused with a backward
/// on CPU f32, the differentiable composition elsewhere).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// HF names: `weight` and `bias`.
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// Inverted dropout whose mask is a pure function of `(mode seed, site, element index)`.
///
/// candle's `ops::dropout` draws from an unseeded generator on CPU, which would break
/// bit-exact resume; here each dropout site has its own counter-based stream
/// ([`crate::ops::seeded_dropout`]).
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f32,
    site: u64,
}

impl Dropout {
    /// `site` must differ between the dropout layers of one model.
    pub fn new(p: f32, site: u64) -> Self {
        Dropout { p, site }
    }

    pub fn forward_t(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Train { seed } if self.p > 0.0 => crate::ops::seeded_dropout(
                xs,
                self.p,
                derive_seed(&[domain::DROPOUT, seed, self.site]),
            ),
            _ => Ok(xs.clone()),
        }
    }
}
