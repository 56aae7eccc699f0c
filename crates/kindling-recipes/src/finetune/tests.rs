//! Fine-tuning's unit tests.
use super::*;

#[test]
fn macro_f1_of_a_known_matrix() {
    // true 0: 3 right, 1 called 1; true 1: 2 right.
    let cm = vec![vec![3.0, 1.0], vec![0.0, 2.0]];
    let (acc, f1) = accuracy_and_macro_f1(&cm);
    assert!((acc - 5.0 / 6.0).abs() < 1e-12);
    // class 0: p 3/3, r 3/4 -> 6/7; class 1: p 2/3, r 1 -> 4/5.
    assert!((f1 - (6.0 / 7.0 + 0.8) / 2.0).abs() < 1e-12);
}

#[test]
fn matthews_correlation_matches_scikit_learn() {
    // The values tests/reference/sklearn_mcc.py prints (sklearn.metrics.matthews_corrcoef).
    let m =
        |rows: &[&[f64]]| matthews_corrcoef(&rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>());
    assert!((m(&[&[3.0, 1.0], &[0.0, 2.0]]) - 0.7071067811865476).abs() < 1e-12);
    let three: &[&[f64]] = &[&[5.0, 1.0, 0.0], &[2.0, 3.0, 1.0], &[0.0, 2.0, 4.0]];
    assert!((m(three) - 0.5023310149673528).abs() < 1e-12);
    assert_eq!(m(&[&[4.0, 0.0], &[3.0, 0.0]]), 0.0);
}

#[test]
fn epochs_cover_every_example_once_in_a_seeded_order() {
    let lengths: Vec<usize> = (0..103).map(|i| 5 + i % 17).collect();
    for grouped in [None, Some(&lengths[..])] {
        let a = epoch_batches(103, grouped, 8, 1, 0);
        let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        assert_eq!(a, epoch_batches(103, grouped, 8, 1, 0));
        assert_ne!(a, epoch_batches(103, grouped, 8, 1, 1));
        assert_ne!(a, epoch_batches(103, grouped, 8, 2, 0));
    }
    // Grouped: each batch spans a narrower range of lengths than a random one.
    let spread = |b: &Vec<usize>| {
        let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
        l.iter().max().unwrap() - l.iter().min().unwrap()
    };
    let grouped: usize = epoch_batches(103, Some(&lengths), 8, 1, 0)
        .iter()
        .map(spread)
        .sum();
    let random: usize = epoch_batches(103, None, 8, 1, 0).iter().map(spread).sum();
    assert!(grouped < random / 2, "{grouped} vs {random}");
}

#[test]
fn batches_pad_to_their_longest_with_a_zero_mask() {
    let data = Encoded {
        ids: vec![vec![1, 5, 2], vec![1, 2]],
        labels: vec![0, 1],
        ..Encoded::default()
    };
    let b = make_batch(&data, &[0, 1], 0, 0, 0);
    assert_eq!(b.seq_len, 3);
    assert_eq!(b.input_ids, [1, 5, 2, 1, 2, 0]);
    assert_eq!(b.attention_mask, [1, 1, 1, 1, 1, 0]);
    assert_eq!(b.labels, [0, 1]);
    assert_eq!(b.token_type_ids, None);
    // A pair's segment ids pad with 0; regression targets travel in order.
    let pairs = Encoded {
        ids: vec![vec![1, 5, 2, 6, 2], vec![1, 7, 2]],
        type_ids: vec![vec![0, 0, 0, 1, 1], vec![0, 0, 0]],
        values: vec![0.5, -1.0],
        width: 1,
        ..Encoded::default()
    };
    let b = make_batch(&pairs, &[1, 0], 0, 0, 0);
    assert_eq!(b.token_type_ids.unwrap(), [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
    assert_eq!(b.values, [-1.0, 0.5]);
    assert!(b.labels.is_empty());
}

#[test]
fn correlations_and_multi_label_scores_match_hand_computed_cases() {
    use crate::metrics::{average_ranks, multi_label_scores, pearson, spearman};
    // Ties share their average rank, as scipy's rankdata.
    assert_eq!(average_ranks(&[3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0]);
    // y = 2x + 1 is perfectly correlated; a monotone but curved y has Spearman 1, Pearson < 1.
    let x = [1.0, 2.0, 3.0, 4.0];
    assert!((pearson(&x, &[3.0, 5.0, 7.0, 9.0]) - 1.0).abs() < 1e-12);
    let cubed = [1.0, 8.0, 27.0, 64.0];
    assert!((spearman(&x, &cubed) - 1.0).abs() < 1e-12);
    assert!(pearson(&x, &cubed) < 0.99);
    assert!((spearman(&x, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    assert_eq!(pearson(&x, &[2.0; 4]), 0.0);
    // Two rows of three classes: row 0 exact, row 1 one false positive and one miss.
    let pred = [true, false, true, true, true, false];
    let gold = [true, false, true, true, false, true];
    let s = multi_label_scores(&pred, &gold, 3);
    // Pooled: tp 3, fp 1, fn 1 -> 6 / 8. Per class: 1, 0 (fp only), 2/3 (tp 1, fn 1).
    assert!((s.micro_f1 - 0.75).abs() < 1e-12);
    assert!((s.macro_f1 - (1.0 + 0.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    assert_eq!(s.exact_match, 0.5);
}
