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
    /// What the data looked like (`data.json`).
    data_summary: serde_json::Value,
    /// Continued pretraining: what `model.path` gave.
    pub loaded: Option<Loaded>,
    /// Continued pretraining: the loaded model's own scores on the eval blocks, before any
    /// step (`initial_eval.json`).
    pub initial: BTreeMap<String, f64>,
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
        // The model's config from the folder or the recipe's shape, checked before any write.
        match model_dir(self)? {
            Some(dir) => {
                folder_config(self, &dir)?;
            }
            None => {
                // The ranges of the shape, before a tokenizer is trained for it.
                let specials = tok::SpecialTokens {
                    pad: 0,
                    unk: 1,
                    cls: 2,
                    sep: 3,
                    mask: 4,
                    all: vec![0, 1, 2, 3, 4],
                };
                scratch_config(self, 16, &specials)?;
            }
        }
        Ok(())
    }

    fn check_resume(&self, run_dir: &Path) -> Result<(), RecipeError> {
        check_same_run(self, run_dir)
    }

    fn prepare(&self, ctx: &Context) -> Result<RunOf<Self>, RecipeError> {
        let t = &self.header.train;
        // Streaming from shards reads the corpus text into memory only to train a tokenizer.
        let corpus = match &self.data.prepare {
            Some(_) if ctx.resuming || !trains_tokenizer(self) => Corpus::default(),
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
            build_tokenizer(self, &corpus)?
        };
        let specials = tok::special_tokens(&tokenizer)?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let config = model_config(self, &tokenizer)?;

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
            self.header.seed,
        )?);
        let eval_masker = match &self.data.eval_mask {
            Some(m) => Arc::new(Masker::new(
                m.clone(),
                &specials,
                vocab_size,
                self.header.seed,
            )?),
            None => masker.clone(),
        };
        let eval = eval_batches_up_to(
            eval_blocks.as_ref(),
            &eval_masker,
            t.eval_batch_size.max(1),
            t.max_eval_batches,
        );
        let mut objective = BertMlm::new(config, self.header.seed, &ctx.device)?;
        objective.model.set_compute_dtype(ctx.compute);
        // On resume the checkpoint's weights replace these; read anyway, for what the card
        // says about the start.
        let loaded = match model_dir(self)? {
            Some(dir) => Some(load_weights(&objective, &dir)?),
            None => None,
        };
        let (h, l, a, i) = objective.config.shape();
        eprintln!(
            "model: {} h{h} L{l} A{a} I{i}, {:.2}M parameters{}",
            objective.config.class("ForMaskedLM"),
            objective.param_count() as f64 / 1e6,
            loaded
                .as_ref()
                .map(|l| format!("; {}", l.describe()))
                .unwrap_or_default()
        );
        // An update takes batch_size x grad_accum blocks on each rank.
        let steps_per_epoch =
            (train_blocks.len() / (t.batch_size * t.grad_accum.max(1) as usize * ctx.world)) as u64;
        let mut data_summary = serde_json::json!({
            "vocab_size": vocab_size, "seq_len": self.data.seq_len, "blocks": n_blocks,
            "train_blocks": train_blocks.len(), "eval_blocks": eval_blocks.len(),
            "unigram_baseline": baseline.as_ref().map(|b| b.1),
        });
        if let Some(l) = &loaded {
            // For `kindling export`'s card.
            data_summary["loaded"] = serde_json::to_value(l).expect("serialises");
        }
        let loader = MlmLoader::new(
            train_blocks,
            masker,
            t.batch_size,
            self.header.seed,
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
                data_summary,
                loaded,
                initial: BTreeMap::new(),
            },
        })
    }

    fn check_checkpoint(&self, run: &RunOf<Self>, dir: &Path) -> Result<(), RecipeError> {
        check_checkpoint_vocab(dir, &run.objective.config, self.model.path.is_some())
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
        if run.state.loaded.is_some() && !run.eval.is_empty() {
            // Where continued pretraining starts: the folder's own loss on these blocks.
            let path = ctx.run_dir.join("initial_eval.json");
            run.state.initial = match std::fs::read_to_string(&path) {
                Ok(text) if ctx.resuming => serde_json::from_str(&text).unwrap_or_default(),
                _ => {
                    let m = kindling_train::Trainer::evaluate(&run.objective, &run.eval)?;
                    save_json(&path, &serde_json::to_value(&m).expect("serialises"))?;
                    m
                }
            };
            eprintln!(
                "before training (model.path as loaded): {}",
                crate::run::format_metrics(&run.state.initial)
            );
        }
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
            &ExportInfo {
                eval: &summary.final_eval,
                baseline: run.baseline.clone(),
                steps: summary.steps,
                loaded: run.state.loaded.as_ref(),
                initial: &run.state.initial,
            },
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
