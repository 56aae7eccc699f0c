//! Helpers shared by the unit tests of the fused kernels and layers.

use candle_core::Tensor;

/// max |a - b| / max |b|: the largest difference relative to the reference's scale.
pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.max(1e-12)
}
