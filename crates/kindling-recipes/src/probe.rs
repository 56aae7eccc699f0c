//! `kindling probe`: how much a frozen encoder's embeddings already know about a task. The
//! backbone runs once over every example (eval mode, no gradients), and a multinomial logistic
//! regression is trained on the standardised embeddings; its L2 strength is chosen on the
//! validation split and its test accuracy reported. The standard linear evaluation of
//! self-supervised learning (SimCLR, solo-learn), here on text; the vision encoders reuse it.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use kindling_core::Mode;
use kindling_data::tokenizer as tok;
use kindling_models::bert::Pooling;

use crate::finetune::{
    accuracy_and_macro_f1, format_confusion, load_task, Classifier, Encoded, FinetuneRecipe,
};
use crate::run::device;
use crate::RecipeError;

/// What a probe reports.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub validation_accuracy: f64,
    pub l2: f64,
    pub dims: usize,
    pub train_rows: usize,
    pub test_majority: f64,
    pub embed_secs: f64,
    pub fit_secs: f64,
}

/// Pooled hidden states of every example of `data`, in its order: the masked mean over tokens,
/// or the raw `[CLS]` vector.
pub fn embeddings(
    obj: &Classifier,
    data: &Encoded,
    pooling: Pooling,
    batch_size: usize,
    pad: u32,
) -> Result<Vec<Vec<f32>>, RecipeError> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(data.ids[i].len()));
    let mut out = vec![Vec::new(); data.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let b = crate::finetune::make_batch(data, chunk, pad, 0, 0);
        let (ids, types, mask) = obj.inputs(&b)?;
        let hidden = obj
            .model
            .hidden_states(&ids, types.as_ref(), &mask, Mode::Eval)?;
        let h = hidden.dim(1)?;
        let hidden = hidden.reshape((b.batch_size, b.seq_len, h))?;
        let pooled = pooling.apply(&hidden, &mask)?;
        for (row, &i) in pooled.to_vec2::<f32>()?.into_iter().zip(chunk) {
            out[i] = row;
        }
    }
    Ok(out)
}

/// Standardises columns with the mean and standard deviation of `train`.
pub(crate) fn standardise(train: &[Vec<f32>], sets: &mut [&mut Vec<Vec<f32>>]) {
    let d = train.first().map_or(0, Vec::len);
    let n = train.len().max(1) as f64;
    let mut mean = vec![0f64; d];
    let mut sq = vec![0f64; d];
    for r in train {
        for j in 0..d {
            mean[j] += r[j] as f64;
            sq[j] += (r[j] as f64).powi(2);
        }
    }
    let (mean, std): (Vec<f64>, Vec<f64>) = (0..d)
        .map(|j| {
            let m = mean[j] / n;
            (m, (sq[j] / n - m * m).max(0.0).sqrt().max(1e-6))
        })
        .unzip();
    for set in sets.iter_mut() {
        for r in set.iter_mut() {
            for j in 0..d {
                r[j] = ((r[j] as f64 - mean[j]) / std[j]) as f32;
            }
        }
    }
}

fn matrix(rows: &[Vec<f32>], device: &Device) -> candle_core::Result<Tensor> {
    let d = rows.first().map_or(0, Vec::len);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), d), device)
}

/// A multinomial logistic regression `softmax(x W + b)`, trained full-batch with Adam on
/// cross-entropy + `l2 / 2 * |W|^2`.
pub struct Logistic {
    pub w: Var,
    pub b: Var,
}

impl Logistic {
    pub fn fit(
        x: &Tensor,
        y: &Tensor,
        classes: usize,
        l2: f64,
        steps: usize,
        lr: f64,
    ) -> candle_core::Result<Self> {
        let d = x.dim(1)?;
        let w = Var::zeros((d, classes), DType::F32, x.device())?;
        let b = Var::zeros(classes, DType::F32, x.device())?;
        let mut opt = AdamW::new(
            vec![w.clone(), b.clone()],
            ParamsAdamW {
                lr,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?;
        let model = Logistic { w, b };
        for _ in 0..steps {
            let logits = model.logits(x)?;
            let loss = (candle_nn::loss::cross_entropy(&logits, y)?
                + (model.w.as_tensor().sqr()?.sum_all()? * (l2 / 2.0))?)?;
            opt.backward_step(&loss)?;
        }
        Ok(model)
    }

    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(self.w.as_tensor())?
            .broadcast_add(self.b.as_tensor())
    }

    pub fn predict(&self, x: &Tensor) -> candle_core::Result<Vec<u32>> {
        self.logits(x)?.argmax(D::Minus1)?.to_vec1::<u32>()
    }
}

fn confusion(labels: &[u32], pred: &[u32], classes: usize) -> Vec<Vec<f64>> {
    let mut cm = vec![vec![0.0; classes]; classes];
    for (&t, &p) in labels.iter().zip(pred) {
        cm[t as usize][p as usize] += 1.0;
    }
    cm
}

/// Runs the probe of `recipe` (its `[model]`, `[data]` and `[probe]` sections).
pub fn probe(recipe: &FinetuneRecipe) -> Result<ProbeReport, RecipeError> {
    let device = device(&recipe.header.device)?;
    let p = &recipe.probe;
    if recipe.data.problem_type != crate::finetune::ProblemType::SingleLabelClassification {
        return Err(RecipeError::Invalid {
            key: "data.problem_type".into(),
            msg: format!(
                "`{}`: the linear probe is a single-label classifier; fine-tune \
                 (`kindling finetune`) for multi-label and regression tasks",
                recipe.data.problem_type.hf_name()
            ),
        });
    }
    let tokenizer = tok::load(&recipe.model.path)?;
    let task = load_task(recipe, &tokenizer)?;
    let classes = task.labels.len();
    let (obj, _) = Classifier::build(recipe, task.labels.clone(), &device)?;
    let started = Instant::now();
    let bs = recipe.header.train.eval_batch_size;
    let embed = |data: &Encoded| embeddings(&obj, data, p.pooling, bs, task.pad_id);
    let mut train = embed(&task.train)?;
    let mut validation = embed(&task.validation)?;
    let mut test = embed(&task.test)?;
    let embed_secs = started.elapsed().as_secs_f64();
    let reference = train.clone();
    standardise(&reference, &mut [&mut train, &mut validation, &mut test]);
    let started = Instant::now();
    let x = matrix(&train, &device)?;
    let y = Tensor::from_slice(&task.train.labels, task.train.len(), &device)?;
    let xv = matrix(&validation, &device)?;
    let xt = matrix(&test, &device)?;
    let mut best: Option<(f64, f64, Logistic)> = None;
    for &l2 in &p.l2 {
        let model = Logistic::fit(&x, &y, classes, l2, p.steps, p.lr)?;
        // Without a validation split, the training accuracy decides.
        let (acc, _) = if validation.is_empty() {
            accuracy_and_macro_f1(&confusion(&task.train.labels, &model.predict(&x)?, classes))
        } else {
            accuracy_and_macro_f1(&confusion(
                &task.validation.labels,
                &model.predict(&xv)?,
                classes,
            ))
        };
        eprintln!("probe: l2 {l2:e}: validation accuracy {acc:.4}");
        if best.as_ref().is_none_or(|(a, _, _)| acc > *a) {
            best = Some((acc, l2, model));
        }
    }
    let (validation_accuracy, l2, model) = best.ok_or_else(|| RecipeError::Invalid {
        key: "probe.l2".into(),
        msg: "empty: name at least one L2 strength".into(),
    })?;
    let cm = confusion(&task.test.labels, &model.predict(&xt)?, classes);
    let (accuracy, macro_f1) = accuracy_and_macro_f1(&cm);
    let counts: Vec<Vec<u64>> = cm
        .iter()
        .map(|r| r.iter().map(|&v| v as u64).collect())
        .collect();
    eprint!("{}", format_confusion(&task.labels, &counts));
    Ok(ProbeReport {
        accuracy,
        macro_f1,
        validation_accuracy,
        l2,
        dims: x.dim(1)?,
        train_rows: task.train.len(),
        test_majority: task.test.majority_fraction(classes),
        embed_secs,
        fit_secs: started.elapsed().as_secs_f64(),
    })
}
