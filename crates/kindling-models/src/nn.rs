//! Differentiable building blocks: Linear, LayerNorm and Dropout that actually train (and fast).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use kindling_core::rng::{derive_seed, domain};
use kindling_core::Mode;

use crate::ops::Kernels;

/// A linear layer with HF names (`weight` (out, in), `bias` (out)); on CPU one fused op, bias
/// included, unless its kernels are composed (see [`Kernels::linear`]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
    pub kernels: Kernels,
}

impl Linear {
    /// Created with candle_nn's default initialisation (the recipes re-initialise as HF does).
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        Ok(Linear {
            weight: vb.get_with_hints(
                (out_dim, in_dim),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            bias: vb.get_with_hints(
                out_dim,
                "bias",
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?,
            kernels: Kernels::Fused,
        })
    }

    /// This layer on the kernel path `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Linear { kernels, ..self }
    }

    /// A layer whose bias may be absent (HF's `bias=False`: ModernBERT's, ViT's `qkv_bias`):
    /// then a constant zero, not a parameter, so the fused op still applies and nothing is
    /// saved under a `bias` name. Initialised at candle's defaults (the models re-initialise).
    pub(crate) fn optional_bias(
        vb: VarBuilder,
        (inp, out): (usize, usize),
        bias: bool,
        kernels: Kernels,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out, inp),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?
        } else {
            Tensor::zeros(out, candle_core::DType::F32, vb.device())?
        };
        Ok(Linear {
            weight,
            bias,
            kernels,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.kernels.linear(xs, &self.weight, &self.bias)
    }
}

/// LayerNorm that trains: candle_nn's `LayerNorm` calls a fused kernel with no backward, so
/// gradients would stop there. This one uses [`Kernels::layer_norm`] (fused with a backward on
/// CPU f32, the differentiable composition elsewhere).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    pub kernels: Kernels,
}

impl LayerNorm {
    /// HF names: `weight` and `bias`.
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?,
            eps,
            kernels: Kernels::Fused,
        })
    }

    /// This norm on the kernel path `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        LayerNorm { kernels, ..self }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.kernels
            .layer_norm(xs, &self.weight, &self.bias, self.eps)
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
    kernels: Kernels,
}

impl Dropout {
    /// `site` must differ between the dropout layers of one model.
    pub fn new(p: f32, site: u64) -> Self {
        Dropout {
            p,
            site,
            kernels: Kernels::Fused,
        }
    }

    /// This site on the kernel path `kernels` (the same elements dropped on either).
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Dropout { kernels, ..self }
    }

    pub fn forward_t(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        match self.stream(mode) {
            Some((p, seed)) => self.kernels.seeded_dropout(xs, p, seed),
            None => Ok(xs.clone()),
        }
    }

    /// `(p, mask seed)` when this site drops anything in `mode`: for kernels that fuse dropout.
    pub fn stream(&self, mode: Mode) -> Option<(f32, u64)> {
        match mode {
            Mode::Train { seed } if self.p > 0.0 => {
                Some((self.p, derive_seed(&[domain::DROPOUT, seed, self.site])))
            }
            _ => None,
        }
    }
}
