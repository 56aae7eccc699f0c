//! Fine-tuning data: the labelled table read, split and encoded, and the loader (seeded order, optional length grouping).

#[allow(unused_imports)]
use super::*;

/// Tokenised, labelled splits.
pub struct TaskData {
    pub labels: LabelSet,
    pub train: Encoded,
    pub validation: Encoded,
    pub test: Encoded,
    pub pad_id: u32,
    /// Rows left out under `data.on_invalid = "skip"`.
    pub skipped: Skipped,
}

/// Token ids (truncated, with `[CLS]`/`[SEP]`) and class indices.
#[derive(Default)]
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// The fraction of examples in the most frequent class.
    pub fn majority_fraction(&self, classes: usize) -> f64 {
        let mut counts = vec![0usize; classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        *counts.iter().max().unwrap_or(&0) as f64 / self.len().max(1) as f64
    }
}

/// Reads, splits, labels and tokenises the recipe's table with `tokenizer`.
pub fn load_task(recipe: &FinetuneRecipe, tokenizer: &Tokenizer) -> Result<TaskData, RecipeError> {
    let d = &recipe.data;
    let spec = TableSpec {
        path: d.path.clone(),
        format: d.format.clone(),
        text_columns: d.text_columns.clone(),
        label_column: d.label_column.clone(),
        split_column: d.split_column.clone(),
    };
    let mut skipped = Skipped::default();
    let mut rows = read_examples_with(&spec, d.on_invalid, &mut skipped)?;
    let hashed = |e: &Example, salt: u64| {
        (rng::mix64(hash_str(&e.text) ^ salt) >> 11) as f64 / (1u64 << 53) as f64
    };
    let (mut train, mut test): (Vec<Example>, Vec<Example>) = match &d.split_column {
        Some(col) => {
            let known = [d.train_split.as_str(), d.test_split.as_str()];
            if d.on_invalid == OnInvalid::Skip {
                rows.retain(|e| {
                    let split = e.split.as_deref().unwrap_or("");
                    let ok = known.contains(&split);
                    if !ok {
                        skipped.push(e.line, format!("split `{split}` in column `{col}`"));
                    }
                    ok
                });
            }
            if let Some(e) = rows
                .iter()
                .find(|e| !known.contains(&e.split.as_deref().unwrap_or("")))
            {
                return Err(RecipeError::Data(kindling_data::DataError::Row {
                    path: d.path.clone(),
                    line: e.line,
                    msg: format!(
                        "split `{}` in column `{col}` is neither data.train_split `{}` nor \
                         data.test_split `{}`",
                        e.split.as_deref().unwrap_or(""),
                        d.train_split,
                        d.test_split
                    ),
                }));
            }
            rows.into_iter()
                .partition(|e| e.split.as_deref() == Some(d.train_split.as_str()))
        }
        None => rows
            .into_iter()
            .partition(|e| hashed(e, domain::SPLIT) >= d.test_fraction),
    };
    if d.max_train_examples > 0 && train.len() > d.max_train_examples {
        let mut r = rng::rng(&[domain::SPLIT, recipe.header.seed]);
        train.shuffle(&mut r);
        train.truncate(d.max_train_examples);
        train.sort_by_key(|e| e.line);
    }
    let (mut train, mut validation): (Vec<Example>, Vec<Example>) = train
        .into_iter()
        .partition(|e| hashed(e, domain::SPLIT + 1) >= d.validation_fraction);
    let labels = match &d.labels {
        Some(names) => LabelSet {
            names: names.clone(),
        },
        None => LabelSet::infer(&train),
    };
    if d.on_invalid == OnInvalid::Skip {
        // A class outside the set: one the recipe's data.labels lacks, or (inferred) one no
        // training row has.
        let mut known = |e: &Example| {
            let ok = labels.names.contains(&e.label);
            if !ok {
                skipped.push(e.line, format!("unknown class `{}`", e.label));
            }
            ok
        };
        train.retain(&mut known);
        validation.retain(&mut known);
        test.retain(&mut known);
    }
    if train.is_empty() || test.is_empty() {
        return Err(RecipeError::Invalid {
            key: "data".into(),
            msg: format!(
                "{}: {} training and {} test rows; both splits need rows",
                d.path.display(),
                train.len(),
                test.len()
            ),
        });
    }
    if labels.len() < 2 {
        return Err(RecipeError::Invalid {
            key: "data.labels".into(),
            msg: format!(
                "{:?}: a classifier needs at least two classes",
                labels.names
            ),
        });
    }
    let specials = tok::special_tokens(tokenizer)?;
    let encode = |rows: &[Example]| -> Result<Encoded, RecipeError> {
        let ids = rows
            .par_iter()
            .map(|e| {
                let enc = tokenizer.encode(e.text.as_str(), true).map_err(|err| {
                    RecipeError::Data(kindling_data::DataError::Row {
                        path: d.path.clone(),
                        line: e.line,
                        msg: format!("cannot tokenise: {err}"),
                    })
                })?;
                let mut ids = enc.get_ids().to_vec();
                if ids.len() > d.max_length {
                    ids.truncate(d.max_length - 1);
                    ids.push(specials.sep);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>, RecipeError>>()?;
        Ok(Encoded {
            ids,
            labels: labels.encode(rows, &d.path)?,
        })
    };
    Ok(TaskData {
        train: encode(&train)?,
        validation: encode(&validation)?,
        test: encode(&test)?,
        pad_id: specials.pad,
        labels,
        skipped,
    })
}

/// A padded batch: `(batch, seq)` ids and attention mask, class labels, and where it came from.
#[derive(Debug, Clone)]
pub struct ClsBatch {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub labels: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
    pub epoch: u64,
    pub index: usize,
}

/// Pads the examples `idx` of `data` to their longest.
pub fn make_batch(data: &Encoded, idx: &[usize], pad: u32, epoch: u64, index: usize) -> ClsBatch {
    let seq_len = idx.iter().map(|&i| data.ids[i].len()).max().unwrap_or(1);
    let mut input_ids = Vec::with_capacity(idx.len() * seq_len);
    let mut attention_mask = Vec::with_capacity(idx.len() * seq_len);
    for &i in idx {
        let ids = &data.ids[i];
        input_ids.extend_from_slice(ids);
        input_ids.extend(std::iter::repeat_n(pad, seq_len - ids.len()));
        attention_mask.extend(std::iter::repeat_n(1, ids.len()));
        attention_mask.extend(std::iter::repeat_n(0, seq_len - ids.len()));
    }
    ClsBatch {
        input_ids,
        attention_mask,
        labels: idx.iter().map(|&i| data.labels[i]).collect(),
        batch_size: idx.len(),
        seq_len,
        epoch,
        index,
    }
}

/// Evaluation batches in length order (less padding; the order does not change the metrics).
pub fn eval_batches(data: &Encoded, batch_size: usize, pad: u32) -> Vec<ClsBatch> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(data.ids[i].len()));
    order
        .chunks(batch_size.max(1))
        .enumerate()
        .map(|(k, c)| make_batch(data, c, pad, 0, k))
        .collect()
}

/// The batches of one epoch: a seeded permutation; with `lengths` (HF's `group_by_length`),
/// sorted by length inside mega-batches of 50 batches, so a batch pads to similar lengths while
/// the data order stays random at the scale of an epoch.
pub fn epoch_batches(
    n: usize,
    lengths: Option<&[usize]>,
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng::rng(&[domain::DATA_ORDER, seed, epoch]));
    let Some(lengths) = lengths else {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    let mut out = Vec::with_capacity(n.div_ceil(batch_size));
    for mega in order.chunks(batch_size * 50) {
        let mut mega = mega.to_vec();
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        out.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    out
}

/// Endless training batches, epoch after epoch; `(epoch, index)` is the resume cursor.
pub struct ClsLoader {
    pub(super) data: Arc<Encoded>,
    /// Set when batches group examples by length.
    pub(super) lengths: Option<Vec<usize>>,
    pub(super) batch_size: usize,
    pub(super) seed: u64,
    pub(super) pad: u32,
    pub(super) epoch: u64,
    pub(super) index: usize,
    pub(super) plan: Vec<Vec<usize>>,
}

impl ClsLoader {
    pub fn new(
        data: Arc<Encoded>,
        batch_size: usize,
        seed: u64,
        pad: u32,
        group_by_length: bool,
    ) -> Self {
        let lengths = group_by_length.then(|| data.ids.iter().map(Vec::len).collect());
        let mut l = ClsLoader {
            data,
            lengths,
            batch_size,
            seed,
            pad,
            epoch: 0,
            index: 0,
            plan: Vec::new(),
        };
        l.plan = l.plan_for(0);
        l
    }

    pub(super) fn plan_for(&self, epoch: u64) -> Vec<Vec<usize>> {
        epoch_batches(
            self.data.len(),
            self.lengths.as_deref(),
            self.batch_size,
            self.seed,
            epoch,
        )
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }

    /// Continues after batch `index` of `epoch` (the cursor a checkpoint saved).
    pub fn seek_after(&mut self, epoch: u64, index: usize) {
        self.epoch = epoch;
        self.plan = self.plan_for(epoch);
        self.index = index + 1;
    }
}

impl Iterator for ClsLoader {
    type Item = ClsBatch;
    fn next(&mut self) -> Option<ClsBatch> {
        if self.index == self.plan.len() {
            self.epoch += 1;
            self.index = 0;
            self.plan = self.plan_for(self.epoch);
        }
        let b = make_batch(
            &self.data,
            &self.plan[self.index],
            self.pad,
            self.epoch,
            self.index,
        );
        self.index += 1;
        Some(b)
    }
}
