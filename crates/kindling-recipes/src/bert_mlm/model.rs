//! The model of a masked-LM recipe: a shape trained from scratch (`[model]`'s keys), or a folder
//! whose weights and tokenizer continue pretraining (`model.path`; domain-adaptive pretraining,
//! Gururangan et al., 2020). Everything here only reads.

#[allow(unused_imports)]
use super::*;
use kindling_models::bert::{BertConfig, HiddenAct};
use kindling_models::import;
use kindling_models::modernbert::ModernBertConfig;

/// `model.path`, resolved: a folder, or `hf://NS/NAME[@REV]` pulled into the Hub cache (once
/// per process: the lifecycle asks more than once, and each pull asks the Hub).
pub fn model_dir(recipe: &Recipe) -> Result<Option<PathBuf>, RecipeError> {
    recipe
        .model
        .path
        .as_deref()
        .map(crate::model_path::resolve)
        .transpose()
}

/// Whether the recipe trains its tokenizer on the corpus (and so needs the corpus text even
/// when it streams token shards).
pub fn trains_tokenizer(recipe: &Recipe) -> bool {
    recipe.model.path.is_none() && recipe.data.tokenizer_config().train.is_some()
}

/// The recipe's tokenizer: `model.path`'s own, or `[data.tokenizer]`'s (trained
/// on `corpus` or cached from an earlier training) with `[model]`'s shape.
pub fn build_tokenizer(recipe: &Recipe, corpus: &Corpus) -> Result<Tokenizer, RecipeError> {
    if let Some(dir) = model_dir(recipe)? {
        let cfg = folder_config(recipe, &dir)?;
        return folder_tokenizer(&dir, &cfg);
    }
    let cache = crate::cache_dir(recipe).join("tokenizers");
    Ok(recipe
        .data
        .tokenizer_config()
        .build(corpus, Path::new("."), Some(&cache))?)
}

/// The model config of a run whose tokenizer is `tokenizer`.
pub fn model_config(recipe: &Recipe, tokenizer: &Tokenizer) -> Result<EncoderConfig, RecipeError> {
    let mut config = match model_dir(recipe)? {
        Some(dir) => folder_config(recipe, &dir)?,
        None => scratch_config(
            recipe,
            tokenizer.get_vocab_size(true),
            &tok::special_tokens(tokenizer)?,
        )?,
    };
    config.set_kernels(recipe.header.kernels);
    Ok(config)
}

/// A model-config error as the recipe key it comes from (`model.hidden_size`).
fn as_recipe_key(e: kindling_models::ModelError) -> RecipeError {
    match e {
        kindling_models::ModelError::Setting { field, msg } => RecipeError::Invalid {
            key: format!("model.{field}"),
            msg,
        },
        e => RecipeError::Invalid {
            key: "model".into(),
            msg: e.to_string(),
        },
    }
}

/// The HF config of a model trained from scratch with the shape `[model]` gives, for a
/// tokenizer of `vocab_size` tokens with these special tokens. Unset keys are bert-mini's
/// shape (h256, 4 layers, 4 heads) with each architecture's own conventions.
pub fn scratch_config(
    recipe: &Recipe,
    vocab_size: usize,
    specials: &tok::SpecialTokens,
) -> Result<EncoderConfig, RecipeError> {
    let m = &recipe.model;
    let arch = m.architecture.unwrap_or(Architecture::Bert);
    let pad = specials.pad as usize;
    let modern_keys = [
        (
            "global_attn_every_n_layers",
            m.global_attn_every_n_layers.is_some(),
        ),
        ("local_attention", m.local_attention.is_some()),
        ("global_rope_theta", m.global_rope_theta.is_some()),
        ("local_rope_theta", m.local_rope_theta.is_some()),
    ];
    let bert_keys = [
        ("hidden_act", m.hidden_act.is_some()),
        ("type_vocab_size", m.type_vocab_size.is_some()),
    ];
    let others: &[(&str, bool)] = if arch == Architecture::Modernbert {
        &bert_keys
    } else {
        &modern_keys
    };
    if let Some((key, _)) = others.iter().find(|k| k.1) {
        return Err(RecipeError::Invalid {
            key: format!("model.{key}"),
            msg: format!(
                "not a setting of {} (model.architecture = \"{}\")",
                arch.display_name(),
                arch.model_type()
            ),
        });
    }
    let hidden = m.hidden_size.unwrap_or(256);
    let cfg: EncoderConfig = match arch {
        Architecture::Bert | Architecture::Roberta => {
            let roberta = arch == Architecture::Roberta;
            BertConfig {
                vocab_size,
                hidden_size: hidden,
                num_hidden_layers: m.num_hidden_layers.unwrap_or(4),
                num_attention_heads: m.num_attention_heads.unwrap_or(4),
                intermediate_size: m.intermediate_size.unwrap_or(4 * hidden),
                hidden_act: m.hidden_act.unwrap_or(HiddenAct::Gelu),
                hidden_dropout_prob: m.hidden_dropout_prob.unwrap_or(0.1),
                attention_probs_dropout_prob: m.attention_probs_dropout_prob.unwrap_or(0.1),
                max_position_embeddings: m.max_position_embeddings.unwrap_or(if roberta {
                    512 + pad + 1
                } else {
                    512
                }),
                type_vocab_size: m.type_vocab_size.unwrap_or(if roberta { 1 } else { 2 }),
                initializer_range: m.initializer_range.unwrap_or(0.02),
                layer_norm_eps: m
                    .layer_norm_eps
                    .unwrap_or(if roberta { 1e-5 } else { 1e-12 }),
                pad_token_id: pad,
                position_embedding_type: "absolute".into(),
                model_type: arch.model_type().into(),
                bos_token_id: roberta.then_some(specials.cls as usize),
                eos_token_id: roberta.then_some(specials.sep as usize),
                kernels: recipe.header.kernels,
                // Pretraining batches are packed blocks: nothing to unpad.
                unpad: false,
            }
            .into()
        }
        Architecture::Modernbert => {
            // ModernBERT-base's conventions at this width: a GeGLU 1.5x as wide as the
            // hidden size, no dropout, global attention every third layer.
            let mut c: ModernBertConfig =
                serde_json::from_value(serde_json::json!({})).expect("every field has a default");
            c.vocab_size = vocab_size;
            c.hidden_size = hidden;
            c.num_hidden_layers = m.num_hidden_layers.unwrap_or(4);
            c.num_attention_heads = m.num_attention_heads.unwrap_or(4);
            c.intermediate_size = m.intermediate_size.unwrap_or(3 * hidden / 2);
            c.max_position_embeddings = m.max_position_embeddings.unwrap_or(512);
            c.norm_eps = m.layer_norm_eps.unwrap_or(1e-5);
            c.initializer_range = m.initializer_range.unwrap_or(0.02);
            c.embedding_dropout = m.hidden_dropout_prob.unwrap_or(0.0);
            c.mlp_dropout = m.hidden_dropout_prob.unwrap_or(0.0);
            c.attention_dropout = m.attention_probs_dropout_prob.unwrap_or(0.0);
            c.global_attn_every_n_layers = m.global_attn_every_n_layers.unwrap_or(3);
            c.local_attention = m.local_attention.unwrap_or(128);
            c.global_rope_theta = m.global_rope_theta.unwrap_or(160_000.0);
            c.local_rope_theta = m.local_rope_theta.unwrap_or(10_000.0);
            c.pad_token_id = pad;
            c.bos_token_id = Some(specials.cls as usize);
            c.cls_token_id = Some(specials.cls as usize);
            c.eos_token_id = Some(specials.sep as usize);
            c.sep_token_id = Some(specials.sep as usize);
            c.into()
        }
    };
    cfg.validate().map_err(as_recipe_key)?;
    check_seq_len(recipe, &cfg)?;
    Ok(cfg)
}

fn check_seq_len(recipe: &Recipe, cfg: &EncoderConfig) -> Result<(), RecipeError> {
    let (seq, max_pos, fits) = (
        recipe.data.seq_len,
        cfg.max_position_embeddings(),
        cfg.max_seq_len(),
    );
    if seq > fits {
        return Err(RecipeError::Invalid {
            key: "data.seq_len".into(),
            msg: format!(
                "{seq} is larger than {} ({max_pos}){}",
                if recipe.model.path.is_some() {
                    "model.path's max_position_embeddings"
                } else {
                    "model.max_position_embeddings"
                },
                if fits < max_pos {
                    format!(": RoBERTa's positions start at pad_token_id + 1, so {fits} tokens fit")
                } else {
                    String::new()
                }
            ),
        });
    }
    Ok(())
}

/// The config of `model.path`'s folder with the recipe's dropout and initialiser overrides,
/// checked against the rest of the recipe: shape keys and `[data.tokenizer]` are the folder's.
pub fn folder_config(recipe: &Recipe, dir: &Path) -> Result<EncoderConfig, RecipeError> {
    let m = &recipe.model;
    if let Some(key) = m.shape_keys().first() {
        return Err(RecipeError::Invalid {
            key: format!("model.{key}"),
            msg: "the shape comes from model.path's config.json; remove the key (only \
                  hidden_dropout_prob, attention_probs_dropout_prob and initializer_range may \
                  be set with a path)"
                .into(),
        });
    }
    if recipe.data.tokenizer.is_some() {
        return Err(RecipeError::Invalid {
            key: "data.tokenizer".into(),
            msg: "continued pretraining uses model.path's own tokenizer (the embeddings are \
                  indexed by its vocabulary); remove [data.tokenizer]"
                .into(),
        });
    }
    let mut cfg = import::read_encoder_config(dir)?;
    if let Some(a) = m.architecture {
        if a != cfg.architecture() {
            return Err(RecipeError::Invalid {
                key: "model.architecture".into(),
                msg: format!(
                    "`{}` but model.path's config.json says model_type `{}`",
                    a.model_type(),
                    cfg.architecture().model_type()
                ),
            });
        }
    }
    cfg.set_dropout(m.hidden_dropout_prob, m.attention_probs_dropout_prob);
    if let Some(r) = m.initializer_range {
        cfg.set_initializer_range(r);
    }
    cfg.validate().map_err(as_recipe_key)?;
    check_seq_len(recipe, &cfg)?;
    Ok(cfg)
}

/// The tokenizer of `model.path`'s folder, checked against its config: every id must have an
/// embedding row.
pub fn folder_tokenizer(dir: &Path, cfg: &EncoderConfig) -> Result<Tokenizer, RecipeError> {
    let tokenizer = tok::load(dir)?;
    let n = tokenizer.get_vocab_size(true);
    if n > cfg.vocab_size() {
        return Err(RecipeError::Run {
            path: dir.to_path_buf(),
            msg: format!(
                "the tokenizer has {n} tokens but config.json's vocab_size is {}: they do not \
                 belong together",
                cfg.vocab_size()
            ),
        });
    }
    Ok(tokenizer)
}

/// What continued pretraining loaded: the folder, and the MLM head's tensors it lacked (then
/// freshly initialised; empty when the folder had the whole head, as a `*ForMaskedLM` has).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Loaded {
    pub dir: PathBuf,
    pub fresh_head: Vec<String>,
}

impl Loaded {
    /// One line for the log and the model card.
    pub fn describe(&self) -> String {
        if self.fresh_head.is_empty() {
            format!(
                "continued from {} (encoder and MLM head loaded)",
                self.dir.display()
            )
        } else {
            format!(
                "continued from {} (encoder loaded; the folder has no MLM head, so {} head \
                 tensors were freshly initialised)",
                self.dir.display(),
                self.fresh_head.len()
            )
        }
    }
}

/// Overwrites the freshly initialised `obj` with the folder's weights. A missing encoder tensor
/// is an error (an encoder with random layers would only look continued); a missing MLM head
/// stays as initialised.
pub fn load_weights(obj: &BertMlm, dir: &Path) -> Result<Loaded, RecipeError> {
    let (path, tensors) = import::read_weights(dir, &obj.device)?;
    let report = import::copy_tensors(&obj.varmap, &tensors, &path)?;
    let (fresh_head, missing): (Vec<String>, Vec<String>) = report
        .missing
        .into_iter()
        .partition(|n| MaskedLm::is_head_tensor(&obj.config, n));
    if !missing.is_empty() {
        return Err(RecipeError::Run {
            path,
            msg: format!(
                "the encoder's tensors {:?}{} are missing: not a checkpoint of this config.json",
                &missing[..missing.len().min(5)],
                if missing.len() > 5 { " (and more)" } else { "" }
            ),
        });
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        fresh_head,
    })
}
