//! Concatenate-and-chunk packing (HF `run_mlm`'s `group_texts`, RoBERTa's FULL-SENTENCES):
//! every document is tokenised, the token streams are joined with `[SEP]` between documents,
//! and the stream is cut into blocks of `seq_len - 2` content tokens framed by `[CLS]` ... `[SEP]`.
//! No padding is wasted; the remainder shorter than a block is dropped.

use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::corpus::Corpus;
use crate::error::{DataError, Result};
use crate::tokenizer::SpecialTokens;

/// Per-token flag: a special token (`[CLS]`, `[SEP]`, `[PAD]`...), never masked.
pub const SPECIAL: u8 = 1;
/// Per-token flag: the token starts a word (from the tokenizer's word ids, so it works for any
/// tokenizer, not only "##"-continuation WordPiece). Whole-word masking groups on it.
pub const WORD_START: u8 = 2;

/// Fixed-length token blocks with per-token flags, stored flat.
#[derive(Debug, Clone, Default)]
pub struct PackedBlocks {
    pub seq_len: usize,
    /// (n_blocks * seq_len) token ids.
    pub ids: Vec<u32>,
    /// (n_blocks * seq_len) flags, `SPECIAL | WORD_START` bits.
    pub flags: Vec<u8>,
}

/// Fixed-length blocks by index: packed in memory ([`PackedBlocks`]) or cut from token shards on
/// disk ([`crate::shards::ShardBlocks`]). What the loader and the eval batches read.
pub trait Blocks: Send + Sync {
    /// Tokens per block, `[CLS]` and `[SEP]` included.
    fn seq_len(&self) -> usize;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies block `i` into `ids` and `flags` (each `seq_len` long).
    fn read_block(&self, i: usize, ids: &mut [u32], flags: &mut [u8]);
}

impl Blocks for PackedBlocks {
    fn seq_len(&self) -> usize {
        self.seq_len
    }
    fn len(&self) -> usize {
        PackedBlocks::len(self)
    }
    fn read_block(&self, i: usize, ids: &mut [u32], flags: &mut [u8]) {
        let (a, b) = self.block(i);
        ids.copy_from_slice(a);
        flags.copy_from_slice(b);
    }
}

impl PackedBlocks {
    pub fn len(&self) -> usize {
        self.ids.len().checked_div(self.seq_len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn block(&self, i: usize) -> (&[u32], &[u8]) {
        let r = i * self.seq_len..(i + 1) * self.seq_len;
        (&self.ids[r.clone()], &self.flags[r])
    }

    /// Tokenises and packs a corpus. Paragraphs are encoded in parallel; the result does not
    /// depend on the thread count.
    pub fn pack(
        corpus: &Corpus,
        tk: &Tokenizer,
        sp: &SpecialTokens,
        seq_len: usize,
    ) -> Result<Self> {
        if seq_len < 3 {
            return Err(DataError::Config {
                key: "data.seq_len",
                msg: format!("must be at least 3 ([CLS] x [SEP]), got {seq_len}"),
            });
        }
        // Content stream: (id, flags).
        let mut stream_ids: Vec<u32> = Vec::new();
        let mut stream_flags: Vec<u8> = Vec::new();
        for (d, doc) in corpus.documents.iter().enumerate() {
            let paragraphs = doc.paragraphs();
            let encoded: Vec<_> = paragraphs
                .par_iter()
                .map(|p| tk.encode(p.as_str(), false))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| {
                    DataError::Tokenizer(format!("encoding {}: {e}", doc.path.display()))
                })?;
            if d > 0 && !stream_ids.is_empty() {
                stream_ids.push(sp.sep);
                stream_flags.push(SPECIAL);
            }
            for enc in &encoded {
                let mut prev_word = None;
                for (&id, &word) in enc.get_ids().iter().zip(enc.get_word_ids()) {
                    let special = sp.all.binary_search(&id).is_ok();
                    let start = word.is_none() || word != prev_word;
                    prev_word = word;
                    stream_ids.push(id);
                    stream_flags.push(if special {
                        SPECIAL
                    } else if start {
                        WORD_START
                    } else {
                        0
                    });
                }
            }
        }
        let body = seq_len - 2;
        let n_blocks = stream_ids.len() / body;
        let mut ids = Vec::with_capacity(n_blocks * seq_len);
        let mut flags = Vec::with_capacity(n_blocks * seq_len);
        for b in 0..n_blocks {
            ids.push(sp.cls);
            flags.push(SPECIAL);
            ids.extend_from_slice(&stream_ids[b * body..(b + 1) * body]);
            let f = &stream_flags[b * body..(b + 1) * body];
            flags.extend_from_slice(f);
            // A block that starts mid-word starts a new word group for masking purposes.
            if f[0] & SPECIAL == 0 {
                let i = flags.len() - body;
                flags[i] |= WORD_START;
            }
            ids.push(sp.sep);
            flags.push(SPECIAL);
        }
        if n_blocks == 0 {
            return Err(DataError::EmptyCorpus {
                what: format!(
                    "{} tokens do not fill one block of seq_len {seq_len}",
                    stream_ids.len()
                ),
            });
        }
        Ok(PackedBlocks {
            seq_len,
            ids,
            flags,
        })
    }

    /// Splits off the last `fraction` of blocks as the held-out split (at least one block each).
    pub fn split_tail(mut self, fraction: f64) -> Result<(PackedBlocks, PackedBlocks)> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(DataError::Config {
                key: "data.eval_fraction",
                msg: format!("must be in [0, 1), got {fraction}"),
            });
        }
        let n = self.len();
        let n_eval = ((n as f64 * fraction).round() as usize)
            .clamp(usize::from(fraction > 0.0), n.saturating_sub(1));
        let cut = (n - n_eval) * self.seq_len;
        let eval = PackedBlocks {
            seq_len: self.seq_len,
            ids: self.ids.split_off(cut),
            flags: self.flags.split_off(cut),
        };
        Ok((self, eval))
    }

    /// Counts of each non-special token id (length `vocab_size`).
    pub fn token_counts(&self, vocab_size: usize) -> Vec<u64> {
        let mut counts = vec![0u64; vocab_size];
        for (&id, &f) in self.ids.iter().zip(&self.flags) {
            if f & SPECIAL == 0 {
                counts[id as usize] += 1;
            }
        }
        counts
    }
}

/// The unigram baseline: cross-entropy (nats) of `eval`'s non-special tokens under `train`'s
/// token frequencies, add-one smoothed over the vocabulary. It is the best loss a model that
/// ignores context can reach; an MLM must go below it to show it learned from context.
pub fn unigram_cross_entropy(train: &PackedBlocks, eval: &PackedBlocks, vocab_size: usize) -> f64 {
    unigram_from_counts(
        &train.token_counts(vocab_size),
        &eval.token_counts(vocab_size),
    )
}

/// The unigram baseline from token counts of the training and the eval split.
pub fn unigram_from_counts(train: &[u64], eval: &[u64]) -> f64 {
    let total: f64 = train.iter().sum::<u64>() as f64 + train.len() as f64;
    let (mut nll, mut n) = (0.0, 0u64);
    for (&c, &e) in train.iter().zip(eval) {
        if e > 0 {
            nll -= e as f64 * ((c as f64 + 1.0) / total).ln();
            n += e;
        }
    }
    nll / n.max(1) as f64
}
