//! The GPU kernel check (`cargo bench --features cuda --bench gpu -- kernels`,
//! benches/gpu_checks/) run on the CPU against the kernels' emulation: every launcher against
//! candle's composed ops at small shapes, f32 and bf16. What a GPU window then runs is code that
//! has run.

#[path = "../benches/gpu_checks/mod.rs"]
mod gpu_checks;

#[test]
fn every_kernel_launcher_matches_candles_composed_ops_on_the_emulation() {
    assert_eq!(kindling_kernels::BACKEND, Some("emulated"));
    assert_eq!(gpu_checks::run(&candle_core::Device::Cpu), 0);
}
