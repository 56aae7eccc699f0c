//! `kindling embed`: sentence embeddings from any BERT, RoBERTa or ModernBERT folder (a Kindling
//! export, or an HF folder such as all-MiniLM-L6-v2): the folder's tokenizer, the encoder in eval mode, mean or `[CLS]`
//! pooling, optional L2 normalisation (what sentence-transformers does for MiniLM).

use std::path::Path;

use candle_core::{Device, Tensor};

use kindling_data::tokenizer as tok;
use kindling_models::import::{self, KeyReport};
use kindling_models::Mode;

use crate::RecipeError;

#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// Mean over tokens (true) or the `[CLS]` vector.
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
    let encoder = import::load_encoder(model_dir, &device)?;
    let tokenizer = tok::load(model_dir)?;
    let max_len = encoder.config.max_seq_len();
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
        let hidden = encoder.model.forward_t(&ids, None, Mode::Eval)?;
        let v = import::pool(&hidden, opts.mean, opts.normalize)?;
        out.push(v.to_vec1::<f32>()?);
    }
    Ok((out, encoder.report))
}

/// One candidate for a `[MASK]`, with what HF's fill-mask pipeline returns beside it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FillMask {
    /// The vocabulary entry (`##ing` for a WordPiece continuation).
    pub token: String,
    pub token_id: u32,
    /// The token as text (HF's `token_str`).
    pub token_str: String,
    pub score: f32,
    /// The input with this `[MASK]` filled by the token, special tokens dropped (HF's
    /// `sequence`).
    pub sequence: String,
}

/// `kindling fill-mask`: the `k` most likely tokens at each `[MASK]` of `text`, from a
/// `BertForMaskedLM` folder (as HF's fill-mask pipeline).
pub fn fill_mask(
    model_dir: &Path,
    text: &str,
    k: usize,
) -> Result<Vec<Vec<FillMask>>, RecipeError> {
    let device = Device::Cpu;
    let config = import::read_encoder_config(model_dir)?;
    let weights = model_dir.join("model.safetensors");
    let tensors =
        candle_core::safetensors::load(&weights, &device).map_err(|e| RecipeError::Run {
            path: weights.clone(),
            msg: e.to_string(),
        })?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &device);
    let model = kindling_models::MaskedLm::load(vb, &config).map_err(|e| RecipeError::Run {
        path: weights.clone(),
        msg: format!(
            "not a {} checkpoint (needs the encoder and the MLM head): {e}",
            config.class("ForMaskedLM")
        ),
    })?;
    let tokenizer = tok::load(model_dir)?;
    let mask = tok::special_tokens(&tokenizer)?.mask;
    let enc = tokenizer.encode(text, true).map_err(|e| RecipeError::Run {
        path: model_dir.to_path_buf(),
        msg: format!("tokenizing {text:?}: {e}"),
    })?;
    let ids = enc.get_ids();
    let at: Vec<u32> = (0..ids.len() as u32)
        .filter(|&i| ids[i as usize] == mask)
        .collect();
    if at.is_empty() {
        return Err(RecipeError::Invalid {
            key: "text".into(),
            msg: format!(
                "{text:?} has no {} token",
                tokenizer.id_to_token(mask).unwrap_or_default()
            ),
        });
    }
    let input = Tensor::from_slice(ids, (1, ids.len()), &device)?;
    let positions = Tensor::from_slice(&at, at.len(), &device)?;
    let logits = model.forward_t(&input, None, Some(&positions), Mode::Eval)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
    let decode = |ids: &[u32], skip: bool| tokenizer.decode(ids, skip).unwrap_or_default();
    Ok(probs
        .into_iter()
        .zip(&at)
        .map(|(row, &pos)| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            order
                .into_iter()
                .take(k)
                .map(|i| {
                    let id = i as u32;
                    let mut filled = ids.to_vec();
                    filled[pos as usize] = id;
                    FillMask {
                        token: tokenizer.id_to_token(id).unwrap_or_default(),
                        token_id: id,
                        token_str: decode(&[id], false),
                        score: row[i],
                        sequence: decode(&filled, true),
                    }
                })
                .collect()
        })
        .collect())
}
