//! Train-aware models with Hugging Face parameter names, and the HF-layout export they share.
//!
//! candle-transformers' models are written for inference: their dropout is a no-op and their
//! fused LayerNorm and softmax have no backward pass, so a model built from them silently trains
//! only its head. The models here use differentiable ops, take an explicit [`Mode`], and keep
//! HF's names so that a checkpoint loads into `transformers` and candle unchanged.

pub mod backbone;
pub mod bert;
pub mod conv;
#[cfg(any(feature = "cuda", test))]
mod cuda_layer;
pub mod encoder;
mod explicit_layer;
pub mod export;
mod fused_embeddings;
mod fused_layer;
mod fused_modernbert;
mod fused_resnet;
pub mod heads;
pub mod import;
pub mod init;
pub mod modernbert;
pub mod nn;
pub mod ops;
pub mod resnet;
#[cfg(test)]
mod test_util;
pub mod vit;
pub mod vit_mae;

pub use backbone::{Backbone, BackboneConfig};
pub use bert::{BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, Pooling};
pub use encoder::{Architecture, Encoder, EncoderConfig, MaskedLm, SequenceClassifier};
pub use heads::{Activation, Mlp, MlpConfig};
pub use kindling_core::Mode;
pub use modernbert::{ModernBertConfig, ModernBertForMaskedLM, ModernBertModel};
pub use resnet::{ResNet, ResNetConfig};
pub use vit::{ViTConfig, ViTModel};

/// Errors of model building and export.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    /// A config field out of its range, named as in HF's `config.json`.
    #[error("`{field}`: {msg}")]
    Setting { field: &'static str, msg: String },
    #[error("{}: {msg}", path.display())]
    File {
        path: std::path::PathBuf,
        msg: String,
    },
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Checks config sizes: each at least 1 and at most `max` (past which a size is a typo, and
/// products of sizes overflow before any allocation could fail cleanly). Errors name the field.
pub(crate) fn check_sizes(fields: &[(&'static str, usize)], max: usize) -> Result<()> {
    for &(field, v) in fields {
        if v == 0 {
            return Err(ModelError::Setting {
                field,
                msg: "must be at least 1".into(),
            });
        }
        if v > max {
            return Err(ModelError::Setting {
                field,
                msg: format!("{v} is larger than {max}"),
            });
        }
    }
    Ok(())
}

/// Checks dropout probabilities: each finite and in [0, 1). Errors name the field.
pub(crate) fn check_dropouts(fields: &[(&'static str, f64)]) -> Result<()> {
    for &(field, p) in fields {
        if !(p.is_finite() && (0.0..1.0).contains(&p)) {
            return Err(ModelError::Setting {
                field,
                msg: format!("a dropout probability must be in [0, 1), got {p}"),
            });
        }
    }
    Ok(())
}
