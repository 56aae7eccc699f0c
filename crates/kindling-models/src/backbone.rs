//! The encoder of a vision recipe, `[model.backbone]`: the small ResNet (or its shortcut-free
//! CNN) or a ViT, chosen by `architecture`. Both take images as (batch, height, width,
//! channels) and give one feature vector per image: the ResNet's pooled last stage, the ViT's
//! `[CLS]` after its final norm (as DINO and MAE read it).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::ops::Kernels;
use crate::resnet::{ResNet, ResNetConfig};
use crate::vit::{ViTConfig, ViTModel};
use crate::{ModelError, Result};
use kindling_core::Mode;

/// `[model.backbone]`: `architecture = "resnet" | "cnn"` with the ResNet's keys, or `"vit"`
/// with `ViTConfig`'s (HF's names; `image_size` and `num_channels` come from the data).
#[derive(Debug, Clone, PartialEq)]
pub enum BackboneConfig {
    ResNet(ResNetConfig),
    ViT(ViTConfig),
}

impl Default for BackboneConfig {
    fn default() -> Self {
        BackboneConfig::ResNet(ResNetConfig::default())
    }
}

/// The keys a ViT backbone takes in a recipe: `ViTConfig`'s, less `model_type`, and
/// `architecture`.
fn vit_keys() -> Vec<String> {
    let v = serde_json::to_value(ViTConfig::default()).expect("config serialises");
    let mut keys: Vec<String> = v
        .as_object()
        .expect("a struct serialises to an object")
        .keys()
        .filter(|k| *k != "model_type")
        .cloned()
        .collect();
    keys.insert(0, "architecture".into());
    keys
}

impl Serialize for BackboneConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            BackboneConfig::ResNet(c) => c.serialize(s),
            BackboneConfig::ViT(c) => {
                let mut v = serde_json::to_value(c).map_err(serde::ser::Error::custom)?;
                let obj = v.as_object_mut().expect("a struct serialises to an object");
                obj.remove("model_type");
                obj.insert("architecture".into(), "vit".into());
                v.serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for BackboneConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let mut v = serde_json::Value::deserialize(d)?;
        let Some(obj) = v.as_object_mut() else {
            return Err(D::Error::custom("a table of the encoder's settings"));
        };
        if obj.get("architecture").and_then(|a| a.as_str()) != Some("vit") {
            return serde_json::from_value(v)
                .map(BackboneConfig::ResNet)
                .map_err(D::Error::custom);
        }
        let known = vit_keys();
        if let Some(k) = obj.keys().find(|k| !known.contains(k)) {
            return Err(D::Error::custom(format!(
                "unknown field `{k}` for architecture \"vit\", expected one of {}",
                known.join(", ")
            )));
        }
        obj.remove("architecture");
        serde_json::from_value(v)
            .map(BackboneConfig::ViT)
            .map_err(D::Error::custom)
    }
}

impl BackboneConfig {
    /// "resnet", "cnn" or "vit".
    pub fn architecture(&self) -> &str {
        match self {
            BackboneConfig::ResNet(c) => &c.architecture,
            BackboneConfig::ViT(_) => "vit",
        }
    }

    /// One line for the run's log and the model card.
    pub fn describe(&self) -> String {
        match self {
            BackboneConfig::ResNet(c) => format!(
                "{} encoder {:?} channels x {:?} blocks",
                c.architecture, c.hidden_sizes, c.depths
            ),
            BackboneConfig::ViT(c) => format!(
                "ViT encoder h{} L{} A{} I{}, {}x{} patches of {}px",
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.intermediate_size,
                c.grid(),
                c.grid(),
                c.patch_size
            ),
        }
    }

    pub fn feature_dim(&self) -> usize {
        match self {
            BackboneConfig::ResNet(c) => c.feature_dim(),
            BackboneConfig::ViT(c) => c.hidden_size,
        }
    }

    /// Matmul FLOPs of one forward pass over one `h` x `w` image.
    pub fn forward_flops(&self, h: usize, w: usize) -> f64 {
        match self {
            BackboneConfig::ResNet(c) => c.forward_flops(h, w),
            BackboneConfig::ViT(c) => c.forward_flops(),
        }
    }

    /// This config for images of `(height, width, channels)` on the kernel path `kernels`: the
    /// channels (and, for a ViT, `image_size`) come from the data. A ViT needs square images
    /// whose side `patch_size` divides.
    pub fn for_input(&self, (h, w, c): (usize, usize, usize), kernels: Kernels) -> Result<Self> {
        match self {
            BackboneConfig::ResNet(cfg) => {
                let mut cfg = cfg.clone();
                cfg.num_channels = c;
                cfg.kernels = kernels;
                Ok(BackboneConfig::ResNet(cfg))
            }
            BackboneConfig::ViT(cfg) => {
                if h != w || h % cfg.patch_size != 0 {
                    return Err(ModelError::Setting {
                        field: "patch_size",
                        msg: format!(
                            "a ViT takes square images whose side is a multiple of patch_size \
                             ({}); the views are {h}x{w}",
                            cfg.patch_size
                        ),
                    });
                }
                let mut cfg = cfg.clone();
                cfg.image_size = h;
                cfg.num_channels = c;
                cfg.kernels = kernels;
                cfg.validate()?;
                Ok(BackboneConfig::ViT(cfg))
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            BackboneConfig::ResNet(c) => c.validate(),
            BackboneConfig::ViT(c) => c.validate(),
        }
    }
}

/// A vision encoder, built from a [`BackboneConfig`].
#[derive(Debug, Clone)]
pub enum Backbone {
    ResNet(ResNet),
    ViT(ViTModel),
}

impl Backbone {
    pub fn new(cfg: &BackboneConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg {
            BackboneConfig::ResNet(c) => Backbone::ResNet(ResNet::new(c, vb)?),
            BackboneConfig::ViT(c) => Backbone::ViT(ViTModel::load(vb, c)?),
        })
    }

    /// (batch, height, width, channels) -> (batch, feature_dim).
    pub fn forward_t(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        match self {
            Backbone::ResNet(m) => m.forward_t(x, mode),
            Backbone::ViT(m) => m.features(x, mode).map_err(candle_core::Error::wrap),
        }
    }

    pub fn config(&self) -> BackboneConfig {
        match self {
            Backbone::ResNet(m) => BackboneConfig::ResNet(m.config.clone()),
            Backbone::ViT(m) => BackboneConfig::ViT(m.config.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    struct Recipe {
        backbone: BackboneConfig,
    }

    /// `architecture` picks the type; each reads its own keys, and the resolved recipe reads
    /// back as the same config.
    #[test]
    fn architecture_picks_the_encoder_and_round_trips() {
        let r: Recipe = toml::from_str(
            "[backbone]\narchitecture = \"vit\"\nhidden_size = 64\npatch_size = 4\n",
        )
        .unwrap();
        let BackboneConfig::ViT(c) = &r.backbone else {
            panic!("{r:?}")
        };
        assert_eq!((c.hidden_size, c.patch_size), (64, 4));
        let text = toml::to_string(&r).unwrap();
        assert!(text.contains("architecture = \"vit\""), "{text}");
        assert_eq!(toml::from_str::<Recipe>(&text).unwrap(), r);
        let r: Recipe = toml::from_str("[backbone]\nhidden_sizes = [8, 16]\n").unwrap();
        assert_eq!(r.backbone.architecture(), "resnet");
        assert_eq!(
            toml::from_str::<Recipe>(&toml::to_string(&r).unwrap()).unwrap(),
            r
        );
    }

    /// A key of the other architecture, or a misspelt one, is named.
    #[test]
    fn a_key_of_the_other_encoder_is_named() {
        let e = toml::from_str::<Recipe>("[backbone]\narchitecture = \"vit\"\ndepths = [1]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`depths`") && e.contains("patch_size"), "{e}");
        let e = toml::from_str::<Recipe>("[backbone]\npatch_size = 4\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch_size"), "{e}");
    }

    /// The data decide a ViT's image size and channels; views it cannot cut into patches are
    /// refused with the reason.
    #[test]
    fn a_vit_takes_its_image_size_from_the_views() {
        let vit = BackboneConfig::ViT(ViTConfig {
            patch_size: 4,
            ..ViTConfig::default()
        });
        let BackboneConfig::ViT(c) = vit.for_input((28, 28, 1), Kernels::Fused).unwrap() else {
            unreachable!()
        };
        assert_eq!((c.image_size, c.num_channels, c.seq_len()), (28, 1, 50));
        let e = vit.for_input((30, 30, 1), Kernels::Fused).unwrap_err();
        assert!(e.to_string().contains("30x30"), "{e}");
        assert!(vit.for_input((28, 24, 1), Kernels::Fused).is_err());
    }
}
