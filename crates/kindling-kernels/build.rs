//! With the `cuda` feature: src/kernels.cu to PTX with nvcc, as candle-kernels does for its own
//! kernels (the PTX is embedded in the library and loaded by the driver on first use). nvcc comes
//! from CUDA_HOME/bin, else PATH (scripts/cuda-from-pypi.sh sets both up from PyPI wheels); the
//! target is compute_$CUDA_COMPUTE_CAP (default 90, H100/H200), as for candle's kernels.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-changed=emulate");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        if std::env::var_os("CARGO_FEATURE_EMULATE").is_some() {
            emulated();
        }
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("kernels.ptx");
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("kindling-kernels: cannot run {}: {e}", nvcc.display()));
    assert!(
        status.success(),
        "kindling-kernels: nvcc failed on src/kernels.cu"
    );
}

/// The kernels compiled for the host under emulate/cuda_emulation.h, behind one C entry point
/// (emulate/dispatch.cpp), for the emulated backend.
#[cfg(feature = "emulate")]
fn emulated() {
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .flag("-pthread")
        .file("emulate/dispatch.cpp")
        .compile("kindling_kernels_emulated");
    println!("cargo::rustc-link-lib=pthread");
}

#[cfg(not(feature = "emulate"))]
fn emulated() {}
