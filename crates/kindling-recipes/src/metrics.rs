//! Scores shared by fine-tuning, the probes and the embedding evaluators: classification
//! (accuracy, macro-F1, MCC; multi-label micro/macro-F1 and exact match), correlation
//! (Pearson, Spearman) and ranking (recall@k, MRR, nDCG).

use std::collections::BTreeMap;

use kindling_data::LabelSet;

/// Accuracy and macro-F1 from a confusion matrix (rows: true, columns: predicted).
pub fn accuracy_and_macro_f1(cm: &[Vec<f64>]) -> (f64, f64) {
    let c = cm.len();
    let total: f64 = cm.iter().flatten().sum();
    let correct: f64 = (0..c).map(|i| cm[i][i]).sum();
    let f1: f64 = (0..c)
        .map(|i| {
            let tp = cm[i][i];
            let predicted: f64 = (0..c).map(|r| cm[r][i]).sum();
            let actual: f64 = cm[i].iter().sum();
            if predicted + actual == 0.0 {
                0.0
            } else {
                2.0 * tp / (predicted + actual)
            }
        })
        .sum::<f64>()
        / c as f64;
    (correct / total.max(1e-12), f1)
}

/// The Matthews correlation coefficient of a confusion matrix (rows: true, columns: predicted),
/// multiclass as Gorodkin's R_K and scikit-learn's `matthews_corrcoef`: `(c s - sum_k p_k t_k) /
/// sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2))` with c correct, s total, p_k and t_k the
/// predicted and true counts of class k; 0 when a factor of the denominator is (one class
/// predicted or present), as scikit-learn returns. GLUE reports it for CoLA.
pub fn matthews_corrcoef(cm: &[Vec<f64>]) -> f64 {
    let c = cm.len();
    let s: f64 = cm.iter().flatten().sum();
    let correct: f64 = (0..c).map(|i| cm[i][i]).sum();
    let predicted: Vec<f64> = (0..c).map(|k| (0..c).map(|r| cm[r][k]).sum()).collect();
    let actual: Vec<f64> = cm.iter().map(|row| row.iter().sum()).collect();
    let cov = correct * s
        - predicted
            .iter()
            .zip(&actual)
            .map(|(p, t)| p * t)
            .sum::<f64>();
    let sp = s * s - predicted.iter().map(|p| p * p).sum::<f64>();
    let st = s * s - actual.iter().map(|t| t * t).sum::<f64>();
    if sp <= 0.0 || st <= 0.0 {
        return 0.0;
    }
    cov / (sp * st).sqrt()
}

/// Pearson's correlation of `a` and `b` (scipy's `pearsonr` statistic); 0 when either is
/// constant (where scipy returns NaN: a constant prediction has no correlation to report, and a
/// NaN would poison the checkpoint monitor).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (ma, mb) = (
        a[..n].iter().sum::<f64>() / n as f64,
        b[..n].iter().sum::<f64>() / n as f64,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a[..n].iter().zip(&b[..n]) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return 0.0;
    }
    (sab / (saa * sbb).sqrt()).clamp(-1.0, 1.0)
}

/// Ranks from 1, ties sharing their average rank (scipy's `rankdata(method="average")`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation (scipy's `spearmanr`: Pearson of the average ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&average_ranks(a), &average_ranks(b))
}

/// Multi-label scores of `classes`-wide rows of decisions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiLabelScores {
    /// F1 of every (row, class) decision pooled (scikit-learn's `average="micro"`).
    pub micro_f1: f64,
    /// Mean over classes of each class's F1 (`average="macro"`; 0 for a class never present
    /// nor predicted, scikit-learn's `zero_division=0`).
    pub macro_f1: f64,
    /// Rows whose every class is right (scikit-learn's subset `accuracy_score`).
    pub exact_match: f64,
}

pub fn multi_label_scores(pred: &[bool], gold: &[bool], classes: usize) -> MultiLabelScores {
    let rows = pred.len() / classes.max(1);
    let (mut tp, mut fp, mut fn_) = (
        vec![0f64; classes],
        vec![0f64; classes],
        vec![0f64; classes],
    );
    let mut exact = 0usize;
    for r in 0..rows {
        let mut all = true;
        for k in 0..classes {
            let (p, g) = (pred[r * classes + k], gold[r * classes + k]);
            match (p, g) {
                (true, true) => tp[k] += 1.0,
                (true, false) => fp[k] += 1.0,
                (false, true) => fn_[k] += 1.0,
                _ => {}
            }
            all &= p == g;
        }
        exact += all as usize;
    }
    let f1 = |tp: f64, fp: f64, fn_: f64| {
        if 2.0 * tp + fp + fn_ == 0.0 {
            0.0
        } else {
            2.0 * tp / (2.0 * tp + fp + fn_)
        }
    };
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    MultiLabelScores {
        micro_f1: f1(sum(&tp), sum(&fp), sum(&fn_)),
        macro_f1: (0..classes).map(|k| f1(tp[k], fp[k], fn_[k])).sum::<f64>()
            / classes.max(1) as f64,
        exact_match: exact as f64 / rows.max(1) as f64,
    }
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa * bb).sqrt()
    }
}

/// Semantic textual similarity as sentence-transformers' `EmbeddingSimilarityEvaluator`
/// reports it: Spearman and Pearson correlation of the cosine similarity of each pair's
/// embeddings with its gold score (`sts_spearman`, `sts_pearson`).
pub fn sts_scores(a: &[Vec<f32>], b: &[Vec<f32>], gold: &[f64]) -> BTreeMap<String, f64> {
    let cos: Vec<f64> = a.iter().zip(b).map(|(x, y)| cosine(x, y)).collect();
    BTreeMap::from([
        ("sts_spearman".to_string(), spearman(&cos, gold)),
        ("sts_pearson".to_string(), pearson(&cos, gold)),
    ])
}

/// Retrieval where query `i`'s one relevant document is document `i`, ranked by cosine
/// similarity among all documents (a tie counts against the query): recall@k for each k (the
/// fraction of queries whose document is in the top k), MRR (mean reciprocal rank), and
/// nDCG@10 (with one relevant document: `1 / log2(rank + 1)` within the top 10, rank from 1),
/// the figure sentence-transformers' `InformationRetrievalEvaluator` and BEIR report.
pub fn retrieval_scores(
    queries: &[Vec<f32>],
    docs: &[Vec<f32>],
    ks: &[usize],
) -> BTreeMap<String, f64> {
    use rayon::prelude::*;
    let unit = |v: &Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let q: Vec<Vec<f32>> = queries.iter().map(unit).collect();
    let d: Vec<Vec<f32>> = docs.iter().map(unit).collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // Documents ranked above query i's own: its rank is this + 1.
    let above: Vec<usize> = q
        .par_iter()
        .enumerate()
        .map(|(i, qi)| {
            let own = dot(qi, &d[i]);
            d.iter()
                .enumerate()
                .filter(|&(j, dj)| j != i && dot(qi, dj) >= own)
                .count()
        })
        .collect();
    ranking_metrics(&above, ks)
}

/// [`retrieval_scores`] from each query's count of documents ranked above its own.
pub fn ranking_metrics(above: &[usize], ks: &[usize]) -> BTreeMap<String, f64> {
    let n = above.len().max(1) as f64;
    let mut m = BTreeMap::new();
    for &k in ks {
        let hits = above.iter().filter(|&&r| r < k).count();
        m.insert(format!("recall_at_{k}"), hits as f64 / n);
    }
    m.insert(
        "mrr".into(),
        above.iter().map(|&r| 1.0 / (r + 1) as f64).sum::<f64>() / n,
    );
    m.insert(
        "ndcg_at_10".into(),
        above
            .iter()
            .filter(|&&r| r < 10)
            .map(|&r| 1.0 / ((r + 2) as f64).log2())
            .sum::<f64>()
            / n,
    );
    m
}

/// The confusion matrix as a table a person reads: rows are true classes.
pub fn format_confusion(labels: &LabelSet, cm: &[Vec<u64>]) -> String {
    let w = labels
        .names
        .iter()
        .map(|n| n.len())
        .chain(cm.iter().flatten().map(|v| v.to_string().len()))
        .max()
        .unwrap_or(1)
        .max(4);
    let mut s = format!("{:>w$}  predicted ->\n", "true");
    s += &format!("{:>w$}", "");
    for n in &labels.names {
        s += &format!(" {n:>w$}");
    }
    s += "\n";
    for (i, row) in cm.iter().enumerate() {
        s += &format!("{:>w$}", labels.names[i]);
        for v in row {
            s += &format!(" {v:>w$}");
        }
        s += "\n";
    }
    s
}
