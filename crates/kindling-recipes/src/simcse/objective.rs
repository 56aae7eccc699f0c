//! The SimCSE objective: the encoder, pooling, the loss, GradCache.

#[allow(unused_imports)]
use super::*;

/// The encoder being trained, the loss, and (in eval) the retrieval embeddings collected batch
/// by batch.
pub struct Simcse {
    pub model: Encoder,
    pub varmap: VarMap,
    pub config: EncoderConfig,
    pub pooling: Pooling,
    pub temperature: f64,
    pub grad_cache: GradCache,
    pub pad: u32,
    pub ks: Vec<usize>,
    pub(super) device: Device,
    /// (batch index, query embeddings, doc embeddings) of the evaluation under way.
    pub(super) collected: Mutex<Vec<(usize, Vec<Vec<f32>>, Vec<Vec<f32>>)>>,
    /// The same for the STS pairs (first and second sentences).
    pub(super) sts_collected: Mutex<Vec<(usize, Vec<Vec<f32>>, Vec<Vec<f32>>)>>,
    /// The STS pairs' gold scores, in row order (empty: no `[eval.sts]`).
    pub sts_gold: Vec<f64>,
    /// Whether the eval set holds a retrieval part (then the STS batches' loss has no weight).
    pub has_retrieval: bool,
    /// The data-parallel group (`None`: one process); training batches gather over it.
    pub group: Option<Arc<dyn Collective>>,
}

impl Simcse {
    /// The encoder of `recipe.model.path` (any BERT, RoBERTa or ModernBERT folder; a task
    /// model's prefix is dropped, so the export has base-model names as sentence-transformers
    /// saves them).
    pub fn build(recipe: &SimcseRecipe, pad: u32, device: &Device) -> Result<Self, RecipeError> {
        let m = &recipe.model;
        let (model, varmap) = Self::load_encoder(&m.path, device, None, &|config| {
            config.set_dropout(m.hidden_dropout_prob, m.attention_probs_dropout_prob);
            config.set_kernels(recipe.header.kernels);
            config.set_unpad(recipe.header.unpad);
        })?;
        let mut obj = Simcse::new(model, varmap, m.pooling, recipe.loss.temperature, pad);
        obj.grad_cache = recipe.grad_cache.clone();
        if let Some(r) = &recipe.eval.retrieval {
            obj.ks = r.k.clone();
        }
        Ok(obj)
    }

    /// The encoder of any folder as SimCSE embeds with it (for evaluation: the temperature
    /// plays no part); `random = Some(seed)`: the folder's shape only, initialised as HF does
    /// (the baseline a pretrained encoder must beat).
    pub fn from_folder(
        path: &Path,
        pooling: Pooling,
        pad: u32,
        random: Option<u64>,
        device: &Device,
    ) -> Result<Self, RecipeError> {
        let (model, varmap) = Self::load_encoder(path, device, random, &|_| {})?;
        Ok(Simcse::new(model, varmap, pooling, 0.05, pad))
    }

    /// The encoder of a folder and its variables, the config adjusted by `edit` first (and
    /// with `random`, the weights left at their seeded initialisation).
    fn load_encoder(
        path: &Path,
        device: &Device,
        random: Option<u64>,
        edit: &dyn Fn(&mut EncoderConfig),
    ) -> Result<(Encoder, VarMap), RecipeError> {
        let mut config = import::read_encoder_config(path)?;
        edit(&mut config);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Encoder::load(vb, &config)?;
        if let Some(seed) = random {
            config.init(&varmap, seed)?;
            return Ok((model, varmap));
        }
        let (path, tensors) = import::read_weights(path, device)?;
        // copy_tensors matches `bert.`-prefixed model names to plain file names; here the
        // model is plain and the file may carry the prefix (`bert.`, `roberta.`, `model.`).
        let prefix = format!("{}.", config.prefix());
        let tensors: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.strip_prefix(&prefix).map(String::from).unwrap_or(k), v))
            .collect();
        let report = import::copy_tensors(&varmap, &tensors, &path)?;
        if !report.missing.is_empty() {
            return Err(RecipeError::Run {
                path,
                msg: format!(
                    "the encoder's tensors {:?} are missing (not a folder of this config.json?)",
                    &report.missing[..report.missing.len().min(5)]
                ),
            });
        }
        Ok((model, varmap))
    }

    /// An objective around `model` (whose parameters live in `varmap`), without GradCache.
    pub fn new(
        model: impl Into<Encoder>,
        varmap: VarMap,
        pooling: Pooling,
        temperature: f64,
        pad: u32,
    ) -> Self {
        let model = model.into();
        let device = model.device();
        Simcse {
            config: model.config(),
            model,
            varmap,
            pooling,
            temperature,
            grad_cache: GradCache::default(),
            pad,
            ks: default_ks(),
            device,
            collected: Mutex::new(Vec::new()),
            sts_collected: Mutex::new(Vec::new()),
            sts_gold: Vec::new(),
            has_retrieval: false,
            group: None,
        }
    }

    /// Pooled embeddings `(rows, hidden)` of token-id rows, padded to their longest.
    pub fn embed(&self, rows: &[Vec<u32>], mode: Mode) -> candle_core::Result<Tensor> {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(self.pad, seq - r.len()));
            mask.extend(std::iter::repeat_n(1u32, r.len()));
            mask.extend(std::iter::repeat_n(0u32, seq - r.len()));
        }
        let ids = Tensor::from_vec(ids, (rows.len(), seq), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows.len(), seq), &self.device)?;
        let hidden = self
            .model
            .forward_t(&ids, Some(&mask), mode)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        // Mixed precision: pooling and the loss in f32, as autocast (a no-op in f32).
        let hidden = hidden
            .reshape((rows.len(), seq, self.config.shape().0))?
            .to_dtype(DType::F32)?;
        self.pooling.apply(&hidden, &mask)
    }

    /// The chunks of a batch and the mode of each: in training, chunk `c` draws its dropout
    /// from `(step seed, c)`, so both GradCache passes (and the plain path) see the same views.
    pub(super) fn chunks<'a>(&self, b: &'a SimcseBatch, mode: Mode) -> Vec<(&'a [Vec<u32>], Mode)> {
        b.rows
            .chunks(self.grad_cache.chunk_size)
            .enumerate()
            .map(|(c, rows)| {
                let m = match mode {
                    Mode::Train { seed } => Mode::Train {
                        seed: derive_seed(&[seed, c as u64]),
                    },
                    Mode::Eval => Mode::Eval,
                };
                (rows, m)
            })
            .collect()
    }

    /// InfoNCE of a batch: over the data-parallel group in training, this process's batch
    /// alone in eval (every rank evaluates the same batches).
    pub(super) fn loss(
        &self,
        reps: &Tensor,
        b: &SimcseBatch,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let group = self.group.as_ref().filter(|_| mode.is_train());
        info_nce_in_group(reps, b.n, &b.keys, self.temperature, group)
    }

    pub(super) fn output(&self, loss: Tensor, b: &SimcseBatch) -> StepOutput {
        StepOutput {
            loss,
            // The eval loss is the retrieval set's when there is one.
            weight: if b.sts && self.has_retrieval {
                0.0
            } else {
                b.n as f64
            },
            units: b.rows.iter().map(Vec::len).sum(),
            metrics: BTreeMap::new(),
        }
    }

    /// The scores of everything collected since the last call: retrieval (recall@k, MRR,
    /// nDCG@10 of each query's own document among all documents) and STS (Spearman and Pearson
    /// of the pairs' cosine against the gold scores).
    pub(super) fn collected_metrics(&self) -> BTreeMap<String, f64> {
        let (queries, docs) = Self::in_order(&self.collected);
        let mut m = BTreeMap::new();
        if !queries.is_empty() {
            m.extend(crate::metrics::retrieval_scores(&queries, &docs, &self.ks));
        }
        let (a, b) = Self::in_order(&self.sts_collected);
        if !a.is_empty() {
            m.extend(crate::metrics::sts_scores(&a, &b, &self.sts_gold));
        }
        m
    }

    /// The collected (anchor, positive) embeddings in row order; the collection is emptied.
    fn in_order(
        collected: &Mutex<Vec<(usize, Vec<Vec<f32>>, Vec<Vec<f32>>)>>,
    ) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let mut got = std::mem::take(&mut *collected.lock().expect("lock"));
        got.sort_by_key(|(i, _, _)| *i);
        let a: Vec<Vec<f32>> = got.iter().flat_map(|(_, q, _)| q.clone()).collect();
        let b: Vec<Vec<f32>> = got.into_iter().flat_map(|(_, _, d)| d).collect();
        (a, b)
    }
}

impl Objective for Simcse {
    type Batch = SimcseBatch;

    /// The plain path: every chunk's graph is kept until the trainer's backward pass.
    /// In eval (a retrieval batch: queries as anchors, their docs as positives) the embeddings
    /// are also kept for `finish_eval`.
    fn step(&self, b: &SimcseBatch, mode: Mode) -> candle_core::Result<StepOutput> {
        let parts = self
            .chunks(b, mode)
            .into_iter()
            .map(|(rows, m)| self.embed(rows, m))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let reps = Tensor::cat(&parts, 0)?;
        if !mode.is_train() {
            let q = reps.narrow(0, 0, b.n)?.to_vec2::<f32>()?;
            let d = reps.narrow(0, b.n, b.n)?.to_vec2::<f32>()?;
            let into = if b.sts {
                &self.sts_collected
            } else {
                &self.collected
            };
            into.lock()
                .expect("lock")
                .push((b.cursor_after.position as usize, q, d));
        }
        let loss = self.loss(&reps, b, mode)?;
        Ok(self.output(loss, b))
    }

    /// GradCache: embeddings without a graph, the loss's gradient with respect to them, then
    /// each chunk again with its graph, back-propagating its slice of that gradient.
    fn step_with_grads(
        &self,
        b: &SimcseBatch,
        mode: Mode,
    ) -> candle_core::Result<Option<(StepOutput, GradStore)>> {
        if !self.grad_cache.enabled || !mode.is_train() {
            return Ok(None);
        }
        let chunks = self.chunks(b, mode);
        let parts = chunks
            .iter()
            .map(|(rows, m)| self.embed(rows, *m).map(|t| t.detach()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let reps = Var::from_tensor(&Tensor::cat(&parts, 0)?)?;
        let loss = self.loss(reps.as_tensor(), b, mode)?;
        let d_reps = loss
            .backward()?
            .get(reps.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient for the embeddings".into()))?;
        // Only the parameters' gradients are kept, detached: a gradient candle returns still
        // references the graph it came from (so the chunk's activations), and keeping whole
        // GradStores would keep every chunk's activations alive, which is what GradCache avoids.
        let vars = self.varmap.all_vars();
        let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut offset = 0;
        for (rows, m) in chunks {
            let e = self.embed(rows, m)?;
            let g = d_reps.narrow(0, offset, rows.len())?;
            offset += rows.len();
            let grads = (e * g)?.sum_all()?.backward()?;
            for (v, sum) in vars.iter().zip(sums.iter_mut()) {
                if let Some(gv) = grads.get(v.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(prev) => (prev + gv)?.detach(),
                        None => gv.detach(),
                    });
                }
            }
        }
        let mut grads = GradStore::default();
        for (v, sum) in vars.iter().zip(sums) {
            if let Some(g) = sum {
                grads.insert(v.as_tensor(), g);
            }
        }
        Ok(Some((self.output(loss.detach(), b), grads)))
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn finish_eval(&self, m: &mut BTreeMap<String, f64>) {
        m.extend(self.collected_metrics());
    }
}
