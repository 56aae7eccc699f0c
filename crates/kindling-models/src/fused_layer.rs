//! One BERT encoder layer as one autograd node (CPU, f32): attention block and feed-forward
//! block, forward and backward written out by hand, as llm.c does.
//!
//! Why: candle's backward pass allocates a zero tensor and adds into it for every input of every
//! node, and a layer built from the separate fused ops (`crate::ops`) has about twenty nodes with
//! (tokens, hidden)-sized inputs. On the bert-mini step that bookkeeping (`zeros_like` + `add`)
//! was about a quarter of the time. As one node the layer pays it once, for its input and for the
//! one flat tensor its parameters are concatenated into (a copy of 0.8M floats per layer of
//! bert-mini per step, against the 4096 x 256 activations the bookkeeping touched twenty times).
//!
//! The arithmetic is the same kernels as the separate ops (gemm, `SelfAttention`, LayerNorm,
//! GELU, seeded dropout with the same streams), so the layer computes what the composed layer
//! computes, up to summation order; the tests check forward and every gradient against it.
//! Activations the backward pass needs are kept inside the op (as candle keeps them in the
//! graph) and freed with the graph.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use crate::ops::{
    contiguous_f32, drop_rows, dropped, gelu_and_grad_in_place, gelu_in_place,
    layer_norm_grad_rows, layer_norm_rows, linear_bwd, linear_fwd, mul_in_place, rows_per_task,
    saved_activations, vectorised, with_cpu_inputs, zeros_par, SelfAttention,
};

/// The parameters of one layer, in the order they are concatenated (HF names, under
/// `encoder.layer.N.`).
const PARAMS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

/// Shapes of [`PARAMS`] for hidden size `h` and intermediate size `i`.
pub(crate) fn param_shapes(h: usize, i: usize) -> [Vec<usize>; 16] {
    [
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h, h],
        vec![h],
        vec![h],
        vec![h],
        vec![i, h],
        vec![i],
        vec![h, i],
        vec![h],
        vec![h],
        vec![h],
    ]
}

/// Element counts of [`PARAMS`] for hidden size `h` and intermediate size `i`.
pub(crate) fn param_sizes(h: usize, i: usize) -> [usize; 16] {
    param_shapes(h, i).map(|s| s.iter().product())
}

/// Splits a flat buffer into slices of `sizes` (a layer's parameters, in their order).
pub(crate) fn split<T, const N: usize>(mut flat: &[T], sizes: [usize; N]) -> [&[T]; N] {
    sizes.map(|n| {
        let (head, rest) = flat.split_at(n);
        flat = rest;
        head
    })
}

pub(crate) fn split_mut<T, const N: usize>(mut flat: &mut [T], sizes: [usize; N]) -> [&mut [T]; N] {
    sizes.map(|n| {
        let (head, rest) = std::mem::take(&mut flat).split_at_mut(n);
        flat = rest;
        head
    })
}

/// `dst += src` row by row (width `h`): src's row r onto dst's row `rows[r]`, or onto row r
/// when `rows` is `None` (then in parallel).
pub(crate) fn add_rows(dst: &mut [f32], src: &[f32], rows: Option<&[u32]>, h: usize) {
    match rows {
        None => {
            let chunk = h * rows_per_task(h);
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| vectorised(|| d.iter_mut().zip(s).for_each(|(d, s)| *d += s)));
        }
        Some(rows) => {
            for (g, &r) in src.chunks(h).zip(rows) {
                let at = r as usize * h;
                dst[at..at + h].iter_mut().zip(g).for_each(|(d, g)| *d += g);
            }
        }
    }
}

/// Activations of the forward pass the backward pass reads.
struct Saved {
    /// the input rows that query, when not all do (`EncoderLayerOp::rows`)
    x_rows: Option<Vec<f32>>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    /// attention probabilities before dropout, when they fit (`SelfAttention::can_keep_probs`)
    probs: Option<Vec<f32>>,
    /// attention output + residual, before its LayerNorm
    r1: Vec<f32>,
    /// attention block output (after LayerNorm)
    a: Vec<f32>,
    /// GELU's derivative at the intermediate dense output (kept instead of that output: the
    /// backward pass needs nothing else of it)
    gelu_grad: Vec<f32>,
    gelu: Vec<f32>,
    /// feed-forward output + residual, before its LayerNorm
    r2: Vec<f32>,
}

/// `encoder.layer.N` as one op on (x (batch * seq, hidden), flat parameters).
pub(crate) struct EncoderLayerOp {
    attention: SelfAttention,
    hidden: usize,
    intermediate: usize,
    eps: f32,
    /// (p, seed) of the attention output's and the feed-forward output's dropout.
    attention_dropout: Option<(f32, u64)>,
    output_dropout: Option<(f32, u64)>,
    /// Whether a backward pass can follow (keep the activations).
    save: bool,
    /// The rows (flat `b * seq + t`, strictly increasing) the layer outputs, when not all: the
    /// last layer of a masked-LM step, whose other rows no loss reads. Keys and values still
    /// come from every row; queries, the attention output, the feed-forward block and both
    /// LayerNorms run on these rows only (the same numbers at these rows; with 15% of the
    /// rows kept, ~30% of the layer's products).
    rows: Option<Vec<u32>>,
    saved: Mutex<Option<Saved>>,
}

/// Gathers `rows` (of width `h`) of `x`.
pub(crate) fn gather_rows(x: &[f32], rows: &[u32], h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * h);
    for &r in rows {
        out.extend_from_slice(&x[r as usize * h..(r as usize + 1) * h]);
    }
    out
}

/// `xs = dropout(xs) + residual` in one parallel pass over rows of width `h` (see
/// [`drop_rows`] for `rows`).
pub(crate) fn dropout_residual(
    dropout: Option<(f32, u64)>,
    xs: &mut [f32],
    residual: &[f32],
    h: usize,
    rows: Option<&[u32]>,
) {
    let per = rows_per_task(h);
    xs.par_chunks_mut(per * h)
        .zip(residual.par_chunks(per * h))
        .enumerate()
        .for_each(|(c, (x, res))| {
            vectorised(|| {
                if let Some(d) = dropout {
                    drop_rows(d, x, c * per, h, rows);
                }
                x.iter_mut().zip(res).for_each(|(v, r)| *v += r);
            })
        });
}

/// Dropout streams of one layer in one mode.
pub(crate) struct LayerDropout {
    pub probs: Option<(f32, u64)>,
    pub attention_output: Option<(f32, u64)>,
    pub output: Option<(f32, u64)>,
}

impl CustomOp2 for EncoderLayerOp {
    fn name(&self) -> &'static str {
        "kindling-encoder-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let flat = contiguous_f32(s2, l2, self.name())?;
        let [qw, qb, kw, kb, vw, vb, ow, ob, ln1w, ln1b, iw, ib, fw, fb, ln2w, ln2b] =
            split(flat, param_sizes(self.hidden, self.intermediate));
        let rows = self.rows.as_deref();
        let x_rows = rows.map(|r| gather_rows(x, r, self.hidden));
        // The rows that query and go on through the layer.
        let xq = x_rows.as_deref().unwrap_or(x);
        let (q, k, v) = (
            linear_fwd(xq, qw, qb),
            linear_fwd(x, kw, kb),
            linear_fwd(x, vw, vb),
        );
        // Training keeps the attention probabilities when they fit (the backward pass then
        // skips recomputing q k^T and the softmax).
        let (ctx, probs) = self.attention.forward_keeping(
            &q,
            &k,
            &v,
            self.save && self.attention.can_keep_probs(),
        );
        let mut r1 = linear_fwd(&ctx, ow, ob);
        dropout_residual(self.attention_dropout, &mut r1, xq, self.hidden, rows);
        let a = layer_norm_rows(&r1, ln1w, ln1b, self.eps);
        // The intermediate dense output, turned into its GELU in place.
        let mut gelu = linear_fwd(&a, iw, ib);
        let gelu_grad = if self.save {
            gelu_and_grad_in_place(&mut gelu)
        } else {
            gelu_in_place(&mut gelu);
            Vec::new()
        };
        let mut r2 = linear_fwd(&gelu, fw, fb);
        dropout_residual(self.output_dropout, &mut r2, &a, self.hidden, rows);
        let y = layer_norm_rows(&r2, ln2w, ln2b, self.eps);
        if self.save {
            *self.saved.lock().expect("saved activations") = Some(Saved {
                x_rows,
                q,
                k,
                v,
                ctx,
                probs,
                r1,
                a,
                gelu_grad,
                gelu,
                r2,
            });
        }
        let shape = Shape::from((y.len() / self.hidden, self.hidden));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("saved activations");
        let s = saved_activations(&guard, self.name())?;
        with_cpu_inputs(x, flat, grad, |xs, params, dy| {
            let sizes = param_sizes(self.hidden, self.intermediate);
            let [qw, _, kw, _, vw, _, ow, _, ln1w, _, iw, _, fw, _, ln2w, _] = split(params, sizes);
            let mut dflat = zeros_par(params.len());
            let [dqw, dqb, dkw, dkb, dvw, dvb, dow, dob, dln1w, dln1b, diw, dib, dfw, dfb, dln2w, dln2b] =
                split_mut(&mut dflat, sizes);
            let (h, i) = (self.hidden, self.intermediate);
            let rows = self.rows.as_deref();
            // The rows that went on through the layer, m of them.
            let xq = s.x_rows.as_deref().unwrap_or(xs);
            let (n, m) = (xq.len(), xq.len() / h);

            // Feed-forward block: y = LN2(dropout(gelu(a W_i + b_i) W_f + b_f) + a).
            let mut dr2 = zeros_par(n);
            let mut dln2 = vec![0f32; 2 * h];
            layer_norm_grad_rows(&s.r2, ln2w, dy, self.eps, &mut dr2, &mut dln2);
            dln2w.copy_from_slice(&dln2[..h]);
            dln2b.copy_from_slice(&dln2[h..]);
            let dout = dropped(self.output_dropout, &dr2, h, rows);
            let mut dgelu = zeros_par(m * i);
            linear_bwd(&s.gelu, fw, &dout, (&mut dgelu, false), dfw, dfb);
            // dL/d(intermediate dense output), in place of dL/dgelu.
            let mut dpre = dgelu;
            mul_in_place(&mut dpre, &s.gelu_grad);
            // da = dr2 (the residual) + dpre W_i.
            let mut da = dr2;
            linear_bwd(&s.a, iw, &dpre, (&mut da, true), diw, dib);
            drop(dpre);

            // Attention block: a = LN1(dropout(attention(x) W_o + b_o) + x).
            let mut dr1 = zeros_par(n);
            let mut dln1 = vec![0f32; 2 * h];
            layer_norm_grad_rows(&s.r1, ln1w, &da, self.eps, &mut dr1, &mut dln1);
            dln1w.copy_from_slice(&dln1[..h]);
            dln1b.copy_from_slice(&dln1[h..]);
            drop(da);
            let dattn = dropped(self.attention_dropout, &dr1, h, rows);
            let mut dctx = zeros_par(n);
            linear_bwd(&s.ctx, ow, &dattn, (&mut dctx, false), dow, dob);
            drop(dattn);
            let (dq, dk, dv) = self
                .attention
                .backward(&s.q, &s.k, &s.v, &dctx, s.probs.as_deref());
            drop(dctx);
            // dx = dr1 (the residual) + dq W_q at the querying rows, + dk W_k + dv W_v at all.
            let mut dxq = dr1;
            linear_bwd(xq, qw, &dq, (&mut dxq, true), dqw, dqb);
            let dx = match rows {
                None => {
                    let mut dx = dxq;
                    linear_bwd(xs, kw, &dk, (&mut dx, true), dkw, dkb);
                    linear_bwd(xs, vw, &dv, (&mut dx, true), dvw, dvb);
                    dx
                }
                Some(rows) => {
                    let mut dx = zeros_par(xs.len());
                    linear_bwd(xs, kw, &dk, (&mut dx, false), dkw, dkb);
                    linear_bwd(xs, vw, &dv, (&mut dx, true), dvw, dvb);
                    add_rows(&mut dx, &dxq, Some(rows), h);
                    dx
                }
            };
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dflat, flat.shape(), dev)?),
            ))
        })
    }
}

/// The parameter tensors of one layer, in [`PARAMS`] order.
pub(crate) struct LayerParams<'a>(pub [&'a Tensor; 16]);

/// The layer's parameters concatenated into one tensor, in [`PARAMS`] order (checked against
/// the shape): one autograd node in front of the layer's.
pub(crate) fn flat_params(
    params: &LayerParams,
    hidden: usize,
    intermediate: usize,
) -> Result<Tensor> {
    let expected = param_sizes(hidden, intermediate).iter().sum();
    let op = format!("kindling-encoder-layer (hidden {hidden}, intermediate {intermediate})");
    concat_params(&params.0, expected, &op, &PARAMS)
}

/// `params` flattened and concatenated, checked to hold `expected` values (an error naming
/// `op` and the parameters, `names`, otherwise).
pub(crate) fn concat_params(
    params: &[&Tensor],
    expected: usize,
    op: &str,
    names: &[&str],
) -> Result<Tensor> {
    let flat = Tensor::cat(
        &params
            .iter()
            .map(|t| t.flatten_all())
            .collect::<Result<Vec<_>>>()?,
        0,
    )?;
    if flat.elem_count() != expected {
        candle_core::bail!(
            "{op}: parameters hold {} values, the shape needs {expected} ({})",
            flat.elem_count(),
            names.join(", ")
        )
    }
    Ok(flat)
}

/// What a one-node encoder layer (this module's, `crate::explicit_layer`'s) is given besides
/// its input and mask.
pub(crate) struct LayerArgs<'a> {
    pub params: LayerParams<'a>,
    /// (batch, seq, heads)
    pub dims: (usize, usize, usize),
    pub intermediate: usize,
    pub eps: f64,
    pub dropout: LayerDropout,
}

/// One encoder layer on `xs` (batch * seq, hidden), CPU f32; `mask` additive (batch, seq).
/// With `rows` (flat `b * seq + t`) only those rows of the output, computed from only what they
/// need (see `EncoderLayerOp::rows`): (rows, hidden).
pub(crate) fn encoder_layer(
    xs: &Tensor,
    args: LayerArgs,
    mask: &Tensor,
    rows: Option<&[u32]>,
) -> Result<Tensor> {
    let LayerArgs {
        params,
        dims: (batch, seq, heads),
        intermediate,
        eps,
        dropout,
    } = args;
    let hidden = xs.dim(1)?;
    let flat = flat_params(&params, hidden, intermediate)?;
    let attention = SelfAttention::new(
        (batch, seq, heads),
        hidden,
        mask.flatten_all()?.to_vec1()?,
        dropout.probs,
    );
    let attention = match rows {
        None => attention,
        Some(r) => match attention.with_query_rows(r) {
            Some(a) => a,
            None => candle_core::bail!(
                "kindling-encoder-layer: output rows must be increasing and below {}",
                batch * seq
            ),
        },
    };
    let op = EncoderLayerOp {
        attention,
        hidden,
        intermediate,
        eps: eps as f32,
        attention_dropout: dropout.attention_output,
        output_dropout: dropout.output,
        save: xs.track_op() || flat.track_op(),
        rows: rows.map(<[u32]>::to_vec),
        saved: Mutex::new(None),
    };
    xs.contiguous()?.apply_op2(&flat, op)
}
