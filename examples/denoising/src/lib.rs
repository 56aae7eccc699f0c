//! A denoising autoencoder (Vincent et al., 2008) written outside Kindling: the images are
//! corrupted with Gaussian noise, an MLP encodes and decodes them, and the loss is the mean
//! squared error against the clean image. The self-label is the clean image itself.
//!
//! What this file writes is research code only: the settings, a loader, the objective and an
//! export. `kindling_recipes::run::drive` runs it through the same lifecycle as the shipped
//! recipes (settings checked, nothing written before the resume checkpoint is picked, the
//! trainer, checkpoints, exact resume, signals, metrics and plots).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use kindling_core::{rng, Mode};
use kindling_recipes::recipe::{name_from_file, parse_recipe, recipe_toml, Header, TrainSection};
use kindling_recipes::run::{Context, Experiment, Loader, Prepared, RunOf};
use kindling_recipes::RecipeError;
use kindling_train::{FitSummary, Objective, StepOutput};
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// The settings file (`denoising.toml`): Kindling's shared recipe header (name, runs_dir, seed,
/// device, precision, kernels, `[train]`, `[export]`, with Kindling's defaults and checks), then
/// this objective's own keys. [`Settings::load`] reads it as Kindling reads its own recipes.
/// (This example computes on the CPU: it leaves [`Experiment::device`] at its default.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub header: Header,
    pub images: PathBuf,
    pub test_images: PathBuf,
    pub max_images: usize,
    pub max_test_images: usize,
    pub hidden_size: usize,
    pub noise_std: f32,
}

impl Settings {
    /// Reads a settings file with `key=value` overrides (`train.steps=10`); errors name the file
    /// and the key, as for Kindling's recipes.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut s: Settings = parse_recipe(&text, path, overrides)?;
        name_from_file(&mut s.header, path);
        Ok(s)
    }
}

/// Images as rows of `[0, 1]` pixels.
fn pixels(path: &Path, max: usize) -> Result<(Vec<f32>, usize), RecipeError> {
    let set = kindling_data::images::read_idx(path, None)?;
    let dim = set.height * set.width * set.channels;
    let n = (set.pixels.len() / dim).min(max);
    let x = set.pixels[..n * dim]
        .iter()
        .map(|&p| p as f32 / 255.0)
        .collect();
    Ok((x, dim))
}

/// A batch: clean and noisy rows, and where the run stands after it.
pub struct Batch {
    pub clean: Vec<f32>,
    pub noisy: Vec<f32>,
    pub rows: usize,
    pub cursor_after: (u64, usize),
}

/// Every epoch visits the images in a seeded order; the noise of image `i` in epoch `e` is drawn
/// from `(seed, e, i)`. So a batch is a function of the cursor alone, and a resume is exact.
pub struct NoisyImages {
    x: Vec<f32>,
    dim: usize,
    batch: usize,
    seed: u64,
    noise: f32,
    epoch: u64,
    position: usize,
    order: Vec<usize>,
}

impl NoisyImages {
    fn new(x: Vec<f32>, dim: usize, batch: usize, seed: u64, noise: f32) -> Self {
        let mut l = NoisyImages {
            x,
            dim,
            batch,
            seed,
            noise,
            epoch: 0,
            position: 0,
            order: vec![],
        };
        l.order = l.order_of(0);
        l
    }

    fn len(&self) -> usize {
        self.x.len() / self.dim
    }

    fn order_of(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rng::rng(&[self.seed, epoch]));
        order
    }

    fn batch_of(&self, images: &[usize], epoch: u64, cursor_after: (u64, usize)) -> Batch {
        let normal = Normal::new(0.0f32, self.noise).expect("a finite noise std");
        let (mut clean, mut noisy) = (Vec::new(), Vec::new());
        for &i in images {
            let row = &self.x[i * self.dim..(i + 1) * self.dim];
            let mut r = rng::rng(&[self.seed, epoch, i as u64, 1]);
            clean.extend_from_slice(row);
            noisy.extend(row.iter().map(|p| p + normal.sample(&mut r)));
        }
        Batch {
            clean,
            noisy,
            rows: images.len(),
            cursor_after,
        }
    }
}

impl Iterator for NoisyImages {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.position + self.batch > self.order.len() {
            self.epoch += 1;
            self.position = 0;
            self.order = self.order_of(self.epoch);
        }
        let images = self.order[self.position..self.position + self.batch].to_vec();
        self.position += self.batch;
        Some(self.batch_of(&images, self.epoch, (self.epoch, self.position)))
    }
}

impl Loader for NoisyImages {
    fn cursor_after(batch: &Batch) -> serde_json::Value {
        serde_json::json!({"epoch": batch.cursor_after.0, "position": batch.cursor_after.1})
    }

    fn seek(&mut self, cursor: &serde_json::Value) -> Result<(), String> {
        let (Some(epoch), Some(position)) = (cursor["epoch"].as_u64(), cursor["position"].as_u64())
        else {
            return Err("is not {epoch, position}".into());
        };
        if position as usize > self.len() {
            return Err(format!("is past the end of the {} images", self.len()));
        }
        (self.epoch, self.position) = (epoch, position as usize);
        self.order = self.order_of(epoch);
        Ok(())
    }
}

/// The autoencoder: noisy image -> ReLU(encoder) -> decoder, scored against the clean image.
pub struct Denoiser {
    varmap: VarMap,
    encoder: candle_nn::Linear,
    decoder: candle_nn::Linear,
    dim: usize,
}

impl Objective for Denoiser {
    type Batch = Batch;

    fn step(&self, b: &Batch, _mode: Mode) -> candle_core::Result<StepOutput> {
        let noisy = Tensor::from_slice(&b.noisy, (b.rows, self.dim), &Device::Cpu)?;
        let clean = Tensor::from_slice(&b.clean, (b.rows, self.dim), &Device::Cpu)?;
        let code = self.encoder.forward(&noisy)?.relu()?;
        let loss = (self.decoder.forward(&code)? - &clean)?.sqr()?.mean_all()?;
        // The noise alone, for comparison: what the identity map would score.
        let input_mse = (noisy - clean)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        Ok(StepOutput {
            loss,
            weight: b.rows as f64,
            units: b.rows,
            metrics: BTreeMap::from([("input_mse".to_string(), input_mse)]),
        })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}

impl Experiment for Settings {
    type Objective = Denoiser;
    type Loader = NoisyImages;
    type State = ();
    type Outcome = ();

    fn name(&self) -> &str {
        self.header.name()
    }
    fn runs_dir(&self) -> &Path {
        &self.header.runs_dir
    }
    fn seed(&self) -> u64 {
        self.header.seed
    }
    fn train(&self) -> &TrainSection {
        &self.header.train
    }
    fn settings_toml(&self) -> String {
        recipe_toml(self)
    }
    fn eval_metrics(&self) -> Vec<&'static str> {
        vec!["loss", "input_mse"]
    }

    fn prepare(&self, ctx: &Context) -> Result<RunOf<Self>, RecipeError> {
        let device = &ctx.device;
        let (x, dim) = pixels(&self.images, self.max_images)?;
        let (test, _) = pixels(&self.test_images, self.max_test_images)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let encoder = candle_nn::linear(dim, self.hidden_size, vb.pp("encoder"))?;
        let decoder = candle_nn::linear(self.hidden_size, dim, vb.pp("decoder"))?;
        // Seeded: the same weights on every run of these settings.
        kindling_models::init::hf_init(&varmap, self.header.seed, 0.05, None)?;
        let eval_set = NoisyImages::new(
            test,
            dim,
            self.header.train.eval_batch_size,
            self.header.seed + 1,
            self.noise_std,
        );
        let eval: Vec<Batch> = (0..eval_set.len())
            .collect::<Vec<_>>()
            .chunks(self.header.train.eval_batch_size)
            .map(|ix| eval_set.batch_of(ix, 0, (0, 0)))
            .collect();
        let objective = Denoiser {
            varmap,
            encoder,
            decoder,
            dim,
        };
        let train = NoisyImages::new(
            x,
            dim,
            self.header.train.batch_size,
            self.header.seed,
            self.noise_std,
        );
        Ok(Prepared::new(objective, train, eval, "img"))
    }

    /// The export: the weights and a config.
    fn finish(
        &self,
        run: &mut RunOf<Self>,
        _summary: &FitSummary,
        _ctx: &Context,
        dir: &Path,
    ) -> Result<(), RecipeError> {
        let d = &run.objective;
        let tensors: Vec<(String, Tensor)> = {
            let data = d.varmap.data().lock().expect("varmap lock");
            let mut v: Vec<(String, Tensor)> = data
                .iter()
                .map(|(n, var)| (n.clone(), var.as_tensor().clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        kindling_models::export::save_safetensors(&dir.join("model.safetensors"), &tensors, &[])?;
        let config = serde_json::json!({
            "model_type": "kindling-denoising-autoencoder", "input_size": d.dim,
            "hidden_size": self.hidden_size, "noise_std": self.noise_std,
        });
        kindling_models::export::save_json(&dir.join("config.json"), &config)?;
        Ok(())
    }
}
