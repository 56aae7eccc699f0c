//! The export: an HF `BertForMaskedLM` folder (config.json, weights, tokenizer files, model card), from a run or from its newest checkpoint.

#[allow(unused_imports)]
use super::*;

/// HF `config.json` for a `BertForMaskedLM`.
pub fn hf_config_json(cfg: &BertConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("config serialises");
    v["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    v["torch_dtype"] = "float32".into();
    v["tie_word_embeddings"] = true.into();
    v["use_cache"] = true.into();
    v["classifier_dropout"] = serde_json::Value::Null;
    v
}

/// Writes the HF-layout folder: config.json, model.safetensors, tokenizer files, README.md.
pub fn export(
    obj: &BertMlm,
    tokenizer: &Tokenizer,
    recipe: &Recipe,
    dir: &Path,
    eval: &BTreeMap<String, f64>,
    baseline: Option<(String, f64)>,
    steps: u64,
) -> Result<(), RecipeError> {
    write_hf_folder(
        dir,
        &hf_config_json(&obj.config),
        &obj.varmap,
        tokenizer,
        &obj.config,
    )?;
    let recipe_toml = recipe.to_toml();
    // What the card lists as training data: the corpus patterns, and each table with the
    // columns and split it was read from.
    let mut sources = recipe.data.corpus.clone();
    sources.extend(recipe.data.tables.iter().map(|t| {
        let split = match (&t.split_column, &t.split) {
            (Some(c), Some(s)) => format!(", rows with {c} = {s}"),
            _ => String::new(),
        };
        format!(
            "{} (columns {}{split})",
            t.path.display(),
            t.text_columns.join(", ")
        )
    }));
    let datasets = sources
        .iter()
        .filter_map(|p| {
            p.split('/')
                .find(|s| !s.is_empty() && *s != "datasets" && *s != ".")
        })
        .map(String::from)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let card = card::render(&CardInfo {
        name: recipe.name(),
        license: recipe.export.license.as_deref().unwrap_or("apache-2.0"),
        pipeline_tag: "fill-mask",
        datasets,
        corpus: &sources,
        architecture: format!(
            "BERT (h{}, {} layers, {} heads, vocab {})",
            obj.config.hidden_size,
            obj.config.num_hidden_layers,
            obj.config.num_attention_heads,
            obj.config.vocab_size
        ),
        params: obj.param_count(),
        recipe_toml: &recipe_toml,
        eval,
        baseline,
        steps,
    });
    kindling_models::export::write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}

/// `kindling export RUN_DIR`: rebuilds the model from the newest valid checkpoint and re-exports.
pub fn export_from_checkpoint(recipe: &Recipe, run_dir: &Path) -> Result<PathBuf, RecipeError> {
    let device = device(&recipe.device)?;
    let (found, refused) = checkpoint::newest_valid(run_dir);
    for e in refused {
        eprintln!("warning: skipping a damaged checkpoint: {e}");
    }
    let ckpt = found.ok_or_else(|| RecipeError::Run {
        path: run_dir.to_path_buf(),
        msg: "no valid checkpoint to export from (checkpoints/step-*)".into(),
    })?;
    let tokenizer = tok::load(&run_dir.join("tokenizer.json"))?;
    let specials = tok::special_tokens(&tokenizer)?;
    let config = bert_config(recipe, tokenizer.get_vocab_size(true), specials.pad)?;
    let obj = BertMlm::new(config, recipe.seed, &device)?;
    let state = checkpoint::load(&ckpt, &obj.varmap, None, &device)?;
    let baseline = std::fs::read_to_string(run_dir.join("data.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["unigram_baseline"].as_f64())
        .map(|b| ("unigram baseline".to_string(), b));
    let dir = crate::run::Experiment::export_dir(recipe, run_dir);
    export(
        &obj,
        &tokenizer,
        recipe,
        &dir,
        &state.last_eval.unwrap_or_default(),
        baseline,
        state.step,
    )?;
    Ok(dir)
}
