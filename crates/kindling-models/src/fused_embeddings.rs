//! `bert.embeddings` as one autograd node (CPU, f32): the word, position and token-type rows
//! summed, LayerNorm, dropout, forward and backward written out by hand.
//!
//! Why: built from candle ops, the embeddings are seven nodes (a row lookup, two reshapes, two
//! broadcast adds, LayerNorm, dropout) over the (tokens, hidden) activations, and candle's
//! backward pass gives every node's input a zero-filled gradient and an add, sums the broadcast
//! adds' gradients with its single-threaded reduction, and copies the whole word table to add
//! the looked-up rows' gradient into it. On the small MLM step (4096 tokens, hidden 512) that
//! bookkeeping and the cross-entropy were most of the 100 ms a step spent outside the encoder
//! layers and the head's products. As one node it is one pass each way plus the word table's
//! gradient, which is zero except at the batch's ids.
//!
//! The arithmetic is the kernels of the separate ops (`layer_norm_rows`, its gradient, seeded
//! dropout with the same stream), so the op computes what the composed embeddings compute, up to
//! summation order; the test checks the output and every gradient against them.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::{
    column_sums, contiguous_f32, cpu_f32, dropout_par, dropped, layer_norm_grad_rows,
    layer_norm_rows, par_new, rows_per_task, saved_activations, zeros_par,
};

/// The embeddings of `ids` (tokens, flat over the batch) as one op on (word embeddings (vocab,
/// hidden), the rest flat: position embeddings (positions, hidden), token-type embeddings
/// (types, hidden), LayerNorm weight and bias).
pub(crate) struct EmbeddingsOp {
    /// Token ids, batch * seq.
    ids: Vec<u32>,
    /// Token-type ids, or all zero.
    types: Option<Vec<u32>>,
    seq: usize,
    hidden: usize,
    /// Rows of the position and token-type tables.
    positions: usize,
    type_vocab: usize,
    eps: f32,
    /// (p, seed) of the dropout after the LayerNorm.
    dropout: Option<(f32, u64)>,
    /// Whether a backward pass can follow (keep the sum before the LayerNorm).
    save: bool,
    saved: Mutex<Option<Vec<f32>>>,
}

impl EmbeddingsOp {
    /// Splits the flat rest into (positions, types, LayerNorm weight, LayerNorm bias).
    fn split<'a>(&self, rest: &'a [f32]) -> (&'a [f32], &'a [f32], &'a [f32], &'a [f32]) {
        let h = self.hidden;
        let (pos, rest) = rest.split_at(self.positions * h);
        let (types, rest) = rest.split_at(self.type_vocab * h);
        let (w, b) = rest.split_at(h);
        (pos, types, w, b)
    }

    fn type_of(&self, row: usize) -> usize {
        self.types.as_ref().map_or(0, |t| t[row] as usize)
    }
}

impl CustomOp2 for EmbeddingsOp {
    fn name(&self) -> &'static str {
        "kindling-embeddings"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let word = contiguous_f32(s1, l1, self.name())?;
        let rest = contiguous_f32(s2, l2, self.name())?;
        let (pos, types, w, b) = self.split(rest);
        let h = self.hidden;
        let per = rows_per_task(h);
        // e = word[id] + position[t] + type[tt], row by row.
        let e = par_new(self.ids.len() * h, per * h, |c, out| {
            for (j, row) in out.chunks_mut(h).enumerate() {
                let r = c * per + j;
                let (id, p, tt) = (self.ids[r] as usize, r % self.seq, self.type_of(r));
                let (wr, pr, tr) = (
                    &word[id * h..(id + 1) * h],
                    &pos[p * h..(p + 1) * h],
                    &types[tt * h..(tt + 1) * h],
                );
                for (((o, a), p), t) in row.iter_mut().zip(wr).zip(pr).zip(tr) {
                    *o = a + p + t;
                }
            }
        });
        let mut y = layer_norm_rows(&e, w, b, self.eps);
        if let Some((p, seed)) = self.dropout {
            dropout_par(seed, p, &mut y);
        }
        if self.save {
            *self.saved.lock().expect("saved activations") = Some(e);
        }
        Ok((CpuStorage::F32(y), Shape::from((self.ids.len(), h))))
    }

    fn bwd(
        &self,
        word: &Tensor,
        rest: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("saved activations");
        let e = saved_activations(&guard, self.name())?;
        let grad = grad.contiguous()?;
        let ((sr, lr), (sg, lg)) = (rest.storage_and_layout(), grad.storage_and_layout());
        let (rest_v, dy) = (cpu_f32(&sr, lr)?, cpu_f32(&sg, lg)?);
        let (_, _, w, _) = self.split(rest_v);
        let h = self.hidden;
        let kept;
        let dy = match self.dropout {
            Some(_) => {
                kept = dropped(self.dropout, dy, h, None);
                &kept[..]
            }
            None => dy,
        };
        let mut de = zeros_par(e.len());
        let mut dln = vec![0f32; 2 * h];
        layer_norm_grad_rows(e, w, dy, self.eps, &mut de, &mut dln);

        // The word table's gradient: each id's rows of de, added in row order. Tasks own
        // ranges of the vocabulary (and each scans every id), so the order does not depend on
        // the thread count.
        let vocab = word.dim(0)?;
        let mut dword = zeros_par(vocab * h);
        const VOCAB_ROWS: usize = 256;
        dword
            .par_chunks_mut(VOCAB_ROWS * h)
            .enumerate()
            .for_each(|(c, dw)| {
                let first = c * VOCAB_ROWS;
                for (r, &id) in self.ids.iter().enumerate() {
                    let id = id as usize;
                    if (first..first + dw.len() / h).contains(&id) {
                        let at = (id - first) * h;
                        dw[at..at + h]
                            .iter_mut()
                            .zip(&de[r * h..(r + 1) * h])
                            .for_each(|(d, g)| *d += g);
                    }
                }
            });

        // The rest: positions (each the sum over the batch, in order), types, LayerNorm.
        let mut drest = vec![0f32; rest_v.len()];
        let (dpos, tail) = drest.split_at_mut(self.positions * h);
        let (dtypes, dln_out) = tail.split_at_mut(self.type_vocab * h);
        let rows = self.ids.len();
        dpos[..self.seq * h]
            .par_chunks_mut(h)
            .enumerate()
            .for_each(|(t, dp)| {
                for r in (t..rows).step_by(self.seq) {
                    dp.iter_mut()
                        .zip(&de[r * h..(r + 1) * h])
                        .for_each(|(d, g)| *d += g);
                }
            });
        match &self.types {
            // Every row has type 0: its gradient is the column sums.
            None => dtypes[..h].copy_from_slice(&column_sums(&de, h)),
            Some(types) => {
                for (r, &tt) in types.iter().enumerate() {
                    let at = tt as usize * h;
                    dtypes[at..at + h]
                        .iter_mut()
                        .zip(&de[r * h..(r + 1) * h])
                        .for_each(|(d, g)| *d += g);
                }
            }
        }
        dln_out.copy_from_slice(&dln);
        let dev = word.device();
        Ok((
            Some(Tensor::from_vec(dword, word.shape(), dev)?),
            Some(Tensor::from_vec(drest, rest.shape(), dev)?),
        ))
    }
}

/// The embedding tables and LayerNorm of `bert.embeddings`.
pub(crate) struct EmbeddingTables<'a> {
    pub word: &'a Tensor,
    pub position: &'a Tensor,
    pub token_type: &'a Tensor,
    pub ln_weight: &'a Tensor,
    pub ln_bias: &'a Tensor,
}

/// `bert.embeddings` of `input_ids` (batch, seq), u32, on CPU f32: (batch * seq, hidden).
pub(crate) fn embeddings(
    input_ids: &Tensor,
    token_type_ids: Option<&Tensor>,
    tables: EmbeddingTables,
    eps: f64,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let (_, seq) = input_ids.dims2()?;
    let (vocab, hidden) = tables.word.dims2()?;
    let (positions, type_vocab) = (tables.position.dim(0)?, tables.token_type.dim(0)?);
    if seq > positions {
        candle_core::bail!(
            "kindling-embeddings: sequence length {seq} exceeds the {positions} position embeddings"
        )
    }
    let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        candle_core::bail!(
            "kindling-embeddings: token id {bad} is outside the vocabulary of {vocab}"
        )
    }
    let types = match token_type_ids {
        Some(t) => {
            let t = t
                .flatten_all()?
                .to_dtype(candle_core::DType::U32)?
                .to_vec1::<u32>()?;
            if let Some(&bad) = t.iter().find(|&&k| k as usize >= type_vocab) {
                candle_core::bail!(
                    "kindling-embeddings: token type {bad} is outside the {type_vocab} types"
                )
            }
            Some(t)
        }
        None => None,
    };
    let rest = Tensor::cat(
        &[
            tables.position.flatten_all()?,
            tables.token_type.flatten_all()?,
            tables.ln_weight.clone(),
            tables.ln_bias.clone(),
        ],
        0,
    )?;
    let op = EmbeddingsOp {
        ids,
        types,
        seq,
        hidden,
        positions,
        type_vocab,
        eps: eps as f32,
        dropout,
        save: tables.word.track_op() || rest.track_op(),
        saved: Mutex::new(None),
    };
    tables.word.contiguous()?.apply_op2(&rest, op)
}
