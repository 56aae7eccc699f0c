//! SimCSE as an [`Experiment`](crate::run::Experiment): what the run lifecycle
//! ([`crate::run::drive`]) asks of this recipe, hook by hook.

use super::*;

/// Runs the recipe: evaluate the starting encoder, train (resumable), evaluate, export (see
/// [`crate::run::experiment`] for the lifecycle).
pub fn pretrain(recipe: &SimcseRecipe, opts: &RunOptions) -> Result<RunReport, RecipeError> {
    let ran = drive(recipe, opts)?;
    let mut report = ran.report;
    report.baseline = ran
        .state
        .initial
        .get("recall_at_10")
        .map(|v| ("initial recall_at_10".to_string(), *v));
    Ok(report)
}

/// What a SimCSE run keeps between the lifecycle's hooks.
pub struct SimcseState {
    tokenizer: Tokenizer,
    /// The starting encoder's scores (`initial_eval.json`).
    initial: BTreeMap<String, f64>,
}

impl Experiment for SimcseRecipe {
    type Objective = Simcse;
    type Loader = SimcseLoader;
    type State = SimcseState;
    type Outcome = ();

    crate::run::shared_header!();

    fn eval_metrics(&self) -> Vec<&'static str> {
        EVAL_METRICS.to_vec()
    }
    fn plotted_metrics(&self) -> Vec<&'static str> {
        vec!["recall_at_1", "recall_at_10", "mrr"]
    }

    fn prepare(&self, ctx: &Context) -> Result<RunOf<Self>, RecipeError> {
        let t = &self.header.train;
        let tokenizer = tok::load(&self.model.path)?;
        let specials = tok::special_tokens(&tokenizer)?;
        let texts = read_texts(self)?;
        let examples = encode_examples(&texts, &tokenizer, self.model.max_length)?;
        let distinct = {
            let mut k: Vec<u64> = examples.iter().map(|e| e.keys[0]).collect();
            k.sort_unstable();
            k.dedup();
            k.len()
        };
        eprintln!(
            "data: {} {} ({} distinct anchors), mean {:.1} tokens",
            examples.len(),
            match (self.supervised(), self.data.negative_column.is_some()) {
                (false, _) => "sentences (unsupervised: dropout makes the two views)",
                (true, false) => "(anchor, positive) pairs",
                (true, true) => "(anchor, positive, hard negative) triplets",
            },
            distinct,
            examples.iter().map(|e| e.anchor.len()).sum::<usize>() as f64 / examples.len() as f64
        );
        let mut obj = Simcse::build(self, specials.pad, &ctx.device)?;
        obj.group = ctx.group.clone();
        obj.model.set_compute_dtype(ctx.compute);
        let ((h, l, _, _), (hidden_p, attention_p)) = (obj.config.shape(), obj.config.dropouts());
        eprintln!(
            "model: {} ({} h{h} L{l}), {} pooling, dropout {hidden_p}/{attention_p}; temperature \
             {}; {}",
            self.model.path.display(),
            obj.config.architecture().display_name(),
            match obj.pooling {
                Pooling::Cls => "[CLS]",
                Pooling::Mean => "mean",
            },
            self.loss.temperature,
            if self.grad_cache.enabled {
                format!("GradCache in chunks of {}", self.grad_cache.chunk_size)
            } else {
                "no GradCache".into()
            }
        );
        let mut eval = match &self.eval.retrieval {
            Some(r) => {
                let (b, n) =
                    retrieval_batches(r, &tokenizer, self.model.max_length, t.eval_batch_size)?;
                eprintln!(
                    "eval: {} -> {} retrieval over {n} rows of {} (split `{}`)",
                    r.query_column,
                    r.doc_column,
                    r.table.display(),
                    r.split
                );
                b
            }
            None => Vec::new(),
        };
        obj.has_retrieval = !eval.is_empty();
        if let Some(s) = &self.eval.sts {
            let (b, gold) = sts_batches(
                s,
                &tokenizer,
                self.model.max_length,
                t.eval_batch_size,
                eval.len(),
            )?;
            eprintln!(
                "eval: STS over {} pairs ({}, {}) -> {} of {} (split `{}`)",
                gold.len(),
                s.sentence1_column,
                s.sentence2_column,
                s.score_column,
                s.table.display(),
                s.split
            );
            obj.sts_gold = gold;
            eval.extend(b);
        }
        let loader = SimcseLoader::new(Arc::new(examples), t.batch_size, self.header.seed);
        Ok(Prepared {
            objective: obj,
            steps_per_epoch: loader.batches_per_epoch() as u64 / ctx.world as u64,
            train: loader,
            eval,
            unit: "tok",
            baseline: None,
            state: SimcseState {
                tokenizer,
                initial: BTreeMap::new(),
            },
        })
    }

    /// The starting encoder's scores, once per run (a resumed run reads them back); rank 0
    /// reports, the other ranks need not evaluate.
    fn start(&self, run: &mut RunOf<Self>, ctx: &Context) -> Result<(), RecipeError> {
        if ctx.rank > 0 || run.eval.is_empty() {
            return Ok(());
        }
        let path = ctx.run_dir.join("initial_eval.json");
        run.state.initial = if ctx.resuming && path.is_file() {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default()
        } else {
            let m = Trainer::evaluate(&run.objective, &run.eval)?;
            save_json(&path, &serde_json::to_value(&m).expect("serialises"))?;
            m
        };
        if !run.state.initial.is_empty() {
            eprintln!(
                "before training: {}",
                crate::run::format_metrics(&run.state.initial)
            );
        }
        Ok(())
    }

    fn finish(
        &self,
        run: &mut RunOf<Self>,
        summary: &FitSummary,
        ctx: &Context,
        export_dir: &Path,
    ) -> Result<(), RecipeError> {
        let final_eval = if summary.final_eval.is_empty() && !run.eval.is_empty() {
            Trainer::evaluate(&run.objective, &run.eval)?
        } else {
            summary.final_eval.clone()
        };
        let initial = &run.state.initial;
        if !final_eval.is_empty() {
            eprintln!(
                "after training:  {}",
                crate::run::format_metrics(&final_eval)
            );
            save_json(
                &ctx.run_dir.join("eval_results.json"),
                &serde_json::json!({"initial": initial, "final": final_eval, "steps": summary.steps}),
            )?;
        }
        export(
            &run.objective,
            &run.state.tokenizer,
            self,
            export_dir,
            &final_eval,
            initial,
            summary.steps,
        )
    }
}

impl Loader for SimcseLoader {
    fn cursor_after(batch: &SimcseBatch) -> serde_json::Value {
        serde_json::to_value(batch.cursor_after).expect("a cursor serialises")
    }

    fn seek(&mut self, cursor: &serde_json::Value) -> Result<(), String> {
        let c = cursor_within(cursor, self.len() as u64, "examples")?;
        SimcseLoader::seek(self, c);
        Ok(())
    }
}
