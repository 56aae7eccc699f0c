//! Bad recipes fail before any work, with a message that names the file and the key (or line)
//! and a non-zero exit code; an existing run is never overwritten by accident.

use crate::common::{kindling, stderr};

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = kindling().args(args).output().unwrap();
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit code for {args:?}; stderr:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} lacks `{n}`:\n{err}");
    }
}

fn write_recipe(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.toml");
    std::fs::write(&p, text).unwrap();
    (dir, p.to_string_lossy().into_owned())
}

const TINY: &str = "recipes/tiny/bert-tiny-mlm.toml";

#[test]
fn unknown_key_is_named() {
    fails_with(
        &["pretrain", TINY, "--set", "train.stepz=3"],
        &["bert-tiny-mlm.toml", "train", "unknown field `stepz`"],
    );
}

#[test]
fn unknown_key_in_the_file_is_named() {
    let (_d, p) = write_recipe("objective = \"bert-mlm\"\n[data]\ncorpus = [\"x\"]\nseq_len = 64\nmask = { rate = 0.15, colour = 1 }\n");
    fails_with(
        &["pretrain", &p],
        &["r.toml", "data.mask", "unknown field `colour`"],
    );
}

#[test]
fn wrong_type_is_named() {
    fails_with(
        &["pretrain", TINY, "--set", "train.steps=\"many\""],
        &["train.steps", "invalid type"],
    );
    fails_with(
        &["pretrain", TINY, "--set", "model.hidden_size=1.5"],
        &["model.hidden_size"],
    );
}

#[test]
fn toml_syntax_error_names_the_line() {
    let (_d, p) = write_recipe("objective = \"bert-mlm\"\n[data]\ncorpus = [\"x\"\nseq_len = 64\n");
    fails_with(&["pretrain", &p], &["r.toml", "line 4"]);
}

#[test]
fn missing_recipe_file_is_named() {
    fails_with(
        &["pretrain", "recipes/does-not-exist.toml"],
        &["recipes/does-not-exist.toml"],
    );
}

#[test]
fn missing_required_section_is_named() {
    let (_d, p) = write_recipe("objective = \"bert-mlm\"\n");
    fails_with(&["pretrain", &p], &["missing field `data`"]);
}

#[test]
fn corpus_matching_no_files_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    fails_with(
        &[
            "pretrain",
            TINY,
            "--set",
            &runs,
            "--set",
            "data.corpus=[\"datasets/nothing-here/*.txt\"]",
        ],
        &["datasets/nothing-here/*.txt", "matched no files"],
    );
}

#[test]
fn seq_len_beyond_max_position_embeddings_is_refused() {
    fails_with(
        &["pretrain", TINY, "--set", "data.seq_len=256"],
        &["data.seq_len", "max_position_embeddings (128)"],
    );
}

#[test]
fn unknown_objective_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    fails_with(
        &[
            "pretrain",
            TINY,
            "--set",
            &runs,
            "--set",
            "objective=\"gpt\"",
        ],
        &["objective", "unknown objective `gpt`"],
    );
}

#[test]
fn bad_override_syntax_is_named() {
    fails_with(
        &["pretrain", TINY, "--set", "train.steps"],
        &["--set train.steps", "KEY=VALUE"],
    );
}

#[test]
fn an_existing_run_is_not_overwritten_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::run_tiny(dir.path(), &["train.steps=2", "train.eval_every=0"]);
    let weights = dir.path().join("bert-tiny-mlm/export/model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    fails_with(
        &["pretrain", TINY, "--set", &runs, "--set", "train.steps=3"],
        &["already holds a run", "--overwrite"],
    );
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "the earlier run is untouched"
    );
    let again = kindling()
        .args([
            "pretrain",
            TINY,
            "--overwrite",
            "--set",
            &runs,
            "--set",
            "train.steps=3",
            "--set",
            "train.eval_every=0",
        ])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "--overwrite replaces the run: {}",
        stderr(&again)
    );
}
