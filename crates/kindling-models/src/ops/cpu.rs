//! Reading candle CPU storage as contiguous f32, and the checks a fused op makes before it runs.

#[allow(unused_imports)]
use super::*;

/// The f32 slice of a contiguous CPU tensor's storage; an error naming `op` otherwise.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// The activations a one-node op's forward pass kept for its backward pass (see
/// `fused_layer.rs`, `fused_resnet.rs`), or an error naming the op when none were kept.
pub(crate) fn saved_activations<'a, T>(slot: &'a Option<T>, op: &str) -> Result<&'a T> {
    slot.as_ref()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: backward without saved activations")))
}

/// The f32 slices of a one-node op's input, its flat parameters and the incoming gradient (made
/// contiguous), handed to `f`: the start of every one-node backward pass (`fused_layer.rs`,
/// `fused_modernbert.rs`, `fused_resnet.rs`), whose storage guards must outlive the slices.
pub(crate) fn with_cpu_inputs<R>(
    x: &Tensor,
    flat: &Tensor,
    grad: &Tensor,
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> Result<R>,
) -> Result<R> {
    let grad = grad.contiguous()?;
    let ((sx, lx), (sp, lp), (sg, lg)) = (
        x.storage_and_layout(),
        flat.storage_and_layout(),
        grad.storage_and_layout(),
    );
    f(cpu_f32(&sx, lx)?, cpu_f32(&sp, lp)?, cpu_f32(&sg, lg)?)
}

pub(crate) fn fused_ok(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}
