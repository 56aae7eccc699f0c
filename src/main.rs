//! `kindling`: the command line. Parsing and exit codes live here; everything else is in crates/.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod launch;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use kindling_recipes::{RecipeError, Resume, RunOptions};
use kindling_train::distributed::DistEnv;
use kindling_train::StopReason;

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
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Continue a run: `auto` (the newest valid checkpoint of the recipe's run folder, or a
        /// fresh start), a run folder, or one checkpoint folder.
        #[arg(long, value_name = "auto|PATH")]
        resume: Option<String>,
        /// Data parallel over these GPUs, one process each (e.g. --gpus 0,1; NCCL all-reduce).
        /// `train.batch_size` is per GPU. Multi-node: run one `kindling pretrain` per process
        /// with torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set.
        #[arg(long, value_name = "LIST", value_parser = launch::parse_gpus, conflicts_with = "nproc")]
        gpus: Option<launch::GpuList>,
        /// Data parallel over N processes on the recipe's device (CPU runs; the cores are
        /// shared between them).
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Tokenise a recipe's corpus once into token shards (its [data.prepare] section); reused
    /// while the sources and tokenizer are unchanged. Prints a JSON summary.
    Prepare {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Fine-tune a classifier from a BERT folder or a vision export (a recipe:
    /// recipes/finetune-*.toml); prints test accuracy, macro-F1 (and for text the confusion
    /// matrix), and exports an HF folder.
    Finetune {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Replace a run already in the run folder.
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Continue a run: `auto` (the newest valid checkpoint of the recipe's run folder, or a
        /// fresh start), a run folder, or one checkpoint folder.
        #[arg(long, value_name = "auto|PATH")]
        resume: Option<String>,
        /// Also run the same recipe from a randomly initialised model of the same shape
        /// (run `<name>-random`) and print both results side by side.
        #[arg(long)]
        compare_random: bool,
    },
    /// Linear probe: frozen embeddings of a BERT folder, a logistic regression on them (the
    /// recipe's [model], [data] and [probe] sections); prints test accuracy.
    Probe {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Sentence embeddings from a BERT folder (an export, or an HF folder such as
    /// all-MiniLM-L6-v2): one JSON line {"text", "embedding"} per input line.
    Embed {
        /// The model folder (config.json, model.safetensors, tokenizer.json or vocab.txt).
        model: PathBuf,
        /// A text file, one input per line.
        #[arg(long)]
        input: PathBuf,
        /// Where to write: `.npy` (a float32 matrix, one row per line) or JSONL (default:
        /// standard output).
        #[arg(long)]
        output: Option<PathBuf>,
        /// `mean` over tokens or the `cls` vector.
        #[arg(long, default_value = "mean", value_parser = ["mean", "cls"])]
        pooling: String,
        /// Skip the L2 normalisation.
        #[arg(long)]
        no_normalize: bool,
    },
    /// Run a suite of downstream tasks (SUITE.toml: fine-tunes and probes) on each model
    /// folder and print one table: task rows, model columns, each task's main metric. Saved
    /// as results.json and results.md in the suite's runs folder; running it again resumes.
    Evaluate {
        suite: PathBuf,
        /// Model folders (exports, HF folders, hf://NS/NAME).
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// Also run every task from a randomly initialised twin of each model.
        #[arg(long)]
        compare_random: bool,
    },
    /// Score an encoder folder (an export, an HF folder such as all-MiniLM-L6-v2, or
    /// hf://NS/NAME) on a recipe's [eval.sts] (Spearman/Pearson of cosine against gold scores)
    /// and [eval.retrieval] (recall@k, MRR, nDCG@10) sections; a SimCSE recipe serves as it is.
    /// Prints a table on standard error and JSON on standard output.
    EvaluateEmbeddings {
        model: PathBuf,
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Sentences per forward pass.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
    },
    /// The most likely tokens at each `[MASK]` of a text, from a BertForMaskedLM folder (an export).
    FillMask {
        model: PathBuf,
        text: String,
        /// Candidates per `[MASK]`.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Print JSON (as when standard output is not a terminal) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Upload an export folder to a Hugging Face Hub model repo (created if needed). Token:
    /// HF_TOKEN, HF_TOKEN_PATH or $HF_HOME/token; endpoint: HF_ENDPOINT.
    Push {
        /// The export folder, e.g. runs/bert-mini-mlm/export.
        export_dir: PathBuf,
        /// NAMESPACE/NAME.
        #[arg(long)]
        repo: String,
        /// Create the repo as private.
        #[arg(long)]
        private: bool,
        /// Branch to commit to (created from main if needed).
        #[arg(long, default_value = "main")]
        revision: String,
        /// Commit message.
        #[arg(long, default_value = "Upload model trained with Kindling")]
        message: String,
    },
    /// Download a Hub model repo into the hf-hub cache ($HF_HUB_CACHE, $HF_HOME/hub or
    /// ~/.cache/huggingface/hub) and print its snapshot folder. Recipes and commands also
    /// accept hf://NAMESPACE/NAME[@REVISION] wherever a model folder goes.
    Pull {
        /// NAMESPACE/NAME.
        repo: String,
        #[arg(long, default_value = "main")]
        revision: String,
    },
    /// Rewrite a run's export folder from its newest checkpoint.
    Export {
        /// The run folder, e.g. runs/bert-mini-mlm.
        run_dir: PathBuf,
    },
    /// Pack a folder of PNG/JPEG images (one subfolder per class) into a few shard files that
    /// a vision recipe streams (`train = { shards = { dir, size, color } }`). Prints a JSON
    /// summary.
    PackImages {
        folder: PathBuf,
        /// The packed folder to create (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// About this many megabytes per shard file.
        #[arg(long, default_value_t = 256)]
        shard_mb: u64,
        /// Leave unreadable images out (listed in the manifest) instead of stopping.
        #[arg(long)]
        skip_corrupt: bool,
    },
}

/// Exit code 2 for input the user must fix (recipe, keys, files), 1 for failures while running.
fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(
        kindling_hub::HubError::Export { .. }
        | kindling_hub::HubError::RepoId(_)
        | kindling_hub::HubError::Env { .. }
        | kindling_hub::HubError::NoToken,
    ) = e.downcast_ref::<kindling_hub::HubError>()
    {
        return 2;
    }
    match e.downcast_ref::<RecipeError>() {
        Some(
            RecipeError::Read { .. }
            | RecipeError::Syntax { .. }
            | RecipeError::Key { .. }
            | RecipeError::Override { .. }
            | RecipeError::Invalid { .. }
            | RecipeError::RunExists { .. }
            | RecipeError::RunInUse { .. }
            | RecipeError::Resume { .. }
            | RecipeError::Data(_)
            | RecipeError::Train(kindling_train::TrainError::Config { .. })
            | RecipeError::Model(
                kindling_models::ModelError::Config(_)
                | kindling_models::ModelError::Setting { .. }
                | kindling_models::ModelError::File { .. },
            ),
        ) => 2,
        _ => 1,
    }
}

/// SIGINT and SIGTERM raise a flag the trainer checks after each step (it then writes a
/// checkpoint and returns); a second SIGINT exits at once with 130. Returns the flag and the
/// number of the signal that raised it.
fn install_signal_handlers() -> anyhow::Result<(Arc<AtomicBool>, Arc<AtomicUsize>)> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    let which = Arc::new(AtomicUsize::new(0));
    // Registered first, so it sees the flag as it was before this signal raised it.
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, flag.clone())?;
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_usize(sig, which.clone(), sig as usize)?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok((flag, which))
}

/// The exit status of a run: 0, or 128 + the signal that interrupted it (the shell's
/// convention, so `kindling pretrain ... && next-step` does not go on after an interruption).
fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Pretrain {
            recipe,
            overrides,
            overwrite,
            resume,
            gpus,
            nproc,
        } => {
            let dist = match DistEnv::from_env() {
                Ok(d) => d,
                Err(msg) => {
                    eprintln!("error: {msg}");
                    return Ok(2);
                }
            };
            match (gpus, nproc) {
                _ if dist.is_some() => {} // a rank: run the recipe below
                (Some(ids), _) => return launch::launch(launch::Ranks::Gpus(ids.0)),
                (None, Some(n)) => return launch::launch(launch::Ranks::Processes(n)),
                (None, None) => {}
            }
            let rank = dist.as_ref().map_or(0, |d| d.rank);
            let (flag, which) = install_signal_handlers()?;
            let opts = RunOptions {
                dist,
                overwrite,
                resume: resume.map(|r| match r.as_str() {
                    "auto" => Resume::Auto,
                    p => Resume::Path(PathBuf::from(p)),
                }),
                stop_flag: Some(flag),
            };
            let report = kindling_recipes::pretrain_file(&recipe, &overrides, &opts)?;
            if report.stop == StopReason::Interrupted {
                if rank == 0 {
                    let launched = opts.dist.is_some();
                    print_resume("pretrain", &recipe, &overrides, &[], launched);
                }
                return Ok(128 + which.load(Ordering::SeqCst) as u8);
            }
            if rank > 0 {
                return Ok(0);
            }
            println!(
                "{}",
                serde_json::json!({
                    "run_dir": report.run_dir, "export_dir": report.export_dir, "steps": report.steps,
                    "elapsed_s": report.elapsed_secs, "eval": report.final_eval,
                    "baseline": report.baseline.map(|(k, v)| serde_json::json!({k: v})),
                })
            );
        }
        Command::Prepare { recipe, overrides } => {
            use kindling_recipes::registry::{lookup, Kind};
            let objective = kindling_recipes::recipe_key(&recipe, "objective")?.unwrap_or_default();
            if !lookup(Kind::Objective, &objective)?.prepares {
                return Err(RecipeError::Invalid {
                    key: "objective".into(),
                    msg: format!(
                        "`{objective}` reads its data directly; only masked-LM recipes are \
                         prepared into token shards ([data.prepare])"
                    ),
                }
                .into());
            }
            let recipe = kindling_recipes::Recipe::load(&recipe, &overrides)?;
            let r = kindling_recipes::bert_mlm::prepare_recipe(&recipe)?;
            let m = &r.manifest;
            println!(
                "{}",
                serde_json::json!({
                    "dir": recipe.data.prepare.as_ref().map(|p| p.dir.clone()),
                    "reused": r.reused, "seconds": r.seconds, "mb_per_s": r.mb_per_s(),
                    "source_bytes": m.source_bytes, "text_bytes": m.text_bytes, "files": m.sources.len(),
                    "train": {"documents": m.train.documents, "tokens": m.train.tokens, "shards": m.train.shards.len()},
                    "eval": {"documents": m.eval.documents, "tokens": m.eval.tokens},
                })
            );
        }
        Command::Finetune {
            recipe,
            overrides,
            overwrite,
            resume,
            compare_random,
        } => {
            use kindling_recipes::finetune::{self, FinetuneRecipe};
            use kindling_recipes::vision::finetune as image;
            let recipe_path = recipe.clone();
            let images = kindling_recipes::recipe_key(&recipe, "task")?.as_deref()
                == Some("image-classification");
            let (flag, which) = install_signal_handlers()?;
            let opts = RunOptions {
                overwrite,
                resume: resume.map(|r| match r.as_str() {
                    "auto" => Resume::Auto,
                    p => Resume::Path(PathBuf::from(p)),
                }),
                stop_flag: Some(flag.clone()),
                dist: None,
            };
            let interrupted = |flag: &AtomicBool| flag.load(Ordering::SeqCst);
            // A vision export: an image classifier; else a text one.
            enum Ft {
                Image(image::ImageFinetuneRecipe),
                Text(FinetuneRecipe),
            }
            let ft = if images {
                let mut r = image::ImageFinetuneRecipe::load(&recipe, &overrides)?;
                r.model.path = kindling_hub::resolve_model_path(&r.model.path)?;
                Ft::Image(r)
            } else {
                let mut r = FinetuneRecipe::load(&recipe, &overrides)?;
                r.model.path = kindling_hub::resolve_model_path(&r.model.path)?;
                Ft::Text(r)
            };
            if compare_random {
                let (a, b) = match &ft {
                    Ft::Image(r) => image::compare_with_random(r, &opts)?,
                    Ft::Text(r) => finetune::compare_with_random(r, &opts)?,
                };
                if interrupted(&flag) {
                    print_resume(
                        "finetune",
                        &recipe_path,
                        &overrides,
                        &["--compare-random"],
                        false,
                    );
                    return Ok(128 + which.load(Ordering::SeqCst) as u8);
                }
                print!("{}", finetune::comparison_table(&a, &b));
            } else {
                let r = match &ft {
                    Ft::Image(r) => image::finetune(r, &opts)?,
                    Ft::Text(r) => finetune::finetune(r, &opts)?,
                };
                if interrupted(&flag) {
                    print_resume("finetune", &recipe_path, &overrides, &[], false);
                    return Ok(128 + which.load(Ordering::SeqCst) as u8);
                }
                println!(
                    "{}",
                    serde_json::json!({
                        "run": r.name, "steps": r.steps, "elapsed_s": r.elapsed_secs,
                        "test": r.test, "export_dir": r.export_dir,
                        "best_validation": r.best_validation,
                    })
                );
            }
        }
        Command::Probe { recipe, overrides } => {
            use kindling_recipes::registry::{lookup, Family, Kind};
            let task = kindling_recipes::recipe_key(&recipe, "task")?;
            let family = match &task {
                Some(t) => lookup(Kind::Task, t)?.family,
                None => Family::TextClassification,
            };
            if family == Family::ImageProbe {
                use kindling_recipes::vision::probe::{probe, VisionProbeRecipe};
                let scores = probe(&VisionProbeRecipe::load(&recipe, &overrides)?)?;
                eprintln!("  {:<48} {:>9} {:>9}", "features", "accuracy", "macro-F1");
                for s in &scores {
                    eprintln!("  {:<48} {:>9.4} {:>9.4}", s.what, s.accuracy, s.macro_f1);
                }
                println!("{}", serde_json::to_value(&scores)?);
                return Ok(0);
            }
            let mut recipe = kindling_recipes::finetune::FinetuneRecipe::load(&recipe, &overrides)?;
            recipe.model.path = kindling_hub::resolve_model_path(&recipe.model.path)?;
            let r = kindling_recipes::probe::probe(&recipe)?;
            println!(
                "{}",
                serde_json::json!({
                    "model": recipe.model.path, "init": format!("{:?}", recipe.model.init).to_lowercase(),
                    "test_accuracy": r.accuracy, "test_macro_f1": r.macro_f1,
                    "validation_accuracy": r.validation_accuracy, "l2": r.l2, "dims": r.dims,
                    "train_rows": r.train_rows, "test_majority": r.test_majority,
                    "embed_s": r.embed_secs, "fit_s": r.fit_secs,
                })
            );
        }
        Command::Embed {
            model,
            input,
            output,
            pooling,
            no_normalize,
        } => {
            let text = std::fs::read_to_string(&input)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let lines: Vec<String> = text.lines().map(String::from).collect();
            let opts = kindling_recipes::embed::EmbedOptions {
                mean: pooling == "mean",
                normalize: !no_normalize,
            };
            let model = kindling_hub::resolve_model_path(&model)?;
            let (vectors, report) = kindling_recipes::embed::embed_texts(&model, &lines, opts)?;
            if !report.unused.is_empty() {
                eprintln!(
                    "note: {} tensors of the file are not used by the encoder: {:?}",
                    report.unused.len(),
                    report.unused
                );
            }
            if let Some(p) = output
                .as_ref()
                .filter(|p| p.extension().is_some_and(|e| e == "npy"))
            {
                let dims = vectors.first().map_or(0, Vec::len);
                let flat: Vec<f32> = vectors.into_iter().flatten().collect();
                candle_core::Tensor::from_vec(
                    flat,
                    (lines.len(), dims),
                    &candle_core::Device::Cpu,
                )?
                .write_npy(p)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                return Ok(0);
            }
            let mut out = String::new();
            for (text, v) in lines.iter().zip(vectors) {
                out.push_str(&serde_json::json!({ "text": text, "embedding": v }).to_string());
                out.push('\n');
            }
            match output {
                Some(p) => {
                    std::fs::write(&p, out).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
                }
                None => print!("{out}"),
            }
        }
        Command::Evaluate {
            suite,
            models,
            compare_random,
        } => {
            let s = kindling_recipes::suite::Suite::load(&suite)?;
            let models = models
                .iter()
                .map(|m| kindling_hub::resolve_model_path(m))
                .collect::<Result<Vec<_>, _>>()?;
            let (flag, which) = install_signal_handlers()?;
            let opts = RunOptions {
                overwrite: false,
                resume: None,
                stop_flag: Some(flag.clone()),
                dist: None,
            };
            let report = match kindling_recipes::suite::evaluate(&s, &models, compare_random, &opts)
            {
                Err(_) if flag.load(Ordering::SeqCst) => {
                    let mut args = vec!["evaluate".to_string(), suite.display().to_string()];
                    args.extend(models.iter().map(|m| m.display().to_string()));
                    if compare_random {
                        args.push("--compare-random".into());
                    }
                    eprintln!(
                        "interrupted; each run is checkpointed. To go on: kindling {}",
                        args.join(" ")
                    );
                    return Ok(128 + which.load(Ordering::SeqCst) as u8);
                }
                r => r?,
            };
            print!("{}", report.markdown());
            eprintln!("saved: {}", report.dir.join("results.md").display());
        }
        Command::EvaluateEmbeddings {
            model,
            recipe,
            overrides,
            batch_size,
        } => {
            use kindling_recipes::embedding_eval::{evaluate_embeddings, EmbeddingEvalRecipe};
            let r = EmbeddingEvalRecipe::load(&recipe, &overrides)?;
            let dir = kindling_hub::resolve_model_path(&model)?;
            let started = std::time::Instant::now();
            let scores = evaluate_embeddings(&dir, &r, batch_size, None)?;
            eprintln!("| metric | {} |\n|---|---|", model.display());
            for (k, v) in &scores {
                eprintln!("| {k} | {v:.4} |");
            }
            println!(
                "{}",
                serde_json::json!({
                    "model": model, "recipe": recipe, "scores": scores,
                    "elapsed_s": started.elapsed().as_secs_f64(),
                })
            );
        }
        Command::FillMask {
            model,
            text,
            top_k,
            json,
        } => {
            use std::io::IsTerminal;
            let model = kindling_hub::resolve_model_path(&model)?;
            let found = kindling_recipes::embed::fill_mask(&model, &text, top_k)?;
            if json || !std::io::stdout().is_terminal() {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print!("{}", fill_mask_table(&found));
            }
        }
        Command::Push {
            export_dir,
            repo,
            private,
            revision,
            message,
        } => {
            let token = kindling_hub::auth::token()?.ok_or(kindling_hub::HubError::NoToken)?;
            let opts = kindling_hub::PushOptions {
                repo: repo.clone(),
                private,
                revision,
                message,
                endpoint: kindling_hub::auth::endpoint(),
                token,
                retries: 5,
                backoff: std::time::Duration::from_millis(500),
            };
            let r = kindling_hub::push(&export_dir, &opts)?;
            match &r.commit {
                None => eprintln!(
                    "{repo}: already up to date ({} files unchanged); nothing pushed",
                    r.unchanged.len()
                ),
                Some(c) => eprintln!(
                    "{repo}: commit {c}: {} files committed ({} LFS objects, {:.1} MB sent), {} unchanged",
                    r.committed.len(),
                    r.uploaded.len(),
                    r.bytes_sent as f64 / 1e6,
                    r.unchanged.len()
                ),
            }
            println!(
                "{}",
                serde_json::json!({"repo": repo, "commit": r.commit, "commit_url": r.commit_url,
                    "committed": r.committed, "unchanged": r.unchanged, "lfs_uploaded": r.uploaded})
            );
        }
        Command::Pull { repo, revision } => {
            let opts = kindling_hub::PullOptions::from_env(&revision)?;
            let dir = if kindling_hub::auth::offline() {
                kindling_hub::pull::cached_snapshot(&repo, &opts).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{repo}@{revision} is not in the cache and HF_HUB_OFFLINE is set"
                    )
                })?
            } else {
                kindling_hub::pull(&repo, &opts)?
            };
            println!("{}", dir.display());
        }
        Command::Export { run_dir } => {
            let dir = kindling_recipes::export_run(&run_dir)?;
            println!("{}", dir.display());
        }
        Command::PackImages {
            folder,
            out,
            shard_mb,
            skip_corrupt,
        } => {
            use kindling_data::{image_shards, OnCorrupt};
            let on_corrupt = if skip_corrupt {
                OnCorrupt::Skip
            } else {
                OnCorrupt::Fail
            };
            let r =
                image_shards::pack_image_folder(&folder, &out, shard_mb.max(1) << 20, on_corrupt)
                    .map_err(RecipeError::from)?;
            let m = &r.manifest;
            println!(
                "{}",
                serde_json::json!({
                    "dir": out, "images": m.images, "classes": m.classes.len(),
                    "shards": m.shards.len(), "bytes": r.bytes, "skipped": m.skipped,
                })
            );
        }
    }
    Ok(0)
}

fn main() -> ExitCode {
    kindling_core::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    // The objectives and tasks come from the registry, so --help lists what a recipe can name.
    let matches = <Cli as clap::CommandFactory>::command()
        .after_help(kindling_recipes::registry::help())
        .mut_subcommand("pretrain", |c| {
            c.after_help(kindling_recipes::registry::help())
        })
        .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Library errors already carry their causes in their messages.
            eprintln!("error: {e}");
            if let Some(h) = hint(&e) {
                eprintln!("hint: {h}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// `kindling fill-mask` for a person: per `[MASK]`, rank, token, score and the filled sentence.
fn fill_mask_table(found: &[Vec<kindling_recipes::embed::FillMask>]) -> String {
    let mut out = String::new();
    for (m, candidates) in found.iter().enumerate() {
        if found.len() > 1 {
            out += &format!("[MASK] {} of {}\n", m + 1, found.len());
        }
        let w = candidates
            .iter()
            .map(|c| c.token_str.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        out += &format!("{:>4}  {:<w$}  {:>7}  sequence\n", "rank", "token", "score");
        for (i, c) in candidates.iter().enumerate() {
            out += &format!(
                "{:>4}  {:<w$}  {:>7.4}  {}\n",
                i + 1,
                c.token_str,
                c.score,
                c.sequence
            );
        }
    }
    out
}

/// The exact command that continues an interrupted run: the same subcommand, recipe and
/// overrides with `--resume auto` (a checkpoint was written at the step the signal ended).
fn resume_command(sub: &str, recipe: &Path, overrides: &[String], extra: &[&str]) -> String {
    let mut words = vec![
        "kindling".to_string(),
        sub.to_string(),
        recipe.display().to_string(),
    ];
    for o in overrides {
        words.extend(["--set".to_string(), o.clone()]);
    }
    words.extend(extra.iter().map(|s| s.to_string()));
    words.extend(["--resume".to_string(), "auto".to_string()]);
    shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| words.join(" "))
}

fn print_resume(sub: &str, recipe: &Path, overrides: &[String], extra: &[&str], launched: bool) {
    eprintln!(
        "interrupted; a checkpoint was written. Continue with:\n  {}{}",
        resume_command(sub, recipe, overrides, extra),
        if launched {
            "\n(with the same --gpus or --nproc, or the same launcher and WORLD_SIZE)"
        } else {
            ""
        }
    );
}

/// What to change, for failures whose message names only their cause: a GPU out of memory
/// (candle passes the CUDA driver's or cuBLAS's error on as text, mid-step, with the last
/// checkpoint untouched).
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    let text = format!("{e:#}");
    ["CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED"]
        .iter()
        .any(|oom| text.contains(oom))
        .then_some(
            "the GPU ran out of memory: lower train.batch_size and raise train.grad_accum to \
             keep the effective batch (or train in precision = \"bf16\"); --resume auto \
             continues from the last checkpoint",
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_out_of_memory_error_says_what_to_change() {
        // As candle reports cudarc's DriverError, inside the trainer's error.
        let oom = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        let e = anyhow::Error::from(RecipeError::Train(kindling_train::TrainError::from(oom)));
        assert!(hint(&e).unwrap().contains("train.batch_size"));
        assert_eq!(exit_code(&e), 1);
        let other = anyhow::Error::from(RecipeError::Candle(candle_core::Error::Msg(
            "shape mismatch".into(),
        )));
        assert_eq!(hint(&other), None);
    }

    #[test]
    fn fill_mask_prints_a_table_of_rank_token_score_and_sequence() {
        let c = |t: &str, s: f32| kindling_recipes::embed::FillMask {
            token: t.into(),
            token_id: 7,
            token_str: t.into(),
            score: s,
            sequence: format!("it is a truth universally {t}"),
        };
        let table = fill_mask_table(&[vec![c("acknowledged", 0.5), c("known", 0.25)]]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("rank") && lines[0].contains("sequence"));
        assert!(lines[1].starts_with("   1  acknowledged   0.5000  it is a truth"));
        assert!(lines[2].contains("known") && lines[2].contains("0.2500"));
    }

    #[test]
    fn the_resume_command_repeats_the_run_with_resume_auto_quoted_for_a_shell() {
        let cmd = resume_command(
            "pretrain",
            Path::new("recipes/my run.toml"),
            &["train.steps=900".into(), "name=\"a b\"".into()],
            &[],
        );
        // A shell reads back the words of the run, with --resume auto.
        assert_eq!(
            shlex::split(&cmd).unwrap(),
            [
                "kindling",
                "pretrain",
                "recipes/my run.toml",
                "--set",
                "train.steps=900",
                "--set",
                "name=\"a b\"",
                "--resume",
                "auto"
            ]
        );
    }
}
