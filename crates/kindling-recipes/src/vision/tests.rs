//! The vision model's unit tests: every method builds and steps, and its parameters.
//! Every method on the tiny recipe's shapes: each trainable parameter gets a gradient; the
//! target network, MoCo's queue and BatchNorm buffers get none and are left to their hooks.

use super::*;

fn tiny(objective: &str) -> VisionRecipe {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/tiny");
    if objective == "mae" || objective == "dino" {
        // MAE needs a ViT, DINO multi-crop: their own tiny recipes (DINO's last layer not
        // frozen at step 0, so that every parameter gets its gradient).
        let unfrozen = ["loss.freeze_last_layer_steps=0".to_string()];
        let overrides = if objective == "dino" {
            &unfrozen[..]
        } else {
            &[]
        };
        let path = root.join(format!("{objective}-tiny.toml"));
        return VisionRecipe::load(&path, overrides).unwrap();
    }
    let path = root.join("simclr-tiny.toml");
    let mut overrides = vec![
        format!("objective=\"{objective}\""),
        "model.predictor.dims=[16, 8]".into(),
    ];
    if objective == "moco" {
        overrides.push("loss.queue_size=32".into());
    }
    VisionRecipe::load(&path, &overrides).unwrap()
}

fn batch(n: usize, seed: u64) -> ViewBatch {
    batch_of(n, seed, &[20, 20])
}

/// `n` random images in each view, view `v` of `sides[v]` x `sides[v]` pixels.
fn batch_of(n: usize, seed: u64, sides: &[usize]) -> ViewBatch {
    use rand::Rng;
    let mut r = rng::rng(&[seed]);
    let mut view = |side: usize| {
        (0..n * side * side)
            .map(|_| r.random_range(-1.0f32..1.0))
            .collect()
    };
    ViewBatch {
        n,
        shapes: sides.iter().map(|&s| (s, s, 1)).collect(),
        views: sides.iter().map(|&s| view(s)).collect(),
        labels: Some((0..n as u32).map(|i| i % 3).collect()),
        cursor_after: Cursor::default(),
    }
}

#[test]
fn every_method_trains_every_parameter_and_only_those() {
    for objective in &objectives() {
        let recipe = tiny(objective);
        let model = SslModel::build(&recipe, (28, 28, 1), 3, &Device::Cpu).unwrap();
        // MAE: one view at the ViT's 28 pixels; DINO: 2 global 28-pixel and 6 local 12-pixel
        // crops; the others: two 20-pixel crops.
        let b = match *objective {
            "mae" => batch_of(8, 1, &[28]),
            "dino" => batch_of(8, 1, &[28, 28, 12, 12, 12, 12, 12, 12]),
            _ => batch(8, 1),
        };
        let out = model.step(&b, Mode::Train { seed: 1 }).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap();
        assert!(loss.is_finite(), "{objective}: loss {loss}");
        let grads = out.loss.backward().unwrap();
        let data = model.varmap.data().lock().unwrap();
        let mut trained = 0;
        for (name, var) in data.iter() {
            let g = grads.get(var.as_tensor());
            if model.trainable(name) {
                let g = g.unwrap_or_else(|| panic!("{objective}: {name} gets no gradient"));
                let norm = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0, "{objective}: {name} gets a zero gradient");
                trained += 1;
            } else {
                assert!(g.is_none(), "{objective}: state {name} gets a gradient");
            }
        }
        assert!(trained > 20, "{objective}: {trained} parameters");
        let has_target = data.keys().any(|k| k.starts_with("target."));
        assert_eq!(
            has_target,
            ["byol", "moco", "dino"].contains(objective),
            "{objective}"
        );
        assert_eq!(data.contains_key("queue"), *objective == "moco");
        assert_eq!(
            data.keys().any(|k| k.starts_with("predictor.")),
            ["byol", "simsiam"].contains(objective)
        );
    }
}

#[test]
fn the_target_starts_as_the_online_network_and_follows_it_by_ema() {
    let model = SslModel::build(&tiny("byol"), (28, 28, 1), 3, &Device::Cpu).unwrap();
    let get = |n: &str| {
        model.varmap.data().lock().unwrap()[n]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let w = "backbone.embedder.embedder.convolution.weight";
    let tw = "target.backbone.embedder.embedder.convolution.weight";
    assert_eq!(get(w), get(tw));
    let (online, target) = model
        .ema_pairs
        .iter()
        .find(|(o, _)| {
            o.as_tensor().id() == model.varmap.data().lock().unwrap()[w].as_tensor().id()
        })
        .map(|(o, t)| (o.clone(), t.clone()))
        .unwrap();
    online.set(&(online.as_tensor() + 1.0).unwrap()).unwrap();
    let before = get(tw);
    // Step 0 of 10: momentum is ema_base = 0.99.
    model.after_update(0, 10).unwrap();
    let after = target
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (a, b) in after.iter().zip(&before) {
        assert!((a - (b + 0.01)).abs() < 1e-5, "{a} vs {b} + 0.01");
    }
    assert!((model.ema_momentum(10, 10) - 1.0).abs() < 1e-12);
    assert!((model.ema_momentum(5, 10) - 0.995).abs() < 1e-12);
}

/// A folder without Kindling's `preprocessing` reads its eval view from the HF image processor:
/// a square resize and a normalisation are taken; a shortest-edge resize with a crop (ConvNext's)
/// or no processor at all is named.
#[test]
fn an_hf_image_processor_becomes_the_eval_view_or_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let write = |v: serde_json::Value| {
        std::fs::write(dir.path().join("preprocessor_config.json"), v.to_string()).unwrap()
    };
    let e = probe::processor_view(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("preprocessing") && e.contains("preprocessor_config.json"),
        "{e}"
    );
    write(serde_json::json!({
        "size": {"height": 32, "width": 32}, "image_mean": [0.5], "image_std": [0.2],
    }));
    let view = probe::processor_view(dir.path()).unwrap();
    assert_eq!(view.output_shape(28, 28, 1).unwrap(), (32, 32, 1));
    assert_eq!(view.stages.len(), 2);
    write(serde_json::json!({"size": {"shortest_edge": 224}, "crop_pct": 0.875}));
    let e = probe::processor_view(dir.path()).unwrap_err().to_string();
    assert!(e.contains("shortest"), "{e}");
}
