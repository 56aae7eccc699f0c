//! What the MLM benches share: synthetic packed data and the optimiser they time.

use kindling_data::packing::{SPECIAL, WORD_START};
use kindling_data::{PackedBlocks, SpecialTokens};
use kindling_train::{Objective, Optimizer, OptimizerConfig, OptimizerKind, TrainConfig, Trainer};

/// BERT's special tokens at ids 0-4.
pub fn specials() -> SpecialTokens {
    SpecialTokens {
        pad: 0,
        unk: 1,
        cls: 2,
        sep: 3,
        mask: 4,
        all: vec![0, 1, 2, 3, 4],
    }
}

/// `n` packed blocks of `seq` tokens drawn by xorshift from a vocabulary of `vocab` ([CLS] at
/// both ends; two tokens in three start a word).
pub fn synthetic_blocks(n: usize, seq: usize, vocab: u32) -> PackedBlocks {
    let mut ids = Vec::with_capacity(n * seq);
    let mut flags = Vec::with_capacity(n * seq);
    let mut x = 88172645463325252u64;
    for _ in 0..n {
        for t in 0..seq {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let special = t == 0 || t == seq - 1;
            ids.push(if special {
                2
            } else {
                5 + (x % (vocab as u64 - 5)) as u32
            });
            flags.push(if special {
                SPECIAL
            } else if x % 3 != 0 {
                WORD_START
            } else {
                0
            });
        }
    }
    PackedBlocks {
        seq_len: seq,
        ids,
        flags,
    }
}

/// The trainer's default AdamW at lr 1e-4 over `obj`'s parameters.
pub fn adamw<O: Objective>(obj: &O) -> Box<dyn Optimizer> {
    optimizer(obj, OptimizerKind::AdamW)
}

/// The trainer's optimiser of `kind` at lr 1e-4 over `obj`'s parameters (Muon with its paper's
/// momentum 0.95, Nesterov).
pub fn optimizer<O: Objective>(obj: &O, kind: OptimizerKind) -> Box<dyn Optimizer> {
    let trainer = Trainer::new(
        TrainConfig {
            optimizer: OptimizerConfig {
                kind,
                lr: 1e-4,
                momentum: 0.95,
                nesterov: true,
                ..Default::default()
            },
            ..Default::default()
        },
        std::path::Path::new("."),
    );
    trainer.optimizer(obj).unwrap()
}
