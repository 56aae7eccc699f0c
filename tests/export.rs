//! The export folder is a Hugging Face BERT folder: pinned key set, HF metadata, config and
//! tokenizer files, and it loads into candle-transformers' BertModel with the same outputs.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kindling_core::Mode;
use kindling_models::{BertConfig, BertForMaskedLM, BertModel};

use crate::common::{kindling, python_reference, shared_tiny_run, stderr};

fn export_dir() -> std::path::PathBuf {
    shared_tiny_run().join("export")
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// HF `BertForMaskedLM.state_dict()` minus the decoder tied to the word embeddings, which HF's
/// `save_pretrained` omits too.
fn hf_bert_mlm_keys(layers: usize) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = [
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.LayerNorm.bias",
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for l in 0..layers {
        for m in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ] {
            for p in ["weight", "bias"] {
                keys.insert(format!("bert.encoder.layer.{l}.{m}.{p}"));
            }
        }
    }
    keys
}

#[test]
fn export_holds_exactly_the_hf_bert_for_masked_lm_keys_with_pt_metadata() {
    let dir = export_dir();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keys: BTreeSet<String> = st.names().into_iter().map(String::from).collect();
    assert_eq!(keys, hf_bert_mlm_keys(2));
    let md = meta.metadata().as_ref().expect("metadata present");
    assert_eq!(md.get("format").map(String::as_str), Some("pt"));
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    }
}

#[test]
fn export_config_and_tokenizer_files_are_what_transformers_reads() {
    let dir = export_dir();
    let c = config(&dir);
    assert_eq!(c["architectures"], serde_json::json!(["BertForMaskedLM"]));
    assert_eq!(c["model_type"], "bert");
    for field in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "max_position_embeddings",
        "type_vocab_size",
        "initializer_range",
        "layer_norm_eps",
        "pad_token_id",
        "position_embedding_type",
    ] {
        assert!(!c[field].is_null(), "config.json lacks {field}");
    }
    assert_eq!(c["hidden_size"], 64);
    let vocab = std::fs::read_to_string(dir.join("vocab.txt")).unwrap();
    assert_eq!(
        vocab.lines().count() as u64,
        c["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        vocab
            .lines()
            .nth(c["pad_token_id"].as_u64().unwrap() as usize),
        Some("[PAD]")
    );
    let tk = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let enc = tk.encode("Anne Elliot was persuaded.", true).unwrap();
    assert_eq!(enc.get_tokens().first().map(String::as_str), Some("[CLS]"));
    assert_eq!(enc.get_tokens().last().map(String::as_str), Some("[SEP]"));
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["tokenizer_class"], "BertTokenizer");
    assert_eq!(tc["do_lower_case"], true);
    assert_eq!(tc["mask_token"], "[MASK]");
    let sm: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("special_tokens_map.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sm["cls_token"], "[CLS]");
}

#[test]
fn model_card_has_front_matter_and_the_final_metrics() {
    let card = std::fs::read_to_string(export_dir().join("README.md")).unwrap();
    let front = card
        .strip_prefix("---\n")
        .expect("front matter")
        .split("\n---\n")
        .next()
        .unwrap();
    for line in [
        "license: \"apache-2.0\"",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "tags:",
        "datasets:",
    ] {
        assert!(
            front.contains(line),
            "front matter lacks `{line}`:\n{front}"
        );
    }
    assert!(
        card.contains("| loss |") && card.contains("unigram baseline"),
        "{card}"
    );
}

fn input_ids(vocab: u32) -> Tensor {
    let ids: Vec<u32> = (0..2 * 16).map(|i| 5 + (i * 37 % (vocab - 5))).collect();
    Tensor::from_vec(ids, (2, 16), &Device::Cpu).unwrap()
}

#[test]
fn export_loads_into_candle_transformers_bert_model_with_equal_hidden_states() {
    let dir = export_dir();
    let weights = dir.join("model.safetensors");
    let ours_cfg: BertConfig = serde_json::from_value(config(&dir)).unwrap();
    let theirs_cfg: candle_transformers::models::bert::Config =
        serde_json::from_value(config(&dir)).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu).unwrap()
    };
    let theirs =
        candle_transformers::models::bert::BertModel::load(vb.clone(), &theirs_cfg).unwrap();
    let ours = BertModel::load(vb.pp("bert"), &ours_cfg).unwrap();
    let ids = input_ids(ours_cfg.vocab_size as u32);
    let h_theirs = theirs
        .forward(&ids, &ids.zeros_like().unwrap(), None)
        .unwrap();
    let h_ours = ours
        .forward_t(&ids, None, None, Mode::Eval)
        .unwrap()
        .reshape(h_theirs.shape())
        .unwrap();
    let d = (h_theirs - h_ours)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "max |candle-transformers - kindling| = {d}");
}

#[test]
fn export_reproduces_the_logits_transformers_computes() {
    // Writes Kindling's eval-mode logits for a fixed input beside the export, then, when a
    // Python with torch + transformers is named in KINDLING_PYTHON (.ci/run sets it up), runs
    // tests/reference/hf_mlm_logits.py, which loads the folder with
    // BertForMaskedLM.from_pretrained and compares (missing/unexpected keys must be empty,
    // max |diff| <= 1e-4).
    let dir = export_dir();
    let cfg: BertConfig = serde_json::from_value(config(&dir)).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = BertForMaskedLM::load(vb, &cfg).unwrap();
    let ids = input_ids(cfg.vocab_size as u32);
    let logits = model.forward_t(&ids, None, None, Mode::Eval).unwrap(); // (32, vocab)
    let reference = serde_json::json!({
        "input_ids": ids.to_vec2::<u32>().unwrap(),
        "logits": logits.reshape((2, 16, cfg.vocab_size)).unwrap().to_vec3::<f32>().unwrap(),
    });
    let out = shared_tiny_run().join("kindling_logits.json");
    std::fs::write(&out, reference.to_string()).unwrap();
    let Some(text) = python_reference("hf_mlm_logits.py", &[dir.as_os_str(), out.as_os_str()])
    else {
        return;
    };
    assert!(text.contains("max_abs_diff"), "{text}");
}

#[test]
fn kindling_export_rewrites_the_same_weights_from_the_checkpoint() {
    // The rewrite is atomic (temporary file + rename), so tests reading the export meanwhile
    // see either the old or the new file, which must be byte-identical.
    let run = shared_tiny_run();
    let original = std::fs::read(run.join("export/model.safetensors")).unwrap();
    let out = kindling().arg("export").arg(run).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rewritten = std::fs::read(run.join("export/model.safetensors")).unwrap();
    assert_eq!(
        original, rewritten,
        "re-export from the final checkpoint is byte-identical"
    );
}

#[test]
fn mlm_loss_and_gradients_match_transformers() {
    // Loads the export into trainable variables, computes the masked-LM loss of a fixed batch
    // in eval mode and every parameter's gradient norm, and (with KINDLING_PYTHON) has
    // tests/reference/hf_mlm_grads.py compute the same with PyTorch + transformers.
    use kindling_train::Objective;
    let dir = export_dir();
    let cfg: BertConfig = serde_json::from_value(config(&dir)).unwrap();
    let obj = kindling_recipes::bert_mlm::BertMlm::new(cfg.clone(), 0, &Device::Cpu).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, var) in obj.varmap.data().lock().unwrap().iter() {
        var.set(&weights[name]).unwrap();
    }
    let (b, t) = (2usize, 16usize);
    let input_ids: Vec<u32> = (0..(b * t) as u32)
        .map(|i| 5 + (i * 37) % (cfg.vocab_size as u32 - 5))
        .collect();
    let positions: Vec<u32> = (0..(b * t) as u32).filter(|p| p % 4 == 1).collect();
    let labels: Vec<u32> = positions
        .iter()
        .map(|&p| 5 + (p * 131) % (cfg.vocab_size as u32 - 5))
        .collect();
    let batch = kindling_data::MlmBatch {
        batch_size: b,
        seq_len: t,
        input_ids: input_ids.clone(),
        positions: positions.clone(),
        labels: labels.clone(),
        cursor_after: Default::default(),
    };
    let out = obj.step(&batch, Mode::Eval).unwrap();
    let loss = out.loss.to_scalar::<f32>().unwrap();
    let grads = out.loss.backward().unwrap();
    let mut norms = serde_json::Map::new();
    for (name, var) in obj.varmap.data().lock().unwrap().iter() {
        let g = grads
            .get(var.as_tensor())
            .expect("every parameter has a gradient");
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        norms.insert(name.clone(), (n as f64).into());
    }
    let reference = serde_json::json!({
        "input_ids": input_ids.chunks(t).collect::<Vec<_>>(), "positions": positions, "labels": labels,
        "loss": loss, "grad_norms": norms,
    });
    let out_path = shared_tiny_run().join("kindling_grads.json");
    std::fs::write(&out_path, reference.to_string()).unwrap();
    python_reference("hf_mlm_grads.py", &[dir.as_os_str(), out_path.as_os_str()]);
}
