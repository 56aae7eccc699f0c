//! BERT masked-LM pretraining as an [`Experiment`](crate::run::Experiment): what the run lifecycle
//! ([`crate::run::drive`]) asks of this recipe, hook by hook.

use super::*;

/// Runs a `bert-mlm` recipe end to end (see [`crate::run::experiment`] for the lifecycle).
///
/// Everything is read and checked before the run folder changes: the settings, the resume
/// checkpoint (checksums, the recipe it was trained with), the corpus and the tokenizer, the
/// blocks, the memory a step needs, and the checkpoint's weights, optimizer state and data
/// cursor against this model and data.
pub fn pretrain(recipe: &Recipe, opts: &RunOptions) -> Result<RunReport, RecipeError> {
    Ok(drive(recipe, opts)?.report)
}

/// What an MLM run keeps between the lifecycle's hooks.
pub struct MlmState {
    pub tokenizer: Tokenizer,
    vocab_size: usize,
    /// What the data looked like (`data.json`).
    data_summary: serde_json::Value,
}

impl Experiment for Recipe {
    type Objective = BertMlm;
    type Loader = Prefetched<MlmLoader>;
    type State = MlmState;
    type Outcome = ();

    crate::run::shared_header!();

    fn eval_metrics(&self) -> Vec<&'static str> {
        EVAL_METRICS.to_vec()
    }
    fn plotted_metrics(&self) -> Vec<&'static str> {
        vec!["accuracy"]
    }
    /// A checkpoint folder describes its run on its own: recipe, tokenizer, data summary,
    /// metrics up to its step.
    fn checkpoint_files(&self) -> Vec<&'static str> {
        vec![
            "recipe.toml",
            "tokenizer.json",
            "data.json",
            "metrics.jsonl",
        ]
    }

    fn validate(&self) -> Result<(), RecipeError> {
        Recipe::validate(self, EVAL_METRICS)?;
        bert_config(self, 16, 0)?;
        Ok(())
    }

    fn check_resume(&self, run_dir: &Path) -> Result<(), RecipeError> {
        check_same_run(self, run_dir)
    }

    fn prepare(&self, ctx: &Context) -> Result<RunOf<Self>, RecipeError> {
        let t = &self.train;
        // Streaming from shards reads the corpus text into memory only to train a tokenizer.
        let corpus = match (&self.data.prepare, &self.data.tokenizer.train) {
            (Some(_), _) if ctx.resuming => Corpus::default(),
            (Some(_), None) => Corpus::default(),
            _ => self.read_corpus()?,
        };
        if !corpus.documents.is_empty() {
            eprintln!(
                "corpus: {} files, {:.1} MB",
                corpus.documents.len(),
                corpus.total_bytes() as f64 / 1e6
            );
        }
        let tokenizer = if ctx.resuming {
            // The run's own tokenizer: a retrained one could differ (the trainer is not
            // deterministic), and the checkpoint's embeddings are indexed by this one.
            tok::load(&ctx.run_dir.join("tokenizer.json"))?
        } else if ctx.rank > 0 {
            // Data parallel: rank 0 saves the tokenizer once its checks have passed (`start`).
            if let Some(g) = &ctx.group {
                g.barrier()?;
            }
            tok::load(&ctx.run_dir.join("tokenizer.json"))?
        } else {
            let cache = crate::cache_dir(self).join("tokenizers");
            self.data
                .tokenizer
                .build(&corpus, Path::new("."), Some(&cache))?
        };
        let specials = tok::special_tokens(&tokenizer)?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let config = bert_config(self, vocab_size, specials.pad)?;

        check_memory(self, &config, &ctx.device)?;
        let (train_blocks, eval_blocks, counts): (Arc<dyn Blocks>, Arc<dyn Blocks>, _) =
            match &self.data.prepare {
                Some(cfg) => {
                    drop(corpus);
                    let (train, eval) = shard_blocks(self, cfg, &tokenizer, &specials)?;
                    let counts = (
                        train.stream.token_counts(vocab_size)?,
                        eval.stream.token_counts(vocab_size)?,
                    );
                    (Arc::new(train), Arc::new(eval), counts)
                }
                None => {
                    let blocks =
                        PackedBlocks::pack(&corpus, &tokenizer, &specials, self.data.seq_len)?;
                    drop(corpus);
                    let (train, eval) = blocks.split_tail(self.data.eval_fraction)?;
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
            self.data.seq_len,
            train_blocks.len(),
            eval_blocks.len(),
            baseline
                .as_ref()
                .map(|(_, b)| format!("; unigram baseline of the eval split {b:.4} nats"))
                .unwrap_or_default()
        );
        let masker = Arc::new(Masker::new(
            self.data.mask.clone(),
            &specials,
            vocab_size,
            self.seed,
        )?);
        let eval_masker = match &self.data.eval_mask {
            Some(m) => Arc::new(Masker::new(m.clone(), &specials, vocab_size, self.seed)?),
            None => masker.clone(),
        };
        let eval = eval_batches_up_to(
            eval_blocks.as_ref(),
            &eval_masker,
            t.eval_batch_size.max(1),
            t.max_eval_batches,
        );
        let mut objective = BertMlm::new(config, self.seed, &ctx.device)?;
        objective.model.bert.compute_dtype = ctx.compute;
        eprintln!(
            "model: BertForMaskedLM h{} L{} A{} I{}, {:.2}M parameters",
            self.model.hidden_size,
            self.model.num_hidden_layers,
            self.model.num_attention_heads,
            self.model.intermediate_size,
            objective.param_count() as f64 / 1e6
        );
        // An update takes batch_size x grad_accum blocks on each rank.
        let steps_per_epoch =
            (train_blocks.len() / (t.batch_size * t.grad_accum.max(1) as usize * ctx.world)) as u64;
        let data_summary = serde_json::json!({
            "vocab_size": vocab_size, "seq_len": self.data.seq_len, "blocks": n_blocks,
            "train_blocks": train_blocks.len(), "eval_blocks": eval_blocks.len(),
            "unigram_baseline": baseline.as_ref().map(|b| b.1),
        });
        let loader = MlmLoader::new(
            train_blocks,
            masker,
            t.batch_size,
            self.seed,
            Cursor::default(),
        );
        // A streamed corpus can hold billions of blocks: its order is computed, not tabulated.
        let loader = if self.data.prepare.is_some() {
            loader.with_keyed_order()
        } else {
            loader
        };
        Ok(Prepared {
            objective,
            train: Prefetched::new(loader, self.data.prefetch),
            eval,
            unit: "tok",
            steps_per_epoch,
            baseline,
            state: MlmState {
                tokenizer,
                vocab_size,
                data_summary,
            },
        })
    }

    fn check_checkpoint(&self, state: &MlmState, dir: &Path) -> Result<(), RecipeError> {
        check_checkpoint_vocab(dir, state.vocab_size)
    }

    fn start(&self, run: &mut RunOf<Self>, ctx: &Context) -> Result<(), RecipeError> {
        if ctx.rank > 0 {
            return Ok(());
        }
        if !ctx.resuming {
            let path = ctx.run_dir.join("tokenizer.json");
            run.state
                .tokenizer
                .save(&path, false)
                .map_err(|e| RecipeError::Run {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
            // The other ranks read it now.
            if let Some(g) = &ctx.group {
                g.barrier()?;
            }
        }
        // For people, and for `kindling export` (which redraws the card).
        save_json(&ctx.run_dir.join("data.json"), &run.state.data_summary)?;
        Ok(())
    }

    fn finish(
        &self,
        run: &mut RunOf<Self>,
        summary: &FitSummary,
        _ctx: &Context,
        export_dir: &Path,
    ) -> Result<(), RecipeError> {
        export(
            &run.objective,
            &run.state.tokenizer,
            self,
            export_dir,
            &summary.final_eval,
            run.baseline.clone(),
            summary.steps,
        )
    }
}

impl Loader for MlmLoader {
    fn cursor_after(batch: &MlmBatch) -> serde_json::Value {
        serde_json::to_value(batch.cursor_after).expect("a cursor serialises")
    }

    fn seek(&mut self, cursor: &serde_json::Value) -> Result<(), String> {
        let n = self.blocks_len() as u64;
        let c = cursor_within(cursor, n, "training blocks")?;
        MlmLoader::seek(self, c);
        Ok(())
    }
}
