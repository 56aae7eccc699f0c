//! MAE (He et al., 2022): a ViT encoder sees a random quarter of each image's patches, a light
//! decoder (`kindling_models::vit_mae`) predicts the pixels of the rest, and the loss is the
//! mean squared error on the hidden patches against per-patch normalised pixels. One view per
//! image (crop and flip, as the paper's only augmentation); the encoder is what is exported.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use kindling_core::rng::{self, domain};
use kindling_core::Mode;
use kindling_models::vit_mae::{masked_patch_loss, MaeDecoderConfig, Masking, ViTMaeDecoder};
use kindling_models::{vit::ViTConfig, Backbone};

/// `[loss]` of an MAE recipe: the mask ratio, the target, and the decoder's shape (HF
/// `ViTMAEConfig`'s names).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The fraction of each image's patches hidden from the encoder.
    pub mask_ratio: f64,
    /// Targets are each patch's pixels normalised to mean 0, variance 1 (the paper's better
    /// target; HF's config defaults to false).
    pub norm_pix_loss: bool,
    pub decoder_hidden_size: usize,
    pub decoder_num_hidden_layers: usize,
    pub decoder_num_attention_heads: usize,
    pub decoder_intermediate_size: usize,
}

impl Default for Settings {
    fn default() -> Self {
        let d = MaeDecoderConfig::default();
        Settings {
            mask_ratio: 0.75,
            norm_pix_loss: true,
            decoder_hidden_size: d.decoder_hidden_size,
            decoder_num_hidden_layers: d.decoder_num_hidden_layers,
            decoder_num_attention_heads: d.decoder_num_attention_heads,
            decoder_intermediate_size: d.decoder_intermediate_size,
        }
    }
}

impl Settings {
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            return Err((
                "mask_ratio",
                format!("must be strictly between 0 and 1, got {}", self.mask_ratio),
            ));
        }
        Ok(())
    }

    pub fn decoder(&self) -> MaeDecoderConfig {
        MaeDecoderConfig {
            decoder_hidden_size: self.decoder_hidden_size,
            decoder_num_hidden_layers: self.decoder_num_hidden_layers,
            decoder_num_attention_heads: self.decoder_num_attention_heads,
            decoder_intermediate_size: self.decoder_intermediate_size,
        }
    }
}

/// The decoder and the masking of an MAE run.
pub struct MaeHead {
    decoder: ViTMaeDecoder,
    settings: Settings,
    patches: usize,
}

/// The seed of an evaluation's masks: every evaluation hides the same patches, so eval losses
/// compare across steps.
const EVAL_MASKS: u64 = 0x6576_616c; // "eval"

impl MaeHead {
    pub fn new(encoder: &ViTConfig, settings: Settings, vb: VarBuilder) -> Result<Self> {
        let decoder = ViTMaeDecoder::load(vb, encoder, &settings.decoder())
            .map_err(candle_core::Error::wrap)?;
        Ok(MaeHead {
            decoder,
            settings,
            patches: encoder.seq_len() - 1,
        })
    }

    /// The masks of a batch of `n` images: image i hides a uniformly random subset drawn from
    /// `(seed of the step, i)`.
    pub fn masking(&self, n: usize, mode: Mode) -> Masking {
        let seed = match mode {
            Mode::Train { seed } => seed,
            Mode::Eval => EVAL_MASKS,
        };
        Masking::new(n, self.patches, self.settings.mask_ratio, |i| {
            let mut order: Vec<u32> = (0..self.patches as u32).collect();
            order.shuffle(&mut rng::rng(&[domain::MASK, seed, i as u64]));
            order
        })
    }

    /// The MAE loss of images `x` (batch, h, w, c) through the ViT `encoder`, and the encoder's
    /// `[CLS]` over the visible patches (batch, hidden; what the online probe reads in training).
    pub fn loss(&self, encoder: &Backbone, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let Backbone::ViT(vit) = encoder else {
            candle_core::bail!("MAE needs a ViT backbone (checked when the model is built)")
        };
        let b = x.dim(0)?;
        let m = self.masking(b, mode);
        let dev = x.device();
        let keep = Tensor::from_slice(&m.keep, m.keep.len(), dev)?;
        let restore = Tensor::from_slice(&m.restore, m.restore.len(), dev)?;
        let hidden = Tensor::from_slice(&m.hidden, m.hidden.len(), dev)?;
        let wrap = candle_core::Error::wrap;
        let encoded = vit.forward_visible(x, &keep, m.k, mode).map_err(wrap)?;
        let pred = self
            .decoder
            .forward_t(&encoded, &restore, b, mode)
            .map_err(wrap)?;
        let target = vit.patchify(x).map_err(wrap)?;
        let loss = masked_patch_loss(&pred, &target, &hidden, self.settings.norm_pix_loss)
            .map_err(wrap)?;
        let h = encoded.dim(1)?;
        let cls = encoded
            .reshape((b, m.k + 1, h))?
            .narrow(1, 0, 1)?
            .reshape((b, h))?;
        Ok((loss, cls))
    }

    /// HF `ViTMAEConfig` (`config.json` of the whole model as `ViTMAEForPreTraining`) for the
    /// ViT `encoder` and this head. HF keeps `int(patches * (1 - mask_ratio))` patches where
    /// Kindling rounds; when the two differ the ratio written is one HF floors to Kindling's
    /// count.
    pub fn hf_config(&self, encoder: &ViTConfig) -> serde_json::Value {
        let mut v = encoder.hf_json("ViTMAEForPreTraining");
        let k = self.masking(1, Mode::Eval).k;
        let n = self.patches as f64;
        let ratio = self.settings.mask_ratio;
        let floored = (n * (1.0 - ratio)) as usize;
        let ratio = if floored == k {
            ratio
        } else {
            1.0 - (k as f64 + 0.5) / n
        };
        let d = self.settings.decoder();
        v["model_type"] = "vit_mae".into();
        v["mask_ratio"] = ratio.into();
        v["norm_pix_loss"] = self.settings.norm_pix_loss.into();
        v["decoder_hidden_size"] = d.decoder_hidden_size.into();
        v["decoder_num_hidden_layers"] = d.decoder_num_hidden_layers.into();
        v["decoder_num_attention_heads"] = d.decoder_num_attention_heads.into();
        v["decoder_intermediate_size"] = d.decoder_intermediate_size.into();
        v
    }

    /// Matmul FLOPs of one image's forward pass: the encoder at the visible patches and
    /// `[CLS]`, the decoder at every position.
    pub fn forward_flops(&self, encoder: &ViTConfig) -> f64 {
        let t = encoder.seq_len() as f64;
        let visible = self.masking(1, Mode::Eval).k as f64 + 1.0;
        encoder.forward_flops() * visible / t + self.settings.decoder().forward_flops(encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn head(ratio: f64) -> MaeHead {
        let encoder = ViTConfig {
            image_size: 8,
            patch_size: 2,
            num_channels: 1,
            hidden_size: 8,
            num_attention_heads: 2,
            intermediate_size: 8,
            num_hidden_layers: 1,
            ..ViTConfig::default()
        };
        let settings = Settings {
            mask_ratio: ratio,
            decoder_hidden_size: 8,
            decoder_num_hidden_layers: 1,
            decoder_num_attention_heads: 2,
            decoder_intermediate_size: 8,
            ..Settings::default()
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        MaeHead::new(&encoder, settings, vb).unwrap()
    }

    /// Masks are functions of (step seed, image): the same seed hides the same patches, another
    /// seed or another image others; evaluation always hides the same ones; the ratio sets the
    /// count (16 patches, 0.75: 4 visible).
    #[test]
    fn masks_follow_the_seed_and_the_image() {
        let h = head(0.75);
        let a = h.masking(3, Mode::Train { seed: 1 });
        assert_eq!(a.k, 4);
        assert_eq!(a, h.masking(3, Mode::Train { seed: 1 }));
        assert_ne!(a.keep, h.masking(3, Mode::Train { seed: 2 }).keep);
        let per_image: Vec<Vec<u32>> = a
            .keep
            .chunks(4)
            .enumerate()
            .map(|(i, c)| c.iter().map(|p| p - 16 * i as u32).collect())
            .collect();
        assert!(per_image[0] != per_image[1] || per_image[1] != per_image[2]);
        assert_eq!(h.masking(2, Mode::Eval), h.masking(2, Mode::Eval));
        assert_eq!(head(0.5).masking(1, Mode::Eval).k, 8);
    }

    #[test]
    fn a_mask_ratio_outside_0_1_is_named() {
        for r in [0.0, 1.0, -0.5, f64::NAN] {
            let s = Settings {
                mask_ratio: r,
                ..Settings::default()
            };
            assert_eq!(s.check().unwrap_err().0, "mask_ratio");
        }
    }
}
