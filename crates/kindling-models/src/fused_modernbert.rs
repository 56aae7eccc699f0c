//! One ModernBERT layer as one autograd node (CPU, f32): the pre-norm attention block (rotary
//! positions, global or sliding-window) and the pre-norm GeGLU block, forward and backward
//! written out by hand, as `crate::fused_layer` does for BERT's post-norm layer.
//!
//! Why: composed, the layer is about a dozen autograd nodes with (tokens, hidden)- or (tokens,
//! intermediate)-sized inputs (norms, Wqkv, three narrows, two rotations, attention, Wo,
//! dropout, two residual adds, Wi, GeGLU, Wo), and candle's backward pass zero-fills and adds a
//! gradient buffer for each input of each node. As one node the layer pays that once, for its
//! input and for the one flat tensor its parameters are concatenated into (a copy of the
//! layer's parameters each step: 0.9M floats a layer of modernbert-mini, against activations
//! of 4096 x 256 the bookkeeping touched a dozen times). The arithmetic is the same kernels
//! (gemm, `SelfAttention` with its window, LayerNorm, the GeGLU gate, seeded dropout with the
//! same streams), so it computes what the composed layer computes up to summation order; the
//! tests in `modernbert.rs` check forward and every gradient against it.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::fused_layer::{
    add_rows, concat_params, dropout_residual, gather_rows, split, split_mut,
};
use crate::ops::{
    contiguous_f32, dropped, geglu_grad_rows, geglu_rows, layer_norm_grad_rows, layer_norm_rows,
    linear_bwd, linear_fwd, saved_activations, with_cpu_inputs, zeros_par, RotaryTable,
    SelfAttention,
};

/// The parameters of one layer, in the order they are concatenated (HF names, under
/// `model.layers.N.`). Absent biases (`attention_bias`, `mlp_bias`, `norm_bias` false) are the
/// model's constant zeros, so every slot is there; layer 0 has no `attn_norm` (its input is the
/// embeddings' norm already) and its two slots are empty.
pub(crate) const PARAMS: [&str; 12] = [
    "attn_norm.weight",
    "attn_norm.bias",
    "attn.Wqkv.weight",
    "attn.Wqkv.bias",
    "attn.Wo.weight",
    "attn.Wo.bias",
    "mlp_norm.weight",
    "mlp_norm.bias",
    "mlp.Wi.weight",
    "mlp.Wi.bias",
    "mlp.Wo.weight",
    "mlp.Wo.bias",
];

/// Element counts of [`PARAMS`] for hidden size `h`, intermediate size `i` and whether the
/// layer has its attention norm.
fn param_sizes(h: usize, i: usize, attn_norm: bool) -> [usize; 12] {
    let n = if attn_norm { h } else { 0 };
    [
        n,
        n,
        3 * h * h,
        3 * h,
        h * h,
        h,
        h,
        h,
        2 * i * h,
        2 * i,
        i * h,
        h,
    ]
}

/// Activations of the forward pass the backward pass reads.
struct Saved {
    /// `attn_norm(x)` at every row, when the layer has that norm (else it is x itself)
    normed: Option<Vec<f32>>,
    /// its querying rows, when not all query (`ModernBertLayerOp::rows`)
    normed_rows: Option<Vec<f32>>,
    /// rotated queries and keys, and the values
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    /// attention probabilities before dropout, when they fit (`SelfAttention::can_keep_probs`)
    probs: Option<Vec<f32>>,
    /// x + the attention block: the feed-forward block's input and residual
    x1: Vec<f32>,
    /// `mlp_norm(x1)`
    m: Vec<f32>,
    /// `Wi`'s output, `[input | gate]` (rows, 2i)
    up: Vec<f32>,
    /// `dropout(gelu(input) * gate)`: the second `Wo`'s input
    gated: Vec<f32>,
}

/// `model.layers.N` as one op on (x (batch * seq, hidden), flat parameters).
pub(crate) struct ModernBertLayerOp {
    /// with the layer's window and, at the last layer of an MLM step, its query rows
    attention: SelfAttention,
    rotary: RotaryTable,
    hidden: usize,
    intermediate: usize,
    eps: f32,
    attn_norm: bool,
    /// (p, seed) of the attention output's dropout and of the gated activations' (`mlp.drop`).
    attention_dropout: Option<(f32, u64)>,
    mlp_dropout: Option<(f32, u64)>,
    /// Whether a backward pass can follow (keep the activations).
    save: bool,
    /// The rows (flat `b * seq + t`, strictly increasing) the layer outputs, when not all (see
    /// `crate::fused_layer::EncoderLayerOp::rows`): keys and values come from every row, the
    /// rest runs at these rows only, each dropout element drawing as at its place in the full
    /// tensors.
    rows: Option<Vec<u32>>,
    saved: Mutex<Option<Saved>>,
}

impl ModernBertLayerOp {
    fn sizes(&self) -> [usize; 12] {
        param_sizes(self.hidden, self.intermediate, self.attn_norm)
    }
}

impl CustomOp2 for ModernBertLayerOp {
    fn name(&self) -> &'static str {
        "kindling-modernbert-layer"
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
        let (h, i) = (self.hidden, self.intermediate);
        let [anw, anb, wqkv, bqkv, ow, ob, mnw, mnb, wi, bi, fw, fb] = split(flat, self.sizes());
        let rows = self.rows.as_deref();
        let normed = self
            .attn_norm
            .then(|| layer_norm_rows(x, anw, anb, self.eps));
        let all = normed.as_deref().unwrap_or(x);
        let normed_rows = rows.map(|r| gather_rows(all, r, h));
        // The rows that query and go on through the layer.
        let nq = normed_rows.as_deref().unwrap_or(all);
        // Wqkv's rows are q's, then k's, then v's: three products, so that q can run at the
        // querying rows only and each comes out contiguous for the attention kernel.
        let [qw, kw, vw] = split(wqkv, [h * h; 3]);
        let [qb, kb, vb] = split(bqkv, [h; 3]);
        let mut q = linear_fwd(nq, qw, qb);
        let mut k = linear_fwd(all, kw, kb);
        let v = linear_fwd(all, vw, vb);
        self.rotary.rotate(&mut q, h, rows, false);
        self.rotary.rotate(&mut k, h, None, false);
        let (ctx, probs) = self.attention.forward_keeping(
            &q,
            &k,
            &v,
            self.save && self.attention.can_keep_probs(),
        );
        let mut x1 = linear_fwd(&ctx, ow, ob);
        let x_rows = rows.map(|r| gather_rows(x, r, h));
        let residual = x_rows.as_deref().unwrap_or(x);
        dropout_residual(self.attention_dropout, &mut x1, residual, h, rows);
        drop(x_rows);
        let m = layer_norm_rows(&x1, mnw, mnb, self.eps);
        let up = linear_fwd(&m, wi, bi);
        let mut gated = geglu_rows(&up, i);
        if self.mlp_dropout.is_some() {
            gated = dropped(self.mlp_dropout, &gated, i, rows);
        }
        let mut y = linear_fwd(&gated, fw, fb);
        dropout_residual(None, &mut y, &x1, h, rows);
        if self.save {
            *self.saved.lock().expect("saved activations") = Some(Saved {
                normed,
                normed_rows,
                q,
                k,
                v,
                ctx,
                probs,
                x1,
                m,
                up,
                gated,
            });
        }
        let shape = Shape::from((y.len() / h, h));
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
            let sizes = self.sizes();
            let [anw, _, wqkv, _, ow, _, mnw, _, wi, _, fw, _] = split(params, sizes);
            let mut dflat = zeros_par(params.len());
            let [danw, danb, dwqkv, dbqkv, dow, dob, dmnw, dmnb, dwi, dbi, dfw, dfb] =
                split_mut(&mut dflat, sizes);
            let (h, i) = (self.hidden, self.intermediate);
            let rows = self.rows.as_deref();
            // m rows went on through the layer.
            let m = dy.len() / h;

            // Feed-forward block: y = x1 + Wo(dropout(geglu(Wi(mlp_norm(x1))))).
            let mut dgated = zeros_par(m * i);
            linear_bwd(&s.gated, fw, dy, (&mut dgated, false), dfw, dfb);
            if self.mlp_dropout.is_some() {
                dgated = dropped(self.mlp_dropout, &dgated, i, rows);
            }
            let dup = geglu_grad_rows(&s.up, &dgated, i);
            drop(dgated);
            let mut dm = zeros_par(m * h);
            linear_bwd(&s.m, wi, &dup, (&mut dm, false), dwi, dbi);
            drop(dup);
            let mut dx1 = zeros_par(m * h);
            let mut dln = vec![0f32; 2 * h];
            layer_norm_grad_rows(&s.x1, mnw, &dm, self.eps, &mut dx1, &mut dln);
            dmnw.copy_from_slice(&dln[..h]);
            dmnb.copy_from_slice(&dln[h..]);
            drop(dm);
            // The residual: every row of dy is a row of dx1.
            add_rows(&mut dx1, dy, None, h);

            // Attention block: x1 = x + dropout(Wo(attention(rot(q), rot(k), v))).
            let dattn = dropped(self.attention_dropout, &dx1, h, rows);
            let mut dctx = zeros_par(m * h);
            linear_bwd(&s.ctx, ow, &dattn, (&mut dctx, false), dow, dob);
            drop(dattn);
            let (mut dq, mut dk, dv) =
                self.attention
                    .backward(&s.q, &s.k, &s.v, &dctx, s.probs.as_deref());
            drop(dctx);
            // A rotation is linear: the gradient goes back through its transpose.
            self.rotary.rotate(&mut dq, h, rows, true);
            self.rotary.rotate(&mut dk, h, None, true);
            let all = s.normed.as_deref().unwrap_or(xs);
            let nq = s.normed_rows.as_deref().unwrap_or(all);
            let [qw, kw, vw] = split(wqkv, [h * h; 3]);
            let [dqw, dkw, dvw] = split_mut(dwqkv, [h * h; 3]);
            let [dqb, dkb, dvb] = split_mut(dbqkv, [h; 3]);
            // dL/d(normed rows) = dq W_q at the querying rows + dk W_k + dv W_v at all.
            let mut dn = zeros_par(all.len());
            if rows.is_none() {
                linear_bwd(nq, qw, &dq, (&mut dn, false), dqw, dqb);
            }
            linear_bwd(all, kw, &dk, (&mut dn, rows.is_none()), dkw, dkb);
            linear_bwd(all, vw, &dv, (&mut dn, true), dvw, dvb);
            if rows.is_some() {
                let mut dnq = zeros_par(nq.len());
                linear_bwd(nq, qw, &dq, (&mut dnq, false), dqw, dqb);
                add_rows(&mut dn, &dnq, rows, h);
            }
            drop((dq, dk, dv));
            let mut dx = if self.attn_norm {
                let mut dx = zeros_par(xs.len());
                let mut dln = vec![0f32; 2 * h];
                layer_norm_grad_rows(xs, anw, &dn, self.eps, &mut dx, &mut dln);
                danw.copy_from_slice(&dln[..h]);
                danb.copy_from_slice(&dln[h..]);
                dx
            } else {
                dn
            };
            // The attention block's residual, at the rows that went on.
            add_rows(&mut dx, &dx1, rows, h);
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dflat, flat.shape(), dev)?),
            ))
        })
    }
}

/// What [`modernbert_layer`] is given besides its input and mask.
pub(crate) struct ModernBertLayerArgs<'a> {
    /// [`PARAMS`]' tensors in order, without `attn_norm`'s two for layer 0
    pub params: Vec<&'a Tensor>,
    /// (batch, seq, heads)
    pub dims: (usize, usize, usize),
    pub intermediate: usize,
    pub eps: f64,
    /// the half-window of a local layer, `None` for a global one
    pub window: Option<usize>,
    pub rotary: &'a RotaryTable,
    /// (p, seed) of the attention probabilities, the attention output and `mlp.drop`
    pub dropout: [Option<(f32, u64)>; 3],
}

/// One ModernBERT layer on `xs` (batch * seq, hidden), CPU f32; `mask` additive (batch, seq).
/// With `rows` (flat `b * seq + t`, strictly increasing) only those rows of the output: (rows,
/// hidden).
pub(crate) fn modernbert_layer(
    xs: &Tensor,
    args: ModernBertLayerArgs,
    mask: &Tensor,
    rows: Option<&[u32]>,
) -> Result<Tensor> {
    let ModernBertLayerArgs {
        params,
        dims: (batch, seq, heads),
        intermediate,
        eps,
        window,
        rotary,
        dropout: [probs, attention_output, mlp],
    } = args;
    let hidden = xs.dim(1)?;
    let attn_norm = params.len() == PARAMS.len();
    let names = if attn_norm { &PARAMS[..] } else { &PARAMS[2..] };
    let expected = param_sizes(hidden, intermediate, attn_norm).iter().sum();
    let op = format!("kindling-modernbert-layer (hidden {hidden}, intermediate {intermediate})");
    let flat = concat_params(&params, expected, &op, names)?;
    let attention = SelfAttention::new(
        (batch, seq, heads),
        hidden,
        mask.flatten_all()?.to_vec1()?,
        probs,
    )
    .with_window(window);
    let attention = match rows {
        None => attention,
        Some(r) => match attention.with_query_rows(r) {
            Some(a) => a,
            None => candle_core::bail!(
                "kindling-modernbert-layer: output rows must be increasing and below {}",
                batch * seq
            ),
        },
    };
    let op = ModernBertLayerOp {
        attention,
        rotary: rotary.clone(),
        hidden,
        intermediate,
        eps: eps as f32,
        attn_norm,
        attention_dropout: attention_output,
        mlp_dropout: mlp,
        save: xs.track_op() || flat.track_op(),
        rows: rows.map(<[u32]>::to_vec),
        saved: Mutex::new(None),
    };
    xs.contiguous()?.apply_op2(&flat, op)
}
