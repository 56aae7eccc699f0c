//! HF initialisation (`BertPreTrainedModel._init_weights`), seeded per parameter name:
//! weights ~ N(0, initializer_range), biases 0, norm weights 1 (BERT's `LayerNorm`, RoBERTa's
//! `layer_norm`, ModernBERT's `*norm`) and biases 0, the padding row
//! of the word embeddings 0. Each tensor draws from its own stream `(seed, name)`, so the
//! result does not depend on the order parameters were created in or on the thread count.

use candle_core::Tensor;
use candle_nn::VarMap;
use rand_distr::{Distribution, Normal};

use kindling_core::rng::{self, domain, hash_str};

use crate::Result;

/// Re-initialises every variable of `varmap` in place.
pub fn hf_init(varmap: &VarMap, seed: u64, std: f64, pad_token_id: Option<usize>) -> Result<()> {
    reinit(varmap, "", |name, dims| {
        let mut r = rng::rng(&[domain::INIT, seed, hash_str(name)]);
        let normal = Normal::new(0.0f32, std as f32).expect("std is finite and positive");
        let mut v: Vec<f32> = (0..dims.iter().product())
            .map(|_| normal.sample(&mut r))
            .collect();
        if let (Some(pad), true) = (pad_token_id, name.ends_with("word_embeddings.weight")) {
            let h = dims[1];
            v[pad * h..(pad + 1) * h].fill(0.0);
        }
        v
    })
}

/// `n` draws from N(0, `std`) truncated at +-`cut` (redrawn beyond it; no truncation when `cut`
/// is 0), from the stream `(seed, name)`: HF's `trunc_normal_` initialisations (ModernBERT, ViT).
pub(crate) fn truncated_normal(seed: u64, name: &str, std: f32, cut: f32, n: usize) -> Vec<f32> {
    if std == 0.0 {
        return vec![0.0; n];
    }
    let mut r = rng::rng(&[domain::INIT, seed, hash_str(name)]);
    let normal = Normal::new(0.0f32, std).expect("std is finite and positive");
    (0..n)
        .map(|_| loop {
            let x = normal.sample(&mut r);
            if x.abs() <= cut || cut == 0.0 {
                break x;
            }
        })
        .collect()
}

/// Whether `name` is a normalisation layer's scale: `...LayerNorm.weight` (BERT),
/// `...layer_norm.weight` (RoBERTa's head), `...norm.weight` / `..._norm.weight` (ModernBERT),
/// `...layernorm_before.weight` / `...layernorm_after.weight` (ViT).
pub fn is_norm_weight(name: &str) -> bool {
    name.strip_suffix(".weight")
        .and_then(|m| m.rsplit('.').next())
        .map(|m| m.to_ascii_lowercase())
        .is_some_and(|m| m.ends_with("norm") || m.starts_with("layernorm_"))
}

/// Re-initialises the variables of `varmap` under `prefix`, in name order: norm weights
/// ([`is_norm_weight`]) 1, biases 0, every other tensor `draw(name, dims)`.
pub(crate) fn reinit(
    varmap: &VarMap,
    prefix: &str,
    mut draw: impl FnMut(&str, &[usize]) -> Vec<f32>,
) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock poisoned");
    let mut names: Vec<&String> = data.keys().filter(|n| n.starts_with(prefix)).collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let (shape, device, dtype) = (var.shape().clone(), var.device().clone(), var.dtype());
        let value = if is_norm_weight(name) {
            Tensor::ones(&shape, dtype, &device)?
        } else if name.ends_with("bias") {
            Tensor::zeros(&shape, dtype, &device)?
        } else {
            Tensor::from_vec(draw(name, shape.dims()), &shape, &device)?.to_dtype(dtype)?
        };
        var.set(&value)?;
    }
    Ok(())
}
