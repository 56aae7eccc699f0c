//! The masked-autoencoder decoder (He et al., 2022, <https://arxiv.org/abs/2111.06377>) with the
//! parameter names of HF `transformers`' `ViTMAEDecoder` (under `decoder.`), and MAE's loss.
//!
//! The encoder (`crate::vit::ViTModel::forward_visible`) sees `[CLS]` and the visible quarter
//! of the patches. The decoder projects its output to `decoder_hidden_size`, puts a shared
//! learned `mask_token` in the place of every hidden patch, adds its own positions, runs a few
//! ViT blocks, a LayerNorm and a linear layer to each patch's pixels. The loss is the mean
//! squared error on the hidden patches only, against the pixels normalised per patch
//! (`norm_pix_loss`, the paper's better-working target). Positions here are learned (HF's
//! MAE fixes both tables at 2-D sine-cosine values): the encoder is exported as `ViTModel`,
//! whose positions are learned too.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::{LayerNorm, Linear};
use crate::vit::{linear, norm, ViTConfig, ViTLayer};
use crate::{ModelError, Result};
use kindling_core::Mode;

/// The decoder's shape, HF `ViTMAEConfig`'s names (defaults a small decoder, as the paper's
/// ablations find enough: 512 wide, 8 blocks for ViT-L; recipes set their own).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaeDecoderConfig {
    pub decoder_hidden_size: usize,
    pub decoder_num_hidden_layers: usize,
    pub decoder_num_attention_heads: usize,
    pub decoder_intermediate_size: usize,
}

impl Default for MaeDecoderConfig {
    fn default() -> Self {
        MaeDecoderConfig {
            decoder_hidden_size: 512,
            decoder_num_hidden_layers: 8,
            decoder_num_attention_heads: 16,
            decoder_intermediate_size: 2048,
        }
    }
}

impl MaeDecoderConfig {
    /// The decoder's blocks as a ViT config of their own (the encoder's patches, norms and
    /// dropout).
    fn blocks(&self, encoder: &ViTConfig) -> ViTConfig {
        ViTConfig {
            hidden_size: self.decoder_hidden_size,
            num_hidden_layers: self.decoder_num_hidden_layers,
            num_attention_heads: self.decoder_num_attention_heads,
            intermediate_size: self.decoder_intermediate_size,
            ..encoder.clone()
        }
    }

    /// Errors name the key under `prefix` (`loss.`).
    pub fn validate(&self, encoder: &ViTConfig) -> Result<()> {
        for (field, v) in [
            ("decoder_hidden_size", self.decoder_hidden_size),
            (
                "decoder_num_attention_heads",
                self.decoder_num_attention_heads,
            ),
            ("decoder_intermediate_size", self.decoder_intermediate_size),
        ] {
            if v == 0 || v > 1 << 16 {
                return Err(ModelError::Setting {
                    field,
                    msg: format!("must be in 1..={}, got {v}", 1 << 16),
                });
            }
        }
        if self.decoder_hidden_size % self.decoder_num_attention_heads != 0 {
            return Err(ModelError::Setting {
                field: "decoder_num_attention_heads",
                msg: format!(
                    "decoder_hidden_size ({}) must be a multiple of it ({})",
                    self.decoder_hidden_size, self.decoder_num_attention_heads
                ),
            });
        }
        self.blocks(encoder).validate()
    }

    /// Matmul FLOPs of one decoder pass over one image (every patch and `[CLS]`).
    pub fn forward_flops(&self, encoder: &ViTConfig) -> f64 {
        let blocks = self.blocks(encoder);
        let t = encoder.seq_len() as f64;
        let (h, d) = (encoder.hidden_size as f64, self.decoder_hidden_size as f64);
        let pixels = (encoder.patch_size * encoder.patch_size * encoder.num_channels) as f64;
        let patch_projection = 2.0 * (t - 1.0) * pixels * d;
        let inner = blocks.forward_flops() - patch_projection;
        2.0 * t * h * d + inner + 2.0 * (t - 1.0) * d * pixels
    }
}

/// HF `ViTMAEDecoder`: `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_layers`,
/// `decoder_norm`, `decoder_pred`.
#[derive(Debug, Clone)]
pub struct ViTMaeDecoder {
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_pos_embed: Tensor,
    layers: Vec<ViTLayer>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
    /// patches per image
    patches: usize,
}

impl ViTMaeDecoder {
    pub fn load(vb: VarBuilder, encoder: &ViTConfig, cfg: &MaeDecoderConfig) -> Result<Self> {
        cfg.validate(encoder)?;
        let blocks = cfg.blocks(encoder);
        let (h, d) = (encoder.hidden_size, cfg.decoder_hidden_size);
        let pixels = encoder.patch_size * encoder.patch_size * encoder.num_channels;
        let zeros = candle_nn::Init::Const(0.0);
        // Dropout sites after the encoder's (1 + 3 * layer): the decoder draws its own masks.
        let first_site = encoder.num_hidden_layers + 1;
        let layers = (0..cfg.decoder_num_hidden_layers)
            .map(|i| ViTLayer::load(vb.pp("decoder_layers").pp(i), &blocks, first_site + i))
            .collect::<candle_core::Result<_>>()?;
        Ok(ViTMaeDecoder {
            decoder_embed: linear(&blocks, vb.pp("decoder_embed"), h, d, true)?,
            mask_token: vb.get_with_hints((1, 1, d), "mask_token", zeros)?,
            decoder_pos_embed: vb.get_with_hints(
                (1, encoder.seq_len(), d),
                "decoder_pos_embed",
                zeros,
            )?,
            layers,
            decoder_norm: norm(&blocks, vb.pp("decoder_norm"))?,
            decoder_pred: linear(&blocks, vb.pp("decoder_pred"), d, pixels, true)?,
            patches: encoder.seq_len() - 1,
        })
    }

    /// Each image's predicted patch pixels, (batch * patches, pixels per patch), from the
    /// encoder's output over `[CLS]` and `k` visible patches each (batch * (k + 1), hidden).
    /// `restore` (u32, batch * (patches + 1)) says where each decoder row comes from: image i's
    /// row 0 is `i * (k + 1)` (its `[CLS]`), a visible patch its encoded row, a hidden one
    /// `batch * (k + 1)` (the mask token); [`Masking`] builds it.
    pub fn forward_t(
        &self,
        encoded: &Tensor,
        restore: &Tensor,
        batch: usize,
        mode: Mode,
    ) -> Result<Tensor> {
        let n = self.patches;
        let x = self.decoder_embed.forward(encoded)?;
        let d = x.dim(1)?;
        let mask = self.mask_token.reshape((1, d))?.to_dtype(x.dtype())?;
        let rows = Tensor::cat(&[&x, &mask], 0)?.index_select(restore, 0)?;
        let t = n + 1;
        let mut xs = rows
            .reshape((batch, t, d))?
            .broadcast_add(&self.decoder_pos_embed.to_dtype(x.dtype())?)?
            .reshape((batch * t, d))?;
        let no_padding = Tensor::zeros((batch, t), DType::F32, xs.device())?;
        for layer in &self.layers {
            xs = layer.forward_t(&xs, (batch, t), &no_padding, mode)?;
        }
        let pred = self
            .decoder_pred
            .forward(&self.decoder_norm.forward(&xs)?)?;
        let pixels = pred.dim(1)?;
        Ok(pred
            .reshape((batch, t, pixels))?
            .narrow(1, 1, n)?
            .reshape((batch * n, pixels))?)
    }
}

/// One batch's masking: which patches the encoder sees and how the decoder puts them back.
#[derive(Debug, Clone, PartialEq)]
pub struct Masking {
    /// visible patches per image
    pub k: usize,
    /// image after image, its `k` visible patches as `image * patches + patch`, increasing
    pub keep: Vec<u32>,
    /// the hidden patches the same way (the loss's rows)
    pub hidden: Vec<u32>,
    /// the decoder's row sources (see [`ViTMaeDecoder::forward_t`])
    pub restore: Vec<u32>,
}

impl Masking {
    /// Hides `ratio` of each image's `patches` (rounded so that at least one patch stays
    /// visible and one hidden), a uniformly random subset per image: image i's order is
    /// `order(i)`, a permutation of `0..patches`, whose first `k` entries stay visible.
    pub fn new(
        batch: usize,
        patches: usize,
        ratio: f64,
        mut order: impl FnMut(usize) -> Vec<u32>,
    ) -> Self {
        let k = ((patches as f64 * (1.0 - ratio)).round() as usize).clamp(1, patches.max(2) - 1);
        let (mut keep, mut hidden) = (Vec::new(), Vec::new());
        let mut restore = Vec::with_capacity(batch * (patches + 1));
        let mask_row = (batch * (k + 1)) as u32;
        for i in 0..batch {
            let perm = order(i);
            let mut visible: Vec<u32> = perm[..k].to_vec();
            visible.sort_unstable();
            let base = (i * patches) as u32;
            keep.extend(visible.iter().map(|&p| base + p));
            let first = (i * (k + 1)) as u32;
            restore.push(first);
            let mut slot = 0;
            for p in 0..patches as u32 {
                if visible.get(slot) == Some(&p) {
                    slot += 1;
                    restore.push(first + slot as u32);
                } else {
                    hidden.push(base + p);
                    restore.push(mask_row);
                }
            }
        }
        Masking {
            k,
            keep,
            hidden,
            restore,
        }
    }
}

/// MAE's loss: the mean squared error between `pred` and the pixel `target` rows (both (batch
/// * patches, pixels)) at the `hidden` rows; with `norm_pix`, each target patch normalised to
/// mean 0 and variance 1 first (the unbiased variance, + 1e-6, as MAE's code).
pub fn masked_patch_loss(
    pred: &Tensor,
    target: &Tensor,
    hidden: &Tensor,
    norm_pix: bool,
) -> Result<Tensor> {
    let pred = pred.index_select(hidden, 0)?.to_dtype(DType::F32)?;
    let mut target = target.index_select(hidden, 0)?.to_dtype(DType::F32)?;
    if norm_pix {
        let n = target.dim(1)? as f64;
        let mean = target.mean_keepdim(1)?;
        let centred = target.broadcast_sub(&mean)?;
        let var = (centred.sqr()?.sum_keepdim(1)? / (n - 1.0).max(1.0))?;
        target = centred.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
    }
    Ok((pred - target.detach())?.sqr()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every image keeps the same count, visible and hidden patches split its patches, and the
    /// decoder's rows put each encoded patch back at its place.
    #[test]
    fn masking_splits_each_image_and_restores_the_order() {
        let orders = [vec![3u32, 0, 5, 1, 2, 4], vec![1, 2, 0, 3, 4, 5]];
        let m = Masking::new(2, 6, 0.5, |i| orders[i].clone());
        assert_eq!(m.k, 3);
        assert_eq!(m.keep, [0, 3, 5, 6 + 0, 6 + 1, 6 + 2]);
        assert_eq!(m.hidden, [1, 2, 4, 6 + 3, 6 + 4, 6 + 5]);
        // rows: image 0's [CLS] 0, patches 1..=3; image 1's [CLS] 4, patches 5..=7; mask 8.
        assert_eq!(m.restore, [0, 1, 8, 8, 2, 8, 3, 4, 5, 6, 7, 8, 8, 8]);
        // 0.75 of 49 patches: 12 visible.
        let m = Masking::new(1, 49, 0.75, |_| (0..49).collect());
        assert_eq!((m.k, m.hidden.len()), (12, 37));
    }

    /// The normalised target has mean 0 and unit (unbiased) variance per patch, and the loss
    /// reads only the hidden rows.
    #[test]
    fn the_loss_reads_hidden_rows_of_normalised_targets() {
        let dev = candle_core::Device::Cpu;
        let target = Tensor::new(
            &[[1f32, 2., 3., 4.], [10., 10., 10., 10.], [0., 2., 0., 2.]],
            &dev,
        )
        .unwrap();
        let pred = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let hidden = Tensor::new(&[0u32, 2], &dev).unwrap();
        let plain = masked_patch_loss(&pred, &target, &hidden, false).unwrap();
        let expected = (1. + 4. + 9. + 16. + 0. + 4. + 0. + 4.) / 8.;
        assert!((plain.to_scalar::<f32>().unwrap() - expected).abs() < 1e-6);
        // Normalised, each row's squares sum to n - 1 (over n values): (3 + 3) / 8.
        let normed = masked_patch_loss(&pred, &target, &hidden, true).unwrap();
        assert!((normed.to_scalar::<f32>().unwrap() - 0.75).abs() < 1e-4);
    }
}
