//! Train-aware models with Hugging Face parameter names, and the HF-layout export they share.
//!
//! candle-transformers' models are written for inference: their dropout is a no-op and their
//! fused LayerNorm and softmax have no backward pass, so a model built from them silently trains
//! only its head. The models here use differentiable ops, take an explicit [`Mode`], and keep
//! HF's names so that a checkpoint loads into `transformers` and candle unchanged.

pub mod backbone;
pub mod bert;
pub mod conv;
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
pub use heads::{Mlp, MlpConfig};
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
