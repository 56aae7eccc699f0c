//! The export: an HF `BertForMaskedLM` folder (config.json, weights, tokenizer files, model card), from a run or from its newest checkpoint.

#[allow(unused_imports)]
use super::*;

/// HF `config.json` for a `BertForMaskedLM` (`RobertaForMaskedLM`, `ModernBertForMaskedLM`).
pub fn hf_config_json(cfg: &EncoderConfig) -> serde_json::Value {
    cfg.hf_json("ForMaskedLM")
}

/// What the model card reports besides the model: the run's results and where it started.
pub struct ExportInfo<'a> {
    pub eval: &'a BTreeMap<String, f64>,
    pub baseline: Option<(String, f64)>,
    pub steps: u64,
    /// Continued pretraining: the folder it started from.
    pub loaded: Option<&'a Loaded>,
    /// Continued pretraining: the folder's own eval scores before the first step.
    pub initial: &'a BTreeMap<String, f64>,
}

/// Writes the HF-layout folder: config.json, model.safetensors, tokenizer files, README.md.
pub fn export(
    obj: &BertMlm,
    tokenizer: &Tokenizer,
    recipe: &Recipe,
    dir: &Path,
    info: &ExportInfo,
) -> Result<(), RecipeError> {
    write_hf_folder(
        dir,
        &hf_config_json(&obj.config),
        &obj.varmap,
        tokenizer,
        obj.config.max_seq_len(),
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
    let c = &obj.config;
    let (hidden, layers, heads, _) = c.shape();
    let base_model = recipe
        .model
        .path
        .as_ref()
        .and_then(|p| p.to_str()?.strip_prefix("hf://").map(String::from))
        .map(|id| id.split('@').next().unwrap_or_default().to_string());
    let card = card::render(&CardInfo {
        name: recipe.name(),
        license: recipe
            .header
            .export
            .license
            .as_deref()
            .unwrap_or("apache-2.0"),
        pipeline_tag: "fill-mask",
        datasets,
        corpus: &sources,
        architecture: format!(
            "{} (h{hidden}, {layers} layers, {heads} heads, vocab {})",
            c.architecture().display_name(),
            c.vocab_size()
        ),
        class: c.class("ForMaskedLM"),
        tag: c.architecture().model_type(),
        start: info.loaded.map(Loaded::describe),
        base_model,
        initial: info.initial,
        params: obj.param_count(),
        recipe_toml: &recipe_toml,
        eval: info.eval,
        baseline: info.baseline.clone(),
        steps: info.steps,
    });
    kindling_models::export::write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}

/// `kindling export RUN_DIR`: rebuilds the model from the newest valid checkpoint and re-exports.
pub fn export_from_checkpoint(recipe: &Recipe, run_dir: &Path) -> Result<PathBuf, RecipeError> {
    let device = device(&recipe.header.device)?;
    let (found, refused) = checkpoint::newest_valid(run_dir);
    for e in refused {
        eprintln!("warning: skipping a damaged checkpoint: {e}");
    }
    let ckpt = found.ok_or_else(|| RecipeError::Run {
        path: run_dir.to_path_buf(),
        msg: "no valid checkpoint to export from (checkpoints/step-*)".into(),
    })?;
    let tokenizer = tok::load(&run_dir.join("tokenizer.json"))?;
    let config = model_config(recipe, &tokenizer)?;
    let obj = BertMlm::new(config, recipe.header.seed, &device)?;
    let state = checkpoint::load(&ckpt, &obj.varmap, None, &device)?;
    let read_json = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(run_dir.join(name)).ok()?).ok()
    };
    let data = read_json("data.json").unwrap_or_default();
    let baseline = data["unigram_baseline"]
        .as_f64()
        .map(|b| ("unigram baseline".to_string(), b));
    let loaded: Option<Loaded> = serde_json::from_value(data["loaded"].clone()).ok();
    let initial: BTreeMap<String, f64> = read_json("initial_eval.json")
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let dir = crate::run::Experiment::export_dir(recipe, run_dir);
    export(
        &obj,
        &tokenizer,
        recipe,
        &dir,
        &ExportInfo {
            eval: &state.last_eval.unwrap_or_default(),
            baseline,
            steps: state.step,
            loaded: loaded.as_ref(),
            initial: &initial,
        },
    )?;
    Ok(dir)
}
