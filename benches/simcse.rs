//! Peak memory and time of one SimCSE training step, with and without GradCache.
//!
//! `cargo bench --bench simcse [-- BATCH...]` (default: 64 and 512). Each configuration runs in
//! a child process (peak RSS is a per-process high-water mark, read from /proc/self/status), on a
//! randomly initialised bert-mini encoder (h256, 4 layers, vocab 8192) and sentences of 32
//! tokens, mean pooling, dropout 0.1: one forward and backward of the in-batch loss over
//! 2 x BATCH views. Prints a table.

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use kindling_core::Mode;
use kindling_data::Cursor;
use kindling_models::bert::{BertConfig, BertModel, Pooling};
use kindling_models::init::hf_init;
use kindling_recipes::simcse::{Example, Simcse, SimcseBatch};
use kindling_train::Objective;

const SEQ: usize = 32;
const CHUNK: usize = 64;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One step in this process; prints `peak_mib before_mib secs loss`.
fn child(batch: usize, cache: bool) {
    let config: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 8192, "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 1024
    }))
    .unwrap();
    let varmap = VarMap::new();
    let model = BertModel::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &config,
    )
    .unwrap();
    hf_init(&varmap, 1, 0.02, Some(0)).unwrap();
    let mut obj = Simcse::new(model, varmap, Pooling::Mean, 0.05, 0);
    obj.grad_cache.enabled = cache;
    obj.grad_cache.chunk_size = CHUNK;
    let examples: Vec<Example> = (0..batch as u32)
        .map(|i| {
            let ids: Vec<u32> = (0..SEQ as u32)
                .map(|k| 5 + (i * 131 + k * 17) % 8000)
                .collect();
            Example {
                anchor: ids.clone(),
                positive: ids,
                negative: None,
                keys: [i as u64, i as u64, 0],
            }
        })
        .collect();
    let b = SimcseBatch::from_examples(&examples.iter().collect::<Vec<_>>(), Cursor::default());
    let before = peak_rss_mib();
    let t = Instant::now();
    let mode = Mode::Train { seed: 1 };
    let loss = match obj.step_with_grads(&b, mode).unwrap() {
        Some((out, _grads)) => out.loss,
        None => {
            let out = obj.step(&b, mode).unwrap();
            let _grads = out.loss.backward().unwrap();
            out.loss
        }
    };
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:.1} {:.1} {:.2} {:.4}",
        peak_rss_mib(),
        before,
        secs,
        loss.to_scalar::<f32>().unwrap()
    );
}

fn main() {
    if let Ok(spec) = std::env::var("KINDLING_SIMCSE_BENCH_CHILD") {
        let (batch, cache) = spec.split_once(',').unwrap();
        child(batch.parse().unwrap(), cache == "cache");
        return;
    }
    let batches: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let batches = if batches.is_empty() {
        vec![64, 512]
    } else {
        batches
    };
    println!(
        "SimCSE step, bert-mini (h256 L4, vocab 8192), {SEQ}-token sentences, 2 views, GradCache chunk {CHUNK}"
    );
    println!(
        "{:>6} {:>10} {:>14} {:>16} {:>9} {:>9}",
        "batch", "GradCache", "peak RSS MiB", "model+data MiB", "step s", "loss"
    );
    let exe = std::env::current_exe().unwrap();
    for &batch in &batches {
        for cache in [false, true] {
            let out = Command::new(&exe)
                .env(
                    "KINDLING_SIMCSE_BENCH_CHILD",
                    format!("{batch},{}", if cache { "cache" } else { "plain" }),
                )
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let f: Vec<&str> = text.split_whitespace().collect();
            if !out.status.success() || f.len() < 4 {
                println!(
                    "{batch:>6} {:>10} failed: {}",
                    cache,
                    String::from_utf8_lossy(&out.stderr)
                );
                continue;
            }
            println!(
                "{batch:>6} {:>10} {:>14} {:>16} {:>9} {:>9}",
                if cache { "on" } else { "off" },
                f[0],
                f[1],
                f[2],
                f[3]
            );
        }
    }
}
