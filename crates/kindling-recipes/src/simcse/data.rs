//! SimCSE's data: reading the texts or pairs, encoding them, and the loader (a seeded order of examples, duplicates kept apart by their text keys).

#[allow(unused_imports)]
use super::*;

/// One training example as token ids, with the hash of each text (equal hashes: equal texts).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub anchor: Vec<u32>,
    pub positive: Vec<u32>,
    pub negative: Option<Vec<u32>>,
    pub keys: [u64; 3],
}

/// The texts of the recipe's data: (anchor, positive, negative) per example, rows of a table
/// with an empty cell left out. Unsupervised, the positive is the anchor.
pub fn read_texts(recipe: &SimcseRecipe) -> Result<Vec<[Option<String>; 3]>, RecipeError> {
    let d = &recipe.data;
    let mut texts: Vec<[Option<String>; 3]> = match &d.table {
        None => Corpus::from_patterns(&d.corpus, Path::new("."))?
            .documents
            .iter()
            .flat_map(|doc| doc.sentences(d.min_words))
            .map(|s| [Some(s.clone()), Some(s), None])
            .collect(),
        Some(path) => {
            let mut columns: Vec<String> =
                [&d.anchor_column, &d.positive_column, &d.negative_column]
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect();
            let n = columns.len();
            columns.extend(d.split_column.iter().cloned());
            let rows = read_table(path, d.format.as_deref(), &columns)?;
            rows.into_iter()
                .filter(|r| d.split_column.is_none() || r.cells[n].trim() == d.split)
                .filter(|r| r.cells[..n].iter().all(|c| !c.trim().is_empty()))
                .map(|r| {
                    let c: Vec<String> =
                        r.cells[..n].iter().map(|s| s.trim().to_string()).collect();
                    let positive = c.get(1).cloned().unwrap_or_else(|| c[0].clone());
                    [Some(c[0].clone()), Some(positive), c.get(2).cloned()]
                })
                .collect()
        }
    };
    if d.max_examples > 0 && texts.len() > d.max_examples {
        texts.shuffle(&mut rng::rng(&[domain::SPLIT, recipe.header.seed]));
        texts.truncate(d.max_examples);
    }
    if texts.len() < recipe.header.train.batch_size {
        return Err(RecipeError::Invalid {
            key: "data".into(),
            msg: format!(
                "{} examples (rows with an empty cell are left out), fewer than one batch of {}",
                texts.len(),
                recipe.header.train.batch_size
            ),
        });
    }
    Ok(texts)
}

/// Token ids of `text`: `[CLS]` ... `[SEP]`, at most `max_length` (truncated, `[SEP]` kept).
pub fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    max_length: usize,
    sep: u32,
) -> Result<Vec<u32>, RecipeError> {
    let enc = tokenizer
        .encode(text, true)
        .map_err(|e| RecipeError::Invalid {
            key: "data".into(),
            msg: format!("cannot tokenise {text:?}: {e}"),
        })?;
    let mut ids = enc.get_ids().to_vec();
    if ids.len() > max_length {
        ids.truncate(max_length - 1);
        ids.push(sep);
    }
    Ok(ids)
}

/// Tokenises the examples in parallel.
pub fn encode_examples(
    texts: &[[Option<String>; 3]],
    tokenizer: &Tokenizer,
    max_length: usize,
) -> Result<Vec<Example>, RecipeError> {
    let sep = tok::special_tokens(tokenizer)?.sep;
    texts
        .par_iter()
        .map(|t| {
            let a = t[0].as_deref().unwrap_or_default();
            let p = t[1].as_deref().unwrap_or(a);
            let anchor = encode(tokenizer, a, max_length, sep)?;
            let positive = if p == a {
                anchor.clone()
            } else {
                encode(tokenizer, p, max_length, sep)?
            };
            let negative = t[2]
                .as_deref()
                .map(|n| encode(tokenizer, n, max_length, sep))
                .transpose()?;
            Ok(Example {
                anchor,
                positive,
                negative,
                keys: [
                    hash_str(a),
                    hash_str(p),
                    t[2].as_deref().map_or(0, hash_str),
                ],
            })
        })
        .collect()
}

/// One batch: the examples' token ids by role, their text hashes, and the cursor after it.
#[derive(Debug, Clone)]
pub struct SimcseBatch {
    /// Anchors, then positives, then (if any) hard negatives: one row per sentence.
    pub rows: Vec<Vec<u32>>,
    /// Examples in the batch (anchors).
    pub n: usize,
    /// Text hashes of anchors, positives and negatives, as `rows`.
    pub keys: Vec<u64>,
    pub cursor_after: Cursor,
    /// An evaluation batch of STS pairs (its embeddings are scored against gold similarities;
    /// its loss does not count when a retrieval set is evaluated too).
    pub sts: bool,
}

impl SimcseBatch {
    pub fn from_examples(examples: &[&Example], cursor_after: Cursor) -> Self {
        let n = examples.len();
        let mut rows = Vec::with_capacity(3 * n);
        let mut keys = Vec::with_capacity(3 * n);
        for e in examples {
            rows.push(e.anchor.clone());
            keys.push(e.keys[0]);
        }
        for e in examples {
            rows.push(e.positive.clone());
            keys.push(e.keys[1]);
        }
        if examples.iter().all(|e| e.negative.is_some()) {
            for e in examples {
                rows.push(e.negative.clone().unwrap_or_default());
                keys.push(e.keys[2]);
            }
        }
        SimcseBatch {
            rows,
            n,
            keys,
            cursor_after,
            sts: false,
        }
    }
}

/// Endless training batches: a seeded permutation per epoch (the last partial batch of an
/// epoch is dropped, so every batch has the same number of negatives); the resume cursor is
/// (epoch, batches done in it).
pub struct SimcseLoader {
    pub(super) data: Arc<Vec<Example>>,
    pub(super) batch_size: usize,
    pub(super) seed: u64,
    pub(super) cursor: Cursor,
}

impl SimcseLoader {
    pub fn new(data: Arc<Vec<Example>>, batch_size: usize, seed: u64) -> Self {
        SimcseLoader {
            data,
            batch_size,
            seed,
            cursor: Cursor::default(),
        }
    }

    pub fn seek(&mut self, cursor: Cursor) {
        self.cursor = cursor;
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.data.len() / self.batch_size
    }

    /// The examples an epoch visits.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(super) fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        order.shuffle(&mut rng::rng(&[domain::DATA_ORDER, self.seed, epoch]));
        order
    }
}

impl Iterator for SimcseLoader {
    type Item = SimcseBatch;
    fn next(&mut self) -> Option<SimcseBatch> {
        if self.cursor.position as usize >= self.batches_per_epoch() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
        }
        let order = self.order(self.cursor.epoch);
        let start = self.cursor.position as usize * self.batch_size;
        let examples: Vec<&Example> = order[start..start + self.batch_size]
            .iter()
            .map(|&i| &self.data[i])
            .collect();
        self.cursor.position += 1;
        Some(SimcseBatch::from_examples(&examples, self.cursor))
    }
}
