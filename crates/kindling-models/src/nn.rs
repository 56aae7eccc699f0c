//! Differentiable building blocks: LayerNorm and Dropout that actually train.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use kindling_core::rng::{derive_seed, domain, uniform_at};
use kindling_core::Mode;

/// LayerNorm built from differentiable ops (`candle_nn::ops::layer_norm_slow`).
/// candle_nn's `LayerNorm` calls a fused kernel with no backward: gradients would stop here.
/// Cost: about five element-wise passes instead of one (a fused op with a backward is issue 7's).
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
        candle_nn::ops::layer_norm_slow(xs, &self.weight, &self.bias, self.eps as f32)
    }
}

/// Inverted dropout whose mask is a pure function of `(mode seed, site, element index)`.
///
/// candle's `ops::dropout` draws from an unseeded generator on CPU, which would break
/// bit-exact resume; here each dropout site has its own stream, filled in parallel chunks.
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
        let seed = match mode {
            Mode::Train { seed } if self.p > 0.0 => {
                derive_seed(&[domain::DROPOUT, seed, self.site])
            }
            _ => return Ok(xs.clone()),
        };
        let n = xs.elem_count();
        let scale = 1.0 / (1.0 - self.p);
        let mut mask = vec![0f32; n];
        const CHUNK: usize = 1 << 14;
        mask.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, m) in chunk.iter_mut().enumerate() {
                    let i = (c * CHUNK + j) as u64;
                    *m = if uniform_at(seed, i) >= self.p {
                        scale
                    } else {
                        0.0
                    };
                }
            });
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}
