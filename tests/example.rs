//! An objective written outside Kindling (examples/denoising: a denoising autoencoder) trains
//! through `kindling_recipes::run::drive`, resumes bit for bit, exports, and gets the
//! lifecycle's checks, without a line of Kindling changed for it.

use std::path::Path;

use kindling_example_denoising::Settings;
use kindling_recipes::{Resume, RunOptions};

use crate::common::repo_root;

fn settings(runs: &Path, steps: u64) -> Settings {
    let text = std::fs::read_to_string(repo_root().join("examples/denoising/denoising.toml"))
        .unwrap()
        .replace("datasets/", &format!("{}/datasets/", repo_root().display()));
    let file = runs.join("denoising.toml");
    std::fs::write(&file, text).unwrap();
    let mut s = Settings::load(&file, &[]).unwrap();
    s.header.runs_dir = runs.to_path_buf();
    s.max_images = 512;
    s.max_test_images = 128;
    let t = &mut s.header.train;
    t.steps = steps;
    t.eval_every = 4;
    t.save_every = 4;
    t.keep_last = 10;
    // A schedule that does not depend on the total, so 24 steps then 16 more is the same run as 40.
    t.schedule.kind = kindling_train::ScheduleKind::Constant;
    t.schedule.warmup_steps = 0;
    s
}

fn resume() -> RunOptions {
    RunOptions {
        resume: Some(Resume::Auto),
        ..RunOptions::default()
    }
}

#[test]
fn a_users_own_objective_trains_resumes_bit_for_bit_and_exports() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let straight = kindling_recipes::run::drive(&settings(a.path(), 40), &RunOptions::default())
        .unwrap()
        .report;
    assert_eq!(straight.steps, 40);
    assert!(
        straight.final_eval["loss"] < straight.final_eval["input_mse"],
        "it learns to denoise: {:?}",
        straight.final_eval
    );

    let first = kindling_recipes::run::drive(&settings(b.path(), 24), &RunOptions::default())
        .unwrap()
        .report;
    assert_eq!(first.steps, 24);
    let rest = kindling_recipes::run::drive(&settings(b.path(), 40), &resume())
        .unwrap()
        .report;
    assert_eq!(rest.steps, 40);
    let weights = |r: &kindling_recipes::RunReport| {
        kindling_hub::files::sha256_hex(
            &std::fs::read(r.export_dir.join("model.safetensors")).unwrap(),
        )
    };
    assert_eq!(
        weights(&rest),
        weights(&straight),
        "24 + 16 steps equal 40, bit for bit"
    );
    assert_eq!(rest.final_eval, straight.final_eval);

    // The export: the weights under the objective's own names, and a config.
    let tensors = candle_core::safetensors::load(
        rest.export_dir.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "decoder.bias",
            "decoder.weight",
            "encoder.bias",
            "encoder.weight"
        ]
    );
    assert!(rest.export_dir.join("config.json").is_file());
    // Its metrics log and plots, as every recipe's.
    assert!(rest.run_dir.join("metrics.jsonl").is_file());
    assert!(rest.run_dir.join("plots/loss.png").is_file());
}

#[test]
fn a_users_own_objective_gets_the_lifecycle_checks() {
    let runs = tempfile::tempdir().unwrap();
    kindling_recipes::run::drive(&settings(runs.path(), 4), &RunOptions::default())
        .unwrap()
        .report;
    let run = runs.path().join("denoising-fashion-mnist");
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let mut bad = settings(runs.path(), 8);
    bad.header.train.optimizer.lr = f64::NAN;
    let err = kindling_recipes::run::drive(&bad, &resume())
        .map(|r| r.report)
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.optimizer.lr"), "{err}");
    let mut bad = settings(runs.path(), 8);
    bad.header.train.monitor.metric = "psnr".into();
    let err = kindling_recipes::run::drive(&bad, &resume())
        .map(|r| r.report)
        .unwrap_err()
        .to_string();
    assert!(err.contains("input_mse"), "names the metrics it has: {err}");
    // A fresh run on the folder without --overwrite is refused; nothing changed.
    let err = kindling_recipes::run::drive(&settings(runs.path(), 8), &RunOptions::default())
        .map(|r| r.report)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
}
