//! Fine-tuning as an [`Experiment`](crate::run::Experiment): what the run lifecycle
//! ([`crate::run::drive`]) asks of this recipe, hook by hook.

use super::*;

/// Runs the recipe: train with evaluation on the validation split, reload the best checkpoint,
/// score the test split, export (see [`crate::run::experiment`] for the lifecycle).
pub fn finetune(recipe: &FinetuneRecipe, opts: &RunOptions) -> Result<FinetuneReport, RecipeError> {
    let ran = drive(recipe, opts)?;
    let st = &ran.state;
    Ok(FinetuneReport {
        name: recipe.name().to_string(),
        init: recipe.model.init,
        problem: recipe.data.problem_type,
        steps: ran.report.steps,
        elapsed_secs: ran.report.elapsed_secs,
        best_validation: ran.best,
        // Interrupted: checkpointed, and `--resume auto` finishes it; no test scores yet.
        test: ran.outcome.unwrap_or_default(),
        test_majority: st.test.majority_fraction(st.classes),
        export_dir: ran.report.export_dir,
    })
}

/// What a fine-tuning run keeps between the lifecycle's hooks: the test split and the
/// tokenizer the export carries.
pub struct FinetuneState {
    tokenizer: Tokenizer,
    test: Encoded,
    pad_id: u32,
    classes: usize,
    skipped: Skipped,
}

impl Experiment for FinetuneRecipe {
    type Objective = Classifier;
    type Loader = ClsLoader;
    type State = FinetuneState;
    /// The test split's scores with the best checkpoint.
    type Outcome = BTreeMap<String, f64>;

    crate::run::shared_header!();

    fn eval_metrics(&self) -> Vec<&'static str> {
        let mut m = self.data.problem_type.metrics().to_vec();
        if self.data.problem_type == ProblemType::SingleLabelClassification {
            m.push("cm.*");
        }
        m
    }
    fn plotted_metrics(&self) -> Vec<&'static str> {
        self.data.problem_type.metrics()[1..].to_vec()
    }

    fn prepare(&self, ctx: &Context) -> Result<RunOf<Self>, RecipeError> {
        let t = &self.header.train;
        let tokenizer = tok::load(&self.model.path)?;
        let task = load_task(self, &tokenizer)?;
        let (columns, pair) = self.data.columns();
        let what = match self.data.problem_type {
            ProblemType::Regression => "regression on one score".to_string(),
            ProblemType::MultiLabelClassification => format!(
                "multi-label, {} classes {:?}",
                task.labels.len(),
                task.labels.names
            ),
            ProblemType::SingleLabelClassification => format!(
                "{} classes {:?} (test majority class {:.1}%)",
                task.labels.len(),
                task.labels.names,
                100.0 * task.test.majority_fraction(task.labels.len())
            ),
        };
        eprintln!(
            "data: {what}; {} train, {} validation, {} test rows; text: {}",
            task.train.len(),
            task.validation.len(),
            task.test.len(),
            if pair {
                format!("pairs ({} | {})", columns[0], columns[1])
            } else {
                columns.join(" + ")
            }
        );
        if let Some(s) = task.skipped.summary(&self.data.path) {
            eprintln!("data: {s}");
        }
        let (mut obj, report) = Classifier::build(self, task.labels.clone(), &ctx.device)?;
        obj.model.set_compute_dtype(ctx.compute);
        match &report {
            Some(r) => eprintln!(
                "model: {} ({:?} init, {} pooling): fresh (not in the folder): {:?}; unused from \
                 the folder: {} tensors{}",
                self.model.path.display(),
                self.model.init,
                pooling_name(self.model.pooling),
                r.missing,
                r.unused.len(),
                if r.unused.is_empty() {
                    String::new()
                } else {
                    format!(" ({} ...)", r.unused[0])
                }
            ),
            None => eprintln!(
                "model: the shape of {}, randomly initialised (seed {})",
                self.model.path.display(),
                self.header.seed
            ),
        }
        let validation = eval_batches(&task.validation, t.eval_batch_size, task.pad_id);
        let loader = ClsLoader::new(
            Arc::new(task.train),
            t.batch_size,
            self.header.seed,
            task.pad_id,
            self.data.group_by_length,
        );
        Ok(Prepared {
            objective: obj,
            steps_per_epoch: loader.batches_per_epoch() as u64,
            train: loader,
            eval: validation,
            unit: "ex",
            baseline: None,
            state: FinetuneState {
                tokenizer,
                test: task.test,
                pad_id: task.pad_id,
                classes: task.labels.len(),
                skipped: task.skipped,
            },
        })
    }

    /// Unset eval/save cadence means once per epoch (and at the end), as HF's
    /// `eval_strategy = "epoch"`; the default monitor is validation accuracy.
    fn train_config(&self, run: &RunOf<Self>) -> Result<TrainConfig, RecipeError> {
        let per_epoch = run.steps_per_epoch;
        let mut cfg = self
            .header
            .train
            .train_config(self.header.seed, per_epoch)?;
        if cfg.eval_every == 0 {
            cfg.eval_every = per_epoch;
        }
        if cfg.save_every == 0 {
            cfg.save_every = cfg.eval_every;
        }
        cfg.keep_last = cfg.keep_last.max(1);
        let classes = run.objective.labels.len();
        if cfg.monitor.metric == "f1" && classes != 2 {
            return Err(RecipeError::Invalid {
                key: "train.monitor.metric".into(),
                msg: format!(
                    "`f1` (the second class's) is reported for two classes; this task has \
                     {classes}: use macro_f1"
                ),
            });
        }
        if cfg.monitor == Monitor::default() {
            let (metric, goal) = self.data.problem_type.monitor();
            cfg.monitor = Monitor {
                metric: metric.into(),
                goal,
                ..Monitor::default()
            };
        }
        Ok(cfg)
    }

    fn configure_optimizer(&self, obj: &Classifier, opt: &mut dyn Optimizer) {
        let decay = self.model.layerwise_lr_decay;
        if decay != 1.0 {
            opt.set_lr_scales(&|name| obj.lr_scale(name, decay));
        }
    }

    /// Reloads the best checkpoint by the validation metric (if it is still on disk), scores
    /// the test split, exports.
    fn finish(
        &self,
        run: &mut RunOf<Self>,
        summary: &FitSummary,
        ctx: &Context,
        export_dir: &Path,
    ) -> Result<BTreeMap<String, f64>, RecipeError> {
        let t = &self.header.train;
        let best = summary.best.as_ref().map(|b| (b.step, b.value));
        if let Some((step, _)) = best {
            let dir = checkpoint::checkpoint_dir(&ctx.run_dir, step);
            if dir.is_dir() && step != summary.steps {
                checkpoint::load(&dir, &run.objective.varmap, None, &ctx.device)?;
                let metric = self.train_config(run)?.monitor.metric;
                eprintln!("best checkpoint: step {step} (validation {metric})");
            }
        }
        let st = &run.state;
        let obj = &run.objective;
        let test_batches = eval_batches(&st.test, t.eval_batch_size, st.pad_id);
        let test = Trainer::evaluate(obj, &test_batches)?;
        let scores: Vec<String> = self.data.problem_type.metrics()[1..]
            .iter()
            .chain(&["loss"])
            .filter_map(|k| test.get(*k).map(|v| format!("{k} {v:.4}")))
            .collect();
        eprintln!("test ({} rows): {}", st.test.len(), scores.join(", "));
        if let Some(cm) = obj.confusion_counts(st.test.len()) {
            eprint!("{}", format_confusion(&obj.labels, &cm));
        }
        save_json(
            &ctx.run_dir.join("test_results.json"),
            &serde_json::json!({"test": test, "best_validation": best.map(|(s, v)| serde_json::json!({"step": s, "value": v})),
                "steps": summary.steps, "elapsed_s": summary.elapsed_secs,
                "confusion_matrix": obj.confusion_counts(st.test.len()), "labels": obj.labels.names,
                "problem_type": self.data.problem_type.hf_name(),
                "skipped_rows": st.skipped}),
        )?;
        export(
            obj,
            &st.tokenizer,
            self,
            export_dir,
            &test,
            summary.steps,
            &st.skipped,
        )?;
        Ok(test)
    }
}

impl Loader for ClsLoader {
    fn cursor_after(b: &ClsBatch) -> serde_json::Value {
        serde_json::json!({"epoch": b.epoch, "index": b.index})
    }

    fn seek(&mut self, cursor: &serde_json::Value) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct At {
            epoch: u64,
            index: usize,
        }
        let at: At = serde_json::from_value(cursor.clone())
            .map_err(|e| format!("is not an (epoch, index) cursor: {e}"))?;
        let batches = self.batches_per_epoch();
        if at.index >= batches.max(1) {
            return Err(format!(
                "is past the end of the {batches} batches of an epoch"
            ));
        }
        self.seek_after(at.epoch, at.index);
        Ok(())
    }
}
