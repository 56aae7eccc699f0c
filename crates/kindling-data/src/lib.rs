//! Kindling's data path for text: read a corpus, tokenise it, pack it into fixed-length blocks,
//! and make the self-labels (dynamic MLM masks) that a masked-LM objective trains on.
//!
//! ```text
//! corpus files ─► Corpus ─► tokenize + pack ─► PackedBlocks ─► Masker ─► MlmBatch
//!   (txt, .gz)    (UTF-8    (rayon over        (train / eval   (seed, epoch,   (flat ids,
//!                 checked)   paragraphs)        split)          index)          positions, labels)
//! ```
//!
//! For images: an [`ImageSource`] (IDX, a folder of PNG/JPEG, packed image shards, CSV of
//! pixels) gives an [`ImageSet`]; a [`ViewLoader`] turns each image into two or more augmented views (the
//! self-labels of SimCLR, BYOL and the rest), seeded the same way as the masks.
//!
//! This crate knows nothing about tensors: batches are plain vectors, turned into tensors by the
//! recipe that consumes them, so the pipeline can be tested and benchmarked on its own.

pub mod augment;
pub mod corpus;
pub mod error;
pub mod image_shards;
pub mod images;
pub mod labelled;
pub mod loader;
pub mod masking;
pub mod packing;
mod parquet_source;
pub mod shards;
pub mod tokenizer;

pub use augment::{build_views, Image, Stage, ViewBatch, ViewLoader, ViewPipeline};
pub use corpus::{Corpus, Document, TextTable};
pub use error::{DataError, Result};
pub use images::{ImageSet, ImageSource, OnCorrupt};
pub use labelled::{
    read_examples_with, read_table, Example, LabelSet, OnInvalid, Row, Skipped, SkippedRow,
    TableSpec,
};
pub use loader::{eval_batches, Cursor, MlmBatch, MlmLoader, Prefetch};
pub use masking::{MaskConfig, MaskedBlock, Masker};
pub use packing::{unigram_cross_entropy, unigram_from_counts, Blocks, PackedBlocks};
pub use shards::{PrepareConfig, PrepareReport, ShardBlocks, ShardStream};
pub use tokenizer::{SpecialTokens, TokenizerConfig, TokenizerKind, TokenizerTraining};

/// A file's bytes, gunzipped when it is gzip (by its magic bytes, whatever its name says).
pub(crate) fn read_maybe_gz(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 3);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::io(path, e))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}
