//! The export: an HF BERT folder that sentence-transformers loads as it is (modules.json, pooling config, model card).

#[allow(unused_imports)]
use super::*;

/// sentence-transformers' `1_Pooling/config.json` for `pooling`.
pub fn pooling_config(hidden: usize, pooling: Pooling) -> serde_json::Value {
    serde_json::json!({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == Pooling::Cls,
        "pooling_mode_mean_tokens": pooling == Pooling::Mean,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
        "pooling_mode_weightedmean_tokens": false,
        "pooling_mode_lasttoken": false,
        "include_prompt": true
    })
}

/// Writes an HF `BertModel` folder that is also a sentence-transformers model: modules.json
/// (Transformer -> Pooling -> Normalize), 1_Pooling/config.json, sentence_bert_config.json.
pub fn export(
    obj: &Simcse,
    tokenizer: &Tokenizer,
    recipe: &SimcseRecipe,
    dir: &Path,
    eval: &BTreeMap<String, f64>,
    initial: &BTreeMap<String, f64>,
    steps: u64,
) -> Result<(), RecipeError> {
    let mut config = obj.config.hf_json("Model");
    if let Some(o) = config.as_object_mut() {
        // Keys of a masked LM's config, not the encoder's.
        o.remove("tie_word_embeddings");
        o.remove("use_cache");
        o.remove("classifier_dropout");
    }
    write_hf_folder(
        dir,
        &config,
        &obj.varmap,
        tokenizer,
        obj.config.max_seq_len(),
    )?;
    save_json(
        &dir.join("modules.json"),
        &serde_json::json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        ]),
    )?;
    let pooling_dir = dir.join("1_Pooling");
    std::fs::create_dir_all(&pooling_dir).map_err(|e| RecipeError::Run {
        path: pooling_dir.clone(),
        msg: e.to_string(),
    })?;
    save_json(
        &pooling_dir.join("config.json"),
        &pooling_config(obj.config.shape().0, obj.pooling),
    )?;
    let normalize_dir = dir.join("2_Normalize");
    std::fs::create_dir_all(&normalize_dir).map_err(|e| RecipeError::Run {
        path: normalize_dir.clone(),
        msg: e.to_string(),
    })?;
    save_json(
        &dir.join("sentence_bert_config.json"),
        &serde_json::json!({"max_seq_length": recipe.model.max_length, "do_lower_case": false}),
    )?;
    save_json(
        &dir.join("config_sentence_transformers.json"),
        &serde_json::json!({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": null}),
    )?;
    let mut card = String::from("---\n");
    card += &format!(
        "license: {}\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags:\n  - kindling\n  - sentence-transformers\n  - simcse\n---\n\n",
        serde_json::to_string(recipe.header.export.license.as_deref().unwrap_or("apache-2.0"))
            .expect("strings serialise")
    );
    card += &format!(
        "# {}\n\nA sentence encoder trained by Kindling with {} SimCSE for {steps} steps from \
         `{}` ({} pooling, temperature {}). It loads with \
         `sentence_transformers.SentenceTransformer(dir)` (cosine similarity) and with \
         `transformers.AutoModel.from_pretrained(dir)`.\n\n",
        recipe.name(),
        if recipe.supervised() {
            "supervised"
        } else {
            "unsupervised"
        },
        recipe.model.path.display(),
        match obj.pooling {
            Pooling::Cls => "[CLS]",
            Pooling::Mean => "mean",
        },
        recipe.loss.temperature
    );
    if !eval.is_empty() {
        card +=
            "## Retrieval (before and after training)\n\n| metric | start | end |\n|---|---|---|\n";
        for (k, v) in eval {
            let before = initial.get(k).map_or("".into(), |b| format!("{b:.4}"));
            card += &format!("| {k} | {before} | {v:.4} |\n");
        }
        card += "\n";
    }
    card += "## Recipe\n\n```toml\n";
    card += &recipe.to_toml();
    card += "```\n";
    write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}
