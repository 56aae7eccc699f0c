//! The monitors a vision SSL run logs at every evaluation, on features of the labelled test
//! images: a weighted kNN classifier against the training images (how linearly and locally
//! separable the classes already are) and a collapse monitor (whether the features still spread
//! over the sphere and over many directions, or fell onto a point or a line).

/// Weighted kNN (Wu et al., 2018): cosine similarities to the bank, the top k neighbours vote
/// for their class with weight exp(sim / T); returns test accuracy.
pub fn knn_accuracy(
    bank: &[f32],
    bank_labels: &[u32],
    query: &[f32],
    query_labels: &[u32],
    d: usize,
    k: usize,
    temperature: f64,
) -> f64 {
    use rayon::prelude::*;
    let norm = |v: &[f32]| -> Vec<f32> {
        v.chunks(d)
            .flat_map(|r| {
                let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                r.iter().map(move |x| x / n)
            })
            .collect()
    };
    let (b, q) = (norm(bank), norm(query));
    let classes = bank_labels.iter().max().map_or(0, |&m| m as usize + 1);
    let correct: usize = q
        .par_chunks(d)
        .zip(query_labels.par_iter())
        .filter(|(qr, &label)| {
            let mut sims: Vec<(f32, u32)> = b
                .chunks(d)
                .zip(bank_labels)
                .map(|(br, &l)| (br.iter().zip(qr.iter()).map(|(x, y)| x * y).sum(), l))
                .collect();
            let k = k.min(sims.len());
            sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            let mut votes = vec![0f64; classes.max(1)];
            for &(s, l) in &sims[..k] {
                votes[l as usize] += (s as f64 / temperature).exp();
            }
            let best = votes
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            best == label as usize
        })
        .count();
    correct as f64 / query_labels.len().max(1) as f64
}

/// Collapse monitor on (n, d) features: the mean per-dimension standard deviation of the
/// L2-normalised rows times sqrt(d) (about 1 when spread over the sphere, 0 when collapsed to
/// a point), and the effective rank (Roy & Vetterli, 2007: exp of the entropy of the
/// normalised singular values of the centred features; d at most, 1 when collapsed to a line).
pub fn collapse_metrics(feats: &[f32], d: usize) -> (f64, f64) {
    let n = feats.len() / d.max(1);
    if n < 2 {
        return (0.0, 0.0);
    }
    let rows: Vec<Vec<f64>> = feats
        .chunks(d)
        .map(|r| {
            let norm = r
                .iter()
                .map(|x| (*x as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            r.iter().map(|x| *x as f64 / norm).collect()
        })
        .collect();
    let mean: Vec<f64> = (0..d)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let std: f64 = (0..d)
        .map(|j| (rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n as f64).sqrt())
        .sum::<f64>()
        / d as f64;
    let mut cov = vec![vec![0f64; d]; d];
    for r in &rows {
        for i in 0..d {
            let a = r[i] - mean[i];
            for j in i..d {
                cov[i][j] += a * (r[j] - mean[j]);
            }
        }
    }
    for i in 0..d {
        for j in 0..i {
            cov[i][j] = cov[j][i];
        }
    }
    let eig = symmetric_eigenvalues(cov);
    let sv: Vec<f64> = eig.iter().map(|e| e.max(0.0).sqrt()).collect();
    let total: f64 = sv.iter().sum();
    let entropy: f64 = sv
        .iter()
        .filter(|&&s| s > 0.0)
        .map(|&s| {
            let p = s / total;
            -p * p.ln()
        })
        .sum();
    (std * (d as f64).sqrt(), entropy.exp())
}

/// Eigenvalues of a symmetric matrix by cyclic Jacobi rotations (d is a feature width, a few
/// hundred at most; this runs once per evaluation).
fn symmetric_eigenvalues(mut a: Vec<Vec<f64>>) -> Vec<f64> {
    let d = a.len();
    for _sweep in 0..50 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-18 {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..d).map(|i| a[i][i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindling_core::rng;

    #[test]
    fn collapse_monitor_tells_spread_from_collapsed_features() {
        use rand::Rng;
        let mut r = rng::rng(&[3]);
        let spread: Vec<f32> = (0..400 * 8).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let (std, rank) = collapse_metrics(&spread, 8);
        assert!(std > 0.8 && rank > 7.0, "spread: std {std}, rank {rank}");
        // All rows on one line through the origin: one direction, two signs.
        let line: Vec<f32> = (0..400)
            .flat_map(|i| {
                let s = if i % 2 == 0 { 1.0 } else { -1.0 };
                (0..8).map(move |j| s * (j as f32 + 1.0))
            })
            .collect();
        let (_, rank) = collapse_metrics(&line, 8);
        assert!(rank < 1.01, "a line has effective rank 1, got {rank}");
    }

    #[test]
    fn jacobi_finds_the_eigenvalues_of_a_known_matrix() {
        let mut e = symmetric_eigenvalues(vec![vec![2.0, 1.0], vec![1.0, 2.0]]);
        e.sort_by(f64::total_cmp);
        assert!(
            (e[0] - 1.0).abs() < 1e-9 && (e[1] - 3.0).abs() < 1e-9,
            "{e:?}"
        );
    }

    #[test]
    fn knn_votes_by_weighted_neighbours() {
        let bank = [1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9];
        let labels = [0, 0, 1, 1];
        let query = [0.95f32, 0.05, 0.05, 0.95];
        assert_eq!(
            knn_accuracy(&bank, &labels, &query, &[0, 1], 2, 2, 0.1),
            1.0
        );
        assert_eq!(
            knn_accuracy(&bank, &labels, &query, &[1, 0], 2, 2, 0.1),
            0.0
        );
    }
}
