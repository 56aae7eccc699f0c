//! Downstream evaluation as users run it: sentence pairs encoded as HF's tokenizer encodes
//! them, regression and multi-label fine-tuning whose exports transformers loads with their
//! `problem_type` and the same outputs, and tables with holes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kindling_core::Mode;
use kindling_data::labelled::TableSpec;
use kindling_data::tokenizer as tok;
use kindling_models::bert::Pooling;
use kindling_recipes::finetune::TextEncoder;

use crate::common::{kindling, minilm_dir, python_reference, shared_tiny_run, stderr};

/// The reviews' (title, text) pairs of the test split, both cells non-empty.
fn review_pairs(n: usize) -> Vec<(String, String)> {
    let spec = TableSpec {
        path: crate::common::repo_root().join("datasets/womens-clothing-reviews/reviews.tsv.gz"),
        format: None,
        text_columns: vec!["title".into(), "text".into()],
        label_column: "rating".into(),
        split_column: Some("split".into()),
        pair: true,
    };
    let mut skipped = Default::default();
    let rows = kindling_data::labelled::read_examples_with(
        &spec,
        kindling_data::labelled::OnInvalid::Skip,
        &mut skipped,
    )
    .unwrap();
    rows.into_iter()
        .filter(|e| e.split.as_deref() == Some("test"))
        .take(n)
        .map(|e| (e.text, e.text_pair.unwrap()))
        .collect()
}

/// Every tokenizer Kindling fine-tunes with (a trained WordPiece BERT, byte-level BPE RoBERTa
/// and ModernBERT exports, and MiniLM's HF tokenizer when present) encodes 300 review pairs at
/// max_length 48 (most are truncated) exactly as `tokenizer(a, b, truncation="longest_first")`:
/// ids and token types.
#[test]
fn pair_encoding_is_hfs_longest_first_on_the_reviews() {
    let pairs = review_pairs(300);
    assert_eq!(pairs.len(), 300);
    let mut folders: Vec<PathBuf> = vec![
        shared_tiny_run().join("export"),
        crate::architectures::shared_roberta_run().join("export"),
        crate::architectures::shared_modernbert_run().join("export"),
    ];
    folders.extend(minilm_dir());
    let max_length = 48;
    for dir in folders {
        let tk = tok::load(&dir).unwrap();
        let enc = TextEncoder::new(&tk, max_length).unwrap();
        let rows: Vec<serde_json::Value> = pairs
            .iter()
            .map(|(a, b)| {
                let (ids, types) = enc.encode(a, Some(b)).unwrap();
                let types = types.unwrap();
                assert!(ids.len() <= max_length && types.len() == ids.len());
                serde_json::json!([a, b, ids, types])
            })
            .collect();
        // BERT's segment B is type 1: the pair's token types are not all zero there.
        if dir.starts_with(shared_tiny_run()) {
            assert!(rows
                .iter()
                .any(|r| r[3].as_array().unwrap().contains(&1.into())));
        }
        let out = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            out.path(),
            serde_json::json!({"max_length": max_length, "pairs": rows}).to_string(),
        )
        .unwrap();
        if let Some(text) = python_reference(
            "hf_pair_encoding.py",
            &[dir.as_os_str(), out.path().as_os_str()],
        ) {
            assert!(text.contains("\"differ\": 0"), "{}: {text}", dir.display());
        }
    }
}

/// A table a tiny model can learn: the sentiment word decides `label` (pos/neg), the second
/// segment decides `recent`; `score` follows both, `tags` names both (multi-label).
fn pair_table(dir: &Path, rows: usize) -> PathBuf {
    let pos = ["happy", "delight", "pleasure", "love", "glad", "cheerful"];
    let neg = ["sorrow", "misery", "wretched", "angry", "grief", "fear"];
    let filler = [
        "the", "of", "her", "and", "was", "in", "to", "a", "with", "it",
    ];
    let mut s = String::from("split\ttext\tother\tlabel\tscore\ttags\n");
    for i in 0..rows {
        let positive = i % 2 == 0;
        let recent = i % 3 == 0;
        let words = if positive { &pos } else { &neg };
        let text: Vec<&str> = (0..8)
            .map(|k| {
                if k % 3 == 1 {
                    words[(i * 7 + k) % words.len()]
                } else {
                    filler[(i * 13 + k * 5) % filler.len()]
                }
            })
            .collect();
        let other = if recent {
            "today it was so"
        } else {
            "long ago it was"
        };
        let label = if positive { "pos" } else { "neg" };
        let score = if positive { 4.0 } else { 1.0 } + if recent { 0.5 } else { 0.0 };
        let tags = if recent {
            format!("{label}|recent")
        } else {
            label.to_string()
        };
        let split = if (i / 10) % 5 == 0 { "test" } else { "train" };
        s += &format!(
            "{split}\t{}\t{other}\t{label}\t{score}\t{tags}\n",
            text.join(" ")
        );
    }
    let p = dir.join("pairs.tsv");
    std::fs::write(&p, s).unwrap();
    p
}

fn finetune(runs: &Path, table: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = kindling();
    cmd.args(["finetune", "recipes/tiny/finetune-tiny.toml"]);
    for s in [
        format!("runs_dir=\"{}\"", runs.display()),
        format!(
            "model.path=\"{}\"",
            shared_tiny_run().join("export").display()
        ),
        format!("data.path=\"{}\"", table.display()),
        "data.join_text_columns=false".into(),
        "data.text_columns=[\"text\", \"other\"]".into(),
        // 14 steps an epoch: enough passes for the tiny model to fit both segments.
        "train.max_epochs=30".into(),
    ] {
        cmd.args(["--set", &s]);
    }
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd.output().unwrap()
}

/// Kindling's logits (and loss on `labels`) of two review-like pairs from the export, written
/// for `hf_cls_logits.py` with the expected problem type.
fn check_with_transformers(
    export: &Path,
    problem: &str,
    labels: serde_json::Value,
    loss: &dyn Fn(&Tensor) -> f32,
) {
    let cfg = kindling_models::import::read_encoder_config(export).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["problem_type"], problem);
    let n = config["id2label"].as_object().unwrap().len();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[export.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = kindling_models::SequenceClassifier::load(vb, &cfg, n, Pooling::Cls, 0.0).unwrap();
    let enc = TextEncoder::new(&tok::load(export).unwrap(), 32).unwrap();
    let pairs = [
        ("happy the love of her", "today it was so"),
        ("grief", "long ago it was"),
    ];
    let a = enc.encode(pairs[0].0, Some(pairs[0].1)).unwrap();
    let b = enc.encode(pairs[1].0, Some(pairs[1].1)).unwrap();
    let seq = a.0.len().max(b.0.len());
    let pad = |v: &[u32]| {
        let mut v = v.to_vec();
        v.resize(seq, 0);
        v
    };
    let mask = |v: &[u32]| {
        let mut m = vec![1u32; v.len()];
        m.resize(seq, 0);
        m
    };
    let ids = [pad(&a.0), pad(&b.0)].concat();
    let types = [pad(a.1.as_ref().unwrap()), pad(b.1.as_ref().unwrap())].concat();
    let am = [mask(&a.0), mask(&b.0)].concat();
    let t = |v: &[u32]| Tensor::from_slice(v, (2, seq), &Device::Cpu).unwrap();
    let logits = model
        .forward_t(&t(&ids), Some(&t(&types)), &t(&am), Mode::Eval)
        .unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        out.path(),
        serde_json::json!({
            "input_ids": t(&ids).to_vec2::<u32>().unwrap(),
            "token_type_ids": t(&types).to_vec2::<u32>().unwrap(),
            "attention_mask": t(&am).to_vec2::<u32>().unwrap(),
            "logits": logits.to_vec2::<f32>().unwrap(),
            "problem_type": problem,
            "labels": labels,
            "loss": loss(&logits),
            "pairs": pairs,
        })
        .to_string(),
    )
    .unwrap();
    let args = [export.as_os_str(), out.path().as_os_str()];
    if let Some(text) = python_reference("hf_cls_logits.py", &args) {
        assert!(text.contains("max_abs_diff"), "{text}");
    }
    // sentence-transformers' CrossEncoder tokenises the pairs itself: the same scores.
    if let Some(text) = python_reference("st_cross_encoder.py", &args) {
        assert!(text.contains("max_abs_diff"), "{text}");
    }
}

fn test_results(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("test_results.json")).unwrap()).unwrap()
}

/// Regression (`problem_type = "regression"`, a float column, MSE) learns the score from the
/// pair, reports MSE, Pearson and Spearman, and exports a one-output classifier that
/// transformers loads as regression, with Kindling's logits and MSE.
#[test]
fn regression_on_pairs_learns_the_score_and_exports_what_transformers_computes() {
    let dir = tempfile::tempdir().unwrap();
    let table = pair_table(dir.path(), 300);
    let out = finetune(
        dir.path(),
        &table,
        &[
            "data.problem_type=\"regression\"",
            "data.label_column=\"score\"",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("pairs (text | other)"), "{err}");
    let run = dir.path().join("finetune-tiny");
    let r = test_results(&run);
    assert_eq!(r["problem_type"], "regression");
    let test = &r["test"];
    for k in ["mse", "pearson", "spearman"] {
        assert!(test[k].is_number(), "{k} missing: {test}");
    }
    assert!(test["spearman"].as_f64().unwrap() > 0.8, "{test}");
    check_with_transformers(
        &run.join("export"),
        "regression",
        serde_json::json!([4.5, 1.0]),
        &|logits| {
            let y = Tensor::new(&[[4.5f32], [1.0]], &Device::Cpu).unwrap();
            (logits - y)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        },
    );
}

/// Multi-label (`a|b` cells, sigmoid + binary cross-entropy) learns both tags, reports micro-
/// and macro-F1 and exact match, and exports a classifier transformers loads as multi-label,
/// with Kindling's logits and loss; a cell naming a class no training row has is skipped under
/// `on_invalid = "skip"` and named by line otherwise.
#[test]
fn multi_label_learns_every_tag_and_exports_what_transformers_computes() {
    let dir = tempfile::tempdir().unwrap();
    let table = pair_table(dir.path(), 300);
    let ml = [
        "data.problem_type=\"multi_label_classification\"",
        "data.label_column=\"tags\"",
        "train.max_epochs=60",
    ];
    let out = finetune(dir.path(), &table, &ml);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = dir.path().join("finetune-tiny");
    let r = test_results(&run);
    assert_eq!(r["problem_type"], "multi_label_classification");
    assert_eq!(r["labels"], serde_json::json!(["neg", "pos", "recent"]));
    let test = &r["test"];
    assert!(test["micro_f1"].as_f64().unwrap() > 0.9, "{test}");
    assert!(test["exact_match"].as_f64().unwrap() > 0.8, "{test}");
    assert!(test["macro_f1"].is_number(), "{test}");
    let labels = serde_json::json!([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]);
    check_with_transformers(
        &run.join("export"),
        "multi_label_classification",
        labels,
        &|logits| {
            let y = Tensor::new(&[[0f32, 1.0, 1.0], [1.0, 0.0, 0.0]], &Device::Cpu).unwrap();
            kindling_recipes::finetune::binary_cross_entropy_with_logits(logits, &y)
                .unwrap()
                .to_scalar()
                .unwrap()
        },
    );

    // A test row tagged with a class no training row has.
    let mut text = std::fs::read_to_string(&table).unwrap();
    text += "test\thappy love\ttoday\tpos\t4.5\tpos|mystery\n";
    std::fs::write(&table, &text).unwrap();
    let line = text.lines().count();
    let runs = tempfile::tempdir().unwrap();
    let out = finetune(runs.path(), &table, &ml);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("pairs.tsv:{line}")) && err.contains("mystery"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(runs.path()).unwrap().count(), 0);
    let out = finetune(
        runs.path(),
        &table,
        &[ml[0], ml[1], "data.on_invalid=\"skip\""],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r = test_results(&runs.path().join("finetune-tiny"));
    assert_eq!(r["skipped_rows"]["count"], 1);
    assert_eq!(r["skipped_rows"]["first"][0]["line"], line as u64);
}

/// The problem type's keys are checked before anything is written.
#[test]
fn pair_and_problem_type_settings_are_checked_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let table = pair_table(dir.path(), 60);
    let runs = tempfile::tempdir().unwrap();
    for (settings, needles) in [
        (
            vec!["data.text_pair=[\"text\", \"other\"]"],
            vec!["data.text_pair", "not both"],
        ),
        (
            vec!["data.text_columns=[]", "data.text_pair=[\"text\"]"],
            vec!["data.text_pair", "two columns"],
        ),
        (
            vec![
                "data.problem_type=\"multi_label_classification\"",
                "data.threshold=1.5",
            ],
            vec!["data.threshold"],
        ),
        (
            vec!["data.problem_type=\"ordinal\""],
            vec!["data.problem_type", "regression"],
        ),
        (
            vec!["data.label_column=\"tags\"", "train.monitor.metric=\"f1\""],
            vec!["train.monitor.metric", "two classes", "has 4"],
        ),
        (
            vec![
                "data.problem_type=\"regression\"",
                "data.label_column=\"label\"",
            ],
            vec![
                "pairs.tsv:",
                "label `pos` in column `label` is not a number",
            ],
        ),
        (
            vec![
                "data.problem_type=\"regression\"",
                "data.label_column=\"score\"",
                "train.monitor.metric=\"accuracy\"",
            ],
            vec!["accuracy", "spearman"],
        ),
    ] {
        let out = finetune(runs.path(), &table, &settings);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{settings:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{settings:?}: `{n}` not in {err}");
        }
    }
    assert_eq!(std::fs::read_dir(runs.path()).unwrap().count(), 0);
    // A pair spelled as text_pair trains as the same two columns do.
    let out = finetune(
        runs.path(),
        &table,
        &[
            "data.text_columns=[]",
            "data.text_pair=[\"text\", \"other\"]",
            "data.label_column=\"label\"",
            "train.steps=2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The STS and retrieval scores equal scipy's `spearmanr`/`pearsonr` of the cosine
/// similarities and numpy/sklearn's recall@k, MRR and `ndcg_score(k=10)` on the same vectors
/// (tests/reference/embedding_scores.py); a hand-checked ranking too.
#[test]
fn embedding_scores_match_scipy_and_sklearn() {
    use kindling_recipes::metrics::{ranking_metrics, retrieval_scores, sts_scores};
    // Ranks 1, 2 and 11: nDCG@10 = (1 + 1/log2(3) + 0) / 3, MRR = (1 + 1/2 + 1/11) / 3.
    let m = ranking_metrics(&[0, 1, 10], &[1, 10]);
    assert!((m["ndcg_at_10"] - (1.0 + 1.0 / 3f64.log2()) / 3.0).abs() < 1e-12);
    assert!((m["mrr"] - (1.0 + 0.5 + 1.0 / 11.0) / 3.0).abs() < 1e-12);
    assert_eq!(
        (m["recall_at_1"], m["recall_at_10"]),
        (1.0 / 3.0, 2.0 / 3.0)
    );

    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
    };
    let mut vectors =
        |n: usize| -> Vec<Vec<f32>> { (0..n).map(|_| (0..16).map(|_| next()).collect()).collect() };
    let (a, b0, queries, noise) = (vectors(120), vectors(120), vectors(200), vectors(200));
    // Second sentences and documents near their partners, to different degrees.
    let near = |x: &[Vec<f32>], y: &[Vec<f32>], i_scale: f32| -> Vec<Vec<f32>> {
        x.iter()
            .zip(y)
            .enumerate()
            .map(|(i, (p, n))| {
                let w = i_scale * (1 + i % 7) as f32;
                p.iter().zip(n).map(|(p, n)| p + w * n).collect()
            })
            .collect()
    };
    let b = near(&a, &b0, 0.3);
    let docs = near(&queries, &noise, 0.5);
    let gold: Vec<f64> = (0..120)
        .map(|i| 6.0 - (i % 7) as f64 + 0.1 * (i % 3) as f64)
        .collect();
    let ks = vec![1, 3, 10];
    let mut scores = sts_scores(&a, &b, &gold);
    scores.extend(retrieval_scores(&queries, &docs, &ks));
    assert!(scores["sts_spearman"] > 0.5, "{scores:?}");
    let out = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        out.path(),
        serde_json::json!({
            "sts_a": a, "sts_b": b, "gold": gold, "queries": queries, "docs": docs,
            "k": ks, "scores": scores,
        })
        .to_string(),
    )
    .unwrap();
    if let Some(text) = python_reference("embedding_scores.py", &[out.path().as_os_str()]) {
        assert!(text.contains("max_abs_diff"), "{text}");
    }
}

/// `kindling evaluate-embeddings` scores any encoder folder on a recipe's `[eval]` sections
/// (here a SimCSE run's own, after training): the same numbers as the run's last evaluation,
/// since both embed through one path; a recipe with nothing to evaluate exits 2.
#[test]
fn evaluate_embeddings_of_a_simcse_export_equals_the_runs_last_evaluation() {
    let runs = tempfile::tempdir().unwrap();
    let export = shared_tiny_run().join("export");
    let recipe = runs.path().join("simcse.toml");
    std::fs::write(
        &recipe,
        format!(
            "objective = \"simcse\"\nseed = 3\nruns_dir = \"{}\"\n\
             [model]\npath = \"{}\"\npooling = \"mean\"\nmax_length = 32\n\
             [data]\ntable = \"datasets/womens-clothing-reviews/reviews.tsv.gz\"\n\
             anchor_column = \"text\"\nsplit_column = \"split\"\nsplit = \"train\"\nmax_examples = 256\n\
             [train]\nbatch_size = 16\neval_batch_size = 64\nsteps = 4\neval_every = 4\n\
             optimizer = {{ lr = 1e-4 }}\n\
             [eval.retrieval]\ntable = \"datasets/womens-clothing-reviews/reviews.tsv.gz\"\n\
             query_column = \"title\"\ndoc_column = \"text\"\nsplit_column = \"split\"\nmax_rows = 150\n\
             [eval.sts]\ntable = \"datasets/womens-clothing-reviews/reviews-sts.tsv.gz\"\n\
             split_column = \"split\"\nmax_rows = 100\n",
            runs.path().display(),
            export.display()
        ),
    )
    .unwrap();
    let out = kindling().args(["pretrain"]).arg(&recipe).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = &run["eval"];
    for k in [
        "recall_at_1",
        "mrr",
        "ndcg_at_10",
        "sts_spearman",
        "sts_pearson",
    ] {
        assert!(last[k].is_number(), "{k} missing from {last}");
    }
    let out = kindling()
        .args(["evaluate-embeddings"])
        .arg(runs.path().join("simcse/export"))
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "recall_at_1",
        "mrr",
        "ndcg_at_10",
        "sts_spearman",
        "sts_pearson",
    ] {
        let (a, b) = (
            got["scores"][k].as_f64().unwrap(),
            last[k].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-5,
            "{k}: evaluate-embeddings {a} vs the run's {b}"
        );
    }
    assert_eq!(got["scores"]["sts_rows"], 100.0);
    let empty = runs.path().join("empty.toml");
    std::fs::write(&empty, "[model]\npooling = \"mean\"\n").unwrap();
    let out = kindling()
        .args(["evaluate-embeddings"])
        .arg(&export)
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("[eval.sts]"), "{}", stderr(&out));
}

/// `kindling evaluate SUITE MODEL --compare-random` runs every task on the model and on its
/// random twin and prints one table (task rows, model columns, the task's metric), saved as
/// JSON and Markdown; run again, it resumes the finished runs and prints the same table.
#[test]
fn a_suite_prints_one_table_of_tasks_by_models_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let table = pair_table(dir.path(), 200);
    let suite = dir.path().join("mini.toml");
    let sts = dir.path().join("sts.toml");
    std::fs::write(
        &sts,
        "[model]\npooling = \"mean\"\nmax_length = 32\n\
         [eval.retrieval]\ntable = \"datasets/womens-clothing-reviews/reviews.tsv.gz\"\n\
         query_column = \"title\"\ndoc_column = \"text\"\nsplit_column = \"split\"\nmax_rows = 100\n\
         [eval.sts]\ntable = \"datasets/womens-clothing-reviews/reviews-sts.tsv.gz\"\n\
         split_column = \"split\"\nmax_rows = 100\n",
    )
    .unwrap();
    std::fs::write(
        &suite,
        format!(
            "runs_dir = \"{runs}\"\n\
             set = [\"data.path=\\\"{table}\\\"\", \"data.text_columns=[\\\"text\\\", \\\"other\\\"]\", \
                    \"data.join_text_columns=false\", \"train.max_epochs=20\"]\n\
             [[task]]\nname = \"sentiment\"\nrecipe = \"recipes/tiny/finetune-tiny.toml\"\n\
             set = [\"data.label_column=\\\"label\\\"\"]\nalso = [\"mcc\", \"f1\"]\n\
             [[task]]\nname = \"score\"\nrecipe = \"recipes/tiny/finetune-tiny.toml\"\n\
             set = [\"data.label_column=\\\"score\\\"\", \"data.problem_type=\\\"regression\\\"\"]\n\
             [[task]]\nname = \"probe\"\nkind = \"probe\"\nrecipe = \"recipes/tiny/finetune-tiny.toml\"\n\
             set = [\"data.label_column=\\\"label\\\"\"]\n\
             [[task]]\nname = \"sts\"\nkind = \"embeddings\"\nrecipe = \"{sts}\"\nalso = [\"mrr\"]\n",
            runs = dir.path().join("runs").display(),
            table = table.display(),
            sts = sts.display(),
        ),
    )
    .unwrap();
    let export = shared_tiny_run().join("export");
    let run = || {
        kindling()
            .args(["evaluate"])
            .arg(&suite)
            .arg(&export)
            .arg("--compare-random")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    let table_md = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table_md.lines().collect();
    assert_eq!(
        lines[0],
        "| task | metric | bert-tiny-mlm | bert-tiny-mlm (random init) |"
    );
    assert!(
        lines[2].starts_with("| sentiment | accuracy (f1, mcc) |"),
        "{table_md}"
    );
    assert!(lines[3].starts_with("| score | spearman |"), "{table_md}");
    assert!(lines[4].starts_with("| probe | accuracy |"), "{table_md}");
    assert!(
        lines[5].starts_with("| sts | sts_spearman (mrr) |"),
        "{table_md}"
    );
    let saved = dir.path().join("runs/mini");
    assert_eq!(
        std::fs::read_to_string(saved.join("results.md")).unwrap(),
        table_md
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("results.json")).unwrap())
            .unwrap();
    let cells = results["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 8);
    // The random twin's embeddings are not the model's.
    let sts: Vec<f64> = cells
        .iter()
        .filter(|c| c["task"] == "sts")
        .map(|c| c["scores"]["mrr"].as_f64().unwrap())
        .collect();
    assert_ne!(sts[0], sts[1]);
    let sentiment = cells
        .iter()
        .find(|c| c["task"] == "sentiment" && c["init"] == "pretrained")
        .unwrap();
    assert!(
        sentiment["scores"]["accuracy"].as_f64().unwrap() > 0.9,
        "{sentiment}"
    );
    for name in ["sentiment-bert-tiny-mlm", "score-bert-tiny-mlm-random"] {
        assert!(
            saved.join(name).join("test_results.json").is_file(),
            "{name}"
        );
    }
    // Again: every fine-tune resumes its finished run; the same table.
    let again = run();
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(String::from_utf8(again.stdout).unwrap(), table_md);
    // A model folder that is not one: exit 2 before any task runs.
    let before = std::fs::read_dir(&saved).unwrap().count();
    let out = kindling()
        .args(["evaluate"])
        .arg(&suite)
        .arg(dir.path().join("no-such-model"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-model"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&saved).unwrap().count(), before);
}

/// `[data.matching]` builds a pair task from two columns: each row's own (title, text) is a 1,
/// its title with another review's text a 0; rows without a title are skipped and counted.
#[test]
fn a_matching_task_pairs_each_title_with_its_own_and_anothers_review() {
    let runs = tempfile::tempdir().unwrap();
    let out = kindling()
        .args(["finetune", "recipes/finetune-reviews-matching.toml"])
        .args(["--set", &format!("runs_dir=\"{}\"", runs.path().display())])
        .args([
            "--set",
            &format!(
                "model.path=\"{}\"",
                shared_tiny_run().join("export").display()
            ),
        ])
        .args([
            "--set",
            "data.max_train_examples=200",
            "--set",
            "data.max_length=32",
        ])
        .args(["--set", "train.steps=5", "--set", "train.eval_every=5"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("pairs (title | text)") && err.contains("invalid rows skipped"),
        "{err}"
    );
    let r = test_results(&runs.path().join("finetune-reviews-matching"));
    assert_eq!(r["labels"], serde_json::json!(["0", "1"]));
    // Half the test pairs are positives: one negative per row.
    let cm = r["confusion_matrix"].as_array().unwrap();
    let row = |i: usize| -> u64 {
        cm[i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum()
    };
    assert_eq!(row(0), row(1));
    assert!(r["skipped_rows"]["count"].as_u64().unwrap() > 100);
    assert!(r["test"]["f1"].is_number() && r["test"]["mcc"].is_number());
}
