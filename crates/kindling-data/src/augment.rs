//! Augmented views, the self-labels of the vision SSL family: each image is turned into two (or
//! more) random views by a pipeline of small stages declared in the recipe, and the objective
//! learns what the views share. Stages follow torchvision's definitions (SimCLR's and BYOL's
//! augmentations are written in those terms). Every draw comes from a stream seeded by
//! (seed, epoch, image index, view), so views are the same on any thread count and after a
//! resume.
//!
//! Images are f32 height x width x channels in [0, 1] until `normalize`.

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use kindling_core::rng::{self, domain};

use crate::error::{DataError, Result};
use crate::images::ImageSet;
use crate::loader::Cursor;

/// An f32 HWC image.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl Image {
    /// u8 pixels to [0, 1].
    pub fn from_u8(px: &[u8], height: usize, width: usize, channels: usize) -> Self {
        Image {
            height,
            width,
            channels,
            data: px.iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }

    #[inline]
    fn at(&self, y: usize, x: usize, c: usize) -> f32 {
        self.data[(y * self.width + x) * self.channels + c]
    }

    /// Bilinear resampling of the box (top, left, height, width) to `out_h` x `out_w`, with
    /// torchvision's pixel-centre alignment (`align_corners = False`).
    fn resized_crop(
        &self,
        top: f32,
        left: f32,
        h: f32,
        w: f32,
        out_h: usize,
        out_w: usize,
    ) -> Self {
        let c = self.channels;
        let mut data = vec![0f32; out_h * out_w * c];
        let (sy, sx) = (h / out_h as f32, w / out_w as f32);
        for oy in 0..out_h {
            let fy = (top + (oy as f32 + 0.5) * sy - 0.5).clamp(0.0, (self.height - 1) as f32);
            let (y0, wy) = (fy.floor() as usize, fy - fy.floor());
            let y1 = (y0 + 1).min(self.height - 1);
            for ox in 0..out_w {
                let fx = (left + (ox as f32 + 0.5) * sx - 0.5).clamp(0.0, (self.width - 1) as f32);
                let (x0, wx) = (fx.floor() as usize, fx - fx.floor());
                let x1 = (x0 + 1).min(self.width - 1);
                for ch in 0..c {
                    let top_row = self.at(y0, x0, ch) * (1.0 - wx) + self.at(y0, x1, ch) * wx;
                    let bottom = self.at(y1, x0, ch) * (1.0 - wx) + self.at(y1, x1, ch) * wx;
                    data[(oy * out_w + ox) * c + ch] = top_row * (1.0 - wy) + bottom * wy;
                }
            }
        }
        Image {
            height: out_h,
            width: out_w,
            channels: c,
            data,
        }
    }

    /// Per-pixel luma (ITU-R 601, as torchvision's `rgb_to_grayscale`); the pixel itself for one
    /// channel.
    fn gray(&self, p: usize) -> f32 {
        let c = self.channels;
        if c == 3 {
            0.299 * self.data[p * 3] + 0.587 * self.data[p * 3 + 1] + 0.114 * self.data[p * 3 + 2]
        } else {
            self.data[p * c]
        }
    }
}

/// One stage of a view pipeline (`{ kind = "random_resized_crop", size = 28 }` in a recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stage {
    RandomResizedCrop(RandomResizedCrop),
    Resize(Resize),
    HorizontalFlip(Flip),
    ColorJitter(ColorJitter),
    Grayscale(Grayscale),
    GaussianBlur(GaussianBlur),
    Solarize(Solarize),
    Normalize(Normalize),
}

/// A crop of random area fraction `scale` and aspect ratio `ratio`, resized to `size` x `size`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RandomResizedCrop {
    pub size: usize,
    pub scale: (f32, f32),
    pub ratio: (f32, f32),
}

impl Default for RandomResizedCrop {
    fn default() -> Self {
        RandomResizedCrop {
            size: 32,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

/// Resize the whole image to `size` x `size` (evaluation views).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    pub size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flip {
    pub p: f32,
}

impl Default for Flip {
    fn default() -> Self {
        Flip { p: 0.5 }
    }
}

/// With probability `p`: brightness, contrast, saturation and hue changes by random factors
/// (1 +- brightness, ...; hue is a rotation of up to +-hue turns), in a random order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColorJitter {
    pub p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl Default for ColorJitter {
    fn default() -> Self {
        // SimCLR's strength-1 jitter (0.8, 0.8, 0.8, 0.2) is for ImageNet; these are the CIFAR
        // settings of solo-learn.
        ColorJitter {
            p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grayscale {
    pub p: f32,
}

impl Default for Grayscale {
    fn default() -> Self {
        Grayscale { p: 0.2 }
    }
}

/// With probability `p`, a Gaussian blur of sigma drawn from `sigma`; the kernel spans
/// `kernel_fraction` of the image side (SimCLR: 10%), made odd, at least 3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GaussianBlur {
    pub p: f32,
    pub sigma: (f32, f32),
    pub kernel_fraction: f32,
}

impl Default for GaussianBlur {
    fn default() -> Self {
        GaussianBlur {
            p: 0.5,
            sigma: (0.1, 2.0),
            kernel_fraction: 0.1,
        }
    }
}

/// With probability `p`, pixels at or above `threshold` are inverted (BYOL's second view).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Solarize {
    pub p: f32,
    pub threshold: f32,
}

impl Default for Solarize {
    fn default() -> Self {
        Solarize {
            p: 0.2,
            threshold: 0.5,
        }
    }
}

/// `(x - mean) / std` per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Stage {
    /// Every value in its range: probabilities in [0, 1], strengths and sigmas finite and
    /// non-negative, ranges in order (a `scale` of `[1.0, 0.2]` would panic when drawn).
    pub fn check(&self) -> Result<()> {
        fn bad(key: &'static str, msg: String) -> Result<()> {
            Err(DataError::Config { key, msg })
        }
        let prob = |key: &'static str, p: f32| {
            if p.is_finite() && (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                bad(key, format!("a probability must be in [0, 1], got {p}"))
            }
        };
        let non_negative = |key: &'static str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                bad(key, format!("must be a finite number >= 0, got {v}"))
            }
        };
        let range = |key: &'static str, (lo, hi): (f32, f32), min: f32, max: f32| {
            if lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi && hi <= max {
                Ok(())
            } else {
                bad(
                    key,
                    format!(
                        "must be [low, high] with {min} <= low <= high <= {max}, got [{lo}, {hi}]"
                    ),
                )
            }
        };
        match self {
            Stage::RandomResizedCrop(r) => {
                range(
                    "data.views.stages.random_resized_crop.scale",
                    r.scale,
                    f32::MIN_POSITIVE,
                    1.0,
                )?;
                range(
                    "data.views.stages.random_resized_crop.ratio",
                    r.ratio,
                    f32::MIN_POSITIVE,
                    f32::MAX,
                )
            }
            Stage::Resize(_) | Stage::Normalize(_) => Ok(()),
            Stage::HorizontalFlip(f) => prob("data.views.stages.horizontal_flip.p", f.p),
            Stage::ColorJitter(j) => {
                prob("data.views.stages.color_jitter.p", j.p)?;
                non_negative("data.views.stages.color_jitter.brightness", j.brightness)?;
                non_negative("data.views.stages.color_jitter.contrast", j.contrast)?;
                non_negative("data.views.stages.color_jitter.saturation", j.saturation)?;
                if !(j.hue.is_finite() && (0.0..=0.5).contains(&j.hue)) {
                    return bad(
                        "data.views.stages.color_jitter.hue",
                        format!("must be in [0, 0.5] (turns), got {}", j.hue),
                    );
                }
                Ok(())
            }
            Stage::Grayscale(g) => prob("data.views.stages.grayscale.p", g.p),
            Stage::GaussianBlur(b) => {
                prob("data.views.stages.gaussian_blur.p", b.p)?;
                range(
                    "data.views.stages.gaussian_blur.sigma",
                    b.sigma,
                    f32::MIN_POSITIVE,
                    f32::MAX,
                )?;
                non_negative(
                    "data.views.stages.gaussian_blur.kernel_fraction",
                    b.kernel_fraction,
                )
            }
            Stage::Solarize(z) => {
                prob("data.views.stages.solarize.p", z.p)?;
                non_negative("data.views.stages.solarize.threshold", z.threshold)
            }
        }
    }
}

/// A view: the stages applied in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewPipeline {
    pub stages: Vec<Stage>,
    /// How many views of each image this pipeline makes (multi-crop: `count = 6` small local
    /// crops); each draws its own augmentations.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Default for ViewPipeline {
    fn default() -> Self {
        ViewPipeline {
            stages: Vec::new(),
            count: 1,
        }
    }
}

impl ViewPipeline {
    /// The (height, width, channels) this pipeline makes from an input of the given shape;
    /// checks the stages against it.
    pub fn output_shape(&self, h: usize, w: usize, c: usize) -> Result<(usize, usize, usize)> {
        let (mut h, mut w) = (h, w);
        for s in &self.stages {
            s.check()?;
            match s {
                Stage::RandomResizedCrop(r) => (h, w) = (r.size, r.size),
                Stage::Resize(r) => (h, w) = (r.size, r.size),
                Stage::Normalize(n) => {
                    if n.mean.len() != c
                        || n.std.len() != c
                        || n.std.iter().any(|&s| !(s.is_finite() && s > 0.0))
                        || n.mean.iter().any(|m| !m.is_finite())
                    {
                        return Err(DataError::Config {
                            key: "data.views.stages.normalize",
                            msg: format!(
                                "needs {c} means and {c} positive stds for {c}-channel images, got {:?} and {:?}",
                                n.mean, n.std
                            ),
                        });
                    }
                }
                _ => {}
            }
            if h == 0 || w == 0 {
                return Err(DataError::Config {
                    key: "data.views.stages",
                    msg: "a crop or resize `size` must be at least 1".into(),
                });
            }
        }
        Ok((h, w, c))
    }

    /// Applies the stages to `img` with draws from `rng`.
    pub fn apply(&self, mut img: Image, rng: &mut impl Rng) -> Image {
        for s in &self.stages {
            img = match s {
                Stage::RandomResizedCrop(r) => random_resized_crop(&img, r, rng),
                Stage::Resize(r) => img.resized_crop(
                    0.0,
                    0.0,
                    img.height as f32,
                    img.width as f32,
                    r.size,
                    r.size,
                ),
                Stage::HorizontalFlip(f) => {
                    if rng.random::<f32>() < f.p {
                        flip(&mut img);
                    }
                    img
                }
                Stage::ColorJitter(j) => {
                    if rng.random::<f32>() < j.p {
                        color_jitter(&mut img, j, rng);
                    }
                    img
                }
                Stage::Grayscale(g) => {
                    if rng.random::<f32>() < g.p && img.channels == 3 {
                        for p in 0..img.height * img.width {
                            let y = img.gray(p);
                            img.data[p * 3..p * 3 + 3].fill(y);
                        }
                    }
                    img
                }
                Stage::GaussianBlur(b) => {
                    if rng.random::<f32>() < b.p {
                        let sigma = rng.random_range(b.sigma.0..=b.sigma.1.max(b.sigma.0));
                        gaussian_blur(&img, sigma, b.kernel_fraction)
                    } else {
                        img
                    }
                }
                Stage::Solarize(s) => {
                    if rng.random::<f32>() < s.p {
                        img.data
                            .iter_mut()
                            .filter(|v| **v >= s.threshold)
                            .for_each(|v| *v = 1.0 - *v);
                    }
                    img
                }
                Stage::Normalize(n) => {
                    let c = img.channels;
                    for (i, v) in img.data.iter_mut().enumerate() {
                        *v = (*v - n.mean[i % c]) / n.std[i % c];
                    }
                    img
                }
            };
        }
        img
    }
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a box of random area and
/// log-uniform aspect ratio inside the image, else the central crop of the clamped ratio.
fn random_resized_crop(img: &Image, r: &RandomResizedCrop, rng: &mut impl Rng) -> Image {
    let (h, w) = (img.height as f32, img.width as f32);
    let area = h * w;
    let (lr0, lr1) = (r.ratio.0.ln(), r.ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(r.scale.0..=r.scale.1);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let top = rng.random_range(0..=(h - ch) as usize) as f32;
            let left = rng.random_range(0..=(w - cw) as usize) as f32;
            return img.resized_crop(top, left, ch, cw, r.size, r.size);
        }
    }
    let in_ratio = w / h;
    let (cw, ch) = if in_ratio < r.ratio.0 {
        (w, (w / r.ratio.0).round())
    } else if in_ratio > r.ratio.1 {
        ((h * r.ratio.1).round(), h)
    } else {
        (w, h)
    };
    img.resized_crop(
        ((h - ch) / 2.0).floor(),
        ((w - cw) / 2.0).floor(),
        ch,
        cw,
        r.size,
        r.size,
    )
}

fn flip(img: &mut Image) {
    let (w, c) = (img.width, img.channels);
    for row in img.data.chunks_mut(w * c) {
        for x in 0..w / 2 {
            for ch in 0..c {
                row.swap(x * c + ch, (w - 1 - x) * c + ch);
            }
        }
    }
}

fn color_jitter(img: &mut Image, j: &ColorJitter, rng: &mut impl Rng) {
    let mut order = [0usize, 1, 2, 3];
    order.shuffle(rng);
    let factor = |rng: &mut dyn rand::RngCore, s: f32| {
        if s > 0.0 {
            rng.random_range((1.0 - s).max(0.0)..=1.0 + s)
        } else {
            1.0
        }
    };
    let n = img.height * img.width;
    for op in order {
        match op {
            0 => {
                let f = factor(rng, j.brightness);
                img.data
                    .iter_mut()
                    .for_each(|v| *v = (*v * f).clamp(0.0, 1.0));
            }
            1 => {
                let f = factor(rng, j.contrast);
                let mean = (0..n).map(|p| img.gray(p)).sum::<f32>() / n as f32;
                img.data
                    .iter_mut()
                    .for_each(|v| *v = ((*v - mean) * f + mean).clamp(0.0, 1.0));
            }
            2 if img.channels == 3 => {
                let f = factor(rng, j.saturation);
                for p in 0..n {
                    let y = img.gray(p);
                    for v in &mut img.data[p * 3..p * 3 + 3] {
                        *v = ((*v - y) * f + y).clamp(0.0, 1.0);
                    }
                }
            }
            3 if img.channels == 3 && j.hue > 0.0 => {
                // A rotation of the chroma plane in YIQ space: the hue shift without an HSV
                // round trip.
                let angle = rng.random_range(-j.hue..=j.hue) * std::f32::consts::TAU;
                let (s, c) = angle.sin_cos();
                for p in 0..n {
                    let px = &mut img.data[p * 3..p * 3 + 3];
                    let y = 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2];
                    let i = 0.596 * px[0] - 0.274 * px[1] - 0.322 * px[2];
                    let q = 0.211 * px[0] - 0.523 * px[1] + 0.312 * px[2];
                    let (i, q) = (i * c - q * s, i * s + q * c);
                    px[0] = (y + 0.956 * i + 0.621 * q).clamp(0.0, 1.0);
                    px[1] = (y - 0.272 * i - 0.647 * q).clamp(0.0, 1.0);
                    px[2] = (y - 1.106 * i + 1.703 * q).clamp(0.0, 1.0);
                }
            }
            _ => {}
        }
    }
}

/// Separable Gaussian blur with reflected borders.
fn gaussian_blur(img: &Image, sigma: f32, kernel_fraction: f32) -> Image {
    let side = img.height.min(img.width) as f32;
    let mut k = ((side * kernel_fraction) as usize).max(3);
    if k % 2 == 0 {
        k += 1;
    }
    let r = (k / 2) as isize;
    let mut weights: Vec<f32> = (-r..=r)
        .map(|d| (-((d * d) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = weights.iter().sum();
    weights.iter_mut().for_each(|w| *w /= total);
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let mut i = i;
        if i < 0 {
            i = -i;
        }
        if i >= n {
            i = 2 * (n - 1) - i;
        }
        i.clamp(0, n - 1) as usize
    };
    let (h, w, c) = (img.height, img.width, img.channels);
    let mut tmp = vec![0f32; img.data.len()];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                tmp[(y * w + x) * c + ch] = weights
                    .iter()
                    .enumerate()
                    .map(|(t, wt)| wt * img.at(y, reflect(x as isize + t as isize - r, w), ch))
                    .sum();
            }
        }
    }
    let mut out = vec![0f32; img.data.len()];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                out[(y * w + x) * c + ch] = weights
                    .iter()
                    .enumerate()
                    .map(|(t, wt)| {
                        wt * tmp[(reflect(y as isize + t as isize - r, h) * w + x) * c + ch]
                    })
                    .sum();
            }
        }
    }
    Image {
        height: h,
        width: w,
        channels: c,
        data: out,
    }
}

/// A batch of views: `views[v]` holds view v of every image, stacked (n, h, w, c).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewBatch {
    pub n: usize,
    /// (height, width, channels) of each view.
    pub shapes: Vec<(usize, usize, usize)>,
    pub views: Vec<Vec<f32>>,
    /// The images' labels, if the source has them (never used by the objectives' losses).
    pub labels: Option<Vec<u32>>,
    /// The cursor after this batch.
    pub cursor_after: Cursor,
}

/// Makes the views of images `indices` of `set`, image by image in parallel.
pub fn build_views(
    set: &ImageSet,
    pipelines: &[ViewPipeline],
    indices: &[u32],
    seed: u64,
    epoch: u64,
    cursor_after: Cursor,
) -> Result<ViewBatch> {
    let (h, w, c) = (set.height, set.width, set.channels);
    let shapes = pipelines
        .iter()
        .map(|p| p.output_shape(h, w, c))
        .collect::<Result<Vec<_>>>()?;
    // A streamed folder decodes each image here, in the same parallel pass.
    let per_image: Vec<Vec<Image>> = indices
        .par_iter()
        .map(|&i| {
            let src = Image::from_u8(&set.image(i as usize)?, h, w, c);
            Ok(pipelines
                .iter()
                .enumerate()
                .map(|(v, p)| {
                    let mut r = rng::rng(&[seed, domain::AUGMENT, epoch, i as u64, v as u64]);
                    p.apply(src.clone(), &mut r)
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    let mut views: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(h, w, c)| Vec::with_capacity(indices.len() * h * w * c))
        .collect();
    for imgs in per_image {
        for (v, img) in imgs.into_iter().enumerate() {
            views[v].extend_from_slice(&img.data);
        }
    }
    Ok(ViewBatch {
        n: indices.len(),
        shapes,
        views,
        labels: set
            .labels
            .as_ref()
            .map(|l| indices.iter().map(|&i| l[i as usize]).collect()),
        cursor_after,
    })
}

/// An endless stream of view batches: each epoch visits every image once in a seeded order (the
/// incomplete last batch is dropped). The cursor is (epoch, images consumed in it).
pub struct ViewLoader {
    set: Arc<ImageSet>,
    pipelines: Arc<Vec<ViewPipeline>>,
    batch_size: usize,
    seed: u64,
    cursor: Cursor,
    order: Option<(u64, Vec<u32>)>,
    /// Data parallel: (rank, world) and the batches served since the start or the last seek.
    rank: Option<(usize, usize)>,
    served: u64,
}

impl ViewLoader {
    pub fn new(
        set: Arc<ImageSet>,
        pipelines: Vec<ViewPipeline>,
        batch_size: usize,
        seed: u64,
    ) -> Result<Self> {
        if batch_size == 0 || batch_size > set.len() {
            return Err(DataError::Config {
                key: "train.batch_size",
                msg: format!(
                    "must be between 1 and the {} training images, got {batch_size}",
                    set.len()
                ),
            });
        }
        for p in &pipelines {
            p.output_shape(set.height, set.width, set.channels)?;
        }
        Ok(ViewLoader {
            set,
            pipelines: Arc::new(pipelines),
            batch_size,
            seed,
            cursor: Cursor::default(),
            order: None,
            rank: None,
            served: 0,
        })
    }

    /// Data parallel: the trainer takes the `rank`-th of every `world` consecutive batches, so
    /// the others come out empty (no images, the same cursor): each rank augments only its own
    /// images. A seek (a resume, always at a group's boundary) starts a group.
    pub fn for_rank(mut self, rank: usize, world: usize) -> Self {
        assert!(rank < world, "rank {rank} of a world of {world}");
        self.rank = Some((rank, world));
        self
    }

    /// Continue from a saved cursor.
    pub fn seek(&mut self, cursor: Cursor) {
        self.cursor = cursor;
        self.served = 0;
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.set.len() / self.batch_size
    }

    /// The images an epoch visits.
    pub fn images_len(&self) -> usize {
        self.set.len()
    }

    /// The shuffled order of epoch `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.set.len() as u32).collect();
        order.shuffle(&mut rng::rng(&[self.seed, domain::DATA_ORDER, epoch]));
        order
    }
}

impl Iterator for ViewLoader {
    type Item = ViewBatch;

    fn next(&mut self) -> Option<ViewBatch> {
        let per_epoch = self.batches_per_epoch() as u64 * self.batch_size as u64;
        if self.cursor.position + self.batch_size as u64 > per_epoch {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
        }
        let epoch = self.cursor.epoch;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, self.epoch_order(epoch)));
        }
        let start = self.cursor.position as usize;
        let order = &self.order.as_ref().expect("order was just set").1;
        let indices = &order[start..start + self.batch_size];
        self.cursor.position += self.batch_size as u64;
        let served = self.served;
        self.served += 1;
        if let Some((rank, world)) = self.rank {
            if served % world as u64 != rank as u64 {
                return Some(ViewBatch {
                    n: 0,
                    shapes: Vec::new(),
                    views: Vec::new(),
                    labels: None,
                    cursor_after: self.cursor,
                });
            }
        }
        // An error here is a streamed image that stopped decoding after its header was
        // checked: say which, and end the stream (the trainer then stops at this step).
        match build_views(
            &self.set,
            &self.pipelines,
            indices,
            self.seed,
            epoch,
            self.cursor,
        ) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("error: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize, c: usize) -> ImageSet {
        ImageSet::in_memory(
            (h, w, c),
            (0..4 * h * w * c).map(|i| (i * 7 % 256) as u8).collect(),
            Some(vec![0, 1, 2, 3]),
            vec![],
        )
    }

    fn simclr_like(size: usize) -> ViewPipeline {
        toml::from_str(&format!(
            r#"stages = [
                {{ kind = "random_resized_crop", size = {size}, scale = [0.2, 1.0] }},
                {{ kind = "horizontal_flip" }},
                {{ kind = "color_jitter" }},
                {{ kind = "grayscale" }},
                {{ kind = "gaussian_blur", p = 1.0 }},
                {{ kind = "solarize", p = 0.5 }},
                {{ kind = "normalize", mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }},
            ]"#
        ))
        .unwrap()
    }

    #[test]
    fn views_depend_only_on_seed_epoch_and_index_not_on_threads() {
        let set = ramp(12, 10, 3);
        let p = vec![simclr_like(8), simclr_like(8)];
        let a = build_views(&set, &p, &[3, 1], 5, 2, Cursor::default()).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool
            .install(|| build_views(&set, &p, &[1, 3], 5, 2, Cursor::default()))
            .unwrap();
        let n = 8 * 8 * 3;
        assert_eq!(a.views[0][..n], b.views[0][n..], "image 3, view 0");
        assert_eq!(a.views[1][n..], b.views[1][..n], "image 1, view 1");
        assert_ne!(
            a.views[0][..n],
            a.views[1][..n],
            "two views of one image differ"
        );
        let c = build_views(&set, &p, &[3, 1], 5, 3, Cursor::default()).unwrap();
        assert_ne!(a.views[0], c.views[0], "another epoch draws other views");
        assert_eq!(a.shapes, vec![(8, 8, 3); 2]);
        assert_eq!(a.labels, Some(vec![3, 1]));
    }

    #[test]
    fn stages_do_what_they_say() {
        let img = Image::from_u8(&(0..16u8).map(|v| v * 16).collect::<Vec<_>>(), 4, 4, 1);
        let mut r = rng::rng(&[1]);
        let flip: ViewPipeline =
            toml::from_str(r#"stages = [{ kind = "horizontal_flip", p = 1.0 }]"#).unwrap();
        let f = flip.apply(img.clone(), &mut r);
        assert_eq!(f.data[0], img.data[3]);
        assert_eq!(f.data[7], img.data[4]);
        // A full-image crop at the same size is the identity.
        let crop: ViewPipeline = toml::from_str(
            r#"stages = [{ kind = "random_resized_crop", size = 4, scale = [1.0, 1.0], ratio = [1.0, 1.0] }]"#,
        )
        .unwrap();
        let c = crop.apply(img.clone(), &mut r);
        for (a, b) in c.data.iter().zip(&img.data) {
            assert!((a - b).abs() < 1e-6);
        }
        let sol: ViewPipeline =
            toml::from_str(r#"stages = [{ kind = "solarize", p = 1.0, threshold = 0.5 }]"#)
                .unwrap();
        let s = sol.apply(img.clone(), &mut r);
        assert_eq!(s.data[1], img.data[1]);
        assert!((s.data[15] - (1.0 - img.data[15])).abs() < 1e-6);
        // A blur keeps the mean of a constant image and smooths a step.
        let blur: ViewPipeline =
            toml::from_str(r#"stages = [{ kind = "gaussian_blur", p = 1.0, sigma = [1.0, 1.0] }]"#)
                .unwrap();
        let b = blur.apply(img.clone(), &mut r);
        let spread = |d: &[f32]| {
            d.iter().cloned().fold(f32::MIN, f32::max) - d.iter().cloned().fold(f32::MAX, f32::min)
        };
        assert!(spread(&b.data) < spread(&img.data));
        let norm: ViewPipeline =
            toml::from_str(r#"stages = [{ kind = "normalize", mean = [0.5], std = [0.5] }]"#)
                .unwrap();
        let n = norm.apply(img.clone(), &mut r);
        assert!((n.data[0] + 1.0).abs() < 1e-6);
    }

    #[test]
    fn bad_stages_are_named() {
        let e = toml::from_str::<ViewPipeline>(r#"stages = [{ kind = "rotate" }]"#).unwrap_err();
        assert!(e.to_string().contains("rotate"), "{e}");
        let e = toml::from_str::<ViewPipeline>(r#"stages = [{ kind = "horizontal_flip", q = 1 }]"#)
            .unwrap_err();
        assert!(e.to_string().contains('q'), "{e}");
        let p: ViewPipeline =
            toml::from_str(r#"stages = [{ kind = "normalize", mean = [0.5], std = [0.5] }]"#)
                .unwrap();
        let e = p.output_shape(4, 4, 3).unwrap_err().to_string();
        assert!(e.contains("normalize") && e.contains("3 means"), "{e}");
    }

    #[test]
    fn loader_walks_epochs_in_seeded_orders_and_resumes_from_its_cursor() {
        let set = Arc::new(ramp(6, 6, 1));
        let p = vec![ViewPipeline::default(); 2];
        let mut a = ViewLoader::new(set.clone(), p.clone(), 2, 9).unwrap();
        let batches: Vec<ViewBatch> = (&mut a).take(5).collect();
        assert_eq!(
            batches[1].cursor_after,
            Cursor {
                epoch: 0,
                position: 4
            }
        );
        assert_eq!(
            batches[2].cursor_after,
            Cursor {
                epoch: 1,
                position: 2
            }
        );
        let mut seen: Vec<u32> = batches[..2]
            .iter()
            .flat_map(|b| b.labels.clone().unwrap())
            .collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3], "one epoch sees every image once");
        let mut b = ViewLoader::new(set, p, 2, 9).unwrap();
        b.seek(batches[2].cursor_after);
        assert_eq!(b.next().unwrap(), batches[3]);
        assert!(ViewLoader::new(Arc::new(ramp(6, 6, 1)), vec![], 5, 0).is_err());
    }

    /// A rank's loader yields, at its own positions in every group of `world`, exactly the
    /// batches the plain loader yields there (same images, same augmentations), and empty
    /// batches with the same cursors elsewhere; after a seek the groups start again.
    #[test]
    fn a_rank_augments_only_its_own_batches_with_the_plain_cursors() {
        let set = Arc::new(ramp(6, 6, 3));
        let pipe = simclr_like(4);
        let plain = || ViewLoader::new(set.clone(), vec![pipe.clone()], 1, 5).unwrap();
        let all: Vec<ViewBatch> = plain().take(9).collect();
        let mine: Vec<ViewBatch> = plain().for_rank(1, 3).take(9).collect();
        for (i, (a, m)) in all.iter().zip(&mine).enumerate() {
            assert_eq!(a.cursor_after, m.cursor_after, "batch {i}");
            if i % 3 == 1 {
                assert_eq!((m.n, &m.views), (a.n, &a.views), "batch {i}");
            } else {
                assert_eq!((m.n, m.views.len()), (0, 0), "batch {i} is not rank 1's");
            }
        }
        let mut resumed = plain().for_rank(1, 3);
        resumed.seek(all[2].cursor_after);
        let next: Vec<ViewBatch> = resumed.take(3).collect();
        assert_eq!(
            next[1].views, all[4].views,
            "after a seek, the group starts at the cursor"
        );
    }
}
