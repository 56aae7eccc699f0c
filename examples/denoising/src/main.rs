//! `cargo run --release -p kindling-example-denoising -- SETTINGS.toml [--resume auto]`

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use kindling_example_denoising::Settings;
use kindling_recipes::{Resume, RunOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("usage: denoising SETTINGS.toml [--resume auto]"))?;
    let settings = Settings::load(std::path::Path::new(path), &[])?;
    // Ctrl-C: the trainer finishes the step, checkpoints and returns.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let opts = RunOptions {
        resume: args.iter().any(|a| a == "--resume").then_some(Resume::Auto),
        stop_flag: Some(stop),
        ..RunOptions::default()
    };
    let report = kindling_recipes::run::drive(&settings, &opts)?.report;
    println!(
        "{}",
        serde_json::json!({"run_dir": report.run_dir, "steps": report.steps, "eval": report.final_eval})
    );
    Ok(())
}
