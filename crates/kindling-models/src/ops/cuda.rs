//! The GPU ops outside the encoder layer that Kindling's CUDA kernels serve (`kindling-kernels`):
//! the dropout mask, the cross-entropy with its gradient, the embedding lookup's gradient.
//! Each attaches its backward pass with [`attach_grad`].

#[allow(unused_imports)]
use super::*;

use kindling_kernels::Dropout;

/// Whether `x` is a CUDA tensor the kernels take.
pub(super) fn serves(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// [`dropout_mask`]'s mask made on the device with the CPU's draws.
pub(super) fn dropout_mask(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    kindling_kernels::dropout_mask(x.shape(), x.dtype(), x.device(), Dropout { p, seed })
}

/// The mean cross-entropy's gradient, computed in the forward kernel's pass and kept.
struct CrossEntropyGrad(Tensor);

impl ValueGrad for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "kindling-cross-entropy-cuda"
    }

    fn grad(&self, _logits: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Tensor> {
        self.0.broadcast_mul(&g.to_dtype(self.0.dtype())?)
    }
}

/// Mean cross-entropy of logits (n, classes) against u32 labels on a GPU: one kernel pass
/// for the loss and (when the logits track a graph) the gradient, a second for the mean.
pub(super) fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (loss, grad) = kindling_kernels::cross_entropy(logits, labels, logits.track_op())?;
    match grad {
        Some(g) => attach_grad(logits, &loss, CrossEntropyGrad(g)),
        None => Ok(loss),
    }
}

/// The gradient of a row lookup into a table, from the ids (kept on the host).
struct LookupGrad {
    ids: Vec<u32>,
}

impl ValueGrad for LookupGrad {
    fn name(&self) -> &'static str {
        "kindling-embedding-lookup-cuda"
    }

    fn grad(&self, table: &Tensor, _rows: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (vocab, _) = table.dims2()?;
        kindling_kernels::embedding_grad(g, &self.ids, vocab)?.to_dtype(table.dtype())
    }
}

/// `table[ids]` (ids flat, u32) whose gradient is the kernel's grouped sum instead of candle's
/// index_add (one thread per column, 10 ms of a BERT-base step on an H200).
pub(super) fn embedding_lookup(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let rows = table.index_select(&ids.flatten_all()?, 0)?;
    if !table.track_op() {
        return Ok(rows);
    }
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    attach_grad(table, &rows.detach(), LookupGrad { ids })
}
