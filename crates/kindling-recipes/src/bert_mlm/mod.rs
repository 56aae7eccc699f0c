//! BERT masked-language-model pretraining (Devlin et al., 2019; dynamic masking as in RoBERTa,
//! Liu et al., 2019). The HF counterpart is `examples/pytorch/language-modeling/run_mlm.py`.
//!
//! corpus -> WordPiece tokenizer -> packed blocks -> dynamic masks -> BertForMaskedLM
//! (logits at masked positions only) -> cross-entropy -> trainer -> HF-layout export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::Tokenizer;

use kindling_core::Mode;
use kindling_data::loader::eval_batches_up_to;
use kindling_data::{
    tokenizer as tok, Blocks, Corpus, Cursor, Masker, MlmBatch, MlmLoader, PackedBlocks, Prefetch,
    ShardBlocks, ShardStream,
};
use kindling_models::bert::{BertConfig, BertForMaskedLM};
use kindling_models::export::{save_json, save_safetensors};
use kindling_models::init::hf_init;
use kindling_train::{
    checkpoint, MetricsLog, Objective, PlotCallback, ProgressCallback, StepOutput, StopReason,
    Trainer,
};

use crate::card::{self, CardInfo};
use crate::recipe::Recipe;
use crate::run::{
    compute_dtype, device, first_loadable, io, join_group, loss_scale, plan_run, rank_device,
    rank_trainer,
};
use crate::{RecipeError, RunOptions, RunReport};

mod export;
mod shards;

pub use export::*;
pub use shards::*;

mod objective;

pub use objective::*;

/// The HF config of the model a recipe describes, for a tokenizer of `vocab_size` tokens.
pub fn bert_config(
    recipe: &Recipe,
    vocab_size: usize,
    pad_token_id: u32,
) -> Result<BertConfig, RecipeError> {
    let m = &recipe.model;
    if recipe.data.seq_len > m.max_position_embeddings {
        return Err(RecipeError::Invalid {
            key: "data.seq_len".into(),
            msg: format!(
                "{} is larger than model.max_position_embeddings ({})",
                recipe.data.seq_len, m.max_position_embeddings
            ),
        });
    }
    let cfg = BertConfig {
        vocab_size,
        hidden_size: m.hidden_size,
        num_hidden_layers: m.num_hidden_layers,
        num_attention_heads: m.num_attention_heads,
        intermediate_size: m.intermediate_size,
        hidden_act: m.hidden_act.clone(),
        hidden_dropout_prob: m.hidden_dropout_prob,
        attention_probs_dropout_prob: m.attention_probs_dropout_prob,
        max_position_embeddings: m.max_position_embeddings,
        type_vocab_size: m.type_vocab_size,
        initializer_range: m.initializer_range,
        layer_norm_eps: m.layer_norm_eps,
        pad_token_id: pad_token_id as usize,
        position_embedding_type: "absolute".into(),
        model_type: "bert".into(),
    };
    cfg.validate().map_err(|e| match e {
        kindling_models::ModelError::Setting { field, msg } => RecipeError::Invalid {
            key: format!("model.{field}"),
            msg,
        },
        e => RecipeError::Invalid {
            key: "model".into(),
            msg: e.to_string(),
        },
    })?;
    Ok(cfg)
}

/// Refuses a batch whose training step would not fit in the memory available, before anything
/// is allocated: a process that runs out of memory is killed without a message. CPU only: on
/// a GPU the step's memory is the device's, and running out of it is an error candle reports
/// (the CLI adds what to change), where this estimate (sized on CPU f32 runs: BERT-base at
/// 16 x 128 tokens, 5.0 GB estimated against a 3.5 GB peak resident set) is not calibrated.
fn check_memory(recipe: &Recipe, config: &BertConfig, device: &Device) -> Result<(), RecipeError> {
    if !device.is_cpu() {
        return Ok(());
    }
    let t = &recipe.train;
    let tokens = t.batch_size * recipe.data.seq_len;
    let predicted = (tokens as f64 * recipe.data.mask.rate).ceil() as usize;
    let need = config.mlm_train_bytes(tokens, predicted);
    match kindling_core::available_memory_bytes() {
        Some(avail) if need > avail as f64 => Err(RecipeError::Invalid {
            key: "train.batch_size".into(),
            msg: format!(
                "a training step of {} x {} tokens with this model needs about {:.1} GB \
                 (weights, optimizer state, activations), but {:.1} GB is available; lower \
                 train.batch_size and raise train.grad_accum to keep the effective batch",
                t.batch_size,
                recipe.data.seq_len,
                need / 1e9,
                avail as f64 / 1e9
            ),
        }),
        _ => Ok(()),
    }
}

/// The checkpoint's word embeddings must have one row per token of the run's tokenizer.
fn check_checkpoint_vocab(dir: &Path, vocab_size: usize) -> Result<(), RecipeError> {
    const NAME: &str = "bert.embeddings.word_embeddings.weight";
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let rows = safetensors::SafeTensors::deserialize(&bytes)
        .ok()
        .and_then(|st| st.tensor(NAME).ok().map(|t| t.shape()[0]));
    match rows {
        Some(rows) if rows != vocab_size => Err(RecipeError::Resume {
            path: dir.to_path_buf(),
            msg: format!(
                "the run's tokenizer.json has {vocab_size} tokens but the checkpoint's {NAME} \
                 has {rows} rows: the tokenizer does not belong to this run"
            ),
        }),
        _ => Ok(()),
    }
}

/// A resumed run must train the same model on the same data with the same seed; the `[train]`
/// section may change (more steps, a time limit).
fn check_same_run(recipe: &Recipe, run_dir: &Path) -> Result<(), RecipeError> {
    let saved_path = run_dir.join("recipe.toml");
    let saved = Recipe::load(&saved_path, &[])?;
    let differs = [
        ("objective", recipe.objective != saved.objective),
        ("seed", recipe.seed != saved.seed),
        ("model", recipe.model != saved.model),
        ("data", recipe.data != saved.data),
    ];
    if let Some((key, _)) = differs.iter().find(|(_, d)| *d) {
        return Err(RecipeError::Resume {
            path: run_dir.to_path_buf(),
            msg: format!(
                "recipe key `{key}` differs from the run's {}; a resumed run must keep the \
                 model, data and seed (only [train] may change)",
                saved_path.display()
            ),
        });
    }
    Ok(())
}

/// The eval metrics of the masked LM (`train.monitor.metric` names one).
pub const EVAL_METRICS: &[&str] = &["loss", "accuracy", "perplexity"];

/// Runs a `bert-mlm` recipe end to end.
///
/// Everything is read and checked before the run folder changes: the settings, the resume
/// checkpoint (checksums, the recipe it was trained with), the corpus and the tokenizer, the
/// blocks, the memory a step needs, and the checkpoint's weights, optimizer state and data
/// cursor against this model and data (an `auto` resume falls back past a checkpoint that does
/// not fit). Only then does the run take its lock and replace or write files.
pub fn pretrain(recipe: &Recipe, opts: &RunOptions) -> Result<RunReport, RecipeError> {
    // 1. Settings.
    recipe.validate(EVAL_METRICS)?;
    let device = rank_device(&recipe.device, opts.dist.as_ref())?;
    let compute = compute_dtype(&recipe.precision, &device)?;
    let t = &recipe.train;
    bert_config(recipe, 16, 0)?;
    let max_time = t.max_time()?;
    let save_interval = t.save_interval()?;
    let comm = join_group(opts, &device)?;
    // Data parallel: rank 0 prepares the run folder and the tokenizer and writes every file;
    // the other ranks read the tokenizer it saved and train on their shard.
    let rank = comm.as_ref().map_or(0, |c| c.rank());
    // Dropout masks on a GPU come from the device's generator (see `ops::seeded_dropout`);
    // each rank draws its own.
    if !device.is_cpu() {
        device.set_seed(recipe.seed.wrapping_add(rank as u64))?;
    }

    // 2. The run folder, read only: the lock if a run holds it, the checkpoints a resume may
    // continue from (checksums, and the recipe they were trained with).
    let plan = plan_run(recipe.run_dir(), opts, rank)?;
    let run_dir = plan.dir.clone();
    let resuming = !plan.candidates.dirs.is_empty();
    if resuming {
        check_same_run(recipe, &run_dir)?;
    }

    // 3. Data and tokenizer. Streaming from shards reads the corpus text into memory only to
    // train a tokenizer.
    let corpus = match (&recipe.data.prepare, &recipe.data.tokenizer.train) {
        (Some(_), _) if resuming => Corpus::default(),
        (Some(_), None) => Corpus::default(),
        _ => recipe.read_corpus()?,
    };
    if !corpus.documents.is_empty() {
        eprintln!(
            "corpus: {} files, {:.1} MB",
            corpus.documents.len(),
            corpus.total_bytes() as f64 / 1e6
        );
    }
    let tokenizer = if resuming {
        // The run's own tokenizer: a retrained one could differ (the trainer is not
        // deterministic), and the checkpoint's embeddings are indexed by this one.
        tok::load(&run_dir.join("tokenizer.json"))?
    } else if rank > 0 {
        // Rank 0 saves the tokenizer once its checks have passed.
        if let Some(c) = &comm {
            c.barrier()?;
        }
        tok::load(&run_dir.join("tokenizer.json"))?
    } else {
        let cache = crate::cache_dir(recipe).join("tokenizers");
        recipe
            .data
            .tokenizer
            .build(&corpus, Path::new("."), Some(&cache))?
    };
    let specials = tok::special_tokens(&tokenizer)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let config = bert_config(recipe, vocab_size, specials.pad)?;

    check_memory(recipe, &config, &device)?;
    let (train_blocks, eval_blocks, counts): (Arc<dyn Blocks>, Arc<dyn Blocks>, _) =
        match &recipe.data.prepare {
            Some(cfg) => {
                drop(corpus);
                let (train, eval) = shard_blocks(recipe, cfg, &tokenizer, &specials)?;
                let counts = (
                    train.stream.token_counts(vocab_size)?,
                    eval.stream.token_counts(vocab_size)?,
                );
                (Arc::new(train), Arc::new(eval), counts)
            }
            None => {
                let blocks =
                    PackedBlocks::pack(&corpus, &tokenizer, &specials, recipe.data.seq_len)?;
                drop(corpus);
                let (train, eval) = blocks.split_tail(recipe.data.eval_fraction)?;
                let counts = (
                    train.token_counts(vocab_size),
                    eval.token_counts(vocab_size),
                );
                (Arc::new(train), Arc::new(eval), counts)
            }
        };
    let n_blocks = train_blocks.len() + eval_blocks.len();
    if train_blocks.len() < t.batch_size {
        return Err(RecipeError::Invalid {
            key: "train.batch_size".into(),
            msg: format!(
                "{} is more than the {} training blocks",
                t.batch_size,
                train_blocks.len()
            ),
        });
    }
    let baseline = (!eval_blocks.is_empty()).then(|| {
        (
            "unigram baseline".to_string(),
            kindling_data::unigram_from_counts(&counts.0, &counts.1),
        )
    });
    eprintln!(
        "data: vocab {vocab_size}, {n_blocks} blocks of {} tokens ({} train, {} eval){}",
        recipe.data.seq_len,
        train_blocks.len(),
        eval_blocks.len(),
        baseline
            .as_ref()
            .map(|(_, b)| format!("; unigram baseline of the eval split {b:.4} nats"))
            .unwrap_or_default()
    );
    let masker = Arc::new(Masker::new(
        recipe.data.mask.clone(),
        &specials,
        vocab_size,
        recipe.seed,
    )?);
    let eval_masker = match &recipe.data.eval_mask {
        Some(m) => Arc::new(Masker::new(m.clone(), &specials, vocab_size, recipe.seed)?),
        None => masker.clone(),
    };
    let eval = eval_batches_up_to(
        eval_blocks.as_ref(),
        &eval_masker,
        t.eval_batch_size.max(1),
        t.max_eval_batches,
    );
    let mut objective = BertMlm::new(config, recipe.seed, &device)?;
    objective.model.bert.compute_dtype = compute;

    // 4. The checkpoint: the newest whose weights, optimizer state and cursor fit.
    let mut opt = Trainer::build_optimizer(&t.optimizer, &objective)?;
    let resumed = first_loadable(&plan.candidates, |dir| {
        check_checkpoint_vocab(dir, vocab_size)?;
        checkpoint::check_tensors(dir, &objective.varmap)?;
        let state = checkpoint::load(dir, &objective.varmap, Some(opt.as_mut()), &device)?;
        let cursor: Cursor =
            serde_json::from_value(state.data_cursor.clone()).map_err(|e| RecipeError::Resume {
                path: dir.to_path_buf(),
                msg: format!("state.json data_cursor {}: {e}", state.data_cursor),
            })?;
        if cursor.position > train_blocks.len() as u64 {
            return Err(RecipeError::Resume {
                path: dir.to_path_buf(),
                msg: format!(
                    "its data cursor is at block {} of epoch {}, past the end of this run's {} \
                     training blocks: the checkpoint was not trained on this data",
                    cursor.position,
                    cursor.epoch,
                    train_blocks.len()
                ),
            });
        }
        Ok((state, cursor))
    })?;

    // 5. Writes: the lock, the run folder, the tokenizer and the data summary.
    let _lock = plan.commit(&recipe.to_toml(), opts, resumed.is_some())?;
    if rank == 0 {
        if !resuming {
            let path = run_dir.join("tokenizer.json");
            tokenizer.save(&path, false).map_err(|e| RecipeError::Run {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            if let Some(c) = &comm {
                c.barrier()?;
            }
        }
        // What the data looked like, for people and for `kindling export` (which redraws the
        // card).
        save_json(
            &run_dir.join("data.json"),
            &serde_json::json!({
                "vocab_size": vocab_size, "seq_len": recipe.data.seq_len, "blocks": n_blocks,
                "train_blocks": train_blocks.len(), "eval_blocks": eval_blocks.len(),
                "unigram_baseline": baseline.as_ref().map(|b| b.1),
            }),
        )?;
    }
    // An update takes batch_size x grad_accum blocks on each rank.
    let world = comm.as_ref().map_or(1, |c| c.world());
    let steps_per_epoch =
        (train_blocks.len() / (t.batch_size * t.grad_accum.max(1) as usize * world)) as u64;
    let (start, cursor) = match resumed {
        Some((_, (state, cursor))) => (Some(state), cursor),
        None => (None, Cursor::default()),
    };
    let mut trainer = trainer_for(
        recipe,
        &run_dir,
        baseline.clone(),
        (
            max_time,
            save_interval,
            steps_per_epoch,
            start.as_ref().map(|s| s.step),
        ),
        opts,
        rank,
    )?;
    if let Some(c) = &comm {
        trainer = trainer.with_collective(c.clone());
    }
    let loader = MlmLoader::new(train_blocks, masker, t.batch_size, recipe.seed, cursor);
    // A streamed corpus can hold billions of blocks: its order is computed, not tabulated.
    let loader = if recipe.data.prepare.is_some() {
        loader.with_keyed_order()
    } else {
        loader
    };
    let mut train = Prefetch::new(loader, recipe.data.prefetch);

    eprintln!(
        "model: BertForMaskedLM h{} L{} A{} I{}, {:.2}M parameters",
        recipe.model.hidden_size,
        recipe.model.num_hidden_layers,
        recipe.model.num_attention_heads,
        recipe.model.intermediate_size,
        objective.param_count() as f64 / 1e6
    );
    let summary = trainer.fit(
        &objective,
        &mut train,
        &eval,
        opt,
        start,
        &|b: &MlmBatch| serde_json::to_value(b.cursor_after).expect("cursor serialises"),
    )?;
    drop(train);
    if rank > 0 {
        // Rank 0 reports, exports and writes; this rank's work is done.
        return Ok(RunReport {
            run_dir: run_dir.clone(),
            export_dir: PathBuf::new(),
            final_eval: summary.final_eval,
            baseline,
            steps: summary.steps,
            elapsed_secs: summary.elapsed_secs,
            stop: summary.stop,
        });
    }
    let report = |export_dir: PathBuf, summary: kindling_train::FitSummary| RunReport {
        run_dir: run_dir.clone(),
        export_dir,
        final_eval: summary.final_eval,
        baseline: baseline.clone(),
        steps: summary.steps,
        elapsed_secs: summary.elapsed_secs,
        stop: summary.stop,
    };
    match summary.stop {
        StopReason::Interrupted => {
            eprintln!(
                "interrupted at step {}: checkpoint {}",
                summary.steps,
                summary
                    .last_checkpoint
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(none: no step finished)".into())
            );
            return Ok(report(PathBuf::new(), summary));
        }
        StopReason::MaxTime => eprintln!("train.max_time reached at step {}", summary.steps),
        StopReason::EarlyStopped => eprintln!(
            "early stop at step {}: `{}` did not improve for {} evaluations (best {:?})",
            summary.steps,
            t.monitor.metric,
            t.monitor.patience,
            summary.best.as_ref().map(|b| (b.step, b.value))
        ),
        StopReason::Completed => {}
    }

    let export_dir = export_dir(recipe, &run_dir);
    export(
        &objective,
        &tokenizer,
        recipe,
        &export_dir,
        &summary.final_eval,
        baseline.clone(),
        summary.steps,
    )?;
    if let Some((label, b)) = &baseline {
        if let Some(l) = summary.final_eval.get("loss") {
            eprintln!(
                "final eval loss {l:.4} nats vs {label} {b:.4} nats ({:+.4})",
                l - b
            );
        }
    }
    eprintln!("export: {}", export_dir.display());
    Ok(report(export_dir, summary))
}

fn trainer_for(
    recipe: &Recipe,
    run_dir: &Path,
    baseline: Option<(String, f64)>,
    (max_time, save_interval, steps_per_epoch, resumed_at): (
        Option<std::time::Duration>,
        Option<std::time::Duration>,
        u64,
        Option<u64>,
    ),
    opts: &RunOptions,
    rank: usize,
) -> Result<Trainer, RecipeError> {
    let t = &recipe.train;
    let mut cfg = t.train_config(recipe.seed, steps_per_epoch)?;
    cfg.loss_scale = loss_scale(&recipe.precision);
    // The recipe-level limits were parsed once by the caller (they name the key on error).
    cfg.max_time = max_time;
    cfg.save_interval = save_interval;
    // A checkpoint folder describes its run on its own: recipe, tokenizer, data summary,
    // metrics up to its step.
    cfg.checkpoint_extras = [
        "recipe.toml",
        "tokenizer.json",
        "data.json",
        "metrics.jsonl",
    ]
    .iter()
    .map(|f| run_dir.join(f))
    .collect();
    if rank > 0 {
        return Ok(rank_trainer(cfg, run_dir, opts));
    }
    let metrics = run_dir.join("metrics.jsonl");
    // A resumed run continues the log from its checkpoint: records after it are dropped.
    let log = match resumed_at {
        Some(step) => MetricsLog::resume(&metrics, step)?,
        None => MetricsLog::open(&metrics)?,
    };
    let plot = PlotCallback::new(
        run_dir.join("plots").join("loss.png"),
        baseline.into_iter().collect(),
    )
    .with_metric_plot(
        run_dir.join("plots").join("eval_metrics.png"),
        &["accuracy"],
    )
    .with_history(&metrics);
    let mut trainer = Trainer::new(cfg, run_dir)
        .with_callback(ProgressCallback::new(t.log_every, "tok"))
        .with_callback(log)
        .with_callback(kindling_train::TensorBoard::create(run_dir)?)
        .with_callback(plot);
    if let Some(flag) = &opts.stop_flag {
        trainer = trainer.with_stop_flag(flag.clone());
    }
    Ok(trainer)
}
