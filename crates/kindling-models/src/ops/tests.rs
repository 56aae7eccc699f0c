//! Every fused op against its composition of candle ops, forward and backward.
use super::*;
use crate::test_util::max_rel_diff;
use candle_core::Var;

fn randn((a, b, c): (usize, usize, usize), seed: u64) -> Tensor {
    crate::test_util::uniform(&[a, b, c], seed, 3.0)
}

/// Gradients of sum(f(x) * r) for the fused op and the composed one.
fn grads(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let y = f(v.as_tensor());
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    (y, g.get(v.as_tensor()).unwrap().clone())
}

/// The GPU paths, run here on the CPU: candle_nn's softmax and LayerNorm kernels with the
/// attached backward passes, the composed softmax and cross-entropy with the maximum
/// detached; each against the CPU op or candle's composition, forward and backward.
#[test]
fn attached_and_detached_max_paths_match_forward_and_backward() {
    let x = randn((4, 7, 33), 1);
    let r = randn((4, 7, 33), 2);
    let close = |(y1, g1): (Tensor, Tensor), (y2, g2): (Tensor, Tensor), what: &str| {
        let (dy, dg) = (max_rel_diff(&y1, &y2), max_rel_diff(&g1, &g2));
        assert!(dy < 1e-5 && dg < 1e-5, "{what}: value {dy}, gradient {dg}");
    };
    close(
        grads(|t| softmax_attached(t).unwrap(), &x, &r),
        grads(|t| t.apply_op1(Softmax).unwrap(), &x, &r),
        "attached softmax",
    );
    let x64 = x.to_dtype(DType::F64).unwrap();
    let r64 = r.to_dtype(DType::F64).unwrap();
    let f32s = |(a, b): (Tensor, Tensor)| {
        (
            a.to_dtype(DType::F32).unwrap(),
            b.to_dtype(DType::F32).unwrap(),
        )
    };
    close(
        f32s(grads(|t| softmax_composed(t).unwrap(), &x64, &r64)),
        f32s(grads(
            |t| candle_nn::ops::softmax(t, D::Minus1).unwrap(),
            &x64,
            &r64,
        )),
        "softmax, max detached",
    );
    // LayerNorm: the attached normalisation with scale and shift, against the CPU op, for
    // the input and both parameters.
    let (w, b) = (
        Var::from_tensor(&(randn((1, 1, 33), 3).flatten_all().unwrap() + 1.0).unwrap()).unwrap(),
        Var::from_tensor(&randn((1, 1, 33), 4).flatten_all().unwrap()).unwrap(),
    );
    let ln = |attached: bool| {
        let xv = Var::from_tensor(&x).unwrap();
        let y = if attached {
            normalize_attached(xv.as_tensor(), 1e-5)
                .unwrap()
                .broadcast_mul(w.as_tensor())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap()
        } else {
            layer_norm(xv.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap()
        };
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Tensor| g.get(v).unwrap().clone();
        (
            y,
            get(xv.as_tensor()),
            get(w.as_tensor()),
            get(b.as_tensor()),
        )
    };
    let (a, c) = (ln(true), ln(false));
    for (u, v, what) in [
        (&a.0, &c.0, "y"),
        (&a.1, &c.1, "dx"),
        (&a.2, &c.2, "dw"),
        (&a.3, &c.3, "db"),
    ] {
        let d = max_rel_diff(u, v);
        assert!(d < 1e-6, "attached LayerNorm {what}: {d}");
    }
    // Cross-entropy from the log_softmax with the maximum detached, against candle_nn's.
    let logits = randn((1, 9, 40), 5)
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let labels = Tensor::new(&[0u32, 3, 39, 7, 7, 12, 1, 30, 2], &Device::Cpu).unwrap();
    let one = Tensor::ones((), DType::F64, &Device::Cpu).unwrap();
    close(
        f32s(grads(|t| cross_entropy(t, &labels).unwrap(), &logits, &one)),
        f32s(grads(
            |t| candle_nn::loss::cross_entropy(t, &labels).unwrap(),
            &logits,
            &one,
        )),
        "cross-entropy, max detached",
    );
}

#[test]
fn fused_softmax_matches_the_composed_ops_forward_and_backward() {
    let x = randn((4, 7, 33), 1);
    let r = randn((4, 7, 33), 2);
    let (y1, g1) = grads(|t| softmax_last_dim(t).unwrap(), &x, &r);
    let (y2, g2) = grads(|t| candle_nn::ops::softmax(t, D::Minus1).unwrap(), &x, &r);
    assert!(max_rel_diff(&y1, &y2) < 1e-5);
    assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
}

#[test]
fn fused_cross_entropy_matches_candle_nn_forward_and_backward() {
    let x = randn((1, 37, 300), 11).reshape((37, 300)).unwrap();
    let x = (x * 4.0).unwrap(); // confident rows too
    let labels: Vec<u32> = (0..37u32).map(|i| (i * 97) % 300).collect();
    let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let run = |fused: bool| {
        let v = Var::from_tensor(&x).unwrap();
        let loss = if fused {
            cross_entropy(v.as_tensor(), &labels).unwrap()
        } else {
            candle_nn::loss::cross_entropy(v.as_tensor(), &labels).unwrap()
        };
        // A scale on the loss, so the incoming gradient is not 1.
        let g = (&loss * 0.7).unwrap().backward().unwrap();
        let g = g.get(v.as_tensor()).unwrap().clone();
        if fused {
            // The forward pass kept its softmax for the first backward pass; a second one
            // over the same graph recomputes it, and gets the same gradient.
            let again = (&loss * 0.7).unwrap().backward().unwrap();
            let again = again.get(v.as_tensor()).unwrap();
            assert!(max_rel_diff(again, &g) < 1e-6, "second backward pass");
        }
        (loss, g)
    };
    let ((l1, g1), (l2, g2)) = (run(true), run(false));
    let (l1, l2) = (
        l1.to_scalar::<f32>().unwrap(),
        l2.to_scalar::<f32>().unwrap(),
    );
    assert!((l1 - l2).abs() / l2 < 1e-5, "{l1} vs {l2}");
    assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
}

#[test]
fn fused_gelu_matches_candles_gelu_erf_forward_and_backward() {
    let x = randn((2, 9, 50), 7);
    let r = randn((2, 9, 50), 8);
    let (y1, g1) = grads(|t| gelu_erf(t).unwrap(), &x, &r);
    let (y2, g2) = grads(|t| t.gelu_erf().unwrap(), &x, &r);
    assert!(max_rel_diff(&y1, &y2) < 1e-5);
    assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
}

#[test]
fn fused_dropout_masks_forward_and_backward_alike() {
    let x = randn((2, 8, 300), 9);
    let r = randn((2, 8, 300), 10);
    let (y, g) = grads(|t| seeded_dropout(t, 0.25, 42).unwrap(), &x, &r);
    let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (xs, rs) = (
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let mut dropped = 0;
    for i in 0..y.len() {
        if y[i] == 0.0 {
            dropped += 1;
            assert_eq!(g[i], 0.0, "a dropped element passes no gradient");
        } else {
            assert!((y[i] - xs[i] / 0.75).abs() < 1e-5);
            assert!((g[i] - rs[i] / 0.75).abs() < 1e-5);
        }
    }
    let rate = dropped as f64 / y.len() as f64;
    assert!((rate - 0.25).abs() < 0.03, "drop rate {rate}");
}

/// Runs `f(fused, a, b, c)` both ways and checks y and the gradients of sum(y * r) with
/// respect to a, b and c agree to 1e-5 relative.
fn assert_fused_matches_composed(
    what: &str,
    f: impl Fn(bool, &Tensor, &Tensor, &Tensor) -> Tensor,
    inputs: [&Tensor; 3],
    r: &Tensor,
) {
    let run = |fused: bool| {
        let vars = inputs.map(|t| Var::from_tensor(t).unwrap());
        let y = f(
            fused,
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        );
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y];
        out.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
        out
    };
    let (fused, composed) = (run(true), run(false));
    for (i, (a, b)) in fused.iter().zip(&composed).enumerate() {
        assert_eq!(a.dims(), b.dims(), "{what}: output {i}");
        let diff = max_rel_diff(a, b);
        assert!(
            diff < 1e-5,
            "{what}: output {i} (0 = y, then grads) differs by {diff}"
        );
    }
}

#[test]
fn fused_layer_norm_matches_the_composed_ops_forward_and_backward() {
    let x = randn((3, 5, 64), 3);
    let w = randn((1, 1, 64), 5).flatten_all().unwrap();
    let b = randn((1, 1, 64), 6).flatten_all().unwrap();
    let f = |fused: bool, x: &Tensor, w: &Tensor, b: &Tensor| {
        if fused {
            layer_norm(x, w, b, 1e-12).unwrap()
        } else {
            candle_nn::ops::layer_norm_slow(x, w, b, 1e-12).unwrap()
        }
    };
    assert_fused_matches_composed("layer norm", f, [&x, &w, &b], &randn((3, 5, 64), 4));
}

#[test]
fn fast_exp_and_erf_are_accurate_over_the_range_used() {
    for i in -8000..=8000 {
        let x = i as f32 * 0.01;
        let (e, want) = (fast_exp(x), x.exp());
        assert!(
            (e - want).abs() <= 3e-7 * want,
            "exp({x}) = {e}, want {want}"
        );
        let erf = fast_erf_and_gauss(x / 10.0).0;
        let want = candle_core::cpu::erf::erf_f32(x / 10.0);
        assert!(
            (erf - want).abs() < 5e-7,
            "erf({}) = {erf}, want {want}",
            x / 10.0
        );
    }
    assert!(fast_exp(f32::NAN).is_nan());
    assert_eq!(fast_exp(100.0), fast_exp(88.0));
    // A masked score (-1e9) gives exactly 0, never a subnormal (which would slow every
    // gemm that reads it).
    assert_eq!(fast_exp(-1e9), 0.0);
    assert_eq!(fast_exp(-87.5), 0.0);
    assert!(fast_exp(-87.0).is_normal());
}

#[test]
fn fused_linear_matches_matmul_plus_bias_forward_and_backward() {
    let x = randn((2, 6, 40), 11);
    let w = randn((1, 24, 40), 13).squeeze(0).unwrap();
    let b = randn((1, 1, 24), 14).flatten_all().unwrap();
    let f = |fused: bool, x: &Tensor, w: &Tensor, b: &Tensor| {
        if fused {
            linear(x, w, b).unwrap()
        } else {
            let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            y.broadcast_add(b).unwrap()
        }
    };
    assert_fused_matches_composed("linear", f, [&x, &w, &b], &randn((2, 6, 24), 12));
}

#[test]
fn fused_attention_probs_match_the_composed_ops_with_and_without_dropout() {
    let (b, heads, t) = (3, 2, 17);
    let scores = randn((b * heads, t, t), 15)
        .reshape((b, heads, t, t))
        .unwrap();
    let r = randn((b * heads, t, t), 16)
        .reshape((b, heads, t, t))
        .unwrap();
    // Batch 1 cannot see its last 5 keys.
    let mut m = vec![0f32; b * t];
    m[t + t - 5..2 * t].fill(-1e9);
    let mask = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
    for dropout in [None, Some((0.3f32, 99u64))] {
        let (y1, g1) = grads(
            |s| attention_probs(s, &mask, 0.25, dropout).unwrap(),
            &scores,
            &r,
        );
        let composed = |s: &Tensor| {
            let z = (s * 0.25)
                .unwrap()
                .broadcast_add(&mask.reshape((b, 1, 1, t)).unwrap())
                .unwrap();
            let p = candle_nn::ops::softmax(&z, D::Minus1).unwrap();
            match dropout {
                Some((p_drop, seed)) => {
                    let keep: Vec<f32> = (0..p.elem_count() as u64)
                        .map(|i| keep_at(seed, i, p_drop) as u8 as f32 / (1.0 - p_drop))
                        .collect();
                    (p * Tensor::from_vec(keep, s.shape(), &Device::Cpu).unwrap()).unwrap()
                }
                None => p,
            }
        };
        let (y2, g2) = grads(composed, &scores, &r);
        assert!(max_rel_diff(&y1, &y2) < 1e-5, "{dropout:?}");
        assert!(
            max_rel_diff(&g1, &g2) < 1e-5,
            "{dropout:?}: {}",
            max_rel_diff(&g1, &g2)
        );
        // Masked keys get (numerically) zero probability.
        let masked = y1.get(1).unwrap().narrow(2, t - 5, 5).unwrap();
        assert!(
            masked
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-30
        );
    }
}

#[test]
fn fused_self_attention_matches_the_composed_ops_forward_and_backward() {
    let (b, t, heads, h) = (3, 11, 2, 8);
    let qkv = [21, 22, 23].map(|seed| randn((1, b * t, h), seed).squeeze(0).unwrap());
    let r = randn((1, b * t, h), 24).squeeze(0).unwrap();
    let mut m = vec![0f32; b * t];
    m[2 * t - 3..2 * t].fill(-1e9);
    let mask = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
    // A sliding window (ModernBERT's local layers): |i - j| <= 3, as its own additive mask.
    let band = |w: usize| {
        let v: Vec<f32> = (0..t * t)
            .map(|n| {
                if (n / t).abs_diff(n % t) > w {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (1, 1, t, t), &Device::Cpu).unwrap()
    };
    for window in [None, Some(3)] {
        for dropout in [None, Some((0.2f32, 5u64))] {
            let f = |fused: bool, q: &Tensor, k: &Tensor, v: &Tensor| {
                if fused {
                    return self_attention_windowed(q, k, v, (b, t, heads), &mask, window, dropout)
                        .unwrap();
                }
                // The composed path, as other devices run it.
                let split = |x: &Tensor| {
                    let x = x.reshape((b, t, heads, h / heads)).unwrap();
                    x.transpose(1, 2).unwrap().contiguous().unwrap()
                };
                let scores = split(q).matmul(&split(k).t().unwrap()).unwrap();
                let scaled = (scores * (1.0 / ((h / heads) as f64).sqrt())).unwrap();
                let mut masked = scaled
                    .broadcast_add(&mask.reshape((b, 1, 1, t)).unwrap())
                    .unwrap();
                if let Some(w) = window {
                    masked = masked.broadcast_add(&band(w)).unwrap();
                }
                let mut probs = candle_nn::ops::softmax(&masked, D::Minus1).unwrap();
                if let Some((p, seed)) = dropout {
                    probs = seeded_dropout(&probs, p, seed).unwrap();
                }
                let ctx = probs.matmul(&split(v)).unwrap().transpose(1, 2).unwrap();
                ctx.reshape((b * t, h)).unwrap()
            };
            let what = format!("self-attention, window {window:?}, dropout {dropout:?}");
            assert_fused_matches_composed(&what, f, [&qkv[0], &qkv[1], &qkv[2]], &r);
        }
        // The library's own composed path (what a GPU runs: here f64, which is not fused).
        let wide = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
        let composed = self_attention_windowed(
            &wide(&qkv[0]),
            &wide(&qkv[1]),
            &wide(&qkv[2]),
            (b, t, heads),
            &wide(&mask),
            window,
            None,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
        let fused = self_attention_windowed(
            &qkv[0],
            &qkv[1],
            &qkv[2],
            (b, t, heads),
            &mask,
            window,
            None,
        )
        .unwrap();
        let d = (composed - fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "window {window:?}: composed vs fused {d}");
    }
}

#[test]
fn fused_rotary_matches_the_composed_ops_forward_and_backward() {
    // Two rows of 5 positions, 3 heads of 8; tables with unequal halves, so the backward pass
    // must be the transpose and not merely the rotation by minus the angle.
    let (b, t, heads, d) = (2, 5, 3, 8);
    let x = randn((1, b * t, heads * d), 11).squeeze(0).unwrap();
    let r = randn((1, b * t, heads * d), 12).squeeze(0).unwrap();
    let cos = randn((1, t, d), 13).reshape((1, t, 1, d)).unwrap();
    let sin = randn((1, t, d), 14).reshape((1, t, 1, d)).unwrap();
    let run = |k: Kernels| grads(|x| k.rotary(x, &cos, &sin, (b, t, heads)).unwrap(), &x, &r);
    let ((y1, g1), (y2, g2)) = (run(Kernels::Fused), run(Kernels::Composed));
    assert!(max_rel_diff(&y1, &y2) < 1e-6, "{}", max_rel_diff(&y1, &y2));
    assert!(max_rel_diff(&g1, &g2) < 1e-6, "{}", max_rel_diff(&g1, &g2));
}

#[test]
fn fused_geglu_matches_the_composed_ops_forward_and_backward() {
    let up = randn((1, 12, 2 * 20), 15).squeeze(0).unwrap();
    let r = randn((1, 12, 20), 16).squeeze(0).unwrap();
    let run = |k: Kernels| grads(|x| k.geglu(x).unwrap(), &up, &r);
    let ((y1, g1), (y2, g2)) = (run(Kernels::Fused), run(Kernels::Composed));
    assert_eq!(y1.dims(), &[12, 20]);
    assert!(max_rel_diff(&y1, &y2) < 1e-5, "{}", max_rel_diff(&y1, &y2));
    assert!(max_rel_diff(&g1, &g2) < 1e-5, "{}", max_rel_diff(&g1, &g2));
}
