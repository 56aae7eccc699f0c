//! The run lifecycle never loses data: a run reads and checks everything (settings, data,
//! tokenizer, model config, the checkpoint it resumes) before it changes anything in its run
//! folder. Each test takes a finished run, snapshots every file of its folder (bytes and
//! names, hidden files included), runs a command that must be refused, and checks the exit
//! code (2: input to fix), the message, and that the snapshot is unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use kindling_hub::files::sha256_hex;

use crate::common::{kindling, shared_tiny_run, stderr};

const TINY: &str = "recipes/tiny/bert-tiny-mlm.toml";

/// A copy of the shared finished tiny run in a fresh runs folder: (runs folder, run folder).
fn finished_run() -> (tempfile::TempDir, PathBuf) {
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("bert-tiny-mlm");
    copy_dir(shared_tiny_run(), &run);
    (runs, run)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Every path under `dir` with its bytes' SHA-256 ("dir" for folders).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if p.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                out.insert(rel, sha256_hex(&std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `kindling pretrain TINY` into `runs` with `args` and `--set`s.
fn pretrain(runs: &Path, args: &[&str], sets: &[&str]) -> Output {
    let mut cmd = kindling();
    cmd.args(["pretrain", TINY, "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.display()))
        .args(args);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

/// Exit 2, no panic, the message names every `needle`.
fn refused(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "the error lacks `{n}`: {err}");
    }
}

#[test]
fn overwrite_with_a_recipe_that_fails_validation_deletes_nothing() {
    let (runs, run) = finished_run();
    let before = snapshot(&run);
    let bad_text = runs.path().join("latin1.txt");
    std::fs::write(&bad_text, b"caf\xe9 au lait\n").unwrap();
    let non_utf8 = format!("data.corpus=[\"{}\"]", bad_text.display());
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "data.corpus=[\"datasets/no-such-folder/*.txt\"]",
            vec!["no-such-folder"],
        ),
        (&non_utf8, vec!["latin1.txt"]),
        (
            "model.num_attention_heads=0",
            vec!["model.num_attention_heads"],
        ),
        ("model.hidden_size=0", vec!["model.hidden_size"]),
        ("train.batch_size=100000", vec!["train.batch_size"]),
    ];
    for (set, needles) in cases {
        let out = pretrain(runs.path(), &["--overwrite"], &[set]);
        refused(&out, &needles);
        assert_eq!(
            snapshot(&run),
            before,
            "--overwrite --set {set} changed the run"
        );
    }
}

#[test]
fn resume_with_invalid_train_settings_changes_nothing() {
    let (runs, run) = finished_run();
    let before = snapshot(&run);
    for (set, key) in [
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.optimizer.lr=nan", "train.optimizer.lr"),
        ("train.optimizer.lr=inf", "train.optimizer.lr"),
        ("train.optimizer.lr=-0.001", "train.optimizer.lr"),
        (
            "train.optimizer.weight_decay=-0.1",
            "train.optimizer.weight_decay",
        ),
        (
            "train.schedule={kind=\"wsd\", decay_fraction=5.0}",
            "train.schedule.decay_fraction",
        ),
        ("train.monitor.metric=\"bogus\"", "train.monitor.metric"),
        ("train.max_grad_norm=nan", "train.max_grad_norm"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=100000", "train.batch_size"),
        ("train.steps=200", "data"),
    ] {
        // The last case changes the data too (not allowed on resume), through a second --set.
        let sets: Vec<&str> = if key == "data" {
            vec![set, "data.seq_len=32"]
        } else {
            vec![set]
        };
        let out = pretrain(runs.path(), &["--resume", "auto"], &sets);
        refused(&out, &[key]);
        assert_eq!(
            snapshot(&run),
            before,
            "--resume auto --set {set} changed the run"
        );
    }
}

/// The newest checkpoint's state.json with its data cursor moved to `position`.
fn move_cursor(checkpoint: &Path, position: u64) {
    let path = checkpoint.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    state["data_cursor"]["position"] = position.into();
    std::fs::write(&path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
}

fn checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn a_checkpoint_whose_cursor_is_past_the_data_is_refused_before_anything_changes() {
    let (runs, run) = finished_run();
    let all = checkpoints(&run);
    assert!(all.len() >= 2, "the tiny run keeps two checkpoints");
    for c in &all {
        move_cursor(c, 1_000_000_000);
    }
    let before = snapshot(&run);
    let out = pretrain(runs.path(), &["--resume", "auto"], &["train.steps=80"]);
    refused(&out, &["past the end", "nothing was changed"]);
    assert_eq!(snapshot(&run), before);
    // Named explicitly, the checkpoint is refused too.
    let newest = all.last().unwrap().to_str().unwrap().to_string();
    let out = pretrain(runs.path(), &["--resume", &newest], &["train.steps=80"]);
    refused(&out, &["past the end"]);
    assert_eq!(snapshot(&run), before);
}

#[test]
fn a_checkpoint_of_another_model_is_refused_and_auto_falls_back_to_the_previous_one() {
    let (runs, run) = finished_run();
    let all = checkpoints(&run);
    let newest = all.last().unwrap().clone();
    // Another model's weights, with checksums that match (as a copy from another run has).
    let weights = newest.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.replace("bert.", "roberta."), v))
        .collect();
    candle_core::safetensors::save(&renamed, &weights).unwrap();
    let bytes = std::fs::read(&weights).unwrap();
    let state_path = newest.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["files"]["model.safetensors"] =
        serde_json::json!({"bytes": bytes.len(), "sha256": sha256_hex(&bytes)});
    std::fs::write(&state_path, serde_json::to_string_pretty(&state).unwrap()).unwrap();

    let before = snapshot(&run);
    let explicit = newest.to_str().unwrap().to_string();
    let out = pretrain(runs.path(), &["--resume", &explicit], &["train.steps=80"]);
    refused(&out, &["has no tensor", "another model or objective"]);
    assert_eq!(
        snapshot(&run),
        before,
        "metrics and checkpoints are untouched"
    );

    // `auto` skips it with a warning and continues from the one before.
    let previous = all[all.len() - 2].clone();
    let out = pretrain(runs.path(), &["--resume", "auto"], &["train.steps=80"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("skipping a checkpoint that does not fit"),
        "{err}"
    );
    assert!(
        err.contains(&format!("resume: {} (step", previous.display())),
        "{err}"
    );
}

#[test]
fn model_settings_that_used_to_panic_are_errors_naming_the_key_and_leave_no_run_folder() {
    let runs = tempfile::tempdir().unwrap();
    for (set, key) in [
        ("model.num_attention_heads=0", "model.num_attention_heads"),
        ("model.type_vocab_size=0", "model.type_vocab_size"),
        ("model.initializer_range=nan", "model.initializer_range"),
        ("model.hidden_size=0", "model.hidden_size"),
        ("model.num_hidden_layers=0", "model.num_hidden_layers"),
        (
            "model.hidden_dropout_prob=-0.1",
            "model.hidden_dropout_prob",
        ),
        (
            "model.attention_probs_dropout_prob=1.0",
            "model.attention_probs_dropout_prob",
        ),
        ("model.layer_norm_eps=0.0", "model.layer_norm_eps"),
        ("name=\"\"", "name"),
        ("name=\"..\"", "name"),
        ("data.seq_len=2", "data.seq_len"),
    ] {
        let out = pretrain(runs.path(), &[], &[set]);
        refused(&out, &[key]);
        assert_eq!(
            std::fs::read_dir(runs.path()).unwrap().count(),
            0,
            "--set {set} left a run folder behind"
        );
    }
}

#[test]
fn prepare_never_deletes_a_folder_that_is_not_a_shard_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join("my-notes");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("thesis.tex"), "\\section{Intro}\n").unwrap();
    // A corpus inside the folder named as the shard folder.
    let corpus = mine.join("corpus.txt");
    std::fs::copy(
        "datasets/janeausten/persuasion.txt.gz",
        mine.join("p.txt.gz"),
    )
    .unwrap();
    std::fs::write(&corpus, "some text of mine\n").unwrap();
    let before = snapshot(&mine);
    for (corpus, why) in [
        (
            "datasets/janeausten/persuasion.txt.gz".to_string(),
            "not a prepared",
        ),
        (
            mine.join("p.txt.gz").display().to_string(),
            "holds the source",
        ),
    ] {
        let out = kindling()
            .args(["prepare", TINY, "--set"])
            .arg(format!(
                "data.prepare={{dir=\"{}\", shard_tokens=100000}}",
                mine.display()
            ))
            .arg("--set")
            .arg(format!("data.corpus=[\"{corpus}\"]"))
            .arg("--set")
            .arg(format!("runs_dir=\"{}\"", dir.path().display()))
            .output()
            .unwrap();
        refused(&out, &["data.prepare.dir", why]);
        assert_eq!(snapshot(&mine), before);
    }
}

/// A finished run of `recipe` (a few seconds) in a fresh runs folder, with `sets`.
fn finished(sub: &str, recipe: &str, sets: &[String]) -> (tempfile::TempDir, PathBuf) {
    let runs = tempfile::tempdir().unwrap();
    let out = command(sub, recipe, runs.path(), &[], sets)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stem = Path::new(recipe).file_stem().unwrap().to_owned();
    let run = runs.path().join(stem);
    (runs, run)
}

fn command(
    sub: &str,
    recipe: &str,
    runs: &Path,
    args: &[&str],
    sets: &[String],
) -> std::process::Command {
    let mut cmd = kindling();
    cmd.args([sub, recipe, "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.display()))
        .args(args);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

#[test]
fn a_vision_run_refuses_bad_settings_on_resume_and_overwrite_without_changing_anything() {
    let recipe = "recipes/tiny/simclr-tiny.toml";
    let (runs, run) = finished("pretrain", recipe, &[]);
    let before = snapshot(&run);
    let view = |stage: &str| format!("data.views=[{{stages=[{stage}]}}]");
    for (args, set, key) in [
        (
            "--resume",
            view("{kind=\"random_resized_crop\", size=20, scale=[1.0, 0.2]}"),
            "random_resized_crop.scale",
        ),
        (
            "--resume",
            view("{kind=\"gaussian_blur\", sigma=[-1.0, 2.0]}"),
            "gaussian_blur.sigma",
        ),
        (
            "--resume",
            view("{kind=\"color_jitter\", brightness=-0.4}"),
            "color_jitter.brightness",
        ),
        (
            "--resume",
            "train.monitor.metric=\"bogus\"".into(),
            "train.monitor.metric",
        ),
        ("--resume", "train.grad_accum=0".into(), "train.grad_accum"),
        (
            "--overwrite",
            "train.optimizer.lr=nan".into(),
            "train.optimizer.lr",
        ),
        ("--overwrite", "name=\"\"".into(), "name"),
    ] {
        let extra: Vec<&str> = match args {
            "--resume" => vec!["--resume", "auto"],
            _ => vec!["--overwrite"],
        };
        let out = command("pretrain", recipe, runs.path(), &extra, &[set.clone()])
            .output()
            .unwrap();
        refused(&out, &[key]);
        assert_eq!(snapshot(&run), before, "{args} --set {set} changed the run");
    }
}

#[test]
fn a_finetune_run_refuses_bad_settings_on_resume_and_overwrite_without_changing_anything() {
    let recipe = "recipes/tiny/finetune-tiny.toml";
    let model = format!(
        "model.path=\"{}\"",
        shared_tiny_run().join("export").display()
    );
    let short = "train.max_epochs=1".to_string();
    let (runs, run) = finished("finetune", recipe, &[model.clone(), short.clone()]);
    let before = snapshot(&run);
    for (args, set, key) in [
        ("--resume", "train.optimizer.lr=nan", "train.optimizer.lr"),
        (
            "--resume",
            "train.monitor.metric=\"f2\"",
            "train.monitor.metric",
        ),
        ("--overwrite", "train.grad_accum=0", "train.grad_accum"),
        (
            "--overwrite",
            "data.path=\"datasets/no-such-table.tsv\"",
            "no-such-table",
        ),
    ] {
        let extra: Vec<&str> = match args {
            "--resume" => vec!["--resume", "auto"],
            _ => vec!["--overwrite"],
        };
        let sets = [model.clone(), short.clone(), set.to_string()];
        let out = command("finetune", recipe, runs.path(), &extra, &sets)
            .output()
            .unwrap();
        refused(&out, &[key]);
        assert_eq!(snapshot(&run), before, "{args} --set {set} changed the run");
    }
}

#[test]
fn an_imported_config_json_out_of_range_is_an_error_naming_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir(&shared_tiny_run().join("export"), &model);
    let config_path = model.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    for (field, value) in [
        ("num_attention_heads", serde_json::json!(0)),
        ("type_vocab_size", serde_json::json!(0)),
        ("hidden_dropout_prob", serde_json::json!(-0.5)),
        ("layer_norm_eps", serde_json::json!(0.0)),
    ] {
        let mut cfg = original.clone();
        cfg[field] = value;
        std::fs::write(&config_path, cfg.to_string()).unwrap();
        let runs = dir.path().join("runs");
        let out = command(
            "finetune",
            "recipes/tiny/finetune-tiny.toml",
            &runs,
            &[],
            &[format!("model.path=\"{}\"", model.display())],
        )
        .output()
        .unwrap();
        refused(&out, &["config.json", field]);
        assert!(
            !runs.exists(),
            "no run folder for a model that does not load"
        );
    }
}
