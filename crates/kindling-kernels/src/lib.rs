//! Kindling's CUDA kernels and the calls that launch them on candle's CUDA tensors.
//!
//! `src/kernels.cu` holds the kernels (CUDA C, compiled to PTX by nvcc in `build.rs` with the
//! `cuda` feature, loaded by the driver on first use, as candle's own kernels are). This crate
//! gives each one a typed Rust call on [`candle_core::Tensor`]s: contiguous CUDA inputs in f32,
//! bf16 or f16, new tensors out (f32 where a value is a statistic or a parameter's gradient).
//! The calls build no autograd graph: the models attach their backward passes themselves
//! (`kindling-models`' CUDA encoder layer), and each call here has its backward call beside it.
//!
//! Why kernels of our own: a BERT-base bf16 step on one H200 spent 15 of 397 ms in matrix
//! products and the rest in candle's element-wise passes (docs/perf.md). Each kernel here is one
//! pass over memory where the composed ops made five to fifteen. The matrix products stay with
//! cuBLAS through candle's `matmul`.
//!
//! Where no GPU is, the same kernel source runs on the CPU under a small emulation of CUDA's
//! thread model (`emulate/`): `tests/emulated.rs` checks each kernel there against reference
//! loops in double, and the `emulate` feature (on in test builds, through the models' dev-
//! dependency) gives the launchers an emulated backend on CPU tensors, so the code built on
//! them (the CUDA encoder layer) is tested against candle's ops on the CPU. Without `cuda` or
//! `emulate` the launchers return an error.

mod launchers;
pub use launchers::*;

#[cfg(feature = "cuda")]
#[path = "backend_cuda.rs"]
mod backend;
#[cfg(all(feature = "emulate", not(feature = "cuda")))]
#[path = "backend_emulated.rs"]
mod backend;
#[cfg(not(any(feature = "cuda", feature = "emulate")))]
#[path = "backend_none.rs"]
mod backend;

/// Where the launchers run: `Some("cuda")`, `Some("emulated")` (CPU tensors, for tests), or
/// None (built without either: every launcher returns an error).
pub const BACKEND: Option<&str> = if cfg!(feature = "cuda") {
    Some("cuda")
} else if cfg!(feature = "emulate") {
    Some("emulated")
} else {
    None
};

/// The dropout threshold of the kernels for drop probability `p`: a 16-bit draw below it drops
/// (`kindling_models::ops::keep_at`'s resolution, 1/65536).
pub fn dropout_threshold(p: f32) -> u32 {
    (p * 65536.0).round() as u32
}

/// One dropout site as the kernels take it: the mask stream and the drop probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// `(p, seed)` as the models keep a site (None: no dropout).
    pub fn from_site(site: Option<(f32, u64)>) -> Option<Dropout> {
        site.filter(|(p, _)| *p > 0.0)
            .map(|(p, seed)| Dropout { p, seed })
    }
}

/// The largest row width the LayerNorm kernels take (their backward keeps five rows of f32 in
/// a block's 48 KiB of shared memory); wider rows go to the composed ops.
pub const MAX_LAYER_NORM_WIDTH: usize = 2048;
