//! Fine-tuning and probing from an export: a classifier learns a task its data defines, its
//! export is an HF `BertForSequenceClassification` with `id2label`, the backbone comes from the
//! folder (or from the seed, for the random baseline), and bad rows are named by line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kindling_models::bert::{BertConfig, BertForSequenceClassification, Pooling};
use kindling_models::Mode;
use kindling_recipes::finetune::{Classifier, FinetuneRecipe, Init};

use crate::common::{
    kill_when_exists, kindling, python_reference, repo_root, shared_tiny_run, stderr,
};

/// A two-class table the labels define without doubt: class `pos` rows use words of one set,
/// class `neg` rows the other, among shared filler words. Rows 2.. are split train/test.
fn separable_table(dir: &Path, rows: usize) -> PathBuf {
    let pos = ["happy", "delight", "pleasure", "love", "glad", "cheerful"];
    let neg = ["sorrow", "misery", "wretched", "angry", "grief", "fear"];
    let filler = [
        "the", "of", "her", "and", "was", "in", "to", "a", "with", "it",
    ];
    let mut s = String::from("split\ttext\tlabel\n");
    for i in 0..rows {
        let (words, label) = if i % 2 == 0 {
            (&pos, "pos")
        } else {
            (&neg, "neg")
        };
        let text: Vec<&str> = (0..8)
            .map(|k| {
                if k % 3 == 1 {
                    words[(i * 7 + k) % words.len()]
                } else {
                    filler[(i * 13 + k * 5) % filler.len()]
                }
            })
            .collect();
        // Test rows in runs of ten, so they hold every filler pattern (which repeats every ten
        // rows) that the training rows hold: `i % 5 == 0` picked one pattern only, never seen in
        // training, and the probe then depended on the tokenizer the tiny run happened to train.
        let split = if (i / 10) % 5 == 0 { "test" } else { "train" };
        s += &format!("{split}\t{}\t{label}\n", text.join(" "));
    }
    let p = dir.join("sentiment.tsv");
    std::fs::write(&p, s).unwrap();
    p
}

fn tiny_export() -> PathBuf {
    shared_tiny_run().join("export")
}

fn finetune_cmd(runs: &Path, table: &Path, extra: &[String]) -> std::process::Output {
    let mut cmd = kindling();
    cmd.args(["finetune", "recipes/tiny/finetune-tiny.toml", "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.display()))
        .args([
            "--set",
            &format!("model.path=\"{}\"", tiny_export().display()),
        ])
        .args(["--set", &format!("data.path=\"{}\"", table.display())])
        .args(["--set", "data.text_columns=[\"text\"]"])
        .args(["--set", "data.label_column=\"label\""]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd.output().expect("running kindling")
}

/// One fine-tuning run on the separable table, shared by the tests that read its results.
fn shared_finetune() -> &'static Path {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kindling-shared-finetune");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let table = separable_table(&root, 500);
        let out = finetune_cmd(&root, &table, &[]);
        assert!(out.status.success(), "finetune failed:\n{}", stderr(&out));
        std::fs::write(root.join("stdout.json"), &out.stdout).unwrap();
        std::fs::write(root.join("stderr.txt"), &out.stderr).unwrap();
        root.join("finetune-tiny")
    })
}

#[test]
fn finetuning_learns_a_task_its_labels_define() {
    let run = shared_finetune();
    let out: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.parent().unwrap().join("stdout.json")).unwrap(),
    )
    .unwrap();
    let acc = out["test"]["accuracy"].as_f64().unwrap();
    let f1 = out["test"]["macro_f1"].as_f64().unwrap();
    assert!(
        acc >= 0.9 && f1 >= 0.9,
        "test accuracy {acc}, macro-F1 {f1}"
    );
    let log = std::fs::read_to_string(run.parent().unwrap().join("stderr.txt")).unwrap();
    // The report names the fresh head and prints the confusion matrix.
    assert!(
        log.contains("classifier.weight") && log.contains("predicted ->"),
        "{log}"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("test_results.json")).unwrap())
            .unwrap();
    let cm = results["confusion_matrix"].as_array().unwrap();
    let total: u64 = cm
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 100, "the test split has 100 rows");
}

#[test]
fn finetuned_export_is_an_hf_sequence_classifier_with_id2label() {
    let export = shared_finetune().join("export");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert_eq!(
        config["id2label"],
        serde_json::json!({"0": "neg", "1": "pos"})
    );
    assert_eq!(config["label2id"], serde_json::json!({"neg": 0, "pos": 1}));
    let bytes = std::fs::read(export.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keys: BTreeSet<String> = st.names().into_iter().map(String::from).collect();
    for k in [
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
        "bert.embeddings.word_embeddings.weight",
    ] {
        assert!(keys.contains(k), "{k} missing from {keys:?}");
    }
    assert!(
        keys.iter().all(|k| !k.starts_with("cls.")),
        "the MLM head is not part of a classifier"
    );
    assert!(export.join("tokenizer.json").is_file() && export.join("vocab.txt").is_file());
    let card = std::fs::read_to_string(export.join("README.md")).unwrap();
    assert!(card.starts_with("---\n") && card.contains("pipeline_tag: text-classification"));
}

#[test]
fn finetuned_export_reproduces_the_logits_transformers_computes() {
    let export = shared_finetune().join("export");
    let cfg: BertConfig =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[export.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = BertForSequenceClassification::load(vb, &cfg, 2, Pooling::Cls, 0.1).unwrap();
    // Two rows, the second padded: the attention mask must matter the same way on both sides.
    let ids: Vec<u32> = vec![2, 40, 41, 42, 43, 3, 2, 50, 51, 3, 0, 0];
    let mask: Vec<u32> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let t_ids = Tensor::from_slice(&ids, (2, 6), &Device::Cpu).unwrap();
    let t_mask = Tensor::from_slice(&mask, (2, 6), &Device::Cpu).unwrap();
    let logits = model.forward_t(&t_ids, None, &t_mask, Mode::Eval).unwrap();
    let out = shared_finetune().join("kindling_cls_logits.json");
    std::fs::write(
        &out,
        serde_json::json!({
            "input_ids": t_ids.to_vec2::<u32>().unwrap(),
            "attention_mask": t_mask.to_vec2::<u32>().unwrap(),
            "logits": logits.to_vec2::<f32>().unwrap(),
        })
        .to_string(),
    )
    .unwrap();
    let Some(text) = python_reference("hf_cls_logits.py", &[export.as_os_str(), out.as_os_str()])
    else {
        return;
    };
    assert!(text.contains("max_abs_diff"), "{text}");
}

fn recipe_for(table: &Path, init: Init) -> FinetuneRecipe {
    let overrides = [
        format!("model.path=\"{}\"", tiny_export().display()),
        format!("data.path=\"{}\"", table.display()),
        "data.text_columns=[\"text\"]".into(),
        "data.label_column=\"label\"".into(),
        format!(
            "model.init=\"{}\"",
            if init == Init::Random {
                "random"
            } else {
                "pretrained"
            }
        ),
    ];
    FinetuneRecipe::load(
        &repo_root().join("recipes/tiny/finetune-tiny.toml"),
        &overrides,
    )
    .unwrap()
}

fn tensor_of(c: &Classifier, name: &str) -> Vec<f32> {
    let data = c.varmap.data().lock().unwrap();
    data[name]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn pretrained_init_takes_the_folder_backbone_and_random_init_only_its_shape() {
    let dir = tempfile::tempdir().unwrap();
    let table = separable_table(dir.path(), 20);
    let labels = kindling_data::LabelSet {
        names: vec!["neg".into(), "pos".into()],
    };
    let file =
        candle_core::safetensors::load(tiny_export().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let name = "bert.encoder.layer.1.attention.self.query.weight";
    let from_file: Vec<f32> = file[name].flatten_all().unwrap().to_vec1().unwrap();

    let (pre, report) = Classifier::build(
        &recipe_for(&table, Init::Pretrained),
        labels.clone(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensor_of(&pre, name), from_file);
    let report = report.unwrap();
    assert_eq!(
        report.missing,
        [
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "classifier.bias",
            "classifier.weight"
        ]
    );
    assert!(
        report.unused.iter().all(|k| k.starts_with("cls.")),
        "{:?}",
        report.unused
    );

    let (random, report) = Classifier::build(
        &recipe_for(&table, Init::Random),
        labels.clone(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(report.is_none());
    assert_ne!(tensor_of(&random, name), from_file);
    // Same seed, same random model; and the head starts the same way in both.
    let (again, _) =
        Classifier::build(&recipe_for(&table, Init::Random), labels, &Device::Cpu).unwrap();
    assert_eq!(tensor_of(&random, name), tensor_of(&again, name));
    assert_eq!(
        tensor_of(&random, "classifier.weight"),
        tensor_of(&pre, "classifier.weight")
    );
}

#[test]
fn every_classifier_parameter_receives_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let table = separable_table(dir.path(), 20);
    for pooling in ["cls", "mean"] {
        let mut recipe = recipe_for(&table, Init::Pretrained);
        recipe.model.pooling = if pooling == "cls" {
            Pooling::Cls
        } else {
            Pooling::Mean
        };
        recipe.model.classifier_dropout = Some(0.1);
        let labels = kindling_data::LabelSet {
            names: vec!["neg".into(), "pos".into()],
        };
        let (c, _) = Classifier::build(&recipe, labels, &Device::Cpu).unwrap();
        let data = kindling_recipes::finetune::Encoded {
            ids: vec![vec![2, 30, 31, 32, 3], vec![2, 40, 3]],
            labels: vec![0, 1],
            ..Default::default()
        };
        let b = kindling_recipes::finetune::make_batch(&data, &[0, 1], 0, 0, 0);
        use kindling_train::Objective;
        let out = c.step(&b, Mode::Train { seed: 3 }).unwrap();
        let grads = out.loss.backward().unwrap();
        let data = c.varmap.data().lock().unwrap();
        for (n, v) in data.iter() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{pooling}: no gradient for {n}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // The position embeddings past the longest row and unused words get none.
            if !n.contains("embeddings") {
                assert!(norm > 0.0, "{pooling}: zero gradient for {n}");
            }
        }
    }
}

#[test]
fn layerwise_lr_decay_scales_lower_layers_down() {
    let dir = tempfile::tempdir().unwrap();
    let table = separable_table(dir.path(), 20);
    let labels = kindling_data::LabelSet {
        names: vec!["neg".into(), "pos".into()],
    };
    let (c, _) =
        Classifier::build(&recipe_for(&table, Init::Pretrained), labels, &Device::Cpu).unwrap();
    // The tiny model has 2 layers: head 1, layer 1 d, layer 0 d^2, embeddings d^3.
    let d: f64 = 0.5;
    assert_eq!(c.lr_scale("classifier.weight", d), 1.0);
    assert_eq!(c.lr_scale("bert.pooler.dense.weight", d), 1.0);
    assert_eq!(
        c.lr_scale("bert.encoder.layer.1.output.dense.weight", d),
        0.5
    );
    assert_eq!(
        c.lr_scale("bert.encoder.layer.0.output.dense.weight", d),
        0.25
    );
    assert_eq!(
        c.lr_scale("bert.embeddings.word_embeddings.weight", d),
        0.125
    );
}

#[test]
fn a_class_seen_only_in_the_test_rows_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("t.tsv");
    std::fs::write(
        &table,
        "split\ttext\tlabel\ntrain\tthe happy\tpos\ntrain\tthe sorrow\tneg\ntest\tthe fear\tmaybe\n",
    )
    .unwrap();
    let out = finetune_cmd(dir.path(), &table, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("t.tsv:4") && err.contains("unknown class `maybe`"),
        "{err}"
    );
    // And a row without a label.
    std::fs::write(
        &table,
        "split\ttext\tlabel\ntrain\tthe happy\tpos\ntrain\tthe sorrow\t\ntest\tthe fear\tneg\n",
    )
    .unwrap();
    let out = finetune_cmd(dir.path(), &table, &["name=\"second\"".into()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("t.tsv:3") && stderr(&out).contains("missing label"));
}

#[test]
fn an_unknown_recipe_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let table = separable_table(dir.path(), 20);
    let out = finetune_cmd(dir.path(), &table, &["model.polling=\"mean\"".into()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("model.polling"), "{}", stderr(&out));
}

#[test]
fn the_linear_probe_separates_a_task_the_embeddings_encode() {
    let dir = tempfile::tempdir().unwrap();
    let table = separable_table(dir.path(), 300);
    let out = kindling()
        .args(["probe", "recipes/tiny/finetune-tiny.toml"])
        .args([
            "--set",
            &format!("model.path=\"{}\"", tiny_export().display()),
        ])
        .args(["--set", &format!("data.path=\"{}\"", table.display())])
        .args(["--set", "data.text_columns=[\"text\"]"])
        .args(["--set", "data.label_column=\"label\""])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let acc = r["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "probe accuracy {acc}: {r}");
    assert_eq!(r["dims"], 64, "the tiny model's hidden size");
}

/// Killed after its first checkpoint and resumed with `--resume auto`, a fine-tuning run ends
/// with the same weights as one never stopped (data order, dropout and the best-checkpoint
/// bookkeeping all continue from the checkpoint).
#[test]
fn finetuning_resumes_bit_for_bit_after_a_kill() {
    let runs = tempfile::tempdir().unwrap();
    let table = separable_table(runs.path(), 200);
    let common = |name: &str| {
        let mut cmd = kindling();
        cmd.args(["finetune", "recipes/tiny/finetune-tiny.toml", "--set"])
            .arg(format!("runs_dir=\"{}\"", runs.path().display()))
            .args(["--set", &format!("name=\"{name}\"")])
            .args([
                "--set",
                &format!("model.path=\"{}\"", tiny_export().display()),
            ])
            .args(["--set", &format!("data.path=\"{}\"", table.display())])
            .args(["--set", "data.text_columns=[\"text\"]"])
            .args(["--set", "data.label_column=\"label\""])
            .args(["--set", "train.steps=12"])
            .args(["--set", "train.max_epochs=0"])
            .args(["--set", "train.eval_every=4"])
            .args(["--set", "train.save_every=2"]);
        cmd
    };
    let straight = common("straight").output().unwrap();
    assert!(straight.status.success(), "{}", stderr(&straight));
    let run = runs.path().join("killed");
    kill_when_exists(
        common("killed"),
        &run.join("checkpoints/step-00000002/state.json"),
    );
    let out = common("killed")
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
    let results = |r: &Path| std::fs::read_to_string(r.join("test_results.json")).unwrap();
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&results(&run)).unwrap(),
        serde_json::from_str(&results(&runs.path().join("straight"))).unwrap(),
    );
    assert_eq!(a["test"], b["test"]);
    assert_eq!(a["best_validation"], b["best_validation"]);
}

/// `data.on_invalid = "skip"`: rows without a label or text, or with a split or class the
/// recipe does not know, are left out and counted (log, test_results.json, model card), the
/// first few named by line; by default the first of them stops the run before any write; a
/// split left empty by skipping is still an error.
#[test]
fn a_table_with_holes_skips_its_invalid_rows_when_asked_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let clean = separable_table(dir.path(), 200);
    let text = std::fs::read_to_string(&clean).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    // File lines (1 = the header): 5 no label, 9 no text, 14 an unknown split; 11 (a test row)
    // a class no training row has.
    let cells = |l: &str| l.split('\t').map(String::from).collect::<Vec<_>>();
    let mut c = cells(&lines[4]);
    c[2] = String::new();
    lines[4] = c.join("\t");
    let mut c = cells(&lines[8]);
    c[1] = "  ".into();
    lines[8] = c.join("\t");
    let mut c = cells(&lines[13]);
    c[0] = "dev".into();
    lines[13] = c.join("\t");
    let mut c = cells(&lines[10]);
    assert_eq!(c[0], "test");
    c[2] = "maybe".into();
    lines[10] = c.join("\t");
    let holes = dir.path().join("holes.tsv");
    std::fs::write(&holes, lines.join("\n") + "\n").unwrap();
    let runs = dir.path().join("runs");
    let quick = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["train.max_epochs=1".to_string()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let out = finetune_cmd(&runs, &holes, &quick(&[]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("holes.tsv:5"), "{}", stderr(&out));
    assert!(!runs.join("finetune-tiny").exists(), "nothing is written");

    let out = finetune_cmd(&runs, &holes, &quick(&["data.on_invalid=\"skip\""]));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("data: 4 invalid rows skipped (") && err.contains("holes.tsv:14"),
        "{err}"
    );
    let run = runs.join("finetune-tiny");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("test_results.json")).unwrap())
            .unwrap();
    let skipped = &results["skipped_rows"];
    assert_eq!(skipped["count"], 4, "{skipped}");
    let mut named: Vec<u64> = skipped["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    named.sort();
    assert_eq!(named, [5, 9, 11, 14]);
    let card = std::fs::read_to_string(run.join("export/README.md")).unwrap();
    assert!(card.contains("4 invalid rows skipped"), "{card}");

    // Every test row invalid: skipping leaves the test split empty, which is an error.
    let no_test: String = text
        .lines()
        .map(|l| {
            if l.starts_with("test\t") {
                let mut c = cells(l);
                c[2] = String::new();
                c.join("\t")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&holes, no_test + "\n").unwrap();
    let out = finetune_cmd(
        &runs,
        &holes,
        &quick(&["data.on_invalid=\"skip\"", "name=\"empty-test\""]),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("both splits need rows"),
        "{}",
        stderr(&out)
    );
}
