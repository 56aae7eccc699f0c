//! Fused CPU kernels with real backward passes for the hot spots of a BERT step: linear layers
//! with their bias, LayerNorm, the attention probabilities (scale, mask, softmax, dropout), GELU
//! and dropout.
//!
//! candle_nn's fused `layer_norm` and `softmax_last_dim` have no backward (they silently cut the
//! gradient); their differentiable compositions (`layer_norm_slow`, `ops::softmax`) cost five to
//! ten passes over memory forward and more backward, mostly on one thread. Every op candle
//! records also costs a zero-filled gradient buffer and an add in the backward pass, so fewer,
//! larger ops are faster even when the arithmetic is the same. Here each direction is one pass
//! per row, rows shared out with rayon in fixed-size chunks (so sums do not depend on the thread
//! count). Other devices and dtypes fall back to the compositions. `tests.rs` checks every fused
//! op against its composition, forward and backward.
//!
//! One file per kernel: `linear.rs`, `layer_norm.rs`, `softmax.rs` (the attention probabilities
//! and a last-dimension softmax), `attention.rs` (self-attention as one op), `gelu.rs`, `geglu.rs`, `rotary.rs`,
//! `dropout.rs`, `cross_entropy.rs`, `attached.rs` (the GPU path: candle's forward kernels
//! with these backward passes attached), `cuda.rs` (the ops Kindling's CUDA kernels serve outside
//! the encoder layer) and `kernels.rs` ([`Kernels`], the path a model takes,
//! chosen when it is built: each op is a method of it, and the free functions are the fused
//! path); the shared pieces are `par.rs` (rayon chunks, AVX2 dispatch), `math.rs`, `matmul.rs`
//! (the gemm crate) and `cpu.rs` (storage access).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D,
};
use kindling_core::attach::{attach_grad, ValueGrad};
use rayon::prelude::*;
use std::sync::Mutex;

mod attached;
mod attention;
mod cpu;
mod cross_entropy;
#[cfg(any(feature = "cuda", test))]
mod cuda;
mod dropout;
mod geglu;
mod gelu;
mod kernels;
mod l2;
mod layer_norm;
mod linear;
mod math;
mod matmul;
mod par;
mod rotary;
mod softmax;

pub use attached::*;
pub use attention::*;
pub(crate) use cpu::*;
pub use cross_entropy::*;
#[cfg(any(feature = "cuda", test))]
pub(crate) use cuda::{gather_rows, scatter_rows};
pub use dropout::*;
pub(crate) use geglu::{geglu_grad_rows, geglu_rows};
pub use gelu::*;
pub use kernels::*;
pub use l2::*;
pub use layer_norm::*;
pub use linear::*;
pub(crate) use math::*;
pub(crate) use matmul::*;
pub(crate) use par::*;
pub(crate) use rotary::RotaryTable;
pub use softmax::*;

#[cfg(test)]
mod tests;
