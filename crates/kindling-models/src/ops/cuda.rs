//! The GPU ops outside the encoder layer that Kindling's CUDA kernels serve (`kindling-kernels`):
//! the dropout mask, the cross-entropy with its gradient, the embedding lookup's gradient.
//! Each attaches its backward pass with [`attach_grad`].

#[allow(unused_imports)]
use super::*;

use kindling_kernels::Dropout;

/// Whether `x` is a CUDA tensor the kernels take.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
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
    if logits.dtype() == DType::F16 {
        // f16 loss scaling multiplies this op's gradient only after it is made: (softmax -
        // onehot) / n kept in f16 would underflow first (n = 2,400 masked rows puts most of it
        // below f16's 6e-8). So f16 logits go through an f32 copy, as autocast does; bf16 has
        // f32's range and stays as it is.
        return cross_entropy(&logits.to_dtype(DType::F32)?, labels);
    }
    let (loss, grad) = kindling_kernels::cross_entropy(logits, labels, logits.track_op())?;
    match grad {
        Some(g) => attach_grad(logits, &loss, CrossEntropyGrad(g)),
        None => Ok(loss),
    }
}

/// Moves of whole rows between a padded (total, width) tensor and its unpadded rows.
enum RowMove {
    /// value = x[map]: the gradient scatters back.
    Gather { map: Tensor, total: usize },
    /// value = zeros(total) with rows map = x: the gradient gathers.
    Scatter { map: Tensor },
}

impl ValueGrad for RowMove {
    fn name(&self) -> &'static str {
        "kindling-row-move-cuda"
    }

    fn grad(&self, _x: &Tensor, _value: &Tensor, g: &Tensor) -> Result<Tensor> {
        match self {
            RowMove::Gather { map, total } => scatter_value(g, *total, map),
            RowMove::Scatter { map } => gather_value(g, map),
        }
    }
}

fn gather_value(x: &Tensor, map: &Tensor) -> Result<Tensor> {
    let (total, width) = x.dims2()?;
    kindling_kernels::heads_to_rows(&x.reshape((1, 1, total, width))?, Some(map))
}

fn scatter_value(x: &Tensor, total: usize, map: &Tensor) -> Result<Tensor> {
    let width = x.dim(1)?;
    kindling_kernels::rows_to_heads(x, (1, total, 1), Some(map))?.reshape((total, width))
}

/// Rows `map` (u32) of `x` (total, width): one kernel each way (candle's index_select has
/// index_add, one thread per column, as its backward).
pub(crate) fn gather_rows(x: &Tensor, map: &Tensor) -> Result<Tensor> {
    let total = x.dim(0)?;
    let value = gather_value(x, map)?;
    attach_grad(
        x,
        &value,
        RowMove::Gather {
            map: map.clone(),
            total,
        },
    )
}

/// `x` (rows, width) placed at rows `map` of a zero (total, width) tensor.
pub(crate) fn scatter_rows(x: &Tensor, total: usize, map: &Tensor) -> Result<Tensor> {
    let value = scatter_value(x, total, map)?;
    attach_grad(x, &value, RowMove::Scatter { map: map.clone() })
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

/// The wrappers on the kernels' CPU emulation (`kindling-kernels`' `emulate` backend) against
/// the CPU's ops.
#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n as u64)
            .map(|i| (kindling_core::rng::mix64(seed ^ i) % 2001) as f32 / 250.0 - 4.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn cross_entropy_kernel_gives_the_fused_cpu_loss_and_gradient() {
        let x = Var::from_tensor(&random((7, 301), 1)).unwrap();
        let labels = Tensor::new(&[0u32, 300, 5, 5, 150, 299, 1], &Device::Cpu).unwrap();
        let (l1, l2) = (
            cross_entropy(x.as_tensor(), &labels).unwrap(),
            crate::ops::cross_entropy(x.as_tensor(), &labels).unwrap(),
        );
        assert!(max_diff(&l1, &l2) < 1e-5, "{l1} {l2}");
        // Scaled by an upstream gradient of 3: the kept gradient is multiplied by it.
        let g1 = (l1 * 3.0).unwrap().backward().unwrap();
        let g2 = (l2 * 3.0).unwrap().backward().unwrap();
        let (g1, g2) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(g1, g2) < 1e-6,
            "gradient differs by {}",
            max_diff(g1, g2)
        );
    }

    #[test]
    fn embedding_lookup_gradient_equals_index_adds() {
        let table = Var::from_tensor(&random((13, 70), 2)).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 3, 0], [12, 3, 7, 2]], &Device::Cpu).unwrap();
        let r = random((8, 70), 3);
        let rows = embedding_lookup(table.as_tensor(), &ids).unwrap();
        let want = table
            .as_tensor()
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap();
        assert_eq!(max_diff(&rows, &want), 0.0);
        let g1 = (&rows * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (
            g1.get(table.as_tensor()).unwrap(),
            g2.get(table.as_tensor()).unwrap(),
        );
        assert!(max_diff(g1, g2) < 1e-5);
    }

    #[test]
    fn dropout_mask_kernel_is_the_cpu_mask() {
        let x = random((33, 65), 4);
        for (p, seed) in [(0.1, 5), (0.5, 77)] {
            let got = dropout_mask(&x, p, seed).unwrap();
            let want = crate::ops::dropout_mask(&x, p, seed).unwrap();
            assert_eq!(max_diff(&got, &want), 0.0, "p {p}, seed {seed}");
        }
    }
}
