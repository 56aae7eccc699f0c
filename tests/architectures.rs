//! The BERT family beyond BERT, and continued pretraining: a RoBERTa trained from scratch with a
//! byte-level BPE vocabulary exports a folder transformers loads as `RobertaForMaskedLM` with
//! Kindling's logits and gradients; BPE and Unigram tokenizers export ids `AutoTokenizer`
//! reproduces and group whole words; `[model] path` continues a folder's weights from exactly
//! where they were, and a recipe that mixes a path with a shape is refused before any write.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kindling_core::Mode;
use kindling_models::{BertConfig, BertForMaskedLM};

use crate::common::{kindling, minilm_dir, python_reference, shared_tiny_run, stderr};

/// One run of `recipes/tiny/{name}.toml` into a folder of its own under the test target dir.
fn tiny_run(name: &str) -> PathBuf {
    let runs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kindling-shared-{name}"));
    let _ = std::fs::remove_dir_all(&runs);
    let out = kindling()
        .args(["pretrain", &format!("recipes/tiny/{name}.toml"), "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    runs.join(name)
}

/// One run of the tiny RoBERTa recipe shared by this module's tests.
pub(crate) fn shared_roberta_run() -> &'static Path {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| tiny_run("roberta-tiny-mlm"))
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load_mlm(dir: &Path) -> (BertConfig, BertForMaskedLM) {
    let cfg: BertConfig = serde_json::from_value(read_json(&dir.join("config.json"))).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = BertForMaskedLM::load(vb, &cfg).unwrap();
    (cfg, model)
}

#[test]
fn roberta_export_is_a_roberta_for_masked_lm_with_transformers_logits() {
    let export = shared_roberta_run().join("export");
    let config = read_json(&export.join("config.json"));
    assert_eq!(config["architectures"][0], "RobertaForMaskedLM");
    assert_eq!(config["model_type"], "roberta");
    assert_eq!(config["type_vocab_size"], 1);
    // The BPE specials in roberta-base's order: <s>=0, <pad>=1, </s>=2.
    assert_eq!(
        (
            &config["bos_token_id"],
            &config["pad_token_id"],
            &config["eos_token_id"]
        ),
        (&0.into(), &1.into(), &2.into())
    );
    let names: std::collections::BTreeSet<String> =
        candle_core::safetensors::load(export.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    for n in [
        "roberta.embeddings.word_embeddings.weight",
        "roberta.embeddings.position_embeddings.weight",
        "roberta.encoder.layer.1.output.LayerNorm.bias",
        "lm_head.dense.weight",
        "lm_head.layer_norm.weight",
        "lm_head.bias",
    ] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    assert!(!names
        .iter()
        .any(|n| n.starts_with("bert.") || n.starts_with("cls.")));

    // Rows of different content, no <pad> inside (RoBERTa counts positions past the pads).
    let (cfg, model) = load_mlm(&export);
    let ids: Vec<u32> = (0..32u32)
        .map(|i| 5 + (i * 37) % (cfg.vocab_size as u32 - 5))
        .collect();
    let ids = Tensor::from_vec(ids, (2, 16), &Device::Cpu).unwrap();
    let logits = model.forward_t(&ids, None, None, Mode::Eval).unwrap();
    let out = shared_roberta_run().join("kindling_logits.json");
    std::fs::write(
        &out,
        serde_json::json!({
            "input_ids": ids.to_vec2::<u32>().unwrap(),
            "logits": logits.reshape((2, 16, cfg.vocab_size)).unwrap().to_vec3::<f32>().unwrap(),
        })
        .to_string(),
    )
    .unwrap();
    if let Some(text) = python_reference("hf_mlm_logits.py", &[export.as_os_str(), out.as_os_str()])
    {
        assert!(text.contains("RobertaForMaskedLM"), "{text}");
    }
}

/// Loads `export` into a trainable masked LM, computes the loss of a fixed batch of `seq`-token
/// rows in eval mode and every parameter's gradient norm (each must exist, and be non-zero but
/// for key biases),
/// and has tests/reference/hf_mlm_grads.py compute the same with transformers.
fn mlm_gradients_match_transformers(export: &Path, seq: usize, out: &Path) {
    use kindling_train::Objective;
    let cfg = kindling_models::import::read_encoder_config(export).unwrap();
    let obj = kindling_recipes::bert_mlm::BertMlm::new(cfg.clone(), 0, &Device::Cpu).unwrap();
    let weights =
        candle_core::safetensors::load(export.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, var) in obj.varmap.data().lock().unwrap().iter() {
        var.set(&weights[name]).unwrap();
    }
    let (b, t) = (2usize, seq);
    let v = cfg.vocab_size() as u32;
    let input_ids: Vec<u32> = (0..(b * t) as u32)
        .map(|i| 5 + (i * 37) % (v - 5))
        .collect();
    let positions: Vec<u32> = (0..(b * t) as u32).filter(|p| p % 4 == 1).collect();
    let labels: Vec<u32> = positions.iter().map(|&p| 5 + (p * 131) % (v - 5)).collect();
    let batch = kindling_data::MlmBatch {
        batch_size: b,
        seq_len: t,
        input_ids: input_ids.clone(),
        positions: positions.clone(),
        labels: labels.clone(),
        cursor_after: Default::default(),
    };
    let step = obj.step(&batch, Mode::Eval).unwrap();
    let loss = step.loss.to_scalar::<f32>().unwrap();
    let grads = step.loss.backward().unwrap();
    let mut norms = serde_json::Map::new();
    for (name, var) in obj.varmap.data().lock().unwrap().iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        // A key bias's true gradient is zero (softmax ignores a per-query constant).
        assert!(
            n > 0.0 || name.ends_with("key.bias"),
            "{name}'s gradient is zero"
        );
        norms.insert(name.clone(), (n as f64).into());
    }
    std::fs::write(
        out,
        serde_json::json!({
            "input_ids": input_ids.chunks(t).collect::<Vec<_>>(), "positions": positions,
            "labels": labels, "loss": loss, "grad_norms": norms,
        })
        .to_string(),
    )
    .unwrap();
    python_reference("hf_mlm_grads.py", &[export.as_os_str(), out.as_os_str()]);
}

#[test]
fn roberta_mlm_loss_and_every_gradient_match_transformers() {
    let run = shared_roberta_run();
    mlm_gradients_match_transformers(&run.join("export"), 16, &run.join("kindling_grads.json"));
}

#[test]
fn trained_tokenizers_give_transformers_ids_and_group_whole_words() {
    use kindling_data::tokenizer::{save_hf_files, special_tokens, train};
    use kindling_data::{Corpus, PackedBlocks, TokenizerKind, TokenizerTraining};
    let corpus = Corpus::from_patterns(
        &["datasets/janeausten/persuasion.txt.gz".to_string()],
        &crate::common::repo_root(),
    )
    .unwrap();
    let texts = [
        "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who never took up any book.",
        "  Unusual   spacing, ÉMOJI-free accents: café naïve. 1817!",
        "She walked <mask> the hill.",
    ];
    for kind in [TokenizerKind::Bpe, TokenizerKind::Unigram] {
        let cfg = TokenizerTraining {
            kind,
            vocab_size: 1500,
            ..Default::default()
        };
        let tk = train(&corpus, &cfg).unwrap();
        let sp = special_tokens(&tk).unwrap();
        let names: Vec<String> = [sp.cls, sp.pad, sp.sep, sp.unk, sp.mask]
            .iter()
            .map(|&i| tk.id_to_token(i).unwrap())
            .collect();
        assert_eq!(
            names,
            ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            "{kind:?}"
        );
        assert_eq!(
            (sp.cls, sp.pad, sp.sep),
            (0, 1, 2),
            "{kind:?}: roberta-base's ids"
        );

        // Whole words: every word group packing marks starts where the text has a word start
        // (the byte-level "Ġ" or SentencePiece's "▁" marker, or after a special token), and
        // each group decodes back to whole words.
        let doc = Corpus {
            documents: vec![kindling_data::corpus::Document {
                path: "x".into(),
                text: texts[0].into(),
            }],
        };
        let blocks = PackedBlocks::pack(&doc, &tk, &sp, 16).unwrap();
        let (ids, flags) = blocks.block(0);
        let mut groups: Vec<Vec<u32>> = Vec::new();
        for (&id, &f) in ids.iter().zip(flags) {
            if f & kindling_data::packing::SPECIAL != 0 {
                continue;
            }
            if f & kindling_data::packing::WORD_START != 0 || groups.is_empty() {
                groups.push(vec![id]);
            } else {
                groups.last_mut().unwrap().push(id);
            }
        }
        assert!(
            groups.iter().any(|g| g.len() > 1),
            "{kind:?}: some word has several pieces"
        );
        for g in &groups {
            let word = tk.decode(g, true).unwrap();
            assert!(
                texts[0].contains(word.trim()) && !word.trim().contains(' '),
                "{kind:?}: group {g:?} decodes to {word:?}, not one word of the text"
            );
        }

        let dir = tempfile::tempdir().unwrap();
        save_hf_files(&tk, dir.path(), false, 512).unwrap();
        let enc = |a: &str, b: Option<&str>| {
            let e = match b {
                Some(b) => tk.encode((a, b), true),
                None => tk.encode(a, true),
            };
            e.unwrap().get_ids().to_vec()
        };
        let reference = serde_json::json!({
            "single": texts.iter().map(|t| serde_json::json!([t, enc(t, None)])).collect::<Vec<_>>(),
            "pairs": [[texts[0], texts[1], enc(texts[0], Some(texts[1]))]],
        });
        let path = dir.path().join("kindling_ids.json");
        std::fs::write(&path, reference.to_string()).unwrap();
        python_reference(
            "hf_tokenizer_ids.py",
            &[dir.path().as_os_str(), path.as_os_str()],
        );
    }
}

/// A copy of the tiny recipe that continues `path` for `steps` steps into `runs`.
fn continue_run(runs: &Path, path: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = kindling();
    cmd.args(["pretrain", "recipes/tiny/bert-tiny-mlm.toml", "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.display()))
        .args(["--set", "name=continued", "--set"])
        .arg(format!("model.path=\"{}\"", path.display()));
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd.output().unwrap()
}

fn eval_records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["split"] == "eval")
        .collect()
}

#[test]
fn continued_pretraining_starts_where_the_export_ended_and_lowers_the_loss() {
    // The tiny run's final eval and the continued run's step-0 eval see the same blocks with
    // the same seeded masks: equal losses say the weights (head included) arrived intact.
    let base = shared_tiny_run();
    let final_loss = eval_records(base).last().unwrap()["loss"].as_f64().unwrap();
    let runs = tempfile::tempdir().unwrap();
    // The learning rate warms up again from zero: the first steps undo a little of the
    // export's state before improving on it (as continued pretraining does at any scale).
    let out = continue_run(
        runs.path(),
        &base.join("export"),
        &["train.steps=100", "train.schedule.warmup_steps=20"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("encoder and MLM head loaded"), "{err}");
    assert!(err.contains("recipe's model.hidden_size"), "{err}");
    let run = runs.path().join("continued");
    let initial = read_json(&run.join("initial_eval.json"))["loss"]
        .as_f64()
        .unwrap();
    assert!(
        (initial - final_loss).abs() < 1e-4,
        "step 0 {initial} vs the export's own {final_loss}"
    );
    let after = eval_records(&run).last().unwrap()["loss"].as_f64().unwrap();
    assert!(
        after < initial,
        "continued training lowered the loss: {initial} -> {after}"
    );
    // The run's tokenizer is the folder's, byte for byte in its vocabulary.
    let theirs = kindling_data::tokenizer::load(&base.join("export")).unwrap();
    let ours = kindling_data::tokenizer::load(&run.join("export")).unwrap();
    assert_eq!(theirs.get_vocab(true), ours.get_vocab(true));
    let card = std::fs::read_to_string(run.join("export/README.md")).unwrap();
    assert!(card.contains("continued from"), "{card}");
    assert!(card.contains("before training"), "{card}");
}

#[test]
fn continued_pretraining_of_minilm_trains_a_fresh_head_and_exports_a_masked_lm() {
    let Some(minilm) = minilm_dir() else {
        crate::common::skipped("continued pretraining of all-MiniLM-L6-v2 (no MiniLM weights)");
        return;
    };
    let runs = tempfile::tempdir().unwrap();
    let out = continue_run(
        runs.path(),
        &minilm,
        &[
            "train.steps=12",
            "train.batch_size=8",
            "train.eval_every=12",
            "data.seq_len=32",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no MLM head"), "{err}");
    let run = runs.path().join("continued");
    let initial = read_json(&run.join("initial_eval.json"))["loss"]
        .as_f64()
        .unwrap();
    let after = eval_records(&run).last().unwrap()["loss"].as_f64().unwrap();
    assert!(
        after < initial - 0.5,
        "the fresh head learns: {initial} -> {after}"
    );
    let export = run.join("export");
    let config = read_json(&export.join("config.json"));
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    assert_eq!(
        (
            config["hidden_size"].as_u64(),
            config["vocab_size"].as_u64()
        ),
        (Some(384), Some(30522))
    );
    // Encoder tensors are MiniLM's names under bert.; the card says the head was new.
    let card = std::fs::read_to_string(export.join("README.md")).unwrap();
    assert!(card.contains("freshly initialised"), "{card}");
    let (cfg, model) = load_mlm(&export);
    let ids: Vec<u32> = (0..32u32).map(|i| 1000 + (i * 37) % 20000).collect();
    let ids = Tensor::from_vec(ids, (2, 16), &Device::Cpu).unwrap();
    let logits = model.forward_t(&ids, None, None, Mode::Eval).unwrap();
    let out = run.join("kindling_logits.json");
    std::fs::write(
        &out,
        serde_json::json!({
            "input_ids": ids.to_vec2::<u32>().unwrap(),
            "logits": logits.reshape((2, 16, cfg.vocab_size)).unwrap().to_vec3::<f32>().unwrap(),
        })
        .to_string(),
    )
    .unwrap();
    python_reference("hf_mlm_logits.py", &[export.as_os_str(), out.as_os_str()]);
}

#[test]
fn a_recipe_file_with_a_path_and_a_shape_or_tokenizer_is_refused_before_any_write() {
    let base = shared_tiny_run().join("export");
    let dir = tempfile::tempdir().unwrap();
    for (extra, key) in [
        ("[model]\nhidden_size = 64\n", "model.hidden_size"),
        (
            "[model]\narchitecture = \"roberta\"\n",
            "model.architecture",
        ),
        (
            "[data.tokenizer]\ntrain = { vocab_size = 500 }\n",
            "data.tokenizer",
        ),
    ] {
        let (model_extra, data_extra) = if extra.starts_with("[model]") {
            (extra.trim_start_matches("[model]\n"), "")
        } else {
            ("", extra)
        };
        let recipe = dir.path().join("r.toml");
        std::fs::write(
            &recipe,
            format!(
                "objective = \"bert-mlm\"\nruns_dir = \"{}\"\n[model]\npath = \"{}\"\n{model_extra}\
                 [data]\ncorpus = [\"datasets/janeausten/persuasion.txt.gz\"]\nseq_len = 64\n\
                 {data_extra}[train]\nsteps = 2\nbatch_size = 4\n",
                dir.path().join("runs").display(),
                base.display()
            ),
        )
        .unwrap();
        let out = kindling().arg("pretrain").arg(&recipe).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra}: {}", stderr(&out));
        assert!(stderr(&out).contains(key), "{extra}: {}", stderr(&out));
        assert!(
            !dir.path().join("runs").exists(),
            "{extra}: nothing written"
        );
    }
}

/// One run of the tiny ModernBERT recipe shared by this module's tests.
pub(crate) fn shared_modernbert_run() -> &'static Path {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| tiny_run("modernbert-tiny-mlm"))
}

fn load_any_mlm(dir: &Path) -> (kindling_models::EncoderConfig, kindling_models::MaskedLm) {
    let cfg = kindling_models::import::read_encoder_config(dir).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = kindling_models::MaskedLm::load(vb, &cfg).unwrap();
    (cfg, model)
}

/// Kindling's eval-mode logits of `ids` (and `mask`) written for hf_mlm_logits.py.
fn write_logits(model: &kindling_models::MaskedLm, ids: &Tensor, path: &Path) {
    let (b, t) = ids.dims2().unwrap();
    let logits = model.forward_t(ids, None, None, Mode::Eval).unwrap();
    let v = logits.dim(1).unwrap();
    std::fs::write(
        path,
        serde_json::json!({
            "input_ids": ids.to_vec2::<u32>().unwrap(),
            "logits": logits.reshape((b, t, v)).unwrap().to_vec3::<f32>().unwrap(),
        })
        .to_string(),
    )
    .unwrap();
}

#[test]
fn modernbert_export_is_a_modernbert_for_masked_lm_with_transformers_logits() {
    let run = shared_modernbert_run();
    let export = run.join("export");
    let config = read_json(&export.join("config.json"));
    assert_eq!(config["architectures"][0], "ModernBertForMaskedLM");
    assert_eq!(
        config["layer_types"],
        serde_json::json!(["full_attention", "sliding_attention", "sliding_attention"])
    );
    let names: std::collections::BTreeSet<String> =
        candle_core::safetensors::load(export.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    for n in [
        "model.embeddings.tok_embeddings.weight",
        "model.embeddings.norm.weight",
        "model.layers.0.attn.Wqkv.weight",
        "model.layers.1.attn_norm.weight",
        "model.layers.2.mlp.Wi.weight",
        "model.final_norm.weight",
        "head.dense.weight",
        "head.norm.weight",
        "decoder.bias",
    ] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    // No biases but the decoder's, no attention norm in layer 0, the decoder tied.
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with(".bias") && n != "decoder.bias"),
        "{names:?}"
    );
    assert!(!names.contains("model.layers.0.attn_norm.weight"));
    assert!(!names.contains("decoder.weight"));
    // It learns: the eval loss falls from one evaluation to the next.
    let eval: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["split"] == "eval")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert!(eval.windows(2).all(|w| w[1] < w[0]), "{eval:?}");

    // 64 tokens: the local layers' 8-token half-window cuts most pairs.
    let (cfg, model) = load_any_mlm(&export);
    let v = cfg.vocab_size() as u32;
    let ids: Vec<u32> = (0..128u32).map(|i| 5 + (i * 37) % (v - 5)).collect();
    let ids = Tensor::from_vec(ids, (2, 64), &Device::Cpu).unwrap();
    let out = run.join("kindling_logits.json");
    write_logits(&model, &ids, &out);
    if let Some(text) = python_reference("hf_mlm_logits.py", &[export.as_os_str(), out.as_os_str()])
    {
        assert!(text.contains("ModernBertForMaskedLM"), "{text}");
    }
}

#[test]
fn modernbert_mlm_loss_and_every_gradient_match_transformers() {
    // 48 tokens: past the local layers' 8-token half-window.
    let run = shared_modernbert_run();
    mlm_gradients_match_transformers(&run.join("export"), 48, &run.join("kindling_grads.json"));
}

/// A small ModernBertForMaskedLM folder saved by transformers (with the logits it computes),
/// made once per test binary; `None` without KINDLING_PYTHON.
fn hf_modernbert_folder() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kindling-hf-modernbert");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tokenizer = shared_roberta_run().join("export");
        python_reference(
            "hf_modernbert_folder.py",
            &[dir.as_os_str(), tokenizer.as_os_str()],
        )?;
        Some(dir)
    })
    .as_deref()
}

/// Fine-tunes `folder` with the tiny fine-tuning recipe and checks that transformers loads the
/// export as `class` and computes Kindling's logits (padded rows included).
fn fine_tunes_into(folder: &Path, pooling: &str, class: &str) {
    use kindling_models::bert::Pooling;
    let runs = tempfile::tempdir().unwrap();
    let out = kindling()
        .args(["finetune", "recipes/tiny/finetune-tiny.toml", "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.path().display()))
        .args(["--set", "train.max_epochs=1", "--set"])
        .arg(format!("model.pooling=\"{pooling}\""))
        .arg("--set")
        .arg(format!("model.path=\"{}\"", folder.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let export = runs.path().join("finetune-tiny/export");
    let config = read_json(&export.join("config.json"));
    assert_eq!(config["architectures"][0], class);
    let cfg = kindling_models::import::read_encoder_config(&export).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[export.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let pooling = if pooling == "mean" {
        Pooling::Mean
    } else {
        Pooling::Cls
    };
    let model = kindling_models::SequenceClassifier::load(vb, &cfg, 2, pooling, 0.0).unwrap();
    // Two rows, the second padded: the mask must matter the same way on both sides.
    let pad = cfg.pad_token_id() as u32;
    let ids: Vec<u32> = vec![0, 40, 41, 42, 43, 2, 0, 50, 51, 2, pad, pad];
    let mask: Vec<u32> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let t_ids = Tensor::from_slice(&ids, (2, 6), &Device::Cpu).unwrap();
    let t_mask = Tensor::from_slice(&mask, (2, 6), &Device::Cpu).unwrap();
    let logits = model.forward_t(&t_ids, None, &t_mask, Mode::Eval).unwrap();
    let path = runs.path().join("kindling_cls_logits.json");
    std::fs::write(
        &path,
        serde_json::json!({
            "input_ids": t_ids.to_vec2::<u32>().unwrap(),
            "attention_mask": t_mask.to_vec2::<u32>().unwrap(),
            "logits": logits.to_vec2::<f32>().unwrap(),
        })
        .to_string(),
    )
    .unwrap();
    python_reference("hf_cls_logits.py", &[export.as_os_str(), path.as_os_str()]);
}

#[test]
fn an_hf_modernbert_folder_fine_tunes_into_a_classifier_transformers_loads() {
    if let Some(folder) = hf_modernbert_folder() {
        fine_tunes_into(folder, "mean", "ModernBertForSequenceClassification");
    }
}

#[test]
fn a_roberta_export_fine_tunes_into_a_classifier_transformers_loads() {
    // RoBERTa's head: dropout, classifier.dense + tanh on <s>, dropout, classifier.out_proj.
    fine_tunes_into(
        &shared_roberta_run().join("export"),
        "cls",
        "RobertaForSequenceClassification",
    );
}

#[test]
fn an_hf_modernbert_folder_imports_continues_and_exports_back() {
    // transformers saves a small ModernBertForMaskedLM (tests/reference/hf_modernbert_folder.py)
    // with the logits it computes; Kindling loads the folder and computes the same logits, a
    // continued-pretraining run starts from it, and its export loads back in transformers.
    let Some(folder) = hf_modernbert_folder() else {
        return;
    };
    let reference = read_json(&folder.join("hf_logits.json"));
    let (cfg, model) = load_any_mlm(folder);
    let rows: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<u32>> = serde_json::from_value(reference["attention_mask"].clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    let ids = Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap();
    let mask_t = Tensor::from_vec(mask.concat(), (b, t), &Device::Cpu).unwrap();
    let ours = model
        .forward_t(&ids, Some(&mask_t), None, Mode::Eval)
        .unwrap()
        .reshape((b, t, cfg.vocab_size()))
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let theirs: Vec<Vec<Vec<f32>>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let mut worst = 0f32;
    for (bi, (o, h)) in ours.iter().zip(&theirs).enumerate() {
        for (ti, (a, c)) in o.iter().zip(h).enumerate() {
            if mask[bi][ti] == 0 {
                continue; // padding rows: neither side defines them
            }
            for (x, y) in a.iter().zip(c) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    assert!(
        worst <= 1e-4,
        "max |logit difference| against transformers: {worst}"
    );

    let runs = tempfile::tempdir().unwrap();
    let out = continue_run(runs.path(), folder, &["train.steps=10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("encoder and MLM head loaded"),
        "{}",
        stderr(&out)
    );
    let export = runs.path().join("continued/export");
    let (_, model) = load_any_mlm(&export);
    let ids = Tensor::from_vec(
        (0..64u32).map(|i| 5 + i * 7).collect(),
        (2, 32),
        &Device::Cpu,
    )
    .unwrap();
    let logits = export.join("kindling_logits.json");
    write_logits(&model, &ids, &logits);
    python_reference(
        "hf_mlm_logits.py",
        &[export.as_os_str(), logits.as_os_str()],
    );
}

#[test]
fn simcse_from_an_hf_modernbert_folder_exports_what_sentence_transformers_embeds_alike() {
    let Some(folder) = hf_modernbert_folder() else {
        return;
    };
    let runs = tempfile::tempdir().unwrap();
    let out = kindling()
        .args(["pretrain", "recipes/tiny/simcse-tiny.toml", "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.path().display()))
        .args(["--set", "train.steps=6", "--set"])
        .arg(format!("model.path=\"{}\"", folder.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let export = runs.path().join("simcse-tiny/export");
    let config = read_json(&export.join("config.json"));
    assert_eq!(config["architectures"][0], "ModernBertModel");
    crate::simcse::check_sentence_transformers_agrees(&export);
}
