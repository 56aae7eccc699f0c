//! The masked-LM objective: a masked LM of any supported architecture (`BertForMaskedLM`, `RobertaForMaskedLM`, `ModernBertForMaskedLM`) scored by cross-entropy at the masked positions, with accuracy and perplexity.

#[allow(unused_imports)]
use super::*;

/// The masked-LM objective: a masked LM scored by cross-entropy at masked positions.
pub struct BertMlm {
    pub model: MaskedLm,
    pub varmap: VarMap,
    pub config: EncoderConfig,
    pub(super) device: Device,
}

impl BertMlm {
    /// A freshly initialised model (the architecture's HF initialisation, seeded).
    pub fn new(
        config: impl Into<EncoderConfig>,
        seed: u64,
        device: &Device,
    ) -> Result<Self, RecipeError> {
        let config = config.into();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = MaskedLm::load(vb, &config)?;
        config.init(&varmap, seed)?;
        Ok(BertMlm {
            model,
            varmap,
            config,
            device: device.clone(),
        })
    }

    /// Logits at the batch's labelled positions, (n_positions, vocab).
    pub fn logits(&self, batch: &MlmBatch, mode: Mode) -> candle_core::Result<Tensor> {
        let ids = Tensor::from_slice(
            &batch.input_ids,
            (batch.batch_size, batch.seq_len),
            &self.device,
        )?;
        let positions = Tensor::from_slice(&batch.positions, batch.positions.len(), &self.device)?;
        self.model
            .forward_t(&ids, None, Some(&positions), mode)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    pub fn param_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }
}

impl Objective for BertMlm {
    type Batch = MlmBatch;

    fn step(&self, batch: &MlmBatch, mode: Mode) -> candle_core::Result<StepOutput> {
        let logits = self.logits(batch, mode)?; // (m, vocab)
        let labels = Tensor::from_slice(&batch.labels, batch.labels.len(), &self.device)?;
        let loss = kindling_models::ops::cross_entropy(&logits, &labels)?;
        let mut metrics = BTreeMap::new();
        if !mode.is_train() {
            // Accuracy costs an argmax over the vocabulary: evaluation only.
            let hits = logits
                .argmax(D::Minus1)?
                .eq(&labels)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            metrics.insert("accuracy".into(), hits as f64 / batch.labels.len() as f64);
        }
        Ok(StepOutput {
            loss,
            weight: batch.labels.len() as f64,
            units: batch.n_tokens(),
            metrics,
        })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn train_flops(&self, batch: &MlmBatch) -> Option<f64> {
        Some(self.config.train_flops(
            batch.n_tokens(),
            batch.seq_len,
            batch.labels.len(),
            self.model.last_layer_at_rows(),
        ))
    }

    fn finish_eval(&self, m: &mut BTreeMap<String, f64>) {
        if let Some(l) = m.get("loss").copied() {
            m.insert("perplexity".into(), l.exp());
        }
    }
}
