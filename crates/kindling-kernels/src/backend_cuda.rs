//! The CUDA backend: kernels from the PTX `build.rs` compiled, queued on candle's stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{self, DevicePtr, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Device, Result, Shape, Storage, Tensor};

use crate::launchers::{locked, resolve, Arg, LaunchConfig, Resolved};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "kindling-kernels";

pub(crate) type Dev = candle_core::CudaDevice;

pub(crate) fn from_device(d: &Device) -> Result<Dev> {
    match d {
        Device::Cuda(d) => Ok(d.clone()),
        d => bail!("kindling-kernels: expected a CUDA device, got {d:?}"),
    }
}

pub(crate) fn device_of(t: &Tensor) -> Result<Dev> {
    from_device(t.device())
}

/// Queues kernel `name` with `args` on the device's stream (candle's one stream per device).
pub(crate) fn launch(dev: &Dev, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let stream = dev.cuda_stream();
    // Every tensor's storage stays read-locked until the launch is queued: no one frees or
    // replaces it in between. Kernels write only into tensors made for them (or, for AdamW,
    // into the optimiser's own state), so no other holder sees a change under its lock.
    let guards = locked(args);
    let mut ptrs = Vec::with_capacity(guards.len());
    let mut syncs = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cuda(cs) = &**storage else {
            bail!("{name}: expected CUDA storage")
        };
        if !layout.is_contiguous() {
            bail!("{name}: inputs must be contiguous")
        }
        let dtype = cs.dtype();
        let (base, sync) = match &cs.slice {
            CudaStorageSlice::F32(s) => s.device_ptr(&stream),
            CudaStorageSlice::BF16(s) => s.device_ptr(&stream),
            CudaStorageSlice::F16(s) => s.device_ptr(&stream),
            CudaStorageSlice::U32(s) => s.device_ptr(&stream),
            _ => bail!("{name}: unsupported dtype {dtype:?}"),
        };
        ptrs.push(base + (layout.start_offset() * dtype.size_in_bytes()) as u64);
        syncs.push(sync);
    }
    // Tables uploaded first (each a copy to the device, queued on the stream before the launch).
    let resolved = resolve(args, &ptrs);
    let uploads = resolved
        .iter()
        .map(|r| match r {
            Resolved::Table(words) => stream.clone_htod(words).w().map(Some),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let null = 0u64;
    let mut builder = func.builder();
    for ((a, r), upload) in args.iter().zip(&resolved).zip(&uploads) {
        match (a, r, upload) {
            (_, Resolved::Ptr(p), _) => builder.arg(p),
            (_, _, Some(table)) => builder.arg(table),
            (Arg::U32(v), ..) => builder.arg(v),
            (Arg::U64(v), ..) => builder.arg(v),
            (Arg::F32(v), ..) => builder.arg(v),
            _ => builder.arg(&null),
        };
    }
    let cfg = driver::LaunchConfig {
        grid_dim: cfg.grid_dim,
        block_dim: cfg.block_dim,
        shared_mem_bytes: cfg.shared_mem_bytes,
    };
    // SAFETY: the argument list matches the kernel's signature in kernels.cu (pointers are
    // 64-bit), and every pointer is into a live, contiguous allocation of the expected size,
    // checked by the caller.
    unsafe { builder.launch(cfg) }.w()?;
    drop(syncs);
    Ok(())
}

/// A new tensor of `shape` on `dev`, its contents uninitialised: every kernel writes all of
/// its outputs' elements.
pub(crate) fn empty(shape: impl Into<Shape>, dtype: DType, dev: &Dev) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: the memory is written by the kernel before anything reads it.
    let slice = unsafe {
        match dtype {
            DType::F32 => CudaStorageSlice::F32(dev.alloc::<f32>(n)?),
            DType::BF16 => CudaStorageSlice::BF16(dev.alloc(n)?),
            DType::F16 => CudaStorageSlice::F16(dev.alloc(n)?),
            DType::U32 => CudaStorageSlice::U32(dev.alloc::<u32>(n)?),
            d => bail!("kindling-kernels: cannot allocate {d:?}"),
        }
    };
    let storage = Storage::Cuda(CudaStorage {
        slice,
        device: dev.clone(),
    });
    Ok(Tensor::from_storage(
        storage,
        shape,
        BackpropOp::none(),
        false,
    ))
}
