//! Where a GPU training step's time goes, printed as a table: the BERT-base MLM step (h768,
//! 12 layers, batch 128 x 128, vocab 30522, dropout 0.1) split into forward, backward, gradient
//! norm and AdamW, then the step's main ops alone (forward + backward), each timed between
//! device synchronisations. Needs a `--features cuda` build and a GPU:
//!
//!     cargo bench --features cuda --bench gpu             # bf16 mixed precision
//!     cargo bench --features cuda --bench gpu -- f32      # f32
//!
//! Without a GPU it runs the same code on the CPU at a small shape (a check that it runs), in
//! f32, or with `-- bf16` in bf16 mixed precision (the GPU's paths on candle's CPU ops).
//! `-- composed` times every op as candle's composition instead (`Kernels::Composed`, see
//! `kindling_models::ops`), to compare; `-- check` compares the two paths' values; `-- kernels`
//! (CUDA builds) checks every CUDA kernel against candle's composed ops (`gpu_checks/`), then
//! trains 20 steps on each kernel path and compares the losses, and exits 1 on a failure.

mod common;
mod gpu_checks;

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use kindling_core::Mode;
use kindling_data::{Cursor, MaskConfig, Masker, MlmBatch, MlmLoader};
use kindling_models::ops::{self, Kernels};
use kindling_models::BertConfig;
use kindling_recipes::bert_mlm::BertMlm;
use kindling_train::optim::grad_norm;
use kindling_train::Objective;

struct Shape {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    batch: usize,
    seq: usize,
}

/// Starts (`on`) or stops the CUDA profiler's capture when `active`.
fn profiler(active: bool, on: bool) {
    #[cfg(feature = "cuda")]
    if active {
        use candle_core::cuda_backend::cudarc::driver::sys;
        unsafe {
            if on {
                sys::cuProfilerStart();
            } else {
                sys::cuProfilerStop();
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (active, on);
}

/// Milliseconds per call of `f`, after two warm-up calls, between device synchronisations.
fn time(dev: &Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    dev.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    dev.synchronize().unwrap();
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn row(name: &str, ms: f64, note: &str) {
    println!("| {name:<44} | {ms:>9.2} | {note}");
}

/// Forward + backward of `f` on a variable of `shape` in `dtype` against a fixed random cotangent.
fn fwd_bwd(
    dev: &Device,
    dtype: DType,
    shape: &[usize],
    f: impl Fn(&Tensor) -> Tensor,
) -> (f64, f64) {
    let x = Var::from_tensor(
        &Tensor::randn(0f32, 1.0, shape, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let y0 = f(x.as_tensor());
    let r = Tensor::randn(0f32, 1.0, y0.shape(), dev)
        .unwrap()
        .to_dtype(y0.dtype())
        .unwrap();
    let fwd = time(dev, 10, || {
        f(x.as_tensor());
    });
    let both = time(dev, 10, || {
        let y = f(x.as_tensor());
        (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    });
    (fwd, both)
}

fn main() {
    let f32_only = std::env::args().skip(1).any(|a| a == "f32");
    let bf16 = std::env::args().skip(1).any(|a| a == "bf16");
    let kernels = if std::env::args().skip(1).any(|a| a == "composed") {
        Kernels::Composed
    } else {
        Kernels::Fused
    };
    let dev = Device::cuda_if_available(0).unwrap();
    let gpu = !dev.is_cpu();
    let s = if gpu {
        Shape {
            vocab: 30522,
            hidden: 768,
            layers: 12,
            heads: 12,
            batch: 128,
            seq: 128,
        }
    } else {
        Shape {
            vocab: 2000,
            hidden: 64,
            layers: 2,
            heads: 2,
            batch: 4,
            seq: 32,
        }
    };
    let dtype = if f32_only || (!gpu && !bf16) {
        DType::F32
    } else {
        DType::BF16
    };
    if gpu {
        dev.set_seed(1).unwrap();
    }
    println!(
        "device {dev:?}, {dtype:?}, {kernels:?} kernels; h{} L{} A{}, batch {} x {}, vocab {}",
        s.hidden, s.layers, s.heads, s.batch, s.seq, s.vocab
    );
    println!("| what                                         |   ms/call | note");
    println!("|----------------------------------------------|-----------|-----");

    let mut cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": s.vocab, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "intermediate_size": 4 * s.hidden,
        "max_position_embeddings": 512,
    }))
    .unwrap();
    cfg.kernels = kernels;
    let masker = std::sync::Arc::new(
        Masker::new(MaskConfig::default(), &common::specials(), s.vocab, 1).unwrap(),
    );
    let batches: Vec<MlmBatch> = MlmLoader::new(
        std::sync::Arc::new(common::synthetic_blocks(s.batch * 4, s.seq, s.vocab as u32)),
        masker,
        s.batch,
        1,
        Cursor::default(),
    )
    .take(4)
    .collect();
    let batch = &batches[0];
    let mut obj = BertMlm::new(cfg.clone(), 0, &dev).unwrap();
    obj.model
        .set_compute_dtype((dtype != DType::F32).then_some(dtype));
    let mut opt = common::adamw(&obj);
    let vars = obj.varmap.all_vars();
    let mode = Mode::Train { seed: 3 };
    let flops = obj.train_flops(batch).unwrap();

    // The same model (seed 0) on kernel path `k`, in the run's precision.
    let model_on = |k: Kernels| {
        let mut c = cfg.clone();
        c.kernels = k;
        let mut o = BertMlm::new(c, 0, &dev).unwrap();
        o.model
            .set_compute_dtype((dtype != DType::F32).then_some(dtype));
        o
    };
    if std::env::args().skip(1).any(|a| a == "check") {
        // The device paths against candle's compositions on this device, forward and backward.
        let rel = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let s = b.abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap()
        };
        let both = |x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor| {
            let v = Var::from_tensor(x).unwrap();
            let y = f(v.as_tensor());
            // A fixed cotangent: 1, -1, 2, -2, ... cycling over the elements.
            let n = y.elem_count();
            let r: Vec<f32> = (0..n).map(|i| [1.0, -1.0, 2.0, -2.0, 0.5][i % 5]).collect();
            let r = Tensor::from_vec(r, y.shape(), &dev).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(v.as_tensor()).unwrap().clone())
        };
        let x = Tensor::randn(0f32, 1.0, (512, 256), &dev)
            .unwrap()
            .affine(0.5, 2.0)
            .unwrap();
        let (w, b) = (
            Tensor::ones(256, DType::F32, &dev).unwrap(),
            Tensor::zeros(256, DType::F32, &dev).unwrap(),
        );
        let a = both(&x, &|t| ops::layer_norm(t, &w, &b, 1e-12).unwrap());
        let c = both(&x, &|t| {
            candle_nn::ops::layer_norm_slow(t, &w, &b, 1e-12).unwrap()
        });
        println!(
            "layer_norm: y {:.2e}, dx {:.2e}",
            rel(&a.0, &c.0),
            rel(&a.1, &c.1)
        );
        let x = (Tensor::randn(0f32, 1.0, (512, 128), &dev).unwrap() * 4.0).unwrap();
        let a = both(&x, &|t| ops::softmax_last_dim(t).unwrap());
        let c = both(&x, &|t| {
            candle_nn::ops::softmax(t, candle_core::D::Minus1).unwrap()
        });
        println!(
            "softmax: y {:.2e}, dx {:.2e}",
            rel(&a.0, &c.0),
            rel(&a.1, &c.1)
        );
        let x = Tensor::randn(0f32, 1.0, (800, 8192), &dev).unwrap();
        let labels = Tensor::arange(0u32, 800, &dev).unwrap();
        let a = both(&x, &|t| ops::cross_entropy(t, &labels).unwrap());
        let c = both(&x, &|t| candle_nn::loss::cross_entropy(t, &labels).unwrap());
        println!(
            "cross_entropy: loss {:.2e}, dx {:.2e}",
            rel(&a.0, &c.0),
            rel(&a.1, &c.1)
        );
        // The encoder's two kernel paths from the same initialisation: the same loss and
        // gradient norm, to rounding.
        for k in [Kernels::Fused, Kernels::Composed] {
            let o = model_on(k);
            let out = o.step(batch, Mode::Eval).unwrap();
            let grads = out.loss.backward().unwrap();
            println!(
                "model loss at init, eval mode, {k:?}: {:.7}, gradient norm {:.7}",
                out.loss.to_scalar::<f32>().unwrap(),
                grad_norm(&grads, &o.varmap.all_vars()).unwrap()
            );
        }
        return;
    }
    if std::env::args().skip(1).any(|a| a == "kernels") {
        let mut failed = gpu_checks::run(&dev);
        // 20 training steps (dropout on, AdamW) from one initialisation on each kernel path:
        // the dropout masks are the same draws on both (the CPU's stream), so the losses agree
        // to rounding.
        let mut last = Vec::new();
        for k in [Kernels::Fused, Kernels::Composed] {
            let o = model_on(k);
            let mut opt = common::adamw(&o);
            let t = Instant::now();
            let mut losses = Vec::new();
            for i in 0..20 {
                let out = o
                    .step(&batches[i % batches.len()], Mode::Train { seed: i as u64 })
                    .unwrap();
                let g = out.loss.backward().unwrap();
                opt.step(&g, 1e-4).unwrap();
                losses.push(
                    out.loss
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                );
            }
            println!(
                "{k:?} path: losses at steps 1, 10, 20: {:.5} {:.5} {:.5} ({:.0} ms/step)",
                losses[0],
                losses[9],
                losses[19],
                t.elapsed().as_secs_f64() * 1e3 / 20.0
            );
            last.push(losses[19]);
        }
        let diff = (last[0] - last[1]).abs();
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-3 };
        let ok = diff <= tol;
        println!(
            "loss after 20 steps, fused - composed: {diff:.2e} (tolerance {tol:.0e}) {}",
            if ok { "ok" } else { "FAIL" }
        );
        failed += usize::from(!ok);
        std::process::exit(i32::from(failed > 0));
    }
    if std::env::args().skip(1).any(|a| a == "profile") {
        // One step between cuProfilerStart/Stop, after two warm-up steps:
        // `ncu --profile-from-start off --metrics gpu__time_duration.sum ... gpu profile`.
        for i in 0..3 {
            dev.synchronize().unwrap();
            profiler(i == 2, true);
            let out = obj.step(batch, mode).unwrap();
            let g = out.loss.backward().unwrap();
            grad_norm(&g, &vars).unwrap();
            opt.step(&g, 1e-4).unwrap();
            dev.synchronize().unwrap();
            profiler(i == 2, false);
        }
        return;
    }
    let step = time(&dev, 5, || {
        let out = obj.step(batch, mode).unwrap();
        let g = out.loss.backward().unwrap();
        let n = grad_norm(&g, &vars).unwrap();
        assert!(n.is_finite());
        opt.step(&g, 1e-4).unwrap();
    });
    let tokens = (s.batch * s.seq) as f64;
    row(
        "whole step (fwd, bwd, grad norm, AdamW)",
        step,
        &format!(
            "{:.0} tok/s, {:.1} TFLOP/s, MFU {:.1}% of 990",
            tokens / step * 1e3,
            flops / step / 1e9,
            flops / step / 1e9 / 990.0 * 100.0
        ),
    );
    let fwd = time(&dev, 5, || {
        obj.step(batch, mode).unwrap();
    });
    row("forward + loss", fwd, "");
    let out = obj.step(batch, mode).unwrap();
    let t = Instant::now();
    let grads = out.loss.backward().unwrap();
    let queued = t.elapsed().as_secs_f64() * 1e3;
    dev.synchronize().unwrap();
    row(
        "backward (one call)",
        t.elapsed().as_secs_f64() * 1e3,
        &format!("host returned after {queued:.1} ms"),
    );
    row(
        "gradient norm",
        time(&dev, 5, || {
            grad_norm(&grads, &vars).unwrap();
        }),
        &format!("{} tensors", vars.len()),
    );
    row(
        "AdamW",
        time(&dev, 5, || opt.step(&grads, 1e-4).unwrap()),
        "",
    );

    let (n, h, i) = (s.batch * s.seq, s.hidden, 4 * s.hidden);
    let w = Tensor::randn(0f32, 0.02, (i, h), &dev).unwrap();
    let b = Tensor::zeros(i, DType::F32, &dev).unwrap();
    let (f, fb) = fwd_bwd(&dev, dtype, &[n, h], |x| kernels.linear(x, &w, &b).unwrap());
    row(
        &format!("linear {n}x{h} -> {i} (fwd)"),
        f,
        &format!("{:.0} TFLOP/s", 2.0 * (n * h * i) as f64 / f / 1e9),
    );
    row(
        "  fwd + bwd",
        fb,
        &format!("{:.0} TFLOP/s", 6.0 * (n * h * i) as f64 / fb / 1e9),
    );
    let (wl, bl) = (
        Tensor::ones(h, DType::F32, &dev).unwrap(),
        Tensor::zeros(h, DType::F32, &dev).unwrap(),
    );
    let (f, fb) = fwd_bwd(&dev, dtype, &[n, h], |x| {
        kernels.layer_norm(x, &wl, &bl, 1e-12).unwrap()
    });
    row(
        &format!("layer_norm {n}x{h} (fwd | fwd+bwd)"),
        f,
        &format!("{fb:.2} ms fwd+bwd"),
    );
    let (f, fb) = fwd_bwd(&dev, dtype, &[n, i], |x| kernels.gelu_erf(x).unwrap());
    row(
        &format!("gelu {n}x{i} (fwd | fwd+bwd)"),
        f,
        &format!("{fb:.2} ms fwd+bwd"),
    );
    let (f, fb) = fwd_bwd(&dev, dtype, &[n, h], |x| {
        kernels.seeded_dropout(x, 0.1, 5).unwrap()
    });
    row(
        &format!("dropout {n}x{h} (fwd | fwd+bwd)"),
        f,
        &format!("{fb:.2} ms fwd+bwd"),
    );
    let mask = Tensor::zeros((s.batch, s.seq), DType::F32, &dev).unwrap();
    let (f, fb) = fwd_bwd(&dev, dtype, &[s.batch, s.heads, s.seq, s.seq], |x| {
        kernels
            .attention_probs(x, &mask, 0.125, Some((0.1, 7)))
            .unwrap()
    });
    row(
        "attention probs (softmax, mask, dropout)",
        f,
        &format!("{fb:.2} ms fwd+bwd"),
    );
    let (f, fb) = fwd_bwd(&dev, dtype, &[n, 3 * h], |x| {
        let q = x.narrow(1, 0, h).unwrap();
        let k = x.narrow(1, h, h).unwrap();
        let v = x.narrow(1, 2 * h, h).unwrap();
        let dims = (s.batch, s.seq, s.heads);
        kernels
            .self_attention_windowed(&q, &k, &v, dims, &mask, None, Some((0.1, 7)))
            .unwrap()
    });
    row(
        "self-attention (whole, from q k v)",
        f,
        &format!("{fb:.2} ms fwd+bwd"),
    );
    let table = Var::from_tensor(&Tensor::randn(0f32, 0.02, (s.vocab, h), &dev).unwrap()).unwrap();
    let ids = Tensor::from_slice(&batch.input_ids, batch.input_ids.len(), &dev).unwrap();
    let r = Tensor::randn(0f32, 1.0, (n, h), &dev).unwrap();
    let emb = time(&dev, 5, || {
        let y = kernels.embedding(table.as_tensor(), &ids).unwrap();
        (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    });
    row(
        &format!("embedding lookup {n} ids, fwd + bwd"),
        emb,
        if kernels == Kernels::Fused && gpu {
            "grouped-sum kernel backward"
        } else {
            "index_add backward"
        },
    );
    let m = batch.labels.len();
    let labels = Tensor::from_slice(&batch.labels, m, &dev).unwrap();
    let (f, fb) = fwd_bwd(&dev, dtype, &[m, s.vocab], |x| {
        ops::cross_entropy(x, &labels).unwrap()
    });
    row(
        &format!("cross-entropy {m}x{} (fwd | fwd+bwd)", s.vocab),
        f,
        &format!("{fb:.2} ms fwd+bwd"),
    );
    if gpu && kernels == Kernels::Fused {
        kernel_rows(&dev, dtype, &s);
    }
}

/// The CUDA layer's kernels alone (kindling-kernels' calls, no graph) at the step's shapes,
/// each with the bytes it moves and the bandwidth that implies.
fn kernel_rows(dev: &Device, dtype: DType, s: &Shape) {
    use kindling_kernels as k;
    let (n, h, i) = (s.batch * s.seq, s.hidden, 4 * s.hidden);
    let bytes = |elems: usize| (elems * dtype.size_in_bytes()) as f64;
    let bw = |b: f64, ms: f64| format!("{:.0} GB/s", b / ms / 1e6);
    let t = |x: &[usize]| {
        Tensor::randn(0f32, 1.0, x, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let d = Some(k::Dropout { p: 0.1, seed: 3 });
    let (z, r) = (t(&[n, h]), t(&[n, h]));
    let (g, b) = (t(&[h]), t(&[h]));
    let ms = time(dev, 10, || {
        k::add_layer_norm(&z, Some(&b), Some(&r), &g, &b, 1e-12, d, None).unwrap();
    });
    row(
        "kernel add_ln_fwd (bias, dropout, residual)",
        ms,
        &bw(bytes(4 * n * h), ms),
    );
    let (_, saved) = k::add_layer_norm(&z, Some(&b), Some(&r), &g, &b, 1e-12, d, None).unwrap();
    let ms = time(dev, 10, || {
        k::add_layer_norm_backward(&z, Some(&r), &saved, &g, d).unwrap();
    });
    row(
        "kernel add_ln_bwd (+ column sums)",
        ms,
        &bw(bytes(5 * n * h), ms),
    );
    let (zi, bi) = (t(&[n, i]), t(&[i]));
    let ms = time(dev, 10, || {
        k::bias_gelu(&zi, &bi).unwrap();
    });
    row("kernel bias_gelu_fwd", ms, &bw(bytes(3 * n * i), ms));
    let (pre, _) = k::bias_gelu(&zi, &bi).unwrap();
    let ms = time(dev, 10, || {
        k::gelu_backward(&zi, &pre).unwrap();
    });
    row("kernel gelu_bwd", ms, &bw(bytes(3 * n * i), ms));
    let scores = t(&[s.batch, s.heads, s.seq, s.seq]);
    let mask = Tensor::zeros((s.batch, s.seq), DType::F32, dev).unwrap();
    let ms = time(dev, 10, || {
        k::attention_probs(&scores, &mask, 0.125, d).unwrap();
    });
    let ne = scores.elem_count();
    row(
        "kernel attn_probs_fwd (mask, softmax, dropout)",
        ms,
        &bw(bytes(3 * ne), ms),
    );
    let (probs, _) = k::attention_probs(&scores, &mask, 0.125, d).unwrap();
    let ms = time(dev, 10, || {
        k::attention_probs_backward(&scores, &probs, 0.125, d).unwrap();
    });
    row("kernel attn_probs_bwd", ms, &bw(bytes(3 * ne), ms));
    let zq = t(&[n, 3 * h]);
    let bq = t(&[3 * h]);
    let ms = time(dev, 10, || {
        k::qkv_split(&zq, &bq, (s.batch, s.seq, s.heads), None).unwrap();
    });
    row("kernel qkv_split", ms, &bw(bytes(6 * n * h), ms));
}
