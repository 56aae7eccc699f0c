//! The kernel path is a property of the model, chosen when it is built (`kernels` in a recipe,
//! `BertConfig::kernels` in code), not of the process: a fused and a composed model live side by
//! side and compute the same loss and gradients, and a recipe names its path.

use candle_core::Device;
use kindling_core::Mode;
use kindling_models::ops::Kernels;
use kindling_models::EncoderConfig;
use kindling_recipes::bert_mlm::BertMlm;
use kindling_train::Objective;

use crate::common::{kindling, stderr};
use crate::model::tiny_batch;

/// A tiny config of `model_type`, dropout on everywhere it exists (ModernBERT: 3 layers, so a
/// local layer with a window narrower than the sequence sits between global ones), initialised
/// wide enough (0.3) that activations reach where approximations would show.
fn tiny(model_type: &str) -> EncoderConfig {
    let json = match model_type {
        "modernbert" => serde_json::json!({
            "model_type": "modernbert", "vocab_size": 97, "hidden_size": 32,
            "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 48,
            "global_attn_every_n_layers": 2, "local_attention": 6,
            "attention_dropout": 0.1, "mlp_dropout": 0.1, "embedding_dropout": 0.1,
            "initializer_range": 0.3,
        }),
        _ => serde_json::json!({
            "model_type": model_type, "vocab_size": 97, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 40, "type_vocab_size": 1, "pad_token_id": 1,
            "initializer_range": 0.3,
        }),
    };
    EncoderConfig::from_json(json).unwrap()
}

/// The loss of `tiny_batch` in training mode (dropout on, seeded) and every parameter's gradient,
/// by name, of a model built on `kernels` from seed 5.
fn loss_and_grads(mut cfg: EncoderConfig, kernels: Kernels) -> (f32, Vec<(String, Vec<f32>)>) {
    cfg.set_kernels(kernels);
    let obj = BertMlm::new(cfg, 5, &Device::Cpu).unwrap();
    let out = obj.step(&tiny_batch(97), Mode::Train { seed: 11 }).unwrap();
    let grads = out.loss.backward().unwrap();
    let mut named: Vec<(String, Vec<f32>)> = obj
        .varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{kernels:?}: no gradient for {name}"));
            (name.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    (out.loss.to_scalar().unwrap(), named)
}

#[test]
fn fused_and_composed_models_give_the_same_loss_and_gradients_side_by_side() {
    for arch in ["bert", "roberta", "modernbert"] {
        let (fused_loss, fused) = loss_and_grads(tiny(arch), Kernels::Fused);
        let (composed_loss, composed) = loss_and_grads(tiny(arch), Kernels::Composed);
        assert!(
            (fused_loss - composed_loss).abs() <= 1e-5 * fused_loss.abs(),
            "{arch}: loss {fused_loss} fused, {composed_loss} composed"
        );
        assert_eq!(fused.len(), composed.len());
        for ((name, f), (_, c)) in fused.iter().zip(&composed) {
            let scale = f.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = f.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // (+1e-6: the key biases' gradients are zero but for rounding, softmax being
            // blind to a shift.)
            assert!(
                diff <= 1e-4 * scale + 1e-6,
                "{arch} {name}: gradients differ by {diff} (largest {scale})"
            );
        }
    }
}

#[test]
fn a_recipe_names_its_kernel_path_and_a_wrong_one_is_refused_before_any_write() {
    let runs = tempfile::tempdir().unwrap();
    let run = |kernels: &str| {
        kindling()
            .args(["pretrain", "recipes/tiny/bert-tiny-mlm.toml", "--set"])
            .arg(format!("runs_dir=\"{}\"", runs.path().display()))
            .args(["--set", &format!("name=\"k-{kernels}\"")])
            .args(["--set", &format!("kernels=\"{kernels}\"")])
            .args(["--set", "train.steps=6", "--set", "train.eval_every=3"])
            .output()
            .unwrap()
    };
    let out = run("sideways");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("kernels") && err.contains("composed"), "{err}");
    assert!(!runs.path().join("k-sideways").exists());

    let eval_loss = |name: &str| -> Vec<f64> {
        let text = std::fs::read_to_string(runs.path().join(name).join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["split"] == "eval")
            .filter_map(|v| v["loss"].as_f64())
            .collect()
    };
    for kernels in ["fused", "composed"] {
        let out = run(kernels);
        assert!(out.status.success(), "{}", stderr(&out));
        let saved =
            std::fs::read_to_string(runs.path().join(format!("k-{kernels}/recipe.toml"))).unwrap();
        assert!(
            saved.contains(&format!("kernels = \"{kernels}\"")),
            "{saved}"
        );
    }
    let (fused, composed) = (eval_loss("k-fused"), eval_loss("k-composed"));
    assert_eq!(fused.len(), 2, "{fused:?}");
    assert_eq!(fused.len(), composed.len());
    for (f, c) in fused.iter().zip(&composed) {
        assert!(
            (f - c).abs() <= 1e-4 * f.abs(),
            "eval loss {f} fused, {c} composed"
        );
    }
}
