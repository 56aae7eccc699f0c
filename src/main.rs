//! `kindling`: the command line. Parsing and exit codes live here; everything else is in crates/.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kindling_recipes::{Recipe, RecipeError, RunOptions};

#[derive(Parser)]
#[command(
    name = "kindling",
    version,
    about = "Self-supervised pretraining on candle: recipes in, HF exports out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pretraining recipe (a TOML file).
    Pretrain {
        /// The recipe, e.g. recipes/bert-mini-mlm.toml.
        recipe: PathBuf,
        /// Override a recipe key, e.g. --set train.steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Replace a run already in the run folder.
        #[arg(long)]
        overwrite: bool,
    },
    /// Rewrite a run's export folder from its newest checkpoint.
    Export {
        /// The run folder, e.g. runs/bert-mini-mlm.
        run_dir: PathBuf,
    },
}

/// Exit code 2 for input the user must fix (recipe, keys, files), 1 for failures while running.
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<RecipeError>() {
        Some(
            RecipeError::Read { .. }
            | RecipeError::Syntax { .. }
            | RecipeError::Key { .. }
            | RecipeError::Override { .. }
            | RecipeError::Invalid { .. }
            | RecipeError::RunExists { .. }
            | RecipeError::Data(_),
        ) => 2,
        _ => 1,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pretrain {
            recipe,
            overrides,
            overwrite,
        } => {
            let recipe = Recipe::load(&recipe, &overrides)?;
            let report = kindling_recipes::pretrain(&recipe, &RunOptions { overwrite })?;
            println!(
                "{}",
                serde_json::json!({
                    "run_dir": report.run_dir, "export_dir": report.export_dir, "steps": report.steps,
                    "elapsed_s": report.elapsed_secs, "eval": report.final_eval,
                    "baseline": report.baseline.map(|(k, v)| serde_json::json!({k: v})),
                })
            );
        }
        Command::Export { run_dir } => {
            let dir = kindling_recipes::export_run(&run_dir)?;
            println!("{}", dir.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    kindling_core::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already carry their causes in their messages.
            eprintln!("error: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}
