//! One BERT encoder layer as one autograd node made of candle's ops, for the devices and dtypes
//! the fused CPU layer (`crate::fused_layer`) does not serve: GPUs, and bf16/f16 activations.
//! The forward pass runs the same ops as the composed layer on detached tensors (no graph);
//! the backward pass is written out with candle's ops, from the activations the forward pass
//! keeps.
//!
//! Why: candle's backward pass allocates a zero-filled gradient for every input of every node
//! and adds the node's gradient into it. A composed layer has about fifty nodes on the gradient
//! path, most with (tokens, hidden)- or (tokens, intermediate)-sized inputs: on one H200 those
//! fills and adds were about a third of a BERT-base bf16 step (docs/perf.md, session 8). As one
//! node the layer pays them for its input and for the one flat tensor of its parameters; every
//! other gradient is written once. What it costs: the parameters concatenated (and cast) once
//! per step, and the output copied once (a CustomOp returns new storage).
//!
//! Mixed precision as in the composed layer: products in the activations' dtype from f32 master
//! weights; LayerNorm statistics and the attention softmax's accumulation in f32; the products
//! that give the parameters' gradients accumulate in f32 (bias and LayerNorm gradients too: see
//! `column_sums`), which come out in f32.

use candle_core::{DType, Result, Tensor};

use kindling_core::attach::{attach_grad2, ValueGrad, ValueGrad2};

use crate::fused_layer::{flat_params, param_shapes, LayerArgs};
use crate::ops::{dropout_mask, normalize_value, softmax_value, AttachGrad};

/// One encoder layer on `xs` (batch * seq, hidden); `mask` additive (batch, seq).
pub(crate) fn encoder_layer(xs: &Tensor, args: LayerArgs, mask: &Tensor) -> Result<Tensor> {
    let hidden = xs.dim(1)?;
    #[cfg(feature = "cuda")]
    if crate::cuda_layer::serves(xs, hidden) {
        return crate::cuda_layer::encoder_layer(xs, args, mask);
    }
    let LayerArgs {
        params,
        dims: (batch, seq, heads),
        intermediate,
        eps,
        dropout,
    } = args;
    let flat = flat_params(&params, hidden, intermediate)?;
    let dtype = xs.dtype();
    let p = cast_views(&flat, dtype, hidden, intermediate)?;
    let x = xs.detach();
    let head_dim = hidden / heads;
    let split = |z: &Tensor| -> Result<Tensor> {
        z.reshape((batch, seq, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let linear = |x: &Tensor, w: &Tensor, b: &Tensor| x.matmul(&w.t()?)?.broadcast_add(b);
    let drop = |x: Tensor, site: Option<(f32, u64)>| -> Result<(Tensor, Option<Tensor>)> {
        match site {
            Some((prob, seed)) => {
                let m = dropout_mask(&x, prob, seed)?;
                Ok(((x * &m)?, Some(m)))
            }
            None => Ok((x, None)),
        }
    };

    // Attention block.
    let qh = split(&linear(&x, &p[0], &p[1])?)?;
    let kh = split(&linear(&x, &p[2], &p[3])?)?;
    let vh = split(&linear(&x, &p[4], &p[5])?)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = qh.matmul(&kh.t()?)?;
    // The softmax in f32 (the mask's dtype), as the composed layer; on CUDA the fused kernel
    // accumulates in f32 itself and the scores stay in their dtype.
    let softmax_dtype = if scores.device().is_cuda() {
        dtype
    } else {
        mask.dtype()
    };
    let mask = mask
        .detach()
        .to_dtype(softmax_dtype)?
        .reshape((batch, 1, 1, seq))?;
    let probs = softmax_value(&(scores.to_dtype(softmax_dtype)? * scale)?.broadcast_add(&mask)?)?;
    let (probs_dropped, probs_mask) = drop(probs.to_dtype(dtype)?, dropout.probs)?;
    let ctx = probs_dropped
        .matmul(&vh)?
        .transpose(1, 2)?
        .reshape((batch * seq, hidden))?;
    let (attn, attn_mask) = drop(linear(&ctx, &p[6], &p[7])?, dropout.attention_output)?;
    let sum1 = (attn + &x)?;
    let norm1 = normalize_value(&sum1, eps)?;
    let h1 = norm1.broadcast_mul(&p[8])?.broadcast_add(&p[9])?;

    // Feed-forward block.
    let pre = linear(&h1, &p[10], &p[11])?;
    let act = pre.gelu_erf()?;
    let (out, out_mask) = drop(linear(&act, &p[12], &p[13])?, dropout.output)?;
    let sum2 = (out + &h1)?;
    let norm2 = normalize_value(&sum2, eps)?;
    let y = norm2.broadcast_mul(&p[14])?.broadcast_add(&p[15])?;

    let saved = Saved {
        dims: (batch, seq, heads, hidden),
        scale,
        eps,
        p,
        x,
        qh,
        kh,
        vh,
        probs,
        probs_mask,
        probs_dropped,
        ctx,
        attn_mask,
        sum1,
        norm1,
        h1,
        pre,
        act,
        out_mask,
        sum2,
        norm2,
    };
    attach_grad2(xs, &flat, &y, saved)
}

/// The 16 parameters as views of one copy of the flat tensor cast to `dtype` (one cast per
/// layer and step instead of sixteen).
pub(crate) fn cast_views(
    flat: &Tensor,
    dtype: DType,
    hidden: usize,
    intermediate: usize,
) -> Result<Vec<Tensor>> {
    let cast = flat.detach().to_dtype(dtype)?;
    let mut offset = 0;
    param_shapes(hidden, intermediate)
        .into_iter()
        .map(|shape| {
            let n = shape.iter().product();
            let v = cast.narrow(0, offset, n)?.reshape(shape);
            offset += n;
            v
        })
        .collect()
}

/// What the backward pass reads: the parameters (cast) and the forward pass's activations.
struct Saved {
    dims: (usize, usize, usize, usize),
    scale: f64,
    eps: f64,
    p: Vec<Tensor>,
    x: Tensor,
    qh: Tensor,
    kh: Tensor,
    vh: Tensor,
    /// In the softmax's dtype.
    probs: Tensor,
    probs_mask: Option<Tensor>,
    probs_dropped: Tensor,
    ctx: Tensor,
    attn_mask: Option<Tensor>,
    sum1: Tensor,
    norm1: Tensor,
    h1: Tensor,
    pre: Tensor,
    act: Tensor,
    out_mask: Option<Tensor>,
    sum2: Tensor,
    norm2: Tensor,
}

/// Column sums of `g` (rows, n) as f32: a bias's gradient. A product with a row of ones: on a
/// GPU that is cuBLAS's kernel (coalesced reads, f32 accumulation), where candle's sum over the
/// rows gives each column a thread block that reads it with a stride of n.
pub(crate) fn column_sums(g: &Tensor) -> Result<Tensor> {
    let ones = Tensor::ones((1, g.dim(0)?), g.dtype(), g.device())?;
    ones.matmul(g)?.squeeze(0)?.to_dtype(DType::F32)
}

/// Gradients of `y = x w^T + b` given dL/dy: (dL/dx, dL/dw in f32, dL/db in f32).
fn linear_grad(g: &Tensor, x: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        g.matmul(w)?,
        g.t()?.matmul(x)?.to_dtype(DType::F32)?,
        column_sums(g)?,
    ))
}

/// Gradients of `y = norm * w + b` (norm = LayerNorm(sum) without scale and shift) given dL/dy:
/// (dL/dsum, dL/dw in f32, dL/db in f32).
fn layer_norm_grad(
    g: &Tensor,
    sum: &Tensor,
    norm: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dw = column_sums(&(g * norm)?)?;
    let dnorm = g.broadcast_mul(w)?;
    let dsum = AttachGrad::Normalize { eps }.grad(sum, norm, &dnorm)?;
    Ok((dsum, dw, column_sums(g)?))
}

/// dL/dx of the exact GELU given dL/dy: g * (Phi(x) + x phi(x)), in x's dtype (as candle's own
/// backward of `gelu_erf`).
fn gelu_grad(g: &Tensor, x: &Tensor) -> Result<Tensor> {
    let cdf = (((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    let inv_sqrt_2pi = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
    let pdf = ((x.sqr()? * -0.5)?.exp()? * inv_sqrt_2pi)?;
    g * (cdf + (x * pdf)?)?
}

fn masked(g: Tensor, mask: &Option<Tensor>) -> Result<Tensor> {
    match mask {
        Some(m) => g * m,
        None => Ok(g),
    }
}

impl ValueGrad2 for Saved {
    fn name(&self) -> &'static str {
        "kindling-encoder-layer-explicit"
    }

    fn grad(&self, _xs: &Tensor, flat: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self;
        let p = &s.p;
        let (batch, seq, heads, hidden) = s.dims;
        let dy = dy.to_dtype(s.x.dtype())?;
        let merge = |z: &Tensor| z.transpose(1, 2)?.reshape((batch * seq, hidden));
        let split = |z: &Tensor| -> Result<Tensor> {
            z.reshape((batch, seq, heads, hidden / heads))?
                .transpose(1, 2)?
                .contiguous()
        };

        // Feed-forward block, from the top.
        let (dsum2, dln2_w, dln2_b) = layer_norm_grad(&dy, &s.sum2, &s.norm2, &p[14], s.eps)?;
        let dout = masked(dsum2.clone(), &s.out_mask)?;
        let (dact, dout_w, dout_b) = linear_grad(&dout, &s.act, &p[12])?;
        let dpre = gelu_grad(&dact, &s.pre)?;
        let (dh1_ffn, dinter_w, dinter_b) = linear_grad(&dpre, &s.h1, &p[10])?;
        let dh1 = (dsum2 + dh1_ffn)?;

        // Attention block.
        let (dsum1, dln1_w, dln1_b) = layer_norm_grad(&dh1, &s.sum1, &s.norm1, &p[8], s.eps)?;
        let dattn = masked(dsum1.clone(), &s.attn_mask)?;
        let (dctx, dattn_w, dattn_b) = linear_grad(&dattn, &s.ctx, &p[6])?;
        let dctx = split(&dctx)?;
        let dprobs_dropped = dctx.matmul(&s.vh.t()?)?;
        let dvh = s.probs_dropped.t()?.matmul(&dctx)?;
        let dprobs = masked(dprobs_dropped, &s.probs_mask)?.to_dtype(s.probs.dtype())?;
        // (The softmax's gradient reads only its output.)
        let dscores = (AttachGrad::Softmax.grad(&s.probs, &s.probs, &dprobs)? * s.scale)?
            .to_dtype(dy.dtype())?;
        let dqh = dscores.matmul(&s.kh)?;
        let dkh = dscores.t()?.matmul(&s.qh)?;
        let (dxq, dq_w, dq_b) = linear_grad(&merge(&dqh)?, &s.x, &p[0])?;
        let (dxk, dk_w, dk_b) = linear_grad(&merge(&dkh)?, &s.x, &p[2])?;
        let (dxv, dv_w, dv_b) = linear_grad(&merge(&dvh)?, &s.x, &p[4])?;
        let dx = (((dsum1 + dxq)? + dxk)? + dxv)?;

        let grads = [
            dq_w, dq_b, dk_w, dk_b, dv_w, dv_b, dattn_w, dattn_b, dln1_w, dln1_b, dinter_w,
            dinter_b, dout_w, dout_b, dln2_w, dln2_b,
        ];
        Ok((dx, flat_grads(&grads, flat.dtype())?))
    }
}

/// The 16 parameter gradients in [`cast_views`]' order, flattened and concatenated into the
/// gradient of the layer's flat parameter tensor, in its `dtype`.
pub(crate) fn flat_grads(grads: &[Tensor], dtype: DType) -> Result<Tensor> {
    let flat: Vec<Tensor> = grads
        .iter()
        .map(|g| g.flatten_all())
        .collect::<Result<_>>()?;
    Tensor::cat(&flat, 0)?.to_dtype(dtype)
}
