//! Fine-tuning data: the labelled table read, split and encoded, and the loader (seeded order, optional length grouping).

#[allow(unused_imports)]
use super::*;
use kindling_data::read_table;

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

/// Token ids (truncated, with the tokenizer's specials), segment ids for pairs, and targets.
#[derive(Default)]
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    /// Segment ids of sentence pairs (0 for A, 1 for B, as the tokenizer's pair encoding gives
    /// them); empty for single texts.
    pub type_ids: Vec<Vec<u32>>,
    /// Class indices (single-label classification; empty otherwise).
    pub labels: Vec<u32>,
    /// `width` floats per example: the score (regression) or the multi-hot classes
    /// (multi-label); empty for single-label classification.
    pub values: Vec<f32>,
    pub width: usize,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// The fraction of examples in the most frequent class (single-label; 0 otherwise).
    pub fn majority_fraction(&self, classes: usize) -> f64 {
        if self.labels.is_empty() {
            return 0.0;
        }
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
    let (text_columns, pair) = d.columns();
    let spec = TableSpec {
        path: d.path.clone(),
        format: d.format.clone(),
        text_columns,
        label_column: d.label_column.clone(),
        split_column: d.split_column.clone(),
        pair,
    };
    let mut skipped = Skipped::default();
    let mut rows = match &d.matching {
        Some(m) => matching_rows(d, m, recipe.header.seed, &mut skipped)?,
        None => read_examples_with(&spec, d.on_invalid, &mut skipped)?,
    };
    let hashed = |e: &Example, salt: u64| {
        let h = match &e.text_pair {
            Some(b) => hash_str(&e.text) ^ rng::mix64(hash_str(b)),
            None => hash_str(&e.text),
        };
        (rng::mix64(h ^ salt) >> 11) as f64 / (1u64 << 53) as f64
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
    let targets = Targets::new(d);
    if d.problem_type == ProblemType::Regression {
        // A score that is not a number: skipped or an error, as a missing label is.
        let mut numeric = |e: &Example| match targets.score(e) {
            Ok(_) => true,
            Err(why) if d.on_invalid == OnInvalid::Skip => {
                skipped.push(e.line, why);
                false
            }
            Err(_) => true,
        };
        train.retain(&mut numeric);
        validation.retain(&mut numeric);
        test.retain(&mut numeric);
    }
    let labels = match (&d.labels, d.problem_type) {
        (_, ProblemType::Regression) => LabelSet {
            names: vec!["LABEL_0".into()],
        },
        (Some(names), _) => LabelSet {
            names: names.clone(),
        },
        (None, _) => targets.infer(&train),
    };
    if d.on_invalid == OnInvalid::Skip && d.problem_type != ProblemType::Regression {
        // A class outside the set: one the recipe's data.labels lacks, or (inferred) one no
        // training row has.
        let mut known = |e: &Example| match targets.unknown_class(e, &labels) {
            None => true,
            Some(c) => {
                skipped.push(e.line, format!("unknown class `{c}`"));
                false
            }
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
    if labels.len() < 2 && d.problem_type != ProblemType::Regression {
        return Err(RecipeError::Invalid {
            key: "data.labels".into(),
            msg: format!(
                "{:?}: a classifier needs at least two classes",
                labels.names
            ),
        });
    }
    let specials = tok::special_tokens(tokenizer)?;
    let text = TextEncoder::new(tokenizer, d.max_length)?;
    let encode = |rows: &[Example]| -> Result<Encoded, RecipeError> {
        let encoded = rows
            .par_iter()
            .map(|e| {
                text.encode(&e.text, e.text_pair.as_deref())
                    .map_err(|m| targets.row_err(e, m))
            })
            .collect::<Result<Vec<_>, RecipeError>>()?;
        let (ids, types): (Vec<Vec<u32>>, Vec<Option<Vec<u32>>>) = encoded.into_iter().unzip();
        let type_ids: Vec<Vec<u32>> = types.into_iter().flatten().collect();
        let mut out = Encoded {
            ids,
            type_ids,
            ..Encoded::default()
        };
        targets.encode(rows, &labels, &mut out)?;
        Ok(out)
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

/// The examples of a `[data.matching]` task: each row's (a, b) labelled `1`, and `negatives`
/// pairs of its `a` with the `b` of another row of its split (a different text), labelled `0`,
/// drawn from `(seed, line)`. A row missing either cell is invalid (`data.on_invalid`).
fn matching_rows(
    d: &FtData,
    m: &Matching,
    seed: u64,
    skipped: &mut Skipped,
) -> Result<Vec<Example>, RecipeError> {
    use rand::Rng;
    let mut columns = vec![m.a.clone(), m.b.clone()];
    columns.extend(d.split_column.iter().cloned());
    let mut rows = Vec::new();
    for r in read_table(&d.path, d.format.as_deref(), &columns)? {
        let (a, b) = (r.cells[0].trim(), r.cells[1].trim());
        if a.is_empty() || b.is_empty() {
            let col = if a.is_empty() { &m.a } else { &m.b };
            let why = format!("no text in column `{col}`");
            if d.on_invalid == OnInvalid::Skip {
                skipped.push(r.line, why);
                continue;
            }
            return Err(RecipeError::Data(kindling_data::DataError::Row {
                path: d.path.clone(),
                line: r.line,
                msg: why,
            }));
        }
        let split = r.cells.get(2).map(|s| s.trim().to_string());
        rows.push((r.line, a.to_string(), b.to_string(), split));
    }
    let mut by_split: BTreeMap<Option<String>, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_split.entry(r.3.clone()).or_default().push(i);
    }
    let mut out = Vec::with_capacity(rows.len() * (1 + m.negatives));
    for (i, (line, a, b, split)) in rows.iter().enumerate() {
        let example = |text_pair: &str, label: &str| Example {
            text: a.clone(),
            text_pair: Some(text_pair.to_string()),
            label: label.into(),
            split: split.clone(),
            line: *line,
        };
        out.push(example(b, "1"));
        let same = &by_split[split];
        let mut r = rng::rng(&[domain::SPLIT + 2, seed, *line]);
        let mut drawn = 0;
        // A split of one distinct text has no negative to give; 64 tries per negative.
        for _ in 0..64 * m.negatives {
            if drawn == m.negatives {
                break;
            }
            let j = same[r.random_range(0..same.len())];
            if j != i && rows[j].2 != *b {
                out.push(example(&rows[j].2, "0"));
                drawn += 1;
            }
        }
    }
    Ok(out)
}

/// Texts and pairs to token ids as HF's tokenizer call does: `tokenizer(a, truncation=True,
/// max_length=L)` for one text, `tokenizer(a, b, truncation="longest_first", max_length=L)`
/// for a pair (the tokenizer's own pair template: `[CLS] a [SEP] b [SEP]` with segment ids 0
/// and 1 for BERT, `<s> a </s></s> b </s>` for RoBERTa).
pub struct TextEncoder {
    single: Tokenizer,
    pair: Tokenizer,
    max_length: usize,
    sep: u32,
}

impl TextEncoder {
    pub fn new(tokenizer: &Tokenizer, max_length: usize) -> Result<Self, RecipeError> {
        let sep = tok::special_tokens(tokenizer)?.sep;
        let mut pair = tokenizer.clone();
        pair.with_padding(None)
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length,
                strategy: tokenizers::TruncationStrategy::LongestFirst,
                stride: 0,
                direction: tokenizers::TruncationDirection::Right,
            }))
            .map_err(|e| RecipeError::Invalid {
                key: "data.max_length".into(),
                msg: format!("{max_length}: the tokenizer refuses it: {e}"),
            })?;
        Ok(TextEncoder {
            single: tokenizer.clone(),
            pair,
            max_length,
            sep,
        })
    }

    /// The ids of `a` (and `b`), and the segment ids of a pair.
    pub fn encode(&self, a: &str, b: Option<&str>) -> Result<(Vec<u32>, Option<Vec<u32>>), String> {
        match b {
            Some(b) => {
                let enc = self
                    .pair
                    .encode((a, b), true)
                    .map_err(|err| format!("cannot tokenise: {err}"))?;
                if enc.len() > self.max_length {
                    return Err(format!(
                        "the pair's special tokens alone exceed data.max_length {}",
                        self.max_length
                    ));
                }
                Ok((enc.get_ids().to_vec(), Some(enc.get_type_ids().to_vec())))
            }
            None => {
                // Truncated by hand (the whole text tokenised, then cut and closed with the
                // separator): the same ids as the tokenizer's truncation for one text.
                let enc = self
                    .single
                    .encode(a, true)
                    .map_err(|err| format!("cannot tokenise: {err}"))?;
                let mut ids = enc.get_ids().to_vec();
                if ids.len() > self.max_length {
                    ids.truncate(self.max_length - 1);
                    ids.push(self.sep);
                }
                Ok((ids, None))
            }
        }
    }
}

/// How a row's label cell becomes its target, by problem type.
struct Targets<'a> {
    data: &'a FtData,
}

impl<'a> Targets<'a> {
    fn new(data: &'a FtData) -> Self {
        Targets { data }
    }

    fn row_err(&self, e: &Example, msg: String) -> RecipeError {
        RecipeError::Data(kindling_data::DataError::Row {
            path: self.data.path.clone(),
            line: e.line,
            msg,
        })
    }

    /// The classes a multi-label cell names (`a|b`), trimmed, empty parts dropped.
    fn classes_of<'e>(&self, e: &'e Example) -> Vec<&'e str> {
        e.label
            .split(self.data.label_separator.as_str())
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    fn score(&self, e: &Example) -> Result<f32, String> {
        match e.label.trim().parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(format!(
                "label `{}` in column `{}` is not a number (problem_type = \"regression\")",
                e.label, self.data.label_column
            )),
        }
    }

    /// The classes of the training rows, as [`LabelSet::infer`] orders them.
    fn infer(&self, train: &[Example]) -> LabelSet {
        match self.data.problem_type {
            ProblemType::MultiLabelClassification => {
                let parts: Vec<Example> = train
                    .iter()
                    .flat_map(|e| {
                        self.classes_of(e).into_iter().map(|c| Example {
                            label: c.to_string(),
                            ..e.clone()
                        })
                    })
                    .collect();
                LabelSet::infer(&parts)
            }
            _ => LabelSet::infer(train),
        }
    }

    /// A class of `e` outside `labels`, if any.
    fn unknown_class(&self, e: &Example, labels: &LabelSet) -> Option<String> {
        match self.data.problem_type {
            ProblemType::MultiLabelClassification => self
                .classes_of(e)
                .into_iter()
                .find(|c| !labels.names.iter().any(|n| n == c))
                .map(str::to_string),
            _ => (!labels.names.contains(&e.label)).then(|| e.label.clone()),
        }
    }

    fn encode(
        &self,
        rows: &[Example],
        labels: &LabelSet,
        out: &mut Encoded,
    ) -> Result<(), RecipeError> {
        match self.data.problem_type {
            ProblemType::SingleLabelClassification => {
                out.labels = labels.encode(rows, &self.data.path)?;
                out.width = 0;
            }
            ProblemType::Regression => {
                out.width = 1;
                out.values = rows
                    .iter()
                    .map(|e| self.score(e).map_err(|m| self.row_err(e, m)))
                    .collect::<Result<_, _>>()?;
            }
            ProblemType::MultiLabelClassification => {
                let c = labels.len();
                out.width = c;
                out.values = vec![0.0; rows.len() * c];
                for (i, e) in rows.iter().enumerate() {
                    for class in self.classes_of(e) {
                        let k = labels
                            .names
                            .iter()
                            .position(|n| n == class)
                            .ok_or_else(|| {
                                self.row_err(
                                    e,
                                    format!(
                                        "unknown class `{class}` (the classes are {:?})",
                                        labels.names
                                    ),
                                )
                            })?;
                        out.values[i * c + k] = 1.0;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A padded batch: `(batch, seq)` ids, segment ids (pairs) and attention mask, the targets,
/// and where it came from.
#[derive(Debug, Clone)]
pub struct ClsBatch {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Option<Vec<u32>>,
    pub attention_mask: Vec<u32>,
    /// Class indices (single-label classification).
    pub labels: Vec<u32>,
    /// `(batch, width)` targets (regression scores, multi-hot classes).
    pub values: Vec<f32>,
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
    let mut types = (!data.type_ids.is_empty()).then(|| Vec::with_capacity(idx.len() * seq_len));
    for &i in idx {
        let ids = &data.ids[i];
        input_ids.extend_from_slice(ids);
        input_ids.extend(std::iter::repeat_n(pad, seq_len - ids.len()));
        attention_mask.extend(std::iter::repeat_n(1, ids.len()));
        attention_mask.extend(std::iter::repeat_n(0, seq_len - ids.len()));
        if let Some(t) = types.as_mut() {
            t.extend_from_slice(&data.type_ids[i]);
            t.extend(std::iter::repeat_n(0, seq_len - ids.len()));
        }
    }
    let w = data.width;
    ClsBatch {
        input_ids,
        token_type_ids: types,
        attention_mask,
        labels: if data.labels.is_empty() {
            Vec::new()
        } else {
            idx.iter().map(|&i| data.labels[i]).collect()
        },
        values: idx
            .iter()
            .flat_map(|&i| data.values[i * w..(i + 1) * w].iter().copied())
            .collect(),
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
