//! `kindling embed`: sentence embeddings from any BERT folder (a Kindling export, or an HF folder
//! such as all-MiniLM-L6-v2): the folder's tokenizer, the encoder in eval mode, mean or [CLS]
//! pooling, optional L2 normalisation (what sentence-transformers does for MiniLM).

use std::path::Path;

use candle_core::{Device, Tensor};

use kindling_data::tokenizer as tok;
use kindling_models::import::{self, KeyReport};
use kindling_models::Mode;

use crate::RecipeError;

#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// Mean over tokens (true) or the [CLS] vector.
    pub mean: bool,
    pub normalize: bool,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        EmbedOptions {
            mean: true,
            normalize: true,
        }
    }
}

/// One embedding per text, and the load report of the model.
pub fn embed_texts(
    model_dir: &Path,
    texts: &[String],
    opts: EmbedOptions,
) -> Result<(Vec<Vec<f32>>, KeyReport), RecipeError> {
    let device = Device::Cpu;
    let bert = import::load_bert(model_dir, &device)?;
    let tokenizer = tok::load(model_dir)?;
    let max_len = bert.config.max_position_embeddings;
    let mut out = Vec::with_capacity(texts.len());
    for text in texts {
        let enc = tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| RecipeError::Run {
                path: model_dir.to_path_buf(),
                msg: format!("tokenizing {text:?}: {e}"),
            })?;
        let ids = &enc.get_ids()[..enc.get_ids().len().min(max_len)];
        let ids = Tensor::from_slice(ids, (1, ids.len()), &device)?;
        let hidden = bert.model.forward_t(&ids, None, None, Mode::Eval)?;
        let v = import::pool(&hidden, opts.mean, opts.normalize)?;
        out.push(v.to_vec1::<f32>()?);
    }
    Ok((out, bert.report))
}
