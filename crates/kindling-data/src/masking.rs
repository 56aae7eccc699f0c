//! Dynamic masked-LM labels (BERT, Devlin et al. 2019, §3.1; RoBERTa's dynamic masking).
//!
//! A fresh mask is drawn every time a block is seen, from a stream keyed by
//! `(seed, epoch, block index)`: the same block in the same epoch gets the same mask on any
//! thread count and after any restart, and a different mask in the next epoch.
//!
//! Of the selected tokens, `mask_token_frac` become `[MASK]`, `random_token_frac` a random
//! non-special token, and the rest stay as they are (80/10/10 by default). With `whole_word`,
//! words are selected as units (each word's tokens share one draw), using the word-start flags
//! that packing derived from the tokenizer's word ids.

use rand::Rng;
use serde::{Deserialize, Serialize};

use kindling_core::rng::{self, domain};

use crate::error::{DataError, Result};
use crate::packing::{SPECIAL, WORD_START};
use crate::tokenizer::SpecialTokens;

/// `[data.mask]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaskConfig {
    /// Probability that a token (or word, with `whole_word`) is selected for prediction.
    pub rate: f64,
    /// Of the selected tokens, the share replaced by `[MASK]`.
    pub mask_token_frac: f64,
    /// Of the selected tokens, the share replaced by a random token (the rest are kept).
    pub random_token_frac: f64,
    /// Select whole words instead of single word pieces.
    pub whole_word: bool,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            rate: 0.15,
            mask_token_frac: 0.8,
            random_token_frac: 0.1,
            whole_word: false,
        }
    }
}

impl MaskConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |key, msg: String| Err(DataError::Config { key, msg });
        if !(self.rate > 0.0 && self.rate < 1.0) {
            return bad(
                "data.mask.rate",
                format!("must be in (0, 1), got {}", self.rate),
            );
        }
        if !(0.0..=1.0).contains(&self.mask_token_frac)
            || !(0.0..=1.0).contains(&self.random_token_frac)
        {
            return bad(
                "data.mask",
                "mask_token_frac and random_token_frac must be in [0, 1]".into(),
            );
        }
        if self.mask_token_frac + self.random_token_frac > 1.0 + 1e-9 {
            return bad(
                "data.mask",
                format!(
                    "mask_token_frac + random_token_frac must be at most 1, got {} + {}",
                    self.mask_token_frac, self.random_token_frac
                ),
            );
        }
        Ok(())
    }
}

/// One masked block (or several in a row, as [`Masker::mask_into`] fills a batch): the
/// corrupted input and the prediction targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedBlock {
    /// (seq_len, or blocks x seq_len) ids with the selected positions corrupted.
    pub input_ids: Vec<u32>,
    /// Positions (into `input_ids`, ascending) the loss is computed at.
    pub positions: Vec<u32>,
    /// Original ids at `positions`.
    pub labels: Vec<u32>,
}

/// Draws masks for blocks; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Masker {
    cfg: MaskConfig,
    mask_id: u32,
    /// Ids a random replacement is drawn from: the vocabulary minus special tokens.
    replacement_ids: Vec<u32>,
    seed: u64,
}

impl Masker {
    pub fn new(cfg: MaskConfig, sp: &SpecialTokens, vocab_size: usize, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let replacement_ids: Vec<u32> = (0..vocab_size as u32)
            .filter(|id| sp.all.binary_search(id).is_err())
            .collect();
        if replacement_ids.is_empty() {
            return Err(DataError::Tokenizer(
                "vocabulary has only special tokens".into(),
            ));
        }
        Ok(Masker {
            cfg,
            mask_id: sp.mask,
            replacement_ids,
            seed,
        })
    }

    pub fn config(&self) -> &MaskConfig {
        &self.cfg
    }

    /// Masks `ids` (with their packing `flags`) as seen in `epoch` at block `index`.
    /// At least one position is always selected, so no block yields an empty loss.
    pub fn mask(&self, ids: &[u32], flags: &[u8], epoch: u64, index: u64) -> MaskedBlock {
        let mut out = self.empty_output(ids.len());
        self.mask_into(ids, flags, epoch, index, &mut out);
        out
    }

    /// An empty [`MaskedBlock`] with room for `tokens` ids and the labels this rate should
    /// select among them (plus a margin), so [`Masker::mask_into`] rarely grows its vectors.
    pub fn empty_output(&self, tokens: usize) -> MaskedBlock {
        let expected = (tokens as f64 * self.cfg.rate * 1.25) as usize + 8;
        MaskedBlock {
            input_ids: Vec::with_capacity(tokens),
            positions: Vec::with_capacity(expected),
            labels: Vec::with_capacity(expected),
        }
    }

    /// [`Masker::mask`] appended to `out`, which may already hold blocks: the block's ids go
    /// after `out.input_ids`, and its positions count from there (flat positions in a batch).
    /// The loader builds each batch this way in one set of vectors, without per-block vectors
    /// (malloc and free were 18% of the masker's profile) or a copy to stack them.
    pub fn mask_into(
        &self,
        ids: &[u32],
        flags: &[u8],
        epoch: u64,
        index: u64,
        out: &mut MaskedBlock,
    ) {
        debug_assert_eq!(ids.len(), flags.len());
        let base = out.input_ids.len();
        out.input_ids.extend_from_slice(ids);
        let first = out.positions.len();
        let mut rng = rng::rng(&[domain::MASK, self.seed, epoch, index]);
        // Selection: one draw per token (per word with `whole_word`), in order.
        let mut word_selected = false;
        for (i, &f) in flags.iter().enumerate() {
            if f & SPECIAL != 0 {
                continue;
            }
            // In whole-word mode a word's first piece draws for the whole word.
            let pick = if self.cfg.whole_word && f & WORD_START == 0 {
                word_selected
            } else {
                word_selected = rng.random_bool(self.cfg.rate);
                word_selected
            };
            if pick {
                out.positions.push((base + i) as u32);
            }
        }
        if out.positions.len() == first {
            // Fall back to one uniformly chosen word (or token): a rare event for real lengths.
            let candidates: Vec<usize> = (0..ids.len())
                .filter(|&i| {
                    flags[i] & SPECIAL == 0 && (!self.cfg.whole_word || flags[i] & WORD_START != 0)
                })
                .collect();
            if let Some(&start) = candidates.get(rng.random_range(0..candidates.len().max(1))) {
                out.positions.push((base + start) as u32);
                if self.cfg.whole_word {
                    for i in start + 1..ids.len() {
                        if flags[i] & (SPECIAL | WORD_START) != 0 {
                            break;
                        }
                        out.positions.push((base + i) as u32);
                    }
                }
            }
        }
        // Corruption: one draw per selected position, ascending, and one more for a random token.
        let p_mask = self.cfg.mask_token_frac;
        let p_random = self.cfg.mask_token_frac + self.cfg.random_token_frac;
        for &p in &out.positions[first..] {
            let p = p as usize;
            out.labels.push(ids[p - base]);
            let r: f64 = rng.random();
            if r < p_mask {
                out.input_ids[p] = self.mask_id;
            } else if r < p_random {
                out.input_ids[p] =
                    self.replacement_ids[rng.random_range(0..self.replacement_ids.len())];
            }
        }
    }
}
