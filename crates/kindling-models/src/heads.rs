//! MLP heads of the vision SSL objectives: projectors and predictors, Linear -> BatchNorm ->
//! ReLU per hidden layer, as SimCLR v2, BYOL, SimSiam, Barlow Twins and VICReg define theirs,
//! or Linear -> GELU without norms (DINO's head, `hidden_norm = false, activation = "gelu"`).
//! Names: `layers.{i}.linear.{weight,bias}` and `layers.{i}.norm.*`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::conv::BatchNorm;
use crate::nn::Linear;
use crate::{ModelError, Result};
use kindling_core::Mode;

/// `[model.projector]` / `[model.predictor]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlpConfig {
    /// Widths of the hidden layers, then the output width: `[2048, 2048, 128]`.
    pub dims: Vec<usize>,
    /// BatchNorm after the last linear layer too (SimSiam's projector; Barlow Twins and
    /// VICReg normalise in the loss instead).
    pub last_norm: bool,
    /// BatchNorm after each hidden layer (DINO's head has none).
    pub hidden_norm: bool,
    /// The hidden layers' activation.
    pub activation: Activation,
}

/// An MLP head's hidden activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    /// Exact (erf) GELU, as PyTorch's `nn.GELU()`.
    Gelu,
}

impl Default for MlpConfig {
    fn default() -> Self {
        MlpConfig {
            dims: vec![512, 128],
            last_norm: false,
            hidden_norm: true,
            activation: Activation::Relu,
        }
    }
}

#[derive(Debug, Clone)]
struct MlpLayer {
    linear: Linear,
    norm: Option<BatchNorm>,
    activation: Option<Activation>,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<MlpLayer>,
}

impl Mlp {
    pub fn new(in_dim: usize, cfg: &MlpConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.dims.is_empty() || cfg.dims.contains(&0) {
            return Err(ModelError::Config(format!(
                "an MLP head needs at least one positive width in `dims`, got {:?}",
                cfg.dims
            )));
        }
        let mut layers = Vec::new();
        let mut d = in_dim;
        for (i, &out) in cfg.dims.iter().enumerate() {
            let last = i + 1 == cfg.dims.len();
            let v = vb.pp("layers").pp(i.to_string());
            layers.push(MlpLayer {
                linear: Linear::load(d, out, v.pp("linear"))?,
                norm: if (!last && cfg.hidden_norm) || (last && cfg.last_norm) {
                    Some(BatchNorm::load(out, v.pp("norm"))?)
                } else {
                    None
                },
                activation: (!last).then_some(cfg.activation),
            });
            d = out;
        }
        Ok(Mlp { layers })
    }

    pub fn forward_t(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.linear.forward(&h)?;
            if let Some(n) = &l.norm {
                h = n.forward_t(&h, mode)?;
            }
            h = match l.activation {
                Some(Activation::Relu) => crate::conv::relu(&h)?,
                Some(Activation::Gelu) => crate::ops::gelu_erf(&h)?,
                None => h,
            };
        }
        Ok(h)
    }

    /// Multiply-adds x 2 per input row, forward.
    pub fn forward_flops(in_dim: usize, cfg: &MlpConfig) -> f64 {
        let mut d = in_dim;
        cfg.dims
            .iter()
            .map(|&o| {
                let f = 2.0 * (d * o) as f64;
                d = o;
                f
            })
            .sum()
    }
}
