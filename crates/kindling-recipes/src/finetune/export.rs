//! The export: a BertForSequenceClassification (RobertaForSequenceClassification) folder (config with id2label and label2id, weights, tokenizer, model card).

#[allow(unused_imports)]
use super::*;

pub(super) fn pooling_name(p: Pooling) -> &'static str {
    match p {
        Pooling::Cls => "cls",
        Pooling::Mean => "mean",
    }
}

/// The HF `config.json` of a `BertForSequenceClassification` (`Roberta...`, `ModernBert...`).
pub fn classifier_config_json(
    cfg: &EncoderConfig,
    labels: &LabelSet,
    problem: ProblemType,
    pooling: Pooling,
    classifier_dropout: f64,
) -> serde_json::Value {
    let mut v = cfg.hf_json("ForSequenceClassification");
    if let EncoderConfig::ModernBert(_) = cfg {
        // ModernBERT's classifier pools as its config says: transformers computes the same.
        v["classifier_pooling"] = pooling_name(pooling).into();
    } else if let Some(o) = v.as_object_mut() {
        // Keys of the masked LM's config, not the classifier's.
        o.remove("tie_word_embeddings");
        o.remove("use_cache");
    }
    // transformers picks the loss from it (and `num_labels`, from id2label's length).
    v["problem_type"] = problem.hf_name().into();
    v["classifier_dropout"] = classifier_dropout.into();
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), n.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i.into()))
        .collect();
    v["id2label"] = id2label.into();
    v["label2id"] = label2id.into();
    // Not an HF key (transformers ignores it): how Kindling pooled.
    v["kindling_pooling"] = pooling_name(pooling).into();
    v
}

/// Writes the HF folder: config.json (with id2label), model.safetensors, tokenizer files, card.
pub fn export(
    obj: &Classifier,
    tokenizer: &Tokenizer,
    recipe: &FinetuneRecipe,
    dir: &Path,
    test: &BTreeMap<String, f64>,
    steps: u64,
    skipped: &Skipped,
) -> Result<(), RecipeError> {
    let dropout = recipe
        .model
        .classifier_dropout
        .unwrap_or(obj.config.hidden_dropout());
    write_hf_folder(
        dir,
        &classifier_config_json(
            &obj.config,
            &obj.labels,
            obj.problem,
            recipe.model.pooling,
            dropout,
        ),
        &obj.varmap,
        tokenizer,
        obj.config.max_seq_len(),
    )?;
    let mut card = String::from("---\n");
    card += &format!(
        "license: {}\nlibrary_name: transformers\npipeline_tag: text-classification\ntags:\n  - kindling\n  - bert\n---\n\n",
        serde_json::to_string(recipe.header.export.license.as_deref().unwrap_or("apache-2.0"))
            .expect("strings serialise")
    );
    let what = match obj.problem {
        ProblemType::SingleLabelClassification => format!(
            "sequence classifier ({} classes: {})",
            obj.labels.len(),
            obj.labels.names.join(", ")
        ),
        ProblemType::MultiLabelClassification => format!(
            "multi-label sequence classifier ({} classes: {}; a class is predicted where its \
             sigmoid exceeds {})",
            obj.labels.len(),
            obj.labels.names.join(", "),
            recipe.data.threshold
        ),
        ProblemType::Regression => "sequence regressor (one score)".to_string(),
    };
    let (columns, pair) = recipe.data.columns();
    let input = if pair {
        format!(
            "; input: the pair (`{}`, `{}`), encoded as `tokenizer(a, b)`",
            columns[0], columns[1]
        )
    } else {
        String::new()
    };
    card += &format!(
        "# {}\n\nA {} {what} fine-tuned by Kindling for {steps} steps from `{}` ({} \
         initialisation) on `{}` (label column `{}`{input}). It loads with \
         `transformers.AutoModelForSequenceClassification.from_pretrained(dir)` \
         (`problem_type` {}).\n\n",
        recipe.name(),
        obj.config.architecture().display_name(),
        recipe.model.path.display(),
        match recipe.model.init {
            Init::Pretrained => "pretrained",
            Init::Random => "random",
        },
        recipe.data.path.display(),
        recipe.data.label_column,
        obj.problem.hf_name()
    );
    if let Some(s) = skipped.summary(&recipe.data.path) {
        card += &format!("Data: {s}.\n\n");
    }
    card += "## Test results\n\n| metric | value |\n|---|---|\n";
    for (k, v) in test {
        card += &format!("| {k} | {v:.4} |\n");
    }
    card += "\n## Recipe\n\n```toml\n";
    card += &recipe.to_toml();
    card += "```\n";
    write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}
