//! `kindling finetune` on a vision export: an image classifier (the export's encoder and a
//! linear layer on its features) trained end to end with the shared run lifecycle (resume,
//! metrics, plots), scored on the test images with its final weights, and exported; for a ViT as
//! HF's `ViTForImageClassification` (the encoder under `vit.`, `classifier`), which transformers
//! loads with the same logits. `--compare-random` runs the same recipe from a random encoder of
//! the export's shape beside it.
//!
//! ```toml
//! task = "image-classification"
//! [model]
//! path = "runs/vit-mae-fashion-mnist/export"
//! [data]
//! train = { idx = { images = "...", labels = "..." } }
//! test = { idx = { images = "...", labels = "..." } }
//! ```
//!
//! Evaluations during training run on the test images as monitors (as the pretraining runs do);
//! nothing is selected on them: the final weights are the ones scored and exported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use kindling_core::Mode;
use kindling_data::augment::build_views;
use kindling_data::loader::Cursor;
use kindling_data::{ImageSet, ImageSource, ViewBatch, ViewLoader, ViewPipeline};
use kindling_models::export::save_json;
use kindling_models::nn::Linear;
use kindling_models::{Backbone, BackboneConfig};
use kindling_train::{FitSummary, Objective, StepOutput};

use super::probe::{copy_export, read_export};
use super::{init_encoder, load_images};
use crate::finetune::{FinetuneReport, Init, ProblemType};
use crate::recipe::{parse_recipe_document, parse_toml, Header};
use crate::run::{drive, Context, Experiment, Prepared, RunOf};
use crate::{RecipeError, RunOptions};

/// An image fine-tuning recipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageFinetuneRecipe {
    /// `image-classification`.
    pub task: String,
    /// The shared header (name, runs_dir, seed, device, precision, kernels, `[train]`,
    /// `[export]`).
    pub header: Header,
    pub model: ImageFtModel,
    pub data: ImageFtData,
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageFtModel {
    /// A vision export (`kindling pretrain`'s `export/`).
    pub path: PathBuf,
    /// `pretrained` (the export's weights) or `random` (its shape only, initialised as a
    /// pretraining run with this seed starts).
    #[serde(default = "pretrained")]
    pub init: Init,
}

fn pretrained() -> Init {
    Init::Pretrained
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageFtData {
    pub train: ImageSource,
    pub test: ImageSource,
    /// The training augmentation; by default the export's preprocessing (no augmentation).
    #[serde(default)]
    pub view: Option<ViewPipeline>,
    #[serde(default)]
    pub max_train_images: usize,
    #[serde(default)]
    pub max_test_images: usize,
}

impl ImageFinetuneRecipe {
    pub fn name(&self) -> &str {
        self.header.name()
    }

    pub fn to_toml(&self) -> String {
        crate::recipe::recipe_toml(self)
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let doc: toml::Table = parse_toml(&text, path, overrides)?;
        let mut r: ImageFinetuneRecipe = parse_recipe_document(doc, path)?;
        crate::recipe::name_from_file(&mut r.header, path);
        if r.task != "image-classification" {
            return Err(RecipeError::Key {
                path: path.to_path_buf(),
                key: "task".into(),
                msg: format!("expected \"image-classification\", got {:?}", r.task),
            });
        }
        Ok(r)
    }

    /// The export's encoder config and eval preprocessing, checked.
    fn export(&self) -> Result<(BackboneConfig, ViewPipeline), RecipeError> {
        read_export(&self.model.path)
    }
}

/// The classifier: the encoder's features, a linear layer.
pub struct ImageClassifier {
    varmap: VarMap,
    backbone: Backbone,
    classifier: Linear,
    classes: usize,
    device: Device,
    flops_per_image: f64,
}

impl ImageClassifier {
    fn logits(&self, batch: &ViewBatch, mode: Mode) -> candle_core::Result<Tensor> {
        let (h, w, c) = batch.shapes[0];
        let x = Tensor::from_slice(&batch.views[0], (batch.n, h, w, c), &self.device)?;
        let f = self.backbone.forward_t(&x, mode)?.to_dtype(DType::F32)?;
        self.classifier.forward(&f)
    }
}

impl Objective for ImageClassifier {
    type Batch = ViewBatch;

    fn step(&self, batch: &ViewBatch, mode: Mode) -> candle_core::Result<StepOutput> {
        let labels = batch
            .labels
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("fine-tuning needs labelled images".into()))?;
        let logits = self.logits(batch, mode)?;
        let y = Tensor::from_slice(labels, labels.len(), &self.device)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let correct = pred.iter().zip(labels).filter(|(a, b)| a == b).count();
        let mut metrics = BTreeMap::new();
        metrics.insert("accuracy".into(), correct as f64 / labels.len() as f64);
        Ok(StepOutput {
            loss,
            weight: batch.n as f64,
            units: batch.n,
            metrics,
        })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Not BatchNorm's buffers or a ViT's pooler (no classifier reads it).
    fn trainable(&self, name: &str) -> bool {
        !kindling_models::conv::is_norm_buffer(name) && !name.starts_with("backbone.pooler.")
    }

    fn no_decay(&self, name: &str) -> bool {
        super::no_decay(name)
    }

    fn train_flops(&self, batch: &ViewBatch) -> Option<f64> {
        Some(self.flops_per_image * batch.n as f64)
    }
}

/// What the run keeps between hooks.
pub struct ImageFtState {
    test: ImageSet,
    eval_view: ViewPipeline,
    backbone: BackboneConfig,
    /// The side of the images the encoder sees (`eval_view`'s output).
    image_side: usize,
}

/// Batches of `set` through `view`, in order (evaluation and the test report).
fn ordered_batches(
    set: &ImageSet,
    view: &ViewPipeline,
    batch_size: usize,
    seed: u64,
) -> Result<Vec<ViewBatch>, RecipeError> {
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    idx.chunks(batch_size.max(2))
        .map(|c| {
            build_views(
                set,
                std::slice::from_ref(view),
                c,
                seed,
                u64::MAX,
                Cursor::default(),
            )
            .map_err(RecipeError::from)
        })
        .collect()
}

impl Experiment for ImageFinetuneRecipe {
    type Objective = ImageClassifier;
    type Loader = ViewLoader;
    type State = ImageFtState;
    /// The test images' accuracy and macro-F1 with the final weights.
    type Outcome = BTreeMap<String, f64>;

    crate::run::shared_header!();

    fn eval_metrics(&self) -> Vec<&'static str> {
        vec!["loss", "accuracy"]
    }
    fn plotted_metrics(&self) -> Vec<&'static str> {
        vec!["accuracy"]
    }

    fn validate(&self) -> Result<(), RecipeError> {
        self.export().map(|_| ())
    }

    fn prepare(&self, ctx: &Context) -> Result<RunOf<Self>, RecipeError> {
        let (cfg, eval_view) = self.export()?;
        let train = Arc::new(load_images(&self.data.train, self.data.max_train_images)?);
        let test = load_images(&self.data.test, self.data.max_test_images)?;
        let classes = super::class_count(&train, Some(&test));
        if train.labels.is_none() || test.labels.is_none() || classes < 2 {
            return Err(RecipeError::Invalid {
                key: "data".into(),
                msg: "fine-tuning needs labelled train and test images of at least two classes"
                    .into(),
            });
        }
        let view = self.data.view.clone().unwrap_or_else(|| eval_view.clone());
        let shape = eval_view
            .output_shape(train.height, train.width, train.channels)
            .map_err(|e| RecipeError::Invalid {
                key: "data".into(),
                msg: format!("the export's preprocessing on these images: {e}"),
            })?;
        let trained = view
            .output_shape(train.height, train.width, train.channels)
            .map_err(|e| RecipeError::Invalid {
                key: "data.view".into(),
                msg: e.to_string(),
            })?;
        if matches!(cfg, BackboneConfig::ViT(_)) && trained != shape {
            return Err(RecipeError::Invalid {
                key: "data.view".into(),
                msg: format!(
                    "gives {}x{} images, the ViT takes {}x{} (the export's preprocessing)",
                    trained.0, trained.1, shape.0, shape.1
                ),
            });
        }
        let cfg = cfg
            .for_input(shape, self.header.kernels)
            .map_err(|e| RecipeError::Invalid {
                key: "model.path".into(),
                msg: e.to_string(),
            })?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &ctx.device);
        let backbone = Backbone::new(&cfg, vb.pp("backbone"))?;
        let classifier = Linear::load(cfg.feature_dim(), classes, vb.pp("classifier"))?;
        init_encoder(&varmap, &cfg, self.header.seed)?;
        let from = match self.model.init {
            Init::Pretrained => {
                copy_export(&varmap, "backbone.", &self.model.path, &ctx.device)?;
                "the export's weights"
            }
            Init::Random => "a random encoder of the export's shape",
        };
        eprintln!(
            "model: {} from {from} ({}), a linear classifier over {classes} classes",
            cfg.describe(),
            self.model.path.display()
        );
        let t = &self.header.train;
        let loader = ViewLoader::new(train.clone(), vec![view], t.batch_size, self.header.seed)?;
        let mut eval = ordered_batches(&test, &eval_view, t.eval_batch_size, self.header.seed)?;
        if t.max_eval_batches > 0 {
            eval.truncate(t.max_eval_batches);
        }
        let flops = 3.0 * cfg.forward_flops(shape.0, shape.1);
        Ok(Prepared {
            objective: ImageClassifier {
                varmap,
                backbone,
                classifier,
                classes,
                device: ctx.device.clone(),
                flops_per_image: flops,
            },
            steps_per_epoch: loader.batches_per_epoch() as u64 / ctx.world as u64,
            train: loader,
            eval,
            unit: "img",
            baseline: None,
            state: ImageFtState {
                test,
                eval_view,
                backbone: cfg,
                image_side: shape.0,
            },
        })
    }

    fn finish(
        &self,
        run: &mut RunOf<Self>,
        _summary: &FitSummary,
        _ctx: &Context,
        export_dir: &Path,
    ) -> Result<BTreeMap<String, f64>, RecipeError> {
        let model = &run.objective;
        let st = &run.state;
        let k = model.classes;
        let mut cm = vec![vec![0f64; k]; k];
        let batches = ordered_batches(&st.test, &st.eval_view, 256, self.header.seed)?;
        for b in &batches {
            let pred = model
                .logits(b, Mode::Eval)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            for (p, y) in pred.iter().zip(b.labels.iter().flatten()) {
                cm[*y as usize][*p as usize] += 1.0;
            }
        }
        let (accuracy, macro_f1) = crate::metrics::accuracy_and_macro_f1(&cm);
        let test = BTreeMap::from([
            ("accuracy".to_string(), accuracy),
            ("macro_f1".to_string(), macro_f1),
        ]);
        eprintln!("test: accuracy {accuracy:.4}, macro-F1 {macro_f1:.4}");
        export(self, model, st, export_dir, &test)?;
        Ok(test)
    }
}

/// The classifier's folder, with the image processor: a ViT as HF's
/// `ViTForImageClassification` (`vit.` + the encoder without its pooler, `classifier`), a
/// standard-stem ResNet as HF's `ResNetForImageClassification` (`resnet.`, `classifier.1`), a
/// small-stem ResNet as Kindling's classifier (the encoder's names, `classifier`).
fn export(
    recipe: &ImageFinetuneRecipe,
    model: &ImageClassifier,
    st: &ImageFtState,
    dir: &Path,
    test: &BTreeMap<String, f64>,
) -> Result<(), RecipeError> {
    let hf_resnet = matches!(&st.backbone, BackboneConfig::ResNet(c) if c.is_hf_resnet());
    let tensors: Vec<(String, Tensor)> = kindling_models::export::varmap_tensors(&model.varmap)
        .into_iter()
        .filter_map(|(n, t)| {
            if let Some(k) = n.strip_prefix("backbone.") {
                return super::export::in_hf_task_model(&st.backbone, k).map(|k| (k, t));
            }
            // HF's ResNet classifier is `Sequential(Flatten, Linear)`: the linear layer is
            // `classifier.1`.
            match n.strip_prefix("classifier.") {
                Some(k) if hf_resnet => Some((format!("classifier.1.{k}"), t)),
                Some(_) => Some((n, t)),
                None => None,
            }
        })
        .map(|(n, t)| Ok((n.clone(), kindling_models::conv::torch_layout(&n, &t)?)))
        .collect::<candle_core::Result<_>>()?;
    kindling_models::export::save_safetensors(&dir.join("model.safetensors"), &tensors, &[])?;
    let labels: BTreeMap<String, String> = st
        .test
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), c.clone()))
        .chain((st.test.classes.len()..model.classes).map(|i| (i.to_string(), i.to_string())))
        .collect();
    let label2id: BTreeMap<&String, usize> =
        labels.values().enumerate().map(|(i, c)| (c, i)).collect();
    let mut config = match &st.backbone {
        BackboneConfig::ViT(c) => c.hf_json("ViTForImageClassification"),
        BackboneConfig::ResNet(c) if hf_resnet => c.hf_json("ResNetForImageClassification"),
        BackboneConfig::ResNet(c) => {
            let mut v = serde_json::to_value(c).expect("config serialises");
            v["model_type"] = "kindling-resnet".into();
            v["architectures"] = serde_json::json!(["KindlingResNetForImageClassification"]);
            v["layout"] = "channels_last".into();
            v
        }
    };
    config["num_labels"] = model.classes.into();
    config["id2label"] = serde_json::to_value(&labels).expect("serialises");
    config["label2id"] = serde_json::to_value(&label2id).expect("serialises");
    config["preprocessing"] = serde_json::to_value(&st.eval_view).expect("serialises");
    config["finetuning"] =
        serde_json::json!({"from": recipe.model.path, "init": recipe.model.init, "test": test});
    save_json(&dir.join("config.json"), &config)?;
    let size = match &st.backbone {
        BackboneConfig::ViT(c) => c.image_size,
        BackboneConfig::ResNet(_) => st.image_side,
    };
    save_json(
        &dir.join("preprocessor_config.json"),
        &super::export::image_processor(&st.eval_view, size),
    )?;
    let card = format!(
        "---\nlibrary_name: kindling\ntags: [image-classification]\n{}---\n\n# {}\n\n\
         A {} with a linear classifier over {} classes, fine-tuned by Kindling (`kindling \
         finetune`) from {} ({:?}). Test accuracy {:.4}, macro-F1 {:.4}.\n",
        recipe
            .header
            .export
            .license
            .as_ref()
            .map(|l| format!("license: {l}\n"))
            .unwrap_or_default(),
        recipe.name(),
        st.backbone.describe(),
        model.classes,
        recipe.model.path.display(),
        recipe.model.init,
        test["accuracy"],
        test["macro_f1"],
    );
    kindling_models::export::write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}

/// Runs the recipe (see the module documentation).
pub fn finetune(
    recipe: &ImageFinetuneRecipe,
    opts: &RunOptions,
) -> Result<FinetuneReport, RecipeError> {
    let ran = drive(recipe, opts)?;
    let majority = ran.state.test.labels.as_ref().map_or(0.0, |l| {
        let mut counts = BTreeMap::new();
        l.iter()
            .for_each(|y| *counts.entry(y).or_insert(0usize) += 1);
        counts.values().max().copied().unwrap_or(0) as f64 / l.len().max(1) as f64
    });
    Ok(FinetuneReport {
        name: recipe.name().to_string(),
        init: recipe.model.init,
        problem: ProblemType::SingleLabelClassification,
        steps: ran.report.steps,
        elapsed_secs: ran.report.elapsed_secs,
        best_validation: ran.best,
        test: ran.outcome.unwrap_or_default(),
        test_majority: majority,
        export_dir: ran.report.export_dir,
    })
}

/// `--compare-random`: the recipe as written, then from a random encoder of the export's shape
/// (run `<name>-random`), each in its own folder.
pub fn compare_with_random(
    recipe: &ImageFinetuneRecipe,
    opts: &RunOptions,
) -> Result<(FinetuneReport, FinetuneReport), RecipeError> {
    let mut pre = recipe.clone();
    pre.model.init = Init::Pretrained;
    let mut random = recipe.clone();
    random.model.init = Init::Random;
    random.header.name = Some(format!("{}-random", recipe.name()));
    random.header.export.dir = None;
    crate::finetune::compare_runs(&pre, &random, opts, finetune)
}
