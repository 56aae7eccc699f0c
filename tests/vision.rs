//! The vision SSL family through the `kindling` binary, on the tiny recipe (512 Fashion-MNIST
//! images, a 4-8-channel ResNet): a run trains, monitors (kNN, online probe, collapse), probes
//! and exports; every method resumes bit for bit after a kill.

use std::path::Path;
use std::process::Command;

use crate::common::{kill_when_exists, kindling, stderr};

fn tiny(runs: &Path, name: &str, extra: &[&str]) -> Command {
    pretrain("recipes/tiny/simclr-tiny.toml", runs, name, extra)
}

/// `kindling pretrain RECIPE` into `runs/name`, with `--set` for each of `extra`.
fn pretrain(recipe: &str, runs: &Path, name: &str, extra: &[&str]) -> Command {
    let mut cmd = kindling();
    cmd.args(["pretrain", recipe]);
    cmd.args(["--set", &format!("runs_dir=\"{}\"", runs.display())]);
    cmd.args(["--set", &format!("name=\"{name}\"")]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd
}

/// `kindling probe` on `export` alone (the tiny recipes' image counts, seed and probe settings)
/// gives the run's own probe numbers, `probes` (probe_results.json): the export holds everything
/// the encoder needs.
fn probe_reproduces(export: &Path, probes: &serde_json::Value) {
    let mut cmd = kindling();
    cmd.args(["probe", "recipes/probe-fashion-mnist.toml"]);
    for s in [
        format!("model.path=\"{}\"", export.display()),
        "data.max_train_images=512".into(),
        "data.max_test_images=256".into(),
        "seed=3".into(),
        "probe.steps=50".into(),
        "probe.l2=[1e-3]".into(),
    ] {
        cmd.args(["--set", &s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let scores: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(scores.as_array().unwrap().len(), 3);
    for i in 0..3 {
        assert_eq!(
            scores[i]["accuracy"], probes[i]["accuracy"],
            "probe {i} of the export vs the run: {scores} vs {probes}"
        );
    }
}

/// `kindling push EXPORT --repo REPO` against an in-process test Hub succeeds (its checks
/// accept the folder: HF classes, an image processor, a licence) and a commit reaches the Hub.
pub(crate) fn push_to_test_hub(export: &Path, repo: &str) {
    let token = "hf_vision_test";
    let hub = kindling_hub::server::TestHub::start(kindling_hub::server::ServerConfig {
        token: token.into(),
        part_size: 1 << 20,
        die_after_parts: None,
        lie: None,
    })
    .unwrap();
    let out = kindling()
        .args(["push"])
        .arg(export)
        .args(["--repo", repo])
        .env("HF_TOKEN", token)
        .env("HF_ENDPOINT", &hub.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        hub.state.lock().unwrap().count("/commit/") >= 1,
        "a commit reached the Hub"
    );
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn simclr_trains_monitors_probes_and_exports_an_encoder() {
    let runs = tempfile::tempdir().unwrap();
    let out = tiny(
        runs.path(),
        "simclr",
        &["train.steps=30", "train.eval_every=15"],
    )
    .output()
    .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let run = runs.path().join("simclr");
    let log = jsonl(&run.join("metrics.jsonl"));
    let train: Vec<f64> = log
        .iter()
        .filter(|v| v["split"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(train.len(), 30);
    let (first, last) = (
        train[..3].iter().sum::<f64>(),
        train[27..].iter().sum::<f64>(),
    );
    assert!(last < first, "the loss falls: {train:?}");
    let evals: Vec<&serde_json::Value> = log.iter().filter(|v| v["split"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    for key in [
        "knn_accuracy",
        "probe_accuracy",
        "feature_std",
        "effective_rank",
        "ssl_loss",
    ] {
        let v = evals[1][key]
            .as_f64()
            .unwrap_or_else(|| panic!("no {key} in {}", evals[1]));
        assert!(v.is_finite() && v >= 0.0, "{key} = {v}");
    }
    let rank = evals[1]["effective_rank"].as_f64().unwrap();
    assert!(
        rank > 1.0 && rank <= 8.0 + 1e-6,
        "effective rank of 8-dim features: {rank}"
    );
    // The probe table: pretrained, random, pixels; accuracies are fractions above chance (0.1).
    let probes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("probe_results.json")).unwrap())
            .unwrap();
    let probes = probes.as_array().unwrap();
    assert_eq!(probes.len(), 3);
    for p in probes {
        let acc = p["accuracy"].as_f64().unwrap();
        assert!(acc > 0.15 && acc <= 1.0, "{p}");
    }
    assert!(err.contains("raw pixels"), "{err}");
    // The export holds the encoder only, with HF ResNet names, and says how to preprocess.
    let export = run.join("export");
    let st =
        candle_core::safetensors::load(export.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(st.contains_key("embedder.embedder.convolution.weight"));
    assert!(st.contains_key("encoder.stages.1.layers.0.shortcut.normalization.running_mean"));
    assert!(st
        .keys()
        .all(|k| !k.starts_with("projector") && !k.starts_with("online_probe")));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "kindling-resnet");
    assert_eq!(config["hidden_sizes"], serde_json::json!([4, 8]));
    assert!(config["preprocessing"]["stages"][0]["kind"] == "normalize");
    assert!(run.join("plots").join("loss.png").is_file());
    assert!(run.join("plots").join("eval_metrics.png").is_file());
    assert!(export.join("README.md").is_file());

    // `kindling probe` on the export alone gives the in-run probe's number (same images, same
    // logistic regression): the export holds everything the encoder needs.
    probe_reproduces(&export, &serde_json::json!(probes));
    // `kindling export` rebuilds the same encoder from the run's last checkpoint.
    let before = st.clone();
    std::fs::remove_dir_all(&export).unwrap();
    let out = kindling().args(["export"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let again =
        candle_core::safetensors::load(export.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(before.len(), again.len());
    for (k, t) in &before {
        let u = &again[k];
        let diff = (t - u)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            // BatchNorm's `num_batches_tracked` is exported as PyTorch's int64.
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{k}");
    }

    // A folder that is not a vision export is refused by name.
    let out = kindling()
        .args(["probe", "recipes/probe-fashion-mnist.toml"])
        .args(["--set", "model.path=\"datasets/minilm-tokenizer\""])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("config.json") && err.contains("kindling-resnet"),
        "{err}"
    );
}

/// A ViT backbone (recipes/tiny/simclr-vit-tiny.toml) trains with the same lifecycle: the loss
/// falls, the probes run, and the export is HF's `ViTModel` folder, which transformers loads
/// with no missing or unexpected keys and Kindling's outputs on the same images, and which
/// `kindling probe` reads back to the run's probe numbers. Views of another size than
/// `eval_view`'s are refused, naming the key, before anything is written.
#[test]
fn a_vit_backbone_trains_and_exports_a_vit_model_folder_transformers_loads() {
    let runs = tempfile::tempdir().unwrap();
    let vit = |name: &str, extra: &[&str]| {
        pretrain(
            "recipes/tiny/simclr-vit-tiny.toml",
            runs.path(),
            name,
            extra,
        )
        .output()
        .unwrap()
    };
    let out = vit(
        "vit",
        &[
            "train.steps=30",
            "train.eval_every=15",
            "export.license=\"apache-2.0\"",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let run = runs.path().join("vit");
    let train: Vec<f64> = jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|v| v["split"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert!(
        train[27..].iter().sum::<f64>() < train[..3].iter().sum::<f64>(),
        "the loss falls: {train:?}"
    );
    let probes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("probe_results.json")).unwrap())
            .unwrap();
    let export = run.join("export");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "vit");
    assert_eq!(config["architectures"], serde_json::json!(["ViTModel"]));
    assert_eq!(
        (
            config["image_size"].as_u64(),
            config["num_channels"].as_u64()
        ),
        (Some(28), Some(1))
    );

    // transformers' ViTModel on the export gives Kindling's outputs.
    let device = candle_core::Device::Cpu;
    let imported = kindling_models::vit::load_folder(&export, &device).unwrap();
    assert_eq!(
        imported.report,
        Default::default(),
        "every tensor, nothing else"
    );
    // Raw 8-bit images through the export's own preprocessing (its eval view).
    let raw: Vec<u8> = (0..3 * 28 * 28).map(|i| ((i * 37) % 256) as u8).collect();
    let pre: kindling_data::ViewPipeline =
        serde_json::from_value(config["preprocessing"].clone()).unwrap();
    let mut pixels = Vec::new();
    for im in raw.chunks(28 * 28) {
        let img = kindling_data::augment::Image::from_u8(im, 28, 28, 1);
        let mut rng = kindling_core::rng::rng(&[0]);
        pixels.extend(pre.apply(img, &mut rng).data);
    }
    let nhwc = candle_core::Tensor::from_vec(pixels, (3, 28, 28, 1), &device).unwrap();
    let m = &imported.model;
    let hidden = m.forward_t(&nhwc, kindling_core::Mode::Eval).unwrap();
    let pooled = m
        .pooler_output(&m.features(&nhwc, kindling_core::Mode::Eval).unwrap())
        .unwrap();
    let nchw = nhwc.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
    let json = serde_json::json!({
        "pixel_values": crate::vit::nested(&nchw),
        "last_hidden_state": crate::vit::nested(&hidden.reshape((3, 50, 16)).unwrap()),
        "pooler_output": crate::vit::nested(&pooled),
        "raw_pixels": crate::vit::nested(
            &candle_core::Tensor::from_vec(raw.iter().map(|&v| v as f32).collect::<Vec<_>>(), (3, 28, 28, 1), &device).unwrap()
        ),
    });
    let out_json = runs.path().join("outputs.json");
    std::fs::write(&out_json, json.to_string()).unwrap();
    crate::common::python_reference(
        "hf_vit_outputs.py",
        &["check".as_ref(), export.as_os_str(), out_json.as_os_str()],
    );

    // `kindling probe` on the export alone: the run's probe numbers.
    probe_reproduces(&export, &probes);

    // `kindling push`'s checks accept the folder (HF classes, an image processor, a licence),
    // and the test Hub gets every file.
    push_to_test_hub(&export, "kindling/vit-tiny");

    // 22-pixel crops, not a multiple of the 4-pixel patches: refused, naming the key, nothing
    // written (20-pixel ones would read resized positions).
    let out = vit(
        "vit-crops",
        &[r#"data.views=[{ stages = [{ kind = "random_resized_crop", size = 22 }] }]"#],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("data.views") && err.contains("22x22") && err.contains("patch_size (4)"),
        "{err}"
    );
    assert!(
        !runs.path().join("vit-crops").exists(),
        "nothing is written"
    );
}

fn final_weights(run: &Path, step: u64) -> (Vec<u8>, Vec<u8>) {
    let dir = run.join("checkpoints").join(format!("step-{step:08}"));
    (
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(dir.join("optimizer.safetensors")).unwrap(),
    )
}

/// Killed after its first checkpoint and resumed, each method ends with the same weights, EMA
/// target, queue, BatchNorm statistics and optimiser state as a run that was never stopped.
#[test]
fn every_method_resumes_bit_for_bit_after_a_kill() {
    for objective in ["simclr", "moco", "byol", "simsiam", "barlow", "vicreg"] {
        let runs = tempfile::tempdir().unwrap();
        let mut common = vec![
            format!("objective=\"{objective}\""),
            "model.predictor.dims=[16, 8]".into(),
            "train.steps=12".into(),
            "train.save_every=2".into(),
            "train.eval_every=0".into(),
            "probe.enabled=false".into(),
        ];
        if objective == "moco" {
            common.push("loss.queue_size=96".into());
        }
        let common: Vec<&str> = common.iter().map(String::as_str).collect();
        let straight = tiny(runs.path(), "straight", &common).output().unwrap();
        assert!(
            straight.status.success(),
            "{objective}: {}",
            stderr(&straight)
        );

        let run = runs.path().join("killed");
        kill_when_exists(
            tiny(runs.path(), "killed", &common),
            &run.join("checkpoints/step-00000002/state.json"),
        );
        let mut resume = tiny(runs.path(), "killed", &common);
        let out = resume.args(["--resume", "auto"]).output().unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "{objective}: {err}");
        assert!(err.contains("resume:"), "{objective}: {err}");
        assert!(
            final_weights(&run, 12) == final_weights(&runs.path().join("straight"), 12),
            "{objective}: resumed run differs from the uninterrupted one"
        );
    }
}

/// MAE (recipes/tiny/mae-tiny.toml): the reconstruction loss on the hidden patches falls, the
/// export is the encoder alone as HF's `ViTModel` (no decoder tensors; Kindling's ViT loads it
/// with every tensor found) and the whole model beside it HF's `ViTMAEForPreTraining`, a run killed after its first checkpoint resumes to the same
/// weights and optimiser state as one never stopped (the masks are functions of the seed and
/// step), and a recipe MAE cannot run (two views, a ResNet) is refused before anything is
/// written.
#[test]
fn mae_reconstructs_hidden_patches_exports_its_encoder_and_resumes_exactly() {
    let runs = tempfile::tempdir().unwrap();
    let mae = |name: &str, extra: &[&str]| {
        pretrain("recipes/tiny/mae-tiny.toml", runs.path(), name, extra)
    };
    let out = mae("mae", &["train.steps=40", "train.eval_every=20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let run = runs.path().join("mae");
    let ssl: Vec<f64> = jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|v| v["split"] == "train")
        .map(|v| v["ssl_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(ssl.len(), 40);
    let (first, last) = (ssl[..5].iter().sum::<f64>(), ssl[35..].iter().sum::<f64>());
    assert!(last < first, "the reconstruction loss falls: {ssl:?}");
    let export = run.join("export");
    let st =
        candle_core::safetensors::load(export.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(st.contains_key("embeddings.patch_embeddings.projection.weight"));
    assert!(st
        .keys()
        .all(|k| !k.starts_with("decoder") && !k.starts_with("online_probe")));
    let imported = kindling_models::vit::load_folder(&export, &candle_core::Device::Cpu).unwrap();
    assert_eq!(imported.report, Default::default());
    assert_eq!(imported.model.config.image_size, 28);
    mae_pretraining_matches_transformers(&run, &imported.model, runs.path());

    let common = [
        "train.steps=8",
        "train.save_every=2",
        "train.eval_every=0",
        "probe.enabled=false",
    ];
    let straight = mae("straight", &common).output().unwrap();
    assert!(straight.status.success(), "{}", stderr(&straight));
    let killed = runs.path().join("killed");
    kill_when_exists(
        mae("killed", &common),
        &killed.join("checkpoints/step-00000002/state.json"),
    );
    let out = mae("killed", &common)
        .args(["--resume", "auto"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success() && err.contains("resume:"), "{err}");
    assert!(
        final_weights(&killed, 8) == final_weights(&runs.path().join("straight"), 8),
        "the resumed MAE run differs from the uninterrupted one"
    );

    for (name, set, key) in [
        (
            "two-views",
            "data.views=[{ stages = [] }, { stages = [] }]",
            "data.views",
        ),
        (
            "resnet",
            "model.backbone={ architecture = \"resnet\" }",
            "model.backbone.architecture",
        ),
    ] {
        let out = mae(name, &[set]).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(key) && err.contains("MAE"), "{name}: {err}");
        assert!(
            !runs.path().join(name).exists(),
            "{name}: nothing is written"
        );
    }
}

/// The whole MAE (`RUN/export-pretraining`) is HF's `ViTMAEForPreTraining`: with the masks
/// given as `noise` (each image's visible patches first), transformers' reconstructions of every
/// patch and its loss equal Kindling's (encoder `encoder` at the visible patches, the exported
/// decoder) to 1e-4, with no missing or unexpected keys.
fn mae_pretraining_matches_transformers(
    run: &Path,
    encoder: &kindling_models::vit::ViTModel,
    scratch: &Path,
) {
    use candle_core::{DType, Device, Tensor};
    use kindling_models::vit_mae::{masked_patch_loss, MaeDecoderConfig, Masking, ViTMaeDecoder};
    let dir = run.join("export-pretraining");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "vit_mae");
    assert_eq!(
        config["architectures"],
        serde_json::json!(["ViTMAEForPreTraining"])
    );
    let dev = Device::Cpu;
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    assert!(st
        .keys()
        .all(|k| k.starts_with("vit.") || k.starts_with("decoder.")));
    let size = |k: &str| config[k].as_u64().unwrap() as usize;
    let cfg = MaeDecoderConfig {
        decoder_hidden_size: size("decoder_hidden_size"),
        decoder_num_hidden_layers: size("decoder_num_hidden_layers"),
        decoder_num_attention_heads: size("decoder_num_attention_heads"),
        decoder_intermediate_size: size("decoder_intermediate_size"),
    };
    let vb = candle_nn::VarBuilder::from_tensors(st, DType::F32, &dev);
    let decoder = ViTMaeDecoder::load(vb.pp("decoder"), &encoder.config, &cfg).unwrap();

    // Two images, 49 patches each; image i's visible patches come first in its order.
    let (b, n) = (2usize, 49usize);
    let ratio = config["mask_ratio"].as_f64().unwrap();
    let orders: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            (0..n as u32)
                .map(|p| (p * 17 + i as u32 * 5) % n as u32)
                .collect()
        })
        .collect();
    let m = Masking::new(b, n, ratio, |i| orders[i].clone());
    let pixels: Vec<f32> = (0..b * 28 * 28)
        .map(|i| ((i * 53) % 97) as f32 / 40.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(pixels, (b, 28, 28, 1), &dev).unwrap();
    let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &dev).unwrap();
    let encoded = encoder
        .forward_visible(&x, &t(&m.keep), m.k, kindling_core::Mode::Eval)
        .unwrap();
    let pred = decoder
        .forward_t(&encoded, &t(&m.restore), b, kindling_core::Mode::Eval)
        .unwrap();
    let target = encoder.patchify(&x).unwrap();
    let norm_pix = config["norm_pix_loss"].as_bool().unwrap();
    let loss = masked_patch_loss(&pred, &target, &t(&m.hidden), norm_pix).unwrap();
    // HF keeps argsort(noise)[:k]: the order's position as the noise.
    let noise: Vec<Vec<f32>> = orders
        .iter()
        .map(|o| {
            let mut v = vec![0f32; n];
            for (rank, &p) in o.iter().enumerate() {
                v[p as usize] = rank as f32;
            }
            v
        })
        .collect();
    let pixels_per_patch = pred.dim(1).unwrap();
    let json = serde_json::json!({
        "pixel_values": crate::vit::nested(&x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()),
        "noise": noise,
        "logits": crate::vit::nested(&pred.reshape((b, n, pixels_per_patch)).unwrap()),
        "loss": loss.to_scalar::<f32>().unwrap(),
    });
    let out = scratch.join("mae-outputs.json");
    std::fs::write(&out, json.to_string()).unwrap();
    if let Some(text) = crate::common::python_reference(
        "hf_vit_mae_outputs.py",
        &[dir.as_os_str(), out.as_os_str()],
    ) {
        assert!(text.contains("ViTMAEForPreTraining"), "{text}");
    }
}

/// `kindling finetune` on a vision export (the tiny MAE run's ViT): `--compare-random` trains the
/// classifier from the export and from a random encoder of its shape, each in its own folder,
/// and prints both side by side; the pretrained export is HF's `ViTForImageClassification`,
/// which transformers loads with no missing or unexpected keys and Kindling's logits; a run
/// killed after its first checkpoint resumes to the weights of one never stopped.
#[test]
fn finetuning_a_vit_export_compares_with_random_exports_for_transformers_and_resumes() {
    let runs = tempfile::tempdir().unwrap();
    let out = pretrain(
        "recipes/tiny/mae-tiny.toml",
        runs.path(),
        "mae",
        &["train.steps=20", "probe.enabled=false"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let encoder = runs.path().join("mae/export");
    let finetune = |name: &str, extra: &[&str]| {
        let mut cmd = kindling();
        cmd.args(["finetune", "recipes/tiny/finetune-vit-tiny.toml"]);
        for s in [
            format!("model.path=\"{}\"", encoder.display()),
            format!("runs_dir=\"{}\"", runs.path().display()),
            format!("name=\"{name}\""),
        ] {
            cmd.args(["--set", &s]);
        }
        for e in extra {
            cmd.args(["--set", e]);
        }
        cmd
    };
    let out = finetune("ft", &[])
        .arg("--compare-random")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "| ft | Pretrained | 20 |",
        "| ft-random | Random | 20 |",
        "pretrained - random",
    ] {
        assert!(table.contains(needle), "{needle}: {table}");
    }
    let export = runs.path().join("ft/export");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!(["ViTForImageClassification"])
    );
    assert_eq!(config["num_labels"], 10);
    assert!(runs
        .path()
        .join("ft-random/export/model.safetensors")
        .is_file());

    // Kindling's logits: the encoder's [CLS] features through the exported classifier.
    let device = candle_core::Device::Cpu;
    let imported = kindling_models::vit::load_folder(&export, &device).unwrap();
    assert_eq!(
        imported.report.unused,
        ["classifier.bias", "classifier.weight"]
    );
    let st = candle_core::safetensors::load(export.join("model.safetensors"), &device).unwrap();
    let pixels: Vec<f32> = (0..2 * 28 * 28)
        .map(|i| ((i * 53) % 97) as f32 / 40.0 - 1.0)
        .collect();
    let nhwc = candle_core::Tensor::from_vec(pixels, (2, 28, 28, 1), &device).unwrap();
    let f = imported
        .model
        .features(&nhwc, kindling_core::Mode::Eval)
        .unwrap();
    let logits = f
        .matmul(&st["classifier.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&st["classifier.bias"])
        .unwrap();
    let json = serde_json::json!({
        "pixel_values": crate::vit::nested(&nhwc.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()),
        "logits": crate::vit::nested(&logits),
    });
    let out_json = runs.path().join("logits.json");
    std::fs::write(&out_json, json.to_string()).unwrap();
    crate::common::python_reference(
        "hf_vit_outputs.py",
        &["check".as_ref(), export.as_os_str(), out_json.as_os_str()],
    );

    // Killed after its first checkpoint and resumed: the same final weights.
    let common = ["train.steps=6", "train.save_every=2", "train.eval_every=0"];
    let straight = finetune("straight", &common).output().unwrap();
    assert!(straight.status.success(), "{}", stderr(&straight));
    let killed = runs.path().join("killed");
    kill_when_exists(
        finetune("killed", &common),
        &killed.join("checkpoints/step-00000002/state.json"),
    );
    let out = finetune("killed", &common)
        .args(["--resume", "auto"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(final_weights(&killed, 6) == final_weights(&runs.path().join("straight"), 6));

    // A folder that is not a vision export is named before anything is written.
    let out = finetune("bad", &["model.path=\"datasets/minilm-tokenizer\""])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("config.json"), "{err}");
    assert!(!runs.path().join("bad").exists());
}

/// 96 grey 28x28 PNGs in three class folders (Fashion-MNIST-like ramps, seeded by index).
fn png_folder(dir: &Path) {
    for i in 0..96u32 {
        let sub = dir.join(format!("c{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        image::GrayImage::from_fn(28, 28, |x, y| {
            image::Luma([((x * (i % 7 + 1) + y * (i % 5 + 2) + i) % 256) as u8])
        })
        .save(sub.join(format!("{i:03}.png")))
        .unwrap();
    }
}

/// Images larger than memory: the same folder read into memory, streamed (`stream = true`) and
/// packed by `kindling pack-images` (`shards`) trains to the same weights bit for bit, and the
/// packed run killed after a checkpoint resumes to them too.
#[test]
fn a_folder_in_memory_streamed_or_packed_trains_the_same_and_packed_runs_resume() {
    let runs = tempfile::tempdir().unwrap();
    let folder = runs.path().join("pngs");
    png_folder(&folder);
    let packed = runs.path().join("packed");
    let out = kindling()
        .args(["pack-images"])
        .arg(&folder)
        .arg("--out")
        .arg(&packed)
        .args(["--shard-mb", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["images"].as_u64(), summary["classes"].as_u64()),
        (Some(96), Some(3))
    );
    let again = kindling()
        .args(["pack-images"])
        .arg(&folder)
        .arg("--out")
        .arg(&packed)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));

    let source = |kind: &str| {
        match kind {
        "memory" => format!(
            "data.train={{ folder = {{ path = \"{}\", color = \"gray\" }} }}",
            folder.display()
        ),
        "stream" => format!(
            "data.train={{ folder = {{ path = \"{}\", size = [28, 28], color = \"gray\", stream = true }} }}",
            folder.display()
        ),
        _ => format!(
            "data.train={{ shards = {{ dir = \"{}\", size = [28, 28], color = \"gray\" }} }}",
            packed.display()
        ),
    }
    };
    let common = |kind: &str| {
        vec![
            source(kind),
            "train.batch_size=32".to_string(),
            "train.steps=6".into(),
            "train.save_every=2".into(),
            "train.eval_every=0".into(),
            "probe.enabled=false".into(),
        ]
    };
    let run = |kind: &str, name: &str, resume: bool| {
        let sets = common(kind);
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let mut cmd = tiny(runs.path(), name, &sets);
        if resume {
            cmd.args(["--resume", "auto"]);
        }
        cmd
    };
    let mut weights = Vec::new();
    for kind in ["memory", "stream", "shards"] {
        let out = run(kind, kind, false).output().unwrap();
        assert!(out.status.success(), "{kind}: {}", stderr(&out));
        weights.push(final_weights(&runs.path().join(kind), 6));
    }
    assert!(weights[0] == weights[1], "streamed differs from in memory");
    assert!(weights[0] == weights[2], "packed differs from in memory");

    let killed = runs.path().join("killed");
    kill_when_exists(
        run("shards", "killed", false),
        &killed.join("checkpoints/step-00000002/state.json"),
    );
    let out = run("shards", "killed", true).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        final_weights(&killed, 6) == weights[2],
        "the resumed packed run differs"
    );
}
