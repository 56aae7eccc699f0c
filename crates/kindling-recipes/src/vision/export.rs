//! The export: the encoder's weights and config, and a model card with the probe scores.

#[allow(unused_imports)]
use super::*;

/// Writes the encoder: `model.safetensors` (HF ResNet or ViT names), `config.json` (the shape
/// and the eval preprocessing; a ViT's is HF's `ViTModel` config, which transformers loads),
/// and a model card.
pub(super) fn export(
    recipe: &VisionRecipe,
    model: &SslModel,
    dir: &Path,
    steps: u64,
    probes: &[ProbeScore],
) -> Result<(), RecipeError> {
    std::fs::create_dir_all(dir).map_err(|e| RecipeError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let tensors: Vec<(String, Tensor)> = {
        let data = model.varmap.data().lock().expect("varmap lock poisoned");
        let mut v: Vec<(String, Tensor)> = data
            .iter()
            .filter_map(|(n, var)| {
                n.strip_prefix("backbone.")
                    .map(|k| (k.to_string(), var.as_tensor().clone()))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    kindling_models::export::save_safetensors(&dir.join("model.safetensors"), &tensors, &[])?;
    let backbone = model.backbone.config();
    let (mut config, about) = match &backbone {
        BackboneConfig::ResNet(c) => {
            let mut config = serde_json::to_value(c).expect("config serialises");
            config["model_type"] = "kindling-resnet".into();
            config["layout"] = "channels_last".into();
            let about = "Weights use HF ResNet parameter names; activations are channels-last and \
                         the stem is the small-image one (3x3, no max-pool), which `transformers`' \
                         ResNet cannot express.";
            (config, about.to_string())
        }
        BackboneConfig::ViT(c) => {
            let about = format!(
                "The folder is HF's `ViTModel` (`transformers.ViTModel.from_pretrained(DIR)`; \
                 pixel values channels-first, preprocessed as `config.json`'s `preprocessing` \
                 says); the features Kindling trained are `last_hidden_state[:, 0]` ([CLS] after \
                 the final norm). The pooler (`pooler.dense`) is HF's default layer, left as \
                 initialised: no objective reads it. Images of {s}x{s} pixels.",
                s = c.image_size
            );
            (c.hf_json("ViTModel"), about)
        }
    };
    config["preprocessing"] = serde_json::to_value(&recipe.data.eval_view).expect("serialises");
    config["pretraining"] = serde_json::json!({"objective": recipe.objective, "steps": steps, "seed": recipe.header.seed});
    save_json(&dir.join("config.json"), &config)?;
    if let BackboneConfig::ViT(c) = &backbone {
        save_json(
            &dir.join("preprocessor_config.json"),
            &image_processor(&recipe.data.eval_view, c.image_size),
        )?;
    }
    let mut card = format!(
        "---\nlibrary_name: kindling\ntags: [self-supervised, {}, image-feature-extraction]\n{}---\n\n# {}\n\n\
         A {} pretrained with {} for {steps} steps by Kindling (`kindling pretrain`). {about}\n",
        recipe.objective,
        recipe.header.export.license.as_ref().map(|l| format!("license: {l}\n")).unwrap_or_default(),
        recipe.name(),
        backbone.describe(),
        recipe.objective,
    );
    if !probes.is_empty() {
        card += "\n## Linear probe (frozen features, logistic regression)\n\n| features | test accuracy | macro-F1 |\n|---|---|---|\n";
        for p in probes {
            card += &format!("| {} | {:.4} | {:.4} |\n", p.what, p.accuracy, p.macro_f1);
        }
    }
    write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}

/// HF's `ViTImageProcessor` config for `eval_view` (what `AutoImageProcessor.from_pretrained`
/// reads): pixels scaled by 1/255 as Kindling loads them, resized to `size` (bilinear), and
/// normalised with the view's mean and std when it has a `normalize` stage. Augmenting stages
/// have no place in an eval view and are not written.
pub(super) fn image_processor(eval_view: &ViewPipeline, size: usize) -> serde_json::Value {
    let normalize = eval_view.stages.iter().find_map(|s| match s {
        kindling_data::augment::Stage::Normalize(n) => Some(n),
        _ => None,
    });
    serde_json::json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true,
        "size": {"height": size, "width": size},
        "resample": 2,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": normalize.is_some(),
        "image_mean": normalize.map_or(vec![0.0], |n| n.mean.clone()),
        "image_std": normalize.map_or(vec![1.0], |n| n.std.clone()),
    })
}

/// Rewrites a run's export from its newest valid checkpoint (`kindling export RUN_DIR`), without
/// the probe table.
pub fn export_from_checkpoint(
    recipe: &VisionRecipe,
    run_dir: &Path,
) -> Result<PathBuf, RecipeError> {
    let device = device(&recipe.header.device)?;
    let (ckpt, _) = checkpoint::newest_valid(run_dir);
    let ckpt = ckpt.ok_or_else(|| RecipeError::Resume {
        path: run_dir.to_path_buf(),
        msg: "no valid checkpoint (checkpoints/step-*/) to export".into(),
    })?;
    let train = load_images(&recipe.data.train, recipe.data.max_train_images)?;
    let test = match &recipe.data.test {
        Some(s) => Some(load_images(s, recipe.data.max_test_images)?),
        None => None,
    };
    // The online probe's width must match the checkpoint's: count classes as the run did.
    let classes = class_count(&train, test.as_ref());
    let model = SslModel::build(
        recipe,
        (train.height, train.width, train.channels),
        classes,
        &device,
    )?;
    let state = checkpoint::load(&ckpt, &model.varmap, None, &device)?;
    let dir = recipe
        .header
        .export
        .dir
        .clone()
        .unwrap_or_else(|| run_dir.join("export"));
    export(recipe, &model, &dir, state.step, &[])?;
    Ok(dir)
}
