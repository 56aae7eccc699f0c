//! `cargo bench --features cuda --bench gpu -- kernels`: every kernel of `kindling-kernels`
//! against candle's composed ops on the GPU, forward and gradients, in f32 (to 1e-5 of the
//! reference's largest value) and in bf16 (inputs rounded to bf16 once, the reference in f32 from
//! those inputs; to the tolerance the row gives), then the encoder's two kernel paths over 20
//! training steps. Prints one row per comparison and returns how many failed. On the CPU it runs
//! at small shapes against the kernels' emulation (`kindling-kernels`' `emulate` backend):
//! tests/gpu_kernels.rs, so this check itself is tested before a GPU runs it.

use candle_core::{DType, Device, Tensor, Var, D};
use kindling_kernels::{self as k, Dropout};
use kindling_models::ops::keep_at;

/// max |a - b| / max |b|, in f32.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d.to_scalar::<f32>().unwrap() / s.max(1e-30)
}

struct Report {
    failed: usize,
}

impl Report {
    fn row(&mut self, what: &str, dtype: DType, got: &Tensor, want: &Tensor) {
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        let e = rel(got, want);
        let ok = e <= tol;
        if !ok {
            self.failed += 1;
        }
        println!(
            "| {what:<36} | {:<4} | {e:>9.2e} | {tol:.0e} | {}",
            format!("{dtype:?}").to_lowercase(),
            if ok { "ok" } else { "FAIL" }
        );
    }
}

fn randn(shape: &[usize], scale: f64, dev: &Device) -> Tensor {
    (Tensor::randn(0f32, 1.0, shape, dev).unwrap() * scale).unwrap()
}

/// `x` rounded to `dtype`, and that value again in f32 (the reference's input).
fn held(x: &Tensor, dtype: DType) -> (Tensor, Tensor) {
    let t = x.to_dtype(dtype).unwrap();
    let f = t.to_dtype(DType::F32).unwrap();
    (t, f)
}

/// y and the gradients of sum(y * r) with respect to `inputs`, from candle's ops in f32.
fn reference(
    inputs: &[&Tensor],
    r: &Tensor,
    f: impl Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
    (y, grads)
}

/// The composed dropout: a product with the CPU's mask.
fn cpu_mask(shape: &[usize], p: f32, seed: u64, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let scale = 1.0 / (1.0 - p);
    let m: Vec<f32> = (0..n as u64)
        .map(|i| if keep_at(seed, i, p) { scale } else { 0.0 })
        .collect();
    Tensor::from_vec(m, shape, dev).unwrap()
}

pub fn run(dev: &Device) -> usize {
    // BERT-base's shapes on a GPU; small ones on the CPU emulation (tests/gpu_kernels.rs).
    let gpu = dev.is_cuda();
    let big = |g: usize, c: usize| if gpu { g } else { c };
    let mut rep = Report { failed: 0 };
    println!("| kernel against candle's composed ops   | type | rel. error | tol.  |");
    println!("|--------------------------------------|------|-----------|-------|-----");
    for dtype in [DType::F32, DType::BF16] {
        // Dropout: the kernel's mask is the CPU's, exactly.
        let shape = [37usize, 129];
        let d = Dropout { p: 0.1, seed: 11 };
        let got =
            k::dropout_mask(&candle_core::Shape::from(shape.to_vec()), dtype, dev, d).unwrap();
        let want = cpu_mask(&shape, 0.1, 11, dev).to_dtype(dtype).unwrap();
        rep.row("dropout_mask (the CPU's keep bits)", dtype, &got, &want);

        // Bias + GELU.
        let (rows, cols) = (big(512, 9), big(3072, 70));
        let (z, zf) = held(&randn(&[rows, cols], 2.0, dev), dtype);
        let (b, bf) = held(&randn(&[cols], 0.5, dev), dtype);
        let r = randn(&[rows, cols], 1.0, dev);
        let (want, wg) = reference(&[&zf, &bf], &r, |t| {
            t[0].broadcast_add(&t[1]).unwrap().gelu_erf().unwrap()
        });
        let (pre, act) = k::bias_gelu(&z, &b).unwrap();
        let dpre = k::gelu_backward(&r.to_dtype(dtype).unwrap(), &pre).unwrap();
        rep.row("bias_gelu act", dtype, &act, &want);
        rep.row("gelu_backward dz", dtype, &dpre, &wg[0]);
        rep.row(
            "gelu_backward dbias (column sums)",
            dtype,
            &dpre.to_dtype(DType::F32).unwrap().sum(0).unwrap(),
            &wg[1],
        );

        // Attention probabilities with padding and dropout, at head dims' worth of keys.
        for keys in [big(128, 20), big(512, 37)] {
            let (batch, heads) = (big(4, 2), big(12, 3));
            let shape = [batch, heads, keys, keys];
            let (s, sf) = held(&randn(&shape, 8.0, dev), dtype);
            let mut m = vec![0f32; batch * keys];
            m[keys + keys / 2..2 * keys]
                .iter_mut()
                .for_each(|v| *v = -1e9); // row 1 padded
            let mask = Tensor::from_vec(m, (batch, keys), dev).unwrap();
            let (scale, p, seed) = (0.125f32, 0.1f32, 5u64);
            let drop = cpu_mask(&shape, p, seed, dev);
            let r = randn(&shape, 1.0, dev);
            let (want, wg) = reference(&[&sf], &r, |t| {
                let x = (&t[0] * scale as f64)
                    .unwrap()
                    .broadcast_add(&mask.reshape((batch, 1, 1, keys)).unwrap())
                    .unwrap();
                (candle_nn::ops::softmax(&x, D::Minus1).unwrap() * &drop).unwrap()
            });
            let d = Some(Dropout { p, seed });
            let (probs, dropped) = k::attention_probs(&s, &mask, scale, d).unwrap();
            let ds =
                k::attention_probs_backward(&r.to_dtype(dtype).unwrap(), &probs, scale, d).unwrap();
            rep.row(
                &format!("attention_probs, {keys} keys"),
                dtype,
                &dropped,
                &want,
            );
            rep.row(
                &format!("attention_probs_backward, {keys} keys"),
                dtype,
                &ds,
                &wg[0],
            );
        }

        // LayerNorm of dropout(z + bias) + residual, with a second gradient of y.
        for cols in [big(768, 130), big(1024, 40)] {
            let rows = big(2048, 40);
            let (z, zf) = held(&randn(&[rows, cols], 1.0, dev), dtype);
            let (res, rf) = held(&randn(&[rows, cols], 1.0, dev), dtype);
            let (b, bf) = held(&randn(&[cols], 0.1, dev), dtype);
            let (g, gf) = held(&(randn(&[cols], 0.2, dev) + 1.0).unwrap(), dtype);
            let (e, ef) = held(&randn(&[cols], 0.2, dev), dtype);
            let (p, seed, eps) = (0.1f32, 9u64, 1e-12);
            let drop = cpu_mask(&[rows, cols], p, seed, dev);
            let (r1, r2) = (
                randn(&[rows, cols], 1.0, dev),
                randn(&[rows, cols], 1.0, dev),
            );
            let r1 = r1.to_dtype(dtype).unwrap();
            let r2 = r2.to_dtype(dtype).unwrap();
            let r = (r1.to_dtype(DType::F32).unwrap() + r2.to_dtype(DType::F32).unwrap()).unwrap();
            let (want, wg) = reference(&[&zf, &rf, &bf, &gf, &ef], &r, |t| {
                let s = ((t[0].broadcast_add(&t[2]).unwrap() * &drop).unwrap() + &t[1]).unwrap();
                candle_nn::ops::layer_norm_slow(&s, &t[3], &t[4], eps as f32).unwrap()
            });
            let d = Some(Dropout { p, seed });
            let (y, saved) =
                k::add_layer_norm(&z, Some(&b), Some(&res), &g, &e, eps, d, None).unwrap();
            let gr = k::add_layer_norm_backward(&r1, Some(&r2), &saved, &g, d).unwrap();
            rep.row(&format!("add_layer_norm y, {cols} wide"), dtype, &y, &want);
            rep.row("add_layer_norm_backward dz", dtype, &gr.dz, &wg[0]);
            rep.row("add_layer_norm_backward dresidual", dtype, &gr.dsum, &wg[1]);
            rep.row("add_layer_norm_backward dbias", dtype, &gr.dbias, &wg[2]);
            rep.row("add_layer_norm_backward dgamma", dtype, &gr.dgamma, &wg[3]);
            rep.row("add_layer_norm_backward dbeta", dtype, &gr.dbeta, &wg[4]);
        }

        // Cross-entropy over 2,400 masked rows of a 30,522 vocabulary.
        let (rows, vocab) = (big(2400, 6), big(30522, 1001));
        let (x, xf) = held(&randn(&[rows, vocab], 3.0, dev), dtype);
        let labels: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 7919) % vocab as u32)
            .collect();
        let labels = Tensor::from_vec(labels, rows, dev).unwrap();
        let one = Tensor::new(1f32, dev).unwrap();
        let (want, wg) = reference(&[&xf], &one, |t| {
            candle_nn::loss::cross_entropy(&t[0], &labels).unwrap()
        });
        let (loss, grad) = k::cross_entropy(&x, &labels, true).unwrap();
        rep.row("cross_entropy loss", dtype, &loss, &want);
        rep.row("cross_entropy grad", dtype, &grad.unwrap(), &wg[0]);

        // The embedding gradient against index_add.
        let (n, vocab, cols) = (big(16384, 300), big(30522, 97), big(768, 40));
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| ((i * i) % 5000 + (i % 3) * 20000) % vocab as u32)
            .collect();
        let idt = Tensor::from_slice(&ids, n, dev).unwrap();
        let table = randn(&[vocab, cols], 0.02, dev);
        let (r, rf) = held(&randn(&[n, cols], 1.0, dev), dtype);
        let (_, wg) = reference(&[&table], &rf, |t| t[0].index_select(&idt, 0).unwrap());
        let got = k::embedding_grad(&r, &ids, vocab).unwrap();
        rep.row("embedding_grad (against index_add)", dtype, &got, &wg[0]);

        // q, k, v split and merge against reshapes.
        let (batch, seq, heads, hd) = (big(8, 2), big(128, 5), big(12, 3), big(64, 4));
        let h = heads * hd;
        let (z, zf) = held(&randn(&[batch * seq, 3 * h], 1.0, dev), dtype);
        let (b, bf) = held(&randn(&[3 * h], 1.0, dev), dtype);
        let (q, kk, v) = k::qkv_split(&z, &b, (batch, seq, heads), None).unwrap();
        let full = zf.broadcast_add(&bf).unwrap();
        let part = |i: usize| {
            full.narrow(1, i * h, h)
                .unwrap()
                .reshape((batch, seq, heads, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        rep.row("qkv_split q", dtype, &q, &part(0));
        rep.row("qkv_split k", dtype, &kk, &part(1));
        rep.row("qkv_split v", dtype, &v, &part(2));
        let back = k::qkv_merge(&q, &kk, &v, None).unwrap();
        rep.row("qkv_merge (inverse)", dtype, &back, &full);
        // Unpadded rows: batch element 1 holds its first seq / 2 tokens only.
        let keep: Vec<u32> = (0..(batch * seq) as u32)
            .filter(|&i| i as usize / seq != 1 || (i as usize % seq) < seq / 2)
            .collect();
        let map = Tensor::new(keep.as_slice(), dev).unwrap();
        let zr = z.index_select(&map, 0).unwrap();
        let (qr, _, _) = k::qkv_split(&zr, &b, (batch, seq, heads), Some(&map)).unwrap();
        let mut m = vec![0f32; batch * seq];
        keep.iter().for_each(|&i| m[i as usize] = 1.0);
        let m = Tensor::from_vec(m, (batch, 1, seq, 1), dev).unwrap();
        rep.row(
            "qkv_split (unpadded rows)",
            dtype,
            &qr,
            &part(0).broadcast_mul(&m).unwrap(),
        );
        let ctx = k::heads_to_rows(&q, Some(&map)).unwrap();
        let want = full
            .narrow(1, 0, h)
            .unwrap()
            .contiguous()
            .unwrap()
            .index_select(&map, 0)
            .unwrap();
        rep.row("heads_to_rows (unpadded rows)", dtype, &ctx, &want);
        let back = k::rows_to_heads(&ctx, (batch, seq, heads), Some(&map)).unwrap();
        rep.row("rows_to_heads (unpadded rows)", dtype, &back, &qr);
    }

    // AdamW against the composed formula, f32.
    let n = big(1 << 20, 1000);
    let theta = randn(&[n], 1.0, dev);
    let m = randn(&[n], 0.1, dev);
    let v = randn(&[n], 0.1, dev).sqr().unwrap();
    let g = randn(&[n], 1.0, dev);
    let (b1, b2, lr, wd, t, eps) = (0.9f64, 0.999f64, 1e-3f64, 0.01f64, 3i32, 1e-8f64);
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let m2 = ((&m * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap();
    let v2 = ((&v * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
    let upd =
        ((&m2 / bc1).unwrap() / ((&v2 / bc2).unwrap().sqrt().unwrap() + eps).unwrap()).unwrap();
    let want = ((&theta * (1.0 - lr * wd)).unwrap() - (upd * lr).unwrap()).unwrap();
    let (tc, mc, vc) = (theta.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
    let h = k::AdamWStep {
        beta1: b1 as f32,
        beta2: b2 as f32,
        lr: lr as f32,
        decay: (1.0 - lr * wd) as f32,
        bc1: bc1 as f32,
        bc2: bc2 as f32,
        eps: eps as f32,
    };
    k::adamw_step(&tc, &mc, &vc, &g, h).unwrap();
    rep.row("adamw_step theta", DType::F32, &tc, &want);
    rep.row("adamw_step exp_avg", DType::F32, &mc, &m2);
    rep.row("adamw_step exp_avg_sq", DType::F32, &vc, &v2);
    // The multi-tensor passes: three tensors, one over a chunk (65,536) long.
    let ts: Vec<Tensor> = [70_000usize, 3, 1000]
        .iter()
        .map(|&n| randn(&[n], 1.0, dev))
        .collect();
    let got = k::sum_of_squares(&ts.iter().collect::<Vec<_>>()).unwrap();
    let want: f64 = ts
        .iter()
        .map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum();
    let as_t = |v: f64| Tensor::new(&[v as f32], dev).unwrap();
    rep.row(
        "sum_of_squares (multi-tensor)",
        DType::F32,
        &as_t(got),
        &as_t(want),
    );
    let state: Vec<[Tensor; 3]> = ts
        .iter()
        .map(|t| [t.copy().unwrap(), (t * 0.1).unwrap(), t.sqr().unwrap()])
        .collect();
    let grads: Vec<Tensor> = ts
        .iter()
        .map(|t| (t.sin().unwrap() * 0.5).unwrap())
        .collect();
    let lrs = [1e-3f32, 2e-3, 5e-4];
    let decays = [1.0 - 1e-5f32, 1.0, 1.0 - 2e-5];
    let slots: Vec<k::AdamWSlot> = state
        .iter()
        .zip(&grads)
        .enumerate()
        .map(|(i, (s, g))| k::AdamWSlot {
            theta: &s[0],
            m: &s[1],
            v: &s[2],
            g,
            lr: lrs[i],
            decay: decays[i],
        })
        .collect();
    let hm = k::AdamWStep {
        lr: 0.0,
        decay: 1.0,
        ..h
    };
    // The reference before the update: each tensor alone through adamw_step (checked above).
    let want: Vec<[Tensor; 3]> = state
        .iter()
        .zip(&grads)
        .enumerate()
        .map(|(i, (s, g))| {
            let c = [
                s[0].copy().unwrap(),
                s[1].copy().unwrap(),
                s[2].copy().unwrap(),
            ];
            let hi = k::AdamWStep {
                lr: lrs[i],
                decay: decays[i],
                ..h
            };
            k::adamw_step(&c[0], &c[1], &c[2], g, hi).unwrap();
            c
        })
        .collect();
    k::adamw_multi(&slots, hm).unwrap();
    for (i, (s, w)) in state.iter().zip(&want).enumerate() {
        for (j, what) in ["theta", "exp_avg", "exp_avg_sq"].iter().enumerate() {
            rep.row(
                &format!("adamw_multi {what}, tensor {i}"),
                DType::F32,
                &s[j],
                &w[j],
            );
        }
    }
    println!("{} comparison(s) failed", rep.failed);
    rep.failed
}
