//! The HF-layout folder every text export writes (MLM, SimCSE, fine-tuning): the part that is
//! the same whatever the head.

use std::path::Path;

use candle_nn::VarMap;
use tokenizers::Tokenizer;

use kindling_data::tokenizer as tok;
use kindling_models::export::{save_json, save_safetensors};

use crate::run::io;
use crate::RecipeError;

/// The model part of an HF folder, shared by every export: `config.json`, `model.safetensors`
/// (every variable of `varmap`) and the tokenizer files (`model_max_length`: the longest input).
pub fn write_hf_folder(
    dir: &Path,
    config_json: &serde_json::Value,
    varmap: &VarMap,
    tokenizer: &Tokenizer,
    model_max_length: usize,
) -> Result<(), RecipeError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    save_json(&dir.join("config.json"), config_json)?;
    let tensors = kindling_models::export::varmap_tensors(varmap);
    save_safetensors(&dir.join("model.safetensors"), &tensors, &[])?;
    tok::save_hf_files(tokenizer, dir, tok::lowercases(tokenizer), model_max_length)?;
    Ok(())
}
