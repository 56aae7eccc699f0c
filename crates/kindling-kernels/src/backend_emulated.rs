//! The emulated backend, for tests on machines without a GPU: the same kernel source compiled
//! for the host under `emulate/cuda_emulation.h` (`build.rs`, feature `emulate`), run on CPU
//! tensors. The launchers and everything built on them (the CUDA encoder layer's forward and
//! backward composition) then run on the CPU and can be compared with candle's ops there.
//! Slow (a thread per CUDA thread) and only for small shapes.

use std::ffi::{c_char, c_int, c_uint, c_void, CString};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Device, Result, Shape, Storage, Tensor};

use crate::launchers::{locked, resolve, Arg, LaunchConfig, Resolved};

extern "C" {
    fn kindling_emulated_launch(
        name: *const c_char,
        grid: c_uint,
        block: c_uint,
        shared_bytes: c_uint,
        args: *mut *mut c_void,
    ) -> c_int;
}

/// The emulation runs on the CPU device.
pub(crate) struct Dev;

pub(crate) fn from_device(d: &Device) -> Result<Dev> {
    match d {
        Device::Cpu => Ok(Dev),
        d => bail!("kindling-kernels (emulated): expected the CPU, got {d:?}"),
    }
}

pub(crate) fn device_of(t: &Tensor) -> Result<Dev> {
    from_device(t.device())
}

pub(crate) fn launch(_: &Dev, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let guards = locked(args);
    let mut ptrs = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cs) = &**storage else {
            bail!("{name}: expected CPU storage")
        };
        if !layout.is_contiguous() {
            bail!("{name}: inputs must be contiguous")
        }
        let (base, size) = match cs {
            CpuStorage::F32(v) => (v.as_ptr() as u64, 4),
            CpuStorage::BF16(v) => (v.as_ptr() as u64, 2),
            CpuStorage::F16(v) => (v.as_ptr() as u64, 2),
            CpuStorage::U32(v) => (v.as_ptr() as u64, 4),
            s => bail!("{name}: unsupported dtype {:?}", s.dtype()),
        };
        ptrs.push(base + (layout.start_offset() * size) as u64);
    }
    // Each argument in its own 8-byte slot, as cuLaunchKernel takes them: the kernel reads a
    // slot as its parameter's type (little-endian: a u32 or f32 in the low bytes).
    // Tables stay in host memory for the call (the emulated kernels read them directly).
    let resolved = resolve(args, &ptrs);
    let mut slots: Vec<u64> = args
        .iter()
        .zip(&resolved)
        .map(|(a, r)| match (a, r) {
            (_, Resolved::Ptr(p)) => *p,
            (_, Resolved::Table(words)) => words.as_ptr() as u64,
            (Arg::U32(v), _) => *v as u64,
            (Arg::U64(v), _) => *v,
            (Arg::F32(v), _) => v.to_bits() as u64,
            _ => 0,
        })
        .collect();
    let mut pointers: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| s as *mut u64 as *mut c_void)
        .collect();
    let cname = CString::new(name).expect("kernel names have no NUL");
    // SAFETY: the slots match the kernel's parameters (the same argument lists as the CUDA
    // backend); the tensors stay alive and locked until the call returns. The kernels write only
    // into outputs made for them (or the optimiser's state), through pointers into their
    // storage's buffers.
    let status = unsafe {
        kindling_emulated_launch(
            cname.as_ptr(),
            cfg.grid_dim.0,
            cfg.block_dim.0,
            cfg.shared_mem_bytes,
            pointers.as_mut_ptr(),
        )
    };
    if status != 0 {
        bail!("kindling-kernels (emulated): no kernel {name}")
    }
    Ok(())
}

pub(crate) fn empty(shape: impl Into<Shape>, dtype: DType, _: &Dev) -> Result<Tensor> {
    // Zeroed (the CUDA backend's are uninitialised; every kernel writes all of its outputs).
    Tensor::zeros(shape.into(), dtype, &Device::Cpu)
}
