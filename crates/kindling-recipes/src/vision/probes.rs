//! Evaluation data and the final linear probes on frozen features (beside a random encoder and raw pixels).

#[allow(unused_imports)]
use super::*;

/// Evaluation batches of the test images: the two training views (for the held-out loss) and
/// the clean eval view, seeded apart from training.
pub(super) fn eval_batches(
    set: &ImageSet,
    recipe: &VisionRecipe,
    batch_size: usize,
) -> Result<Vec<ViewBatch>, RecipeError> {
    let mut pipes = recipe.pipelines();
    pipes.push(recipe.data.eval_view.clone());
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    // Batches smaller than 2 would make BatchNorm's statistics degenerate.
    idx.chunks(batch_size.max(2))
        .filter(|c| c.len() >= 2)
        .map(|c| {
            build_views(
                set,
                &pipes,
                c,
                recipe.header.seed ^ 0x6576_616c,
                u64::MAX,
                Cursor::default(),
            )
            .map_err(RecipeError::from)
        })
        .collect()
}

/// Classes seen in the training and test labels (the online probe's width).
pub(super) fn class_count(train: &ImageSet, test: Option<&ImageSet>) -> usize {
    train
        .labels
        .iter()
        .flatten()
        .chain(test.iter().flat_map(|t| t.labels.iter().flatten()))
        .max()
        .map_or(0, |&m| m as usize + 1)
}

pub(super) fn load_images(src: &ImageSource, max: usize) -> Result<ImageSet, RecipeError> {
    let set = src.load()?;
    Ok(if max > 0 { set.truncate(max) } else { set })
}

/// A probe result: test accuracy and macro-F1 of logistic regression on frozen features.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeScore {
    pub what: String,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub l2: f64,
    pub dims: usize,
}

/// Logistic regression on (train, test) feature rows, L2 chosen on the last 10% of train.
pub fn linear_probe(
    what: &str,
    mut train: Vec<Vec<f32>>,
    train_labels: &[u32],
    mut test: Vec<Vec<f32>>,
    test_labels: &[u32],
    classes: usize,
    cfg: &VisionProbe,
    device: &Device,
) -> Result<ProbeScore, RecipeError> {
    let reference = train.clone();
    standardise(&reference, &mut [&mut train, &mut test]);
    let cut = train.len() - train.len() / 10;
    let to_matrix = |rows: &[Vec<f32>]| -> candle_core::Result<Tensor> {
        let d = rows.first().map_or(0, Vec::len);
        Tensor::from_vec(
            rows.iter().flatten().copied().collect(),
            (rows.len(), d),
            device,
        )
    };
    let (xa, xv) = (to_matrix(&train[..cut])?, to_matrix(&train[cut..])?);
    let ya = Tensor::from_slice(&train_labels[..cut], cut, device)?;
    let accuracy = |m: &Logistic, x: &Tensor, y: &[u32]| -> candle_core::Result<Vec<Vec<f64>>> {
        let pred = m.predict(x)?;
        let mut cm = vec![vec![0.0; classes]; classes];
        for (&t, &p) in y.iter().zip(&pred) {
            cm[t as usize][p as usize] += 1.0;
        }
        Ok(cm)
    };
    let mut best: Option<(f64, f64)> = None;
    for &l2 in &cfg.l2 {
        let m = Logistic::fit(&xa, &ya, classes, l2, cfg.steps, cfg.lr)?;
        let (acc, _) =
            crate::metrics::accuracy_and_macro_f1(&accuracy(&m, &xv, &train_labels[cut..])?);
        if best.is_none_or(|(a, _)| acc > a) {
            best = Some((acc, l2));
        }
    }
    let (_, l2) = best.ok_or_else(|| RecipeError::Invalid {
        key: "probe.l2".into(),
        msg: "empty: name at least one L2 strength".into(),
    })?;
    // Refit on all training rows with the chosen strength.
    let x = to_matrix(&train)?;
    let y = Tensor::from_slice(train_labels, train.len(), device)?;
    let m = Logistic::fit(&x, &y, classes, l2, cfg.steps, cfg.lr)?;
    let cm = accuracy(&m, &to_matrix(&test)?, test_labels)?;
    let (accuracy, macro_f1) = crate::metrics::accuracy_and_macro_f1(&cm);
    Ok(ProbeScore {
        what: what.into(),
        accuracy,
        macro_f1,
        l2,
        dims: x.dim(1)?,
    })
}

pub(super) fn rows(flat: Vec<f32>, d: usize) -> Vec<Vec<f32>> {
    flat.chunks(d).map(<[f32]>::to_vec).collect()
}

/// Every image through `pipe` (normally just the normalisation), flattened: the raw-pixel
/// baseline of the probe.
pub(super) fn pixel_rows(
    set: &ImageSet,
    pipe: &ViewPipeline,
) -> Result<Vec<Vec<f32>>, RecipeError> {
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    let b = build_views(
        set,
        std::slice::from_ref(pipe),
        &idx,
        0,
        0,
        Cursor::default(),
    )?;
    let (h, w, c) = b.shapes[0];
    Ok(rows(b.views[0].clone(), h * w * c))
}

/// The linear evaluation of a finished run: the trained encoder, a random one of the same shape
/// and seed, and raw pixels through the eval view.
pub(super) fn final_probes(
    recipe: &VisionRecipe,
    model: &SslModel,
    train: &ImageSet,
    test: &ImageSet,
    device: &Device,
) -> Result<Vec<ProbeScore>, RecipeError> {
    let cfg = &recipe.probe;
    let (tl, sl) = match (&train.labels, &test.labels) {
        (Some(a), Some(b)) => (a.clone(), b.clone()),
        _ => return Ok(Vec::new()),
    };
    let classes = tl.iter().chain(&sl).max().map_or(0, |&m| m as usize + 1);
    let pipe = &recipe.data.eval_view;
    let d = model.backbone.config().feature_dim();
    let mut out = Vec::new();
    let feats = |b: &Backbone, set: &ImageSet| SslModel::features(b, set, pipe, 256, device);
    let t0 = Instant::now();
    out.push(linear_probe(
        "pretrained encoder",
        rows(feats(&model.backbone, train)?, d),
        &tl,
        rows(feats(&model.backbone, test)?, d),
        &sl,
        classes,
        cfg,
        device,
    )?);
    eprintln!(
        "probe: pretrained encoder {:.4} ({:.0}s)",
        out[0].accuracy,
        t0.elapsed().as_secs_f64()
    );
    if cfg.compare_random {
        let random = initial_encoder(&model.backbone.config(), recipe.header.seed, device)?;
        out.push(linear_probe(
            "random encoder (the run's initial weights)",
            rows(feats(&random, train)?, d),
            &tl,
            rows(feats(&random, test)?, d),
            &sl,
            classes,
            cfg,
            device,
        )?);
    }
    if cfg.compare_pixels {
        out.push(linear_probe(
            "raw pixels",
            pixel_rows(train, pipe)?,
            &tl,
            pixel_rows(test, pipe)?,
            &sl,
            classes,
            cfg,
            device,
        )?);
    }
    Ok(out)
}
