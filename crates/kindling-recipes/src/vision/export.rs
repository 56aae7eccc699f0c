//! The export: the encoder's weights and config, and a model card with the probe scores.

#[allow(unused_imports)]
use super::*;

/// Writes the encoder: `model.safetensors` (HF ResNet or ViT names), `config.json` (the shape
/// and the eval preprocessing; a ViT's is HF's `ViTModel` config and a standard-stem ResNet's
/// HF's `ResNetModel` config, which transformers loads), `preprocessor_config.json`, a small-
/// stem ResNet's weights under torchvision's names, and a model card.
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
                n.strip_prefix("backbone.").map(|k| {
                    let t = kindling_models::conv::torch_layout(k, var.as_tensor());
                    t.map(|t| (k.to_string(), t))
                })
            })
            .collect::<candle_core::Result<_>>()?;
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    kindling_models::export::save_safetensors(&dir.join("model.safetensors"), &tensors, &[])?;
    if let BackboneConfig::ResNet(c) = model.backbone.config() {
        if !c.is_hf_resnet() && c.architecture == "resnet" {
            let renamed: Vec<(String, Tensor)> = tensors
                .iter()
                .filter_map(|(n, t)| {
                    kindling_models::resnet::torchvision_name(n).map(|m| (m, t.clone()))
                })
                .collect();
            kindling_models::export::save_safetensors(
                &dir.join("torchvision.safetensors"),
                &renamed,
                &[],
            )?;
        }
    }
    let backbone = model.backbone.config();
    let (mut config, about) = match &backbone {
        BackboneConfig::ResNet(c) if c.is_hf_resnet() => {
            let about = "The folder is HF's `ResNetModel` (`transformers.ResNetModel.\
                         from_pretrained(DIR)`; pixel values channels-first, preprocessed as \
                         `preprocessor_config.json` says); the features Kindling trained are its \
                         `pooler_output` (the average-pooled last stage).";
            (c.hf_json("ResNetModel"), about.to_string())
        }
        BackboneConfig::ResNet(c) => {
            let mut config = serde_json::to_value(c).expect("config serialises");
            config["model_type"] = "kindling-resnet".into();
            config["architectures"] = serde_json::json!(["KindlingResNetModel"]);
            config["layout"] = "channels_last".into();
            let about = format!(
                "Weights use HF ResNet parameter names; the stem is the small-image one \
                 ({k}x{k} stride {s}, no max-pool), which `transformers`' ResNet cannot express. \
                 `torchvision.safetensors` holds the same weights under torchvision's names{tv}",
                k = c.embedder_kernel_size,
                s = c.embedder_stride,
                tv = torchvision_snippet(c),
            );
            (config, about)
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
    // The size the processor resizes to: the ViT's, or the images' for a ResNet.
    let size = match &backbone {
        BackboneConfig::ViT(c) => c.image_size,
        BackboneConfig::ResNet(_) => model.image_side,
    };
    save_json(
        &dir.join("preprocessor_config.json"),
        &image_processor(&recipe.data.eval_view, size),
    )?;
    if let (Heads::Mae(head), BackboneConfig::ViT(c)) = (&model.heads, &backbone) {
        export_mae(recipe, model, head, c, &mae_dir(dir), steps)?;
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

/// The name of encoder tensor `name` inside HF's task models (`ViTForImageClassification`,
/// `ViTMAEForPreTraining`, `ResNetForImageClassification`): under the base model's prefix
/// (`vit.`, `resnet.`), a ViT without its pooler (those classes have none); a small-stem ResNet,
/// which HF cannot express, keeps Kindling's names.
pub(super) fn in_hf_task_model(backbone: &BackboneConfig, name: &str) -> Option<String> {
    match backbone {
        BackboneConfig::ViT(_) => (!name.starts_with("pooler.")).then(|| format!("vit.{name}")),
        BackboneConfig::ResNet(c) if c.is_hf_resnet() => Some(format!("resnet.{name}")),
        BackboneConfig::ResNet(_) => Some(name.to_string()),
    }
}

/// Where an MAE run's whole model goes: beside the encoder's export, `<export>-pretraining`.
pub fn mae_dir(export: &Path) -> PathBuf {
    let name = export
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    export.with_file_name(format!("{name}-pretraining"))
}

/// An MAE run's encoder and decoder as HF's `ViTMAEForPreTraining` folder: the encoder under
/// `vit.` (ViT's names, which transformers maps onto ViTMAE's; no pooler), the decoder under
/// `decoder.` (HF's names already), HF's `ViTMAEConfig`, the image processor and a card.
/// `ViTMAEForPreTraining.from_pretrained(DIR)` loads it with no missing or unexpected keys and,
/// given the same masks (`noise`), Kindling's reconstructions and loss (tests/vision.rs).
fn export_mae(
    recipe: &VisionRecipe,
    model: &SslModel,
    head: &mae::MaeHead,
    vit: &kindling_models::vit::ViTConfig,
    dir: &Path,
    steps: u64,
) -> Result<(), RecipeError> {
    std::fs::create_dir_all(dir).map_err(|e| RecipeError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let tensors: Vec<(String, Tensor)> = kindling_models::export::varmap_tensors(&model.varmap)
        .into_iter()
        .filter_map(|(n, t)| {
            if let Some(k) = n.strip_prefix("backbone.") {
                let backbone = BackboneConfig::ViT(vit.clone());
                return in_hf_task_model(&backbone, k).map(|k| (k, t));
            }
            n.starts_with("decoder.").then_some((n, t))
        })
        .collect();
    kindling_models::export::save_safetensors(&dir.join("model.safetensors"), &tensors, &[])?;
    let mut config = head.hf_config(vit);
    config["preprocessing"] = serde_json::to_value(&recipe.data.eval_view).expect("serialises");
    config["pretraining"] =
        serde_json::json!({"objective": "mae", "steps": steps, "seed": recipe.header.seed});
    save_json(&dir.join("config.json"), &config)?;
    save_json(
        &dir.join("preprocessor_config.json"),
        &image_processor(&recipe.data.eval_view, vit.image_size),
    )?;
    let card = format!(
        "---\nlibrary_name: kindling\ntags: [self-supervised, mae, masked-image-modeling]\n{}---\n\n# {} (encoder and decoder)\n\n\
         The whole MAE of `{}` after {steps} steps, as HF's `ViTMAEForPreTraining` \
         (`transformers.ViTMAEForPreTraining.from_pretrained(DIR)`; pass `noise` to fix the \
         masks). Both position tables are learned, unlike HF's fixed sine-cosine ones; they load \
         as they are. The encoder alone, as `ViTModel`, is the export beside this folder.\n",
        recipe.header.export.license.as_ref().map(|l| format!("license: {l}\n")).unwrap_or_default(),
        recipe.name(),
        recipe.name(),
    );
    write_atomic(&dir.join("README.md"), card.as_bytes())?;
    Ok(())
}

/// The model card's lines that load `torchvision.safetensors` into torchvision's ResNet: for
/// torchvision's shapes (4 stages of 64-128-256-512 basic or 256-...-2048 bottleneck blocks
/// from a 64-channel stem, the first stage at stride 1) its `resnet18/34/50/...` with the stem
/// replaced, the max-pool and the classifier identities; other shapes only share the names.
fn torchvision_snippet(c: &kindling_models::resnet::ResNetConfig) -> String {
    let bottleneck = c.layer_type == "bottleneck";
    let widths: Vec<usize> = if bottleneck {
        vec![256, 512, 1024, 2048]
    } else {
        vec![64, 128, 256, 512]
    };
    let shaped = c.hidden_sizes == widths
        && c.embedding_size == 64
        && !c.downsample_in_first_stage
        && !c.downsample_in_bottleneck;
    if !shaped {
        return " (its stage widths or strides differ from torchvision's ResNets, so build \
                the matching module before `load_state_dict`)."
            .into();
    }
    let block = if bottleneck {
        "Bottleneck"
    } else {
        "BasicBlock"
    };
    format!(
        ":\n\n```python\nimport torch, torchvision, safetensors.torch\n\
         m = torchvision.models.resnet.ResNet(torchvision.models.resnet.{block}, {depths:?})\n\
         m.conv1 = torch.nn.Conv2d({ch}, 64, {k}, {s}, {p}, bias=False)\n\
         m.maxpool = torch.nn.Identity()\n\
         m.fc = torch.nn.Identity()\n\
         m.load_state_dict(safetensors.torch.load_file(\"torchvision.safetensors\"))\n```\n\n\
         `m(pixel_values)` (channels-first) then gives Kindling's features.",
        depths = c.depths,
        ch = c.num_channels,
        k = c.embedder_kernel_size,
        s = c.embedder_stride,
        p = c.embedder_kernel_size / 2,
    )
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
