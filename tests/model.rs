//! The BERT encoder trains: every parameter gets a gradient, dropout follows the mode.

use candle_core::{Device, Tensor};
use kindling_core::Mode;
use kindling_data::MlmBatch;
use kindling_models::BertConfig;
use kindling_recipes::bert_mlm::BertMlm;
use kindling_train::Objective;

pub fn tiny_config(vocab: usize) -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64,
    }))
    .unwrap()
}

pub fn tiny_batch(vocab: u32) -> MlmBatch {
    let (b, t) = (3usize, 16usize);
    let input_ids: Vec<u32> = (0..(b * t) as u32)
        .map(|i| 5 + (i * 7919) % (vocab - 5))
        .collect();
    let positions: Vec<u32> = (0..(b * t) as u32).filter(|p| p % 5 == 1).collect();
    let labels = positions
        .iter()
        .map(|&p| 5 + (p * 31) % (vocab - 5))
        .collect();
    MlmBatch {
        batch_size: b,
        seq_len: t,
        input_ids,
        positions,
        labels,
        cursor_after: Default::default(),
    }
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    // candle_nn's fused LayerNorm/softmax would leave all but the head without gradients.
    let obj = BertMlm::new(tiny_config(50), 0, &Device::Cpu).unwrap();
    let out = obj.step(&tiny_batch(50), Mode::Train { seed: 1 }).unwrap();
    let grads = out.loss.backward().unwrap();
    let data = obj.varmap.data().lock().unwrap();
    assert_eq!(
        data.len(),
        5 + 16 * 2 + 5,
        "embeddings 5, 16 per layer, head 5"
    );
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        let nonzero = grads
            .get(var.as_tensor())
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
            .unwrap_or(false);
        if !nonzero {
            missing.push(name.clone());
        }
    }
    // The position rows past seq 16 and unused vocabulary rows get zero gradient rows, but each
    // tensor as a whole must be reached.
    assert!(
        missing.is_empty(),
        "parameters without gradient: {missing:?}"
    );
}

#[test]
fn initialisation_is_fixed_by_the_seed() {
    let a = BertMlm::new(tiny_config(50), 3, &Device::Cpu).unwrap();
    let b = BertMlm::new(tiny_config(50), 3, &Device::Cpu).unwrap();
    let c = BertMlm::new(tiny_config(50), 4, &Device::Cpu).unwrap();
    let batch = tiny_batch(50);
    let la = a.logits(&batch, Mode::Eval).unwrap();
    let lb = b.logits(&batch, Mode::Eval).unwrap();
    let lc = c.logits(&batch, Mode::Eval).unwrap();
    let diff = |x: &Tensor, y: &Tensor| {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(diff(&la, &lb), 0.0);
    assert!(diff(&la, &lc) > 1e-3);
    // HF init: LayerNorm 1/0, biases 0, weights with std 0.02.
    let data = a.varmap.data().lock().unwrap();
    let w = data["bert.encoder.layer.0.attention.self.query.weight"].as_tensor();
    let std = w
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
    let ln = data["bert.embeddings.LayerNorm.weight"].as_tensor();
    assert_eq!(ln.min_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
    let pad_row = data["bert.embeddings.word_embeddings.weight"]
        .as_tensor()
        .get(0)
        .unwrap();
    assert_eq!(
        pad_row
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn dropout_is_active_in_training_only_and_follows_its_seed() {
    let obj = BertMlm::new(tiny_config(50), 0, &Device::Cpu).unwrap();
    let batch = tiny_batch(50);
    let logits = |m| {
        obj.logits(&batch, m)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(logits(Mode::Eval), logits(Mode::Eval));
    assert_eq!(
        logits(Mode::Train { seed: 5 }),
        logits(Mode::Train { seed: 5 })
    );
    assert_ne!(
        logits(Mode::Train { seed: 5 }),
        logits(Mode::Train { seed: 6 })
    );
    assert_ne!(logits(Mode::Train { seed: 5 }), logits(Mode::Eval));
}

#[test]
fn masked_position_logits_equal_the_full_sequence_logits_at_those_positions() {
    let obj = BertMlm::new(tiny_config(50), 2, &Device::Cpu).unwrap();
    let batch = tiny_batch(50);
    let ids = Tensor::from_slice(
        &batch.input_ids,
        (batch.batch_size, batch.seq_len),
        &Device::Cpu,
    )
    .unwrap();
    let full = obj.model.forward_t(&ids, None, None, Mode::Eval).unwrap(); // (b*t, vocab)
    let pos = Tensor::from_slice(&batch.positions, batch.positions.len(), &Device::Cpu).unwrap();
    let gathered = full.index_select(&pos, 0).unwrap();
    let sparse = obj.logits(&batch, Mode::Eval).unwrap();
    let d = (gathered - sparse)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "max diff {d}");
}
