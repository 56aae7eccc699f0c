//! Classification scores shared by fine-tuning, the text probe and the vision probes.

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
