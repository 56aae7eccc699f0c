//! The classifier: the encoder and a classification (or regression) head, its loss by problem type, and its metrics (accuracy, macro-F1, MCC and the confusion matrix; micro/macro-F1 and exact match; MSE, Pearson and Spearman).

#[allow(unused_imports)]
use super::*;

/// The loss by problem type, as HF's `*ForSequenceClassification` computes it: cross-entropy
/// over classes (single-label), binary cross-entropy on each class's logit (multi-label),
/// mean squared error of the one output (regression). In eval, single-label accuracy and the
/// confusion matrix are fractions of the eval set (the trainer's weighted average over batches
/// sums them), from which `finish_eval` derives macro-F1 and MCC; the other problem types keep
/// every row's outputs until `finish_eval` (correlations and F1 over the whole set are not
/// averages of batches').
pub struct Classifier {
    pub model: SequenceClassifier,
    pub varmap: VarMap,
    pub config: EncoderConfig,
    pub labels: LabelSet,
    pub problem: ProblemType,
    /// Multi-label: a class is predicted when its probability is above this.
    pub threshold: f64,
    pub(super) device: Device,
    /// The confusion matrix (rows: true class, columns: predicted) of the last evaluation, as
    /// fractions; `finish_eval` moves it here from the metrics.
    pub(super) last_confusion: Mutex<Option<Vec<Vec<f64>>>>,
    /// Multi-label and regression: (outputs, targets) of every row evaluated since the last
    /// `finish_eval`, `width` floats each.
    pub(super) eval_rows: Mutex<(Vec<f32>, Vec<f32>)>,
}

impl Classifier {
    /// The model for `recipe`, from the folder's weights or (`init = "random"`) its shape only.
    /// Everything starts from HF's seeded initialisation; pretrained tensors then overwrite it.
    pub fn build(
        recipe: &FinetuneRecipe,
        labels: LabelSet,
        device: &Device,
    ) -> Result<(Self, Option<import::KeyReport>), RecipeError> {
        let m = &recipe.model;
        let mut config = import::read_encoder_config(&m.path)?;
        config.set_dropout(m.hidden_dropout_prob, m.attention_probs_dropout_prob);
        config.set_kernels(recipe.header.kernels);
        config.set_unpad(recipe.header.unpad);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = SequenceClassifier::load(
            vb,
            &config,
            labels.len(),
            m.pooling,
            m.classifier_dropout.unwrap_or(config.hidden_dropout()),
        )?;
        config.init(&varmap, recipe.header.seed)?;
        let report = match m.init {
            Init::Random => None,
            Init::Pretrained => {
                let (path, tensors) = import::read_weights(&m.path, device)?;
                let report = import::copy_tensors(&varmap, &tensors, &path)?;
                let fresh = |n: &str| {
                    SequenceClassifier::is_head_tensor(&config, n)
                        || m.allow_missing.iter().any(|a| a == n)
                };
                let bad: Vec<&String> = report.missing.iter().filter(|n| !fresh(n)).collect();
                if !bad.is_empty() {
                    return Err(RecipeError::Run {
                        path,
                        msg: format!(
                            "the backbone's tensors {:?} are missing (a BERT/RoBERTa folder \
                             whose names do not match?); list them in model.allow_missing to \
                             train them from scratch",
                            &bad[..bad.len().min(5)]
                        ),
                    });
                }
                Some(report)
            }
        };
        Ok((
            Classifier {
                model,
                varmap,
                config,
                labels,
                problem: recipe.data.problem_type,
                threshold: recipe.data.threshold,
                device: device.clone(),
                last_confusion: Mutex::new(None),
                eval_rows: Mutex::new((Vec::new(), Vec::new())),
            },
            report,
        ))
    }

    pub fn param_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// A batch's ids, segment ids (pairs, on an encoder with token types) and mask, on the
    /// device.
    pub fn inputs(&self, b: &ClsBatch) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)> {
        let shape = (b.batch_size, b.seq_len);
        let ids = Tensor::from_slice(&b.input_ids, shape, &self.device)?;
        let types = match &b.token_type_ids {
            Some(t) if self.config.uses_token_types() => {
                Some(Tensor::from_slice(t, shape, &self.device)?)
            }
            _ => None,
        };
        let mask = Tensor::from_slice(&b.attention_mask, shape, &self.device)?;
        Ok((ids, types, mask))
    }

    pub fn logits(&self, b: &ClsBatch, mode: Mode) -> candle_core::Result<Tensor> {
        let (ids, types, mask) = self.inputs(b)?;
        // Mixed precision: the loss in f32, as autocast (a no-op in f32).
        self.model
            .forward_t(&ids, types.as_ref(), &mask, mode)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(DType::F32)
    }

    /// The layer-wise lr multiplier of a parameter (see `FtModel::layerwise_lr_decay`).
    pub fn lr_scale(&self, name: &str, decay: f64) -> f64 {
        let layers = self.config.shape().1 as i32;
        let encoder = name
            .strip_prefix(self.config.prefix())
            .and_then(|n| n.strip_prefix('.'))
            .unwrap_or_default();
        // BERT's `encoder.layer.N.`, ModernBERT's `layers.N.`.
        let layer = encoder
            .strip_prefix("encoder.layer.")
            .or_else(|| encoder.strip_prefix("layers."));
        let depth = if encoder.starts_with("embeddings.") {
            0
        } else if let Some(rest) = layer {
            1 + rest
                .split('.')
                .next()
                .and_then(|i| i.parse::<i32>().ok())
                .unwrap_or(0)
        } else {
            layers + 1
        };
        decay.powi(layers + 1 - depth)
    }

    /// The confusion matrix of the last evaluation, in counts of `n` examples.
    pub fn confusion_counts(&self, n: usize) -> Option<Vec<Vec<u64>>> {
        self.last_confusion
            .lock()
            .expect("lock")
            .as_ref()
            .map(|cm| {
                cm.iter()
                    .map(|r| r.iter().map(|f| (f * n as f64).round() as u64).collect())
                    .collect()
            })
    }
}

impl Objective for Classifier {
    type Batch = ClsBatch;

    fn step(&self, b: &ClsBatch, mode: Mode) -> candle_core::Result<StepOutput> {
        let logits = self.logits(b, mode)?;
        let mut metrics = BTreeMap::new();
        let n = b.batch_size;
        let loss = match self.problem {
            ProblemType::SingleLabelClassification => {
                let labels = Tensor::from_slice(&b.labels, n, &self.device)?;
                let loss = kindling_models::ops::cross_entropy(&logits, &labels)?;
                if !mode.is_train() {
                    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                    let c = self.labels.len();
                    let mut cm = vec![0usize; c * c];
                    for (&t, &p) in b.labels.iter().zip(&pred) {
                        cm[t as usize * c + p as usize] += 1;
                    }
                    let hits: usize = (0..c).map(|i| cm[i * c + i]).sum();
                    metrics.insert("accuracy".into(), hits as f64 / n as f64);
                    for (k, &v) in cm.iter().enumerate() {
                        metrics.insert(format!("cm.{}.{}", k / c, k % c), v as f64 / n as f64);
                    }
                }
                loss
            }
            ProblemType::MultiLabelClassification | ProblemType::Regression => {
                let targets = Tensor::from_slice(&b.values, logits.shape(), &self.device)?;
                let loss = if self.problem == ProblemType::Regression {
                    (&logits - &targets)?.sqr()?.mean_all()?
                } else {
                    binary_cross_entropy_with_logits(&logits, &targets)?
                };
                if !mode.is_train() {
                    let mut rows = self.eval_rows.lock().expect("eval rows lock");
                    rows.0.extend(logits.flatten_all()?.to_vec1::<f32>()?);
                    rows.1.extend_from_slice(&b.values);
                }
                loss
            }
        };
        Ok(StepOutput {
            loss,
            weight: n as f64,
            units: n,
            metrics,
        })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn finish_eval(&self, m: &mut BTreeMap<String, f64>) {
        match self.problem {
            ProblemType::SingleLabelClassification => self.finish_single_label(m),
            ProblemType::MultiLabelClassification | ProblemType::Regression => {
                let (outputs, targets) = std::mem::take(&mut *self.eval_rows.lock().expect("lock"));
                m.extend(self.scores(&outputs, &targets));
            }
        }
    }
}

impl Classifier {
    fn finish_single_label(&self, m: &mut BTreeMap<String, f64>) {
        let c = self.labels.len();
        let mut cm = vec![vec![0.0; c]; c];
        let keys: Vec<String> = m.keys().filter(|k| k.starts_with("cm.")).cloned().collect();
        if keys.is_empty() {
            return;
        }
        for k in keys {
            let v = m.remove(&k).unwrap_or(0.0);
            let mut parts = k[3..].split('.').map(|s| s.parse::<usize>().unwrap_or(0));
            let (i, j) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            cm[i][j] = v;
        }
        let (_, f1) = accuracy_and_macro_f1(&cm);
        m.insert("macro_f1".into(), f1);
        if c == 2 {
            // Binary: the F1 of the second class (scikit-learn's and GLUE's `pos_label=1`).
            let (tp, fp, fn_) = (cm[1][1], cm[0][1], cm[1][0]);
            let f = if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fn_)
            };
            m.insert("f1".into(), f);
        }
        m.insert("mcc".into(), crate::metrics::matthews_corrcoef(&cm));
        *self.last_confusion.lock().expect("lock") = Some(cm);
    }

    /// Multi-label and regression scores of whole-set `outputs` (logits) against `targets`.
    pub fn scores(&self, outputs: &[f32], targets: &[f32]) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        if outputs.is_empty() {
            return m;
        }
        match self.problem {
            ProblemType::Regression => {
                let (p, t): (Vec<f64>, Vec<f64>) = outputs
                    .iter()
                    .zip(targets)
                    .map(|(&p, &t)| (p as f64, t as f64))
                    .unzip();
                let mse =
                    p.iter().zip(&t).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / p.len() as f64;
                m.insert("mse".into(), mse);
                m.insert("pearson".into(), crate::metrics::pearson(&p, &t));
                m.insert("spearman".into(), crate::metrics::spearman(&p, &t));
            }
            _ => {
                // p > threshold  <=>  logit > ln(threshold / (1 - threshold)).
                let cut = (self.threshold / (1.0 - self.threshold)).ln() as f32;
                let pred: Vec<bool> = outputs.iter().map(|&l| l > cut).collect();
                let gold: Vec<bool> = targets.iter().map(|&t| t > 0.5).collect();
                let s = crate::metrics::multi_label_scores(&pred, &gold, self.labels.len());
                m.insert("micro_f1".into(), s.micro_f1);
                m.insert("macro_f1".into(), s.macro_f1);
                m.insert("exact_match".into(), s.exact_match);
            }
        }
        m
    }
}

/// Mean over every element of `-(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))`, in the
/// stable form PyTorch's `BCEWithLogitsLoss` uses: `max(x, 0) - x y + log(1 + exp(-|x|))`.
pub fn binary_cross_entropy_with_logits(
    logits: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((logits.relu()? - (logits * targets)?)? + softplus)?.mean_all()
}
