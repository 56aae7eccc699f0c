//! BERT masked-language-model pretraining (Devlin et al., 2019; dynamic masking as in RoBERTa,
//! Liu et al., 2019). The HF counterpart is `examples/pytorch/language-modeling/run_mlm.py`.
//!
//! corpus -> WordPiece tokenizer -> packed blocks -> dynamic masks -> BertForMaskedLM
//! (logits at masked positions only) -> cross-entropy -> trainer -> HF-layout export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::Tokenizer;

use kindling_core::Mode;
use kindling_data::loader::eval_batches_up_to;
use kindling_data::{
    tokenizer as tok, Blocks, Corpus, Cursor, Masker, MlmBatch, MlmLoader, PackedBlocks,
    ShardBlocks, ShardStream,
};
use kindling_models::export::save_json;
use kindling_models::{Architecture, EncoderConfig, MaskedLm};
use kindling_train::{checkpoint, FitSummary, Objective, StepOutput};

use crate::card::{self, CardInfo};
use crate::hf_folder::write_hf_folder;
use crate::recipe::Recipe;
use crate::run::{
    cursor_within, device, drive, io, Context, Experiment, Loader, Prefetched, Prepared, RunOf,
};
use crate::{RecipeError, RunOptions, RunReport};

mod experiment;
mod export;
mod model;
mod shards;

pub use experiment::*;
pub use export::*;
pub use model::*;
pub use shards::*;

mod objective;

pub use objective::*;

/// Refuses a batch whose training step would not fit in the memory available, before anything
/// is allocated: a process that runs out of memory is killed without a message. CPU only: on
/// a GPU the step's memory is the device's, and running out of it is an error candle reports
/// (the CLI adds what to change), where this estimate (sized on CPU f32 runs: BERT-base at
/// 16 x 128 tokens, 5.0 GB estimated against a 3.5 GB peak resident set) is not calibrated.
fn check_memory(
    recipe: &Recipe,
    config: &EncoderConfig,
    device: &Device,
) -> Result<(), RecipeError> {
    if !device.is_cpu() {
        return Ok(());
    }
    let t = &recipe.header.train;
    let tokens = t.batch_size * recipe.data.seq_len;
    let predicted = (tokens as f64 * recipe.data.mask.rate).ceil() as usize;
    let need = config.mlm_train_bytes(tokens, predicted);
    match kindling_core::available_memory_bytes() {
        Some(avail) if need > avail as f64 => Err(RecipeError::Invalid {
            key: "train.batch_size".into(),
            msg: format!(
                "a training step of {} x {} tokens with this model needs about {:.1} GB \
                 (weights, optimizer state, activations), but {:.1} GB is available; lower \
                 train.batch_size and raise train.grad_accum to keep the effective batch",
                t.batch_size,
                recipe.data.seq_len,
                need / 1e9,
                avail as f64 / 1e9
            ),
        }),
        _ => Ok(()),
    }
}

/// The checkpoint's word embeddings must have the model's rows: one per token of the run's
/// tokenizer, or `model.path`'s `vocab_size` when continuing a folder.
fn check_checkpoint_vocab(
    dir: &Path,
    config: &EncoderConfig,
    continued: bool,
) -> Result<(), RecipeError> {
    let name = config.word_embeddings_name();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let rows = safetensors::SafeTensors::deserialize(&bytes)
        .ok()
        .and_then(|st| st.tensor(&name).ok().map(|t| t.shape()[0]));
    let want = config.vocab_size();
    let source = if continued {
        format!("model.path's config.json has vocab_size {want}")
    } else {
        format!("the run's tokenizer.json has {want} tokens")
    };
    match rows {
        Some(rows) if rows != want => Err(RecipeError::Resume {
            path: dir.to_path_buf(),
            msg: format!(
                "{source} but the checkpoint's {name} has {rows} rows: the checkpoint does not \
                 belong to this run"
            ),
        }),
        _ => Ok(()),
    }
}

/// A resumed run must train the same model on the same data with the same seed; the `[train]`
/// section may change (more steps, a time limit).
fn check_same_run(recipe: &Recipe, run_dir: &Path) -> Result<(), RecipeError> {
    let saved_path = run_dir.join("recipe.toml");
    let saved = Recipe::load(&saved_path, &[])?;
    let differs = [
        ("objective", recipe.objective != saved.objective),
        ("seed", recipe.header.seed != saved.header.seed),
        ("model", recipe.model != saved.model),
        ("data", recipe.data != saved.data),
    ];
    if let Some((key, _)) = differs.iter().find(|(_, d)| *d) {
        return Err(RecipeError::Resume {
            path: run_dir.to_path_buf(),
            msg: format!(
                "recipe key `{key}` differs from the run's {}; a resumed run must keep the \
                 model, data and seed (only [train] may change)",
                saved_path.display()
            ),
        });
    }
    Ok(())
}

/// The eval metrics of the masked LM (`train.monitor.metric` names one).
pub const EVAL_METRICS: &[&str] = &["loss", "accuracy", "perplexity"];
