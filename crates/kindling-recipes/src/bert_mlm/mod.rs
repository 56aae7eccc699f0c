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
use kindling_models::bert::{BertConfig, BertForMaskedLM};
use kindling_models::export::save_json;
use kindling_models::init::hf_init;
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
mod shards;

pub use experiment::*;
pub use export::*;
pub use shards::*;

mod objective;

pub use objective::*;

/// The HF config of the model a recipe describes, for a tokenizer of `vocab_size` tokens.
pub fn bert_config(
    recipe: &Recipe,
    vocab_size: usize,
    pad_token_id: u32,
) -> Result<BertConfig, RecipeError> {
    let m = &recipe.model;
    if recipe.data.seq_len > m.max_position_embeddings {
        return Err(RecipeError::Invalid {
            key: "data.seq_len".into(),
            msg: format!(
                "{} is larger than model.max_position_embeddings ({})",
                recipe.data.seq_len, m.max_position_embeddings
            ),
        });
    }
    let cfg = BertConfig {
        vocab_size,
        hidden_size: m.hidden_size,
        num_hidden_layers: m.num_hidden_layers,
        num_attention_heads: m.num_attention_heads,
        intermediate_size: m.intermediate_size,
        hidden_act: m.hidden_act,
        hidden_dropout_prob: m.hidden_dropout_prob,
        attention_probs_dropout_prob: m.attention_probs_dropout_prob,
        max_position_embeddings: m.max_position_embeddings,
        type_vocab_size: m.type_vocab_size,
        initializer_range: m.initializer_range,
        layer_norm_eps: m.layer_norm_eps,
        pad_token_id: pad_token_id as usize,
        position_embedding_type: "absolute".into(),
        model_type: "bert".into(),
    };
    cfg.validate().map_err(|e| match e {
        kindling_models::ModelError::Setting { field, msg } => RecipeError::Invalid {
            key: format!("model.{field}"),
            msg,
        },
        e => RecipeError::Invalid {
            key: "model".into(),
            msg: e.to_string(),
        },
    })?;
    Ok(cfg)
}

/// Refuses a batch whose training step would not fit in the memory available, before anything
/// is allocated: a process that runs out of memory is killed without a message. CPU only: on
/// a GPU the step's memory is the device's, and running out of it is an error candle reports
/// (the CLI adds what to change), where this estimate (sized on CPU f32 runs: BERT-base at
/// 16 x 128 tokens, 5.0 GB estimated against a 3.5 GB peak resident set) is not calibrated.
fn check_memory(recipe: &Recipe, config: &BertConfig, device: &Device) -> Result<(), RecipeError> {
    if !device.is_cpu() {
        return Ok(());
    }
    let t = &recipe.train;
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

/// The checkpoint's word embeddings must have one row per token of the run's tokenizer.
fn check_checkpoint_vocab(dir: &Path, vocab_size: usize) -> Result<(), RecipeError> {
    const NAME: &str = "bert.embeddings.word_embeddings.weight";
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let rows = safetensors::SafeTensors::deserialize(&bytes)
        .ok()
        .and_then(|st| st.tensor(NAME).ok().map(|t| t.shape()[0]));
    match rows {
        Some(rows) if rows != vocab_size => Err(RecipeError::Resume {
            path: dir.to_path_buf(),
            msg: format!(
                "the run's tokenizer.json has {vocab_size} tokens but the checkpoint's {NAME} \
                 has {rows} rows: the tokenizer does not belong to this run"
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
        ("seed", recipe.seed != saved.seed),
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
