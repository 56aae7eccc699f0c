//! A vision SSL method as an [`Experiment`](crate::run::Experiment): what the run lifecycle
//! ([`crate::run::drive`]) asks of this recipe, hook by hook.

use super::*;

/// Runs a vision SSL recipe, in one process or as one rank of a data-parallel group (every
/// method: SimCLR gathers its negatives, Barlow Twins and VICReg both views ([`group_views`]),
/// MoCo enqueues the whole group's keys; BYOL's and SimSiam's losses are means of per-image
/// terms, so the ranks' mean is the global batch's). See [`crate::run::experiment`] for the
/// lifecycle.
pub fn pretrain(recipe: &VisionRecipe, opts: &RunOptions) -> Result<RunReport, RecipeError> {
    let ran = drive(recipe, opts)?;
    let mut report = ran.report;
    report.baseline = ran
        .outcome
        .and_then(|probes| probes.into_iter().nth(1))
        .map(|p| (format!("probe: {}", p.what), p.accuracy));
    Ok(report)
}

/// What a vision run keeps between the lifecycle's hooks: the images the final probes read.
pub struct VisionState {
    train: Arc<ImageSet>,
    test: Option<ImageSet>,
}

impl Experiment for VisionRecipe {
    type Objective = SslModel;
    type Loader = ViewLoader;
    type State = VisionState;
    /// The final linear probes (empty without a labelled test split or with the probe off).
    type Outcome = Vec<ProbeScore>;

    crate::run::shared_header!();

    fn eval_metrics(&self) -> Vec<&'static str> {
        EVAL_METRICS.to_vec()
    }
    fn plotted_metrics(&self) -> Vec<&'static str> {
        vec!["knn_accuracy", "probe_accuracy", "feature_std"]
    }

    fn prepare(&self, ctx: &Context) -> Result<RunOf<Self>, RecipeError> {
        let train_set = Arc::new(load_images(&self.data.train, self.data.max_train_images)?);
        let test_set = match &self.data.test {
            Some(s) => Some(load_images(s, self.data.max_test_images)?),
            None => None,
        };
        let classes = class_count(&train_set, test_set.as_ref());
        eprintln!(
            "data: {} training images {}x{}x{}{}, {} test images, {classes} classes",
            train_set.len(),
            train_set.height,
            train_set.width,
            train_set.channels,
            if train_set.labels.is_some() {
                " (labels feed only the monitors)"
            } else {
                ""
            },
            test_set.as_ref().map_or(0, ImageSet::len),
        );
        let in_shape = (train_set.height, train_set.width, train_set.channels);
        let mut model = SslModel::build(self, in_shape, classes, &ctx.device)?;
        model.compute = ctx.compute;
        model.group = ctx.group.clone();
        let bank = if self.eval.knn_bank > 0 {
            (*train_set).clone().truncate(self.eval.knn_bank)
        } else {
            (*train_set).clone()
        };
        if bank.labels.is_some() {
            model.knn = Some(KnnBank {
                images: Arc::new(bank),
                pipeline: self.data.eval_view.clone(),
            });
        }
        let n_params: usize = {
            let data = model.varmap.data().lock().expect("varmap lock poisoned");
            data.iter()
                .filter(|(n, _)| model.trainable(n))
                .map(|(_, v)| v.elem_count())
                .sum()
        };
        eprintln!(
            "model: {} ({} features), {}: {:.2}M trainable parameters",
            model.backbone.config().describe(),
            self.model.backbone.feature_dim(),
            self.objective,
            n_params as f64 / 1e6
        );
        let t = &self.header.train;
        let mut loader = ViewLoader::new(
            train_set.clone(),
            self.pipelines(),
            t.batch_size,
            self.header.seed,
        )?;
        if let Some(g) = &ctx.group {
            // Each rank augments only the batches it trains on.
            loader = loader.for_rank(g.rank(), g.world());
        }
        let mut eval = match &test_set {
            Some(s) => eval_batches(s, self, t.eval_batch_size)?,
            None => Vec::new(),
        };
        if t.max_eval_batches > 0 {
            eval.truncate(t.max_eval_batches);
        }
        Ok(Prepared {
            objective: model,
            steps_per_epoch: loader.batches_per_epoch() as u64 / ctx.world as u64,
            train: loader,
            eval,
            unit: "img",
            baseline: None,
            state: VisionState {
                train: train_set,
                test: test_set,
            },
        })
    }

    fn finish(
        &self,
        run: &mut RunOf<Self>,
        summary: &FitSummary,
        ctx: &Context,
        export_dir: &Path,
    ) -> Result<Vec<ProbeScore>, RecipeError> {
        let probes = match (&run.state.test, self.probe.enabled) {
            (Some(test), true) => {
                final_probes(self, &run.objective, &run.state.train, test, &ctx.device)?
            }
            _ => Vec::new(),
        };
        if !probes.is_empty() {
            eprintln!("\nlinear probe on frozen features (test split):");
            eprintln!("  {:<44} {:>9} {:>9}", "features", "accuracy", "macro-F1");
            for p in &probes {
                eprintln!("  {:<44} {:>9.4} {:>9.4}", p.what, p.accuracy, p.macro_f1);
            }
            save_json(
                &ctx.run_dir.join("probe_results.json"),
                &serde_json::to_value(&probes).expect("serialises"),
            )?;
        }
        export(self, &run.objective, export_dir, summary.steps, &probes)?;
        Ok(probes)
    }
}

impl Loader for ViewLoader {
    fn cursor_after(batch: &ViewBatch) -> serde_json::Value {
        serde_json::to_value(batch.cursor_after).expect("a cursor serialises")
    }

    fn seek(&mut self, cursor: &serde_json::Value) -> Result<(), String> {
        let c = cursor_within(cursor, self.images_len() as u64, "training images")?;
        ViewLoader::seek(self, c);
        Ok(())
    }
}
