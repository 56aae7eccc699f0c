//! Sentence contrastive pretraining (`objective = "simcse"`) through the `kindling` binary: from
//! the tiny MLM export (unsupervised, dropout views) and from all-MiniLM-L6-v2 (supervised
//! title -> text pairs). A run reports retrieval before and after, exports a folder that
//! sentence-transformers loads with the embeddings Kindling computes, and resumes bit for bit.

use std::path::Path;
use std::process::Command;

use kindling_core::Mode;
use kindling_data::tokenizer as tok;
use kindling_recipes::embed::{embed_texts, EmbedOptions};
use kindling_recipes::simcse::{encode, Simcse, SimcseRecipe};

use crate::common::{
    kill_when_exists, kindling, minilm_dir, python_reference, repo_root, shared_tiny_run, stderr,
};

fn tiny(runs: &Path, name: &str, model: &Path, extra: &[&str]) -> Command {
    let mut cmd = kindling();
    cmd.args(["pretrain", "recipes/tiny/simcse-tiny.toml"]);
    cmd.args(["--set", &format!("runs_dir=\"{}\"", runs.display())]);
    cmd.args(["--set", &format!("name=\"{name}\"")]);
    cmd.args(["--set", &format!("model.path=\"{}\"", model.display())]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const SENTENCES: [&str; 4] = [
    "It was a bright cold day in April.",
    "Anne walked to the shop in the rain.",
    "This dress fits perfectly and the fabric is soft.",
    "Runs small, order one size up.",
];

/// Kindling's embeddings of an export (mean pooling, normalised, as its modules.json says)
/// against sentence-transformers' on the same folder, when the Python reference is available.
pub(crate) fn check_sentence_transformers_agrees(export: &Path) {
    let sentences: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    let (ours, report) = embed_texts(export, &sentences, EmbedOptions::default()).unwrap();
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{report:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("sentences.json");
    std::fs::write(&input, serde_json::to_string(&sentences).unwrap()).unwrap();
    let Some(out) = python_reference("st_embed.py", &[export.as_os_str(), input.as_os_str()])
    else {
        return;
    };
    let theirs: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    if let Some(why) = theirs.get("skipped") {
        crate::common::skipped(&format!("the sentence-transformers check ({why})"));
        return;
    }
    for (s, (a, b)) in sentences
        .iter()
        .zip(ours.iter().zip(theirs.as_array().unwrap()))
    {
        let b: Vec<f64> = b
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((*x as f64 - y).abs() < 1e-4, "{s:?} dim {i}: {x} vs {y}");
        }
    }
}

#[test]
fn simcse_trains_reports_retrieval_and_exports_a_sentence_transformer() {
    let runs = tempfile::tempdir().unwrap();
    let model = shared_tiny_run().join("export");
    let out = tiny(runs.path(), "simcse", &model, &[]).output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("before training:") && err.contains("after training:"),
        "{err}"
    );
    let run = runs.path().join("simcse");
    let log = jsonl(&run.join("metrics.jsonl"));
    let train: Vec<f64> = log
        .iter()
        .filter(|v| v["split"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(train.len(), 20);
    assert!(
        train[17..].iter().sum::<f64>() < train[..3].iter().sum::<f64>(),
        "the contrastive loss falls: {train:?}"
    );
    let evals: Vec<&serde_json::Value> = log.iter().filter(|v| v["split"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    for key in ["recall_at_1", "recall_at_5", "recall_at_10", "mrr"] {
        for e in &evals {
            let v = e[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
    }
    let results = json(&run.join("eval_results.json"));
    let (r1, r10) = (
        results["final"]["recall_at_1"].as_f64().unwrap(),
        results["final"]["recall_at_10"].as_f64().unwrap(),
    );
    assert!(r1 <= r10, "recall grows with k");
    assert!(results["initial"]["recall_at_10"].is_number());
    for plot in ["loss.png", "eval_metrics.png"] {
        assert!(run.join("plots").join(plot).is_file(), "{plot}");
    }

    // An HF BertModel folder with base-model names, and a sentence-transformers layout.
    let export = run.join("export");
    let config = json(&export.join("config.json"));
    assert_eq!(config["architectures"][0], "BertModel");
    let modules = json(&export.join("modules.json"));
    assert_eq!(modules[1]["path"], "1_Pooling");
    assert_eq!(modules[2]["type"], "sentence_transformers.models.Normalize");
    let pooling = json(&export.join("1_Pooling/config.json"));
    assert_eq!(pooling["pooling_mode_mean_tokens"], true);
    assert_eq!(pooling["word_embedding_dimension"], config["hidden_size"]);
    let bytes = std::fs::read(export.join("model.safetensors")).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    assert!(names
        .iter()
        .any(|n| n == "embeddings.word_embeddings.weight"));
    assert!(names
        .iter()
        .all(|n| !n.starts_with("bert.") && !n.starts_with("cls.")));
    check_sentence_transformers_agrees(&export);
}

/// Killed after its first checkpoint and resumed (with GradCache on), the run ends with the
/// same weights as one never stopped.
#[test]
fn simcse_resumes_bit_for_bit_after_a_kill() {
    let runs = tempfile::tempdir().unwrap();
    let model = shared_tiny_run().join("export");
    let common = [
        "train.steps=8",
        "train.save_every=2",
        "train.eval_every=0",
        "grad_cache.enabled=true",
        "grad_cache.chunk_size=12",
        "eval.retrieval.max_rows=20",
    ];
    let straight = tiny(runs.path(), "straight", &model, &common)
        .output()
        .unwrap();
    assert!(straight.status.success(), "{}", stderr(&straight));
    let run = runs.path().join("killed");
    kill_when_exists(
        tiny(runs.path(), "killed", &model, &common),
        &run.join("checkpoints/step-00000002/state.json"),
    );
    let out = tiny(runs.path(), "killed", &model, &common)
        .args(["--resume", "auto"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resume:"), "{err}");
    let weights = |r: &Path| std::fs::read(r.join("export/model.safetensors")).unwrap();
    assert!(
        weights(&run) == weights(&runs.path().join("straight")),
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn a_missing_column_and_a_bad_data_section_are_named() {
    let runs = tempfile::tempdir().unwrap();
    let model = shared_tiny_run().join("export");
    let out = tiny(
        runs.path(),
        "bad",
        &model,
        &[
            "data.corpus=[]",
            "data.table=\"datasets/womens-clothing-reviews/reviews.tsv.gz\"",
            "data.anchor_column=\"body\"",
        ],
    )
    .output()
    .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("no column `body`") && err.contains("reviews.tsv.gz"),
        "{err}"
    );
    let out = tiny(
        runs.path(),
        "bad",
        &model,
        &["data.table=\"datasets/womens-clothing-reviews/reviews.tsv.gz\""],
    )
    .output()
    .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("`data`") && err.contains("not both"), "{err}");
}

/// Before training, SimCSE's encoder is MiniLM as published (its golden embeddings); after a
/// short supervised run, the export loads in Kindling and in sentence-transformers with equal
/// embeddings.
#[test]
fn simcse_from_minilm_starts_at_the_golden_embeddings_and_exports_a_loadable_model() {
    let Some(dir) = minilm_dir() else {
        crate::common::skipped("SimCSE from MiniLM (no weights in KINDLING_MINILM_DIR)");
        return;
    };
    let recipe = SimcseRecipe::load(
        &repo_root().join("recipes/tiny/simcse-tiny.toml"),
        &[format!("model.path=\"{}\"", dir.display())],
    )
    .unwrap();
    let tokenizer = tok::load(&dir).unwrap();
    let specials = tok::special_tokens(&tokenizer).unwrap();
    let obj = Simcse::build(&recipe, specials.pad, &candle_core::Device::Cpu).unwrap();
    let golden = json(&repo_root().join("datasets/minilm-tokenizer/golden_embeddings.json"));
    let mut checked = 0;
    for (s, v) in golden.as_object().unwrap() {
        let Some(want) = v["embedding_first8"].as_array() else {
            continue;
        };
        let ids = encode(&tokenizer, s, 128, specials.sep).unwrap();
        let e = obj
            .embed(&[ids], Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let norm = e[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        for (i, w) in want.iter().enumerate() {
            let got = e[0][i] / norm;
            let w = w.as_f64().unwrap();
            assert!((got as f64 - w).abs() < 1e-4, "{s:?} dim {i}: {got} vs {w}");
        }
        checked += 1;
    }
    assert_eq!(checked, 4);

    let runs = tempfile::tempdir().unwrap();
    let out = tiny(
        runs.path(),
        "minilm",
        &dir,
        &[
            "data.corpus=[]",
            "data.table=\"datasets/womens-clothing-reviews/reviews.tsv.gz\"",
            "data.anchor_column=\"title\"",
            "data.positive_column=\"text\"",
            "data.split_column=\"split\"",
            "data.max_examples=48",
            "train.batch_size=8",
            "train.steps=3",
            "train.eval_every=0",
            "train.optimizer.lr=2e-5",
            "eval.retrieval.max_rows=40",
        ],
    )
    .output()
    .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(anchor, positive) pairs"), "{err}");
    check_sentence_transformers_agrees(&runs.path().join("minilm/export"));
}
