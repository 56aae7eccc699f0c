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
    };
    let b = make_batch(&data, &[0, 1], 0, 0, 0);
    assert_eq!(b.seq_len, 3);
    assert_eq!(b.input_ids, [1, 5, 2, 1, 2, 0]);
    assert_eq!(b.attention_mask, [1, 1, 1, 1, 1, 0]);
    assert_eq!(b.labels, [0, 1]);
}
