//! Which implementation of the hot ops a model runs, chosen once when the model is built.

use super::*;

/// The kernel path of a model: a field of its config (`[model] kernels = "fused" | "composed"`
/// in a recipe, like candle-transformers' `use_flash_attn`), copied into every layer when the
/// model is built. Not part of `config.json`: it changes how the numbers are computed, not
/// which numbers (the two paths agree to rounding, `tests.rs` and the model tests check it).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// This crate's fused ops, each with its own backward, on CPU f32 (one autograd node per
    /// encoder layer where the layer fuses); on CUDA candle_nn's fused softmax and LayerNorm
    /// kernels with this crate's backward attached; candle's compositions for other dtypes and
    /// devices.
    #[default]
    Fused,
    /// candle's compositions on every device, each op its own autograd node: the reference the
    /// fused path is checked and timed against (a bert-mini MLM step on 2 CPU cores took 2.1x as
    /// long, docs/perf.md).
    Composed,
}

impl Kernels {
    /// The recipe spellings, for error messages.
    pub const NAMES: [&'static str; 2] = ["fused", "composed"];

    /// Whether `x` goes through this crate's CPU kernels (CPU f32 on the fused path).
    pub fn fuses(self, x: &Tensor) -> bool {
        self == Kernels::Fused && fused_ok(x)
    }

    /// Whether `x`'s softmax and LayerNorm run as candle_nn's fused kernels with this crate's
    /// backward attached (CUDA on the fused path).
    pub fn attaches(self, x: &Tensor) -> bool {
        self == Kernels::Fused && x.device().is_cuda()
    }

    /// Rows `ids` (u32, any shape, taken flat) of `table`: (ids, width). candle's row lookup;
    /// on CUDA on the fused path its gradient is Kindling's grouped-sum kernel instead of
    /// candle's index_add.
    pub fn embedding(self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self == Kernels::Fused && ids.dtype() == DType::U32 && super::cuda::serves(table) {
            return super::cuda::embedding_lookup(table, ids);
        }
        table.index_select(&ids.flatten_all()?, 0)
    }
}
