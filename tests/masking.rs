//! Dynamic masking: rates, the 80/10/10 split, special tokens, whole words, determinism.

use std::sync::Arc;

use kindling_data::packing::{SPECIAL, WORD_START};
use kindling_data::{Cursor, MaskConfig, Masker, MlmLoader};

use crate::common::{specials, synthetic_blocks};

const VOCAB: u32 = 1000;

fn masker(cfg: MaskConfig, seed: u64) -> Masker {
    Masker::new(cfg, &specials(), VOCAB as usize, seed).unwrap()
}

#[test]
fn selection_rate_and_80_10_10_split_match_the_config() {
    let blocks = synthetic_blocks(400, 128, VOCAB, 6);
    let m = masker(MaskConfig::default(), 3);
    let (mut eligible, mut selected, mut to_mask, mut to_random, mut kept) = (0usize, 0, 0, 0, 0);
    for epoch in 0..5 {
        for i in 0..blocks.len() {
            let (ids, flags) = blocks.block(i);
            let mb = m.mask(ids, flags, epoch, i as u64);
            eligible += flags.iter().filter(|&&f| f & SPECIAL == 0).count();
            selected += mb.positions.len();
            for (&p, &label) in mb.positions.iter().zip(&mb.labels) {
                let p = p as usize;
                assert_eq!(label, ids[p], "labels are the original ids");
                match mb.input_ids[p] {
                    4 => to_mask += 1,
                    x if x == ids[p] => kept += 1,
                    _ => to_random += 1,
                }
            }
        }
    }
    let rate = selected as f64 / eligible as f64;
    assert!((rate - 0.15).abs() < 0.005, "selection rate {rate}");
    let s = selected as f64;
    // A random replacement equal to the original counts as kept: 1/995 of the 10%.
    assert!(
        (to_mask as f64 / s - 0.8).abs() < 0.01,
        "[MASK] share {}",
        to_mask as f64 / s
    );
    assert!(
        (to_random as f64 / s - 0.1).abs() < 0.01,
        "random share {}",
        to_random as f64 / s
    );
    assert!(
        (kept as f64 / s - 0.1).abs() < 0.01,
        "kept share {}",
        kept as f64 / s
    );
}

#[test]
fn configured_rates_are_honoured() {
    let blocks = synthetic_blocks(300, 64, VOCAB, 0);
    let cfg = MaskConfig {
        rate: 0.3,
        mask_token_frac: 0.5,
        random_token_frac: 0.5,
        whole_word: false,
    };
    let m = masker(cfg, 9);
    let (mut eligible, mut selected, mut masked) = (0usize, 0usize, 0usize);
    for i in 0..blocks.len() {
        let (ids, flags) = blocks.block(i);
        let mb = m.mask(ids, flags, 0, i as u64);
        eligible += flags.iter().filter(|&&f| f & SPECIAL == 0).count();
        selected += mb.positions.len();
        masked += mb
            .positions
            .iter()
            .filter(|&&p| mb.input_ids[p as usize] == 4)
            .count();
    }
    let rate = selected as f64 / eligible as f64;
    assert!((rate - 0.3).abs() < 0.01, "rate {rate}");
    let share = masked as f64 / selected as f64;
    assert!((share - 0.5).abs() < 0.02, "[MASK] share {share}");
}

#[test]
fn special_and_pad_tokens_are_never_masked_or_changed() {
    let blocks = synthetic_blocks(200, 32, VOCAB, 10);
    for whole_word in [false, true] {
        let cfg = MaskConfig {
            rate: 0.9,
            whole_word,
            ..MaskConfig::default()
        };
        let m = masker(cfg, 1);
        for i in 0..blocks.len() {
            let (ids, flags) = blocks.block(i);
            let mb = m.mask(ids, flags, 0, i as u64);
            for &p in &mb.positions {
                assert_eq!(
                    flags[p as usize] & SPECIAL,
                    0,
                    "special token at {p} selected"
                );
            }
            for (j, &f) in flags.iter().enumerate() {
                if f & SPECIAL != 0 {
                    assert_eq!(mb.input_ids[j], ids[j], "special token at {j} corrupted");
                }
            }
        }
    }
}

#[test]
fn whole_word_masking_selects_all_pieces_of_a_word_or_none() {
    let blocks = synthetic_blocks(200, 128, VOCAB, 4);
    let cfg = MaskConfig {
        whole_word: true,
        ..MaskConfig::default()
    };
    let m = masker(cfg, 5);
    let (mut eligible, mut selected, mut multi_piece_words_selected) = (0usize, 0usize, 0usize);
    for i in 0..blocks.len() {
        let (ids, flags) = blocks.block(i);
        let mb = m.mask(ids, flags, 0, i as u64);
        let mut sel = vec![false; ids.len()];
        for &p in &mb.positions {
            sel[p as usize] = true;
        }
        // Walk the words: every piece shares the first piece's selection.
        let mut j = 0;
        while j < ids.len() {
            if flags[j] & SPECIAL != 0 {
                j += 1;
                continue;
            }
            assert!(flags[j] & WORD_START != 0);
            let start = j;
            j += 1;
            while j < ids.len() && flags[j] & (SPECIAL | WORD_START) == 0 {
                assert_eq!(
                    sel[j], sel[start],
                    "block {i}: word at {start} split at {j}"
                );
                j += 1;
            }
            if sel[start] && j - start > 1 {
                multi_piece_words_selected += 1;
            }
        }
        eligible += flags.iter().filter(|&&f| f & SPECIAL == 0).count();
        selected += mb.positions.len();
    }
    assert!(
        multi_piece_words_selected > 100,
        "the test exercises multi-piece words"
    );
    let rate = selected as f64 / eligible as f64;
    assert!(
        (rate - 0.15).abs() < 0.01,
        "token rate under whole-word masking {rate}"
    );
}

#[test]
fn masks_are_redrawn_each_epoch_and_fixed_by_seed_epoch_index() {
    let blocks = synthetic_blocks(2, 128, VOCAB, 0);
    let (ids, flags) = blocks.block(1);
    let a = masker(MaskConfig::default(), 7);
    let b = masker(MaskConfig::default(), 7);
    assert_eq!(a.mask(ids, flags, 0, 1), b.mask(ids, flags, 0, 1));
    assert_ne!(
        a.mask(ids, flags, 0, 1),
        a.mask(ids, flags, 1, 1),
        "a new epoch draws a new mask"
    );
    assert_ne!(
        a.mask(ids, flags, 0, 1),
        masker(MaskConfig::default(), 8).mask(ids, flags, 0, 1)
    );
}

fn batches_on_threads(threads: usize, n: usize, cursor: Cursor) -> Vec<kindling_data::MlmBatch> {
    let blocks = Arc::new(synthetic_blocks(100, 64, VOCAB, 3));
    let m = Arc::new(masker(MaskConfig::default(), 11));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| MlmLoader::new(blocks, m, 8, 11, cursor).take(n).collect())
}

#[test]
fn same_seed_gives_the_same_batches_on_one_and_two_threads() {
    // 30 batches of 8 from 100 blocks cross two epoch boundaries.
    let one = batches_on_threads(1, 30, Cursor::default());
    let two = batches_on_threads(2, 30, Cursor::default());
    assert_eq!(one, two);
    assert!(one.iter().any(|b| b.cursor_after.epoch == 2));
}

#[test]
fn a_loader_started_from_a_saved_cursor_continues_the_same_stream() {
    let full = batches_on_threads(2, 20, Cursor::default());
    let resumed = batches_on_threads(2, 5, full[14].cursor_after);
    assert_eq!(&full[15..20], &resumed[..]);
}

#[test]
fn a_loader_batch_is_its_blocks_masks_in_order_with_increasing_flat_positions() {
    let blocks = Arc::new(synthetic_blocks(100, 64, VOCAB, 3));
    let m = Arc::new(masker(MaskConfig::default(), 11));
    let loader = MlmLoader::new(blocks.clone(), m.clone(), 8, 11, Cursor::default());
    let order = loader.epoch_order(0);
    for (k, batch) in loader.take(3).enumerate() {
        let (mut ids, mut positions, mut labels) = (vec![], vec![], vec![]);
        for (b, &i) in order[k * 8..(k + 1) * 8].iter().enumerate() {
            let (block_ids, flags) = blocks.block(i as usize);
            let one = m.mask(block_ids, flags, 0, i as u64);
            ids.extend_from_slice(&one.input_ids);
            positions.extend(one.positions.iter().map(|&p| (b * 64) as u32 + p));
            labels.extend_from_slice(&one.labels);
        }
        // Strictly increasing: the MLM step then runs its last encoder layer at these rows only
        // (`BertModel::forward_rows_t`), instead of in full and selecting.
        assert!(batch.positions.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            (batch.input_ids, batch.positions, batch.labels),
            (ids, positions, labels)
        );
    }
}
