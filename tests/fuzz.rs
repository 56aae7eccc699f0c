//! Property tests (proptest) of the two parsers that read files a user or a crash can damage:
//! the recipe parser and the checkpoint loader. Any input must give Ok or an error, never a
//! panic; a damaged checkpoint must never load.
//!
//! Inputs per run (PROPTEST_CASES overrides): 2000 arbitrary recipe texts, 2000 mutated copies
//! of a real recipe, 1000 random `--set` overrides, 300 damaged checkpoints.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{Init, VarBuilder, VarMap};
use kindling_recipes::Recipe;
use kindling_train::checkpoint::{self, TrainerState};
use kindling_train::{AdamW, Optimizer, OptimizerConfig};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const TINY: &str = include_str!("../recipes/tiny/bert-tiny-mlm.toml");

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn the_recipe_parser_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = Recipe::parse(&text, Path::new("fuzz.toml"), &[]);
    }

    #[test]
    fn the_recipe_parser_never_panics_on_a_mutated_recipe(
        start in 0..TINY.len(),
        len in 0usize..40,
        insert in "[\\[\\]{}=\".,0-9a-z_ \\n#-]{0,12}",
    ) {
        let bytes = TINY.as_bytes();
        let end = (start + len).min(bytes.len());
        let mut text = String::from_utf8_lossy(&bytes[..start]).into_owned();
        text.push_str(&insert);
        text.push_str(&String::from_utf8_lossy(&bytes[end..]));
        let _ = Recipe::parse(&text, Path::new("fuzz.toml"), &[]);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn overrides_never_panic_and_what_parses_round_trips(
        key in "(train|data|model|export|seed|name|[a-z]{1,6})(\\.[a-z_]{1,12}){0,3}",
        value in "[\\[\\]{}\"0-9a-z.=, -]{0,16}",
    ) {
        let arg = format!("{key}={value}");
        if let Ok(r) = Recipe::parse(TINY, Path::new("fuzz.toml"), &[arg]) {
            // Whatever parsed is a complete recipe that serialises and parses back to itself.
            let again = Recipe::parse(&r.to_toml(), Path::new("again.toml"), &[]).unwrap();
            prop_assert_eq!(again, r);
        }
    }
}

/// A small model and optimiser, and a valid checkpoint of them in `dir`.
fn checkpoint_in(dir: &Path) -> (VarMap, AdamW, std::path::PathBuf) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    vb.get_with_hints((8, 4), "layer.weight", Init::Const(0.5))
        .unwrap();
    vb.get_with_hints(8, "layer.bias", Init::Const(0.1))
        .unwrap();
    let params = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone(), true))
        .collect();
    let opt = AdamW::new(OptimizerConfig::default(), params).unwrap();
    let state = TrainerState {
        step: 3,
        data_cursor: serde_json::json!({"epoch": 0, "position": 96}),
        seed: 1,
        last_eval: None,
        elapsed_secs: 1.0,
        best: None,
        loss_scale: None,
    };
    let ckpt = checkpoint::save(dir, &varmap, &opt, &state, 2).unwrap();
    (varmap, opt, ckpt)
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn a_damaged_checkpoint_never_loads_and_never_panics(
        file in 0usize..3,
        at in any::<prop::sample::Index>(),
        how in 0u8..3,
        byte in any::<u8>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, mut opt, ckpt) = checkpoint_in(dir.path());
        let name = ["model.safetensors", "optimizer.safetensors", "state.json"][file];
        let path = ckpt.join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = at.index(bytes.len());
        let changed = match how {
            0 => { let old = bytes[i]; bytes[i] = byte; old != byte }
            1 => { bytes.truncate(i); true }
            _ => { bytes.insert(i, byte); true }
        };
        std::fs::write(&path, &bytes).unwrap();
        let result = checkpoint::load(&ckpt, &varmap, Some(&mut opt as &mut dyn Optimizer), &Device::Cpu);
        // state.json may survive a change that keeps it equivalent JSON (a space for a space);
        // the tensor files never do.
        if changed && name != "state.json" {
            prop_assert!(result.is_err(), "a damaged {} loaded", name);
        }
    }
}

proptest! {
    #![proptest_config(config(200))]

    /// Any `[model]` section (zeros, NaN, negative or odd sizes and rates) is refused with an
    /// error naming the key, or builds a model that trains a step: never a panic.
    #[test]
    fn random_model_configs_never_panic(
        heads in prop_oneof![1 => Just(0usize), 8 => 1usize..4],
        head_dim in 1usize..6,
        odd_hidden in prop_oneof![8 => Just(0usize), 1 => Just(1usize)],
        layers in prop_oneof![1 => Just(0usize), 8 => 1usize..3],
        intermediate in prop_oneof![1 => Just(0usize), 8 => 1usize..40],
        max_pos in prop_oneof![1 => Just(0usize), 8 => 8usize..40],
        type_vocab in prop_oneof![1 => Just(0usize), 8 => 1usize..3],
        dropout in prop_oneof![1 => Just(f64::NAN), 1 => Just(-0.1), 1 => Just(1.0), 12 => 0.0f64..0.9],
        init_range in prop_oneof![1 => Just(f64::NAN), 1 => Just(f64::INFINITY), 1 => Just(-1.0), 12 => 0.0f64..0.1],
        eps in prop_oneof![1 => Just(0.0f64), 1 => Just(f64::NAN), 1 => Just(-1e-5), 12 => 1e-12f64..1e-3],
        act in prop_oneof![1 => Just("swish"), 1 => Just(""), 8 => Just("gelu"), 4 => Just("relu")],
        seq_len in prop_oneof![1 => 0usize..3, 8 => 3usize..8],
    ) {
        let hidden = heads.max(1) * head_dim + odd_hidden;
        let sets = [
            format!("model.hidden_size={hidden}"),
            format!("model.num_hidden_layers={layers}"),
            format!("model.num_attention_heads={heads}"),
            format!("model.intermediate_size={intermediate}"),
            format!("model.max_position_embeddings={max_pos}"),
            format!("model.type_vocab_size={type_vocab}"),
            format!("model.hidden_dropout_prob={}", toml_float(dropout)),
            format!("model.initializer_range={}", toml_float(init_range)),
            format!("model.layer_norm_eps={}", toml_float(eps)),
            format!("model.hidden_act=\"{act}\""),
            format!("data.seq_len={seq_len}"),
        ];
        // An unknown activation is refused as the recipe is read, naming the key and the
        // activations there are.
        let recipe = match Recipe::parse(TINY, Path::new("fuzz.toml"), &sets) {
            Ok(r) => r,
            Err(e) => {
                let text = e.to_string();
                prop_assert!(
                    text.contains("model.hidden_act") && text.contains("gelu_new"),
                    "{text}"
                );
                return Ok(());
            }
        };
        let config = match kindling_recipes::bert_mlm::scratch_config(&recipe, 30, &crate::common::specials()) {
            Ok(c) => c,
            Err(e) => {
                let text = e.to_string();
                prop_assert!(text.contains("model") || text.contains("data.seq_len"), "{text}");
                return Ok(());
            }
        };
        let obj = kindling_recipes::bert_mlm::BertMlm::new(config, 1, &Device::Cpu).unwrap();
        BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = seq_len.max(1);
        let batch = kindling_data::MlmBatch {
            batch_size: 2,
            seq_len: t,
            input_ids: (0..2 * t as u32).map(|i| i % 30).collect(),
            positions: vec![0, t as u32],
            labels: vec![5, 6],
            cursor_after: Default::default(),
        };
        use kindling_train::Objective;
        let out = obj.step(&batch, kindling_core::Mode::Train { seed: 3 });
        prop_assert!(out.is_ok(), "{:?}", out.err());
    }
}

/// Configs of the property test above that built a model (the test checks it is not none).
static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn random_model_configs_include_models_that_build() {
    random_model_configs_never_panic();
    assert!(BUILT.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// `x` as a TOML float (`nan`, `inf`, `-inf` included).
fn toml_float(x: f64) -> String {
    match x {
        x if x.is_nan() => "nan".into(),
        x if x.is_infinite() && x > 0.0 => "inf".into(),
        x if x.is_infinite() => "-inf".into(),
        x => format!("{x:?}"),
    }
}
