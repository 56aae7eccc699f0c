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

/// sum |t|, as f32: zero exactly when every element is zero (a gradient that never arrived).
pub(crate) fn abs_sum(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A tensor of `shape` drawn uniformly from (-scale, scale) by the seeded project generator.
pub(crate) fn uniform(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    use rand::Rng;
    let mut r = kindling_core::rng::rng(&[seed]);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}
