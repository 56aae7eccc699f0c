//! The GPU path: candle's fused softmax and LayerNorm kernels (which have no backward) with this
//! crate's backward passes attached, and the composed ops kept to compare.

#[allow(unused_imports)]
use super::*;

/// Softmax from candle's ops with the row maximum detached: the result does not depend on the
/// shift, so its gradient through the maximum is zero, which candle would otherwise compute
/// with an equality mask, a product and a sum the size of the input.
pub(super) fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let e = x
        .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log_softmax` over the last dimension, with the row maximum detached: the result does not
/// depend on the shift, so no gradient flows through the maximum.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// candle_nn's fused softmax kernel (one pass, f32 accumulation for bf16/f16; no backward of
/// its own) with the softmax gradient attached.
pub(crate) fn softmax_attached(x: &Tensor) -> Result<Tensor> {
    attach_grad(x, &softmax_value(x)?, AttachGrad::Softmax)
}

/// Softmax over the last dimension as a value (no graph): candle_nn's fused kernel on CUDA, the
/// composition elsewhere.
pub(crate) fn softmax_value(x: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    if x.device().is_cuda() {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    softmax_composed(&x)
}

/// LayerNorm without scale and shift, `(x - mean) / sqrt(var + eps)` over the last dimension:
/// candle_nn's fused kernel (f32 arithmetic inside for bf16/f16) with the gradient attached.
pub(crate) fn normalize_attached(x: &Tensor, eps: f64) -> Result<Tensor> {
    attach_grad(x, &normalize_value(x, eps)?, AttachGrad::Normalize { eps })
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension as a value (no graph), in f32
/// arithmetic and `x`'s dtype: candle_nn's fused kernel on CUDA, the composition elsewhere.
pub(crate) fn normalize_value(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.detach();
    if x.device().is_cuda() {
        let h = x.dim(D::Minus1)?;
        let (one, zero) = (
            Tensor::ones(h, x.dtype(), x.device())?,
            Tensor::zeros(h, x.dtype(), x.device())?,
        );
        return candle_nn::ops::layer_norm(&x.contiguous()?, &one, &zero, eps as f32);
    }
    normalized_f32(&x, eps)?.0.to_dtype(x.dtype())
}

/// `(x^, r)` of LayerNorm over the last dimension in f32: x^ = (x - mean) * r, r = 1 /
/// sqrt(var + eps) (one per row).
pub(super) fn normalized_f32(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let xf = x.to_dtype(DType::F32)?;
    let xc = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((xc.broadcast_mul(&r)?, r))
}

/// The gradient of a kernel that has no backward pass (candle_nn's fused GPU softmax and
/// LayerNorm), attached to its output with [`attach_grad`]: from candle's ops, so it runs on any
/// device; one autograd node instead of the five to fifteen of the composed function.
pub(crate) enum AttachGrad {
    /// value = softmax(input) over the last dimension.
    Softmax,
    /// value = (input - mean) / sqrt(var + eps) over the last dimension.
    Normalize { eps: f64 },
}

impl ValueGrad for AttachGrad {
    fn name(&self) -> &'static str {
        "kindling-attach-grad"
    }

    fn grad(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let dx = match self {
            // dx = y * (g - sum(g * y))
            AttachGrad::Softmax => {
                let gy = (g * y)?;
                (&gy - y.broadcast_mul(&gy.sum_keepdim(D::Minus1)?)?)?
            }
            // With x^ = (x - mean) * r, r = 1 / sqrt(var + eps), over n features:
            // dx = r * (g - mean(g) - x^ * mean(g * x^)). In f32 from x (x^ recomputed: the
            // value may be bf16).
            AttachGrad::Normalize { eps } => {
                let (xh, r) = normalized_f32(x, *eps)?;
                let gf = g.to_dtype(DType::F32)?;
                let inner = (gf.broadcast_sub(&gf.mean_keepdim(D::Minus1)?)?
                    - xh.broadcast_mul(&(&gf * &xh)?.mean_keepdim(D::Minus1)?)?)?;
                inner.broadcast_mul(&r)?.to_dtype(x.dtype())?
            }
        };
        Ok(dx)
    }
}
