//! The classifier: the encoder and a classification head, its loss and metrics (accuracy, macro-F1, the confusion matrix).

#[allow(unused_imports)]
use super::*;

/// Cross-entropy over classes; in eval, accuracy and the confusion matrix (as fractions of the
/// eval set, so the trainer's weighted average over batches sums them), from which
/// `finish_eval` derives macro-F1.
pub struct Classifier {
    pub model: SequenceClassifier,
    pub varmap: VarMap,
    pub config: EncoderConfig,
    pub labels: LabelSet,
    pub(super) device: Device,
    /// The confusion matrix (rows: true class, columns: predicted) of the last evaluation, as
    /// fractions; `finish_eval` moves it here from the metrics.
    pub(super) last_confusion: Mutex<Option<Vec<Vec<f64>>>>,
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
                device: device.clone(),
                last_confusion: Mutex::new(None),
            },
            report,
        ))
    }

    pub fn param_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    pub fn logits(&self, b: &ClsBatch, mode: Mode) -> candle_core::Result<Tensor> {
        let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &self.device)?;
        let mask = Tensor::from_slice(&b.attention_mask, (b.batch_size, b.seq_len), &self.device)?;
        // Mixed precision: the loss in f32, as autocast (a no-op in f32).
        self.model
            .forward_t(&ids, &mask, mode)
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
        let labels = Tensor::from_slice(&b.labels, b.labels.len(), &self.device)?;
        let loss = kindling_models::ops::cross_entropy(&logits, &labels)?;
        let mut metrics = BTreeMap::new();
        if !mode.is_train() {
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let c = self.labels.len();
            let mut cm = vec![0usize; c * c];
            for (&t, &p) in b.labels.iter().zip(&pred) {
                cm[t as usize * c + p as usize] += 1;
            }
            let n = b.labels.len() as f64;
            let hits: usize = (0..c).map(|i| cm[i * c + i]).sum();
            metrics.insert("accuracy".into(), hits as f64 / n);
            for (k, &v) in cm.iter().enumerate() {
                metrics.insert(format!("cm.{}.{}", k / c, k % c), v as f64 / n);
            }
        }
        Ok(StepOutput {
            loss,
            weight: b.labels.len() as f64,
            units: b.labels.len(),
            metrics,
        })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn finish_eval(&self, m: &mut BTreeMap<String, f64>) {
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
        m.insert("mcc".into(), crate::metrics::matthews_corrcoef(&cm));
        *self.last_confusion.lock().expect("lock") = Some(cm);
    }
}
