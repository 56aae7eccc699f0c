//! MLM throughput, printed as a table (run on a quiet machine):
//!
//!     cargo bench --bench mlm                 # all rows
//!     cargo bench --bench mlm -- masking      # rows whose name contains "masking"
//!
//! * masking: sequences/s of the dynamic masker, single-threaded and through the parallel loader
//!   (batches of 32 x 128, vocab 8192). Reference on this machine: HF
//!   DataCollatorForLanguageModeling masks about 8.5k sequences/s.
//! * step: one MLM training step (forward at masked positions, backward, AdamW) at batch 32 x 128,
//!   vocab 8192, for the tiny (h128 L2), mini (h256 L4) and small (h512 L4) shapes: tokens/s and
//!   achieved matmul GFLOP/s. benches/compare/run_step_compare.sh runs PyTorch + HF beside it.
//! * roberta, modernbert: the same step for recipes/roberta-mini-mlm.toml's and
//!   recipes/modernbert-mini-mlm.toml's models (hf_step_bench.py times transformers' same
//!   models, stock and with the head at the masked rows only).
//! * head: the small shape with no encoder layers (embeddings, MLM head, loss): the part of
//!   the step outside the layers.
//! * gemm: the matrix products of the small step's encoder layer (4096 tokens, h512, i2048) as
//!   the fused layer calls them (gemm crate, candle's thread count): GFLOP/s per shape, to hold
//!   against torch.mm on the same shapes (benches/compare/hf_step_bench.py --only gemm).
//! * optimizer: one update of every bert-mini parameter (the long recipe's model), AdamW against
//!   Muon (Newton-Schulz on the 25 hidden matrices, AdamW on the rest): what Muon adds to a step.

mod common;

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use kindling_core::Mode;
use kindling_data::{Cursor, MaskConfig, Masker, MlmBatch, MlmLoader, PackedBlocks, SpecialTokens};
use kindling_models::BertConfig;
use kindling_recipes::bert_mlm::BertMlm;
use kindling_train::{Objective, OptimizerKind};

const VOCAB: u32 = 8192;
const SEQ: usize = 128;
const BATCH: usize = 32;

fn specials() -> SpecialTokens {
    common::specials()
}

fn blocks(n: usize) -> PackedBlocks {
    common::synthetic_blocks(n, SEQ, VOCAB)
}

fn row(name: &str, value: f64, unit: &str, note: &str) {
    println!("| {name:<34} | {value:>12.1} | {unit:<10} | {note}");
}

fn bench_masking() {
    let b = Arc::new(blocks(20_000));
    let masker =
        Arc::new(Masker::new(MaskConfig::default(), &specials(), VOCAB as usize, 1).unwrap());
    // Five passes (epochs) over the 20k blocks: one pass takes ~15 ms, too short to time alone.
    const PASSES: usize = 5;
    let t = Instant::now();
    let mut n = 0;
    for epoch in 0..PASSES {
        for i in 0..b.len() {
            let (ids, flags) = b.block(i);
            std::hint::black_box(masker.mask(ids, flags, epoch as u64, i as u64));
            n += 1;
        }
    }
    row(
        "masking, 1 thread",
        n as f64 / t.elapsed().as_secs_f64(),
        "seq/s",
        "Masker::mask",
    );
    let loader = MlmLoader::new(b.clone(), masker.clone(), BATCH, 1, Cursor::default());
    let batches = PASSES * (b.len() / BATCH);
    let t = Instant::now();
    let got: usize = loader.take(batches).map(|x| x.batch_size).sum();
    row(
        "masking, loader (rayon)",
        got as f64 / t.elapsed().as_secs_f64(),
        "seq/s",
        &format!("{} threads", rayon::current_num_threads()),
    );
}

/// HF BertConfig of the given shape; `dropout` for both hidden and attention dropout.
fn config(h: usize, l: usize, a: usize, dropout: f64) -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": VOCAB, "hidden_size": h, "num_hidden_layers": l, "num_attention_heads": a,
        "intermediate_size": 4 * h, "max_position_embeddings": 512,
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
    }))
    .unwrap()
}

/// The mini shape of another architecture (`recipes/{roberta,modernbert}-mini-mlm.toml`'s):
/// RoBERTa h256 L4 A4 I1024 with dropout 0.1; ModernBERT h256 L4 A4 with a 384-wide GeGLU,
/// 128-token windows and no dropout, as those recipes build them.
fn architecture_config(arch: &str) -> kindling_models::EncoderConfig {
    let v = match arch {
        "roberta" => serde_json::json!({
            "model_type": "roberta", "vocab_size": VOCAB, "hidden_size": 256,
            "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
            "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
            "layer_norm_eps": 1e-5,
        }),
        _ => serde_json::json!({
            "model_type": "modernbert", "vocab_size": VOCAB, "hidden_size": 256,
            "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384,
            "max_position_embeddings": 512, "local_attention": 128, "pad_token_id": 0,
        }),
    };
    kindling_models::EncoderConfig::from_json(v).unwrap()
}

fn bench_step(name: &str, cfg: impl Into<kindling_models::EncoderConfig>, steps: usize) {
    let b = Arc::new(blocks(BATCH * (steps + 2)));
    let masker =
        Arc::new(Masker::new(MaskConfig::default(), &specials(), VOCAB as usize, 1).unwrap());
    let batches: Vec<MlmBatch> = MlmLoader::new(b, masker, BATCH, 1, Cursor::default())
        .take(steps + 2)
        .collect();
    let obj = BertMlm::new(cfg, 0, &Device::Cpu).unwrap();
    let mut opt = common::adamw(&obj);
    let mut times = Vec::new();
    let mut flops = 0.0;
    for (i, batch) in batches.iter().enumerate() {
        let t = Instant::now();
        let out = obj.step(batch, Mode::Train { seed: i as u64 }).unwrap();
        let grads = out.loss.backward().unwrap();
        opt.step(&grads, 1e-4).unwrap();
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
            flops = obj.train_flops(batch).unwrap();
        }
    }
    let median = median(times);
    row(
        &format!("step {name}"),
        (BATCH * SEQ) as f64 / median,
        "tok/s",
        &format!(
            "median {:.0} ms/step over {steps}; {:.1} GFLOP/s",
            median * 1e3,
            flops / median / 1e9
        ),
    );
}

/// The small step's encoder products (4096 tokens, hidden 512, FFN 2048): forward `x W^T`,
/// weight gradient `g^T x`, input gradient `g W`, each with the layout the fused layer gives gemm.
/// hf_step_bench.py times torch.mm on the same list.
const GEMM_SHAPES: &str = include_str!("compare/gemm_shapes.json");

#[derive(serde::Deserialize)]
struct GemmShape {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    /// The left operand is stored (k, m) and read transposed.
    lhs_transposed: bool,
    /// The right operand is stored (n, k) and read transposed.
    rhs_transposed: bool,
}

/// Median wall time of `reps` calls of `f`, in seconds.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

fn bench_gemm() {
    let threads = candle_core::utils::get_num_threads();
    let shapes: Vec<GemmShape> = serde_json::from_str(GEMM_SHAPES).unwrap();
    for GemmShape {
        name,
        m,
        n,
        k,
        lhs_transposed,
        rhs_transposed,
    } in shapes
    {
        let lhs: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut dst = vec![0f32; m * n];
        // (column stride, row stride) of each operand as stored.
        let (l_cs, l_rs) = if lhs_transposed { (m, 1) } else { (1, k) };
        let (r_cs, r_rs) = if rhs_transposed { (k, 1) } else { (1, n) };
        let median = median_secs(12, || {
            // SAFETY: the strides address (m, k), (k, n) and (m, n) within the vectors.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    lhs.as_ptr(),
                    l_cs as isize,
                    l_rs as isize,
                    rhs.as_ptr(),
                    r_cs as isize,
                    r_rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            }
        });
        row(
            &format!("gemm {name}"),
            2.0 * (m * n * k) as f64 / median / 1e9,
            "GFLOP/s",
            &format!("({m} x {k}) @ ({k} x {n}), median of 12, {threads} threads"),
        );
    }
}

fn bench_optimizer() {
    let b = Arc::new(blocks(BATCH));
    let masker =
        Arc::new(Masker::new(MaskConfig::default(), &specials(), VOCAB as usize, 1).unwrap());
    let batch = MlmLoader::new(b, masker, BATCH, 1, Cursor::default())
        .next()
        .unwrap();
    let obj = BertMlm::new(config(256, 4, 4, 0.0), 0, &Device::Cpu).unwrap();
    let grads = obj
        .step(&batch, Mode::Train { seed: 0 })
        .unwrap()
        .loss
        .backward()
        .unwrap();
    for (name, kind) in [
        ("adamw", OptimizerKind::AdamW),
        ("muon", OptimizerKind::Muon),
    ] {
        let mut opt = common::optimizer(&obj, kind);
        let median = median_secs(12, || opt.step(&grads, 1e-4).unwrap());
        row(
            &format!("optimizer {name} mini"),
            median * 1e3,
            "ms/update",
            "median of 12 updates of all 5.5M parameters",
        );
    }
}

fn main() {
    kindling_core::keep_freed_memory();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    println!("| bench                              |        value | unit       | note");
    println!("|------------------------------------|--------------|------------|-----");
    if wanted("masking") {
        bench_masking();
    }
    // Dropout 0.1 is HF's default (and what the PyTorch figures use); "p0" rows have none.
    if wanted("tiny") || wanted("step") {
        bench_step("tiny h128 L2", config(128, 2, 2, 0.1), 10);
    }
    if wanted("mini") || wanted("step") {
        bench_step("mini h256 L4", config(256, 4, 4, 0.1), 8);
        bench_step("mini h256 L4 p0", config(256, 4, 4, 0.0), 8);
    }
    if wanted("small") || wanted("step") {
        bench_step("small h512 L4", config(512, 4, 8, 0.1), 4);
    }
    if wanted("roberta") || wanted("step") {
        bench_step("roberta-mini h256 L4", architecture_config("roberta"), 8);
    }
    if wanted("modernbert") || wanted("step") {
        bench_step(
            "modernbert-mini h256 L4",
            architecture_config("modernbert"),
            8,
        );
    }
    if wanted("head") {
        // No encoder layers: the embeddings, the MLM head and the loss of the small shape,
        // forward and backward (what the step spends outside its encoder layers).
        bench_step("head small h512 L0", config(512, 0, 8, 0.1), 20);
    }
    if wanted("gemm") {
        bench_gemm();
    }
    if wanted("optimizer") {
        bench_optimizer();
    }
}
