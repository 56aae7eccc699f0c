//! One BERT encoder layer on a GPU as one autograd node: cuBLAS for the matrix products
//! (candle's `matmul`), Kindling's CUDA kernels (`kindling-kernels`) for everything between
//! them, and the backward pass written out with the kernels' backward calls.
//!
//! Per layer that is seven products and six kernels forward (the q/k/v bias and head split, the
//! attention probabilities with their mask and dropout, the context's head merge, bias + GELU,
//! two LayerNorms each with its bias, dropout and residual), and their counterparts backward,
//! where the explicit layer (`explicit_layer.rs`, the same arithmetic from candle's ops) ran
//! about fifty element-wise passes, each a trip through HBM. The q, k and v projections are one
//! product with the three weights stacked (3h x h), so cuBLAS sees one larger problem. Dropout
//! masks are drawn inside the kernels from the CPU's counter-based stream (never stored: the
//! backward kernels redraw them), so a GPU run drops the elements a CPU run drops.
//!
//! What it keeps for the backward pass: the layer input, q, k, v, the attention probabilities
//! and their dropped form ((batch, heads, seq, seq) each), the attention context, the two
//! LayerNorm sums with their row statistics, the GELU's input and output, and h1. The
//! probabilities are what FlashAttention would recompute instead; in bf16 they are 3 MiB per
//! layer for 8 sequences of 128 tokens at 12 heads, 50 MiB at 512 tokens.
//!
//! Mixed precision as elsewhere: f32 master weights cast once per layer and step, products in the
//! activations' dtype, statistics and softmax in f32, parameter gradients in f32.

use candle_core::{DType, Result, Tensor};

use kindling_core::attach::{attach_grad2, ValueGrad2};
use kindling_kernels::{self as kernels, Dropout, LayerNormSaved};

use crate::explicit_layer::{cast_views, column_sums, flat_grads};
use crate::fused_layer::{flat_params, LayerArgs};

/// Whether this layer serves `xs`: a CUDA tensor in f32, bf16 or f16, rows the LayerNorm
/// kernels take, and `KINDLING_GPU_KERNELS` not set to `0` (which keeps the explicit layer of
/// candle's ops, to compare).
pub(crate) fn serves(xs: &Tensor, hidden: usize) -> bool {
    #[cfg(test)]
    if tests::ON_THE_CPU.with(|on| on.get()) {
        return matches!(xs.dtype(), DType::F32 | DType::BF16);
    }
    xs.device().is_cuda()
        && matches!(xs.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && hidden <= kernels::MAX_LAYER_NORM_WIDTH
        && std::env::var("KINDLING_GPU_KERNELS").as_deref() != Ok("0")
}

/// One encoder layer on `xs` (batch * seq, hidden); `mask` additive (batch, seq).
pub(crate) fn encoder_layer(xs: &Tensor, args: LayerArgs, mask: &Tensor) -> Result<Tensor> {
    encoder_layer_rows(xs, args, mask, None)
}

/// [`encoder_layer`] on unpadded rows: `xs` (rows, hidden) holds the real tokens only, `map`
/// (u32, one per row) their places `b * seq + s` in the padded batch. Every row-wise pass (the
/// products, LayerNorms, GELU: nearly all of the work) runs on real tokens only; attention runs
/// in the padded layout (q, k, v zero at padding, which the mask excludes), as MosaicBERT does
/// without FlashAttention's variable-length kernel. Dropout draws by padded place, so each row
/// computes exactly what it computes padded.
pub(crate) fn encoder_layer_rows(
    xs: &Tensor,
    args: LayerArgs,
    mask: &Tensor,
    map: Option<&Tensor>,
) -> Result<Tensor> {
    let LayerArgs {
        params,
        dims: (batch, seq, heads),
        intermediate,
        eps,
        dropout,
    } = args;
    let hidden = xs.dim(1)?;
    let head_dim = hidden / heads;
    let flat = flat_params(&params, hidden, intermediate)?;
    let p = cast_views(&flat, xs.dtype(), hidden, intermediate)?;
    let drops = [
        Dropout::from_site(dropout.probs),
        Dropout::from_site(dropout.attention_output),
        Dropout::from_site(dropout.output),
    ];
    let x = xs.detach();
    let scale = 1.0 / (head_dim as f32).sqrt();

    // Attention block.
    let wqkv = Tensor::cat(&[&p[0], &p[2], &p[4]], 0)?; // (3h, h)
    let bqkv = Tensor::cat(&[&p[1], &p[3], &p[5]], 0)?;
    let dims = (batch, seq, heads);
    let (qh, kh, vh) = kernels::qkv_split(&x.matmul(&wqkv.t()?)?, &bqkv, dims, map)?;
    let scores = qh.matmul(&kh.t()?)?; // (batch, heads, seq, seq)
    let (probs, probs_dropped) =
        kernels::attention_probs(&scores, &mask.detach(), scale, drops[0])?;
    let ctx = kernels::heads_to_rows(&probs_dropped.matmul(&vh)?, map)?;
    let (h1, ln1) = kernels::add_layer_norm(
        &ctx.matmul(&p[6].t()?)?,
        Some(&p[7]),
        Some(&x),
        &p[8],
        &p[9],
        eps,
        drops[1],
        map,
    )?;

    // Feed-forward block.
    let (pre, act) = kernels::bias_gelu(&h1.matmul(&p[10].t()?)?, &p[11])?;
    let (y, ln2) = kernels::add_layer_norm(
        &act.matmul(&p[12].t()?)?,
        Some(&p[13]),
        Some(&h1),
        &p[14],
        &p[15],
        eps,
        drops[2],
        map,
    )?;

    let saved = Saved {
        dims,
        map: map.cloned(),
        scale,
        drops,
        p,
        wqkv,
        x,
        qh,
        kh,
        vh,
        probs,
        probs_dropped,
        ctx,
        ln1,
        h1,
        pre,
        act,
        ln2,
    };
    attach_grad2(xs, &flat, &y, saved)
}

/// What the backward pass reads.
struct Saved {
    /// (batch, seq, heads)
    dims: (usize, usize, usize),
    map: Option<Tensor>,
    scale: f32,
    /// Attention probabilities, attention output, feed-forward output.
    drops: [Option<Dropout>; 3],
    p: Vec<Tensor>,
    wqkv: Tensor,
    x: Tensor,
    qh: Tensor,
    kh: Tensor,
    vh: Tensor,
    probs: Tensor,
    probs_dropped: Tensor,
    ctx: Tensor,
    ln1: LayerNormSaved,
    h1: Tensor,
    pre: Tensor,
    act: Tensor,
    ln2: LayerNormSaved,
}

/// dL/dW (f32) of `y = x W^T + b` given g = dL/dy.
fn weight_grad(g: &Tensor, x: &Tensor) -> Result<Tensor> {
    g.t()?.matmul(x)?.to_dtype(DType::F32)
}

impl ValueGrad2 for Saved {
    fn name(&self) -> &'static str {
        "kindling-encoder-layer-cuda"
    }

    fn grad(&self, _xs: &Tensor, flat: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self;
        let p = &s.p;
        let hidden = s.x.dim(1)?;
        let map = s.map.as_ref();
        let dy = dy.to_dtype(s.x.dtype())?;

        // Feed-forward block, from the top. g2.dz: the gradient of the output product + bias.
        let g2 = kernels::add_layer_norm_backward(&dy, None, &s.ln2, &p[14], s.drops[2])?;
        let dout_w = weight_grad(&g2.dz, &s.act)?;
        let dpre = kernels::gelu_backward(&g2.dz.matmul(&p[12])?, &s.pre)?;
        let dinter_w = weight_grad(&dpre, &s.h1)?;
        let dinter_b = column_sums(&dpre)?;
        // h1 feeds the feed-forward product and the residual: both gradients enter the first
        // LayerNorm's backward kernel, which adds them.
        let dh1_ffn = dpre.matmul(&p[10])?;

        // Attention block.
        let g1 =
            kernels::add_layer_norm_backward(&g2.dsum, Some(&dh1_ffn), &s.ln1, &p[8], s.drops[1])?;
        let dattn_w = weight_grad(&g1.dz, &s.ctx)?;
        let dctx = kernels::rows_to_heads(&g1.dz.matmul(&p[6])?, s.dims, map)?;
        let dprobs_dropped = dctx.matmul(&s.vh.t()?)?;
        let dvh = s.probs_dropped.t()?.matmul(&dctx)?;
        let dscores =
            kernels::attention_probs_backward(&dprobs_dropped, &s.probs, s.scale, s.drops[0])?;
        let dqh = dscores.matmul(&s.kh)?;
        let dkh = dscores.t()?.matmul(&s.qh)?;
        let dqkv = kernels::qkv_merge(&dqh, &dkh, &dvh, map)?; // (rows, 3h)
        let dx = (g1.dsum + dqkv.matmul(&s.wqkv)?)?;
        let dqkv_w = weight_grad(&dqkv, &s.x)?; // (3h, h)
        let dqkv_b = column_sums(&dqkv)?;

        let part = |t: &Tensor, i: usize| t.narrow(0, i * hidden, hidden);
        let grads = [
            part(&dqkv_w, 0)?,
            part(&dqkv_b, 0)?,
            part(&dqkv_w, 1)?,
            part(&dqkv_b, 1)?,
            part(&dqkv_w, 2)?,
            part(&dqkv_b, 2)?,
            dattn_w,
            g1.dbias,
            g1.dgamma,
            g1.dbeta,
            dinter_w,
            dinter_b,
            dout_w,
            g2.dbias,
            g2.dgamma,
            g2.dbeta,
        ];
        Ok((dx, flat_grads(&grads, flat.dtype())?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    thread_local! {
        /// Tests on the kernels' CPU emulation: this thread's models take the CUDA layer (and
        /// unpad) on CPU tensors.
        pub(crate) static ON_THE_CPU: Cell<bool> = const { Cell::new(false) };
    }
}
