//! The small ResNet's training-mode forward as one autograd node (CPU, f32): every
//! convolution, BatchNorm, ReLU and residual add of the encoder, and the global average pool,
//! forward and backward written out by hand over the kernels of `crate::conv`.
//!
//! Why: candle's backward pass allocates a zero tensor and adds into it for every input of every
//! node. The composed encoder has about five nodes per convolution (im2col, matmul, BatchNorm,
//! ReLU, reshapes), each with an activation-sized input; on a SimCLR step (2 x 256 images of
//! 28x28, a 32-channel stem at full resolution) that bookkeeping (`zeros_like` + `add`) was
//! about 30% of the step. As one node the encoder pays it once, for the flat tensor its
//! parameters are concatenated into (about 0.3M floats); the images need no gradient.
//!
//! Same arithmetic as the composed layers (im2col + gemm, BatchNorm over the batch statistics
//! from `column_mean_var`, ReLU), up to the gemm's summation order; the test in `resnet.rs`
//! checks the features, every gradient and the running statistics against them. Convolutions
//! run a few images at a time (see [`TILE_FLOATS`]), so the im2col matrix is never held whole.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::conv::{
    batch_norm_apply, batch_norm_grad, col2im_image, column_mean_var, im2col_image, ConvGeometry,
};
use crate::ops::{
    contiguous_f32, gemm_serial_into, gemm_serial_uninit, mat, mat_t, saved_activations,
    vectorised, with_cpu_inputs,
};

/// One convolution (no bias, padding k / 2), its BatchNorm and an optional ReLU: HF's
/// `ResNetConvLayer`. Its parameters, flattened in this order: convolution weight (cout, cin,
/// k, k), BatchNorm weight (cout), BatchNorm bias (cout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvUnit {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub relu: bool,
}

impl ConvUnit {
    fn weights(&self) -> usize {
        self.cout * self.cin * self.k * self.k
    }

    fn params(&self) -> usize {
        self.weights() + 2 * self.cout
    }

    fn geometry(&self, n: usize, (h, w, c): (usize, usize, usize)) -> ConvGeometry {
        ConvGeometry {
            n,
            h,
            w,
            c,
            kh: self.k,
            kw: self.k,
            stride: self.stride,
            pad: self.k / 2,
        }
    }

    /// A 1x1, stride-1 convolution reads its input as the im2col matrix itself.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1
    }

    /// (cout, cin, k, k) -> (cout, k * k * cin), the im2col column order.
    fn weight_rows(&self, w: &[f32]) -> Vec<f32> {
        let (ci, kk) = (self.cin, self.k * self.k);
        let mut out = vec![0f32; w.len()];
        for o in 0..self.cout {
            for c in 0..ci {
                for t in 0..kk {
                    out[o * kk * ci + t * ci + c] = w[(o * ci + c) * kk + t];
                }
            }
        }
        out
    }

    /// The inverse of [`ConvUnit::weight_rows`], written into `dst`.
    fn weight_from_rows(&self, rows: &[f32], dst: &mut [f32]) {
        let (ci, kk) = (self.cin, self.k * self.k);
        for o in 0..self.cout {
            for c in 0..ci {
                for t in 0..kk {
                    dst[(o * ci + c) * kk + t] = rows[o * kk * ci + t * ci + c];
                }
            }
        }
    }
}

/// Floats of im2col rows per task of the tiled convolution (1 MB): a task builds its tile,
/// multiplies it and, in the backward pass, folds its gradient back while the tile is in cache.
/// Materialising the whole im2col matrix instead (58 MB for a 32-channel 3x3 layer at 14x14
/// over 256 images) made the convolutions memory-bound: the matrix was written, packed by gemm
/// and read again.
pub(crate) const TILE_FLOATS: usize = 1 << 18;

fn images_per_task(g: ConvGeometry, tile_floats: usize) -> usize {
    let (oh, ow) = g.out_hw();
    (tile_floats / (oh * ow * g.k()).max(1)).clamp(1, g.n.max(1))
}

/// The im2col rows of `imgs` images `xt`.
fn im2col_tile(xt: &[f32], g: ConvGeometry, imgs: usize) -> Vec<f32> {
    let (oh, ow) = g.out_hw();
    let per_image = oh * ow * g.k();
    let mut out: Vec<f32> = Vec::with_capacity(imgs * per_image);
    for (o, img) in out.spare_capacity_mut()[..imgs * per_image]
        .chunks_mut(per_image)
        .zip(xt.chunks(g.h * g.w * g.c))
    {
        im2col_image(img, g, o);
    }
    // SAFETY: `im2col_image` wrote every element of each image's rows.
    unsafe { out.set_len(imgs * per_image) };
    out
}

/// z (n * oh * ow, cout) = im2col(x) @ w2^T for w2 (cout, kh * kw * c), a few images per task.
/// A pointwise unit multiplies its input as is.
fn conv_forward(
    x: &[f32],
    g: ConvGeometry,
    w2: &[f32],
    cout: usize,
    pointwise: bool,
    tile_floats: usize,
) -> Vec<f32> {
    let (oh, ow) = g.out_hw();
    let (kk, px, per) = (g.k(), oh * ow, images_per_task(g, tile_floats));
    let len = g.n * px * cout;
    let mut z: Vec<f32> = Vec::with_capacity(len);
    z.spare_capacity_mut()[..len]
        .par_chunks_mut(per * px * cout)
        .zip(x.par_chunks(per * g.h * g.w * g.c))
        .for_each(|(zt, xt)| {
            let imgs = xt.len() / (g.h * g.w * g.c);
            let tile;
            let cols: &[f32] = if pointwise {
                xt
            } else {
                tile = im2col_tile(xt, g, imgs);
                &tile
            };
            gemm_serial_uninit((imgs * px, cout, kk), zt, mat(cols, kk), mat_t(w2, kk));
        });
    // SAFETY: the tasks' gemms wrote every element (their chunks cover `len`).
    unsafe { z.set_len(len) };
    z
}

/// The backward pass of [`conv_forward`] given dz: dW2 (cout, kh * kw * c) and, if `need_dx`,
/// dx (n, h, w, c). Each task's dW2 is its own partial sum; they are added in task order, so
/// the result does not depend on the thread count.
fn conv_backward(
    x: &[f32],
    g: ConvGeometry,
    dz: &[f32],
    w2: &[f32],
    cout: usize,
    pointwise: bool,
    need_dx: bool,
    tile_floats: usize,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (oh, ow) = g.out_hw();
    let (kk, px, per) = (g.k(), oh * ow, images_per_task(g, tile_floats));
    let in_image = g.h * g.w * g.c;
    let task = |xt: &[f32], dzt: &[f32], dxt: Option<&mut [f32]>| -> Vec<f32> {
        let imgs = xt.len() / in_image;
        let rows = imgs * px;
        let tile;
        let cols: &[f32] = if pointwise {
            xt
        } else {
            tile = im2col_tile(xt, g, imgs);
            &tile
        };
        let mut dw = vec![0f32; cout * kk];
        gemm_serial_into(
            (cout, kk, rows),
            &mut dw,
            false,
            mat_t(dzt, cout),
            mat(cols, kk),
        );
        if let Some(dxt) = dxt {
            if pointwise {
                gemm_serial_into((rows, kk, cout), dxt, false, mat(dzt, cout), mat(w2, kk));
            } else {
                let mut buf: Vec<f32> = Vec::with_capacity(rows * kk);
                let dcols = gemm_serial_uninit(
                    (rows, kk, cout),
                    buf.spare_capacity_mut(),
                    mat(dzt, cout),
                    mat(w2, kk),
                );
                for (img, c) in dxt.chunks_mut(in_image).zip(dcols.chunks(px * kk)) {
                    col2im_image(c, g, img);
                }
            }
        }
        dw
    };
    let (partials, dx): (Vec<Vec<f32>>, _) = if need_dx {
        let mut dx = crate::ops::zeros_par(g.n * in_image);
        let partials = dx
            .par_chunks_mut(per * in_image)
            .zip(x.par_chunks(per * in_image))
            .zip(dz.par_chunks(per * px * cout))
            .map(|((dxt, xt), dzt)| task(xt, dzt, Some(dxt)))
            .collect();
        (partials, Some(dx))
    } else {
        let partials = x
            .par_chunks(per * in_image)
            .zip(dz.par_chunks(per * px * cout))
            .map(|(xt, dzt)| task(xt, dzt, None))
            .collect();
        (partials, None)
    };
    let mut dw = vec![0f32; cout * kk];
    for p in partials {
        dw.iter_mut().zip(p).for_each(|(d, v)| *d += v);
    }
    (dw, dx)
}

/// One step of the network. Step i writes activation i + 1; activation 0 is the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// `units[unit]` applied to activation `input`.
    Conv { unit: usize, input: usize },
    /// max(a + b, 0): the end of a residual block.
    AddRelu { a: usize, b: usize },
}

/// The network as units and steps over an (h, w, c) input; the last activation is pooled.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub units: Vec<ConvUnit>,
    pub steps: Vec<Step>,
    pub eps: f32,
    /// Floats of im2col rows per task ([`TILE_FLOATS`]; the tests take one image per task).
    pub tile_floats: usize,
}

impl Plan {
    /// (h, w, c) of every activation, the input first.
    fn dims(&self, input: (usize, usize, usize)) -> Result<Vec<(usize, usize, usize)>> {
        let mut dims = vec![input];
        for step in &self.steps {
            let d = match *step {
                Step::Conv { unit, input } => {
                    let u = self.units[unit];
                    let (h, w, c) = dims[input];
                    if c != u.cin {
                        candle_core::bail!(
                            "kindling-resnet: unit {unit} expects {} channels, gets {c}",
                            u.cin
                        )
                    }
                    let (oh, ow) = u.geometry(1, (h, w, c)).out_hw();
                    (oh, ow, u.cout)
                }
                Step::AddRelu { a, b } => {
                    if dims[a] != dims[b] {
                        candle_core::bail!(
                            "kindling-resnet: residual add of {:?} and {:?}",
                            dims[a],
                            dims[b]
                        )
                    }
                    dims[a]
                }
            };
            dims.push(d);
        }
        Ok(dims)
    }

    fn param_offsets(&self) -> Vec<usize> {
        let mut at = 0;
        self.units
            .iter()
            .map(|u| {
                let o = at;
                at += u.params();
                o
            })
            .collect()
    }
}

/// A unit's batch statistics in one forward pass: mean and biased variance over `rows`.
pub(crate) struct BatchStats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub rows: usize,
}

/// Activations of the forward pass the backward pass reads.
struct Saved {
    /// Activation i at index i; index 0 (the input) is left empty.
    acts: Vec<Vec<f32>>,
    /// Each unit's convolution output (before its BatchNorm), its batch mean and
    /// 1 / sqrt(var + eps).
    z: Vec<Vec<f32>>,
    mean: Vec<Vec<f32>>,
    rstd: Vec<Vec<f32>>,
}

/// The encoder as one op on (images (n, h, w, c), flat parameters) -> pooled features (n, c').
pub(crate) struct ResNetOp {
    plan: Plan,
    /// Whether a backward pass can follow (keep the activations).
    save: bool,
    saved: Mutex<Option<Saved>>,
    /// Filled by the forward pass, one entry per unit, for the running statistics.
    stats: Arc<Mutex<Vec<BatchStats>>>,
}

fn add_grad(slot: &mut Option<Vec<f32>>, g: Vec<f32>) {
    match slot {
        None => *slot = Some(g),
        Some(acc) => acc
            .par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14))
            .for_each(|(a, g)| vectorised(|| a.iter_mut().zip(g).for_each(|(a, g)| *a += g))),
    }
}

/// Zeroes `g` where the ReLU output `y` is not positive.
fn relu_mask(y: &[f32], g: &mut [f32]) {
    g.par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(g, y)| {
            vectorised(|| {
                g.iter_mut()
                    .zip(y)
                    .for_each(|(g, &y)| *g = if y > 0.0 { *g } else { 0.0 })
            })
        });
}

impl CustomOp2 for ResNetOp {
    fn name(&self) -> &'static str {
        "kindling-resnet"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let flat = contiguous_f32(s2, l2, self.name())?;
        let (n, h, w, c) = l1.shape().dims4()?;
        let dims = self.plan.dims((h, w, c))?;
        let offsets = self.plan.param_offsets();
        let mut acts: Vec<Vec<f32>> = vec![Vec::new()];
        let (mut zs, mut means, mut rstds, mut stats) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());

        for step in &self.plan.steps {
            let y = match *step {
                Step::Conv { unit, input } => {
                    let u = self.plan.units[unit];
                    let src: &[f32] = if input == 0 { x } else { &acts[input] };
                    let p = &flat[offsets[unit]..offsets[unit] + u.params()];
                    let (wt, rest) = p.split_at(u.weights());
                    let (gamma, beta) = rest.split_at(u.cout);
                    let g = u.geometry(n, dims[input]);
                    let (oh, ow) = g.out_hw();
                    let rows = n * oh * ow;
                    let z = conv_forward(
                        src,
                        g,
                        &u.weight_rows(wt),
                        u.cout,
                        u.is_pointwise(),
                        self.plan.tile_floats,
                    );
                    let (mean, var) = column_mean_var(&z, rows, u.cout);
                    let y = batch_norm_apply(&z, (&mean, &var), gamma, beta, self.plan.eps, u.relu);
                    rstds.push(
                        var.iter()
                            .map(|v| 1.0 / (v + self.plan.eps).sqrt())
                            .collect::<Vec<f32>>(),
                    );
                    means.push(mean.clone());
                    stats.push(BatchStats { mean, var, rows });
                    zs.push(z);
                    y
                }
                Step::AddRelu { a, b } => {
                    let (a, b) = (&acts[a], &acts[b]);
                    let mut y = crate::ops::zeros_par(a.len());
                    y.par_chunks_mut(1 << 14)
                        .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
                        .for_each(|(y, (a, b))| {
                            vectorised(|| {
                                for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                                    *y = (a + b).max(0.0);
                                }
                            })
                        });
                    y
                }
            };
            acts.push(y);
        }
        // Global average pool: (n, p, c') -> (n, c').
        let (fh, fw, fc) = *dims.last().expect("dims has the input");
        let pixels = fh * fw;
        let last = acts.last().expect("a step");
        let mut feats = vec![0f32; n * fc];
        for (f, img) in feats.chunks_mut(fc).zip(last.chunks(pixels * fc)) {
            for px in img.chunks(fc) {
                f.iter_mut().zip(px).for_each(|(f, v)| *f += v);
            }
            f.iter_mut().for_each(|f| *f /= pixels as f32);
        }
        *self.stats.lock().expect("batch statistics") = stats;
        if self.save {
            *self.saved.lock().expect("saved activations") = Some(Saved {
                acts,
                z: zs,
                mean: means,
                rstd: rstds,
            });
        }
        Ok((CpuStorage::F32(feats), Shape::from((n, fc))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("saved activations");
        let s = saved_activations(&guard, self.name())?;
        with_cpu_inputs(x, flat, grad, |xs, params, dfeat| {
            let (n, h, w, c) = x.dims4()?;
            let dims = self.plan.dims((h, w, c))?;
            let offsets = self.plan.param_offsets();
            let mut dflat = crate::ops::zeros_par(params.len());

            // The pool spreads each feature's gradient evenly over the last map's pixels.
            let mut grads: Vec<Option<Vec<f32>>> = vec![None; s.acts.len()];
            let (fh, fw, fc) = *dims.last().expect("dims has the input");
            let pixels = fh * fw;
            let mut dlast = crate::ops::zeros_par(n * pixels * fc);
            for (img, f) in dlast.chunks_mut(pixels * fc).zip(dfeat.chunks(fc)) {
                for px in img.chunks_mut(fc) {
                    px.iter_mut()
                        .zip(f)
                        .for_each(|(d, f)| *d = f / pixels as f32);
                }
            }
            grads[s.acts.len() - 1] = Some(dlast);

            for (i, step) in self.plan.steps.iter().enumerate().rev() {
                let out = i + 1;
                let Some(mut g) = grads[out].take() else {
                    continue; // an activation nothing downstream reads
                };
                match *step {
                    Step::AddRelu { a, b } => {
                        relu_mask(&s.acts[out], &mut g);
                        add_grad(&mut grads[a], g.clone());
                        add_grad(&mut grads[b], g);
                    }
                    Step::Conv { unit, input } => {
                        let u = self.plan.units[unit];
                        if u.relu {
                            relu_mask(&s.acts[out], &mut g);
                        }
                        let src: &[f32] = if input == 0 { xs } else { &s.acts[input] };
                        let off = offsets[unit];
                        let wt = &params[off..off + u.weights()];
                        let gamma = &params[off + u.weights()..off + u.weights() + u.cout];
                        let cg = u.geometry(n, dims[input]);
                        let mut dz = crate::ops::zeros_par(g.len());
                        let (dgamma, dbeta) = batch_norm_grad(
                            &s.z[unit],
                            (&s.mean[unit], &s.rstd[unit]),
                            gamma,
                            &g,
                            &mut dz,
                        );
                        drop(g);
                        let dp = &mut dflat[off..off + u.params()];
                        let (dw, drest) = dp.split_at_mut(u.weights());
                        drest[..u.cout].copy_from_slice(&dgamma);
                        drest[u.cout..].copy_from_slice(&dbeta);
                        // The images need no gradient: the stem's dx is not computed.
                        let w2 = u.weight_rows(wt);
                        let (dw2, dx) = conv_backward(
                            src,
                            cg,
                            &dz,
                            &w2,
                            u.cout,
                            u.is_pointwise(),
                            input != 0,
                            self.plan.tile_floats,
                        );
                        u.weight_from_rows(&dw2, dw);
                        if let Some(dx) = dx {
                            add_grad(&mut grads[input], dx);
                        }
                    }
                }
            }
            Ok((
                None,
                Some(Tensor::from_vec(dflat, flat.shape(), flat.device())?),
            ))
        })
    }
}

/// Runs `plan` on `xs` (n, h, w, c) with the units' parameters `params` (three tensors per
/// unit, see [`ConvUnit`]); returns the pooled features (n, c') and each unit's batch
/// statistics. `xs` must not need a gradient.
pub(crate) fn resnet_forward(
    xs: &Tensor,
    plan: Plan,
    params: &[&Tensor],
) -> Result<(Tensor, Vec<BatchStats>)> {
    if xs.track_op() {
        candle_core::bail!("kindling-resnet: the fused encoder gives no gradient for its input")
    }
    let flat = Tensor::cat(
        &params
            .iter()
            .map(|t| t.flatten_all())
            .collect::<Result<Vec<_>>>()?,
        0,
    )?;
    let expected: usize = plan.units.iter().map(ConvUnit::params).sum();
    if flat.elem_count() != expected {
        candle_core::bail!(
            "kindling-resnet: parameters hold {} values, the units need {expected}",
            flat.elem_count()
        )
    }
    let stats = Arc::new(Mutex::new(Vec::new()));
    let op = ResNetOp {
        plan,
        save: flat.track_op(),
        saved: Mutex::new(None),
        stats: stats.clone(),
    };
    let feats = xs.contiguous()?.apply_op2(&flat, op)?;
    let stats = std::mem::take(&mut *stats.lock().expect("batch statistics"));
    Ok((feats, stats))
}
