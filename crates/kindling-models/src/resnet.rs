//! ResNet (He et al., 2016) with the parameter names of HF `transformers`'
//! `modeling_resnet.py` (`embedder.embedder.convolution.weight`,
//! `encoder.stages.0.layers.0.layer.1.normalization.running_mean`, ...), basic or bottleneck
//! blocks, and a plain CNN of the same layout without the shortcuts.
//!
//! Two stems. The standard one (`embedder_kernel_size = 7, embedder_stride = 2,
//! embedder_max_pool = true`, HF's and torchvision's) is what HF `ResNetModel` is, so such an
//! encoder exports as a folder transformers loads ([`ResNetConfig::hf_json`]). For 28x28 or
//! 32x32 images a 7x7 stride-2 convolution and a max-pool throw away most of the image, so the
//! SSL papers' CIFAR variants use a 3x3 stride-1 stem and no pooling (SimCLR, solo-learn,
//! lightly), Kindling's default; transformers cannot express it, torchvision can (its
//! `resnet18` with `conv1` replaced and `maxpool` an identity, [`torchvision_names`]).
//! Activations are channels-last (see [`crate::conv`]).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::conv::{BatchNorm, Conv2d};
use crate::fused_resnet::{resnet_forward, ConvUnit, Plan, Step};
use crate::{ModelError, Result};
use kindling_core::Mode;

/// The encoder's shape; written to the export's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResNetConfig {
    /// "resnet" (residual blocks) or "cnn" (the same stages without shortcuts).
    pub architecture: String,
    pub num_channels: usize,
    pub embedding_size: usize,
    pub embedder_kernel_size: usize,
    pub embedder_stride: usize,
    /// A 3x3 stride-2 max-pool (padding 1) after the stem, as HF's and torchvision's.
    pub embedder_max_pool: bool,
    /// Output channels of each stage.
    pub hidden_sizes: Vec<usize>,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// "basic" (two 3x3 convolutions, ResNet-18/34) or "bottleneck" (1x1 down to a quarter of
    /// the channels, 3x3, 1x1 back up: ResNet-50/101), HF's `layer_type`.
    pub layer_type: String,
    /// Halve the resolution in the first stage too (HF's `downsample_in_first_stage`).
    pub downsample_in_first_stage: bool,
    /// Bottleneck blocks stride in their first 1x1 convolution instead of the 3x3 (HF's
    /// `downsample_in_bottleneck`; false is torchvision's "ResNet v1.5").
    pub downsample_in_bottleneck: bool,
    /// The kernel path: on `Fused`, training on CPU f32 runs the encoder as one node. Not part
    /// of `config.json` (see [`crate::bert::BertConfig::kernels`]).
    #[serde(skip)]
    pub kernels: crate::ops::Kernels,
}

impl Default for ResNetConfig {
    /// A ResNet-10-ish encoder for 28x28 grey images: three stages of one basic block,
    /// 32-64-128 channels, 128-dim features.
    fn default() -> Self {
        ResNetConfig {
            architecture: "resnet".into(),
            num_channels: 1,
            embedding_size: 32,
            embedder_kernel_size: 3,
            embedder_stride: 1,
            embedder_max_pool: false,
            hidden_sizes: vec![32, 64, 128],
            depths: vec![1, 1, 1],
            layer_type: "basic".into(),
            downsample_in_first_stage: false,
            downsample_in_bottleneck: false,
            kernels: crate::ops::Kernels::Fused,
        }
    }
}

/// HF `ResNetConfig`'s fields, as `config.json` holds them (others, HF's generic ones, are
/// ignored as HF ignores unknown ones).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HfResNetConfig {
    #[serde(default = "hf_channels")]
    num_channels: usize,
    #[serde(default = "hf_embedding")]
    embedding_size: usize,
    #[serde(default = "hf_hidden")]
    hidden_sizes: Vec<usize>,
    #[serde(default = "hf_depths")]
    depths: Vec<usize>,
    #[serde(default = "hf_layer_type")]
    layer_type: String,
    #[serde(default = "hf_act")]
    hidden_act: String,
    #[serde(default)]
    downsample_in_first_stage: bool,
    #[serde(default)]
    downsample_in_bottleneck: bool,
}

fn hf_channels() -> usize {
    3
}
fn hf_embedding() -> usize {
    64
}
fn hf_hidden() -> Vec<usize> {
    vec![256, 512, 1024, 2048]
}
fn hf_depths() -> Vec<usize> {
    vec![3, 4, 6, 3]
}
fn hf_layer_type() -> String {
    "bottleneck".into()
}
fn hf_act() -> String {
    "relu".into()
}

impl ResNetConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if !matches!(self.architecture.as_str(), "resnet" | "cnn") {
            return bad(format!(
                "model.architecture: expected \"resnet\" or \"cnn\", got {:?}",
                self.architecture
            ));
        }
        if !matches!(self.layer_type.as_str(), "basic" | "bottleneck") {
            return bad(format!(
                "model.backbone.layer_type: expected \"basic\" or \"bottleneck\", got {:?}",
                self.layer_type
            ));
        }
        if self.hidden_sizes.is_empty() || self.hidden_sizes.len() != self.depths.len() {
            return bad(format!(
                "model.hidden_sizes ({:?}) and model.depths ({:?}) need one entry per stage",
                self.hidden_sizes, self.depths
            ));
        }
        if self.depths.contains(&0) || self.hidden_sizes.contains(&0) || self.embedding_size == 0 {
            return bad("model: stage depths and channel counts must be at least 1".into());
        }
        if self.bottleneck() && self.hidden_sizes.iter().any(|&c| c < 4) {
            return bad(format!(
                "model.hidden_sizes ({:?}): bottleneck blocks reduce to a quarter of the \
                 channels, so each stage needs at least 4",
                self.hidden_sizes
            ));
        }
        if self.embedder_kernel_size % 2 == 0 || self.embedder_stride == 0 {
            return bad("model.embedder_kernel_size must be odd and embedder_stride >= 1".into());
        }
        Ok(())
    }

    fn bottleneck(&self) -> bool {
        self.layer_type == "bottleneck"
    }

    /// Whether HF `ResNetModel` is this network: residual, the standard stem.
    pub fn is_hf_resnet(&self) -> bool {
        self.architecture == "resnet"
            && self.embedder_kernel_size == 7
            && self.embedder_stride == 2
            && self.embedder_max_pool
    }

    /// HF `ResNetConfig` as `config.json` (`model_type` "resnet", `architectures`), for an
    /// encoder [`ResNetConfig::is_hf_resnet`] holds for.
    pub fn hf_json(&self, architecture: &str) -> serde_json::Value {
        let hf = HfResNetConfig {
            num_channels: self.num_channels,
            embedding_size: self.embedding_size,
            hidden_sizes: self.hidden_sizes.clone(),
            depths: self.depths.clone(),
            layer_type: self.layer_type.clone(),
            hidden_act: "relu".into(),
            downsample_in_first_stage: self.downsample_in_first_stage,
            downsample_in_bottleneck: self.downsample_in_bottleneck,
        };
        let mut v = serde_json::to_value(hf).expect("config serialises");
        v["model_type"] = "resnet".into();
        v["architectures"] = serde_json::json!([architecture]);
        v["torch_dtype"] = "float32".into();
        v
    }

    /// An HF `ResNetConfig` (`config.json` of `model_type` "resnet": transformers' own
    /// folders, or Kindling's [`ResNetConfig::hf_json`]).
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let hf: HfResNetConfig = serde_json::from_value(v.clone())
            .map_err(|e| ModelError::Config(format!("an HF ResNetConfig: {e}")))?;
        if hf.hidden_act != "relu" {
            return Err(ModelError::Config(format!(
                "hidden_act {:?} is not supported (relu)",
                hf.hidden_act
            )));
        }
        let cfg = ResNetConfig {
            architecture: "resnet".into(),
            num_channels: hf.num_channels,
            embedding_size: hf.embedding_size,
            embedder_kernel_size: 7,
            embedder_stride: 2,
            embedder_max_pool: true,
            hidden_sizes: hf.hidden_sizes,
            depths: hf.depths,
            layer_type: hf.layer_type,
            downsample_in_first_stage: hf.downsample_in_first_stage,
            downsample_in_bottleneck: hf.downsample_in_bottleneck,
            kernels: Default::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Width of the pooled features.
    pub fn feature_dim(&self) -> usize {
        *self
            .hidden_sizes
            .last()
            .expect("validated: at least one stage")
    }

    fn stride(&self, stage: usize) -> usize {
        if stage == 0 && !self.downsample_in_first_stage {
            1
        } else {
            2
        }
    }

    /// The convolutions of one block from `cin` to `cout` channels at `stride`: (in, out,
    /// kernel, stride) of each, in order.
    fn block_convs(
        &self,
        cin: usize,
        cout: usize,
        stride: usize,
    ) -> Vec<(usize, usize, usize, usize)> {
        if self.bottleneck() {
            let r = cout / 4;
            let (s1, s3) = if self.downsample_in_bottleneck {
                (stride, 1)
            } else {
                (1, stride)
            };
            vec![(cin, r, 1, s1), (r, r, 3, s3), (r, cout, 1, 1)]
        } else {
            vec![(cin, cout, 3, stride), (cout, cout, 3, 1)]
        }
    }

    /// Multiply-adds x 2 of one forward pass over an `h` x `w` image.
    pub fn forward_flops(&self, h: usize, w: usize) -> f64 {
        let conv = |h: usize, w: usize, cin: usize, cout: usize, k: usize| {
            2.0 * (h * w * cin * cout * k * k) as f64
        };
        let s = self.embedder_stride;
        let (mut h, mut w) = (h.div_ceil(s), w.div_ceil(s));
        let mut flops = conv(
            h,
            w,
            self.num_channels,
            self.embedding_size,
            self.embedder_kernel_size,
        );
        if self.embedder_max_pool {
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
        }
        let mut cin = self.embedding_size;
        for (i, (&c, &d)) in self.hidden_sizes.iter().zip(&self.depths).enumerate() {
            for l in 0..d {
                let stride = if l == 0 { self.stride(i) } else { 1 };
                for (a, b, k, s) in self.block_convs(cin, c, stride) {
                    (h, w) = (h.div_ceil(s), w.div_ceil(s));
                    flops += conv(h, w, a, b, k);
                }
                if self.architecture == "resnet" && (cin != c || stride != 1) {
                    flops += conv(h, w, cin, c, 1);
                }
                cin = c;
            }
        }
        flops
    }
}

/// Convolution, BatchNorm, optional ReLU: HF's `ResNetConvLayer`.
#[derive(Debug, Clone)]
struct ConvLayer {
    convolution: Conv2d,
    normalization: BatchNorm,
    relu: bool,
}

impl ConvLayer {
    fn load(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        relu: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(ConvLayer {
            convolution: Conv2d::load(cin, cout, k, stride, k / 2, vb.pp("convolution"))?,
            normalization: BatchNorm::load(cout, vb.pp("normalization"))?,
            relu,
        })
    }

    fn forward_t(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let y = self
            .normalization
            .forward_t(&self.convolution.forward(x)?, mode)?;
        Ok(if self.relu { crate::conv::relu(&y)? } else { y })
    }
}

/// A block: two 3x3 convolutions (HF's `ResNetBasicLayer`) or 1x1, 3x3, 1x1 (its
/// `ResNetBottleNeckLayer`), and the shortcut.
#[derive(Debug, Clone)]
struct Block {
    shortcut: Option<ConvLayer>,
    layer: Vec<ConvLayer>,
    residual: bool,
}

impl Block {
    fn load(
        cfg: &ResNetConfig,
        (cin, cout, stride): (usize, usize, usize),
        residual: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shortcut = if residual && (cin != cout || stride != 1) {
            Some(ConvLayer::load(
                cin,
                cout,
                1,
                stride,
                false,
                vb.pp("shortcut"),
            )?)
        } else {
            None
        };
        let l = vb.pp("layer");
        let convs = cfg.block_convs(cin, cout, stride);
        let last = convs.len() - 1;
        let layer = convs
            .into_iter()
            .enumerate()
            .map(|(i, (a, b, k, s))| {
                // The plain CNN keeps its ReLU on the last convolution; the residual block
                // applies it after the add.
                ConvLayer::load(a, b, k, s, i < last || !residual, l.pp(i.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Block {
            shortcut,
            layer,
            residual,
        })
    }

    fn forward_t(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for l in &self.layer {
            y = l.forward_t(&y, mode)?;
        }
        if !self.residual {
            return Ok(y);
        }
        let skip = match &self.shortcut {
            Some(s) => s.forward_t(x, mode)?,
            None => x.clone(),
        };
        Ok(crate::conv::relu(&(y + skip)?)?)
    }
}

/// PyTorch's `MaxPool2d(kernel_size=3, stride=2, padding=1)` over (n, h, w, c): each output
/// is the largest of the 3x3 inputs around it, padding never chosen. Composed of candle ops
/// (a border of -inf, a gather of the nine taps, a max over them), so autograd gives the
/// backward on every device: the gradient goes to the window's maximum (where two inputs tie
/// exactly, to both; PyTorch picks one. After the stem's ReLU the ties are zeros, whose
/// gradient the ReLU drops anyway). Costs nine copies of the stem's output, once per pass.
pub fn max_pool_3x3_s2(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let dev = x.device();
    let neg = |dims: (usize, usize, usize, usize)| {
        Tensor::full(f32::NEG_INFINITY, dims, dev)?.to_dtype(x.dtype())
    };
    // Padded to (h + 2) x (w + 2).
    let rows = Tensor::cat(&[&neg((n, 1, w, c))?, x, &neg((n, 1, w, c))?], 1)?;
    let padded = Tensor::cat(
        &[&neg((n, h + 2, 1, c))?, &rows, &neg((n, h + 2, 1, c))?],
        2,
    )?;
    let (ph, pw) = (h + 2, w + 2);
    let mut idx = Vec::with_capacity(oh * ow * 9);
    for oy in 0..oh {
        for ox in 0..ow {
            for ky in 0..3 {
                for kx in 0..3 {
                    idx.push(((oy * 2 + ky) * pw + ox * 2 + kx) as u32);
                }
            }
        }
    }
    let idx = Tensor::from_vec(idx, oh * ow * 9, dev)?;
    padded
        .reshape((n, ph * pw, c))?
        .index_select(&idx, 1)?
        .reshape((n, oh * ow, 9, c))?
        .max(2)?
        .reshape((n, oh, ow, c))
}

/// torchvision's name for a tensor of Kindling's (HF's) ResNet: `conv1`/`bn1` for the stem,
/// `layer{stage + 1}.{block}.conv{k + 1}` / `bn{k + 1}` for the block's convolutions, and
/// `downsample.0` / `downsample.1` for the shortcut. `None` for a name outside that layout.
pub fn torchvision_name(name: &str) -> Option<String> {
    let norm = |rest: &str, conv: &str, bn: &str| -> Option<String> {
        if let Some(p) = rest.strip_prefix("convolution.") {
            Some(format!("{conv}.{p}"))
        } else {
            rest.strip_prefix("normalization.")
                .map(|p| format!("{bn}.{p}"))
        }
    };
    if let Some(rest) = name.strip_prefix("embedder.embedder.") {
        return norm(rest, "conv1", "bn1");
    }
    let rest = name.strip_prefix("encoder.stages.")?;
    let (stage, rest) = rest.split_once('.')?;
    let stage: usize = stage.parse().ok()?;
    let (block, rest) = rest.strip_prefix("layers.")?.split_once('.')?;
    let prefix = format!("layer{}.{block}", stage + 1);
    if let Some(rest) = rest.strip_prefix("shortcut.") {
        return norm(
            rest,
            &format!("{prefix}.downsample.0"),
            &format!("{prefix}.downsample.1"),
        );
    }
    let (k, rest) = rest.strip_prefix("layer.")?.split_once('.')?;
    let k: usize = k.parse().ok()?;
    norm(
        rest,
        &format!("{prefix}.conv{}", k + 1),
        &format!("{prefix}.bn{}", k + 1),
    )
}

/// The encoder: stem, stages, global average pooling. `forward_t` maps (n, h, w, c) images to
/// (n, feature_dim) features.
#[derive(Debug, Clone)]
pub struct ResNet {
    pub config: ResNetConfig,
    embedder: ConvLayer,
    stages: Vec<Vec<Block>>,
}

impl ResNet {
    pub fn new(config: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let embedder = ConvLayer::load(
            config.num_channels,
            config.embedding_size,
            config.embedder_kernel_size,
            config.embedder_stride,
            true,
            vb.pp("embedder").pp("embedder"),
        )?;
        let residual = config.architecture == "resnet";
        let mut stages = Vec::new();
        let mut cin = config.embedding_size;
        for (i, (&c, &d)) in config.hidden_sizes.iter().zip(&config.depths).enumerate() {
            let vs = vb.pp("encoder").pp("stages").pp(i.to_string()).pp("layers");
            let mut layers = Vec::new();
            for l in 0..d {
                let stride = if l == 0 { config.stride(i) } else { 1 };
                layers.push(Block::load(
                    config,
                    (cin, c, stride),
                    residual,
                    vs.pp(l.to_string()),
                )?);
                cin = c;
            }
            stages.push(layers);
        }
        Ok(ResNet {
            config: config.clone(),
            embedder,
            stages,
        })
    }

    /// The last feature map, (n, h', w', feature_dim).
    pub fn feature_map(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let mut h = self.embedder.forward_t(x, mode)?;
        if self.config.embedder_max_pool {
            h = max_pool_3x3_s2(&h)?;
        }
        for stage in &self.stages {
            for layer in stage {
                h = layer.forward_t(&h, mode)?;
            }
        }
        Ok(h)
    }

    /// Globally average-pooled features, (n, feature_dim). Training on CPU in f32 runs the
    /// whole encoder as one autograd node (`crate::fused_resnet`), the same arithmetic as the
    /// composed layers with a fraction of candle's backward bookkeeping (unless the config's
    /// kernels are composed, or the stem max-pools: the one-node plan has no pooling step).
    pub fn forward_t(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let fusable = !self.config.embedder_max_pool;
        if fusable && mode.is_train() && self.config.kernels.fuses(x) && !x.track_op() {
            return self.forward_fused(x, crate::fused_resnet::TILE_FLOATS);
        }
        self.forward_composed(x, mode)
    }

    /// [`ResNet::forward_t`] layer by layer, one candle op at a time.
    pub(crate) fn forward_composed(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let h = self.feature_map(x, mode)?;
        let (n, fh, fw, c) = h.dims4()?;
        Ok(h.reshape((n, fh * fw, c))?.mean(1)?)
    }

    /// Training-mode [`ResNet::forward_t`] as one op; the running statistics move as the
    /// composed layers move them. `tile_floats`: see `fused_resnet::TILE_FLOATS`.
    pub(crate) fn forward_fused(
        &self,
        x: &Tensor,
        tile_floats: usize,
    ) -> candle_core::Result<Tensor> {
        let mut layers: Vec<&ConvLayer> = vec![&self.embedder];
        let mut steps = vec![Step::Conv { unit: 0, input: 0 }];
        let mut current = 1; // the activation a block reads
        let mut conv = |layer, input: usize, steps: &mut Vec<Step>| {
            layers.push(layer);
            steps.push(Step::Conv {
                unit: layers.len() - 1,
                input,
            });
            steps.len()
        };
        for block in self.stages.iter().flatten() {
            let mut b = current;
            for l in &block.layer {
                b = conv(l, b, &mut steps);
            }
            current = if block.residual {
                let skip = match &block.shortcut {
                    Some(s) => conv(s, current, &mut steps),
                    None => current,
                };
                steps.push(Step::AddRelu { a: b, b: skip });
                steps.len()
            } else {
                b
            };
        }
        let units = layers
            .iter()
            .map(|l| {
                let (cout, cin, k, _) = l.convolution.weight.dims4()?;
                Ok(ConvUnit {
                    cin,
                    cout,
                    k,
                    stride: l.convolution.stride,
                    relu: l.relu,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let params: Vec<&Tensor> = layers
            .iter()
            .flat_map(|l| {
                [
                    &l.convolution.weight,
                    &l.normalization.weight,
                    &l.normalization.bias,
                ]
            })
            .collect();
        let plan = Plan {
            units,
            steps,
            eps: self.embedder.normalization.eps as f32,
            tile_floats,
        };
        let (feats, stats) = resnet_forward(x, plan, &params)?;
        for (layer, st) in layers.iter().zip(stats) {
            let c = st.mean.len();
            let dev = x.device();
            layer.normalization.track(
                &Tensor::from_vec(st.mean, c, dev)?,
                &Tensor::from_vec(st.var, c, dev)?,
                st.rows,
            )?;
        }
        Ok(feats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn cosine(a: &Tensor, b: &Tensor) -> f32 {
        let dot = |x: &Tensor, y: &Tensor| {
            (x * y)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
    }

    /// bf16 mixed precision (the GPU path, here on CPU): composed layers on bf16 images with
    /// f32 master weights give features close to the f32 encoder's and f32 gradients for every
    /// parameter, on a stride-2 ResNet with a projected shortcut.
    #[test]
    fn bf16_encoder_follows_f32_and_trains_every_parameter() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = ResNetConfig {
            hidden_sizes: vec![4, 8],
            depths: vec![1, 1],
            embedding_size: 4,
            ..Default::default()
        };
        let net = ResNet::new(&cfg, vb).unwrap();
        // Seeded weights: the comparison must not depend on the unseeded default draw.
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.ends_with("convolution.weight") {
                let seed = name.bytes().map(u64::from).sum::<u64>();
                let w = crate::test_util::uniform(var.dims(), seed, 0.5);
                var.set(&w).unwrap();
            }
        }
        let x = crate::test_util::uniform(&[8, 9, 9, 1], 5, 1.0);
        let r = crate::test_util::uniform(&[8, 8], 6, 1.0);
        let run = |x: &Tensor| {
            let y = net
                .forward_t(x, Mode::Train { seed: 1 })
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g)
        };
        let (y32, g32) = run(&x);
        let (y16, g16) = run(&x.to_dtype(DType::BF16).unwrap());
        let d = crate::test_util::max_rel_diff(&y16, &y32);
        assert!(d < 3e-2, "features differ by {d}");
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if crate::conv::is_norm_buffer(name) {
                continue;
            }
            let g = g16.get(var.as_tensor()).expect(name);
            assert_eq!(g.dtype(), DType::F32, "{name}");
            // Direction rather than elementwise error: BatchNorm's backward subtracts means, so
            // single small elements of a gradient can lose most of their bf16 digits; the stem,
            // at the end of the backward pass, comes out near 0.96. A wrong gradient is near 0.
            let cos = cosine(g, g32.get(var.as_tensor()).unwrap());
            assert!(
                cos > 0.93,
                "{name}: bf16 gradient at cosine {cos} to the f32 one"
            );
        }
    }

    #[test]
    fn names_follow_hf_resnet_and_every_parameter_gets_a_gradient() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = ResNetConfig {
            hidden_sizes: vec![4, 8],
            depths: vec![1, 2],
            embedding_size: 4,
            ..Default::default()
        };
        let net = ResNet::new(&cfg, vb).unwrap();
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        for n in [
            "embedder.embedder.convolution.weight",
            "embedder.embedder.normalization.running_var",
            "encoder.stages.1.layers.0.shortcut.convolution.weight",
            "encoder.stages.1.layers.1.layer.1.normalization.weight",
        ] {
            assert!(names.iter().any(|k| k == n), "{n} missing from {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|k| k.starts_with("encoder.stages.0.layers.0.shortcut")),
            "no shortcut where shapes match"
        );
        let x = Tensor::randn(0f32, 1.0, (3, 8, 8, 1), &Device::Cpu).unwrap();
        let y = net.forward_t(&x, Mode::Train { seed: 1 }).unwrap();
        assert_eq!(y.dims(), &[3, 8]);
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if crate::conv::is_norm_buffer(name) {
                continue;
            }
            let g = grads.get(var.as_tensor());
            assert!(g.is_some(), "{name} gets no gradient");
            let norm = crate::test_util::abs_sum(g.unwrap());
            assert!(norm > 0.0, "{name} gets a zero gradient");
        }
        // FLOPs: stem 8*8*1*4*9, stage 0: 2 convs 4->4 at 8x8, stage 1 at 4x4: 4->8, 8->8,
        // shortcut 4->8 1x1, then 8->8 twice.
        let expect = 2.0
            * (64.0 * 36.0
                + 2.0 * 64.0 * 144.0
                + 16.0 * (288.0 + 576.0 + 32.0)
                + 2.0 * 16.0 * 576.0);
        assert_eq!(cfg.forward_flops(8, 8), expect);
    }

    #[test]
    fn fused_encoder_matches_the_composed_layers_forward_backward_and_running_stats() {
        use crate::test_util::{max_rel_diff, uniform};
        for (architecture, layer_type) in [
            ("resnet", "basic"),
            ("cnn", "basic"),
            ("resnet", "bottleneck"),
        ] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            // A strided first stage, a projected and an identity shortcut, odd image sides
            // (stride-2 edges) and two input channels; basic and bottleneck blocks.
            let cfg = ResNetConfig {
                architecture: architecture.into(),
                num_channels: 2,
                embedding_size: 4,
                hidden_sizes: if layer_type == "basic" {
                    vec![4, 6]
                } else {
                    vec![8, 16]
                },
                depths: vec![1, 2],
                layer_type: layer_type.into(),
                downsample_in_first_stage: true,
                ..Default::default()
            };
            let net = ResNet::new(&cfg, vb).unwrap();
            // BatchNorm weights and biases away from 1 and 0, so their gradients matter.
            // Seeded by name: the map's iteration order changes from run to run.
            for (name, var) in varmap.data().lock().unwrap().iter() {
                if name.ends_with("normalization.weight") || name.ends_with("normalization.bias") {
                    let seed = 100 + name.bytes().map(u64::from).sum::<u64>();
                    let t = (uniform(var.dims(), seed, 0.5) + 0.5).unwrap();
                    var.set(&t).unwrap();
                }
            }
            let initial: Vec<(String, Tensor)> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
                .collect();
            let x = uniform(&[3, 9, 7, 2], 1, 1.0);
            // fused: None = the composed layers; Some(tile) = one op, `tile` im2col floats per
            // task (1: one image per task, so tasks' partial weight gradients are summed).
            let run = |fused: Option<usize>| {
                for (name, t) in &initial {
                    varmap.data().lock().unwrap()[name].set(t).unwrap();
                }
                let y = match fused {
                    Some(tile) => net.forward_fused(&x, tile).unwrap(),
                    None => net.forward_composed(&x, Mode::Train { seed: 0 }).unwrap(),
                };
                let r = uniform(y.dims(), 2, 1.0);
                let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let data = varmap.data().lock().unwrap();
                let mut names: Vec<&String> = data.keys().collect();
                names.sort();
                let per_var: Vec<(String, Tensor)> = names
                    .into_iter()
                    .map(|k| {
                        let v = &data[k];
                        let t = if crate::conv::is_norm_buffer(k) {
                            v.as_tensor().copy().unwrap()
                        } else {
                            grads.get(v.as_tensor()).expect("a gradient").clone()
                        };
                        (k.clone(), t)
                    })
                    .collect();
                (y, per_var)
            };
            let (y_ref, ref_vars) = run(None);
            for tile in [1, crate::fused_resnet::TILE_FLOATS] {
                let (y, vars) = run(Some(tile));
                assert!(max_rel_diff(&y, &y_ref) < 1e-5, "{architecture}: features");
                assert_eq!(ref_vars.len(), vars.len());
                for ((name, want), (_, got)) in ref_vars.iter().zip(&vars) {
                    let d = max_rel_diff(got, want);
                    assert!(
                        d < 1e-4,
                        "{architecture}, tile {tile}: {name} differs by {d}"
                    );
                }
            }
        }
    }

    /// PyTorch's MaxPool2d(3, 2, 1) on a 5x6 two-channel image with negative values (the
    /// padding is never chosen), written out; the gradient reaches each window's maximum.
    #[test]
    fn max_pool_takes_each_windows_largest_input_and_routes_the_gradient_there() {
        let (h, w, c) = (5usize, 6usize, 2usize);
        let v: Vec<f32> = (0..h * w * c)
            .map(|i| ((i * 37) % 23) as f32 - 15.0)
            .collect();
        let x = candle_core::Var::from_vec(v.clone(), (1, h, w, c), &Device::Cpu).unwrap();
        let y = max_pool_3x3_s2(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[1, 3, 3, c]);
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let mut want = Vec::new();
        let mut hits = vec![0f32; v.len()];
        for oy in 0..3usize {
            for ox in 0..3usize {
                for ch in 0..c {
                    let mut best = (f32::NEG_INFINITY, 0);
                    for iy in (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(h) {
                        for ix in (ox * 2).saturating_sub(1)..(ox * 2 + 2).min(w) {
                            let i = (iy * w + ix) * c + ch;
                            if v[i] > best.0 {
                                best = (v[i], i);
                            }
                        }
                    }
                    want.push(best.0);
                    hits[best.1] += 1.0;
                }
            }
        }
        assert_eq!(got, want);
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(gx, hits);
    }

    /// Kindling's names map to torchvision's: stem, block convolutions, shortcut.
    #[test]
    fn torchvision_names_follow_its_resnet() {
        for (ours, theirs) in [
            ("embedder.embedder.convolution.weight", "conv1.weight"),
            (
                "embedder.embedder.normalization.running_mean",
                "bn1.running_mean",
            ),
            (
                "encoder.stages.0.layers.1.layer.0.convolution.weight",
                "layer1.1.conv1.weight",
            ),
            (
                "encoder.stages.3.layers.0.layer.2.normalization.bias",
                "layer4.0.bn3.bias",
            ),
            (
                "encoder.stages.1.layers.0.shortcut.convolution.weight",
                "layer2.0.downsample.0.weight",
            ),
            (
                "encoder.stages.1.layers.0.shortcut.normalization.num_batches_tracked",
                "layer2.0.downsample.1.num_batches_tracked",
            ),
        ] {
            assert_eq!(torchvision_name(ours).as_deref(), Some(theirs), "{ours}");
        }
        assert_eq!(torchvision_name("classifier.weight"), None);
    }

    /// ResNet-50's shape (HF's defaults): bottleneck names and widths, the standard stem, and
    /// HF's config both ways.
    #[test]
    fn a_bottleneck_resnet_has_hf_names_and_config() {
        let cfg = ResNetConfig::from_hf_json(&serde_json::json!({
            "model_type": "resnet", "num_channels": 3, "embedding_size": 8,
            "hidden_sizes": [16, 32], "depths": [2, 1], "layer_type": "bottleneck",
        }))
        .unwrap();
        assert!(cfg.is_hf_resnet());
        let back = ResNetConfig::from_hf_json(&cfg.hf_json("ResNetModel")).unwrap();
        assert_eq!(back, cfg);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = ResNet::new(&cfg, vb).unwrap();
        let dims = |n: &str| varmap.data().lock().unwrap()[n].dims().to_vec();
        assert_eq!(dims("embedder.embedder.convolution.weight"), [8, 3, 7, 7]);
        assert_eq!(
            dims("encoder.stages.0.layers.0.layer.0.convolution.weight"),
            [4, 8, 1, 1]
        );
        assert_eq!(
            dims("encoder.stages.0.layers.0.layer.1.convolution.weight"),
            [4, 4, 3, 3]
        );
        assert_eq!(
            dims("encoder.stages.0.layers.0.layer.2.convolution.weight"),
            [16, 4, 1, 1]
        );
        assert_eq!(
            dims("encoder.stages.0.layers.0.shortcut.convolution.weight"),
            [16, 8, 1, 1]
        );
        // 32x32 -> stem 16 -> pool 8 -> stage 0 at 8 -> stage 1 at 4.
        let x = crate::test_util::uniform(&[2, 32, 32, 3], 3, 1.0);
        let y = net.forward_t(&x, Mode::Train { seed: 0 }).unwrap();
        assert_eq!(y.dims(), &[2, 32]);
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if !crate::conv::is_norm_buffer(name) {
                assert!(grads.get(var.as_tensor()).is_some(), "{name}");
            }
        }
        let e = ResNetConfig {
            layer_type: "bottleneck".into(),
            hidden_sizes: vec![2, 8, 8],
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("at least 4"), "{e}");
    }

    #[test]
    fn the_plain_cnn_has_no_shortcuts_and_bad_shapes_are_named() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = ResNetConfig {
            architecture: "cnn".into(),
            ..Default::default()
        };
        ResNet::new(&cfg, vb).unwrap();
        assert!(!varmap
            .data()
            .lock()
            .unwrap()
            .keys()
            .any(|k| k.contains("shortcut")));
        let bad = ResNetConfig {
            depths: vec![1],
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("model.hidden_sizes"), "{e}");
    }
}
