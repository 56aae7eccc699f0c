//! Embedding evaluation, as sentence-transformers users compare models: `[eval.sts]` (pairs of
//! sentences with a gold similarity score: Spearman and Pearson of the embeddings' cosine
//! similarity, as `EmbeddingSimilarityEvaluator`) and `[eval.retrieval]` (each row's query
//! should find its own row's document among all the rows' documents: recall@k, MRR, nDCG@10,
//! as `InformationRetrievalEvaluator`).
//!
//! SimCSE runs evaluate both at every evaluation; `kindling evaluate-embeddings MODEL RECIPE`
//! evaluates any encoder folder (a Kindling export, an HF folder such as all-MiniLM-L6-v2) on
//! the `[eval]` sections of a recipe, through the same embedding path, so an export's scores
//! there equal its run's last evaluation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use kindling_data::read_table;
use kindling_models::bert::Pooling;

use crate::RecipeError;

/// `[eval]`: what an embedding model is scored on (either, both, or neither section).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingEval {
    pub retrieval: Option<Retrieval>,
    pub sts: Option<Sts>,
}

/// `[eval.retrieval]`: each row's `query_column` should find the same row's `doc_column` among
/// all the rows' docs (a tie counts against the query).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retrieval {
    pub table: PathBuf,
    #[serde(default)]
    pub format: Option<String>,
    pub query_column: String,
    pub doc_column: String,
    #[serde(default)]
    pub split_column: Option<String>,
    #[serde(default = "default_test_split")]
    pub split: String,
    /// The first N rows with both cells non-empty (0 = all).
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    #[serde(default = "default_ks")]
    pub k: Vec<usize>,
}

/// `[eval.sts]`: sentence pairs and a gold similarity (any scale: only its order and linear
/// fit count), as STS-B's `sentence1`, `sentence2`, `score`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sts {
    pub table: PathBuf,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default = "default_sentence1")]
    pub sentence1_column: String,
    #[serde(default = "default_sentence2")]
    pub sentence2_column: String,
    #[serde(default = "default_score")]
    pub score_column: String,
    #[serde(default)]
    pub split_column: Option<String>,
    #[serde(default = "default_test_split")]
    pub split: String,
    /// The first N complete rows (0 = all).
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
}

pub(crate) fn default_test_split() -> String {
    "test".into()
}
fn default_max_rows() -> usize {
    2000
}
pub(crate) fn default_ks() -> Vec<usize> {
    vec![1, 5, 10]
}
fn default_sentence1() -> String {
    "sentence1".into()
}
fn default_sentence2() -> String {
    "sentence2".into()
}
fn default_score() -> String {
    "score".into()
}

/// The rows of `split` (all rows without a split column) whose `columns` are all non-empty,
/// at most `max_rows` (0: all), as (line, cells); fewer than two are an error of `key`.
fn complete_rows(
    key: &str,
    table: &Path,
    format: Option<&str>,
    columns: &[String],
    (split_column, split): (Option<&String>, &str),
    max_rows: usize,
) -> Result<Vec<(u64, Vec<String>)>, RecipeError> {
    let mut cols = columns.to_vec();
    cols.extend(split_column.cloned());
    let n = columns.len();
    let mut rows: Vec<(u64, Vec<String>)> = read_table(table, format, &cols)?
        .into_iter()
        .filter(|r| split_column.is_none() || r.cells[n].trim() == split)
        .filter(|r| r.cells[..n].iter().all(|c| !c.trim().is_empty()))
        .map(|r| {
            (
                r.line,
                r.cells[..n].iter().map(|c| c.trim().to_string()).collect(),
            )
        })
        .collect();
    if max_rows > 0 {
        rows.truncate(max_rows);
    }
    if rows.len() < 2 {
        return Err(RecipeError::Invalid {
            key: key.into(),
            msg: format!(
                "{}: {} rows with all of {columns:?} in split `{split}`; at least 2 are needed",
                table.display(),
                rows.len(),
            ),
        });
    }
    Ok(rows)
}

impl Retrieval {
    /// The (query, document) pairs, in table order.
    pub fn read(&self) -> Result<Vec<[String; 2]>, RecipeError> {
        let cols = [self.query_column.clone(), self.doc_column.clone()];
        let rows = complete_rows(
            "eval.retrieval",
            &self.table,
            self.format.as_deref(),
            &cols,
            (self.split_column.as_ref(), &self.split),
            self.max_rows,
        )?;
        Ok(rows
            .into_iter()
            .map(|(_, c)| [c[0].clone(), c[1].clone()])
            .collect())
    }
}

impl Sts {
    /// The sentence pairs and their gold scores; a score that is not a number is an error
    /// naming its line.
    pub fn read(&self) -> Result<(Vec<[String; 2]>, Vec<f64>), RecipeError> {
        let cols = [
            self.sentence1_column.clone(),
            self.sentence2_column.clone(),
            self.score_column.clone(),
        ];
        let rows = complete_rows(
            "eval.sts",
            &self.table,
            self.format.as_deref(),
            &cols,
            (self.split_column.as_ref(), &self.split),
            self.max_rows,
        )?;
        let mut pairs = Vec::with_capacity(rows.len());
        let mut gold = Vec::with_capacity(rows.len());
        for (line, c) in rows {
            let score: f64 = c[2]
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| {
                    RecipeError::Data(kindling_data::DataError::Row {
                        path: self.table.clone(),
                        line,
                        msg: format!("score `{}` in column `{}` is not a number", c[2], cols[2]),
                    })
                })?;
            pairs.push([c[0].clone(), c[1].clone()]);
            gold.push(score);
        }
        Ok((pairs, gold))
    }
}

/// What `kindling evaluate-embeddings` reads from a recipe: `[eval]`, and from `[model]` the
/// pooling and the token limit (any other key is the recipe's own business, so a SimCSE
/// recipe serves as it is).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingEvalRecipe {
    pub pooling: Pooling,
    pub max_length: usize,
    pub eval: EmbeddingEval,
}

impl EmbeddingEvalRecipe {
    /// The metric a suite reports: STS Spearman when there is an STS set, else nDCG@10.
    pub fn main_metric(&self) -> &'static str {
        if self.eval.sts.is_some() {
            "sts_spearman"
        } else {
            "ndcg_at_10"
        }
    }

    /// Every score [`evaluate_embeddings`] reports for this recipe.
    pub fn metrics(&self) -> Vec<String> {
        let mut m = Vec::new();
        if let Some(r) = &self.eval.retrieval {
            m.extend(r.k.iter().map(|k| format!("recall_at_{k}")));
            m.extend(["mrr".to_string(), "ndcg_at_10".to_string()]);
        }
        if self.eval.sts.is_some() {
            m.extend(["sts_spearman".to_string(), "sts_pearson".to_string()]);
        }
        m
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let doc: toml::Table = crate::recipe::parse_toml(&text, path, overrides)?;
        #[derive(Deserialize)]
        struct Model {
            #[serde(default = "mean")]
            pooling: Pooling,
            #[serde(default = "default_max_length")]
            max_length: usize,
        }
        fn mean() -> Pooling {
            Pooling::Mean
        }
        fn default_max_length() -> usize {
            128
        }
        #[derive(Deserialize)]
        struct Parts {
            #[serde(default)]
            eval: EmbeddingEval,
        }
        let mut model = toml::Table::new();
        if let Some(m) = doc.get("model").and_then(|m| m.as_table()) {
            for k in ["pooling", "max_length"] {
                if let Some(v) = m.get(k) {
                    model.insert(k.into(), v.clone());
                }
            }
        }
        let mut parts = toml::Table::new();
        if let Some(e) = doc.get("eval") {
            parts.insert("eval".into(), e.clone());
        }
        let m: Model = crate::recipe::deserialize_document(model, path, None)
            .map_err(|e| prefix_key(e, "model."))?;
        let p: Parts = crate::recipe::deserialize_document(parts, path, None)?;
        if p.eval.retrieval.is_none() && p.eval.sts.is_none() {
            return Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: "eval".into(),
                msg: "give [eval.sts] and/or [eval.retrieval]: there is nothing to evaluate".into(),
            });
        }
        if m.max_length < 2 {
            return Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: "model.max_length".into(),
                msg: "must be at least 2".into(),
            });
        }
        Ok(EmbeddingEvalRecipe {
            pooling: m.pooling,
            max_length: m.max_length,
            eval: p.eval,
        })
    }
}

fn prefix_key(e: RecipeError, prefix: &str) -> RecipeError {
    match e {
        RecipeError::Key { path, key, msg } => RecipeError::Key {
            path,
            key: format!("{prefix}{key}"),
            msg,
        },
        e => e,
    }
}

/// Scores of the encoder in `model_dir` on `recipe`'s `[eval]` sections, embedded in eval mode
/// through SimCSE's embedding path (pooling as the recipe says), batches of `batch_size`;
/// `random = Some(seed)` scores a randomly initialised encoder of the folder's shape instead.
pub fn evaluate_embeddings(
    model_dir: &Path,
    recipe: &EmbeddingEvalRecipe,
    batch_size: usize,
    random: Option<u64>,
) -> Result<BTreeMap<String, f64>, RecipeError> {
    let device = candle_core::Device::Cpu;
    let tokenizer = kindling_data::tokenizer::load(model_dir)?;
    let pad = kindling_data::tokenizer::special_tokens(&tokenizer)?.pad;
    let encoder =
        crate::simcse::Simcse::from_folder(model_dir, recipe.pooling, pad, random, &device)?;
    let embed = |texts: &[String]| -> Result<Vec<Vec<f32>>, RecipeError> {
        let rows: Vec<[Option<String>; 3]> = texts
            .iter()
            .map(|t| [Some(t.clone()), None, None])
            .collect();
        let encoded = crate::simcse::encode_examples(&rows, &tokenizer, recipe.max_length)?;
        let ids: Vec<Vec<u32>> = encoded.into_iter().map(|e| e.anchor).collect();
        // Longest first, so a batch pads to similar lengths; the order is restored after.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let e = encoder
                .embed(&rows, kindling_core::Mode::Eval)?
                .to_vec2::<f32>()?;
            for (v, &i) in e.into_iter().zip(chunk) {
                out[i] = v;
            }
        }
        Ok(out)
    };
    let mut scores = BTreeMap::new();
    if let Some(r) = &recipe.eval.retrieval {
        let pairs = r.read()?;
        let (q, d): (Vec<String>, Vec<String>) = pairs.into_iter().map(|[a, b]| (a, b)).unzip();
        scores.extend(crate::metrics::retrieval_scores(
            &embed(&q)?,
            &embed(&d)?,
            &r.k,
        ));
        scores.insert("retrieval_rows".into(), q.len() as f64);
    }
    if let Some(s) = &recipe.eval.sts {
        let (pairs, gold) = s.read()?;
        let (a, b): (Vec<String>, Vec<String>) = pairs.into_iter().map(|[a, b]| (a, b)).unzip();
        scores.extend(crate::metrics::sts_scores(&embed(&a)?, &embed(&b)?, &gold));
        scores.insert("sts_rows".into(), gold.len() as f64);
    }
    Ok(scores)
}
