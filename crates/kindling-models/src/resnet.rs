//! ResNet (He et al., 2016) for small images, with the parameter names of HF `transformers`'
//! `modeling_resnet.py` (`embedder.embedder.convolution.weight`,
//! `encoder.stages.0.layers.0.layer.1.normalization.running_mean`, ...), and a plain CNN of the
//! same layout without the shortcuts.
//!
//! The stem is where it departs from HF (and from torchvision's ImageNet ResNet): for 28x28 or
//! 32x32 images a 7x7 stride-2 convolution followed by max pooling throws away most of the
//! image, so the SSL papers' CIFAR variants use a 3x3 stride-1 stem and no pooling (SimCLR,
//! solo-learn, lightly). `embedder_kernel_size` and `embedder_stride` say which; there is no
//! max-pool (its backward is one of the ops candle 0.11 gets wrong when kernel != stride).
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
    /// Output channels of each stage.
    pub hidden_sizes: Vec<usize>,
    /// Blocks (of two 3x3 convolutions) per stage.
    pub depths: Vec<usize>,
    /// Halve the resolution in the first stage too (HF's `downsample_in_first_stage`).
    pub downsample_in_first_stage: bool,
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
            hidden_sizes: vec![32, 64, 128],
            depths: vec![1, 1, 1],
            downsample_in_first_stage: false,
            kernels: crate::ops::Kernels::Fused,
        }
    }
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
        if self.hidden_sizes.is_empty() || self.hidden_sizes.len() != self.depths.len() {
            return bad(format!(
                "model.hidden_sizes ({:?}) and model.depths ({:?}) need one entry per stage",
                self.hidden_sizes, self.depths
            ));
        }
        if self.depths.contains(&0) || self.hidden_sizes.contains(&0) || self.embedding_size == 0 {
            return bad("model: stage depths and channel counts must be at least 1".into());
        }
        if self.embedder_kernel_size % 2 == 0 || self.embedder_stride == 0 {
            return bad("model.embedder_kernel_size must be odd and embedder_stride >= 1".into());
        }
        Ok(())
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
        let mut cin = self.embedding_size;
        for (i, (&c, &d)) in self.hidden_sizes.iter().zip(&self.depths).enumerate() {
            for l in 0..d {
                let stride = if l == 0 { self.stride(i) } else { 1 };
                (h, w) = (h.div_ceil(stride), w.div_ceil(stride));
                flops += conv(h, w, cin, c, 3) + conv(h, w, c, c, 3);
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

/// Two 3x3 convolutions and the shortcut: HF's `ResNetBasicLayer`.
#[derive(Debug, Clone)]
struct BasicLayer {
    shortcut: Option<ConvLayer>,
    layer: [ConvLayer; 2],
    residual: bool,
}

impl BasicLayer {
    fn load(
        cin: usize,
        cout: usize,
        stride: usize,
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
        Ok(BasicLayer {
            shortcut,
            layer: [
                ConvLayer::load(cin, cout, 3, stride, true, l.pp("0"))?,
                // The plain CNN keeps its ReLU here; the residual block applies it after the add.
                ConvLayer::load(cout, cout, 3, 1, !residual, l.pp("1"))?,
            ],
            residual,
        })
    }

    fn forward_t(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let y = self.layer[1].forward_t(&self.layer[0].forward_t(x, mode)?, mode)?;
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

/// The encoder: stem, stages, global average pooling. `forward_t` maps (n, h, w, c) images to
/// (n, feature_dim) features.
#[derive(Debug, Clone)]
pub struct ResNet {
    pub config: ResNetConfig,
    embedder: ConvLayer,
    stages: Vec<Vec<BasicLayer>>,
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
                layers.push(BasicLayer::load(
                    cin,
                    c,
                    stride,
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
    /// kernels are composed).
    pub fn forward_t(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        if mode.is_train() && self.config.kernels.fuses(x) && !x.track_op() {
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
            let a = conv(&block.layer[0], current, &mut steps);
            let b = conv(&block.layer[1], a, &mut steps);
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
        for architecture in ["resnet", "cnn"] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            // A strided first stage, a projected and an identity shortcut, odd image sides
            // (stride-2 edges) and two input channels.
            let cfg = ResNetConfig {
                architecture: architecture.into(),
                num_channels: 2,
                embedding_size: 4,
                hidden_sizes: vec![4, 6],
                depths: vec![1, 2],
                downsample_in_first_stage: true,
                ..Default::default()
            };
            let net = ResNet::new(&cfg, vb).unwrap();
            // BatchNorm weights and biases away from 1 and 0, so their gradients matter.
            for (i, (name, var)) in varmap.data().lock().unwrap().iter().enumerate() {
                if name.ends_with("normalization.weight") || name.ends_with("normalization.bias") {
                    let t = (uniform(var.dims(), 100 + i as u64, 0.5) + 0.5).unwrap();
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
