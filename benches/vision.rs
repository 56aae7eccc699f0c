//! Vision SSL throughput, printed as a table (run on a quiet machine):
//!
//!     cargo bench --bench vision                # all rows
//!     cargo bench --bench vision -- simclr      # rows whose name contains "simclr"
//!
//! * views: augmented pairs/s of the two-view pipeline of recipes/simclr-fashion-mnist.toml
//!   (random resized crop, flip, jitter, blur, normalise; rayon over images).
//! * step: one training step (both views forward, NT-Xent / BYOL loss, backward, LARS update)
//!   on 256 source images of 28x28 (512 views), from pre-built batches, so augmentation is not
//!   timed: source images/s and achieved GFLOP/s. Reference, same machine:
//!   `benches/compare/simclr_reference.py --bench` (the same model in PyTorch).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use kindling_core::Mode;
use kindling_data::{ImageSet, ViewBatch, ViewLoader};
use kindling_recipes::recipe::parse_toml;
use kindling_recipes::vision::{SslModel, VisionRecipe};
use kindling_train::{Objective, Trainer};

fn recipe(name: &str) -> VisionRecipe {
    let path = format!("recipes/{name}-fashion-mnist.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    parse_toml(&text, Path::new(&path), &[]).unwrap()
}

fn images(n: usize) -> Arc<ImageSet> {
    let mut x = 88172645463325252u64;
    let pixels = (0..n * 28 * 28)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 256) as u8
        })
        .collect();
    Arc::new(ImageSet::in_memory(
        (28, 28, 1),
        pixels,
        Some((0..n as u32).map(|i| i % 10).collect()),
        vec![],
    ))
}

fn row(name: &str, value: f64, unit: &str, note: &str) {
    println!("| {name:<34} | {value:>12.1} | {unit:<10} | {note}");
}

fn bench_views() {
    let r = recipe("simclr");
    let set = images(2560);
    let loader = ViewLoader::new(set, vec![r.data.views[0].clone(); 2], 256, 1).unwrap();
    let t = Instant::now();
    let n: usize = loader.take(10).map(|b| b.n).sum();
    row(
        "views simclr pipeline",
        n as f64 / t.elapsed().as_secs_f64(),
        "pairs/s",
        "two 28x28 views per image, 10 batches of 256",
    );
}

fn bench_step(name: &str, steps: usize) {
    let r = recipe(name);
    let batches: Vec<ViewBatch> = ViewLoader::new(images(256 * (steps + 2)), r.pipelines(), 256, 1)
        .unwrap()
        .take(steps + 2)
        .collect();
    let model = SslModel::build(&r, (28, 28, 1), 10, &Device::Cpu).unwrap();
    let cfg = r.header.train.train_config(r.header.seed, 1).unwrap();
    let trainer = Trainer::new(cfg.clone(), Path::new("."));
    let mut opt = trainer.optimizer(&model).unwrap();
    let mut times = Vec::new();
    let mut flops = 0.0;
    for (i, b) in batches.iter().enumerate() {
        let t = Instant::now();
        let out = model.step(b, Mode::Train { seed: i as u64 }).unwrap();
        let grads = out.loss.backward().unwrap();
        opt.step(&grads, cfg.optimizer.lr).unwrap();
        model.after_update(i as u64 + 1, 1000).unwrap();
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
            flops = model.train_flops(b).unwrap();
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    row(
        &format!("step {name} 2x256 28x28"),
        256.0 / median,
        "images/s",
        &format!(
            "median {:.0} ms/step over {steps}; {:.1} GFLOP/s",
            median * 1e3,
            flops / median / 1e9
        ),
    );
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
    if wanted("views") {
        bench_views();
    }
    for m in ["simclr", "byol"] {
        if wanted(m) || wanted("step") {
            bench_step(m, 8);
        }
    }
}
