//! The CUDA kernels of src/kernels.cu, run on the CPU under emulate/cuda_emulation.h (a
//! block's threads as real threads, barriers for `__syncthreads` and warp shuffles), against
//! reference loops in double and central differences (emulate/check.cpp). A GPU run checks
//! the same kernels against candle's composed ops (`cargo bench --features cuda --bench gpu --
//! kernels`); this test is what CI, which has no GPU, can say about them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// check.cpp compiled with the host C++ compiler ($CXX, else g++), once per test binary.
fn checker() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kindling-kernels-check");
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
            let status = Command::new(&cxx)
                .args(["-std=c++20", "-O2", "-pthread", "-o"])
                .arg(&out)
                .arg(dir.join("emulate/check.cpp"))
                .status()
                .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}`: {e}"));
            assert!(status.success(), "{cxx} failed on emulate/check.cpp");
            out
        })
        .clone()
}

#[test]
fn every_kernel_matches_its_reference_in_f32_and_bf16() {
    let out = Command::new(checker())
        .output()
        .expect("run the kernel check");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "kernel check failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every kernel reported, in both types where it has both.
    for kernel in [
        "bias_gelu_fwd act",
        "gelu_bwd",
        "attn_probs_fwd probs",
        "attn_probs_bwd",
        "add_ln_fwd y",
        "add_ln_bwd dgamma",
        "cross_entropy grad",
        "embedding_grad",
        "qkv_merge",
        "qkv_split (unpadded rows)",
        "heads_to_rows (unpadded rows)",
        "rows_to_heads (unpadded rows)",
    ] {
        for dtype in ["f32", "bf16"] {
            assert!(
                text.lines().any(|l| l.starts_with(kernel)
                    && l.contains(&format!(" {dtype} "))
                    && l.ends_with("ok")),
                "no passing line for {kernel} in {dtype}:\n{text}"
            );
        }
    }
}

#[test]
fn the_dropout_kernel_drops_what_the_cpu_drops() {
    for (seed, p) in [
        (0u64, 0.1f32),
        (0xdead_beef, 0.5),
        (7, 0.0),
        (123_456_789, 0.9),
    ] {
        let n = 1027u64; // not a multiple of the four draws per word
        let out = Command::new(checker())
            .args(["keep", &seed.to_string(), &p.to_string(), &n.to_string()])
            .output()
            .expect("run the kernel check");
        assert!(out.status.success());
        let kept: Vec<bool> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l == "1")
            .collect();
        let want: Vec<bool> = (0..n)
            .map(|i| kindling_models::ops::keep_at(seed, i, p))
            .collect();
        assert_eq!(kept, want, "seed {seed}, p {p}");
    }
}
